"""``partition-plan report``: the plan (and optionally a measured trace) as one HTML page."""

from __future__ import annotations

import argparse
from typing import Any

__all__: list[str] = []


def _add_report_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="write a self-contained HTML report of a plan")
    r.add_argument("plan", help="plan JSON file")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write")
    r.add_argument("--trace", default=None, metavar="TRACE.json",
                   help="a measured step trace (pipeline(..., trace=DIR)) to draw under the "
                        "estimate")
    r.add_argument("--depth", type=int, default=None,
                   help="module-path depth of the graph view (default: the deepest readable)")
    r.set_defaults(func=_cmd_report)


def _cmd_report(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.plan import load_plan
    from modelparallel.report_html import write_report

    plan = load_plan(a.plan)
    trace = None
    if a.trace:
        from modelparallel.step_trace import load_trace

        trace = load_trace(a.trace)
    out = write_report(plan, a.output, trace=trace, depth=a.depth)
    err.print(f"wrote {out}")
    return 0
