"""The short op-level refinement of the first incumbent (step 2 of Note [ILP pipeline] in
``methods.py``), on a thread of its own while the cut descents run.

Note [polish alongside]
~~~~~~~~~~~~~~~~~~~~~~~
The polish (one op-level refinement round around the stage boundaries of the best split so
far, Note [refinement]) used to start after every cut descent had ended, with
``_POLISH_SHARE`` of the time limit, which on some models is too short for the round that
finds the plan the proofs then certify. Everything before the proof phases runs on one core
(the DP, the descents and the stage windows are Python), so on a machine with a second core
the polish now starts as soon as the best split's own descent has ended, on the best
assignment then known, and solves beside the other descents (HiGHS releases the GIL while it
solves). Meanwhile, once the descents are done, the calling thread computes the stage windows
of the incumbent and of the first proof phase's target (``methods._prefetch``), which stand
unless the polish improves the incumbent. The polish is then given what it always had: until
``_POLISH_SHARE`` of the limit after the descents ended (the wall-clock end of the sequential
polish), and at most ``_POLISH_ALONGSIDE`` of the limit from its start (HiGHS's own time
limit: the stop is polled by its interrupt callback, which its root node calls only now and
then). When a later descent's assignment beats both the polish's start and its result, that
one is polished afterwards with the same share. With one core (``WORKERS == 1``), or no
descent to overlap, the polish runs in sequence as it did. Figures: ``docs/measurements.md``,
"Polish alongside the descents".

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.partitioner.dp import solve_dp
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(transformer_graph(4), PlanConfig(partitions=2), "h100")
    >>> start = solve_dp(prob).stage
    >>> job = BackgroundPolish(prob, start, time_limit=5.0)
    >>> new = job.finish(within=5.0)      # the descents would run here
    >>> new is None or new.shape == start.shape
    True
"""

from __future__ import annotations

import threading
import time as _time
from collections.abc import Callable

import numpy as np

from modelparallel.partitioner.coarsen import auto_depth, make_units
from modelparallel.partitioner.problem import Problem
from modelparallel.partitioner.progress import ProgressEvent
from modelparallel.partitioner.refine import boundary_units, refine_once

__all__ = ["POLISH_NODES", "BackgroundPolish", "polish"]

#: Nodes freed above which the polish is skipped: it is not a local search any more, and the
#: proof phases search that space anyway.
POLISH_NODES = 1000


def polish(prob: Problem, stage: np.ndarray, *, time_limit: float,
           progress: Callable[[ProgressEvent], None] | None = None,
           stop: Callable[[], bool] | None = None) -> np.ndarray | None:
    """One op-level refinement round of ``stage`` around its boundaries (Note [refinement]).

    Args:
        prob: The problem.
        stage: The assignment to refine (node -> stage).
        time_limit: Seconds for building and solving the round.
        progress: Progress events of the round's ILP (phase ``"refine"``).
        stop: Polled during the search: once true, the round stops as at its time limit.

    Returns:
        The refined assignment (never worse under the ILP's objective), or ``None`` when the
        round was skipped (one stage, too many nodes freed) or found no assignment.
    """
    if prob.p < 2:
        return None
    units = make_units(prob, auto_depth(prob))
    freed = sum(len(units.members[u]) for us in boundary_units(prob, units, stage, 0).values()
                for u in us)
    if freed > POLISH_NODES:
        return None
    new, res = refine_once(prob, units, stage, window=0, time_limit=time_limit,
                           solver=prob.config.solver, progress=progress, stop=stop)
    return new if res.item_stage is not None else None


class BackgroundPolish:
    """:func:`polish` of ``stage`` on a thread, until :meth:`finish` says when to end (Note
    [polish alongside]).

    Args:
        prob: The problem.
        stage: The assignment to refine.
        time_limit: The most seconds the round may take from now, whatever :meth:`finish`
            says later (HiGHS's own limit: its root node does not poll for a stop).
    """

    def __init__(self, prob: Problem, stage: np.ndarray, *, time_limit: float) -> None:
        self.stage = stage.copy()
        self._end: float | None = None
        self._result: np.ndarray | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(prob, time_limit),
                                        name="ilp-polish", daemon=True)
        self._thread.start()

    def _stop(self) -> bool:
        return self._end is not None and _time.perf_counter() > self._end

    def _run(self, prob: Problem, time_limit: float) -> None:
        try:
            self._result = polish(prob, self.stage, time_limit=time_limit, stop=self._stop)
        except BaseException as e:  # re-raised in the caller's thread by finish()
            self._error = e

    def finish(self, within: float) -> np.ndarray | None:
        """End the round at most ``within`` seconds from now and return what it found (as
        :func:`polish`); errors of the round are raised here."""
        self._end = _time.perf_counter() + max(0.0, within)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
