"""One deadline for a whole planner call (Note [whole-call deadline]).

Note [whole-call deadline]
~~~~~~~~~~~~~~~~~~~~~~~~~~
``config.time_limit`` bounds one :func:`~modelparallel.partitioner.partition` call as a whole,
not each stage of it: the DP, the coarse and refinement ILPs and the proven bound share one
:class:`Deadline`, started when the call starts. A stage that may stop early (the DP's passes,
an ILP, the windowed bound model) is given the time left until its share of the limit ends,
measured when it starts solving (after building its model, which no solver time limit covers);
an optional stage whose time is already spent is skipped rather than given a minimum (a coarse
ILP given half a second still spends seconds building its model; a refinement round starts
only with ``_REFINE_MIN`` of the limit left of its share); and the bound's windowed model ends at
``_BOUND_END`` (90%) of the limit, its interior point method earlier still (it checks the time
between iterations, seconds apart on 10,000 ops): the reserve covers that overrun, evaluating
the result and making the plan. Fixed costs that cannot be interrupted
(building the problem, one DP pass, the stage windows) still count, so a call may run past the
limit by about one such step. The scale rows of ``benchmarks/partition_quality.py`` (10,000-op
graphs at p = 16 and 32, 60 s) check it.

Example:
    >>> t = [0.0]
    >>> d = Deadline(10.0, now=lambda: t[0])   # starts at t = 0
    >>> t[0] = 1.0
    >>> d.elapsed(), d.until(0.5)              # 4 s left of the first half
    (1.0, 4.0)
    >>> t[0] = 7.0
    >>> d.budget(0.5, minimum=1.0) is None     # the first half is spent: skip that stage
    True
    >>> d.left()
    3.0
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable

__all__ = ["Deadline"]


class Deadline:
    """The time budget of one planner call (Note [whole-call deadline]).

    Args:
        limit: Seconds for the whole call (``config.time_limit``).
        now: Clock in seconds (default :func:`time.perf_counter`; injectable for tests).
    """

    def __init__(self, limit: float, *, now: Callable[[], float] = _time.perf_counter) -> None:
        self.limit = float(limit)
        self._now = now
        self.start = now()

    def elapsed(self) -> float:
        """Seconds since the call started."""
        return self._now() - self.start

    def until(self, share: float) -> float:
        """Seconds left until ``share`` of the limit has passed (never negative)."""
        return max(0.0, share * self.limit - self.elapsed())

    def left(self) -> float:
        """Seconds left of the whole limit (never negative)."""
        return self.until(1.0)

    def budget(self, share: float, *, minimum: float = 0.0) -> float | None:
        """Seconds a stage ending at ``share`` of the limit may take, or ``None`` when fewer
        than ``minimum`` are left (skip the stage)."""
        left = self.until(share)
        return left if left > 0 and left >= minimum else None

    def at(self, share: float) -> float:
        """The clock reading at which ``share`` of the limit has passed."""
        return self.start + share * self.limit
