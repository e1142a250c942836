"""Helpers shared by the benchmark scripts: step timing and the software versions of a result.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``, so they
import it as ``from _common import ...``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.utils._pytree as pytree
from _timing import step_times  # re-exported: it lived here before _timing.py

__all__ = ["model_benchmark_parser", "step_times", "to_device", "versions"]


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


def model_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options the per-model GPU benchmarks share: ``--device``, ``--quick``, ``--models``
    and ``--dtype``; the description is ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU smoke test)")
    parser.add_argument("--models", default="", help="comma-separated subset of model names")
    parser.add_argument("--dtype", default="bfloat16")
    return parser
