"""Helpers shared by the benchmark scripts: step timing and the software versions of a result.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``, so they
import it as ``from _common import ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue as queue_mod
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from _timing import alternating_rounds, step_times  # re-exported: they lived here before

__all__ = ["add_timing_options", "alternating_rounds", "model_benchmark_parser",
           "optimizer_step", "requested_device", "run_rank_processes", "save_result",
           "step_times", "to_device", "versions"]


def versions(*packages: str) -> dict[str, Any]:
    """Python, torch (with CUDA, cuDNN, NCCL where present), the machine, and ``packages``."""
    out: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "platform": platform.platform(), "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for pkg in ("modelparallel", *packages):
        try:
            out[pkg.lower()] = version(pkg)
        except PackageNotFoundError:
            out[pkg.lower()] = "not installed"
    return out


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``value``'s tensors moved to ``device``, its floating-point ones cast to ``dtype``."""
    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t
    return pytree.tree_map(move, value)


def optimizer_step(opt: torch.optim.Optimizer,
                   backward: Callable[[], Any]) -> Callable[[], None]:
    """A timed training step: gradients set to ``None``, ``backward()`` (the forward and
    backward passes), then ``opt.step()``."""
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        backward()
        opt.step()
    return step


def model_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options the per-model GPU benchmarks share: ``--device``, ``--quick``, ``--models``
    and ``--dtype``; the description is ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU smoke test)")
    parser.add_argument("--models", default="", help="comma-separated subset of model names")
    parser.add_argument("--dtype", default="bfloat16")
    return parser


def add_timing_options(parser: argparse.ArgumentParser, *, warmup: int, repeat: int,
                       rounds: int) -> None:
    """``--warmup``, ``--repeat`` (timed steps per round), ``--rounds`` and ``--out``."""
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default=None, help="results JSON")


def save_result(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (``--out``; nothing if ``None``)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))
        print(f"wrote {path}", flush=True)


def requested_device(name: str) -> torch.device | None:
    """The device ``--device`` names, or ``None`` (with the reason on stderr) if it is CUDA and
    CUDA is not available: the caller exits with 2."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return None
    return device


def run_rank_processes(target: Callable[..., None], world: int,
                       args: Callable[[int, str], tuple[Any, ...]], timeout: float) -> Any:
    """Start ``world`` spawned processes ``target(*args(rank, tmp), queue)`` and return the one
    value one of them puts on ``queue``.

    ``tmp`` is a temporary folder that lives as long as the processes (for the rendezvous file).
    A process that exits with an error ends the run at once with a ``RuntimeError`` naming it
    (the others are terminated), so a failed rank never leaves the script waiting.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(*args(r, tmp), results)) for r in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    result = results.get(timeout=1.0)
                    break
                except queue_mod.Empty:
                    failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode]
                    if failed:
                        raise RuntimeError(f"rank {failed[0][0]} of {world} exited with code "
                                           f"{failed[0][1]} (its traceback is above)") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"no result from {world} ranks in {timeout:.0f} s") from None
            for proc in procs:
                proc.join()
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
    return result
