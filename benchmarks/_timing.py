"""Timing helpers of the benchmarks: spans of pipeline actions (:class:`Busy`, our executor
bracketed by them), timed repeated calls (:func:`step_times`) and the one-way latency of a
message (:func:`link_latency`).

``benchmarks/`` is not a package: import it as ``from _timing import ...``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.runtime.executor import StageExecutor
from modelparallel.runtime.hooks import StageEvent

__all__ = ["Busy", "TimedExecutor", "alternating_rounds", "link_latency", "step_times"]


def step_times(step: Callable[[], Any], device: torch.device, warmup: int,
               repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``step`` after ``warmup`` untimed ones.

    On CUDA, every call is bracketed by CUDA events queued back to back and read after one
    synchronisation (so the host never waits between calls); elsewhere, the wall clock.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events]
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def alternating_rounds(variants: dict[str, Callable[[], Any]], device: torch.device,
                       warmup: int, repeat: int, rounds: int) -> dict[str, list[float]]:
    """Every variant's step times (:func:`step_times`), ``rounds`` rounds of all of them, the
    order reversed every other round so that none always runs on a warmer device."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for k in names:
            samples[k].extend(step_times(variants[k], device, warmup, repeat))
    return samples


def link_latency(rank: int, message: torch.Tensor, rounds: int = 30) -> float:
    """One-way seconds of a boundary-sized message between ranks 0 and 1 (median ping-pong)."""
    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(message, 1)
            dist.recv(message, 1)
        elif rank == 1:
            dist.recv(message, 0)
            dist.send(message, 0)
        times.append((time.perf_counter() - t0) / 2)
    box: list[Any] = [statistics.median(times)]
    dist.broadcast_object_list(box, 0)
    return float(box[0])


class Busy:
    """Spans of forward and backward actions: CUDA events on the current stream, or the wall
    clock on the CPU (Note [multigpu measurement] in
    ``benchmarks/multigpu.py``)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        """A token for :meth:`stop`."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, kind: str, token: Any) -> None:
        """Close the span of an action of ``kind`` (``"F"`` or ``"B"``)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((kind, token, ev))
        else:
            self.spans.append((kind, token, time.perf_counter()))

    def take(self) -> dict[str, list[float]]:
        """Seconds of every span since the last call, by kind (after a synchronisation)."""
        out: dict[str, list[float]] = {"F": [], "B": [], "W": []}
        for kind, a, b in self.spans:
            out[kind].append(a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        self.spans = []
        return out


class TimedExecutor(StageExecutor):
    """Our executor with every forward and backward action bracketed by :class:`Busy`, through
    its public ``on_action`` hook (Note [action hook] in ``modelparallel/runtime/hooks.py``)."""

    busy: Busy
    fail_at: int | None = None  # --inject-failure: raise in the forward of this microbatch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._token: Any = None
        super().__init__(*args, on_action=self._bracket, **kwargs)

    def _bracket(self, event: StageEvent, phase: str) -> None:
        if event.kind not in ("forward", "backward", "weight_backward"):
            return
        if phase == "start":
            self._token = self.busy.start()
            if event.kind == "forward" and event.microbatch == self.fail_at:
                self.busy.stop("F", self._token)
                raise RuntimeError(
                    f"injected failure (--inject-failure) in forward {event.microbatch}")
        else:
            kind = {"forward": "F", "backward": "B"}.get(event.kind, "W")
            self.busy.stop(kind, self._token)
