"""Hybrid data × pipeline parallelism and the memory features: step time and memory.

    python benchmarks/hybrid.py --quick                       # GPT-2 tiny, a few steps (CPU)
    python benchmarks/hybrid.py --model gpt2-medium --steps 5 # the issue's figure (slow on CPU)

(a) Step time on 4 gloo ranks, same global batch: p = 2 stages × dp = 2 replicas
    (``modelparallel.pipeline(..., data_parallel=2)``) against p = 4 × dp = 1 and against
    ``torch.nn.parallel.DistributedDataParallel`` over 4 ranks (each a whole model); ratios
    against DDP side by side. Median of the timed steps after one warm-up step.
(b) Memory of one stage (a one-stage pipeline of the whole model, GPipe, all microbatches in
    flight) with none / checkpointing="all" / offload_activations / bf16: the planner's
    predicted activation bytes (``plan.stages[0].memory.activations + workspace``, Note [memory
    features]) against the measured ones. On CUDA: ``torch.cuda.max_memory_allocated`` during the
    step minus the memory before it. On CPU: the bytes autograd keeps for backward (a
    ``saved_tensors_hooks`` meter around the step; offload then keeps nothing on the "device").
    Step time of each, and the ratios to "none".

Writes a table to stdout and ``benchmarks/results/hybrid.json`` (with versions and date).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import versions

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
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_job, args=(r, 4, os.path.join(tmp, "s"), cfg, queue))
                 for r in range(4)]
        for p in procs:
            p.start()
        result = queue.get(timeout=7200)
        for p in procs:
            p.join()
    return dict(result)


# -- (b) memory of one stage -------------------------------------------------------------------------


def _measure(case: Any, features: dict[str, Any], m: int, device: torch.device, steps: int
             ) -> dict[str, float]:
    import modelparallel

    model = copy.deepcopy(case.model).to(device)
    x, y = case.args[0].to(device), case.target.to(device)
    pipe = modelparallel.pipeline(model, x, loss_fn=case.loss_fn, microbatches=m,
                                  schedule="gpipe", method="uniform", device=device, **features)
    predicted = pipe.plan.stages[0].memory
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
    kept = [0, 0]
    held = {t.untyped_storage().data_ptr() for t in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() in held:  # a parameter: no new memory
            return t
        kept[0] += t.numel() * t.element_size()
        kept[1] = max(kept[1], kept[0])
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    times, measured = [], 0.0
    for i in range(steps + 1):
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        kept[0] = kept[1] = 0
        t0 = time.perf_counter()
        if device.type == "cuda":
            pipe.step(x, y, return_outputs=False)
            torch.cuda.synchronize()
            measured = float(torch.cuda.max_memory_allocated() - base)
        else:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                pipe.step(x, y, return_outputs=False)
            measured = float(kept[1])
        if i:
            times.append(time.perf_counter() - t0)
        opt.step()
    return {"predicted_bytes": float(predicted.activations + predicted.workspace),
            "measured_bytes": measured, "step_s": statistics.median(times)}


def memory_table(model: str, batch: int, m: int, steps: int) -> dict[str, dict[str, float]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = _case(model, batch)
    rows: dict[str, dict[str, float]] = {}
    for label, feats in (("none", {}), ("checkpointing", {"checkpointing": "all"}),
                         ("offload", {"offload_activations": True}),
                         ("bf16", {"precision": "bf16"})):
        rows[label] = _measure(case, feats, m, device, steps)
    base = rows["none"]
    for r in rows.values():
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
    dev = "cuda" if torch.cuda.is_available() else "cpu (saved-tensor bytes)"
    print(f"(b) one stage, {a.model}, batch {a.global_batch // 2}, m = {a.microbatches}, {dev}")
    print(f"{'feature':<14} {'pred MiB':>9} {'meas MiB':>9} {'pred x':>7} {'meas x':>7} "
          f"{'step ms':>9} {'time x':>7}")
    for k, r in mem.items():
        print(f"{k:<14} {r['predicted_bytes'] / 2**20:>9.2f} {r['measured_bytes'] / 2**20:>9.2f} "
              f"{r['predicted_ratio']:>7.2f} {r['memory_ratio']:>7.2f} {1e3 * r['step_s']:>9.1f} "
              f"{r['time_ratio']:>7.2f}")
    return _write(a.out, result)


def _write(out: str, result: dict[str, Any]) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
