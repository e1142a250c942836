"""Where the bubble goes: every rank's measured timeline of a pipeline step, against the
simulation of the same schedule with the same measured stage times (CPU, gloo).

    python benchmarks/bubble.py                      # p in {2, 4}, m in {4, 8, 16}, all schedules
    python benchmarks/bubble.py --partitions 2 --microbatches 8 --schedules 1f1b --steps 4
    python benchmarks/bubble.py --figures benchmarks/results/bubble_h200host_16cpu.json

The model and split are those of ``benchmarks/runtime.py`` (equal stages). Each configuration
runs in several *variants* of the runtime side by side in one job, each step timed on every
rank through the executor's public ``on_action`` hook (Note [action hook]): ``before``, the
receive of only the next action posted, the result broadcast after the last action and every
send and receive posted by the computing thread, as the runtime did before Note [receives
ahead], Note [early result] and Note [posting thread] (``modelparallel/runtime/``);
``ahead+early``, the first two of those; ``after``, all three; ``recv-thread``, only the
receives on the posting thread (sends on the computing thread); ``overlap`` and
``recv+overlap``, those two with rank 0's batch shared in the shadow of the first forward (Note
[batch overlapped] in ``modelparallel/runtime/batch.py``; the others share it before the
step). Per variant it reports:

- the measured bubble (``1 - compute / step``, as ``runtime.py`` measures it) and the simulated
  one (:func:`modelparallel.schedule.simulate` with the medians of the measured per-stage
  action times and the ping-pong latency of a boundary message);
- where each rank's step went: compute, waiting to receive (``recv_wait``), posting sends,
  sharing the batch at the start (``batch_wait``), the result exchange at the end
  (``result_wait``) and host time between them (``other``), as fractions of the step;
- the *effective latency* of a message on the critical path: from the end of the producing
  action (on the sending rank) to the end of the receiver's wait for it, over the waits that
  started before the message was produced (so the receiver was idle and the latency is all
  transport), median; against the ping-pong latency the simulation charges;
- the simulation charged with what the runtime costs on the host (``bubble_simulated_host``):
  the effective latency per message, and after each action the rank's measured host time per
  action (``send`` plus ``other``, over its actions; ``simulate(..., host_time=...)``). What
  the measured bubble exceeds it by is waiting the schedule does not explain.

Results: a table, ``benchmarks/results/bubble.json`` (``--output``), with one recorded step's
timelines of the ``p = 4, m = 8`` rows; ``--figures RESULT`` draws the SVG figures of
``docs/schedules.md`` from a result file (no processes) and prints its Markdown table.
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
from _bubble_figures import draw_figures
from _common import run_rank_processes, versions
from _timing import link_latency
from runtime import SCHEDULES, _batch, _mlp
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "bubble.json"
#: Runtime variants: (receive lookahead, early result, posting thread, batch overlapped with
#: the first forward); ``None``: the default lookahead.
VARIANTS: dict[str, tuple[int | None, bool, bool | str, bool]] = {
    "before": (1, False, False, False), "ahead+early": (None, True, False, False),
    "after": (None, True, True, False), "recv-thread": (None, True, "receives", False),
    "overlap": (None, True, True, True), "recv+overlap": (None, True, "receives", True)}
#: Rows whose timelines are kept in the result (for the figures).
TIMELINE_ROWS = {(4, 8)}
_COMPUTE = ("forward", "backward", "weight_backward")


class Recorder:
    """An ``on_action`` hook keeping ``(kind, stage, microbatch, start, end)`` of a step."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int | None, float, float]] = []
        self._open: list[float] = []

    def __call__(self, event: Any, phase: str) -> None:
        if phase == "start":
            self._open.append(time.perf_counter())
        else:
            self.events.append((event.kind, event.stage, event.microbatch, self._open.pop(),
                                time.perf_counter()))


def _job(rank: int, world: int, init_file: str, cfg: dict[str, Any], queue: Any) -> None:
    from modelparallel.codegen import build_stage
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import LOOKAHEAD, StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.tracer import trace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        mb = cfg["microbatch_size"]
        x0, _ = _batch(1, mb)
        traced = trace(_mlp(), (x0,))
        latency = link_latency(rank, torch.zeros(mb, 256))
        rows = []
        for m in cfg["microbatches"]:
            for label in cfg["schedules"]:
                schedule, v, _ = SCHEDULES[label]
                plan = partition(traced.graph, PlanConfig(partitions=world, virtual_stages=v,
                                                          schedule=schedule, microbatches=m),
                                 "cpu", method="uniform")
                progs = [build_stage(traced, plan, s) for s in range(rank, world * v, world)]
                x, y = _batch(m, mb, seed=m)
                runs = {}
                for variant in cfg["variants"]:
                    lookahead, early, thread, overlap = VARIANTS[variant]
                    rec = Recorder()
                    comm = StageComm.create(rank, list(range(world)), "cpu", 120.0,
                                            post_thread=thread)
                    ex = StageExecutor(progs, comm, loss_fn=nn.functional.mse_loss,
                                       schedule=schedule, on_action=rec,
                                       split=resolve_split(progs[0].input_names, m),
                                       lookahead=LOOKAHEAD if lookahead is None else lookahead,
                                       early_result=early)
                    ex.overlap_batch = overlap
                    steps = []
                    for i in range(cfg["warmup"] + cfg["steps"]):
                        for q in progs:
                            for p in q.module.parameters():
                                p.grad = None
                        dist.barrier()
                        rec.events.clear()
                        t0 = time.perf_counter()
                        ex.train_step([x], y, return_outputs=False)
                        t1 = time.perf_counter()
                        if i >= cfg["warmup"]:
                            steps.append({"t0": t0, "t1": t1, "events": list(rec.events)})
                    comm.teardown()
                    runs[variant] = steps
                rows.append({"m": m, "label": label, "schedule": schedule, "v": v,
                             "runs": runs})
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            queue.put([_analyse(world, [g[i] for g in gathered], latency)
                       for i in range(len(rows))])
    finally:
        dist.destroy_process_group()


def _analyse(p: int, per_rank: list[dict[str, Any]], latency: float) -> dict[str, Any]:
    """One configuration's figures from every rank's recorded steps."""
    from modelparallel.schedule import Action, make_schedule, simulate, theoretical_bubble

    row = per_rank[0]
    m, schedule, v = row["m"], row["schedule"], row["v"]
    n = p * v
    out: dict[str, Any] = {"p": p, "m": m, "schedule": row["label"],
                           "bubble_theory": theoretical_bubble(p, m, schedule, v),
                           "link_latency_ms": 1e3 * latency, "variants": {}}
    for variant in row["runs"]:
        steps = [r["runs"][variant] for r in per_rank]  # [rank][step]
        times: dict[tuple[int, str], list[float]] = {}
        parts: dict[str, list[float]] = {}
        busy, lat = [], []
        host: list[list[float]] = [[] for _ in steps]  # per rank, host seconds per action
        for k in range(len(steps[0])):
            ends: dict[tuple[int, str, int], float] = {}
            for rank_steps in steps:
                for kind, s, i, _t0, t1 in rank_steps[k]["events"]:
                    if kind in _COMPUTE:
                        letter = {"forward": "F", "backward": "B", "weight_backward": "W"}[kind]
                        ends[(s, "F" if letter == "F" else letter, i)] = t1
            for rank, rank_steps in enumerate(steps):
                st = rank_steps[k]
                span = st["t1"] - st["t0"]
                sums: dict[str, float] = {}
                events = st["events"]
                for j, (kind, s, _i, t0, t1) in enumerate(events):
                    sums[kind] = sums.get(kind, 0.0) + (t1 - t0)
                    if kind in _COMPUTE:
                        key = "W" if kind == "weight_backward" else (
                            "F" if kind == "forward" else "B")
                        times.setdefault((s, key), []).append(t1 - t0)
                    # the action the wait was for (a batch_wait may come between them)
                    nxt = (next((e for e in events[j + 1:] if e[0] in _COMPUTE), None)
                           if kind == "recv_wait" else None)
                    if nxt is not None:
                        act = Action(nxt[1], "F" if nxt[0] == "forward" else "B", nxt[2])
                        dep = (Action(act.stage - 1, "F", act.microbatch) if act.kind == "F"
                               else Action(act.stage + 1, "B", act.microbatch))
                        sent = ends.get((dep.stage, dep.kind, dep.microbatch))
                        if sent is not None and t0 <= sent:
                            lat.append(t1 - sent)
                compute = sum(sums.get(c, 0.0) for c in _COMPUTE)
                busy.append(compute / span)
                named = {"compute": compute, **{kk: sums.get(kk, 0.0) for kk in (
                    "recv_wait", "send", "batch_wait", "result_wait", "grad_sync")}}
                named["other"] = span - sum(named.values())
                actions = sum(1 for e in events if e[0] in _COMPUTE)
                host[rank].append((named["send"] + named["other"]) / max(actions, 1))
                for kk, val in named.items():
                    parts.setdefault(kk, []).append(val / span)
        med = {key: statistics.median(vals) for key, vals in times.items()}
        fwd = [med.get((s, "F"), 0.0) for s in range(n)]
        bwd = [med.get((s, "B"), 0.0) + med.get((s, "W"), 0.0) for s in range(n)]
        wf = [med.get((s, "W"), 0.0) / b if b > 0 else 0.0 for s, b in enumerate(bwd)]
        sched = make_schedule(schedule, p, m, v)
        sim = simulate(sched, fwd, bwd, comm_time=latency, wgrad_fraction=wf)
        eff = statistics.median(lat) if lat else latency
        sim_eff = simulate(sched, fwd, bwd, comm_time=eff, wgrad_fraction=wf)
        per_rank_host = [statistics.median(h) for h in host]
        sim_host = simulate(sched, fwd, bwd, comm_time=eff, wgrad_fraction=wf,
                            host_time=[per_rank_host[s % p] for s in range(n)])
        step_ms = statistics.median(max(st[k]["t1"] - st[k]["t0"] for st in steps)
                                    for k in range(len(steps[0])))
        entry = {
            "bubble_measured": 1.0 - statistics.mean(busy),
            "bubble_simulated": sim.bubble_fraction,
            "bubble_simulated_effective_latency": sim_eff.bubble_fraction,
            "bubble_simulated_host": sim_host.bubble_fraction,
            "host_ms_per_action": [1e3 * h for h in per_rank_host],
            "step_ms": 1e3 * step_ms, "simulated_step_ms": 1e3 * sim.makespan,
            "effective_latency_ms": 1e3 * eff, "latency_samples": len(lat),
            "breakdown": {kk: statistics.mean(vals) for kk, vals in parts.items()},
        }
        if (p, m) in TIMELINE_ROWS:
            last = [st[-1] for st in steps]
            origin = min(st["t0"] for st in last)
            entry["timeline"] = [
                {"t0": st["t0"] - origin, "t1": st["t1"] - origin,
                 "events": [(kind, s, i, t0 - origin, t1 - origin)
                            for kind, s, i, t0, t1 in st["events"]]} for st in last]
            entry["simulated_timeline"] = [
                [(str(e.action), e.start, e.end) for e in lane] for lane in sim.entries]
        out["variants"][variant] = entry
    return out


def _run(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return run_rank_processes(_job, world, lambda r, tmp: (r, world, os.path.join(tmp, "store"),
                                                          cfg), 3600)


def _table(rows: list[dict[str, Any]], variants: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"where the bubble goes (MLP stack, gloo, 1 thread/rank, {os.cpu_count()} "
                    "CPUs): measured - simulated bubble, per variant, and the step's parts")
    for col in ("p", "m", "schedule", "variant", "measured", "simulated", "excess",
                "sim@eff.lat", "sim+host", "host ms/act", "eff. lat ms", "ping-pong ms", "recv_wait", "send", "batch",
                "result", "other"):
        t.add_column(col, justify="right")
    for r in rows:
        for var in variants:
            e = r["variants"][var]
            b = e["breakdown"]
            t.add_row(str(r["p"]), str(r["m"]), r["schedule"], var,
                      f"{e['bubble_measured']:.3f}", f"{e['bubble_simulated']:.3f}",
                      f"{e['bubble_measured'] - e['bubble_simulated']:+.3f}",
                      f"{e['bubble_simulated_effective_latency']:.3f}",
                      f"{e['bubble_simulated_host']:.3f}" if "bubble_simulated_host" in e
                      else "-", f"{statistics.mean(e['host_ms_per_action']):.3f}"
                      if "host_ms_per_action" in e else "-",
                      f"{e['effective_latency_ms']:.3f}", f"{r['link_latency_ms']:.3f}",
                      *(f"{b[k]:.3f}" for k in ("recv_wait", "send", "batch_wait",
                                                "result_wait", "other")))
    Console(width=170).print(t)


def _markdown(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """The excess of the measured bubble over the simulated one, a Markdown table (a row per
    configuration, a column per variant), for ``docs/schedules.md``."""
    head = ["p", "m", "schedule", "theory", *(f"{v}: measured - simulated" for v in variants)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_theory']:.3f}"]
        for v in variants:
            e = r["variants"][v]
            cells.append(f"{e['bubble_measured']:.3f} - {e['bubble_simulated']:.3f} = "
                         f"**{e['bubble_measured'] - e['bubble_simulated']:+.3f}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--microbatch-size", type=int, default=16)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                        choices=list(SCHEDULES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=6, help="recorded steps per variant")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=None, metavar="RESULT",
                        help="only draw the figures of docs/schedules.md from RESULT")
    parser.add_argument("--figure-dir", type=Path,
                        default=Path(__file__).resolve().parent.parent / "docs" / "figures")
    a = parser.parse_args(argv)
    if a.figures is not None:
        result = json.loads(a.figures.read_text())
        for path in draw_figures(result, a.figure_dir):
            print(f"wrote {path}", file=sys.stderr)
        print(_markdown(result["rows"], list(result["config"]["variants"])))
        return 0
    cfg = {"microbatches": a.microbatches, "microbatch_size": a.microbatch_size,
           "schedules": a.schedules, "variants": a.variants, "steps": a.steps, "warmup": 2}
    rows: list[dict[str, Any]] = []
    for p in a.partitions:
        print(f"running p={p} ...", file=sys.stderr, flush=True)
        rows += _run(p, cfg)
    result = {"versions": versions(), "config": cfg, "rows": rows,
              "goal": {"measured_minus_simulated": 0.03}}
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result))
    print(f"wrote {a.output}", file=sys.stderr)
    _table(rows, a.variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
