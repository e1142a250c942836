"""``partition-plan report``: one self-contained HTML page of a plan, and of measured steps.

The page shows the estimated pipeline timeline of the plan's schedule and of the other one
(plotly), each stage's peak memory by kind against its device's capacity (plotly), the model
graph collapsed by module path and coloured by stage (cytoscape.js with the dagre layout; Note
[module groups] in ``_model.py``) whose nodes show, on hover or click, what ``partition-plan
inspect --node`` explains, and the stage, boundary and solver tables. With a measured trace
(:mod:`modelparallel.step_trace`) it also draws the measured timeline under the estimated one
with a per-stage table of predicted against measured time.

Every script the page needs is inlined (plotly's bundle, and the vendored cytoscape, dagre and
cytoscape-dagre in ``vendor/``, MIT licensed, ``vendor/LICENSES.txt``), so it opens with no
network. Like :mod:`modelparallel.report` it reads the plan alone and imports no deep-learning
framework; it needs the ``report`` extra (plotly, jinja2).

Example:
    >>> from modelparallel.report_html import write_report  # doctest: +SKIP
    >>> write_report(load_plan("plan.json"), "report.html")  # doctest: +SKIP
    PosixPath('report.html')
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from modelparallel.errors import MissingDependencyError
from modelparallel.plan import Plan
from modelparallel.report import explain_node
from modelparallel.report_html._model import (
    MEMORY_KINDS,
    SENT_KIND,
    lane_labels,
    memory_rows,
    module_graph,
    other_schedules,
    simulate_plan,
    timeline_blocks,
)
from modelparallel.units import format_bytes, format_count, format_seconds

__all__ = ["render_report", "write_report"]

_HERE = Path(__file__).resolve().parent
_VENDOR = ("cytoscape.min.js", "dagre.min.js", "cytoscape-dagre.js")
#: Plans with more nodes than this get ``inspect --node`` explanations only for the nodes whose
#: values cross a boundary (the page stays a few MB).
_EXPLAIN_ALL_BELOW = 5000
_STAGE_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2",
                  "#ff9da6", "#9d755d", "#79706e")


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"the HTML report needs {module.split('.')[0]}, which is not installed; install the "
            "report extra: pip install 'modelparallel[report]'") from e


def stage_colour(stage: int) -> str:
    """The colour of ``stage`` in every view of the report (grey for input-derived nodes)."""
    return "#9e9e9e" if stage < 0 else _STAGE_COLOURS[stage % len(_STAGE_COLOURS)]


def _figure_html(fig: Any, div_id: str) -> str:
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                           config={"displaylogo": False, "responsive": True}))


def _json_script(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">``."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _explanations(plan: Plan, names: set[str] | None) -> dict[str, list[str]]:
    return {n.name: explain_node(plan, n.name) for n in plan.nodes
            if names is None or n.name in names}


def _graph_data(plan: Plan, depth: int | None) -> dict[str, Any]:
    used, groups, edges = module_graph(plan, depth)
    crossing = {v for b in plan.boundaries for v in b.values}
    explain = _explanations(plan, None if len(plan.nodes) < _EXPLAIN_ALL_BELOW else crossing)
    by_name = {n.name: n for n in plan.nodes}
    return {
        "depth": used,
        "groups": [{
            "id": g.id, "label": g.label, "stage": g.stage, "colour": stage_colour(g.stage),
            "summary": (f"{g.label}: stage {g.stage if g.stage >= 0 else 'every (input-derived)'}"
                        f", {len(g.nodes)} nodes, forward {format_seconds(g.forward_time)}, "
                        f"backward {format_seconds(g.backward_time)}, parameters "
                        f"{format_bytes(g.param_bytes)}, saves {format_bytes(g.saved_bytes)} "
                        "per microbatch"),
            "nodes": [[name, by_name[name].target] for name in g.nodes],
        } for g in groups],
        "edges": [{"source": e.source, "target": e.target, "boundary": e.boundary,
                   "label": format_bytes(e.bytes) if e.boundary else "",
                   "values": list(e.values[:8]) + ([f"… +{len(e.values) - 8}"]
                                                   if len(e.values) > 8 else [])}
                  for e in edges],
        "explain": explain,
    }


def _tables(plan: Plan) -> dict[str, Any]:
    pipe, s = plan.pipeline, plan.solver
    stages = [{
        "stage": st.index, "device": st.device, "nodes": st.num_nodes,
        "params": format_count(st.num_parameters),
        "peak": format_bytes(st.memory.peak),
        "of_capacity": f"{100 * st.memory.peak / st.capacity_bytes:.1f}%",
        "capacity": format_bytes(st.capacity_bytes), "inflight": st.inflight_microbatches,
        "fwd": format_seconds(st.forward_time), "bwd": format_seconds(st.backward_time),
        "comm": format_seconds(st.comm_time), "total": format_seconds(st.total_time),
        "bottleneck": st.index == pipe.bottleneck_stage,
        "colour": stage_colour(st.index),
    } for st in plan.stages]
    boundaries = [{
        "boundary": f"{b.src}→{b.dst}", "count": len(b.values),
        "forward": format_bytes(b.forward_bytes), "backward": format_bytes(b.backward_bytes),
        "time": format_seconds(b.time), "crossing": ", ".join(b.values),
    } for b in plan.boundaries]
    solver = [
        ("method", s.method + (f" ({s.solver})" if s.solver else "")),
        ("status", s.status), ("objective", f"{s.objective:.6g}"),
        ("lower bound", "n/a" if s.lower_bound is None else f"{s.lower_bound:.6g}"),
        ("gap", "n/a" if s.gap is None else f"{100 * s.gap:.2f}%"),
        ("solve time", f"{s.solve_time:.2f} s"),
        ("coarse units", str(s.coarse_nodes) if s.coarse_nodes else "not coarsened"),
        ("refined at op level", "yes" if s.refined else "no"),
        ("variables / constraints", f"{s.num_variables} / {s.num_constraints}"),
        *(("note", n) for n in s.notes),
    ]
    return {"stages": stages, "boundaries": boundaries, "solver": solver}


def render_report(plan: Plan, *, trace: Any = None, depth: int | None = None) -> str:
    """The HTML report of ``plan`` as one self-contained page.

    Args:
        plan: The plan.
        trace: A measured trace (:class:`modelparallel.step_trace.StepTrace`) to draw under
            the estimate, or ``None``.
        depth: Module-path depth of the graph view; default: the deepest readable one (Note
            [module groups]).

    Raises:
        MissingDependencyError: if plotly or jinja2 is not installed.
    """
    jinja2 = _need("jinja2")
    offline = _need("plotly.offline")
    from modelparallel.report_html._figures import memory_figure, timeline_figure

    p, m = plan.partitions, plan.config.microbatches
    pipe = plan.pipeline
    lanes = lane_labels(plan)
    timelines = []
    for name in (plan.config.schedule, *other_schedules(plan.config.schedule)):
        sim = simulate_plan(plan, name)
        own = name == plan.config.schedule
        title = (f"Estimated step, {name}{' (the plan’s schedule)' if own else ''}: "
                 f"{format_seconds(sim.makespan)}, bubble {100 * sim.bubble_fraction:.1f}%")
        blocks = timeline_blocks(sim)
        fig = timeline_figure(blocks, lanes, title, marked_lane=pipe.bottleneck_stage % p)
        timelines.append({"schedule": name, "own": own, "blocks": len(blocks),
                          "html": _figure_html(fig, f"timeline-{name}")})
    measured = None
    if trace is not None:
        from modelparallel.report_html._measured import measured_section

        measured = measured_section(plan, trace, _figure_html)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    vendor = "\n;\n".join((_HERE / "vendor" / f).read_text(encoding="utf-8") for f in _VENDOR)
    m_info = plan.model
    return str(env.get_template("report.html.j2").render(
        title=f"modelparallel plan report: {m_info.name}",
        plan=plan, model=m_info,
        headline=(f"{p} ranks · {plan.num_stages} stages · {m} microbatches · "
                  f"{plan.config.schedule} · step "
                  f"{format_seconds(pipe.step_time)} (the plan's closed-form estimate) · bubble "
                  f"{100 * pipe.bubble_fraction:.1f}% · throughput {pipe.throughput:.1f} "
                  f"samples/s · bottleneck stage {pipe.bottleneck_stage} at "
                  f"{format_seconds(pipe.bottleneck_time)} per microbatch"),
        params=format_count(m_info.num_parameters),
        timelines=timelines, measured=measured,
        memory_html=_figure_html(memory_figure(memory_rows(plan)), "memory"),
        memory_kinds=[label for _, label in (*MEMORY_KINDS, SENT_KIND)],
        graph_json=_json_script(_graph_data(plan, depth)),
        tables=_tables(plan),
        plotly_js=offline.get_plotlyjs(), vendor_js=vendor,
        escape=html.escape))


def write_report(plan: Plan, path: str | Path, *, trace: Any = None,
                 depth: int | None = None) -> Path:
    """Write :func:`render_report` to ``path``; return the path."""
    out = Path(path)
    out.write_text(render_report(plan, trace=trace, depth=depth), encoding="utf-8")
    return out
