"""The ILP of Note [ILP formulation] (modelparallel/partitioner/ilp.py): cutoff searches prove or
find."""

from __future__ import annotations

import pytest
from _partition_cases import brute

from modelparallel.partitioner._synthetic import random_graph
from modelparallel.partitioner.coarsen import singletons
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.ilp import solve_items
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("seed", range(3))
def test_cutoff_search_proves_or_finds(seed: int, solver: str) -> None:
    graph = random_graph(7, seed=300 + seed, tie_prob=0.2, view_prob=0.3)
    prob = build_problem(graph, PlanConfig(partitions=3, microbatches=4), "h100")
    best, _ = brute(prob)
    units = singletons(prob)
    below = solve_items(prob, units.members, units.lo, units.hi, cutoff=best * 0.97,
                        solver=solver, time_limit=10)
    assert below.status == "infeasible" and below.item_stage is None
    assert below.bound == pytest.approx(best * 0.97)
    above = solve_items(prob, units.members, units.lo, units.hi, cutoff=best * 1.05,
                        solver=solver, time_limit=10, gap_rel=1e-6)
    assert above.item_stage is not None
    found = evaluate(prob, above.item_stage).objective
    assert found < best * 1.05 and found == pytest.approx(best, rel=1e-4)
    assert above.bound is not None and above.bound <= best * (1 + 1e-6)


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("seed", range(3))
def test_objective_is_the_assignments_own_at_a_loose_gap(seed: int, solver: str) -> None:
    # A solver stopping within a wide MIP gap may hold slack in t and u: the result reports the
    # objective of its assignment, which is what the evaluation gives for it.
    graph = random_graph(9, seed=400 + seed, tie_prob=0.2, view_prob=0.3)
    prob = build_problem(graph, PlanConfig(partitions=3, microbatches=4, memory_weight=0.5),
                         "h100")
    units = singletons(prob)
    res = solve_items(prob, units.members, units.lo, units.hi, solver=solver, time_limit=10,
                      gap_rel=0.5)
    assert res.item_stage is not None and res.objective is not None
    assert res.objective == pytest.approx(evaluate(prob, res.item_stage).objective, rel=1e-9)
    assert res.bound is None or res.bound <= res.objective * (1 + 1e-7)
