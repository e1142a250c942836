"""Clocks for profiling: timing a call on the CPU or CUDA (host and device seconds), and the
spin kernel that keeps a CUDA device busy while the host queues work (Note [profiling isolated
nodes] in :mod:`.isolated`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

__all__ = [
    "Clock",
    "time_call",
]


class _CudaClock:
    """Device and host seconds per call on one CUDA device: the calls are queued behind a spin
    kernel that outlasts their queueing, so CUDA events measure their kernels back to back and
    the host clock measures queueing alone (the host never waits for the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cycles_per_second = self._spin_rate() if hasattr(torch.cuda, "_sleep") else None

    def _spin_rate(self) -> float | None:
        with torch.cuda.device(self.device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            rate = None
            for cycles in (50_000_000, 20_000_000, 20_000_000):  # the first wakes the clocks up
                start.record()
                torch.cuda._sleep(cycles)
                end.record()
                torch.cuda.synchronize(self.device)
                seconds = start.elapsed_time(end) / 1e3
                rate = cycles / seconds if seconds > 0 else None
            return rate

    def __call__(self, fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            fn()
            guess = time.perf_counter() - t0  # an upper bound of queueing one call
            torch.cuda.synchronize(self.device)
            for _ in range(3):
                device, host, spun = self._timed(fn, repeat, 3.0 * guess * repeat + 500e-6)
                if spun is None or host * repeat < 0.9 * spun:
                    return device, host
                guess = 2.0 * host  # the spin ended before the queueing: the device waited
            return device, host

    def _timed(self, fn: Callable[[], Any], repeat: int, spin: float
               ) -> tuple[float, float, float | None]:
        before = torch.cuda.Event(enable_timing=True)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        spun = None
        if self.cycles_per_second is not None:
            before.record()
            torch.cuda._sleep(int(spin * self.cycles_per_second))
        start.record()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        host = (time.perf_counter() - t0) / repeat
        end.record()
        torch.cuda.synchronize(self.device)
        if self.cycles_per_second is not None:
            spun = before.elapsed_time(start) / 1e3
        return start.elapsed_time(end) / 1e3 / repeat, host, spun


def _cpu_clock(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat, 0.0


Clock = Callable[[Callable[[], Any], int], tuple[float, float]]


def _clock(device: torch.device) -> Clock:
    """A function timing ``repeat`` calls of ``fn`` on ``device``: (device, host) seconds per
    call."""
    if device.type == "cuda":
        return _CudaClock(device)
    return _cpu_clock


def time_call(fn: Callable[[], Any], device: torch.device | str, *, repeat: int = 5,
              warmup: int = 2) -> tuple[float, float]:
    """Device and host seconds per call of ``fn`` (Note [profiling isolated nodes]).

    On CUDA the device figure is the time of ``fn``'s kernels back to back, as if the host kept
    up, and the host figure the time to queue them; on the CPU the first is the wall time and
    the second 0.

    Example:
        >>> dev, host = time_call(lambda: torch.ones(64, 64) @ torch.ones(64, 64), "cpu")
        >>> dev > 0 and host == 0
        True
    """
    for _ in range(warmup):
        fn()
    return _clock(torch.device(device))(fn, repeat)


class _Spin:
    """On CUDA, a spin kernel queued before the backward so that the device is busy while the
    host queues it (the host never waits for the device); a no-op elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rate = _CudaClock(device).cycles_per_second if device.type == "cuda" else None
        self.seconds = 0.0
        self.waited = 0
        self._events: tuple[Any, Any] | None = None

    def __call__(self) -> None:
        if self.rate is None or self.seconds <= 0:
            return
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record()
        torch.cuda._sleep(int(self.seconds * self.rate))
        after.record()
        self._events = (before, after)

    def check(self, host_seconds: float) -> None:
        """After a backward: if the spin ended before the host finished queueing, the host
        may have waited; the next backward gets a longer spin."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._events is None:
            self.seconds = 2.0 * host_seconds + 1e-3
            return
        spun = self._events[0].elapsed_time(self._events[1]) / 1e3
        self._events = None
        if host_seconds > 0.9 * spun:
            self.waited += 1
            self.seconds = min(2.0 * host_seconds + 1e-3, 10.0)
