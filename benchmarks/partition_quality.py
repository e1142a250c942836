"""Planner benchmark: the ILP against the baselines and against a proven lower bound.

    python benchmarks/partition_quality.py                 # every model, p in {2, 4, 8}
    python benchmarks/partition_quality.py --quick         # GPT-2 small and ResNet-50, p in {2, 4}
    python benchmarks/partition_quality.py --models gpt2_small,unet_base --partitions 4,8
    python benchmarks/partition_quality.py --scale         # the scale rows only (below)
    python benchmarks/partition_quality.py --compare-communication   # direct vs relay per row

For each reference model (``modelparallel.models``: GPT-2 small and medium, BERT-base, a
Llama-style decoder, T5-small, ResNet-50, a UNet with long skips, an Inception-like CNN, and
two graphs of about 2,000 and 2,600 ops: GPT-2 XL (1.56B parameters) and a 48-layer Llama, both built
on the meta device) the model is traced once (``modelparallel.tracer.trace``, its example batch is ONE microbatch:
8 samples, text 8 x 512 tokens (T5: 512 encoder / 256 decoder tokens), images 8 x 3 x 224 x 224
(UNet 256 x 256)), costed on the built-in ``h100`` device spec (every stage an H100: 80 GiB,
NVLink-class link; roofline estimates, nothing runs on a GPU), and partitioned into p stages with
8 microbatches (a global batch of 64 samples), schedule 1F1B, Adam state, ``optimize="speed"``
(memory_weight 0.2) by every method of :func:`modelparallel.partitioner.compare`.

Per row and method: the objective (Note [objective] in modelparallel/partitioner/problem.py),
its ratio to the proven lower bound, the estimated bottleneck stage time per microbatch, the
largest stage's peak memory, and the solve time. The bar, checked per row:

- the ILP is never worse than any baseline (uniform, param_balanced, dp);
- the ILP's objective is within 2% of the proven lower bound (``BAR_GAP``; each row also
  records ``within_1pct``, the target of issue 17);
- the ILP's solve time is at most 10 s (``config.time_limit`` = 10 s) on this machine.

The scale rows (``--scale``; ``SCALE_ROWS``) plan graphs of 5,000 to 10,400 ops built by
``benchmarks/_scale_graphs.py`` (traced on the meta device once, then read from
``benchmarks/.cache``): a 96-layer and a 192-layer Llama-style decoder and ResNets of 200 and
1,000 bottleneck blocks at p = 16 (``time_limit`` 60 s; bar: within 2% of the bound in at most
60 s), and the 96-layer decoder at p = 32 on 16 H100 + 16 A100 (bar: a plan). Each runs in its
own process, so the row's ``peak_rss_mib`` (``resource.getrusage``) is the planner's own peak
memory (the graph read from the cache included).

Writes a rich table to stdout and ``benchmarks/results/partition_quality.json`` (versions,
device, machine, date, every row with its pass/fail per bar). With ``--compare-communication``
each row also plans with ``communication="relay"`` (Note [relay communication] in
``modelparallel/plan.py``; the default is direct sends, Note [direct communication]) and reports
the relay ILP's objective over the direct one (the same ``T_ref``, so also the ratio of their
bottleneck times), into ``benchmarks/results/partition_quality_communication.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from _common import versions

RESULTS = Path(__file__).resolve().parent / "results" / "partition_quality.json"
COMM_RESULTS = RESULTS.with_name("partition_quality_communication.json")

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2_small": ("gpt2", {"size": "small"}),
    "gpt2_medium": ("gpt2", {"size": "medium"}),
    "bert_base": ("bert", {"size": "base"}),
    "llama_small": ("llama", {"size": "small"}),
    "t5_small": ("t5", {"size": "small"}),
    "resnet50": ("resnet50", {}),
    "unet_base": ("unet", {"size": "base"}),
    "inception_base": ("inception", {"size": "base"}),
    # Real architectures of about 2,000 and 2,600 ops, built on the meta device (no weights).
    "gpt2_xl": ("gpt2", {"size": "xl", "device": "meta"}),
    "llama_deep": ("llama", {"size": "deep", "device": "meta"}),
}
QUICK_MODELS = ("gpt2_small", "resnet50")
#: (graph of _scale_graphs.load, partitions, devices, time limit s, bar on gap or None)
SCALE_ROWS: tuple[tuple[str, int, str, float, float | None], ...] = (
    ("decoder96", 16, "h100", 60.0, 0.02),
    ("decoder192", 16, "h100", 60.0, 0.02),
    ("resnet200", 16, "h100", 60.0, 0.02),
    ("resnet1000", 16, "h100", 60.0, 0.02),
    ("decoder96", 32, "16xh100,16xa100", 60.0, None),
)
METHODS = ("ilp", "dp", "uniform", "param_balanced")
DEVICE = "h100"
MICROBATCHES = 8
BAR_GAP = 0.02  # the main rows (issue 17 asks 1%: reported per row as within_1pct)
BAR_SECONDS = 10.0


def _trace(name: str) -> tuple[Any, int, dict[str, Any]]:
    """The model's IR graph, the samples per microbatch, and tracing facts."""
    from modelparallel import models
    from modelparallel.tracer import trace

    factory, kwargs = MODELS[name]
    t0 = time.perf_counter()
    case = getattr(models, factory)(**kwargs)
    traced = trace(case.model, case.args, case.kwargs)
    shapes = {f"arg{i}": list(a.shape) for i, a in enumerate(case.args) if hasattr(a, "shape")}
    shapes.update({k: list(v.shape) for k, v in case.kwargs.items() if hasattr(v, "shape")})
    batch = next(iter(shapes.values()))[0]
    graph = traced.graph
    return graph, batch, {"nodes": len(graph), "parameters": graph.num_parameters,
                          "tracer": traced.method, "input_shapes": shapes,
                          "trace_seconds": round(time.perf_counter() - t0, 2)}


def _devices(spec: str) -> Any:
    """``"h100"`` or ``"16xh100,16xa100"`` (one device name per stage)."""
    if "," not in spec and "x" not in spec:
        return spec
    return [name for part in spec.split(",") for k, name in [part.split("x", 1)]
            for _ in range(int(k))]


def _relay(graph: Any, config: Any, devices: Any, batch: int, direct: Any) -> dict[str, Any]:
    """The relay ILP plan of the same row, against the direct one."""
    import dataclasses

    from modelparallel.partitioner import partition

    plan = partition(graph, dataclasses.replace(config, communication="relay"), devices,
                     samples_per_microbatch=batch)
    d, r = direct.solver.objective, plan.solver.objective
    return {"objective": r, "lower_bound": plan.solver.lower_bound, "status": plan.solver.status,
            "bottleneck_ms": 1e3 * plan.pipeline.bottleneck_time,
            "solve_seconds": plan.solver.solve_time, "relay_over_direct": r / d,
            "direct_pairs": len(direct.boundaries),
            "direct_skip_pairs": sum(1 for b in direct.boundaries if b.dst > b.src + 1)}


def _row(name: str, graph: Any, batch: int, p: int, time_limit: float,
         devices: str = DEVICE, seconds_bar: float = BAR_SECONDS,
         relay: bool = False) -> dict[str, Any]:
    from modelparallel.partitioner import compare
    from modelparallel.plan import PlanConfig

    config = PlanConfig(partitions=p, microbatches=MICROBATCHES, schedule="1f1b",
                        optimize="speed", time_limit=time_limit)
    plans = compare(graph, config, _devices(devices), samples_per_microbatch=batch)
    ilp = plans["ilp"]
    bound = ilp.solver.lower_bound
    methods = {}
    for m, plan in plans.items():
        obj = plan.solver.objective
        methods[m] = {
            "objective": obj,
            "ratio_to_bound": obj / bound if bound else None,
            "bottleneck_ms": 1e3 * plan.pipeline.bottleneck_time,
            "step_ms": 1e3 * plan.pipeline.step_time,
            "peak_memory_gib": max(s.memory.peak for s in plan.stages) / 2**30,
            "solve_seconds": plan.solver.solve_time,
            "status": plan.solver.status,
        }
    baselines = {m: v["objective"] for m, v in methods.items() if m != "ilp"}
    missing = [m for m in METHODS if m not in plans]
    ilp_obj = methods["ilp"]["objective"]
    bar = {
        "never_worse_than_baselines": all(ilp_obj <= o * (1 + 1e-9) for o in baselines.values()),
        "within_2pct_of_bound": bound is not None and ilp_obj <= bound * (1 + BAR_GAP),
        "solve_time_le_10s": ilp.solver.solve_time <= seconds_bar,
    }
    row = {"model": name, "partitions": p, "devices": devices, "nodes": len(graph),
           "lower_bound": bound,
           "gap": ilp.solver.gap, "ilp_status": ilp.solver.status,
           "ilp_coarse_units": ilp.solver.coarse_nodes, "ilp_notes": list(ilp.solver.notes),
           "methods": methods, "infeasible_methods": missing, "bar": bar,
           "within_1pct": bound is not None and ilp_obj <= bound * 1.01,
           "passes": all(bar.values())}
    if relay:
        row["relay"] = _relay(graph, config, _devices(devices), batch, ilp)
    return row


def _print(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Partition quality on {DEVICE} (microbatch = one example batch, "
                        f"m = {MICROBATCHES}, 1F1B, memory_weight 0.2)")
    for col in ("model", "p", "nodes", "bound", "method", "objective", "x bound",
                "bottleneck ms", "peak GiB", "solve s", "bar"):
        table.add_column(col, justify="right" if col not in ("model", "method", "bar") else "left")
    for r in rows:
        first = True
        for m in METHODS:
            if m not in r["methods"]:
                continue
            v = r["methods"][m]
            bar = ""
            if m == "ilp":
                bar = "pass" if r["passes"] else "MISS: " + ", ".join(
                    k for k, ok in r["bar"].items() if not ok)
            ratio = v["ratio_to_bound"]
            table.add_row(r["model"] if first else "", str(r["partitions"]) if first else "",
                          str(r["nodes"]) if first else "",
                          f"{r['lower_bound']:.4f}" if first else "", m,
                          f"{v['objective']:.4f}", f"{ratio:.4f}" if ratio else "-",
                          f"{v['bottleneck_ms']:.3f}", f"{v['peak_memory_gib']:.2f}",
                          f"{v['solve_seconds']:.2f}", bar)
            first = False
        for m in r["infeasible_methods"]:
            table.add_row("", "", "", "", m, "no plan (over memory or pins)", "", "", "", "", "")
        table.add_section()
    Console(width=180).print(table)
    if any("relay" in r for r in rows):
        comm = Table(title="Direct sends (default) vs relaying: ILP objective per row")
        for col in ("model", "p", "direct", "relay", "relay / direct", "skip pairs", "status"):
            comm.add_column(col, justify="left" if col in ("model", "status") else "right")
        for r in rows:
            if "relay" in r:
                rl = r["relay"]
                comm.add_row(r["model"], str(r["partitions"]),
                             f"{r['methods']['ilp']['objective']:.4f}", f"{rl['objective']:.4f}",
                             f"{rl['relay_over_direct']:.4f}", str(rl["direct_skip_pairs"]),
                             f"{r['ilp_status']} / {rl['status']}")
        Console(width=180).print(comm)


def _scale_row(graph_name: str, p: int, devices: str, time_limit: float,
               bar: float | None) -> dict[str, Any]:
    """One scale row in this process (``--one``): the graph from the cache, every method."""
    import resource

    from _scale_graphs import load

    graph, load_s, cached = load(graph_name)
    row = _row(graph_name, graph, 8, p, time_limit, devices, seconds_bar=time_limit)
    bars = {"solve_time_le_60s": row["bar"].pop("solve_time_le_10s"),
            "never_worse_than_baselines": row["bar"]["never_worse_than_baselines"]}
    within = row["gap"] is not None and (bar is None or row["gap"] <= bar)
    bars["within_2pct_of_bound" if bar is not None else "planned"] = within or bar is None
    row["bar"] = bars
    row["passes"] = all(bars.values())
    row["graph_load_seconds"] = round(load_s, 2)
    row["graph_from_cache"] = cached
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _scale(rows: list[dict[str, Any]]) -> None:
    """Every scale row, each in its own process (its peak memory is the planner's)."""
    import subprocess

    for graph_name, p, devices, limit, bar in SCALE_ROWS:
        cmd = [sys.executable, __file__, "--one",
               json.dumps([graph_name, p, devices, limit, bar])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [x for x in out.stdout.splitlines() if x.startswith("ROW ")]
        if out.returncode != 0 or not lines:
            print(f"  {graph_name} p={p}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(lines[-1][4:])
        rows.append(row)
        ilp = row["methods"]["ilp"]
        print(f"  {graph_name} ({row['nodes']} nodes) p={p} on {devices}: ilp "
              f"{ilp['objective']:.4f}, gap {100 * row['gap']:.2f}% in "
              f"{ilp['solve_seconds']:.1f} s, peak {row['peak_rss_mib']:.0f} MiB: "
              f"{'pass' if row['passes'] else 'MISS'}", flush=True)


def _workers() -> int:
    """Threads the ILP's proof phases use here (Note [proof in pieces])."""
    from modelparallel.partitioner._pieces import WORKERS

    return WORKERS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None,
                    help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    ap.add_argument("--partitions", default=None, help="comma-separated (default: 2,4,8)")
    ap.add_argument("--quick", action="store_true",
                    help=f"only {', '.join(QUICK_MODELS)} with p in 2,4 (unless given)")
    ap.add_argument("--time-limit", type=float, default=BAR_SECONDS,
                    help="PlanConfig.time_limit in seconds (default 10)")
    ap.add_argument("--output", type=Path, default=None,
                    help=f"JSON path (default {RESULTS.name}, or {COMM_RESULTS.name} with "
                         "--compare-communication)")
    ap.add_argument("--compare-communication", action="store_true",
                    help="also plan every row with communication='relay' and report the ratio")
    ap.add_argument("--scale", action="store_true",
                    help="only the scale rows (graphs of 5,000-10,400 ops, p = 16 and 32), "
                         "merged into the output's rows")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.output is None:
        a.output = COMM_RESULTS if a.compare_communication else RESULTS
    if a.one is not None:  # one scale row, in a process of its own
        print("ROW " + json.dumps(_scale_row(*json.loads(a.one))), flush=True)
        return 0
    names = a.models.split(",") if a.models else list(QUICK_MODELS if a.quick else MODELS)
    unknown = [x for x in names if x not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    parts = [int(x) for x in a.partitions.split(",")] if a.partitions else (
        [2, 4] if a.quick else [2, 4, 8])
    rows: list[dict[str, Any]] = []
    traced: dict[str, Any] = {}
    previous = json.loads(a.output.read_text()) if a.output.exists() else {}
    if a.scale:
        _scale(rows)
        _print(rows)
        out = dict(previous, scale_rows=rows, scale_setup={
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": [dict(zip(("graph", "partitions", "devices", "time_limit_s", "gap_bar"), r))
                     for r in SCALE_ROWS], "versions": versions("transformers", "highspy")})
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(out, indent=1))
        print(f"{sum(r['passes'] for r in rows)} of {len(SCALE_ROWS)} scale rows meet the bar; "
              f"wrote {a.output}")
        return 0
    for name in names:
        graph, batch, facts = _trace(name)
        traced[name] = facts
        print(f"{name}: {facts['nodes']} nodes, {facts['parameters'] / 1e6:.1f} M parameters, "
              f"traced by {facts['tracer']} in {facts['trace_seconds']} s", flush=True)
        for p in parts:
            row = _row(name, graph, batch, p, a.time_limit, relay=a.compare_communication)
            rows.append(row)
            ilp = row["methods"]["ilp"]
            extra = (f"; relay x{row['relay']['relay_over_direct']:.4f}" if "relay" in row
                     else "")
            print(f"  p={p}: ilp {ilp['objective']:.4f} (x{ilp['ratio_to_bound']:.4f} bound) in "
                  f"{ilp['solve_seconds']:.1f} s: {'pass' if row['passes'] else 'MISS'}{extra}",
                  flush=True)
    _print(rows)
    misses = [f"{r['model']} p={r['partitions']}: " + ", ".join(
        k for k, ok in r["bar"].items() if not ok) for r in rows if not r["passes"]]
    print(f"{len(rows) - len(misses)} of {len(rows)} rows meet the bar")
    for m in misses:
        print(f"  MISS {m}")
    out = {
        "benchmark": "partition_quality",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "versions": versions("transformers", "PuLP", "highspy", "numpy"),
        "device": DEVICE,
        "setup": {"microbatches": MICROBATCHES, "schedule": "1f1b", "optimize": "speed",
                  "communication": "direct" + (" (and relay per row)"
                                               if a.compare_communication else ""),
                  "memory_weight": 0.2, "optimizer": "adam", "time_limit_s": a.time_limit,
                  "ilp_threads": _workers(),
                  "microbatch": "the model factory's example batch (8 samples)"},
        "bar": {"ilp_never_worse_than_baselines": True, "gap_to_bound": BAR_GAP,
                "solve_seconds": BAR_SECONDS},
        "models": traced,
        "rows": rows,
        "misses": misses,
    }
    for key in ("scale_rows", "scale_setup"):  # kept from the last --scale run
        if key in previous:
            out[key] = previous[key]
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
