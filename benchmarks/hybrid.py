"""Hybrid data × pipeline parallelism and the memory features: step time and memory.

    python benchmarks/hybrid.py --quick                       # GPT-2 tiny, a few steps (CPU)
    python benchmarks/hybrid.py --model gpt2-medium --steps 5 # the issue's figure (slow on CPU)

(a) Step time on 4 gloo ranks, same global batch: p = 2 stages × dp = 2 replicas
    (``modelparallel.pipeline(..., data_parallel=2)``) against p = 4 × dp = 1 and against
    ``torch.nn.parallel.DistributedDataParallel`` over 4 ranks (each a whole model); ratios
    against DDP side by side. Median of the timed steps after one warm-up step.
(b) Memory of one stage (a one-stage pipeline of the whole model, GPipe, all microbatches in
    flight) with none / checkpointing="all" / offload_activations / bf16, MiB, predicted by the
    planner (``plan.stages[0].memory``, Note [memory features]) against measured: the stage's
    peak (``memory.peak`` against ``torch.cuda.max_memory_allocated``: parameters, optimizer
    state and the step), and the step's part (``gradients + activations + workspace`` against
    the peak above what was allocated before the step, gradients set to None). On CPU the
    measurement is the profiler's allocation timeline of the step (offload is left out: host
    memory is the CPU's). Step time of each, and the ratios to "none".

Writes a table to stdout and ``benchmarks/results/hybrid.json`` (with versions and date).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_rank_processes, versions

RESULTS = Path(__file__).resolve().parent / "results"


def _case(name: str, batch: int) -> Any:
    from modelparallel import models

    size = name.split("-", 1)[1] if "-" in name else "tiny"
    return models.gpt2(size, batch_size=batch, seq_len=64 if size == "tiny" else 128)


# -- (a) step time on 4 ranks ----------------------------------------------------------------------


def _ddp_step(ddp: Any, opt: Any, xs: Any, ys: Any, loss_fn: Any) -> None:
    opt.zero_grad()
    loss_fn(ddp(xs), ys).backward()
    opt.step()


def _pipe_step(pipe: Any, opt: Any, xs: Any, ys: Any) -> None:
    opt.zero_grad()
    pipe.step(xs, ys, return_outputs=False)
    opt.step()


def _job(rank: int, world: int, init: str, cfg: dict[str, Any], queue: Any) -> None:
    import modelparallel

    torch.set_num_threads(cfg.get("threads", 1))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    try:
        gbatch, steps = cfg["global_batch"], cfg["steps"]
        case = _case(cfg["model"], gbatch)
        x, y = case.args[0], case.target
        out: dict[str, float] = {}
        for label, p, dp in (("p2xdp2", 2, 2), ("p4xdp1", 4, 1), ("ddp4", 1, 0)):
            model = copy.deepcopy(case.model)
            if dp == 0:
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
                share = gbatch // world
                xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
                step = functools.partial(_ddp_step, ddp, opt, xs, ys, case.loss_fn)
            else:
                pipe = modelparallel.pipeline(model, x[: gbatch // dp], loss_fn=case.loss_fn,
                                              partitions=p, data_parallel=dp,
                                              microbatches=cfg["microbatches"], method="dp",
                                              device="cpu", timeout=1800)
                opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
                share = gbatch // dp
                d = pipe.dp_rank
                xs, ys = x[d * share:(d + 1) * share], y[d * share:(d + 1) * share]
                step = functools.partial(_pipe_step, pipe, opt, xs, ys)
            times = []
            for i in range(steps + 1):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                dist.barrier()
                if i:
                    times.append(time.perf_counter() - t0)
            out[label] = statistics.median(times)
            if dp:
                pipe.close()
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def step_times(cfg: dict[str, Any]) -> dict[str, float]:
    return dict(run_rank_processes(_job, 4, lambda r, tmp: (r, 4, os.path.join(tmp, "s"), cfg),
                                   7200))


# -- (b) memory of one stage -------------------------------------------------------------------------


def _allocated_peak_cpu(step: Any) -> float:
    """Peak bytes allocated on the CPU while ``step()`` runs, above what was allocated before
    (the profiler's memory timeline: every tensor allocation and free)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    cur = best = 0
    for _, action, _, nbytes in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action.name == "CREATE":
            cur += nbytes
        elif action.name == "DESTROY":
            cur -= nbytes
        best = max(best, cur)
    return float(best)


def _measure(case: Any, features: dict[str, Any], m: int, device: torch.device, steps: int
             ) -> dict[str, float]:
    import modelparallel

    gc.collect()  # the previous row's stage and optimizer state are gone before this one starts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = float(torch.cuda.memory_allocated()) if device.type == "cuda" else 0.0
    model = copy.deepcopy(case.model).to(device)
    x, y = case.args[0].to(device), case.target.to(device)
    pipe = modelparallel.pipeline(model, x, loss_fn=case.loss_fn, microbatches=m,
                                  schedule="gpipe", method="uniform", device=device, **features)
    mem = pipe.plan.stages[0].memory
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
    times, transient, held = [], 0.0, 0.0
    for i in range(steps + 1):
        opt.zero_grad()  # gradients freed: they are part of the step's transient memory
        last = i == steps
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if device.type == "cuda":
            pipe.step(x, y, return_outputs=False)
            torch.cuda.synchronize()
            transient = float(torch.cuda.max_memory_allocated() - base)
            held = float(base) - before  # this stage's parameters, optimizer state and inputs
        elif last and i:  # CPU: the profiler's allocation timeline (slow: the last step only)
            transient = _allocated_peak_cpu(lambda: pipe.step(x, y, return_outputs=False))
            held = float(sum(t.numel() * t.element_size() for t in model.parameters())
                         + sum(t.numel() * t.element_size() for st in opt.state.values()
                               for t in st.values() if isinstance(t, torch.Tensor)))
        else:
            pipe.step(x, y, return_outputs=False)
        if i and not (last and device.type != "cuda"):
            times.append(time.perf_counter() - t0)
        opt.step()
    pipe.close()
    return {"predicted_peak_bytes": float(mem.peak),
            "measured_peak_bytes": held + transient,
            "predicted_bytes": float(mem.gradients + mem.activations + mem.workspace),
            "measured_bytes": transient,
            "predicted_activations_bytes": float(mem.activations),
            "allocated_before_row_bytes": before,
            "step_s": statistics.median(times) if times else float("nan")}


def memory_table(model: str, batch: int, m: int, steps: int) -> dict[str, dict[str, float]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = _case(model, batch)
    rows: dict[str, dict[str, float]] = {}
    feats: tuple[tuple[str, dict[str, Any]], ...] = (
        ("none", {}), ("checkpointing", {"checkpointing": "all"}),
        ("offload", {"offload_activations": True}), ("bf16", {"precision": "bf16"}))
    for label, kw in feats:
        if label == "offload" and device.type == "cpu":
            continue  # host memory is the CPU's memory: nothing to offload to
        rows[label] = _measure(case, kw, m, device, max(steps, 2))
    base = rows["none"]
    for r in rows.values():
        r["peak_error"] = r["predicted_peak_bytes"] / max(r["measured_peak_bytes"], 1.0) - 1
        r["transient_error"] = r["predicted_bytes"] / max(r["measured_bytes"], 1.0) - 1
        r["memory_ratio"] = r["measured_bytes"] / max(base["measured_bytes"], 1.0)
        r["predicted_ratio"] = r["predicted_bytes"] / max(base["predicted_bytes"], 1.0)
        r["time_ratio"] = r["step_s"] / base["step_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-tiny", help="gpt2-tiny, gpt2-small, gpt2-medium")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2 timed steps")
    ap.add_argument("--skip-ranks", action="store_true", help="only the memory table")
    ap.add_argument("--skip-memory", action="store_true", help="only the step times")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank in (a)")
    ap.add_argument("--out", default=str(RESULTS / "hybrid.json"))
    a = ap.parse_args(argv)
    steps = 2 if a.quick else a.steps
    cfg = {"model": a.model, "global_batch": a.global_batch, "microbatches": a.microbatches,
           "steps": steps, "threads": a.threads}
    result: dict[str, Any] = {"config": cfg, "versions": versions()}
    if not a.skip_ranks:
        st = step_times(cfg)
        result["step_time_4_ranks"] = {k: {"median_s": v, "ratio_to_ddp": v / st["ddp4"]}
                                       for k, v in st.items()}
        print(f"(a) {a.model}, global batch {a.global_batch}, 4 gloo ranks")
        print(f"{'layout':<10} {'step ms':>10} {'vs DDP':>8}")
        for k, v in result["step_time_4_ranks"].items():
            print(f"{k:<10} {1e3 * v['median_s']:>10.1f} {v['ratio_to_ddp']:>8.2f}")
    if a.skip_memory:
        return _write(a.out, result)
    mem = memory_table(a.model, a.global_batch // 2, a.microbatches, steps)
    result["memory_one_stage"] = mem
    dev = "cuda" if torch.cuda.is_available() else "cpu (profiler allocation timeline)"
    result["memory_device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                               else "cpu")
    print(f"(b) one stage, {a.model}, batch {a.global_batch // 2}, m = {a.microbatches}, {dev}")
    print("    peak: whole stage (parameters, optimizer state, step); step: above what the step "
          "starts with (gradients, activations, workspace)")
    print(f"{'feature':<14} {'pred peak':>10} {'meas peak':>10} {'err':>6} {'pred step':>10} "
          f"{'meas step':>10} {'err':>6} {'pred x':>7} {'meas x':>7} {'step ms':>9} "
          f"{'time x':>7}")
    for k, r in mem.items():
        print(f"{k:<14} {r['predicted_peak_bytes'] / 2**20:>10.0f} "
              f"{r['measured_peak_bytes'] / 2**20:>10.0f} {100 * r['peak_error']:>5.0f}% "
              f"{r['predicted_bytes'] / 2**20:>10.0f} {r['measured_bytes'] / 2**20:>10.0f} "
              f"{100 * r['transient_error']:>5.0f}% {r['predicted_ratio']:>7.2f} "
              f"{r['memory_ratio']:>7.2f} {1e3 * r['step_s']:>9.1f} {r['time_ratio']:>7.2f}")
    return _write(a.out, result)


def _write(out: str, result: dict[str, Any]) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
