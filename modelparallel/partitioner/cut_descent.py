"""Moving the cuts of a contiguous split one at a time, judged by the exact objective.

Note [cut descent]
~~~~~~~~~~~~~~~~~~
Under direct sends the DP over a topological order charges one send per value read by a later
segment, which is exact only when every value's later readers share one stage (Note [DP under
direct sends] in :mod:`~modelparallel.partitioner.dp`). Where a value is read on several later
stages (T5's encoder output, read by the cross-attention of every decoder layer), the DP's best
split by its own accounting need not be the best by the real one. :func:`descend_cuts` takes
the DP's split of its order and moves one cut at a time to the position, within ``window``
positions and between its neighbours, that lowers :func:`~modelparallel.partitioner.evaluate.
stage_costs`'s objective most (memory caps, pins and colocation kept), sweeping the cuts until no
move helps or the deadline passes. It runs only on splits where some value has readers on
two or more later stages; elsewhere the DP is exact over its order and no move can help.
Its splits are candidates of the ILP pipeline like the DP's (Note [ILP pipeline] in
:mod:`~modelparallel.partitioner.methods`); figures in ``docs/measurements.md``.

Example:
    >>> import numpy as np
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.partitioner.dp import solve_dp
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2), "h100")
    >>> dp = solve_dp(prob)
    >>> descend_cuts(prob, np.arange(prob.n), dp.stage, deadline=1.0) is None  # exact already
    True
"""

from __future__ import annotations

import time as _time

import numpy as np

from modelparallel.partitioner.dp import _valid
from modelparallel.partitioner.evaluate import stage_costs
from modelparallel.partitioner.problem import Problem

__all__ = ["descend_cuts", "read_on_several_later_stages"]

#: Positions a cut may move either way in one step (each position is one evaluation).
WINDOW = 64


def read_on_several_later_stages(prob: Problem, stage: np.ndarray) -> bool:
    """Whether some value is read on two or more stages after its own (direct sends only).

    Example:
        >>> import numpy as np
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> from modelparallel.partitioner.problem import build_problem
        >>> from modelparallel.plan import PlanConfig
        >>> prob = build_problem(chain_graph(4), PlanConfig(partitions=2), "h100")
        >>> read_on_several_later_stages(prob, np.array([0, 0, 1, 1, 1]))
        False
    """
    if not prob.direct or not len(prob.edge_src):
        return False
    src, dst = prob.edge_src, prob.edge_dst
    later = stage[dst] > stage[src]
    pairs = np.unique(np.stack([src[later], stage[dst][later]]), axis=1)
    return bool(len(pairs[0]) > len(np.unique(pairs[0])))


def descend_cuts(prob: Problem, order: np.ndarray, stage: np.ndarray, *, deadline: float,
                 window: int = WINDOW) -> np.ndarray | None:
    """A better split of ``order`` than ``stage`` by moving its cuts (Note [cut descent]), or
    ``None`` when no move helps (or none can: every value read on at most one later stage).

    Args:
        prob: The problem.
        order: The topological order (node indices) that ``stage`` splits contiguously.
        stage: A valid assignment, contiguous in ``order`` (stages non-decreasing along it).
        deadline: Seconds from now after which no further move is tried.
        window: Positions each cut may move either way in one step.
    """
    if prob.p < 2 or not read_on_several_later_stages(prob, stage):
        return None
    end = _time.perf_counter() + deadline
    along = stage[order]
    assert np.all(np.diff(along) >= 0), "stage must be contiguous in order"
    cuts = [int(np.searchsorted(along, s)) for s in range(1, prob.p)]
    best = _objective(prob, order, cuts)
    start = best
    moved = True
    while moved and _time.perf_counter() < end:
        moved = False
        for k in range(prob.p - 1):
            lo = cuts[k - 1] if k else 0
            hi = cuts[k + 1] if k + 1 < len(cuts) else prob.n
            for c in range(max(lo, cuts[k] - window), min(hi, cuts[k] + window) + 1):
                if c == cuts[k]:
                    continue
                trial = [*cuts[:k], c, *cuts[k + 1:]]
                value = _objective(prob, order, trial)
                if value < best - 1e-12:
                    best, cuts, moved = value, trial, True
            if _time.perf_counter() >= end:
                break
    return _stages(prob, order, cuts) if best < start else None


def _stages(prob: Problem, order: np.ndarray, cuts: list[int]) -> np.ndarray:
    stage = np.empty(prob.n, dtype=np.int64)
    bounds = [0, *cuts, prob.n]
    for s in range(prob.p):
        stage[order[bounds[s]:bounds[s + 1]]] = s
    return stage


def _objective(prob: Problem, order: np.ndarray, cuts: list[int]) -> float:
    """The split's objective, infinite if it breaks a range, pin, colocation or memory cap."""
    stage = _stages(prob, order, cuts)
    if not _valid(prob, stage):
        return float("inf")
    _, memory, objective = stage_costs(prob, stage)
    return objective if np.all(memory <= prob.caps) else float("inf")
