"""Playing a schedule against stage times: the predicted timeline and bubble.

See the package docstring (:mod:`modelparallel.schedule`) for the notes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modelparallel.errors import ConfigError
from modelparallel.schedule._types import Action, Schedule, play_order

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
             wgrad_fraction: float | Sequence[float] = DEFAULT_WGRAD_FRACTION,
             links: Iterable[tuple[int, int]] | None = None,
             host_time: float | Sequence[float] = 0.0) -> Timeline:
    """Play ``schedule`` with per-stage forward/backward seconds and a per-transfer latency.

    Each rank runs its list in order; an action starts when its rank is free and its inputs
    have arrived (``comm_time`` after each producing action ended): ``F(t, i)`` waits for
    ``F(s, i)`` of every stage ``s`` that sends ``t`` values, ``B(s, i)`` for ``B(t, i)`` of
    every such ``t`` (Note [message channels] in ``modelparallel/runtime/channels.py``).
    A split backward's ``I`` takes ``(1 - wgrad_fraction)`` of the stage's backward time and its
    ``W`` the rest (Note [split backward]). ``host_time`` charges each action the host work that
    follows its compute on its rank (posting its messages and the next receives, bookkeeping):
    the rank starts nothing else meanwhile, its messages still leave when the compute ends, and
    the time counts as idle in the bubble (it is not compute).

    Args:
        schedule: The schedule (validated first).
        fwd_times: Forward seconds per microbatch, one for all stages or one per stage.
        bwd_times: Whole-backward seconds per microbatch, likewise.
        comm_time: Seconds per boundary transfer (activations forward, gradients backward).
        wgrad_fraction: Share of the backward that is weight-gradient work, one for all stages
            or one per stage.
        links: The ``(sending stage, receiving stage)`` pairs that exchange values (a direct
            plan's boundaries); ``None``: neighbours ``(s, s + 1)``, as under relaying.
        host_time: Host seconds after each action of a stage before its rank starts the next
            one, one for all stages or one per stage (``benchmarks/bubble.py`` measures it).

    Raises:
        ConfigError: if the schedule is invalid or the time lists have the wrong length.

    Example:
        >>> from modelparallel.schedule import one_f_one_b, zb_h1
        >>> t = simulate(one_f_one_b(2, 2), 1.0, 1.0)
        >>> t.makespan, round(t.bubble_fraction, 3)
        (6.0, 0.333)
        >>> simulate(zb_h1(2, 2), 1.0, 2.0).makespan
        7.0
        >>> [simulate(one_f_one_b(3, 1), 1.0, 1.0, 0.5, links=pairs).makespan
        ...  for pairs in (None, [(0, 2)])]  # relayed through stage 1, or sent past it
        [8.0, 5.0]
        >>> simulate(one_f_one_b(2, 2), 1.0, 1.0, host_time=0.25).makespan  # 3 actions' host
        6.75
    """
    schedule.validate()
    n, p = schedule.num_stages, schedule.num_ranks
    fwd, bwd = _per_stage(fwd_times, n, "fwd_times"), _per_stage(bwd_times, n, "bwd_times")
    wf = _per_stage(wgrad_fraction, n, "wgrad_fraction")
    host = _per_stage(host_time, n, "host_time")
    if any(w > 1 for w in wf):
        raise ConfigError(f"wgrad_fraction must be in [0, 1], got {wgrad_fraction!r}")
    if comm_time < 0:
        raise ConfigError(f"comm_time = {comm_time} must be >= 0")
    pairs = set(links) if links is not None else {(s, s + 1) for s in range(n - 1)}
    if any(not 0 <= s < t < n for s, t in pairs):
        raise ConfigError(f"links {sorted(pairs)} must be pairs of stages s < t of {n}")
    sources = {t: sorted(s for s, u in pairs if u == t) for t in range(n)}
    readers = {s: sorted(t for u, t in pairs if u == s) for s in range(n)}
    ends: dict[tuple[int, str, int], float] = {}
    entries: list[list[TimelineEntry]] = [[] for _ in range(p)]
    free = [0.0] * p
    # play_order follows the neighbour dependencies, which every link's dependency follows
    # transitively (Note [message channels]): every producer ends before its consumer starts
    for a in play_order(schedule):
        s, r = a.stage, schedule.rank_of(a.stage)
        deps = ([] if a.kind == "W" else [(q, "F") for q in sources[s]] if a.kind == "F"
                else [(q, "B") for q in readers[s]])
        ready = max((ends[(q, k, a.microbatch)] + comm_time for q, k in deps), default=0.0)
        took = {"F": fwd[s], "B": bwd[s], "I": bwd[s] * (1 - wf[s]), "W": bwd[s] * wf[s]}[a.kind]
        start = max(free[r], ready)
        end = start + took
        free[r] = end + host[s]
        ends[(s, "B" if a.kind == "I" else a.kind, a.microbatch)] = end
        entries[r].append(TimelineEntry(a, start, end))
    makespan = max((lst[-1].end for lst in entries if lst), default=0.0)
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
