"""Calibration: measure a device into a :class:`DeviceSpec` that ``build --device`` accepts.

``partition-plan calibrate -o spec.json`` measures, on the current CUDA device (or the CPU):

- dense matrix throughput per dtype (float32 as PyTorch runs it, with its current TF32 setting;
  bfloat16; float16) with square matrix products;
- memory bandwidth, with a device-to-device copy (bytes read plus bytes written);
- per-op launch overhead, with a tiny elementwise op;
- the link between stages: on a machine with two or more GPUs a GPU-to-GPU copy, otherwise the
  built-in figure of the closest device type is kept and the spec says so in ``extra``;
- memory capacity, from the driver (CUDA) or the host (CPU).

Measured throughput is stored as the peak with efficiencies of 1.0 (Note [achievable fractions]
in ``device.py``).

Example:
    >>> spec = calibrate(device="cpu", quick=True)
    >>> spec.peak_flops["float32"] > 0 and spec.matmul_efficiency == 1.0
    True
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from modelparallel.cost_model.device import BUILTIN_DEVICES, DeviceSpec
from modelparallel.errors import ConfigError

__all__ = ["calibrate", "op_overhead"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeat: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _seconds(lambda: torch.mm(a, b), device, repeat)
    return 2 * n**3 / t


def _bandwidth(device: torch.device, nbytes: int, repeat: int) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = _seconds(lambda: dst.copy_(src), device, repeat)
    return 2 * src.numel() * 4 / t


def op_overhead(device: torch.device, repeat: int = 5) -> float:
    """Seconds the host takes per tiny op on ``device`` now (a loop of in-place additions on
    16 elements; on a GPU, the host's cost to queue one kernel): the ``kernel_overhead`` of a
    calibrated spec, and a probe of how fast the host is at the moment.

    Example:
        >>> 0 < op_overhead(torch.device("cpu"), repeat=1) < 1e-2
        True
    """
    x = torch.zeros(16, device=device)
    loops = 200

    def many() -> None:
        for _ in range(loops):
            x.add_(1)
    return _seconds(many, device, repeat) / loops


def _link(device: torch.device, nbytes: int, repeat: int) -> tuple[float, float] | None:
    """Bandwidth and latency of a GPU-to-GPU copy, when a second GPU exists."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return None
    other = torch.device("cuda", (device.index or 0) + 1 if (device.index or 0) + 1 <
                         torch.cuda.device_count() else 0)
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty(nbytes // 4, device=other)
    tiny_src, tiny_dst = src[:1], dst[:1]
    big = _seconds(lambda: dst.copy_(src, non_blocking=True), device, repeat)
    small = _seconds(lambda: tiny_dst.copy_(tiny_src, non_blocking=True), device, repeat)
    return nbytes / max(big - small, 1e-9), small


def _capacity(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _closest_builtin(name: str) -> DeviceSpec:
    lowered = name.lower()
    for key in ("h200", "h100", "a100", "v100"):
        if key in lowered:
            return BUILTIN_DEVICES[key]
    return BUILTIN_DEVICES["cpu"]


def calibrate(device: str | torch.device | None = None, *, name: str | None = None,
              quick: bool = False, console: Any = None) -> DeviceSpec:
    """Measure ``device`` (default: the current CUDA device, else the CPU) into a spec.

    Args:
        device: A torch device or its name.
        name: The spec's name (default: the device's product name).
        quick: Smaller matrices and fewer repeats (seconds instead of tens of seconds).
        console: A ``rich`` console to report progress on, if any.

    Raises:
        ConfigError: if the device is not available.
    """
    dev = torch.device(device if device is not None else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("calibrate was asked for CUDA but no CUDA device is available; "
                          "run it on the GPU machine or pass --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"calibrate supports cpu and cuda devices, not {dev.type!r}")
    product = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else platform.processor() or platform.machine() or "cpu")
    n = (1024 if quick else 2048) if dev.type == "cpu" else (4096 if quick else 8192)
    repeat = 3 if quick else 10
    bw_bytes = (64 if quick else 256) * 2**20 if dev.type == "cpu" else (512 if quick else 2048) * 2**20

    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[dim]calibrate: {msg}[/dim]")

    flops: dict[str, float] = {}
    # CPUs emulate float16 matrix products (orders of magnitude slower); leave it out there.
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if dev.type == "cuda" else ())
    for dtype in dtypes:
        key = str(dtype).removeprefix("torch.")
        try:
            flops[key] = _matmul_flops(dev, dtype, n, repeat)
        except RuntimeError as e:  # a dtype the device cannot multiply
            say(f"{key}: not measured ({e})")
            continue
        say(f"{key} matmul {flops[key] / 1e12:.2f} TFLOP/s")
    bandwidth = _bandwidth(dev, bw_bytes, repeat)
    say(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    overhead = op_overhead(dev, repeat)
    say(f"per-op overhead {overhead * 1e6:.1f} us")
    base = _closest_builtin(product)
    link = _link(dev, bw_bytes, repeat)
    extra: dict[str, Any] = {"product": product, "torch": torch.__version__,
                             "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    if link is None:
        link_bw, link_lat = base.link_bandwidth, base.link_latency
        extra["link"] = f"not measured (one device); built-in {base.name} figures"
    else:
        link_bw, link_lat = link
        extra["link"] = "measured GPU-to-GPU copy"
        say(f"link {link_bw / 1e9:.1f} GB/s, latency {link_lat * 1e6:.1f} us")
    return DeviceSpec(
        name=name or product.replace(" ", "-").lower(),
        peak_flops=flops,
        memory_bandwidth=bandwidth,
        memory_bytes=_capacity(dev),
        link_bandwidth=link_bw,
        link_latency=link_lat,
        matmul_efficiency=1.0,
        memory_efficiency=1.0,
        kernel_overhead=overhead,
        extra=extra,
    )
