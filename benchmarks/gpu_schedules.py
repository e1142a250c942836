"""Every schedule on one GPU, all stages in one process: step time and peak memory.

    python benchmarks/gpu_schedules.py --device cuda --out benchmarks/results/gpu_schedules-h200.json
    python benchmarks/gpu_schedules.py --device cpu --quick      # GPT-2 tiny, a smoke test

On one GPU the pipeline's stages run in one process (``LocalPipeline``, see docs/gpu.md), one
action after another in the schedule's order: there is no bubble to cut, so what a schedule
changes there is the peak memory (how many microbatches' activations are held at once) and the
host cost of its actions. For GPT-2 medium (``--dtype``, default bfloat16, AdamW), planned for
``--partitions`` stages per rank list and ``--microbatches`` by the ILP with the analytic cost
model of ``--spec``, each schedule (GPipe, 1F1B, interleaved 1F1B with two virtual stages per
rank, ZB-H1 as ``LocalPipeline`` runs it on one device, with each ``I`` a whole backward, and
``zb-h1-split`` with the two autograd passes of the distributed runtime, Note [one backward in
one process]) is timed against two plain steps on the same device: the whole batch at once
(``plain``), and the same microbatches one after another with gradients accumulated
(``plain-accum``: the same kernel sizes as the pipeline). Step times are medians of CUDA-event
timed steps, all variants alternating in rounds. Peak memory is ``max_memory_allocated`` over a
step, with the planner's prediction beside it: the sum over stages of the activation bytes each
holds at its peak (``plan.stages[s].memory.activations``), an upper bound of the one-process peak
(the stages' peaks need not coincide). The loss of the first step is compared with plain's.
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
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
from modelparallel.runtime.microbatch import (
    first_microbatch,
    resolve_split,
    split_inputs,
    split_target,
)
from modelparallel.schedule import make_schedule
from modelparallel.tracer import trace

#: (label, schedule name, virtual stages per rank, LocalPipeline's split_backward).
SCHEDULES = (("gpipe", "gpipe", 1, None), ("1f1b", "1f1b", 1, None),
             ("1f1b-v2", "1f1b", 2, None), ("zb-h1", "zb-h1", 1, None),
             ("zb-h1-split", "zb-h1", 1, True))
GiB = 2.0 ** 30


def _peak(step: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes allocated over one call of ``step`` (CUDA only; 0 elsewhere)."""
    if device.type != "cuda":
        step()
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def run(case: models.ModelCase, *, device: torch.device, dtype: torch.dtype, p: int, m: int,
        spec: str, time_limit: float, warmup: int, repeat: int, rounds: int,
        log: Callable[[str], None]) -> dict[str, Any]:
    """Time and measure every schedule and the two plain steps on one model."""
    base = case.model.to(dtype=dtype).to(device)
    args, kwargs = to_device(case.args, device, dtype), to_device(case.kwargs, device, dtype)
    target = to_device(case.target, device, dtype)
    loss_fn = case.loss_fn
    mb_args, mb_kwargs = first_microbatch(base, args, kwargs, m)  # the shapes a stage runs
    traced = trace(copy.deepcopy(base), mb_args, mb_kwargs)
    flat = traced.flatten_inputs(args, kwargs)

    plain_model = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    leaves, tree = pytree.tree_flatten((args, kwargs))  # cut as the pipeline cuts them
    pieces = split_inputs(leaves, resolve_split([str(i) for i in range(len(leaves))], m))
    chunks = list(zip((pytree.tree_unflatten(p, tree) for p in pieces), split_target(target, m)))

    def accumulate() -> None:
        for (a, kw), t in chunks:
            (loss_fn(plain_model(*a, **kw), t) / m).backward()

    variants: dict[str, Callable[[], Any]] = {
        "plain": optimizer_step(
            plain_opt, lambda: loss_fn(plain_model(*args, **kwargs), target).backward()),
        "plain-accum": optimizer_step(plain_opt, accumulate)}
    plans: dict[str, Any] = {}
    first_loss: dict[str, float] = {}
    with torch.no_grad():
        ref_loss = loss_fn(plain_model(*args, **kwargs), target).item()
    for label, name, v, split in SCHEDULES:
        plan = partition(traced.graph, PlanConfig(partitions=p, microbatches=m, schedule=name,
                                                  virtual_stages=v, time_limit=time_limit),
                         spec)
        stages = build_stages(traced, plan)
        schedule = make_schedule(name, p, m, virtual_stages=v)
        pipe = LocalPipeline(stages, microbatches=m, loss_fn=loss_fn, schedule=schedule,
                             devices=[device] * len(stages), split_backward=split)
        opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
        step = optimizer_step(opt, lambda pipe=pipe: pipe.train_step(flat, target))

        first_loss[label] = float(pipe.train_step(flat, target)[0])  # before any update
        for q in pipe.parameters():
            q.grad = None
        variants[label] = step
        plans[label] = plan
        log(f"{label}: {len(stages)} stages planned, predicted step "
            f"{plan.pipeline.step_time * 1e3:.1f} ms")
    samples = alternating_rounds(variants, device, warmup, repeat, rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    peaks = {k: _peak(f, device) for k, f in variants.items()}
    rows = []
    for label, _name, v, _split in SCHEDULES:
        plan = plans[label]
        rows.append({
            "schedule": label, "stages": p * v,
            "step_ms": med[label] * 1e3,
            "vs_plain": med[label] / med["plain"],
            "vs_plain_accum": med[label] / med["plain-accum"],
            "peak_gib": peaks[label] / GiB,
            "predicted_activations_gib": sum(s.memory.activations for s in plan.stages) / GiB,
            "predicted_step_ms_on_p_devices": plan.pipeline.step_time * 1e3,
            "predicted_bubble_on_p_devices": plan.pipeline.bubble_fraction,
            "first_loss": first_loss[label],
            "loss_rel_diff": abs(first_loss[label] - ref_loss) / abs(ref_loss)})
        log(f"{label}: {med[label] * 1e3:.1f} ms, peak {peaks[label] / GiB:.2f} GiB")
    return {"plain_step_ms": med["plain"] * 1e3, "plain_accum_step_ms": med["plain-accum"] * 1e3,
            "plain_peak_gib": peaks["plain"] / GiB,
            "plain_accum_peak_gib": peaks["plain-accum"] / GiB,
            "reference_loss": ref_loss, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--spec", default="h200", help="device spec the planner prices with")
    parser.add_argument("--time-limit", type=float, default=10.0)
    add_timing_options(parser, warmup=3, repeat=10, rounds=2)
    a = parser.parse_args(argv)
    device = requested_device(a.device)
    if device is None:
        return 2
    dtype = getattr(torch, a.dtype)
    if a.quick:
        case, what = models.gpt2("tiny", batch_size=8, seq_len=32), "gpt2-tiny, 8 x 32 tokens"
    else:
        case, what = (models.gpt2("medium", batch_size=8, seq_len=1024),
                      "gpt2-medium, 8 x 1024 tokens")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"{what} on {name}; {a.dtype}; AdamW; p = {a.partitions}, m = {a.microbatches}")
    result = run(case, device=device, dtype=dtype, p=a.partitions, m=a.microbatches,
                 spec=a.spec, time_limit=a.time_limit, warmup=a.warmup, repeat=a.repeat,
                 rounds=a.rounds, log=log)
    print()
    print(f"plain (whole batch) {result['plain_step_ms']:.1f} ms, peak "
          f"{result['plain_peak_gib']:.2f} GiB; plain accumulated over {a.microbatches} "
          f"microbatches {result['plain_accum_step_ms']:.1f} ms, peak "
          f"{result['plain_accum_peak_gib']:.2f} GiB")
    print("schedule | stages | step ms | / plain | / plain-accum | peak GiB | "
          "predicted activations GiB (sum of stages) | predicted bubble on p devices | "
          "first-loss rel. diff")
    print("--- | --- | --- | --- | --- | --- | --- | --- | ---")
    for r in result["rows"]:
        print(f"{r['schedule']} | {r['stages']} | {r['step_ms']:.1f} | {r['vs_plain']:.3f} | "
              f"{r['vs_plain_accum']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['predicted_activations_gib']:.2f} | {r['predicted_bubble_on_p_devices']:.3f}"
              f" | {r['loss_rel_diff']:.1e}")
    out = {"benchmark": "gpu_schedules", "device": name, "workload": what,
           "traced": "microbatch 0",
           "versions": versions("transformers"), "dtype": a.dtype, "optimizer": "AdamW",
           "partitions": a.partitions, "microbatches": a.microbatches, "spec": a.spec,
           "timing": {"warmup": a.warmup, "repeat": a.repeat, "rounds": a.rounds,
                      "statistic": "median"}, **result}
    save_result(a.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
