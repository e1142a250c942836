"""Cost-model fidelity: predicted against measured time and memory of every stage of a 4-stage plan.

    python benchmarks/cost_model_fidelity.py --device cuda --spec h100-calibrated.json \\
        --out benchmarks/results/cost_model_fidelity-h100.json
    python benchmarks/cost_model_fidelity.py --device cpu --quick      # tiny models, minutes
    python benchmarks/cost_model_fidelity.py --recompute RAW --ops h200   # + the analytic column

For each model (GPT-2 medium, a 1.1B Llama decoder, ResNet-50, BERT-large; tiny versions with
``--quick``), in ``--dtype`` (default bfloat16), on one device:

1. trace one microbatch of the batch on the device, and plan 4 stages with the ILP on the built-in
   spec (``h100``, or ``cpu`` for ``--device cpu``), schedule 1F1B, Adam;
2. predict each stage's forward+backward time per microbatch three ways, on the same assignment:
   the roofline with the built-in spec, the roofline with the calibrated spec (``--spec``), the
   analytic model on an op table (``--ops``: a built-in name or a ``calibrate --ops`` file; no
   measurement of the model: Note [analytic cost model] in ``cost_model/analytic.py``), and
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
  machine's host is a virtual machine whose speed changes from one moment to the next (by how
  much: ``docs/measurements.md``, from ``docs/gpu.md``), and a host-bound stage takes as long
  as its host:
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from _common import model_benchmark_parser, requested_device, to_device, versions
from _fidelity_predict import (
    OPTIMIZER,
    PARTITIONS,
    SCHEDULE,
    _config,
    _roofline,
    _with_context,
    predict_model,
)
from _fidelity_stage import (
    _host_probe_us,
    _loss_seconds,
    _measure_memory,
    _measure_times,
    _StageRun,
)

from modelparallel import models
from modelparallel.codegen import StageProgram, build_stages
from modelparallel.cost_model import (
    CallOverhead,
    DeviceSpec,
    get_device_spec,
    inflight_microbatches,
)
from modelparallel.cost_model.measure import (
    backward_host_times,
    call_overhead,
    forward_host_times,
    graph_users,
    profile_nodes,
)
from modelparallel.cost_model.node_replay import (
    NodeProfile,
    robust_mean,
)
from modelparallel.cost_model.op_table import builtin_op_table, load_op_table
from modelparallel.partitioner import partition
from modelparallel.tracer import trace

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
    sent: dict[tuple[int, int], list[Any]] = {}
    with torch.no_grad():
        for st in stages:
            local = [flat[i] for i in st.model_inputs]
            received = [v for src, _ in st.sources for v in sent.pop((src, st.index))]
            out.append((local, received))
            values = st.module(*local, *received)
            for dst, _ in st.dests:
                sent[(st.index, dst)] = [values[j] for j in st.send_indices(dst)]
    return out


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
    plan = partition(graph, config, _roofline(plan_device), samples_per_microbatch=mb_size)
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
        mem = _measure_memory(run, device, k, states,
                              (case.loss_fn, mb_target) if stage.is_last else None)
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
    """The in-context host times (Note [in-context forward host time] in
    ``cost_model/measure/forward.py``, Note [in-context backward host time] in
    ``cost_model/measure/backward.py``), measured a few runs at a time in every round of the
    stage measurement (Note [fidelity measurement]): each node gets the robust mean of its
    rounds' figures (Note [host time statistic]). A failed measurement is not
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
    parser.add_argument("--ops", default=None, metavar="TABLE",
                        help="op table ('partition-plan calibrate --ops') for the analytic "
                             "column: a JSON file or a built-in name (h200)")
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
        device = requested_device(a.device)
        if device is None:
            return 2
        spec = get_device_spec(a.spec) if a.spec else None
        header, records, failed = _measure_all(a, device, spec, log)
    plan_device = header["plan_device"]
    if spec is not None:  # the calibrated roofline column: without the spec's op table
        spec = replace(spec, op_table="")
    ops = None if not a.ops else (load_op_table(a.ops) if a.ops.endswith(".json")
                                  else builtin_op_table(a.ops))
    if a.ops and ops is None:
        print(f"--ops {a.ops}: no such built-in op table", file=sys.stderr)
        return 2
    modes = ["roofline"] + (["roofline_calibrated"] if spec is not None else []) + (
        ["analytic"] if ops is not None else []) + [
        "profiled", "profiled_additive", "profiled_device_bwd", "profiled_context_bwd",
        "profiled_isolated_fwd", "profiled_context_fwd"]
    results = [predict_model(r, plan_device=plan_device, spec=spec, ops=ops)
               for r in records.values()]
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
    if ops is not None and results:  # issue 17 section 3: no profiling of the model at hand
        bar.update({"analytic_time_median": 0.15, "analytic_time_worst": 0.30})
        met["analytic_time_median"] = summary["analytic"]["median"] <= 0.15
        met["analytic_time_worst"] = summary["analytic"]["worst"] <= 0.30
    out = {
        "benchmark": "cost_model_fidelity",
        **{k: v for k, v in header.items() if k != "failed"},
        "calibrated_spec": None if spec is None else spec.to_dict(),
        "op_table": None if ops is None else {"source": a.ops, "device": ops.device,
                                              **ops.metadata},
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
        "plan_device": ("h200" if "H200" in name else "h100") if device.type == "cuda" else "cpu",
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
