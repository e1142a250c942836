"""The polish of the first incumbent, beside the cut descents (Note [polish alongside],
modelparallel/partitioner/_polish.py), and the windows it leaves computed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelparallel.partitioner import _polish, partition
from modelparallel.partitioner import methods as methods_mod
from modelparallel.partitioner._polish import BackgroundPolish, polish
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.partitioner.dp import solve_dp
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import Problem, build_problem
from modelparallel.partitioner.reduce import reduce_free_nodes
from modelparallel.plan import PlanConfig


def _problem(layers: int = 4, p: int = 3) -> Problem:
    graph = transformer_graph(layers, hidden=128, seq=64, vocab=2000)
    return build_problem(graph, PlanConfig(partitions=p, microbatches=6), "h100")


def _start(prob: Problem) -> np.ndarray:
    dp = solve_dp(prob)
    assert dp is not None
    return dp.stage


def test_background_polish_finds_what_the_sequential_one_does() -> None:
    prob = _problem()
    start = _start(prob)
    alone = polish(prob, start, time_limit=20)
    job = BackgroundPolish(prob, start, time_limit=20)
    beside = job.finish(within=20)
    assert alone is not None and beside is not None
    before = evaluate(prob, start).objective
    # both rounds run to the optimum of the same local model: the same objective, never worse
    assert evaluate(prob, beside).objective == pytest.approx(evaluate(prob, alone).objective,
                                                             rel=1e-4)
    assert evaluate(prob, beside).objective <= before + 1e-12
    assert np.all(beside[prob.edge_src] <= beside[prob.edge_dst])
    assert np.array_equal(job.stage, start)  # the start it polished, kept for the caller


def test_finish_at_once_still_returns_a_valid_assignment() -> None:
    prob = _problem(8, 4)
    start = _start(prob)
    job = BackgroundPolish(prob, start, time_limit=30)
    new = job.finish(within=0.0)  # stop as soon as the search polls
    if new is not None:  # a stopped round may have found nothing yet
        assert evaluate(prob, new).objective <= evaluate(prob, start).objective + 1e-12
        assert np.all(new[prob.edge_src] <= new[prob.edge_dst])
    assert not job._thread.is_alive()  # finish() returns only once the round has ended


def test_finish_raises_what_the_round_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(_polish, "refine_once", broken)
    prob = _problem()
    job = BackgroundPolish(prob, _start(prob), time_limit=5)
    with pytest.raises(RuntimeError, match="solver exploded"):
        job.finish(within=5)


def test_one_stage_is_not_polished() -> None:
    prob = _problem(2, 1)
    assert polish(prob, np.zeros(prob.n, dtype=np.int64), time_limit=5) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ilp_polishes_beside_the_descents_only_with_a_second_core(
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    started: list[BackgroundPolish] = []

    class Spy(BackgroundPolish):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(methods_mod, "BackgroundPolish", Spy)
    monkeypatch.setattr(methods_mod, "WORKERS", workers)
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=4, microbatches=8, time_limit=10)
    plan = partition(graph, cfg, "h100")
    dp = partition(graph, cfg, "h100", method="dp")
    assert plan.solver.objective <= dp.solver.objective + 1e-12
    assert plan.solver.lower_bound is not None
    assert plan.solver.lower_bound <= plan.solver.objective
    assert len(started) == (1 if workers > 1 else 0)


def test_windows_are_computed_once_per_cutoff(monkeypatch: pytest.MonkeyPatch) -> None:
    prob = _problem()
    red = reduce_free_nodes(prob)
    value = evaluate(prob, _start(prob)).objective
    calls: list[float] = []
    real = methods_mod.window_for

    def counting(prob: Problem, cutoff: float, *args: Any) -> Any:
        calls.append(cutoff)
        return real(prob, cutoff, *args)

    monkeypatch.setattr(methods_mod, "window_for", counting)
    memo: dict[Any, Any] = {}
    lo1, hi1 = methods_mod._unit_windows(prob, red, value, memo=memo)
    lo2, hi2 = methods_mod._unit_windows(prob, red, value, memo=memo)
    lo3, hi3 = methods_mod._unit_windows(prob, red, value)  # no memo: computed again
    assert calls == [value, value]
    for a, b in ((lo1, lo2), (lo1, lo3), (hi1, hi2), (hi1, hi3)):
        assert np.array_equal(a, b)
    methods_mod._unit_windows(prob, red, value / 1.02, memo=memo)
    assert len(calls) == 3 and len(memo) == 2
