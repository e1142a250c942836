"""Print the benchmark results in ``benchmarks/results/`` as the Markdown tables of the README.

    python benchmarks/summarize.py                  # every result file found
    python benchmarks/summarize.py partition_quality runtime

Each table is read from a result JSON written by one of the benchmark scripts, so the README's
tables can be regenerated after a new run instead of edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def partition_quality(data: dict[str, Any]) -> str:
    """ILP against the baselines and the proven bound, one row per model and p."""
    methods = ("ilp", "dp", "param_balanced", "uniform")
    rows = []
    for r in data["rows"]:
        m = r["methods"]
        cells = [r["model"], str(r["partitions"]), str(r["nodes"])]
        for k in methods:
            cells.append(f"{m[k]['ratio_to_bound']:.3f}" if k in m and m[k].get("ratio_to_bound")
                         else "infeasible")
        cells += [f"{m['ilp']['bottleneck_ms']:.2f}", f"{m['ilp']['peak_memory_gib']:.1f}",
                  f"{m['ilp']['solve_seconds']:.1f}", "yes" if r["passes"] else "**no**"]
        rows.append(cells)
    head = ["model", "p", "nodes", "ILP / bound", "DP / bound", "param-balanced / bound",
            "uniform / bound", "ILP bottleneck ms", "ILP peak GiB", "solve s", "bar"]
    misses = data.get("misses") or []
    tail = f"\n\n{len(data['rows']) - len(misses)}/{len(data['rows'])} rows meet the bar."
    return _table(head, rows) + tail


def runtime(data: dict[str, Any]) -> str:
    """Bubble and step time against torch.distributed.pipelining; one stage against plain."""
    rows = [[str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_theory']:.3f}",
             f"{r['bubble_simulated']:.3f}", f"{r['bubble_measured']:.3f}",
             f"{r['ours_step_ms']:.1f}", f"{r['torch_step_ms']:.1f}", f"{r['ratio']:.3f}"]
            for r in data["pipeline"]]
    head = ["p", "m", "schedule", "bubble theory", "simulated", "measured", "ours ms",
            "torch.distributed.pipelining ms", "ratio"]
    one = [[r["model"], f"{r['plain_step_ms']:.2f}", f"{r['ours_step_ms']:.2f}",
            f"{r['ratio']:.3f}"] for r in data["one_stage"]]
    return (_table(head, rows) + "\n\npartitions=1 against plain PyTorch:\n\n"
            + _table(["model", "plain ms", "ours ms", "ratio"], one))


def fidelity(data: dict[str, Any]) -> str:
    """Predicted against measured time and memory per stage on the GPU."""
    rows = []
    for res in data["models"]:
        for s in res["stages"]:
            rows.append([res["model"], str(s["stage"]),
                         f"{s['measured_ms']:.2f} ({s['measured_device_ms']:.2f})",
                         f"{s['roofline_ms']:.2f} ({_pct(s['roofline_error'])})",
                         f"{s['roofline_calibrated_ms']:.2f} "
                         f"({_pct(s['roofline_calibrated_error'])})",
                         f"{s['profiled_ms']:.2f} ({_pct(s['profiled_error'])})",
                         f"{s['memory_measured_bytes'] / 2**30:.2f}",
                         f"{s['memory_predicted_bytes'] / 2**30:.2f} "
                         f"({_pct(s['memory_error'])})"])
    head = ["model", "stage", "measured ms (device only)", "roofline h100", "roofline calibrated",
            "profiled", "memory measured GiB", "predicted GiB"]
    summ = data["summary"]
    srows = [[k, f"{100 * v['median']:.1f}%", f"{100 * v['worst']:.1f}%"]
             for k, v in summ.items()]
    return (f"{data['device']}, {data['dtype']}, {data['partitions']} stages, "
            f"{data['schedule']}:\n\n" + _table(head, rows) + "\n\n"
            + _table(["prediction", "median abs. error", "worst"], srows))


def gpu_overhead(data: dict[str, Any]) -> str:
    """partitions=1 against plain PyTorch on the GPU."""
    rows = [[r["model"], f"{r['batch_size']} x {r['sample']}", f"{r['plain_step_ms']:.2f}",
             f"{r['ours_step_ms']:.2f}", f"{r['ratio']:.3f}"] for r in data["models"]]
    return (f"{data['device']}, {data['dtype']}, {data['optimizer']}:\n\n"
            + _table(["model", "batch", "plain ms", "ours ms", "ratio"], rows))


def multigpu(data: dict[str, Any]) -> str:
    """Throughput of each plan and of torch.distributed.pipelining on several GPUs."""
    rows = []
    for c in data["configs"]:
        ours, theirs = c.get("ours") or {}, c.get("torch") or {}
        if c.get("status") != "ok" or not ours:
            rows.append([c["method"], c["schedule"], str(c["m"]), str(c.get("status"))]
                        + [""] * 7)
            continue
        mem = max(zip(ours["peak_bytes_predicted"], ours["peak_bytes_measured"]),
                  key=lambda pm: pm[1])
        rows.append([c["method"], c["schedule"], str(c["m"]), "ok",
                     f"{ours['tokens_per_s']:,.0f}",
                     f"{theirs['tokens_per_s']:,.0f}" if theirs.get("tokens_per_s") else "",
                     f"{c['ours_over_torch_tokens_per_s']:.3f}"
                     if c.get("ours_over_torch_tokens_per_s") else "",
                     f"{ours['bubble_measured']:.3f} / {c['bubble_theory']:.3f}",
                     f"{1e3 * ours['predicted_step_s']:.0f} / {1e3 * ours['pipeline_step_s']:.0f}",
                     f"{mem[0] / 2**30:.1f} / {mem[1] / 2**30:.1f}"])
    head = ["method", "schedule", "m", "status", "tokens/s ours", "tokens/s torch",
            "ours / torch", "bubble measured / theory", "step ms predicted / measured",
            "peak GiB predicted / measured (fullest GPU)"]
    return (f"{data['device']} x {data['gpus']}, {data['model']['name']}, {data['dtype']}:\n\n"
            + _table(head, rows))


_KINDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "partition_quality": partition_quality, "runtime": runtime,
    "cost_model_fidelity": fidelity, "gpu_overhead": gpu_overhead, "multigpu": multigpu}


def _kind(path: Path) -> str | None:
    for k in sorted(_KINDS, key=len, reverse=True):
        if path.stem.startswith(k) and not path.stem.endswith(".raw"):
            return k
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="result kinds to print (default: all)")
    a = parser.parse_args(argv)
    for path in sorted(RESULTS.glob("*.json")):
        kind = _kind(path)
        if kind is None or (a.only and kind not in a.only):
            continue
        print(f"### {path.name}\n")
        print(_KINDS[kind](json.loads(path.read_text())))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
