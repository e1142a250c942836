"""SVG figures of ``benchmarks/bubble.py`` results (for ``docs/schedules.md``), with no plotting
library: per-rank timelines of one measured step beside the simulated one, and the excess of the
measured bubble over the simulated one per configuration.

``benchmarks/`` is not a package: import it as ``from _bubble_figures import draw_figures``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["draw_figures"]

COLOURS = {"forward": "#4c78a8", "backward": "#f58518", "weight_backward": "#e45756",
           "recv_wait": "#d9d4d0", "send": "#54a24b", "batch_wait": "#9467bd",
           "result_wait": "#b279a2", "grad_sync": "#8c564b",
           "F": "#4c78a8", "B": "#f58518", "I": "#f58518", "W": "#e45756"}
LABELS = {"forward": "forward", "backward": "backward (ZB-H1: input gradients)",
          "weight_backward": "weight gradients (W)", "recv_wait": "waiting to receive",
          "send": "posting sends", "batch_wait": "sharing the batch",
          "result_wait": "result exchange"}


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str = "") -> str:
    tip = f"<title>{title}</title>" if title else ""
    return (f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.3):.2f}" height="{h:.2f}" '
            f'fill="{fill}">{tip}</rect>')


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "start") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-family="sans-serif" '
            f'text-anchor="{anchor}">{s}</text>')


def _timelines(row: dict[str, Any], variants: list[str]) -> str:
    """Lanes: per variant the measured ranks, then the simulated ranks."""
    p = row["p"]
    width, left, lane, gap = 900.0, 130.0, 14.0, 22.0
    blocks = []
    span = max(max(st["t1"] for st in row["variants"][v]["timeline"]) for v in variants)
    scale = (width - left - 10) / span
    y = 30.0
    title = (f"p = {p}, m = {row['m']}, {row['schedule']}: one measured step per variant "
             "and the simulation (same time axis)")
    blocks.append(_text(8, 16, title, 13))
    groups = [(f"measured, {v}", row["variants"][v]["timeline"], False) for v in variants]
    groups.append(("simulated", row["variants"][variants[-1]]["simulated_timeline"], True))
    for name, lanes, simulated in groups:
        blocks.append(_text(8, y + lane - 3, name, 11))
        y += gap - 6
        for r in range(p):
            blocks.append(_text(left - 6, y + lane - 3, f"rank {r}", 10, "end"))
            if simulated:
                for act, t0, t1 in lanes[r]:
                    letter = next(c for c in act if c.isalpha())
                    blocks.append(_rect(left + t0 * scale, y, (t1 - t0) * scale, lane,
                                        COLOURS[letter], act))
            else:
                st = lanes[r]
                blocks.append(_rect(left + st["t0"] * scale, y + lane / 2 - 0.5,
                                    (st["t1"] - st["t0"]) * scale, 1.0, "#888888"))
                for kind, s, i, t0, t1 in st["events"]:
                    if kind in COLOURS:
                        blocks.append(_rect(left + t0 * scale, y, (t1 - t0) * scale, lane,
                                            COLOURS[kind], f"{kind} stage {s} mb {i}"))
            y += lane + 2
        y += 8
    ticks = 5
    for k in range(ticks + 1):
        t = span * k / ticks
        blocks.append(_text(left + t * scale, y + 10, f"{1e3 * t:.1f} ms", 9, "middle"))
    y += 24
    x = left
    for kind in ("forward", "backward", "weight_backward", "recv_wait", "send", "batch_wait",
                 "result_wait"):
        blocks.append(_rect(x, y - 9, 10, 10, COLOURS[kind]))
        blocks.append(_text(x + 14, y, LABELS[kind], 10))
        x += 14 + 6.2 * len(LABELS[kind]) + 12
    height = y + 12
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(blocks)}</svg>\n')


def _excess(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """Bars: measured minus simulated bubble per row and variant, the 0.03 goal drawn."""
    width, left, top, height = 900.0, 50.0, 30.0, 220.0
    vals = [r["variants"][v]["bubble_measured"] - r["variants"][v]["bubble_simulated"]
            for r in rows for v in variants]
    hi = max(0.05, max(vals) * 1.1)
    lo = min(0.0, min(vals) * 1.1)
    scale = height / (hi - lo)
    zero = top + hi * scale
    group = (width - left - 10) / len(rows)
    bar = group * 0.8 / len(variants)
    fills = ["#bab0ac", "#4c78a8", "#54a24b", "#f58518"]
    out = [_text(8, 16, "measured minus simulated bubble (goal: at most 0.03, dashed)", 13)]
    goal = zero - 0.03 * scale
    out.append(f'<line x1="{left}" x2="{width - 10}" y1="{goal:.1f}" y2="{goal:.1f}" '
               'stroke="#e45756" stroke-dasharray="4 3"/>')
    out.append(f'<line x1="{left}" x2="{width - 10}" y1="{zero:.1f}" y2="{zero:.1f}" '
               'stroke="#444"/>')
    for k in range(0, int(hi * 100) + 1, 5):
        yy = zero - k / 100 * scale
        out.append(_text(left - 4, yy + 3, f"{k / 100:.2f}", 9, "end"))
    for j, r in enumerate(rows):
        x0 = left + j * group + group * 0.1
        for q, v in enumerate(variants):
            e = r["variants"][v]
            d = e["bubble_measured"] - e["bubble_simulated"]
            yy, hh = (zero - d * scale, d * scale) if d >= 0 else (zero, -d * scale)
            out.append(_rect(x0 + q * bar, yy, bar - 1, hh, fills[q % len(fills)],
                             f"{r['schedule']} p={r['p']} m={r['m']} {v}: {d:+.3f}"))
        out.append(f'<text font-size="8" font-family="sans-serif" transform="translate('
                   f'{x0 + group * 0.4:.1f},{top + height + 8:.1f}) rotate(60)">'
                   f'{r["schedule"]} p{r["p"]} m{r["m"]}</text>')
    y = top + height + 70
    for q, v in enumerate(variants):
        out.append(_rect(left + q * 120, y - 9, 10, 10, fills[q % len(fills)]))
        out.append(_text(left + q * 120 + 14, y, v, 10))
    h = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{h:.0f}" '
            f'viewBox="0 0 {width:.0f} {h:.0f}"><rect width="100%" height="100%" '
            f'fill="white"/>{"".join(out)}</svg>\n')


def draw_figures(result: dict[str, Any], directory: Path) -> list[Path]:
    """Write the figures of a ``bubble.py`` result into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    variants = list(result["config"]["variants"])
    written = []
    path = directory / "bubble_excess.svg"
    path.write_text(_excess(rows, variants))
    written.append(path)
    for row in rows:
        if all("timeline" in row["variants"][v] for v in variants):
            path = directory / f"bubble_timeline_p{row['p']}_m{row['m']}_{row['schedule']}.svg"
            path.write_text(_timelines(row, variants))
            written.append(path)
    return written
