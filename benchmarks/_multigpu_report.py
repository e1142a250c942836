"""The printed report of the multi-GPU benchmark (``benchmarks/multigpu.py``): ratios, the rich
table and its markdown copy."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["HEADER", "print_report", "ratios", "table_rows"]

_GiB = 2**30


def ratios(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of the ILP plan over each baseline, and ours over torch, per (schedule, m)."""
    ok = {(r["method"], r["schedule"], r["m"]): r for r in records if r.get("status") == "ok"}
    out: dict[str, Any] = {"ilp_over": {}, "ours_over_torch": {}}
    for (method, schedule, m), r in sorted(ok.items()):
        key = f"{schedule}/m={m}"
        if method == "ilp":
            for base in ("param_balanced", "uniform"):
                b = ok.get((base, schedule, m))
                if b is not None:
                    out["ilp_over"].setdefault(base, {})[key] = (
                        r["ours"]["tokens_per_s"] / b["ours"]["tokens_per_s"])
        if "ours_over_torch_tokens_per_s" in r:
            out["ours_over_torch"].setdefault(method, {})[key] = r["ours_over_torch_tokens_per_s"]
    return out


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / _GiB:.1f}"


def table_rows(records: Sequence[dict[str, Any]]) -> Iterator[list[str]]:
    """One row per configuration for the printed tables."""
    for r in records:
        head = [r["method"], r["schedule"], str(r["m"])]
        if r.get("status") != "ok":
            why = r.get("reason") or "; ".join(e for e in r.get("errors", []) if e)
            yield [*head, r.get("status", "?"), why[:60], *[""] * 8]
            continue
        o, t = r["ours"], r.get("torch", {})
        mem_m = [x for x in o["peak_bytes_measured"] if x is not None]
        yield [*head, "ok", f"{o['tokens_per_s']:,.0f}",
               f"{t['tokens_per_s']:,.0f}" if "tokens_per_s" in t else
               ("skipped" if "skipped" in t else "error"),
               f"{r['ours_over_torch_tokens_per_s']:.3f}"
               if "ours_over_torch_tokens_per_s" in r else "-",
               f"{o['bubble_measured']:.3f}", f"{r['bubble_theory']:.3f}",
               f"{1e3 * o['predicted_step_s']:.0f}", f"{1e3 * o['pipeline_step_s']:.0f}",
               f"{100 * o['step_error']:+.0f}%",
               f"{_gib(max(o['peak_bytes_predicted']))} / {_gib(max(mem_m) if mem_m else None)}"]


HEADER = ["method", "schedule", "m", "status", "tokens/s ours", "tokens/s torch", "ours/torch",
          "bubble", "theory", "pred ms", "meas ms", "err", "peak GiB pred/meas"]


def print_report(result: dict[str, Any]) -> None:
    """The rich table, the ratios and a markdown copy of the table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=(f"{result['model']['name']} on {result['gpus']} x {result['device']} "
                     f"({result['backend']}), {result['dtype']}, microbatch "
                     f"{result['microbatch_size']} x {result['model']['seq_len']} tokens"))
    for col in HEADER:
        t.add_column(col, justify="right")
    rows = list(table_rows(result["configs"]))
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print_json(json.dumps(result["summary"]))
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row) + " |")
