"""Tests of modelparallel.partitioner.order: plans that do not depend on the order the graph is
listed in (Note [canonical order]), status and bound that agree and the warning on a large gap
(Note [status and gap])."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _partition_cases import shuffled, spread_tied_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelparallel.errors import PlanGapWarning
from modelparallel.partitioner import compare, partition
from modelparallel.partitioner._synthetic import (
    chain_graph,
    random_graph,
    transformer_graph,
    unet_graph,
)
from modelparallel.partitioner.dp import solve_dp
from modelparallel.partitioner.order import canonical_order, hulls, tied_early_order
from modelparallel.partitioner.problem import build_problem
from modelparallel.partitioner.solve import OPTIMAL_GAP, WARN_GAP
from modelparallel.plan import PlanConfig


def _agree(a: float, gap_a: float, b: float, gap_b: float) -> bool:
    """Two objectives of one problem differ by at most the larger reported gap."""
    return abs(a - b) <= max(gap_a * a, gap_b * b) + 1e-9 * max(a, b)


def test_spread_tied_readers_reproduce_the_reported_failure_and_are_fixed() -> None:
    # The reported case: a valid listing keeps a colocated group (a tied embedding) from the
    # first node to the last. The canonical order regroups it: the plan is the regrouped one's.
    cfg = PlanConfig(partitions=8, tied="colocate", time_limit=10)
    spread = partition(spread_tied_graph(spread=True), cfg, "h100")
    grouped = partition(spread_tied_graph(spread=False), cfg, "h100")
    assert spread.solver.objective == pytest.approx(grouped.solver.objective, rel=1e-9)
    assert spread.solver.gap is not None and spread.solver.gap <= 0.02
    assert all(len(spread.stage_nodes(s)) > 0 for s in range(8))
    # The tied readers share a stage, as tied='colocate' asks.
    assert spread.placement("wte").stage == spread.placement("type_emb").stage


def test_listing_does_not_change_the_problem_for_the_spread_case() -> None:
    cfg = PlanConfig(partitions=8, tied="colocate")
    a = build_problem(spread_tied_graph(spread=True), cfg, "h100")
    b = build_problem(spread_tied_graph(spread=False), cfg, "h100")
    assert a.names == b.names
    pos = {x: i for i, x in enumerate(a.names)}
    assert abs(pos["type_emb"] - pos["wte"]) <= 2  # the colocated readers sit together


def test_hulls_close_groups_and_merge_cycles() -> None:
    # 0 -> 1 -> 2 -> 3 and 4 -> 5: group (0, 2) takes 1; groups (0, 5) and (4, 3) would form a
    # cycle when contracted (0 -> 3 and 4 -> 5), so they merge with what lies between.
    preds = [(), (0,), (1,), (2, 4), (), (4, 0)]
    assert hulls(preds, [(0, 2)]) == [[0, 1, 2]]
    merged = hulls(preds, [(0, 5), (4, 3)])
    assert len(merged) == 1 and {0, 3, 4, 5} <= set(merged[0])


def test_canonical_order_is_topological_and_ends_with_the_output() -> None:
    prob = build_problem(unet_graph(3), PlanConfig(partitions=2), "h100")
    preds = prob.producers
    order = canonical_order(preds, prob.time[:, 0], names=prob.names)
    assert order.tolist() == list(range(prob.n))  # the problem is indexed in it already
    assert np.all(prob.edge_src < prob.edge_dst)
    assert prob.names[-1] == "output"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(4, 30), tie=st.sampled_from([0.0, 0.3, 0.6]),
       shuffle=st.integers(0, 10**6))
def test_random_dags_with_colocation_give_the_same_problem_in_any_listing(
        seed: int, n: int, tie: float, shuffle: int) -> None:
    g = random_graph(n, seed=seed, tie_prob=tie)
    cfg = PlanConfig(partitions=3, tied="colocate")
    a = build_problem(g, cfg, "h100")
    b = build_problem(shuffled(g, shuffle), cfg, "h100")
    assert a.names == b.names
    for group in a.colocate:  # every colocated group's hull is contiguous
        lo, hi = min(group), max(group)
        assert all(a.lo[v] == a.lo[lo] and a.hi[v] == a.hi[lo] for v in group)
        assert hi - lo + 1 <= a.n


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), shuffle=st.integers(0, 10**6),
       tied=st.sampled_from(["replicate", "colocate"]))
def test_random_dag_plans_agree_within_the_gap_in_any_listing(seed: int, shuffle: int,
                                                              tied: str) -> None:
    g = random_graph(14, seed=seed, tie_prob=0.3)
    cfg = PlanConfig(partitions=3, tied=tied, time_limit=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanGapWarning)
        a = partition(g, cfg, "h100").solver
        b = partition(shuffled(g, shuffle), cfg, "h100").solver
    assert a.gap is not None and b.gap is not None
    assert _agree(a.objective, a.gap, b.objective, b.gap)


@pytest.fixture(scope="module")
def traced() -> dict[str, object]:
    """Tiny versions of benchmark architectures, traced once (T5 has a shared embedding)."""
    from modelparallel import models
    from modelparallel.tracer import trace

    out = {}
    for name in ("t5", "inception", "unet", "resnet_tiny"):
        case = models.get(name)
        out[name] = trace(case.model, case.args, case.kwargs).graph
    return out


def _tied(prob: object) -> list[tuple[int, ...]]:
    return [q.readers for q in sorted(prob.shared,  # type: ignore[attr-defined]
                                      key=lambda q: -float(np.max(q.state)))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(4, 40), tie=st.sampled_from([0.2, 0.5]))
def test_tied_early_order_is_a_topological_permutation_moving_only_what_it_may(
        seed: int, n: int, tie: float) -> None:
    prob = build_problem(random_graph(n, seed=seed, tie_prob=tie), PlanConfig(partitions=3),
                         "h100")
    preds = prob.producers
    order = tied_early_order(preds, _tied(prob))
    assert sorted(order.tolist()) == list(range(prob.n))
    pos = np.empty(prob.n, dtype=np.int64)
    pos[order] = np.arange(prob.n)
    assert all(pos[u] < pos[v] for v in range(prob.n) for u in preds[v])
    for readers in _tied(prob)[:1]:  # one pair alone: moved exactly when nothing between is read
        first, r = sorted(set(readers))[:2]
        pair = tied_early_order(preds, [(first, r)])
        at = np.empty(prob.n, dtype=np.int64)
        at[pair] = np.arange(prob.n)
        between = set(range(first + 1, r))
        anc: set[int] = set()
        stack = [r]
        while stack:  # what r reads, directly or not
            for u in preds[stack.pop()]:
                if u not in anc:
                    anc.add(u)
                    stack.append(u)
        assert (at[r] != r) == (r > first + 1 and not anc & between)
        assert at[r] == r or at[r] == at[first] + 1
        assert all(at[u] < at[v] for v in range(prob.n) for u in preds[v])


def test_tied_early_order_gives_t5_a_better_first_incumbent(traced: dict[str, object]) -> None:
    """T5's decoder embedding reads the encoder's embedding table and only the inputs: moved to
    the encoder's first stage with its first self-attention, the DP's split is better than the
    canonical order's (the decoder's lookup right before the decoder), and the ILP starts from
    it (Note [canonical order])."""
    cfg = PlanConfig(partitions=2, time_limit=4)
    prob = build_problem(traced["t5"], cfg, "h100")  # type: ignore[arg-type]
    order = tied_early_order(prob.producers, _tied(prob))
    decoder_lookup = [i for i, nm in enumerate(prob.names) if nm == "embedding_2"]
    assert decoder_lookup and int(np.flatnonzero(order == decoder_lookup[0])[0]) < 5
    canonical, early = solve_dp(prob), solve_dp(prob, order=order)
    assert canonical is not None and early is not None
    assert early.objective < canonical.objective * 0.98
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanGapWarning)
        plan = partition(traced["t5"], cfg, "h100")  # type: ignore[arg-type]
    assert plan.solver.objective <= early.objective * (1 + 1e-9)
    assert any("dp-tied-early" in note for note in plan.solver.notes)


@pytest.mark.parametrize("name", ["t5", "inception", "unet", "resnet_tiny"])
@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(shuffle=st.integers(0, 10**6))
def test_benchmark_graphs_plan_the_same_in_any_listing(traced: dict[str, object], name: str,
                                                       shuffle: int) -> None:
    g = traced[name]
    cfg = PlanConfig(partitions=4, time_limit=4)
    h = shuffled(g, shuffle)  # type: ignore[arg-type]
    assert build_problem(g, cfg, "h100").names == build_problem(h, cfg, "h100").names  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanGapWarning)
        a = partition(g, cfg, "h100").solver  # type: ignore[arg-type]
        b = partition(h, cfg, "h100").solver
    assert a.gap is not None and b.gap is not None
    assert _agree(a.objective, a.gap, b.objective, b.gap)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), p=st.integers(2, 4))
def test_status_is_optimal_exactly_when_the_gap_is_within_tolerance(seed: int, p: int) -> None:
    g = random_graph(16, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanGapWarning)
        plans = compare(g, PlanConfig(partitions=p, time_limit=3), "h100")
    for plan in plans.values():
        r = plan.solver
        assert r.gap is not None
        assert (r.status == "optimal") == (r.gap <= OPTIMAL_GAP), (r.method, r.status, r.gap)


def test_a_large_gap_warns_with_what_to_try() -> None:
    # Equal layer counts of a chain of very unequal layers: far above the bound.
    with pytest.warns(PlanGapWarning, match=r"above the proven lower bound.*method='ilp'"):
        plan = partition(chain_graph(12, seed=0), PlanConfig(partitions=4), "h100",
                         method="uniform")
    assert plan.solver.gap is not None and plan.solver.gap > WARN_GAP
    assert plan.solver.status == "feasible"
    with warnings.catch_warnings():  # compare() warns for its ILP plan only
        warnings.simplefilter("error", PlanGapWarning)
        plans = compare(chain_graph(12, seed=0), PlanConfig(partitions=4, time_limit=3), "h100")
    assert plans["uniform"].solver.gap > WARN_GAP  # type: ignore[operator]


def test_a_small_gap_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanGapWarning)
        plan = partition(transformer_graph(4), PlanConfig(partitions=2, time_limit=5), "h100")
    assert plan.solver.gap is not None and plan.solver.gap <= WARN_GAP
