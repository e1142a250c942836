"""Part (d) of ``runtime.py``: an SMP training loop (``modelparallel.torch``: ``@smp.step``,
``DistributedModel``, ``model.backward``) against ``modelparallel.pipeline`` on the same plan.

Both run the runtime benchmark's equal-stage MLP stack with the very same plan (a uniform split,
saved once and given to both: ``pipeline(plan=...)`` and SMP's ``partition_file`` with
``load_partition``), the same microbatches and schedule, steps alternating so machine drift hits
both alike. The SMP step does what SMP's semantics ask on top of the plain step: it broadcasts the
step function's arguments from pipeline rank 0, runs the step function once per microbatch (as
a coroutine: a greenlet, or a worker thread with ``--smp-bodies threads``) and gives every rank the per-microbatch outputs; the plain pipeline runs
with its default ``return_outputs=True`` (outputs broadcast too). Ratio = median SMP step / median
pipeline step (goal <= 1.05); ``late`` is the same SMP loop with the bodies resumed after the
last action on every rank (``StageExecutor.early_work = False``) rather than while pipeline rank
0 waits for a gradient (Note [work after the result] in ``modelparallel/runtime/result.py``),
its ratio to the plain pipeline shown beside; bubble = 1 - mean over ranks of compute seconds /
step wall seconds, for each (goal: within 0.05 of each other).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import run_rank_processes
from torch import nn

__all__ = ["run_smp"]


def _row(rank: int, world: int, m: int, label: str, bodies: str, cfg: dict[str, Any],
         plan_dir: str) -> dict[str, Any]:
    """One (m, schedule, bodies) row on this rank: alternate SMP and plain steps, time both."""
    from runtime import _batch, _mlp

    import modelparallel.torch as smp
    from modelparallel.api import pipeline
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig
    from modelparallel.torch import _bodies
    from modelparallel.torch.state_mod import shutdown
    from modelparallel.tracer import trace

    _bodies.set_backend(bodies)

    loss_fn = nn.functional.mse_loss
    mb = cfg["microbatch_size"]
    model = _mlp()
    x0, _ = _batch(1, mb)
    plan_file = os.path.join(plan_dir, f"plan-{world}-{m}-{label}.json")
    if rank == 0:
        partition(trace(model, (x0,)).graph,
                  PlanConfig(partitions=world, microbatches=m, schedule=label),
                  "cpu", method="uniform").save(plan_file)
    dist.barrier()
    x, y = _batch(m, mb, seed=m)
    pipe = pipeline(copy.deepcopy(model), (x,), loss_fn=loss_fn, plan=plan_file, device="cpu")
    smp.init({"partitions": world, "microbatches": m,
              "pipeline": "interleaved" if label == "1f1b" else "simple",
              "active_microbatches": m + world, "partition_file": plan_file,
              "load_partition": True})
    dm = smp.DistributedModel(model)

    @smp.step
    def train_step(model: Any, data: torch.Tensor, target: torch.Tensor) -> Any:
        loss = loss_fn(model(data), target)
        model.backward(loss)
        return loss

    def plain_step() -> float:
        pipe.step((x,), y)
        return float(pipe.executor.stats.compute_seconds)

    def smp_step(early: bool = True) -> float:
        if dm.partitioned:
            dm.pipeline.executor.early_work = early
        train_step(dm, x, y)
        return float(dm.pipeline.executor.stats.compute_seconds)

    times: dict[str, list[float]] = {"smp": [], "late": [], "plain": []}
    busy: dict[str, list[float]] = {"smp": [], "late": [], "plain": []}
    # smp and late share an executor: which of them follows the plain step alternates, so
    # neither always runs first after the switch from the other pipeline
    steps = (("smp", smp_step), ("late", lambda: smp_step(False)), ("plain", plain_step))
    try:
        for i in range(cfg["warmup"] + cfg["steps"]):
            for which, fn in (steps if i % 2 else (steps[1], steps[0], steps[2])):
                for p in [*dm.parameters(), *pipe.program.module.parameters()]:
                    p.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                compute = fn()
                dt = time.perf_counter() - t0
                if i >= cfg["warmup"]:
                    times[which].append(dt)
                    busy[which].append(compute / dt)
    finally:
        pipe.close()
        shutdown()
    return {"m": m, "schedule": label, "bodies": bodies,
            "smp_step": statistics.median(times["smp"]),
            "plain_step": statistics.median(times["plain"]),
            "late_step": statistics.median(times["late"]),
            "smp_busy": statistics.median(busy["smp"]),
            "plain_busy": statistics.median(busy["plain"])}


def _smp_job(rank: int, world: int, init_file: str, cfg: dict[str, Any], plan_dir: str,
             queue: Any) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: smp.init would take a GPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        rows = [_row(rank, world, m, label, bodies, cfg, plan_dir)
                for m in cfg["microbatches"] for label in cfg["smp_schedules"]
                for bodies in cfg.get("smp_bodies", ["greenlet"])]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            out = []
            for i, row in enumerate(rows):
                per_rank = [g[i] for g in gathered]
                s = max(r["smp_step"] for r in per_rank)
                p = max(r["plain_step"] for r in per_rank)
                late = max(r["late_step"] for r in per_rank)
                bs = 1.0 - statistics.mean(r["smp_busy"] for r in per_rank)
                bp = 1.0 - statistics.mean(r["plain_busy"] for r in per_rank)
                out.append({"p": world, "m": row["m"], "schedule": row["schedule"],
                            "bodies": row["bodies"],
                            "smp_step_ms": 1e3 * s, "pipeline_step_ms": 1e3 * p,
                            "ratio": s / p, "late_step_ms": 1e3 * late,
                            "late_ratio": late / p, "smp_bubble": bs, "pipeline_bubble": bp,
                            "bubble_difference": bs - bp})
            queue.put(out)
    finally:
        dist.destroy_process_group()


def run_smp(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Part (d) rows for ``world`` pipeline ranks."""
    return list(run_rank_processes(
        _smp_job, world, lambda r, tmp: (r, world, os.path.join(tmp, "store"), cfg, tmp), 3600))
