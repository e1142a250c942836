"""The HTML report opened in a real headless Chromium: no console errors, no network, a block per
forward and backward of every stage and microbatch, a memory bar per stage, a graph node per
module group. A screenshot is left in ``test-artifacts/``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from _browser import ARTIFACTS, open_page

from modelparallel import PlanConfig
from modelparallel.cli import main
from modelparallel.cost_model import get_device_spec
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.plan import Plan
from modelparallel.report_html import render_report
from modelparallel.report_html._model import MEMORY_KINDS, estimated_blocks, module_graph
from modelparallel.step_trace import StepTrace, TraceEvent

_P, _M = 3, 4


@cache
def _plan() -> Plan:
    g = transformer_graph(layers=4, hidden=64, seq=16, batch=2)
    return partition(g, PlanConfig(partitions=_P, microbatches=_M, time_limit=5),
                     [get_device_spec("h100")] * _P)


_PROBE = """() => ({
  groups: window.mpReport.groups,
  cyNodes: window.mpReport.cy.nodes().length,
  timelines: [...document.querySelectorAll('.timeline')].map(d => ({
      schedule: d.dataset.schedule, own: d.dataset.own,
      blocks: d.querySelectorAll('.barlayer .point').length, said: +d.dataset.blocks})),
  memory: [...document.querySelectorAll('#memory .barlayer .trace')].map(
      t => t.querySelectorAll('.point').length),
  memoryX: [...document.querySelectorAll('#memory .xtick text')].map(t => t.textContent),
  stageRows: document.querySelectorAll('#stage-table tr').length - 1,
})"""


def test_report_in_a_browser(tmp_path: Path) -> None:
    plan = _plan()
    plan_file = plan.save(tmp_path / "plan.json")
    out = tmp_path / "report.html"
    assert main(["report", str(plan_file), "-o", str(out)]) == 0
    requests: list[str] = []
    with open_page(out.as_uri()) as (page, errors):
        page.on("request", lambda r: requests.append(r.url))
        page.wait_for_function("window.mpReport !== undefined", timeout=60_000)
        seen = page.evaluate(_PROBE)
        page.hover("#graph")  # hover shows a group's inspect --node text
        cy_node = page.evaluate("""() => {
            const n = window.mpReport.cy.nodes().filter(x => x.data('stage') >= 0)[0];
            n.emit('tap'); return document.getElementById('details').textContent; }""")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    blocks = {t["schedule"]: t["blocks"] for t in seen["timelines"]}
    assert all(t["blocks"] == t["said"] for t in seen["timelines"]), seen["timelines"]
    assert [t["own"] for t in seen["timelines"]] == ["yes", "no", "no"]
    assert seen["timelines"][0]["schedule"] == "1f1b"
    # a forward and a backward per stage and microbatch (zero-bubble splits the backward in two)
    assert blocks == {"1f1b": _P * _M * 2, "gpipe": _P * _M * 2, "zb-h1": _P * _M * 3}
    # every stage has a bar of every kind, sent values included
    assert seen["memory"] == [_P] * (len(MEMORY_KINDS) + 1)
    assert seen["memoryX"] == [f"stage {i}" for i in range(_P)]
    _, groups, _ = module_graph(plan)
    assert seen["groups"] == seen["cyNodes"] == len(groups)
    assert seen["stageRows"] == _P
    assert "inspect --node" in cy_node and "placed on stage" in cy_node


def test_report_escapes_names_and_needs_no_framework() -> None:
    html = render_report(_plan())
    assert "<script>alert" not in html
    assert "cytoscape" in html and "Plotly" in html


def _fake_trace(plan: Plan) -> StepTrace:
    """Two steps "measured" as the estimate plays them, 20% slower, with a wait before each
    forward but the first stage's."""
    events = []
    for step in range(2):
        t0 = 1000.0 + step
        for b in estimated_blocks(plan):
            kind = "forward" if b.kind == "F" else "backward"
            start, end = t0 + b.start * 1.2, t0 + b.end * 1.2
            if kind == "forward" and b.stage > 0:
                events.append(TraceEvent(b.rank, b.stage, "recv_wait", b.microbatch, step,
                                         start - 1e-5, start))
            events.append(TraceEvent(b.rank, b.stage, kind, b.microbatch, step, start, end))
    return StepTrace(tuple(events), schedule=plan.config.schedule,
                     microbatches=plan.config.microbatches, ranks=plan.partitions)


def test_report_with_a_measured_trace_in_a_browser(tmp_path: Path) -> None:
    plan = _plan()
    trace = _fake_trace(plan)
    trace_file = trace.save(tmp_path / "trace.json")
    plan_file = plan.save(tmp_path / "plan.json")
    out = tmp_path / "measured.html"
    assert main(["report", str(plan_file), "--trace", str(trace_file), "-o", str(out)]) == 0
    with open_page(out.as_uri()) as (page, errors):
        page.wait_for_function("window.mpReport !== undefined", timeout=60_000)
        seen = page.evaluate("""() => ({
            blocks: document.querySelectorAll('.measured .barlayer .point').length,
            said: +document.querySelector('.measured').dataset.blocks,
            rows: document.querySelectorAll('#measured-table tr').length - 1,
            head: [...document.querySelectorAll('#measured-table th')].map(t => t.textContent)})""")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-measured.png"), full_page=True)
    assert errors == []
    step_events = [e for e in trace.events if e.step == 1]
    assert seen["blocks"] == seen["said"] == len(step_events)
    assert seen["rows"] == _P
    assert "rank bubble meas." in seen["head"]
