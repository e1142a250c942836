"""The report's content as values (no browser): timeline blocks, memory rows, module groups."""

from __future__ import annotations

import itertools
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel import PlanConfig
from modelparallel.cost_model import get_device_spec
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.plan import Plan
from modelparallel.report_html._model import (
    MEMORY_KINDS,
    choose_depth,
    estimated_blocks,
    memory_rows,
    module_graph,
    other_schedules,
)


@cache
def _plan(p: int = 3, m: int = 4, schedule: str = "1f1b") -> Plan:
    g = transformer_graph(layers=4, hidden=64, seq=16, batch=2)
    return partition(g, PlanConfig(partitions=p, microbatches=m, schedule=schedule,
                                   time_limit=5), [get_device_spec("h100")] * p)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_timeline_has_a_forward_and_a_backward_per_stage_and_microbatch(schedule: str) -> None:
    plan = _plan()
    blocks = estimated_blocks(plan, schedule)
    assert len(blocks) == 3 * 4 * 2
    assert {(b.stage, b.kind, b.microbatch) for b in blocks} == {
        (s, k, i) for s in range(3) for k in "FB" for i in range(4)}
    for s in range(3):  # a stage runs one block at a time
        lane = sorted((b.start, b.end) for b in blocks if b.stage == s)
        assert all(a[1] <= b[0] + 1e-12 for a, b in itertools.pairwise(lane))
    assert schedule not in other_schedules(schedule)


def test_memory_rows_add_up_to_the_stage_peaks() -> None:
    plan = _plan()
    rows = memory_rows(plan)
    assert len(rows) == plan.partitions
    for row, stage in zip(rows, plan.stages):
        assert sum(row[k] for k, _ in MEMORY_KINDS) == stage.memory.peak
        assert row["capacity"] == stage.capacity_bytes
        assert row["sent"] == stage.comm_out_bytes * stage.inflight_microbatches


def test_a_transformer_collapses_to_its_blocks_at_depth_three() -> None:
    plan = _plan()
    depth, groups, _ = module_graph(plan, 3)
    assert depth == 3
    paths = {g.path for g in groups}
    assert {f"transformer.h.{i}" for i in range(4)} <= paths
    assert not any(p.startswith("transformer.h.0.") for p in paths)
    assert len(groups) <= 32 and choose_depth(plan, max_groups=len(groups)) >= 3


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 6))
def test_groups_partition_the_nodes_and_edges_say_when_they_cross(depth: int) -> None:
    plan = _plan()
    _, groups, edges = module_graph(plan, depth)
    names = [n for g in groups for n in g.nodes]
    assert sorted(names) == sorted(n.name for n in plan.nodes)  # each node in exactly one group
    stage = {n.name: n.stage for n in plan.nodes}
    by_id = {g.id: g for g in groups}
    assert len(by_id) == len(groups)
    for g in groups:
        assert {stage[n] for n in g.nodes} == {g.stage}
    size = {n.name: n.output_bytes for n in plan.nodes}
    for e in edges:
        a, b = by_id[e.source], by_id[e.target]
        assert e.boundary == (a.stage != b.stage and min(a.stage, b.stage) >= 0)
        assert e.bytes == sum(size[v] for v in e.values)
        assert set(e.values) <= set(a.nodes)
    crossing = {v for b in plan.boundaries for v in b.values}
    carried = {v for e in edges if e.boundary for v in e.values}
    assert carried <= crossing  # a boundary edge only carries what the plan says crosses


def test_the_report_is_written_without_a_framework(tmp_path: Path) -> None:
    from test_planning_core import _run  # the same torch/tensorflow blocker

    from modelparallel.step_trace import StepTrace, TraceEvent

    _plan().save(tmp_path / "plan.json")
    StepTrace((TraceEvent(0, 0, "forward", 0, 0, 5.0, 5.5),), schedule="1f1b", microbatches=4,
              ranks=3).save(tmp_path / "trace.json")
    out = _run(tmp_path, """
        import sys
        from modelparallel.cli import main
        assert main(["report", "plan.json", "--trace", "trace.json", "-o", "report.html"]) == 0
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")]
        assert not bad, bad
        print("report ok")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("report ok")
    assert (tmp_path / "report.html").stat().st_size > 100_000
