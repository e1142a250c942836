"""Overhead of the pipeline machinery at one stage: ``partitions=1`` against plain PyTorch.

    python benchmarks/gpu_overhead.py --device cuda --out benchmarks/results/gpu_overhead-h100.json
    python benchmarks/gpu_overhead.py --device cpu --quick            # tiny models, a smoke test

For each model, two copies with the same weights train on the same batch on one device, with
AdamW, in ``--dtype`` (default bfloat16):

- **plain**: ``opt.zero_grad(); loss_fn(model(*args, **kwargs), target).backward(); opt.step()``;
- **ours**: the model traced, planned with ``PlanConfig(partitions=1, microbatches=1)``, its one
  stage built by ``modelparallel.codegen.build_stages`` and run by
  ``modelparallel.runtime.local.LocalPipeline`` (the single-GPU runtime): ``opt.zero_grad();
  pipe.train_step(flat_inputs, target); opt.step()``.

A step's time is the median of ``--repeat`` steps timed with CUDA events (wall clock on the CPU)
after ``--warmup`` steps; the two are measured in alternating rounds (``--rounds``) so that clock
and thermal drift hit both alike, and the ratio is ours / plain of the medians over all rounds.
The goal is a ratio of at most 1.03.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from _common import (
    add_timing_options,
    alternating_rounds,
    model_benchmark_parser,
    optimizer_step,
    requested_device,
    save_result,
    to_device,
    versions,
)

from modelparallel import models
from modelparallel.codegen import build_stages
from modelparallel.partitioner import partition
from modelparallel.plan import PlanConfig
from modelparallel.runtime.local import LocalPipeline
from modelparallel.tracer import trace

GOAL = 1.03


@dataclass(frozen=True)
class Workload:
    """One model and batch: ``make(batch_size) -> ModelCase`` on the CPU in float32."""

    name: str
    make: Callable[[int], models.ModelCase]
    batch_size: int
    shape: str


FULL = (
    Workload("gpt2-medium", lambda b: models.gpt2("medium", batch_size=b, seq_len=1024), 8,
             "1024 tokens"),
    Workload("resnet50", lambda b: models.resnet50(batch_size=b), 64, "3x224x224"),
)
QUICK = (
    Workload("gpt2-tiny", lambda b: models.gpt2("tiny", batch_size=b, seq_len=32), 8,
             "32 tokens"),
    Workload("resnet-tiny", lambda b: models.resnet_tiny(batch_size=b), 8, "3x16x16"),
)


def run_model(w: Workload, *, device: torch.device, dtype: torch.dtype, warmup: int,
              repeat: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Plain and one-stage step times of one model."""
    case = w.make(w.batch_size)
    plain_model = case.model.to(dtype=dtype).to(device)
    ours_model = copy.deepcopy(plain_model)
    args, kwargs = to_device(case.args, device, dtype), to_device(case.kwargs, device, dtype)
    target = to_device(case.target, device, dtype)
    loss_fn = case.loss_fn

    traced = trace(ours_model, args, kwargs)
    plan = partition(traced.graph, PlanConfig(partitions=1, microbatches=1),
                     "h100" if device.type == "cuda" else "cpu")
    stages = build_stages(traced, plan)
    pipe = LocalPipeline(stages, microbatches=1, loss_fn=loss_fn, devices=[device])
    flat = traced.flatten_inputs(args, kwargs)

    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    ours_opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)

    plain_step = optimizer_step(
        plain_opt, lambda: loss_fn(plain_model(*args, **kwargs), target).backward())
    ours_step = optimizer_step(ours_opt, lambda: pipe.train_step(flat, target))

    # Diagnostic: the traced graph module run directly (no codegen, no pipeline). The tracer
    # already gives SDPA is_causal=True instead of a materialised causal mask (Note [causal
    # masks] in modelparallel/tracer/masks.py), as the eager model does.
    variants: dict[str, Callable[[], None]] = {"plain": plain_step, "ours": ours_step}
    variants["traced"] = _graph_step(traced.gm, traced, flat, target, loss_fn)
    samples = alternating_rounds(variants, device, warmup, repeat, rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    plain, ours = med["plain"], med["ours"]
    log(f"{w.name}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items())
        + f"; ratio {ours / plain:.4f}")
    return {"model": w.name, "batch_size": w.batch_size, "sample": w.shape,
            "parameters": traced.graph.num_parameters, "nodes": len(traced.graph),
            "tracer": traced.method,
            "tracer_notes": [n for n in traced.notes if n.startswith("attention:")],
            "plain_step_ms": plain * 1e3, "ours_step_ms": ours * 1e3,
            "ratio": ours / plain,
            "diagnostics_ms": {k: v * 1e3 for k, v in med.items() if k not in ("plain", "ours")},
            "round_medians_ms": {
                k: [1e3 * statistics.median(v[i * repeat:(i + 1) * repeat]) for i in range(rounds)]
                for k, v in samples.items()}}


def _graph_step(gm: torch.fx.GraphModule, traced: Any, flat: list[Any], target: Any,
                loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[], None]:
    """A training step that runs ``gm`` (a traced graph module) directly."""
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-4)
    return optimizer_step(
        opt, lambda: loss_fn(traced.unflatten_outputs(gm(*flat)), target).backward())


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_benchmark_parser(__doc__)
    add_timing_options(parser, warmup=5, repeat=20, rounds=4)
    a = parser.parse_args(argv)
    device = requested_device(a.device)
    if device is None:
        return 2
    dtype = getattr(torch, a.dtype)
    workloads = QUICK if a.quick else FULL
    if a.models:
        workloads = tuple(w for w in workloads if w.name in set(a.models.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"device {name}; dtype {a.dtype}; AdamW; partitions=1, microbatches=1")
    results = [run_model(w, device=device, dtype=dtype, warmup=a.warmup, repeat=a.repeat,
                         rounds=a.rounds, log=log) for w in workloads]
    worst = max(r["ratio"] for r in results)
    out = {"benchmark": "gpu_overhead", "device": name, "versions": versions("transformers"),
           "dtype": a.dtype, "optimizer": "AdamW",
           "timing": {"warmup": a.warmup, "repeat": a.repeat, "rounds": a.rounds,
                      "statistic": "median"},
           "goal_ratio": GOAL, "worst_ratio": worst, "goal_met": worst <= GOAL,
           "models": results}
    print()
    print("model | plain ms | ours ms | ratio | traced graph run directly ms")
    print("--- | --- | --- | --- | ---")
    for r in results:
        d = r["diagnostics_ms"]
        print(f"{r['model']} | {r['plain_step_ms']:.2f} | {r['ours_step_ms']:.2f} | "
              f"{r['ratio']:.4f} | {d.get('traced', math.nan):.2f}")
    print(f"worst ratio {worst:.4f} (goal <= {GOAL})")
    save_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
