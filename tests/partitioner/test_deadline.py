"""One deadline for a whole planner call (Note [whole-call deadline] in
modelparallel/partitioner/deadline.py): the budget arithmetic, the DP's passes, the bound's
windowed model, the coarse ILP and refinement skipped once their share of the limit is spent."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from modelparallel.partitioner import lower_bound
from modelparallel.partitioner._synthetic import chain_graph, random_graph, transformer_graph
from modelparallel.partitioner.coarsen import auto_depth, make_units
from modelparallel.partitioner.deadline import Deadline
from modelparallel.partitioner.dp import solve_dp
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.methods import _Candidates, _Clock, _units_then_refine
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


class _Fake:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@given(limit=st.floats(0.1, 1e4), steps=st.lists(st.floats(0.0, 50.0), max_size=8),
       share=st.floats(0.0, 1.0), minimum=st.floats(0.0, 10.0))
def test_deadline_budgets_share_one_clock(limit: float, steps: list[float], share: float,
                                          minimum: float) -> None:
    now = _Fake()
    d = Deadline(limit, now=now)
    assert d.elapsed() == 0.0 and d.left() == limit
    for step in steps:
        before = d.left()
        now.t += step
        # Every stage draws on the same budget: time spent anywhere is gone for all.
        assert abs(d.left() - max(0.0, before - step)) < 1e-6
        assert 0.0 <= d.until(share) <= d.left() + 1e-9
        assert d.until(share) == max(0.0, share * limit - d.elapsed())
        b = d.budget(share, minimum=minimum)
        if b is None:
            assert d.until(share) < minimum or d.until(share) == 0.0
        else:
            assert b == d.until(share) and b >= minimum and b > 0
        assert d.at(share) == d.start + share * limit


def test_deadline_budget_skips_a_spent_share() -> None:
    now = _Fake()
    d = Deadline(60.0, now=now)
    now.t += 30.0
    assert d.budget(0.45, minimum=1.0) is None  # 27 s share, 30 s gone
    assert d.budget(0.55, minimum=1.0) == 3.0
    assert d.budget(0.55, minimum=5.0) is None
    now.t += 100.0
    assert d.left() == 0.0 and d.until(2.0) == 0.0 and d.until(3.0) == 50.0


def test_dp_past_its_deadline_stops_with_a_valid_inexact_split() -> None:
    graph = transformer_graph(6)
    prob = build_problem(graph, PlanConfig(partitions=4, memory_weight=0.2), "h100")
    full = solve_dp(prob)
    cut = solve_dp(prob, deadline=time.perf_counter() - 1.0)
    assert full is not None and cut is not None
    assert full.exact and cut.passes < full.passes and not cut.exact
    check_assignment(prob, cut.stage)
    assert cut.objective >= full.objective * (1 - 1e-12)
    late = solve_dp(prob, deadline=time.perf_counter() + 1e6)
    assert late is not None and late.exact and late.objective == full.objective


def test_lower_bound_skips_the_windowed_model_without_time() -> None:
    prob = build_problem(random_graph(30, seed=3), PlanConfig(partitions=3, memory_weight=0.2),
                         "h100")
    dp = solve_dp(prob)
    assert dp is not None
    none = lower_bound(prob, incumbent=dp.objective * 1.5, time_limit=0.0)
    assert none.lp_seconds == 0.0 and none.value <= dp.objective


def test_coarse_ilp_is_skipped_once_its_share_is_spent() -> None:
    prob = build_problem(chain_graph(40), PlanConfig(partitions=4, time_limit=10.0), "h100")
    clock = _Clock(None, 10.0)
    clock.deadline.start -= 8.0  # 8 s of the 10 s already spent: the coarse share (2.5 s) too
    cands = _Candidates(prob)
    dp = solve_dp(prob)
    assert dp is not None
    cands.consider(dp.stage, "dp")
    stage, report = _units_then_refine(prob, clock, cands, make_units(prob, auto_depth(prob)),
                                       refine=True)
    assert any("coarse ILP" in n and "skipped" in n for n in report.notes)
    assert "ilp-units" not in report.notes[0]
    assert not report.refined  # nor a refinement round (it needs 1.5 s of the share left)
    check_assignment(prob, stage)
    assert evaluate(prob, stage).objective <= dp.objective * (1 + 1e-12)
