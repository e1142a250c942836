"""Direct sends against relaying, measured: step time of a pipeline whose stages read a value
produced several stages earlier, run both ways side by side in one job (CPU, gloo).

    python benchmarks/direct_sends.py                 # p = 4, m = 8, 1F1B and GPipe (seconds)
    python benchmarks/direct_sends.py --partitions 3 --schedules 1f1b --steps 6

The model (``SkipStack``) embeds its input once and feeds the embedding to every later block
as well (as T5's encoder output reaches every decoder layer, or a UNet's long skips): each
block computes ``tanh(W h) + e``. With ``communication="direct"`` the stage holding the
embedding sends it once to every later stage (Note [direct communication] in
``modelparallel/plan.py``); with ``"relay"`` every stage in between receives it and sends it
on (Note [relay communication]). Both plans place the same nodes on the same stages (the
planner's plan under direct sends, evaluated again under relaying), so only the communication
differs. The modes alternate round by round in one process group; the figure is the median
over the rounds of each mode's step time (the slowest rank's), and the ratio relay / direct
(above 1: direct sends are faster). Bytes: activations sent per microbatch by all stages
(gradients the same back), from the plans' boundary tables.

Results: a table, and ``benchmarks/results/direct_sends.json`` (``--output``).
"""

from __future__ import annotations

import argparse
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
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "direct_sends.json"
MODES = ("direct", "relay")


class SkipStack(nn.Module):
    """An embedding read by every block: ``h = tanh(W_k h) + e`` for ``k = 1..depth``."""

    def __init__(self, width: int = 512, depth: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        h = e
        for block in self.blocks:
            h = torch.tanh(block(h)) + e
        return self.head(h)


def _plans(traced: Any, world: int, m: int, schedule: str) -> dict[str, Any]:
    """The planner's direct plan, and the same placement evaluated under relaying."""
    from modelparallel.partitioner import evaluate_assignment, partition
    from modelparallel.plan import PlanConfig

    cfg = PlanConfig(partitions=world, microbatches=m, schedule=schedule, time_limit=5.0)
    direct = partition(traced.graph, cfg, "cpu")
    relay_cfg = PlanConfig(partitions=world, microbatches=m, schedule=schedule,
                           communication="relay")
    relay = evaluate_assignment(traced.graph, relay_cfg, "cpu", dict(direct.assignment))
    return {"direct": direct, "relay": relay}


def _job(rank: int, world: int, init_file: str, cfg: dict[str, Any], queue: Any) -> None:
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.tracer import trace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        m, mb, width = cfg["microbatches"], cfg["microbatch_size"], cfg["width"]
        torch.manual_seed(0)
        model = SkipStack(width, cfg["depth"])
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(m * mb, width, generator=g), torch.randn(m * mb, width, generator=g)
        traced = trace(model, (x[:mb],))
        rows = []
        for schedule in cfg["schedules"]:
            plans = _plans(traced, world, m, schedule)
            runs: dict[str, Any] = {}
            for mode in MODES:
                prog = build_stage(traced, plans[mode], rank)
                comm = StageComm.create(rank, list(range(world)), "cpu", 120.0)
                ex = StageExecutor(prog, comm, loss_fn=nn.functional.mse_loss,
                                   schedule=schedule, split=resolve_split(prog.input_names, m))
                runs[mode] = {"ex": ex, "comm": comm, "prog": prog, "steps": []}
            for i in range(cfg["warmup"] + cfg["steps"]):
                for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                    run = runs[mode]
                    for p in run["prog"].module.parameters():
                        p.grad = None
                    dist.barrier()
                    t0 = time.perf_counter()
                    run["ex"].train_step([x], y, return_outputs=False)
                    if i >= cfg["warmup"]:
                        run["steps"].append(time.perf_counter() - t0)
            for run in runs.values():
                run["comm"].teardown()
            rows.append({"schedule": schedule, "steps": {k: r["steps"] for k, r in runs.items()},
                         "plans": {k: _plan_figures(plans[k]) for k in MODES}})
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            queue.put([_merge(world, cfg, [g[j] for g in gathered]) for j in range(len(rows))])
    finally:
        dist.destroy_process_group()


def _plan_figures(plan: Any) -> dict[str, Any]:
    return {"pairs": [[b.src, b.dst] for b in plan.boundaries],
            "forward_bytes": sum(b.forward_bytes for b in plan.boundaries),
            "bottleneck_ms": 1e3 * plan.pipeline.bottleneck_time,
            "step_ms_estimated": 1e3 * plan.pipeline.step_time}


def _merge(world: int, cfg: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    row = per_rank[0]
    out: dict[str, Any] = {"p": world, "m": cfg["microbatches"], "schedule": row["schedule"]}
    for mode in MODES:
        steps = [max(r["steps"][mode][k] for r in per_rank)
                 for k in range(len(row["steps"][mode]))]
        out[mode] = {"step_ms": 1e3 * statistics.median(steps),
                     "step_ms_all": [1e3 * s for s in steps], **row["plans"][mode]}
    out["relay_over_direct"] = out["relay"]["step_ms"] / out["direct"]["step_ms"]
    return out


def _run(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return list(run_rank_processes(
        _job, world, lambda r, tmp: (r, world, os.path.join(tmp, "store"), cfg), 1800))


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"direct sends against relaying (SkipStack, gloo, 1 thread/rank, "
                    f"{os.cpu_count()} CPUs)")
    for col in ("p", "m", "schedule", "direct ms", "relay ms", "relay / direct",
                "direct bytes/mb", "relay bytes/mb", "pairs (direct)"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["p"]), str(r["m"]), r["schedule"], f"{r['direct']['step_ms']:.1f}",
                  f"{r['relay']['step_ms']:.1f}", f"{r['relay_over_direct']:.3f}",
                  f"{r['direct']['forward_bytes'] / 2**10:.0f} KiB",
                  f"{r['relay']['forward_bytes'] / 2**10:.0f} KiB",
                  " ".join(f"{a}→{b}" for a, b in r["direct"]["pairs"]))
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[4])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"],
                        choices=["gpipe", "1f1b", "zb-h1"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--output", type=Path, default=RESULTS)
    a = parser.parse_args(argv)
    cfg = {"microbatches": a.microbatches, "microbatch_size": a.microbatch_size,
           "width": a.width, "depth": a.depth, "schedules": a.schedules, "steps": a.steps,
           "warmup": 2}
    rows: list[dict[str, Any]] = []
    for p in a.partitions:
        print(f"running p={p} ...", file=sys.stderr, flush=True)
        rows += _run(p, cfg)
    result = {"versions": versions(), "config": cfg, "rows": rows}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.output}", file=sys.stderr)
    _table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
