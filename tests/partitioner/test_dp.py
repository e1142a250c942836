"""The exact contiguous DP (modelparallel/partitioner/dp.py) against every contiguous split.

Under relaying it is exact; under direct sends exact when every value is read on at most one
later stage (chains), otherwise a heuristic (Note [DP under direct sends])."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelparallel.partitioner._synthetic import chain_graph, random_graph
from modelparallel.partitioner.dp import solve_dp, split_to_stages
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


@pytest.mark.parametrize("communication", ["relay", "direct"])
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("p", [2, 3, 4])
def test_dp_is_optimal_among_contiguous_splits(seed: int, p: int, communication: str) -> None:
    chain = bool(seed % 2)
    graph = chain_graph(7, seed=seed) if chain else random_graph(7, seed=seed)
    exact = communication == "relay" or chain or p == 2
    for w in (0.0, 0.2, 0.7, 1.0):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule="1f1b",
                         communication=communication)
        prob = build_problem(graph, cfg, "h100")
        n = prob.n
        best = np.inf
        for cuts in itertools.combinations_with_replacement(range(n + 1), p - 1):
            st = split_to_stages(np.arange(n), list(cuts), n)
            if st[-1] != p - 1:
                continue
            ev = evaluate(prob, st)
            if np.all(ev.memory <= prob.caps):
                best = min(best, ev.objective)
        res = solve_dp(prob)
        assert res is not None and res.exact
        if exact:
            assert res.objective == pytest.approx(best, rel=1e-9)
        else:
            assert res.objective >= best * (1 - 1e-9)
        assert evaluate(prob, res.stage).objective == pytest.approx(res.objective)


def test_dp_respects_pins_and_allowed_cuts() -> None:
    graph = chain_graph(10)
    cfg = PlanConfig(partitions=3, pins={"fc2": 2})
    prob = build_problem(graph, cfg, "h100")
    res = solve_dp(prob)
    assert res is not None
    assert res.stage[prob.index["fc2"]] == 2
    assert np.all(res.stage[prob.index["fc2"]:] == 2)
    allowed = np.zeros(prob.n + 1, dtype=bool)
    allowed[[0, 5, prob.n]] = True
    res = solve_dp(build_problem(graph, PlanConfig(partitions=2), "h100"), allowed_cuts=allowed)
    assert res is not None
    assert res.stage.tolist() == [0] * 5 + [1] * (prob.n - 5)
