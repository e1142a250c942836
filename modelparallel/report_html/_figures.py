"""The report's charts, drawn with plotly from the values of ``_model.py``.

One horizontal bar per timeline block (plotly's ``base`` puts it at its start) and stacked bars
for memory; plotly draws, hovers, zooms and exports them. Figures are returned as plotly
``Figure`` objects; the page embeds them without plotly's JavaScript, which the template inlines
once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modelparallel.report_html._model import MEMORY_KINDS, SENT_KIND, TimelineBlock
from modelparallel.units import format_bytes, format_seconds

__all__ = ["KIND_COLOURS", "KIND_LABELS", "memory_figure", "timeline_figure"]

#: Block colours by kind: the estimate's ``F``/``B`` and a trace's action kinds.
KIND_COLOURS = {
    "F": "#4c78a8", "B": "#f58518", "I": "#f58518", "W": "#e45756",
    "forward": "#4c78a8", "backward": "#f58518",
    "recv_wait": "#bab0ac", "send": "#54a24b", "grad_sync": "#b279a2",
}
#: Legend names by kind.
KIND_LABELS = {
    "F": "forward", "B": "backward", "I": "backward: input gradients",
    "W": "backward: weight gradients", "forward": "forward", "backward": "backward",
    "recv_wait": "waiting to receive", "send": "posting sends", "grad_sync": "gradient sync",
}
_MEMORY_COLOURS = ("#4c78a8", "#72b7b2", "#eeca3b", "#f58518", "#bab0ac", "#ff9da6")


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def timeline_figure(blocks: Sequence[TimelineBlock], lanes: Sequence[str], title: str,
                    *, marked_lane: int | None = None, lane_of: Sequence[int] | None = None,
                    kinds_of: Sequence[str] | None = None) -> Any:
    """A Gantt chart of ``blocks``: one lane per entry of ``lanes``, one bar per block.

    Args:
        blocks: The blocks; ``block.rank`` indexes ``lanes`` unless ``lane_of`` is given.
        lanes: Lane labels, top to bottom.
        title: Chart title.
        marked_lane: A lane to mark (the bottleneck), shaded.
        lane_of: Per block, its lane (for measured traces, where a lane is a rank).
        kinds_of: Per block, its kind for colour and legend (default ``block.kind``).
    """
    go = _go()
    fig = go.Figure()
    lane_idx = list(lane_of) if lane_of is not None else [b.rank for b in blocks]
    kinds = list(kinds_of) if kinds_of is not None else [b.kind for b in blocks]
    for kind in dict.fromkeys(kinds):
        pick = [i for i, k in enumerate(kinds) if k == kind]
        fig.add_trace(go.Bar(
            orientation="h", name=KIND_LABELS.get(kind, kind),
            y=[lanes[lane_idx[i]] for i in pick],
            base=[blocks[i].start * 1e3 for i in pick],
            x=[(blocks[i].end - blocks[i].start) * 1e3 for i in pick],
            text=[str(blocks[i].microbatch) if blocks[i].microbatch >= 0 else "" for i in pick],
            textposition="inside", insidetextanchor="middle",
            marker={"color": KIND_COLOURS.get(kind, "#888888"),
                    "line": {"color": "white", "width": 0.5}},
            customdata=[[KIND_LABELS.get(kind, kind), blocks[i].microbatch,
                         format_seconds(blocks[i].start), format_seconds(blocks[i].end),
                         format_seconds(blocks[i].end - blocks[i].start)] for i in pick],
            hovertemplate=("%{y}<br>%{customdata[0]} of microbatch %{customdata[1]}<br>"
                           "%{customdata[2]} → %{customdata[3]} (%{customdata[4]})"
                           "<extra></extra>")))
    if marked_lane is not None:
        fig.add_hrect(y0=marked_lane - 0.5, y1=marked_lane + 0.5, fillcolor="#e45756",
                      opacity=0.08, line_width=0, layer="below")
    fig.update_layout(
        title=title, barmode="overlay", bargap=0.25, height=90 + 42 * len(lanes),
        margin={"l": 10, "r": 10, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25},
        xaxis={"title": "ms from the start of the step", "rangemode": "tozero"},
        yaxis={"categoryorder": "array", "categoryarray": list(lanes), "autorange": "reversed"},
        uniformtext={"minsize": 8, "mode": "hide"})
    return fig


def memory_figure(rows: Sequence[dict[str, int]]) -> Any:
    """Stacked bars of each stage's peak memory by kind, with its device capacity.

    The capacity is a dashed marker per stage; buttons switch the axis between the stages'
    usage and the capacity (a small model uses a sliver of an accelerator).
    """
    go = _go()
    mib = 2**20
    stages = [f"stage {i}" for i in range(len(rows))]
    fig = go.Figure()
    for (kind, label), colour in zip((*MEMORY_KINDS, SENT_KIND), _MEMORY_COLOURS):
        fig.add_trace(go.Bar(
            name=label, x=stages, y=[r[kind] / mib for r in rows], marker_color=colour,
            customdata=[format_bytes(r[kind]) for r in rows],
            hovertemplate=f"%{{x}}<br>{label}: %{{customdata}}<extra></extra>"))
    caps = [r["capacity"] / mib for r in rows]
    fig.add_trace(go.Scatter(
        name="device capacity", x=stages, y=caps, mode="markers",
        marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3}, "color": "#e45756"},
        customdata=[format_bytes(r["capacity"]) for r in rows],
        hovertemplate="%{x}<br>capacity %{customdata}<extra></extra>"))
    peak = max((sum(r[k] for k, _ in (*MEMORY_KINDS, SENT_KIND)) / mib for r in rows),
               default=1.0) or 1.0
    top = max(caps, default=peak)
    fit, full = [0, peak * 1.15], [0, max(top, peak) * 1.05]
    start = full if peak > 0.2 * top else fit
    title = "Peak memory per stage"
    if start is fit:
        title += (f" (capacity {format_bytes(max(r['capacity'] for r in rows))} is off this "
                  "scale: 'show capacity' draws it)")
    fig.update_layout(
        title=title, barmode="stack", height=420,
        margin={"l": 10, "r": 10, "t": 70, "b": 40},
        yaxis={"title": "MiB", "range": start},
        legend={"orientation": "h", "y": -0.15, "traceorder": "normal"},
        updatemenus=[{"type": "buttons", "direction": "right", "x": 1, "xanchor": "right",
                      "y": 1.18, "buttons": [
                          {"label": "fit usage", "method": "relayout",
                           "args": [{"yaxis.range": fit}]},
                          {"label": "show capacity", "method": "relayout",
                           "args": [{"yaxis.range": full}]}]}])
    return fig
