"""Runtime benchmark (CPU, gloo): bubble, step time against torch.distributed.pipelining, and the
overhead of a one-stage pipeline against plain PyTorch.

    python benchmarks/runtime.py            # p in {2, 4}, m in {4, 8, 16}, every schedule
    python benchmarks/runtime.py --quick    # fewer steps
    python benchmarks/runtime.py --partitions 2 --microbatches 4 8 --schedules 1f1b-v2 zb-h1

(a) Bubble: the measured idle fraction of the pipeline, ``1 - mean over ranks of (compute
    seconds / step seconds)``, next to the theory of the schedule
    (:func:`modelparallel.schedule.theoretical_bubble`: ``(p - 1) / (m + p - 1)`` for GPipe and
    1F1B, ``(p - 1) / (v m + p - 1)`` for interleaved 1F1B, ``(p - 1) / (3 m + p - 1)`` for
    ZB-H1) and to :func:`modelparallel.schedule.simulate` fed with the measured per-stage
    forward and backward times (input- and weight-gradient halves for ZB-H1) and the measured
    one-way latency of a boundary message (which accounts for unequal stages and the links).
(b) Step time of our runtime against ``torch.distributed.pipelining`` (``PipelineStage`` with
    ``ScheduleGPipe`` / ``Schedule1F1B`` / ``ScheduleInterleaved1F1B`` (``1f1b-v2``: two
    stages per rank) / ``ScheduleInterleavedZeroBubble`` with one stage per rank (``zb-h1``))
    running the very same stage modules (the same split), same microbatches, same process
    group backend; steps of the two alternate, so drift in the machine's speed hits both alike;
    ratio = median ours / median theirs (goal <= 1.0).
(c) A one-stage pipeline (``partitions=1``, one microbatch) against a plain PyTorch training step
    of the same model (forward, loss, backward, optimizer step); ratio goal <= 1.03.
(d) An SMP training loop (``modelparallel.torch``'s ``@smp.step``) against
    ``modelparallel.pipeline`` on the same plan (``_smp_bench.py``): step-time ratio goal <= 1.05,
    bubbles within 0.05 of each other; beside it, the ratio with the step bodies resumed after
    the last action (``late``, Note [work after the result]).

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
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import run_rank_processes, versions
from _smp_bench import run_smp
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



#: Benchmark labels: (our schedule name, virtual stages, torch's schedule class name).
SCHEDULES = {"gpipe": ("gpipe", 1, "ScheduleGPipe"), "1f1b": ("1f1b", 1, "Schedule1F1B"),
             "1f1b-v2": ("1f1b", 2, "ScheduleInterleaved1F1B"),
             "zb-h1": ("zb-h1", 1, "ScheduleInterleavedZeroBubble")}


def _pipeline_job(rank: int, world: int, init_file: str, cfg: dict[str, Any], queue: Any) -> None:
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    from modelparallel.codegen import build_stage
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.schedule import Action, make_schedule, simulate, theoretical_bubble
    from modelparallel.tracer import trace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        mb = cfg["microbatch_size"]
        model = _mlp()
        x0, _ = _batch(1, mb)
        traced = trace(model, (x0,))
        loss_fn = nn.functional.mse_loss
        latency = link_latency(rank, torch.zeros(mb, 256))
        rows = []
        for m in cfg["microbatches"]:
            for label in cfg["schedules"]:
                schedule, v, torch_cls = SCHEDULES[label]
                n = world * v
                plan = partition(traced.graph, PlanConfig(partitions=world, virtual_stages=v,
                                                          schedule=schedule, microbatches=m),
                                 "cpu", method="uniform")
                x, y = _batch(m, mb, seed=m)
                progs = [build_stage(traced, plan, s) for s in range(rank, n, world)]
                # ours
                comm = StageComm.create(rank, list(range(world)), "cpu", 120.0)
                ex = StageExecutor(progs, comm, loss_fn=loss_fn, schedule=schedule,
                                   split=resolve_split(progs[0].input_names, m))
                # torch.distributed.pipelining on the very same stage modules
                stages = [PipelineStage(TorchStage(q), q.index, n, torch.device("cpu"))
                          for q in progs]
                cls = getattr(pipelining, torch_cls)
                sched = cls(stages if len(stages) > 1 or torch_cls.startswith(
                    "ScheduleInterleaved") else stages[0], m, loss_fn=loss_fn)

                ours_step = functools.partial(ex.train_step, [x], y, return_outputs=False)
                torch_step = functools.partial(schedule_step, sched, rank, world, x, y)
                ours, theirs, compute = [], [], []
                times: dict[tuple[int, str], list[float]] = {}
                for i in range(cfg["warmup"] + cfg["steps"]):
                    for which, fn in (("ours", ours_step), ("torch", torch_step)):
                        for q in progs:
                            for p in q.module.parameters():
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
                        for a, sec in ex.stats.actions:
                            act = Action.parse(a)
                            times.setdefault((act.stage, act.kind), []).append(sec)
                comm.teardown()
                step = statistics.median(ours)
                med = {k: statistics.median(vals) for k, vals in times.items()}
                rows.append({
                    "m": m, "label": label, "schedule": schedule, "v": v,
                    "torch": torch_cls, "ours_step": step,
                    "theirs_step": statistics.median(theirs),
                    "busy": statistics.median(compute) / step,
                    "stages": {q.index: {k: med.get((q.index, k), 0.0) for k in "FBIW"}
                               for q in progs},
                })
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            out = []
            for i, row in enumerate(rows):
                per_rank = [g[i] for g in gathered]
                step = max(r["ours_step"] for r in per_rank)
                their_step = max(r["theirs_step"] for r in per_rank)
                st = {int(k): t for r in per_rank for k, t in r["stages"].items()}
                n = world * row["v"]
                fwd = [st[s]["F"] for s in range(n)]
                bwd = [st[s]["B"] + st[s]["I"] + st[s]["W"] for s in range(n)]
                wf = [st[s]["W"] / b if b > 0 else 0.0 for s, b in enumerate(bwd)]
                sim = simulate(make_schedule(row["schedule"], world, row["m"], row["v"]),
                               fwd, bwd, comm_time=latency, wgrad_fraction=wf)
                out.append({
                    "p": world, "m": row["m"], "schedule": row["label"],
                    "torch_schedule": row["torch"],
                    "bubble_measured": 1.0 - statistics.mean(r["busy"] for r in per_rank),
                    "bubble_theory": theoretical_bubble(world, row["m"], row["schedule"],
                                                        row["v"]),
                    "bubble_simulated": sim.bubble_fraction,
                    "ours_step_ms": 1e3 * step, "torch_step_ms": 1e3 * their_step,
                    "ratio": step / their_step, "link_latency_ms": 1e3 * latency,
                })
            queue.put(out)
    finally:
        dist.destroy_process_group()


def _run_pipeline(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return run_rank_processes(_pipeline_job, world,
                              lambda r, tmp: (r, world, os.path.join(tmp, "store"), cfg), 3600)


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
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                        choices=list(SCHEDULES), help="schedules to run (default: all)")
    parser.add_argument("--no-overhead", action="store_true",
                        help="skip (c), the one-stage overhead")
    parser.add_argument("--no-smp", action="store_true",
                        help="skip (d), the SMP loop against modelparallel.pipeline")
    parser.add_argument("--smp-schedules", nargs="+", default=["1f1b", "gpipe"],
                        choices=["1f1b", "gpipe"], help="schedules of (d)")
    parser.add_argument("--smp-bodies", nargs="+", default=["greenlet"],
                        choices=["greenlet", "threads"],
                        help="how (d)'s step bodies run (Note [smp step coroutines])")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="skip (a) and (b), the pipeline against torch.distributed.pipelining")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per row")
    parser.add_argument("--quick", action="store_true", help="3 measured steps, 1 warm-up")
    parser.add_argument("--output", type=Path, default=RESULTS)
    a = parser.parse_args(argv)
    cfg = {"microbatches": a.microbatches, "microbatch_size": a.microbatch_size,
           "schedules": a.schedules, "smp_schedules": a.smp_schedules,
           "smp_bodies": a.smp_bodies,
           "steps": 3 if a.quick else a.steps, "warmup": 1 if a.quick else 2}
    rows: list[dict[str, Any]] = []
    for p in ([] if a.no_pipeline else a.partitions):
        print(f"running p={p} ...", file=sys.stderr, flush=True)
        rows += _run_pipeline(p, cfg)
    smp_rows: list[dict[str, Any]] = []
    for p in ([] if a.no_smp else a.partitions):
        print(f"running smp p={p} ...", file=sys.stderr, flush=True)
        smp_rows += run_smp(p, cfg)
    if not a.no_overhead:
        print("running one-stage overhead ...", file=sys.stderr, flush=True)
    overhead = ([] if a.no_overhead
                else [_overhead(n, 10 if a.quick else 40) for n in ("mlp", "gpt2-tiny")])

    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    t = Table(title="(a) bubble and (b) step time vs torch.distributed.pipelining "
                    f"(MLP stack, microbatch {a.microbatch_size}, gloo, 1 thread/rank, "
                    f"{os.cpu_count()} CPUs)")
    for col in ("p", "m", "schedule", "bubble measured", "theory", "simulated", "ours ms",
                "torch ms", "ours/torch"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_measured']:.3f}",
                  f"{r['bubble_theory']:.3f}", f"{r['bubble_simulated']:.3f}",
                  f"{r['ours_step_ms']:.1f}", f"{r['torch_step_ms']:.1f}", f"{r['ratio']:.3f}")
    if rows:
        console.print(t)
    t2 = Table(title="(c) one-stage pipeline vs plain PyTorch training step (1 thread)")
    for col in ("model", "ours ms", "plain ms", "ours/plain"):
        t2.add_column(col, justify="right")
    for r in overhead:
        t2.add_row(r["model"], f"{r['ours_step_ms']:.2f}", f"{r['plain_step_ms']:.2f}",
                   f"{r['ratio']:.3f}")
    if overhead:
        console.print(t2)
    t3 = Table(title="(d) SMP loop (@smp.step) vs modelparallel.pipeline, same plan")
    for col in ("p", "m", "schedule", "bodies", "smp ms", "pipeline ms", "smp/pipeline",
                "late/pipeline", "smp bubble", "pipeline bubble", "difference"):
        t3.add_column(col, justify="right")
    for r in smp_rows:
        t3.add_row(str(r["p"]), str(r["m"]), r["schedule"], r["bodies"], f"{r['smp_step_ms']:.1f}",
                   f"{r['pipeline_step_ms']:.1f}", f"{r['ratio']:.3f}",
                   f"{r['late_ratio']:.3f}", f"{r['smp_bubble']:.3f}", f"{r['pipeline_bubble']:.3f}",
                   f"{r['bubble_difference']:+.3f}")
    if smp_rows:
        console.print(t3)
    result = {"versions": versions(), "config": cfg, "pipeline": rows, "one_stage": overhead,
              "smp": smp_rows,
              "goals": {"ours_over_torch": 1.0, "one_stage_over_plain": 1.03,
                        "smp_over_pipeline": 1.05, "smp_bubble_difference": 0.05}}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
