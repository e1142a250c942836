"""Cost-model fidelity: predicted against measured time and memory of every stage of a 4-stage plan.

    python benchmarks/cost_model_fidelity.py --device cuda --spec h100-calibrated.json \\
        --out benchmarks/results/cost_model_fidelity-h100.json
    python benchmarks/cost_model_fidelity.py --device cpu --quick      # tiny models, minutes

For each model (GPT-2 medium, a 1.1B Llama decoder, ResNet-50, BERT-large; tiny versions with
``--quick``), in ``--dtype`` (default bfloat16), on one device:

1. trace one microbatch of the batch on the device, and plan 4 stages with the ILP on the built-in
   spec (``h100``, or ``cpu`` for ``--device cpu``), schedule 1F1B, Adam;
2. predict each stage's forward+backward time per microbatch three ways, on the same assignment:
   the roofline with the built-in spec, the roofline with the calibrated spec (``--spec``), and
   profiling mode (``cost_model.measure.profile_nodes`` of every node, with the in-context host
   times, each stage replayed alone with the input-derived nodes it recomputes, as the
   partitioner's evaluation does: Note [stage replay] in ``cost_model/replay.py``);
   ``profiled_additive`` sums ``node_times`` over the stage instead (the model before the stage
   replay); ``profiled_device_bwd`` counts the backward's device time only,
   ``profiled_context_bwd`` replays it with the in-context host times of Note [in-context
   backward host time], both with the forward host times measured node by node alone;
   ``profiled_isolated_fwd`` and ``profiled_context_fwd`` do the same for the forward (Note
   [in-context forward host time]), both with the default backward (``profiled`` is the latter
   where measured, plus each stage's call overhead: Note [call overhead] in
   ``cost_model/replay.py``, measured in every round; the other variants leave it out); a
   failed in-context measurement falls back, with a NOTE line;
   and the stage's peak memory (``MemoryEstimate.peak``);
3. measure each stage alone (Note [fidelity measurement]).

Note [fidelity measurement]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
What the cost model claims for a stage is: per microbatch, the compute time of its nodes,
forward and backward (Note [stage time and memory] in ``modelparallel/partitioner/problem.py``);
at its peak, its parameters, gradients and optimizer state, plus the saved activations and
received and sent values of the microbatches 1F1B keeps in flight, plus the largest op's workspace. So
each stage is measured alone, on the values it really receives (captured from a forward pass of
the stages before it):

- **time**: the stage module's forward on one microbatch (its received values as leaves that
  require grad, as the runtime gives them), then backward from random upstream gradients of
  everything it sends (or of the model output, on the last stage); parameter gradients already
  exist, so they accumulate as from the second microbatch of a step on. CUDA events around each
  repetition, back to back (the host queues the next forward while the device runs this
  backward, as in a pipeline's steady state). The stages of a model are measured in
  ``--rounds`` interleaved rounds (default 8) of ``--repeat`` repetitions each (default 5),
  round-robin (stage 0, 1, 2, 3, then again), each round after a warm-up (``--warmup`` for the
  first, at most 2 after), and a stage's time is the median of all its repetitions. The GPU
  machine's host is a virtual machine whose speed changes by up to 1.8x from one moment to the
  next (a loop of tiny kernel launches: 7 or 11 us each, in stretches of 10 ms to seconds;
  ``docs/gpu.md``), and a host-bound stage takes as long as its host:
  so the in-context host times the predictions use are measured **in the same rounds**, before
  the stages (forward: 1 warm-up and 3 runs, backward: 1 and 2; each node gets the robust mean
  of its rounds' figures, Note [host time statistic] in ``cost_model/node_replay.py``; the raw
  record keeps them per node before folding, ``context``, so ``--recompute`` folds them as the
  cost model does now), and predictions and measurements see the same mix of host speeds; and a
  burst of load hits one round of every stage instead of every repetition of one. Each round's
  median is kept (``measured_rounds_ms``, ``measured_fwd_rounds_ms``), and the host's speed
  before each round (``host_probe_rounds_us``: microseconds to queue one tiny kernel; before
  the context measurement: ``host_probe_context_us`` in the raw record) show the spread. Also
  the forward alone (``measured_fwd_ms``; ``measured_bwd_ms`` is the difference, which is not the
  backward's own time where the host is the bottleneck) and the device-only time of a step
  (``measured_device_ms``: queued behind a spin kernel, as nodes are profiled). No
  communication: the model's compute time is compared (on one GPU there is no link).
- **memory**: ``torch.cuda.max_memory_allocated`` while the stage, starting with nothing but its
  parameters, allocates its gradients and two Adam states per parameter (zeros, in the
  parameter dtype, as ``torch.optim.Adam`` keeps them), then runs the forward of ``k`` fresh
  microbatches (``k = inflight_microbatches("1f1b", m, 4, s)``, each with its own received
  tensors), then their backwards, oldest first, each from freshly allocated upstream
  gradients. Measured = that peak above what was allocated before, plus the stage's parameter
  and buffer bytes. The other stages' weights and the captured inputs are allocated before and
  do not count. On the CPU, a dispatch mode tracks the bytes of live storages instead.
- **not compared**: the loss (outside the traced graph; its time on the last stage is reported
  apart: ``loss_ms``), the optimizer step, and communication.

``--raw`` keeps the measurements (graphs, node profiles, stage times and memory); ``--recompute
RAW`` predicts from them with the current cost model without measuring anything, so the numbers
can be re-derived (and the model changed and re-judged) on any machine.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from _common import model_benchmark_parser, step_times, to_device, versions
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from modelparallel import models
from modelparallel.codegen import StageProgram, build_stages, held_tensors
from modelparallel.cost_model import (
    CallOverhead,
    DeviceSpec,
    estimate_costs,
    get_device_spec,
    inflight_microbatches,
)
from modelparallel.cost_model.measure import (
    backward_host_times,
    call_overhead,
    forward_host_times,
    graph_users,
    op_overhead,
    profile_nodes,
    time_call,
)
from modelparallel.cost_model.node_replay import (
    BackwardMode,
    ForwardMode,
    NodeProfile,
    host_replay,
    node_times,
    robust_mean,
    with_backward_context,
    with_forward_context,
)
from modelparallel.ir import Graph
from modelparallel.partitioner import evaluate_assignment, partition
from modelparallel.plan import Plan, PlanConfig
from modelparallel.tracer import trace

PARTITIONS = 4
SCHEDULE = "1f1b"
OPTIMIZER = "adam"
_GiB = 2**30


# -- workloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model and batch.

    Attributes:
        name: Label.
        make: ``make(batch_size) -> ModelCase`` on the CPU in float32.
        batch_size: Samples per step.
        microbatches: Microbatches per step.
        shape: What one sample is, for the report.
    """

    name: str
    make: Callable[[int], models.ModelCase]
    batch_size: int
    microbatches: int
    shape: str


FULL = (
    Workload("gpt2-medium", lambda b: models.gpt2("medium", batch_size=b, seq_len=1024), 32, 4,
             "1024 tokens"),
    Workload("llama-1b", lambda b: models.llama("1b", batch_size=b, seq_len=1024), 16, 4,
             "1024 tokens"),
    Workload("resnet50", lambda b: models.resnet50(batch_size=b), 128, 4, "3x224x224"),
    Workload("bert-large", lambda b: models.bert("large", batch_size=b, seq_len=512), 64, 4,
             "512 tokens"),
)

QUICK = (
    Workload("gpt2-tiny", lambda b: models.gpt2("tiny", batch_size=b, seq_len=64), 16, 4,
             "64 tokens"),
    Workload("llama-tiny", lambda b: models.llama("tiny", batch_size=b, seq_len=64), 16, 4,
             "64 tokens"),
    Workload("resnet-tiny", lambda b: models.resnet_tiny(batch_size=b, image_size=32), 32, 4,
             "3x32x32"),
    Workload("bert-tiny", lambda b: models.bert("tiny", batch_size=b, seq_len=64), 16, 4,
             "64 tokens"),
)


# -- memory meters ---------------------------------------------------------------------------------


class _CudaMeter:
    """Peak bytes allocated on a CUDA device since :meth:`start`, above the level at start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - self.base)

    def stop(self) -> None:
        pass


class _LiveStorages(TorchDispatchMode):
    """CPU stand-in for the CUDA allocator's peak: bytes of live storages created by ops run
    since it was entered, checked after every op (autograd's backward included)."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.high = 0
        # Storages allocated before (weights, captured inputs) that ops may return views of.
        self.old = {StorageWeakRef(t.untyped_storage()) for t in exclude}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref not in self.live and ref not in self.old:
                    self.live[ref] = int(st.nbytes())
        dead = [r for r in self.live if r.expired()]
        for r in dead:
            del self.live[r]
        self.high = max(self.high, sum(self.live.values()))
        return out


class _CpuMeter:
    def __init__(self) -> None:
        self.mode: _LiveStorages | None = None

    def start(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        gc.collect()
        self.mode = _LiveStorages(exclude)
        self.mode.__enter__()

    def peak(self) -> int:
        assert self.mode is not None
        return self.mode.high

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)


def _meter(device: torch.device) -> Any:
    return _CudaMeter(device) if device.type == "cuda" else _CpuMeter()


# -- timing ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int,
                    repeat: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, the wall clock on the CPU)."""
    _sync(device)
    return statistics.median(step_times(fn, device, warmup, repeat))


# -- one stage -------------------------------------------------------------------------------------


class _StageRun:
    """One stage with the values it receives, runnable forward and backward alone."""

    def __init__(self, stage: StageProgram, local: list[Any], received: list[Any]) -> None:
        self.stage = stage
        self.local = local
        self.received = received
        self.params = [p for p in stage.module.parameters() if p.requires_grad]
        self.own_bytes = sum(t.numel() * t.element_size() for t in held_tensors(stage.module))
        self.mutated = set(stage.mutated_inputs)

    def inputs(self, fresh: bool) -> list[Any]:
        """The received values as the runtime gives them: leaves that require grad where a
        gradient flows back; ``fresh`` copies them (a new microbatch's buffers)."""
        out = []
        for boundary, value in zip(self.stage.recv, self.received):
            def leaf(t: Any, rg: bool = boundary.requires_grad) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                new = t.detach().clone() if fresh else t.detach()
                if rg and new.is_floating_point():
                    new.requires_grad_(True)
                return new
            v = pytree.tree_map(leaf, value)
            if boundary.name in self.mutated:
                v = pytree.tree_map(
                    lambda t: t.clone() if isinstance(t, torch.Tensor) and t.requires_grad
                    else t, v)
            out.append(v)
        return out

    def forward(self, args: list[Any]) -> list[torch.Tensor]:
        """Run forward; return the output tensors a gradient flows back through."""
        outs = self.stage.module(*self.local, *args)
        return [t for t in pytree.tree_leaves(list(outs))
                if isinstance(t, torch.Tensor) and t.requires_grad]

    def step(self, grads: list[torch.Tensor] | None) -> None:
        """Forward and backward of one microbatch (``grads``: upstream gradients, or fresh)."""
        tensors = self.forward(self.inputs(fresh=False))
        if tensors:
            g = grads if grads is not None else [torch.randn_like(t) for t in tensors]
            torch.autograd.backward(tensors, g)

    def upstream_grads(self) -> list[torch.Tensor]:
        tensors = self.forward(self.inputs(fresh=False))
        grads = [torch.randn_like(t) for t in tensors]
        del tensors
        return grads

    def grads_exist(self, on: bool) -> None:
        for p in self.params:
            p.grad = torch.zeros_like(p) if on else None


def _host_probe_us(device: torch.device) -> float:
    """Microseconds the host takes to queue one tiny kernel now (on the CPU: to run one tiny
    op): how fast the host is at this moment (Note [fidelity measurement])."""
    return op_overhead(device, repeat=1) * 1e6


def _measure_times(runs: Sequence[_StageRun], device: torch.device, warmup: int, repeat: int,
                   rounds: int, before_round: Callable[[int], None] | None = None
                   ) -> list[dict[str, Any]]:
    """Per stage: median seconds per microbatch of forward+backward and of forward over
    ``rounds`` interleaved rounds of ``repeat`` repetitions (every stage of the model in turn,
    round-robin, after ``before_round(r)``, which measures the in-context host times in the
    same rounds; Note [fidelity measurement]), the median of each round, the host probe before
    each round, and, on CUDA, the device time of forward+backward (``time_call``: what the
    stage would take if the host kept up). ``time_call``'s host figure is not kept: a stage
    step synchronises with the device at least once (the spin check escalated on every
    stage), which makes it meaningless."""
    for run in runs:
        run.grads_exist(True)
    grads = [run.upstream_grads() for run in runs]
    both: list[list[list[float]]] = [[] for _ in runs]
    fwd: list[list[list[float]]] = [[] for _ in runs]
    probes: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        w = warmup if r == 0 else min(warmup, 2)  # switching stages: a short warm-up again
        for i, run in enumerate(runs):
            _sync(device)
            probes[i].append(_host_probe_us(device))
            both[i].append(step_times(lambda run=run, g=grads[i]: run.step(g), device, w,
                                      repeat))
            fwd[i].append(step_times(lambda run=run: run.forward(run.inputs(fresh=False)),
                                     device, w, repeat))
    out = []
    for i, run in enumerate(runs):
        dev, _ = time_call(lambda run=run, g=grads[i]: run.step(g), device, repeat=5, warmup=1)
        out.append({"both": statistics.median(t for rd in both[i] for t in rd),
                    "fwd": statistics.median(t for rd in fwd[i] for t in rd),
                    "both_rounds": [statistics.median(rd) for rd in both[i]],
                    "fwd_rounds": [statistics.median(rd) for rd in fwd[i]],
                    "probe_rounds_us": probes[i],
                    "device": dev if device.type == "cuda" else math.nan})
    for run in runs:
        run.grads_exist(False)
    return out


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _measure_memory(run: _StageRun, device: torch.device, inflight: int,
                    optimizer_states: int) -> dict[str, int]:
    """Peak bytes of the stage alone with ``inflight`` microbatches (Note [fidelity
    measurement])."""
    run.grads_exist(False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    meter = _meter(device)
    meter.start([*held_tensors(run.stage.module), *_tensors(run.local), *_tensors(run.received)])
    try:
        run.grads_exist(True)
        states = [torch.zeros_like(p) for p in run.params for _ in range(optimizer_states)]
        state_peak = meter.peak()
        held = []
        for _ in range(inflight):
            args = run.inputs(fresh=True)
            held.append((args, run.forward(args)))
        after_forward = meter.peak()
        while held:
            args, tensors = held.pop(0)
            if tensors:
                torch.autograd.backward(tensors, [torch.randn_like(t) for t in tensors])
            del args, tensors
        peak = meter.peak()
    finally:
        meter.stop()
    del states
    run.grads_exist(False)
    return {"peak": peak + run.own_bytes, "state": state_peak + run.own_bytes,
            "after_forward": after_forward + run.own_bytes}


def _loss_seconds(run: _StageRun, loss_fn: Callable[[Any, Any], torch.Tensor], target: Any,
                  device: torch.device, warmup: int, repeat: int) -> float:
    """Forward+backward seconds of the loss alone on the last stage's output."""
    with torch.no_grad():
        outs = run.stage.module(*run.local, *run.inputs(fresh=False))
    flat = list(outs)[len(run.stage.send):]
    spec = run.stage.out_spec

    def step() -> None:
        leaves = [t.detach().requires_grad_(t.is_floating_point())
                  if isinstance(t, torch.Tensor) else t for t in flat]
        out = pytree.tree_unflatten(leaves, spec) if spec is not None else leaves
        loss_fn(out, target).backward()
    return _median_seconds(step, device, warmup, repeat)


# -- one model -------------------------------------------------------------------------------------


def _microbatch(value: Any, m: int, i: int) -> Any:
    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            n = t.shape[0] // m
            return t[i * n:(i + 1) * n]
        return t
    return pytree.tree_map(cut, value)


def _stage_inputs(stages: Sequence[StageProgram], flat: list[Any]
                  ) -> list[tuple[list[Any], list[Any]]]:
    """(model inputs, received values) of every stage for one microbatch."""
    out = []
    received: list[Any] = []
    with torch.no_grad():
        for st in stages:
            local = [flat[i] for i in st.model_inputs]
            out.append((local, received))
            values = st.module(*local, *received)
            received = list(values[:len(st.send)])
    return out


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else math.nan


def measure_model(w: Workload, *, device: torch.device, dtype: torch.dtype, plan_device: str,
                  warmup: int, repeat: int, profile_warmup: int, profile_repeat: int,
                  time_limit: float, log: Callable[[str], None], rounds: int = 8
                  ) -> dict[str, Any]:
    """Trace, plan, profile and measure every stage of one model: the raw record that
    :func:`predict_model` turns into predictions against measurements."""
    t0 = time.perf_counter()
    case = w.make(w.batch_size)
    model = case.model.to(dtype=dtype).to(device)
    m = w.microbatches
    args, kwargs = to_device(case.args, device, dtype), to_device(case.kwargs, device, dtype)
    target = to_device(case.target, device, dtype)
    mb_args, mb_kwargs = _microbatch(args, m, 0), _microbatch(kwargs, m, 0)
    mb_target = _microbatch(target, m, 0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced = trace(model, mb_args, mb_kwargs)
    trace_s = time.perf_counter() - t0
    graph = traced.graph
    flat = traced.flatten_inputs(mb_args, mb_kwargs)
    mb_size = w.batch_size // m
    log(f"{w.name}: {graph.num_parameters / 1e6:.0f}M parameters, {len(graph)} nodes "
        f"({traced.method}), built {build_s:.1f} s, traced {trace_s:.1f} s")

    config = _config(m, time_limit)
    t0 = time.perf_counter()
    plan = partition(graph, config, plan_device, samples_per_microbatch=mb_size)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    profiles = profile_nodes(traced.gm, flat, warmup=profile_warmup, repeat=profile_repeat,
                             backward_context=False, forward_context=False)
    profile_s = time.perf_counter() - t0
    log(f"{w.name}: planned in {plan_s:.1f} s, profiled {len(profiles)} nodes in "
        f"{profile_s:.1f} s")
    stages = build_stages(traced, plan)
    inputs = _stage_inputs(stages, flat)
    rows = []
    states = 2 if OPTIMIZER == "adam" else 0
    runs = [_StageRun(stage, local, received) for stage, (local, received)
            in zip(stages, inputs)]
    context = _ContextRounds(traced.gm, flat, device, log, w.name)
    stage_times = _measure_times(runs, device, warmup, repeat, rounds, before_round=context)
    context_record = context.record(profiles)
    profiles = _with_context(profiles, context_record)
    for s, (stage, run, t) in enumerate(zip(stages, runs, stage_times)):
        k = inflight_microbatches(SCHEDULE, m, PARTITIONS, s)
        mem = _measure_memory(run, device, k, states)
        row: dict[str, Any] = {
            "stage": s, "inflight": k, "recomputed": list(stage.recomputed),
            "measured_ms": t["both"] * 1e3, "measured_fwd_ms": t["fwd"] * 1e3,
            "measured_bwd_ms": (t["both"] - t["fwd"]) * 1e3,
            "measured_device_ms": t["device"] * 1e3,
            "measured_rounds_ms": [x * 1e3 for x in t["both_rounds"]],
            "measured_fwd_rounds_ms": [x * 1e3 for x in t["fwd_rounds"]],
            "host_probe_rounds_us": t["probe_rounds_us"],
            "memory_measured_bytes": mem["peak"], "memory_state_bytes": mem["state"],
            "memory_after_forward_bytes": mem["after_forward"],
        }
        if stage.is_last:
            row["loss_ms"] = 1e3 * _loss_seconds(run, case.loss_fn, mb_target, device, warmup,
                                                 repeat)
        rows.append(row)
        gc.collect()
        rounds_ms = ", ".join(f"{x * 1e3:.2f}" for x in t["both_rounds"])
        log(f"{w.name} stage {s}: {t['both'] * 1e3:.2f} ms (rounds {rounds_ms}; forward "
            f"{t['fwd'] * 1e3:.2f}; device only {t['device'] * 1e3:.2f}), "
            f"{mem['peak'] / _GiB:.3f} GiB")
    del runs
    raw = {
        "model": w.name, "batch_size": w.batch_size, "microbatches": m,
        "microbatch_size": mb_size, "sample": w.shape, "tracer": traced.method,
        "trace_s": trace_s, "plan_s": plan_s, "profile_s": profile_s,
        "time_limit": time_limit, "graph": graph.to_dict(), "assignment": plan.assignment,
        "profiles": {k: [v.device_forward, v.host_forward, v.device_backward, v.host_backward,
                         v.kind, v.host_backward_context, v.host_forward_context]
                     for k, v in profiles.items()},
        "backward_context_s": context.seconds["backward"],
        "backward_context_note": context.notes["backward"],
        "forward_context_s": context.seconds["forward"],
        "forward_context_note": context.notes["forward"],
        "context_rounds": {k: len(v) for k, v in context.rounds.items()},
        "host_probe_context_us": context.probes,
        "context": context_record,
        "stages": rows,
    }
    del stages, inputs, traced, model, case
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return raw


class _ContextRounds:
    """The in-context host times (Notes [in-context forward host time] and [in-context
    backward host time] in ``cost_model/measure/backward.py``), measured a few runs at a time in every
    round of the stage measurement (Note [fidelity measurement]): each node gets the robust
    mean of its rounds' figures (Note [host time statistic]). A failed measurement is not
    retried; the predictions then use the forward host times measured alone, or the
    backward's device time, and the report says why.
    """

    def __init__(self, gm: Any, flat: list[Any], device: torch.device,
                 log: Callable[[str], None], name: str) -> None:
        self.gm, self.flat, self.device, self.log, self.name = gm, flat, device, log, name
        self.rounds: dict[str, list[dict[str, float]]] = {"forward": [], "backward": []}
        self.notes = {"forward": "", "backward": ""}
        self.seconds = {"forward": 0.0, "backward": 0.0}
        self.probes: list[float] = []
        self.calls: list[CallOverhead] = []

    def __call__(self, r: int) -> None:
        self.probes.append(_host_probe_us(self.device))
        self.calls.append(call_overhead(self.device, warmup=1, repeat=3))
        for which, measure in (("forward", functools.partial(forward_host_times, warmup=1,
                                                              repeat=3)),
                               ("backward", functools.partial(backward_host_times, warmup=1,
                                                              repeat=2))):
            if self.notes[which]:
                continue
            t0 = time.perf_counter()
            try:
                self.rounds[which].append(measure(self.gm, self.flat))
            except Exception as e:  # the measurement never breaks the run
                traceback.print_exc()
                self.notes[which] = (f"in-context {which} host times failed: "
                                     f"{type(e).__name__}: {e}")
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.seconds[which] += time.perf_counter() - t0

    def record(self, profiles: Mapping[str, NodeProfile]) -> dict[str, Any]:
        """The in-context host times measured so far, per node as measured (before they are
        folded into profiled nodes), with what folding them needs: the raw record's
        ``context``, which :func:`_with_context` attaches to profiles."""
        out: dict[str, Any] = {"host_is_device": self.device.type != "cuda"}
        for which in ("forward", "backward"):
            runs = self.rounds[which]
            if not runs:
                self.notes[which] = self.notes[which] or f"in-context {which} host times: none"
                self.log(f"{self.name}: NOTE {self.notes[which]}")
                continue
            out[which] = {n: robust_mean(r[n] for r in runs if n in r)
                          for n in dict.fromkeys(k for r in runs for k in r)}
            totals = ", ".join(f"{sum(r.values()) * 1e3:.2f}" for r in runs)
            self.log(f"{self.name}: in-context {which} host ms per round: {totals}"
                     f"{'; ' + self.notes[which] if self.notes[which] else ''}")
        if self.calls:
            out["call_overhead"] = [robust_mean(c.forward for c in self.calls),
                                    robust_mean(c.backward for c in self.calls)]
            self.log(f"{self.name}: call overhead per stage (Note [call overhead]): forward "
                     f"{out['call_overhead'][0] * 1e6:.0f} us, backward "
                     f"{out['call_overhead'][1] * 1e6:.0f} us")
        users = graph_users(self.gm)
        out["order"] = list(users)
        out["users"] = {n: u for n, u in users.items() if n not in profiles}
        return out


def _with_context(profiles: dict[str, NodeProfile], context: Mapping[str, Any]
                  ) -> dict[str, NodeProfile]:
    """``profiles`` with a raw record's in-context host times (:meth:`_ContextRounds.record`)
    folded into them as the cost model does now (Notes [in-context forward host time] and
    [in-context backward host time] in ``cost_model/measure/backward.py``)."""
    order, flag = context["order"], context["host_is_device"]
    if "forward" in context:
        profiles = with_forward_context(profiles, order, context["forward"],
                                        host_is_device=flag, users=context["users"])
    if "backward" in context:
        profiles = with_backward_context(profiles, order, context["backward"],
                                         host_is_device=flag)
    return profiles


def _config(microbatches: int, time_limit: float) -> PlanConfig:
    return PlanConfig(partitions=PARTITIONS, microbatches=microbatches, schedule=SCHEDULE,
                      optimizer=OPTIMIZER, time_limit=time_limit)


def _node_profile(values: list[Any], graph: Graph, name: str) -> NodeProfile:
    """A recorded node profile; records made before profiles had a kind get the IR's op and
    output shapes as their kind."""
    if len(values) >= 7:  # with the in-context forward host time (None: not measured)
        return NodeProfile(*values[:4], kind=str(values[4]), host_backward_context=values[5],
                           host_forward_context=values[6])
    if len(values) >= 6:  # with the in-context backward host time (None: not measured)
        return NodeProfile(*values[:4], kind=str(values[4]), host_backward_context=values[5])
    if len(values) >= 5:
        return NodeProfile(*values[:4], kind=str(values[4]))
    node = graph.node(name)
    kind = f"{node.target}|{[(m.shape, m.dtype) for m in node.outputs]}"
    return NodeProfile(*values[:4], kind=kind)


def predict_model(raw: dict[str, Any], *, plan_device: str, spec: Any) -> dict[str, Any]:
    """Predictions of the cost model for every stage of a raw record, beside its measurements.

    The assignment is the recorded one (planned on ``plan_device``'s roofline); the modes are
    that roofline, the roofline on the calibrated ``spec`` (if any) and profiling mode
    (``node_times`` of the recorded node profiles). Memory is the plan's.
    """
    graph = Graph.from_dict(raw["graph"])
    config = _config(raw["microbatches"], raw.get("time_limit", 10.0))
    assignment = raw["assignment"]
    mb = raw["microbatch_size"]
    plan = evaluate_assignment(graph, config, plan_device, assignment, samples_per_microbatch=mb)
    predictions: dict[str, Plan] = {"roofline": plan}
    if spec is not None:
        predictions["roofline_calibrated"] = evaluate_assignment(
            graph, config, spec, assignment, samples_per_microbatch=mb)
    profiles = {k: _node_profile(v, graph, k) for k, v in raw["profiles"].items()}
    if "context" in raw:  # re-fold the in-context times as measured (older records: as folded)
        profiles = _with_context(profiles, raw["context"])
    order = [n.name for n in graph.nodes]
    has_context = any(p.host_backward_context is not None for p in profiles.values())
    # profiled: node_times' default (what the partitioner gets); the backward counted from
    # device time only (the model before in-context host times), and replayed with the
    # in-context host times (Note [in-context backward host time]); the last falls back to the
    # device-only backward, with a note, where the in-context measurement is missing.
    # The forward the same way: its host time measured node by node alone (the model before
    # in-context forward host times) and in context (Note [in-context forward host time]);
    # both with the default backward.
    has_fwd = any(p.host_forward_context is not None for p in profiles.values())
    # (backward_host, forward_host) of each variant; every variant replays each stage alone
    # (Note [stage replay]), as the partitioner does; "profiled_additive" sums node_times
    # instead (the model before the stage replay).
    modes: dict[str, tuple[BackwardMode, ForwardMode]] = {
        "profiled": ("auto", "auto"),
        "profiled_additive": ("auto", "auto"),
        "profiled_device_bwd": ("device", "isolated"),
        "profiled_context_bwd": ("context" if has_context else "device", "isolated"),
        "profiled_isolated_fwd": ("auto", "isolated"),
        "profiled_context_fwd": ("auto", "auto")}
    by_mode = {m: node_times(order, profiles, backward_host=m[0], forward_host=m[1])
               for m in set(modes.values())}
    variants = {k: by_mode[m] for k, m in modes.items()}
    times = variants["profiled"]
    context_note = raw.get("backward_context_note") or (
        "" if has_context else "no in-context backward host times in this record: "
        "profiled_context_bwd = profiled_device_bwd")
    fwd_note = raw.get("forward_context_note") or (
        "" if has_fwd else "no in-context forward host times in this record: "
        "profiled_context_fwd = profiled_isolated_fwd = profiled")
    times_bh = node_times(order, profiles, backward_host="isolated")
    stage_nodes: dict[int, list[str]] = {}
    for name, st in assignment.items():
        stage_nodes.setdefault(int(st), []).append(name)
    call = CallOverhead(*raw.get("context", {}).get("call_overhead", (0.0, 0.0)))
    for mode, mode_times in variants.items():
        bh, fh = modes[mode]
        replay = None if mode == "profiled_additive" else host_replay(
            order, profiles, backward_host=bh, forward_host=fh,
            call=call if mode == "profiled" else None)
        costs = estimate_costs(graph, plan_device, optimizer=OPTIMIZER, measured=mode_times,
                               replay=replay)
        predictions[mode] = evaluate_assignment(graph, config, plan_device, assignment,
                                                costs=[costs], samples_per_microbatch=mb)
    rows = []
    for measured in raw["stages"]:
        s = measured["stage"]
        est = plan.stages[s]
        row = {key: v for key, v in measured.items()
               if key not in ("recomputed", "measured_host_ms")}
        row.update({
            "nodes": est.num_nodes, "parameters": est.num_parameters,
            "memory_predicted_bytes": est.memory.peak,
            "memory_predicted": {"parameters": est.memory.parameters,
                                 "gradients": est.memory.gradients,
                                 "optimizer": est.memory.optimizer,
                                 "activations": est.memory.activations,
                                 "workspace": est.memory.workspace},
            "memory_error": _rel(est.memory.peak, measured["memory_measured_bytes"]),
        })
        both = measured["measured_ms"] / 1e3
        for mode, p in predictions.items():
            st = p.stages[s]
            row[f"{mode}_ms"] = st.compute_time * 1e3
            row[f"{mode}_fwd_ms"] = st.forward_time * 1e3
            row[f"{mode}_error"] = _rel(st.compute_time, both)
            row[f"{mode}_fwd_error"] = _rel(st.forward_time, measured["measured_fwd_ms"] / 1e3)
        # Input-derived nodes the stage recomputes (Note [inputs on every rank]): in the
        # replayed modes' stage times since the stage replay (Note [stage replay]).
        row["recomputed_ms"] = 1e3 * sum(sum(times.get(n, (0.0, 0.0)))
                                         for n in measured.get("recomputed", ()))
        # Diagnosis: the backward replayed with the measured host backward times.
        bh = sum(sum(times_bh.get(n, (0.0, 0.0))) for n in stage_nodes[s])
        row["profiled_backward_host_ms"] = bh * 1e3
        row["profiled_backward_host_error"] = _rel(bh, both)
        row["context_backward_host_ms"] = 1e3 * sum(
            profiles[n].host_backward_context or 0.0 for n in stage_nodes[s] if n in profiles)
        row["device_backward_ms"] = 1e3 * sum(
            profiles[n].device_backward for n in stage_nodes[s] if n in profiles)
        # Diagnosis of the forward: host and device sums over the stage's nodes, against
        # measured_fwd_ms (the host-bound forward takes about the larger).
        row["isolated_forward_host_ms"] = 1e3 * sum(
            profiles[n].host_forward for n in stage_nodes[s] if n in profiles)
        row["context_forward_host_ms"] = math.nan if not has_fwd else 1e3 * sum(
            profiles[n].host_forward_context or 0.0 for n in stage_nodes[s] if n in profiles)
        row["device_forward_ms"] = 1e3 * sum(
            profiles[n].device_forward for n in stage_nodes[s] if n in profiles)
        rows.append(row)
    return {
        "model": raw["model"], "batch_size": raw["batch_size"],
        "microbatches": raw["microbatches"], "microbatch_size": mb, "sample": raw["sample"],
        "parameters": graph.num_parameters, "nodes": len(graph), "tracer": raw["tracer"],
        "trace_s": raw["trace_s"], "plan_s": raw["plan_s"], "profile_s": raw["profile_s"],
        "profiled_nodes": len(profiles), "stages": rows,
        "backward_context_note": context_note, "forward_context_note": fwd_note,
    }


# -- report ----------------------------------------------------------------------------------------


def _summary(results: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in [f"{m}_error" for m in modes] + ["memory_error"]:
        errs = [abs(r[key]) for res in results for r in res["stages"]
                if not math.isnan(r.get(key, math.nan))]
        if errs:
            out[key.removesuffix("_error")] = {"median": statistics.median(errs),
                                               "worst": max(errs), "stages": len(errs)}
    return out


def _table(results: list[dict[str, Any]], modes: list[str]) -> str:
    head = ["model", "st", "meas ms"] + [f"{m} ms (err)" for m in modes] + [
        "mem meas GiB", "mem pred GiB (err)"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for res in results:
        for r in res["stages"]:
            cells = [res["model"], str(r["stage"]), f"{r['measured_ms']:.2f}"]
            cells += [f"{r[f'{m}_ms']:.2f} ({100 * r[f'{m}_error']:+.1f}%)" for m in modes]
            cells += [f"{r['memory_measured_bytes'] / _GiB:.3f}",
                      f"{r['memory_predicted_bytes'] / _GiB:.3f} "
                      f"({100 * r['memory_error']:+.1f}%)"]
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--spec", default=None, help="calibrated device spec JSON")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed repetitions per stage per round")
    parser.add_argument("--rounds", type=int, default=8,
                        help="interleaved rounds over the stages (Note [fidelity measurement])")
    parser.add_argument("--profile-warmup", type=int, default=2)
    parser.add_argument("--profile-repeat", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=10.0, help="ILP seconds per model")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--raw", default=None,
                        help="also write the measurements (graphs, node profiles, stage times "
                             "and memory) here")
    parser.add_argument("--recompute", default=None, metavar="RAW",
                        help="measure nothing: predict from a --raw file of an earlier run "
                             "with the current cost model")
    a = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if a.recompute:
        recorded = json.loads(Path(a.recompute).read_text())
        header, records = recorded["header"], recorded["models"]
        spec = get_device_spec(a.spec) if a.spec else (
            None if header.get("calibrated_spec") is None
            else DeviceSpec.from_dict(header["calibrated_spec"]))
        failed = dict(header.get("failed", {}))
    else:
        device = torch.device(a.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda but CUDA is not available", file=sys.stderr)
            return 2
        spec = get_device_spec(a.spec) if a.spec else None
        header, records, failed = _measure_all(a, device, spec, log)
    plan_device = header["plan_device"]
    modes = ["roofline"] + (["roofline_calibrated"] if spec is not None else []) + [
        "profiled", "profiled_additive", "profiled_device_bwd", "profiled_context_bwd",
        "profiled_isolated_fwd", "profiled_context_fwd"]
    results = [predict_model(r, plan_device=plan_device, spec=spec) for r in records.values()]
    # and the forward alone against the stage's measured forward (measured_fwd_ms), the two
    # forward host models (Note [in-context forward host time]):
    summary = _summary(results, [*modes, "profiled_backward_host",
                                 "profiled_isolated_fwd_fwd", "profiled_context_fwd_fwd",
                                 "profiled_additive_fwd"])
    bar = {"profiled_time_median": 0.10, "profiled_time_worst": 0.20, "memory_worst": 0.10}
    met = {} if not results else {
        "profiled_time_median": summary["profiled"]["median"] <= bar["profiled_time_median"],
        "profiled_time_worst": summary["profiled"]["worst"] <= bar["profiled_time_worst"],
        "memory_worst": summary["memory"]["worst"] <= bar["memory_worst"],
    }
    out = {
        "benchmark": "cost_model_fidelity",
        **{k: v for k, v in header.items() if k != "failed"},
        "calibrated_spec": None if spec is None else spec.to_dict(),
        "predicted_with": versions("transformers"),
        "predicted_from": (f"--recompute {a.recompute}: measurements of the run above, "
                           "predictions by the cost model of 'predicted_with'"
                           if a.recompute else "this run"),
        "models": results,
        "summary": summary,
        "bar": bar,
        "bar_met": met,
        "failed": failed,
    }
    print()
    print(_table(results, modes))
    print()
    for key, s in summary.items():
        print(f"{key:>24}: median |error| {100 * s['median']:.1f}%, "
              f"worst {100 * s['worst']:.1f}% over {s['stages']} stages")
    print(f"bar met: {met}")
    for res in results:
        if res.get("backward_context_note"):
            print(f"NOTE {res['model']}: {res['backward_context_note']}")
        if res.get("forward_context_note"):
            print(f"NOTE {res['model']}: {res['forward_context_note']}")
    for model, why in failed.items():
        print(f"FAILED {model}: {why}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        log(f"wrote {a.out}")
    return 0


def _measure_all(a: argparse.Namespace, device: torch.device, spec: Any,
                 log: Callable[[str], None]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Measure every workload; returns the run's header, raw records and failures."""
    dtype = getattr(torch, a.dtype)
    workloads = QUICK if a.quick else FULL
    if a.models:
        wanted = set(a.models.split(","))
        workloads = tuple(w for w in workloads if w.name in wanted)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    log(f"device {name}; dtype {a.dtype}; {PARTITIONS} stages, {SCHEDULE}, {OPTIMIZER}")
    header: dict[str, Any] = {
        "device": name, "versions": versions("transformers"), "dtype": a.dtype,
        "partitions": PARTITIONS, "schedule": SCHEDULE, "optimizer": OPTIMIZER,
        "plan_device": "h100" if device.type == "cuda" else "cpu",
        "calibrated_spec": None if spec is None else spec.to_dict(),
        "timing": {"warmup": a.warmup, "repeat": a.repeat, "rounds": a.rounds,
                   "statistic": "median of all rounds' repetitions, stages interleaved "
                                "round-robin",
                   "context": "in-context host times measured in every round before the "
                              "stages (forward: 1 warm-up + 3 runs, backward: 1 + 2); each "
                              "node gets the robust mean of its rounds' figures (values "
                              "capped at 3x their median, then averaged)",
                   "profile_warmup": a.profile_warmup, "profile_repeat": a.profile_repeat},
    }
    records: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for w in workloads:
        try:
            records[w.name] = measure_model(
                w, device=device, dtype=dtype, plan_device=header["plan_device"],
                warmup=a.warmup, repeat=a.repeat, profile_warmup=a.profile_warmup,
                profile_repeat=a.profile_repeat, time_limit=a.time_limit, log=log,
                rounds=a.rounds)
        except Exception as e:  # report the others; say which failed and why
            traceback.print_exc()
            failed[w.name] = f"{type(e).__name__}: {e}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if a.raw:  # after every model, so a run cut short keeps what it measured
            Path(a.raw).write_text(json.dumps({"header": {**header, "failed": failed},
                                               "models": records}))
    return header, records, failed


if __name__ == "__main__":
    sys.exit(main())
