"""Runtime benchmark (CPU, gloo): bubble, step time against torch.distributed.pipelining, and the
overhead of a one-stage pipeline against plain PyTorch.

    python benchmarks/runtime.py            # p in {2, 4}, m in {4, 8, 16}
    python benchmarks/runtime.py --quick    # fewer steps

(a) Bubble: the measured idle fraction of the pipeline, ``1 - mean over ranks of (compute
    seconds / step seconds)``, next to the theory ``(p - 1) / (m + p - 1)`` and to
    :func:`modelparallel.schedule.simulate` fed with the measured per-stage forward and
    backward times and the measured one-way latency of a boundary message (which accounts for
    unequal stages and the links).
(b) Step time of our runtime against ``torch.distributed.pipelining`` (``PipelineStage`` with
    ``ScheduleGPipe`` / ``Schedule1F1B``) running the very same stage modules (the same split),
    same microbatches, same process group backend; steps of the two alternate, so drift in the
    machine's speed hits both alike; ratio = median ours / median theirs (goal <= 1.0).
(c) A one-stage pipeline (``partitions=1``, one microbatch) against a plain PyTorch training step
    of the same model (forward, loss, backward, optimizer step); ratio goal <= 1.03.

The model is a stack of identical residual MLP blocks, so stages of a uniform split are equal
(``partition(..., method="uniform")``); (c) also runs GPT-2 tiny. Every process uses one
intra-op thread. Results: a table on stdout and ``benchmarks/results/runtime.json`` (with
versions, machine and date).
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import versions
from _timing import link_latency
from _torch_pp import TorchStage, schedule_step
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "runtime.json"


class Block(nn.Module):
    """A residual MLP block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class MLPStack(nn.Module):
    """``depth`` identical blocks between a linear input and output layer."""

    def __init__(self, width: int = 256, depth: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def _mlp(seed: int = 0) -> MLPStack:
    torch.manual_seed(seed)
    return MLPStack()


def _batch(m: int, mb: int, width: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m * mb, width, generator=g), torch.randn(m * mb, width, generator=g)


# -- (a) and (b): one job per pipeline size --------------------------------------------------------



def _pipeline_job(rank: int, world: int, init_file: str, cfg: dict[str, Any], queue: Any) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from modelparallel.codegen import build_stage
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.schedule import make_schedule, simulate, theoretical_bubble
    from modelparallel.tracer import trace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        mb = cfg["microbatch_size"]
        model = _mlp()
        x0, _ = _batch(1, mb)
        traced = trace(model, (x0,))
        plan = partition(traced.graph, PlanConfig(partitions=world), "cpu", method="uniform")
        loss_fn = nn.functional.mse_loss
        latency = link_latency(rank, torch.zeros(mb, 256))
        rows = []
        for m in cfg["microbatches"]:
            for schedule in ("gpipe", "1f1b"):
                x, y = _batch(m, mb, seed=m)
                prog = build_stage(traced, plan, rank)
                # ours
                comm = StageComm.create(rank, list(range(world)), "cpu", 120.0)
                ex = StageExecutor(prog, comm, loss_fn=loss_fn, schedule=schedule,
                                   split=resolve_split(prog.input_names, m))
                # torch.distributed.pipelining on the very same stage module
                stage = PipelineStage(TorchStage(prog), rank, world,
                                      torch.device("cpu"))
                cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
                sched = cls(stage, m, loss_fn=loss_fn)

                ours_step = functools.partial(ex.train_step, [x], y, return_outputs=False)
                torch_step = functools.partial(schedule_step, sched, rank, world, x, y)
                ours, theirs, compute, fwd, bwd = [], [], [], [], []
                for i in range(cfg["warmup"] + cfg["steps"]):
                    for which, fn in (("ours", ours_step), ("torch", torch_step)):
                        for p in prog.module.parameters():
                            p.grad = None
                        dist.barrier()
                        t0 = time.perf_counter()
                        fn()
                        dt = time.perf_counter() - t0
                        if i < cfg["warmup"]:
                            continue
                        if which == "torch":
                            theirs.append(dt)
                            continue
                        ours.append(dt)
                        compute.append(ex.stats.compute_seconds)
                        fwd += [s for a, s in ex.stats.actions if "F" in a]
                        bwd += [s for a, s in ex.stats.actions if "B" in a]
                comm.teardown()
                step = statistics.median(ours)
                rows.append({
                    "m": m, "schedule": schedule, "ours_step": step,
                    "theirs_step": statistics.median(theirs),
                    "busy": statistics.median(compute) / step,
                    "fwd": statistics.median(fwd), "bwd": statistics.median(bwd),
                })
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            out = []
            for i, row in enumerate(rows):
                per_rank = [g[i] for g in gathered]
                step = max(r["ours_step"] for r in per_rank)
                their_step = max(r["theirs_step"] for r in per_rank)
                sim = simulate(make_schedule(row["schedule"], world, row["m"]),
                               [r["fwd"] for r in per_rank], [r["bwd"] for r in per_rank],
                               comm_time=latency)
                out.append({
                    "p": world, "m": row["m"], "schedule": row["schedule"],
                    "bubble_measured": 1.0 - statistics.mean(r["busy"] for r in per_rank),
                    "bubble_theory": theoretical_bubble(world, row["m"]),
                    "bubble_simulated": sim.bubble_fraction,
                    "ours_step_ms": 1e3 * step, "torch_step_ms": 1e3 * their_step,
                    "ratio": step / their_step, "link_latency_ms": 1e3 * latency,
                })
            queue.put(out)
    finally:
        dist.destroy_process_group()


def _run_pipeline(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_pipeline_job,
                             args=(r, world, os.path.join(tmp, "store"), cfg, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        result = queue.get(timeout=3600)
        for p in procs:
            p.join()
    return result


# -- (c): one-stage pipeline against plain PyTorch -------------------------------------------------


def _overhead(name: str, steps: int) -> dict[str, Any]:
    from modelparallel import models
    from modelparallel.api import pipeline

    torch.set_num_threads(1)
    if name == "mlp":
        model, loss_fn = _mlp(), nn.functional.mse_loss
        x, y = _batch(1, 64)
        args: tuple[Any, ...] = (x,)
    else:
        case = models.gpt2("tiny", batch_size=8, seq_len=64)
        model, loss_fn, args, y = case.model, case.loss_fn, case.args, case.target
    plain = copy.deepcopy(model)
    pipe = pipeline(model, args, loss_fn=loss_fn, return_outputs=False, device="cpu")
    opt = torch.optim.SGD(pipe.parameters(), lr=1e-3)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def ours() -> None:
        opt.zero_grad()
        pipe.step(args, y)
        opt.step()

    def theirs() -> None:
        plain_opt.zero_grad()
        loss_fn(plain(*args), y).backward()
        plain_opt.step()

    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for fn in (ours, theirs, ours, theirs):  # warm up
        fn()
    for _ in range(steps):  # interleaved, so drift hits both alike
        for key, fn in (("ours", ours), ("plain", theirs)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    a, b = statistics.median(times["ours"]), statistics.median(times["plain"])
    return {"model": name, "ours_step_ms": 1e3 * a, "plain_step_ms": 1e3 * b, "ratio": a / b}


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per row")
    parser.add_argument("--quick", action="store_true", help="3 measured steps, 1 warm-up")
    parser.add_argument("--output", type=Path, default=RESULTS)
    a = parser.parse_args(argv)
    cfg = {"microbatches": a.microbatches, "microbatch_size": a.microbatch_size,
           "steps": 3 if a.quick else a.steps, "warmup": 1 if a.quick else 2}
    rows: list[dict[str, Any]] = []
    for p in a.partitions:
        print(f"running p={p} ...", file=sys.stderr, flush=True)
        rows += _run_pipeline(p, cfg)
    print("running one-stage overhead ...", file=sys.stderr, flush=True)
    overhead = [_overhead(n, 10 if a.quick else 40) for n in ("mlp", "gpt2-tiny")]

    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    t = Table(title="(a) bubble and (b) step time vs torch.distributed.pipelining "
                    f"(MLP stack, microbatch {a.microbatch_size}, gloo, 1 thread/rank, "
                    f"{os.cpu_count()} CPUs)")
    for col in ("p", "m", "schedule", "bubble measured", "theory (p-1)/(m+p-1)",
                "simulated", "ours ms", "torch ms", "ours/torch"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_measured']:.3f}",
                  f"{r['bubble_theory']:.3f}", f"{r['bubble_simulated']:.3f}",
                  f"{r['ours_step_ms']:.1f}", f"{r['torch_step_ms']:.1f}", f"{r['ratio']:.3f}")
    console.print(t)
    t2 = Table(title="(c) one-stage pipeline vs plain PyTorch training step (1 thread)")
    for col in ("model", "ours ms", "plain ms", "ours/plain"):
        t2.add_column(col, justify="right")
    for r in overhead:
        t2.add_row(r["model"], f"{r['ours_step_ms']:.2f}", f"{r['plain_step_ms']:.2f}",
                   f"{r['ratio']:.3f}")
    console.print(t2)
    result = {"versions": versions(), "config": cfg, "pipeline": rows, "one_stage": overhead,
              "goals": {"ours_over_torch": 1.0, "one_stage_over_plain": 1.03}}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
