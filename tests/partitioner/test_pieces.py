"""A proof phase in pieces (Note [proof in pieces], modelparallel/partitioner/_pieces.py): the
pieces cover every assignment exactly once, and together they answer what the whole search does."""

from __future__ import annotations

import numpy as np
import pytest
from _partition_cases import brute, valid_assignments
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel.partitioner._pieces import (
    MemorySide,
    _Cutter,
    _next,
    _Piece,
    solve_pieces,
    split_ranges,
)
from modelparallel.partitioner._synthetic import chain_graph, random_graph, transformer_graph
from modelparallel.partitioner.bounds import window_for
from modelparallel.partitioner.coarsen import singletons
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.ilp import IlpResult
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.integers(2, 4), pieces=st.sampled_from([2, 4, 8]),
       tied=st.sampled_from(["replicate", "colocate"]))
def test_pieces_hold_every_assignment_once(seed: int, p: int, pieces: int, tied: str) -> None:
    prob = build_problem(random_graph(6, seed=seed, tie_prob=0.3),
                         PlanConfig(partitions=p, tied=tied), "h100")
    units = singletons(prob)
    ranges = split_ranges(prob, units.members, units.lo, units.hi, pieces)
    assert 1 <= len(ranges) <= pieces
    for stage in valid_assignments(prob):
        holders = [k for k, (lo, hi) in enumerate(ranges)
                   if np.all(lo <= stage) and np.all(stage <= hi)]
        assert len(holders) == 1, (stage, holders)


@pytest.mark.parametrize("tied", ["replicate", "colocate"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_pieces_answer_as_the_whole_search(workers: int, tied: str) -> None:
    prob = build_problem(random_graph(7, seed=0, tie_prob=0.3),
                         PlanConfig(partitions=3, tied=tied, memory_weight=0.0), "h100")
    best, _ = brute(prob)
    u = singletons(prob)
    below = solve_pieces(prob, u.members, u.lo, u.hi, target=best * 0.98, gap_rel=1e-6,
                         time_limit=20, workers=workers)
    assert below.complete and not below.found
    assert below.bound == pytest.approx(best * 0.98)
    above = solve_pieces(prob, u.members, u.lo, u.hi, target=best * 1.05, gap_rel=1e-6,
                         time_limit=20, workers=workers)
    assert above.complete and above.found
    for item_stage in above.found:  # singletons: item stages are node stages
        check_assignment(prob, item_stage)
    assert above.bound is not None and above.bound <= best * (1 + 1e-6)
    assert (workers == 1) == (above.pieces == 1)


def test_pieces_split_a_transformer_near_its_middle_boundary() -> None:
    prob = build_problem(transformer_graph(8), PlanConfig(partitions=4), "h100")
    u = singletons(prob)
    (lo_a, hi_a), (lo_b, hi_b) = split_ranges(prob, u.members, u.lo, u.hi, 2)
    # one side ends the cut item (and its ancestors) by stage 1, the other starts it (and its
    # descendants) at stage 2: half of 4 stages
    left, right = np.flatnonzero(hi_a < u.hi), np.flatnonzero(lo_b > u.lo)
    assert len(left) > 0 and hi_a[left].max() <= 1
    assert len(right) > 0 and lo_b[right].min() >= 2
    assert np.all(lo_a == u.lo) and np.all(hi_b == u.hi)


def _result(status: str, bound: float | None) -> IlpResult:
    return IlpResult(None, status, None, bound, "highs", 0, 0, 0.0)


def test_an_idle_worker_takes_half_of_the_longest_running_piece() -> None:
    prob = build_problem(transformer_graph(4), PlanConfig(partitions=4), "h100")
    u = singletons(prob)
    cut = _Cutter(prob, u.members)
    old, new = _Piece(u.lo, u.hi, 0.0, 0.5, started=1.0), _Piece(u.lo, u.hi, 0.5, 1.0, started=2.0)
    running = {object(): old, object(): new}
    got = _next([], running, cut)  # type: ignore[arg-type]
    assert got is old.children[0] and got.parent is old and len(old.children) == 2
    # the halves answer for the piece they came from: once both are, it is complete
    # and its own (still running) search is moot
    old.children[0].result = _result("infeasible", None)
    assert not old.complete()
    old.children[1].result = _result("infeasible", None)
    assert old.complete() and old.bound(1.0) == 1.0
    # a stopped search's dual bound counts with its halves'
    new.result = _result("feasible", 0.7)
    new.children = cut.halves(new)
    new.children[0].result = _result("infeasible", None)
    assert not new.complete() and new.bound(1.0) == 0.7
    new.children[1].result = _result("feasible", 0.9)
    assert new.bound(1.0) == 0.9
    assert new.children[1].moot() is False and _next([new.children[0]], {}, cut) is None


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_memory_sides_answer_as_the_whole_search(workers: int, seed: int) -> None:
    # Note [memory sides]: split on the memory term first, the search still finds nothing
    # below the optimum and something below a target above it, with the same bound.
    prob = build_problem(random_graph(7, seed=seed, tie_prob=0.3),
                         PlanConfig(partitions=3, memory_weight=0.5, microbatches=4), "h100")
    best, stage = brute(prob)
    ev = evaluate(prob, stage)
    u_best = ev.memory_term
    u = singletons(prob)
    for target, expect_found in ((best * 0.98, False), (best * 1.05, True)):
        sides = [MemorySide(m, *window_for(prob, target, m))
                 for m in ((0.0, u_best), (u_best, np.inf))]
        out = solve_pieces(prob, u.members, u.lo, u.hi, target=target, gap_rel=1e-6,
                           time_limit=20, workers=workers, sides=sides)
        assert out.complete and bool(out.found) == expect_found
        for item_stage in out.found:
            check_assignment(prob, item_stage)
            assert evaluate(prob, item_stage).objective < target
        assert out.bound is not None
        assert out.bound == pytest.approx(target) if not expect_found else (
            out.bound <= best * (1 + 1e-6))


def test_sides_with_nothing_left_to_split_are_answered() -> None:
    # Two memory sides whose ranges cannot be cut (every item fixed, or none left): the queue
    # of pieces is a copy, so the sides stay the whole's halves and their answer is its answer
    # (it emptied the whole's list of halves once, leaving the phase incomplete, no bound).
    prob = build_problem(chain_graph(6), PlanConfig(partitions=2, memory_weight=0.5), "h100")
    u = singletons(prob)
    best, stage = brute(prob)
    fixed = np.asarray(stage)
    empty_lo, empty_hi = np.ones_like(u.lo), np.zeros_like(u.hi)
    sides = [MemorySide((0.0, 1.0), fixed.copy(), fixed.copy()),
             MemorySide((1.0, np.inf), empty_lo, empty_hi)]
    out = solve_pieces(prob, u.members, u.lo, u.hi, target=best * 0.99, gap_rel=1e-6,
                       time_limit=20, workers=2, sides=sides)
    assert out.complete and not out.found
    assert out.bound == pytest.approx(best * 0.99)
