"""A proof phase of the op-level ILP split into pieces that threads solve side by side.

Note [proof in pieces]
~~~~~~~~~~~~~~~~~~~~~~
A proof phase of Note [ILP pipeline] (``methods.py``) asks whether some assignment within the
stage windows has an objective below a target. That question splits exactly: for any item
``a`` and stage ``s``, every assignment puts ``a`` on a stage ``<= s`` or ``>= s + 1``, so the
searches with ``hi[a] = s`` and with ``lo[a] = s + 1`` cover the whole between them. Nothing
is below the target if neither finds anything, the least of the two bounds bounds the whole,
and the better of their finds is the whole's. The pieces are narrower problems, not copies:
measured on Llama-small, their solve times add up to about that of the unsplit search. Split
``k`` times, the search becomes ``2^k`` independent solves.

The split follows the pipeline's shape. A piece spans a share ``[f0, f1]`` of the compute
(the whole spans ``[0, 1]``); it is cut at the item where the cumulative compute reaches the
share's middle, between the stages on which that much compute would end in a balanced split
(the first cut: half the compute, the middle boundary). :data:`WORKERS` threads solve the
pieces (HiGHS releases the GIL while it solves), starting from two pieces per thread, as the
pieces' difficulty is uneven. A thread left with nothing to do takes a half of the piece that
has run longest, which goes on running: whichever answers first decides, and searches whose
question is answered (by their own or by enclosing pieces) are stopped. So no thread idles
while a straggler runs, and nothing is lost when the straggler wins. With one worker there is
one piece: the plain search.

Note [memory sides]
~~~~~~~~~~~~~~~~~~~
The question also splits on the objective ``(1 - w) t + w u`` itself: every assignment has its
memory term ``u`` at most some ``U`` or at least ``U``. On the first side the memory caps are
``U``; on the second ``u >= U`` is a floor of the objective, so only a time term below
``(target - w U) / (1 - w)`` can beat the target. Each side's stage windows are narrower than
the whole's (``bounds.window_for`` with a memory range), and so are its LP relaxations: the
relaxation of the whole trades a fractional time term against a fractional memory term, which
the floor or the caps take away. A proof phase splits on memory first, then on items, when
the memory term weighs in its incumbent at least as much as the time term (``u >= t``), at
``U = u / (1 + g)`` for a phase of gap ``g``: the memory term improved by the factor the whole
must improve by. Measured: ``docs/measurements.md``, Note [memory sides].

Every piece gets the same deadline and the same target, and no progress callback (a piece's
bound is not the whole's); the calling thread reports each piece that ends. Beyond the first
``workers``, none starts in the last :data:`_LATE_START` seconds. A phase is
complete when every piece is answered. When the deadline stops it, a piece's bound is the
larger of its own search's dual bound and the least of its halves' bounds; the whole has none
when a piece of it has none (one that never started). Figures: ``docs/measurements.md``,
"Proofs in pieces".

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.coarsen import singletons
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> u = singletons(prob)
    >>> len(split_ranges(prob, u.members, u.lo, u.hi, 4))
    4
    >>> out = solve_pieces(prob, u.members, u.lo, u.hi, target=1.0, gap_rel=1e-4,
    ...                    time_limit=5, workers=2)
    >>> out.complete, out.found, out.bound   # nothing below 1.0: the optimum is 1.48
    (True, (), 1.0)
"""

from __future__ import annotations

import os
import threading
import time as _time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from modelparallel.partitioner._ilp_model import propagate_ranges
from modelparallel.partitioner.ilp import IlpResult, solve_items
from modelparallel.partitioner.problem import Problem

__all__ = ["WORKERS", "MemorySide", "PiecesOutcome", "solve_pieces", "split_ranges"]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Threads that solve the pieces of one proof phase (at most 4: more pieces add root-node work
#: and balance worse; see Note [proof in pieces]).
WORKERS = max(1, min(4, _cores()))

#: Seconds before the deadline after which no further piece starts (the first ``workers``
#: always do): a piece builds its model before its solver's time limit applies and then gets at
#: least half a second, so one started later overruns the phase; a half of a running piece
#: started then rarely answers before the piece itself would.
_LATE_START = 1.0


@dataclass(frozen=True, eq=False)
class PiecesOutcome:
    """What the pieces of one proof phase found, together.

    Attributes:
        complete: Whether every piece's search ended (``"optimal"`` or ``"infeasible"``).
        found: Every assignment below the target that a piece found (item stages, by piece).
        bound: A lower bound on every assignment within the ranges: the target when the search
            is complete and found nothing, otherwise the least of the pieces' bounds (each at
            most the target); ``None`` when some piece has none.
        results: Every piece's solve that ran (stopped ones included).
        pieces: Searches started.
        seconds: Wall time of the phase.
    """

    complete: bool
    found: tuple[np.ndarray, ...]
    bound: float | None
    results: tuple[IlpResult, ...]
    pieces: int
    seconds: float

    def __post_init__(self) -> None:
        assert self.bound is None or np.isfinite(self.bound)


@dataclass(frozen=True, eq=False)
class MemorySide:
    """One side of a proof split on the objective's memory term (Note [memory sides]).

    Attributes:
        memory: The range ``(at least, at most)`` of the memory term ``u`` on this side.
        lo: Smallest stage per item of the assignments on this side below the target.
        hi: Largest stage per item, likewise.
    """

    memory: tuple[float, float]
    lo: np.ndarray
    hi: np.ndarray

    def __post_init__(self) -> None:
        assert self.memory[0] <= self.memory[1] and self.lo.shape == self.hi.shape


def split_ranges(prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray,
                 pieces: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Item ranges of up to ``pieces`` searches that together cover ``lo``/``hi`` (Note [proof
    in pieces]): halves, then halves of those, while that stays within ``pieces``. Fewer come
    back when no item is left to split on."""
    root = _Piece(lo.copy(), hi.copy(), 0.0, 1.0)
    return [(q.lo, q.hi) for q in _split_levels(_Cutter(prob, items), root, pieces)]


def _split_levels(cut: _Cutter, root: _Piece, pieces: int) -> list[_Piece]:
    """The leaves of ``root`` cut in halves level by level while that stays within ``pieces``
    (each cut piece keeps its halves as children; children it has already are its first
    level)."""
    level = list(root.children) or [root]  # a copy: the caller pops the queue it returns
    while 2 * len(level) <= pieces:
        nxt = []
        for piece in level:
            piece.children = cut.halves(piece)
            nxt += piece.children or [piece]
        if len(nxt) == len(level):
            break
        level = nxt
    return level


@dataclass(eq=False)
class _Piece:
    """One search of a phase: item ranges, the share ``[f0, f1]`` of the compute it spans (where
    it is cut next), the halves it was split into, and its solve."""

    lo: np.ndarray
    hi: np.ndarray
    f0: float
    f1: float
    parent: _Piece | None = None
    memory: tuple[float, float] | None = None  # Note [memory sides]
    children: list[_Piece] = field(default_factory=list)
    result: IlpResult | None = None
    started: float = np.inf
    stop: threading.Event = field(default_factory=threading.Event)

    def complete(self) -> bool:
        """Whether this piece's question is answered: by its own search or by its halves."""
        own = self.result is not None and self.result.status in ("optimal", "infeasible")
        return own or (bool(self.children) and all(c.complete() for c in self.children))

    def moot(self) -> bool:
        """Whether an enclosing piece is already answered."""
        q = self.parent
        while q is not None:
            if q.complete():
                return True
            q = q.parent
        return False

    def bound(self, target: float) -> float | None:
        """The best valid bound on this piece's assignments: its own search's, or the least of
        its halves' (the larger of the two)."""
        r = self.result
        if r is not None and r.status == "infeasible":
            return target
        own = None if r is None or r.bound is None else min(target, float(r.bound))
        if r is not None and r.status == "optimal":
            return own
        halves = [c.bound(target) for c in self.children]
        known = [] if own is None else [own]
        if halves and all(b is not None for b in halves):
            known.append(min(b for b in halves if b is not None))
        return max(known) if known else None

    def subtree(self) -> list[_Piece]:
        return [self] + [q for c in self.children for q in c.subtree()]


class _Cutter:
    """Cuts pieces in halves at their share's middle (Note [proof in pieces])."""

    def __init__(self, prob: Problem, items: Sequence[np.ndarray]) -> None:
        self.prob = prob
        self.item_of = np.empty(prob.n, dtype=np.int64)
        for a, m in enumerate(items):
            self.item_of[m] = a
        cost = prob.fwd.min(axis=1) + prob.bwd.min(axis=1)
        work = np.array([float(cost[m].sum()) for m in items])
        total = float(work.sum())
        self.cum = np.cumsum(work) / total if total > 0 else np.linspace(0, 1, len(items))

    def halves(self, piece: _Piece) -> list[_Piece]:
        """The two halves of ``piece`` (empty when no item has a choice left)."""
        fm = (piece.f0 + piece.f1) / 2
        free = np.flatnonzero(piece.hi > piece.lo)
        if len(free) == 0:
            return []
        a = int(free[np.argmin(np.abs(self.cum[free] - fm))])
        s = min(max(round(fm * self.prob.p) - 1, int(piece.lo[a])), int(piece.hi[a]) - 1)
        left_hi = piece.hi.copy()
        left_hi[a] = s
        right_lo = piece.lo.copy()
        right_lo[a] = s + 1
        left = propagate_ranges(self.prob, self.item_of, piece.lo.copy(), left_hi)
        right = propagate_ranges(self.prob, self.item_of, right_lo, piece.hi.copy())
        return [_Piece(*left, piece.f0, fm, parent=piece, memory=piece.memory),
                _Piece(*right, fm, piece.f1, parent=piece, memory=piece.memory)]


def solve_pieces(prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray, *,
                 target: float, gap_rel: float, time_limit: float, solver: str = "highs",
                 workers: int = WORKERS,
                 report: Callable[[int, IlpResult], None] | None = None,
                 sides: Sequence[MemorySide] = ()) -> PiecesOutcome:
    """Search for assignments below ``target`` within ``lo``/``hi``, in pieces on ``workers``
    threads (Note [proof in pieces]).

    Args:
        prob: The problem.
        items: Node indices of each item (:func:`~modelparallel.partitioner.ilp.solve_items`).
        lo: Smallest stage per item.
        hi: Largest stage per item.
        target: The cutoff: only assignments below it are searched for.
        gap_rel: Relative MIP gap of each piece.
        time_limit: Seconds for the whole phase (one deadline for every piece).
        solver: ``"highs"`` or ``"cbc"``.
        workers: Threads; ``1`` solves the ranges whole.
        report: Called in the calling thread with (pieces started so far, result) as each
            piece ends.
        sides: Ranges of the memory term that together cover every assignment, each with its
            own item ranges within ``lo``/``hi`` (Note [memory sides]): the first split of the
            search. Empty: the search is split on items only.

    Returns:
        The pieces' outcome together.
    """
    t0 = _time.perf_counter()
    deadline = t0 + time_limit
    cut = _Cutter(prob, items)
    root = _Piece(lo.copy(), hi.copy(), 0.0, 1.0)

    def run(piece: _Piece) -> IlpResult:
        left = deadline - _time.perf_counter()
        return solve_items(prob, items, piece.lo, piece.hi, time_limit=max(0.5, left),
                           solver=solver, gap_rel=gap_rel, cutoff=target,
                           stop=piece.stop.is_set, memory=piece.memory)

    root.children = [_Piece(*propagate_ranges(prob, cut.item_of, np.maximum(lo, side.lo),
                                              np.minimum(hi, side.hi)),
                            0.0, 1.0, parent=root, memory=side.memory) for side in sides]
    if workers <= 1:
        for q in root.children or [root]:
            q.result = run(q)
            if report is not None:
                report(1, q.result)
        return _outcome(root, target, max(1, len(root.children)), _time.perf_counter() - t0)
    queue = _split_levels(cut, root, 2 * workers)  # two pieces per worker to start with
    started = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilp-piece") as pool:
        running: dict[Future[IlpResult], _Piece] = {}
        while True:
            while len(running) < workers and _time.perf_counter() < deadline - (
                    0.05 if started < workers else _LATE_START):
                todo = _next(queue, running, cut)
                if todo is None:
                    break
                todo.started = _time.perf_counter()
                running[pool.submit(run, todo)] = todo
                started += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                piece = running.pop(fut)
                piece.result = fut.result()
                if report is not None:
                    report(started, piece.result)
            for piece in running.values():  # answered elsewhere: stop its search
                if piece.complete() or piece.moot():
                    piece.stop.set()
            if root.complete():
                for piece in running.values():
                    piece.stop.set()
    return _outcome(root, target, started, _time.perf_counter() - t0)


def _next(queue: list[_Piece], running: dict[Future[IlpResult], _Piece],
          cut: _Cutter) -> _Piece | None:
    """The next piece to start: a queued one still open, else the halves of the open running
    piece that has run longest (it goes on; whichever answers first decides)."""
    while queue:
        piece = queue.pop(0)
        if not (piece.complete() or piece.moot()):
            return piece
    leaves = [q for q in running.values() if not q.children and not q.stop.is_set()]
    for victim in sorted(leaves, key=lambda q: q.started):
        halves = cut.halves(victim)
        if halves:
            victim.children = halves
            queue.extend(halves)
            return queue.pop(0)
    return None


def _outcome(root: _Piece, target: float, started: int, seconds: float) -> PiecesOutcome:
    pieces = root.subtree()
    results = tuple(q.result for q in pieces if q.result is not None)
    found = tuple(r.item_stage for r in results
                  if r.item_stage is not None and r.objective is not None
                  and r.objective < target)
    return PiecesOutcome(root.complete(), found, root.bound(target), results, started, seconds)
