"""Note [cut descent]: the DP's split moved cut by cut under the exact objective."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelparallel.partitioner._synthetic import random_graph, transformer_graph
from modelparallel.partitioner.cut_descent import descend_cuts, read_on_several_later_stages
from modelparallel.partitioner.dp import solve_dp
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


def _check_better(prob: object, order: np.ndarray, before: np.ndarray, after: np.ndarray) -> None:
    check_assignment(prob, after)  # type: ignore[arg-type]
    assert np.all(np.diff(after[order]) >= 0)  # still a contiguous split of the order
    ev = evaluate(prob, after)  # type: ignore[arg-type]
    assert np.all(ev.memory <= prob.caps)  # type: ignore[attr-defined]
    assert ev.objective < evaluate(prob, before).objective  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(6, 40), p=st.integers(2, 4))
def test_a_descent_is_a_better_valid_split_of_the_same_order(seed: int, n: int, p: int) -> None:
    prob = build_problem(random_graph(n, seed=seed), PlanConfig(partitions=p), "h100")
    dp = solve_dp(prob)
    if dp is None:
        return
    order = np.arange(prob.n)
    out = descend_cuts(prob, order, dp.stage, deadline=5.0)
    if out is not None:
        assert read_on_several_later_stages(prob, dp.stage)
        _check_better(prob, order, dp.stage, out)


def test_nothing_to_do_where_the_dp_is_exact() -> None:
    prob = build_problem(transformer_graph(6), PlanConfig(partitions=3, communication="relay"),
                         "h100")
    dp = solve_dp(prob)
    assert dp is not None and not read_on_several_later_stages(prob, dp.stage)
    assert descend_cuts(prob, np.arange(prob.n), dp.stage, deadline=5.0) is None


def test_t5_encoder_output_read_by_every_decoder_stage() -> None:
    """T5 tiny at p = 8: the encoder's output goes to several decoder stages, which the DP
    charges as one send; moving its cuts under the real objective finds a better split."""
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.get("t5")
    graph = trace(case.model, case.args, case.kwargs).graph
    prob = build_problem(graph, PlanConfig(partitions=8), "h100")
    dp = solve_dp(prob)
    assert dp is not None and read_on_several_later_stages(prob, dp.stage)
    order = np.arange(prob.n)
    out = descend_cuts(prob, order, dp.stage, deadline=30.0)
    assert out is not None
    _check_better(prob, order, dp.stage, out)
    assert evaluate(prob, out).objective < 0.98 * dp.objective


@pytest.mark.parametrize("window", [1, 4])
def test_a_small_window_still_improves(window: int) -> None:
    prob = build_problem(random_graph(30, seed=4), PlanConfig(partitions=3), "h100")
    dp = solve_dp(prob)
    assert dp is not None
    out = descend_cuts(prob, np.arange(prob.n), dp.stage, deadline=5.0, window=window)
    assert out is not None
    _check_better(prob, np.arange(prob.n), dp.stage, out)
