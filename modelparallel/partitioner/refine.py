"""Op-level refinement around stage boundaries (Note [coarsening]).

Note [refinement]
~~~~~~~~~~~~~~~~~
After the coarse ILP, every boundary ``b`` sits between units. Refinement frees, op by op, the
units next to each boundary: units on stage ``b`` whose values cross it, units on ``b + 1``
that receive across it, the last unit of stage ``b`` and the first of ``b + 1`` in topological
order, and ``window`` units on either side of those in unit order. A freed op may move to any
stage between the lowest and highest boundary it was freed for (``[b, b + 1]`` for one
boundary), within its pins; every other op keeps its stage and is folded into one fixed item
per stage, which contributes constants. The ILP of Note [ILP formulation] over these items is
small (one or two binaries per freed op), is warm-started from the current assignment (so it
never gets worse), and can move each cut anywhere inside the freed units. Rounds repeat around
the new boundaries while they improve and time remains.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.partitioner.coarsen import make_units
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(transformer_graph(4), PlanConfig(partitions=2), "h100")
    >>> units = make_units(prob, 3)
    >>> free = boundary_units(prob, units, (units.unit_of >= len(units) // 2).astype(int), 0)
    >>> len(free) > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from modelparallel.partitioner.coarsen import Units
from modelparallel.partitioner.ilp import IlpResult, solve_items
from modelparallel.partitioner.problem import Problem
from modelparallel.partitioner.progress import ProgressEvent

__all__ = ["boundary_units", "refine_once"]


def boundary_units(prob: Problem, units: Units, stage: np.ndarray, window: int) -> dict[int, set[int]]:
    """Units to free per boundary (Note [refinement]): boundary index to unit indices."""
    p = prob.p
    src, dst = prob.edge_src, prob.edge_dst
    uo = units.unit_of
    k = len(units)
    out: dict[int, set[int]] = {}
    for b in range(p - 1):
        chosen: set[int] = set()
        crosses = (stage[src] <= b) & (stage[dst] > b)
        chosen.update(uo[src[crosses]][stage[src[crosses]] == b].tolist())
        chosen.update(uo[dst[crosses]][stage[dst[crosses]] == b + 1].tolist())
        on_b = np.nonzero(stage == b)[0]
        on_next = np.nonzero(stage == b + 1)[0]
        if len(on_b):
            chosen.add(int(uo[on_b.max()]))
        if len(on_next):
            chosen.add(int(uo[on_next.min()]))
        for u in list(chosen):
            for d in range(1, window + 1):
                for v in (u - d, u + d):
                    if 0 <= v < k:
                        chosen.add(v)
        # Keep only units that lie on the two stages of this boundary.
        out[b] = {u for u in chosen
                  if set(np.unique(stage[units.members[u]]).tolist()) <= {b, b + 1}}
    return out


def refine_once(prob: Problem, units: Units, stage: np.ndarray, *, window: int,
                time_limit: float, solver: str,
                progress: Callable[[ProgressEvent], None] | None,
                stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, IlpResult]:
    """One refinement round; returns the new assignment (never worse in the ILP's objective).
    ``stop`` is polled during the search (:func:`~modelparallel.partitioner.ilp.solve_items`)."""
    p = prob.p
    free_lo = np.full(prob.n, p, dtype=np.int64)
    free_hi = np.full(prob.n, -1, dtype=np.int64)
    for b, us in boundary_units(prob, units, stage, window).items():
        for u in us:
            m = units.members[u]
            free_lo[m] = np.minimum(free_lo[m], b)
            free_hi[m] = np.maximum(free_hi[m], b + 1)
    free = free_hi >= 0
    lo = np.where(free, np.maximum(free_lo, prob.lo), stage)
    hi = np.where(free, np.minimum(free_hi, prob.hi), stage)
    lo = np.minimum(lo, stage)
    hi = np.maximum(hi, stage)
    items: list[np.ndarray] = []
    item_lo: list[int] = []
    item_hi: list[int] = []
    for s in range(p):
        fixed = np.nonzero(~free & (stage == s))[0]
        if len(fixed):
            items.append(fixed)
            item_lo.append(s)
            item_hi.append(s)
    free_idx = np.nonzero(free)[0]
    for v in free_idx:
        items.append(np.array([v]))
        item_lo.append(int(lo[v]))
        item_hi.append(int(hi[v]))
    warm = np.array([int(stage[m[0]]) for m in items], dtype=np.int64)
    res = solve_items(prob, items, np.array(item_lo), np.array(item_hi), warm=warm,
                      time_limit=time_limit, solver=solver, progress=progress, phase="refine",
                      stop=stop)
    new = stage.copy()
    if res.item_stage is not None:
        for a, m in enumerate(items):
            new[m] = res.item_stage[a]
    return new, res
