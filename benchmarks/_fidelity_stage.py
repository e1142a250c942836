"""Measuring one stage of a plan alone, time and memory (Note [fidelity measurement] in
``cost_model_fidelity.py``, which uses it).

Memory meters (the CUDA allocator's peak, or on the CPU a dispatch mode counting live storages),
timing, and :class:`_StageRun`: a stage with the values it receives, runnable forward and
backward alone. Run from ``benchmarks/`` (it imports ``_common`` as the scripts do).
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from _common import step_times
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from modelparallel.codegen import StageProgram, held_tensors
from modelparallel.cost_model.measure import op_overhead, time_call

__all__ = ["_StageRun", "_host_probe_us", "_loss_seconds", "_measure_memory", "_measure_times", "_median_seconds",
           "_sync"]


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
                    optimizer_states: int,
                    loss: tuple[Callable[[Any, Any], torch.Tensor], Any] | None = None
                    ) -> dict[str, int]:
    """Peak bytes of the stage alone with ``inflight`` microbatches (Note [fidelity
    measurement]). ``loss`` (the last stage: ``(loss_fn, target)``): each microbatch's model
    output goes through the loss, whose backward starts that microbatch's, as in training (the
    loss's saved log-softmax and the outputs held until it runs are part of the stage's peak:
    Note [activation memory])."""
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
            held.append((args, run.forward(args) if loss is None
                         else [_stage_loss(run, args, *loss)]))
        after_forward = meter.peak()
        while held:
            args, tensors = held.pop(0)
            if tensors:
                torch.autograd.backward(tensors, [torch.randn_like(t) if t.dim() else
                                                  torch.ones_like(t) for t in tensors])
            del args, tensors
        peak = meter.peak()
    finally:
        meter.stop()
    del states
    run.grads_exist(False)
    return {"peak": peak + run.own_bytes, "state": state_peak + run.own_bytes,
            "after_forward": after_forward + run.own_bytes}


def _stage_loss(run: _StageRun, args: list[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
                target: Any) -> torch.Tensor:
    """The last stage's forward on ``args`` through the loss (it sends nothing)."""
    flat = list(run.stage.module(*run.local, *args))[len(run.stage.send):]
    spec = run.stage.out_spec
    return loss_fn(pytree.tree_unflatten(flat, spec) if spec is not None else flat, target)


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
