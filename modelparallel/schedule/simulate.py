"""Playing a schedule against stage times: the predicted timeline and bubble.

See the package docstring (:mod:`modelparallel.schedule`) for the notes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modelparallel.errors import ConfigError
from modelparallel.schedule._types import Action, Schedule, dependency, play_order

__all__ = ["DEFAULT_WGRAD_FRACTION", "Timeline", "TimelineEntry", "simulate"]

#: Share of a backward that is weight-gradient work (``W``) when a schedule splits it (Note
#: [split backward]): a matrix product's backward is two products of the same size, one for the
#: input gradient and one for the weight gradient.
DEFAULT_WGRAD_FRACTION = 0.5


@dataclass(frozen=True)
class TimelineEntry:
    """One action's place in a simulated step.

    Attributes:
        action: The action.
        start: Seconds from the start of the step.
        end: Seconds from the start of the step.
    """

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """A simulated step.

    Attributes:
        schedule: The schedule played.
        entries: Per rank (per stage when each rank runs one), its actions with start and end
            times, in execution order.
        makespan: Seconds from the first start to the last end.
        busy: Per rank, seconds of compute.
    """

    schedule: Schedule
    entries: tuple[tuple[TimelineEntry, ...], ...]
    makespan: float
    busy: tuple[float, ...]

    @property
    def stage_bubbles(self) -> tuple[float, ...]:
        """Per rank, the idle fraction of the step."""
        if self.makespan <= 0:
            return tuple(0.0 for _ in self.busy)
        return tuple(1.0 - b / self.makespan for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of all ranks together: ``1 - sum(busy) / (p * makespan)``."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: Schedule, fwd_times: float | Sequence[float],
             bwd_times: float | Sequence[float], comm_time: float = 0.0, *,
             wgrad_fraction: float | Sequence[float] = DEFAULT_WGRAD_FRACTION) -> Timeline:
    """Play ``schedule`` with per-stage forward/backward seconds and a per-transfer latency.

    Each rank runs its list in order; an action starts when its rank is free and its input has
    arrived (``comm_time`` after the producing action ended, for values crossing a boundary).
    A split backward's ``I`` takes ``(1 - wgrad_fraction)`` of the stage's backward time and its
    ``W`` the rest (Note [split backward]).

    Args:
        schedule: The schedule (validated first).
        fwd_times: Forward seconds per microbatch, one for all stages or one per stage.
        bwd_times: Whole-backward seconds per microbatch, likewise.
        comm_time: Seconds per boundary transfer (activations forward, gradients backward).
        wgrad_fraction: Share of the backward that is weight-gradient work, one for all stages
            or one per stage.

    Raises:
        ConfigError: if the schedule is invalid or the time lists have the wrong length.

    Example:
        >>> from modelparallel.schedule import one_f_one_b, zb_h1
        >>> t = simulate(one_f_one_b(2, 2), 1.0, 1.0)
        >>> t.makespan, round(t.bubble_fraction, 3)
        (6.0, 0.333)
        >>> simulate(zb_h1(2, 2), 1.0, 2.0).makespan
        7.0
    """
    schedule.validate()
    n, p = schedule.num_stages, schedule.num_ranks
    fwd, bwd = _per_stage(fwd_times, n, "fwd_times"), _per_stage(bwd_times, n, "bwd_times")
    wf = _per_stage(wgrad_fraction, n, "wgrad_fraction")
    if any(w > 1 for w in wf):
        raise ConfigError(f"wgrad_fraction must be in [0, 1], got {wgrad_fraction!r}")
    if comm_time < 0:
        raise ConfigError(f"comm_time = {comm_time} must be >= 0")
    ends: dict[tuple[int, str, int], float] = {}
    entries: list[list[TimelineEntry]] = [[] for _ in range(p)]
    free = [0.0] * p
    for a in play_order(schedule):  # every dependency ends before its consumer starts
        s, r = a.stage, schedule.rank_of(a.stage)
        dep = dependency(a, n)
        ready = (ends[(dep.stage, dep.kind, dep.microbatch)] + comm_time if dep is not None
                 else 0.0)
        took = {"F": fwd[s], "B": bwd[s], "I": bwd[s] * (1 - wf[s]), "W": bwd[s] * wf[s]}[a.kind]
        start = max(free[r], ready)
        free[r] = start + took
        ends[(s, "B" if a.kind == "I" else a.kind, a.microbatch)] = free[r]
        entries[r].append(TimelineEntry(a, start, free[r]))
    makespan = max(free)
    busy = tuple(sum(e.end - e.start for e in lst) for lst in entries)
    return Timeline(schedule, tuple(tuple(lst) for lst in entries), makespan, busy)


def _per_stage(value: float | Sequence[float], n: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * n
    else:
        values = [float(v) for v in value]
    if len(values) != n or any(v < 0 for v in values):
        raise ConfigError(f"{what} must be one non-negative number or {n} of them, got {value!r}")
    return values
