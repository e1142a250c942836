"""Pipeline schedules: the order in which each stage runs its forwards and backwards.

Schedules are a specification that the cost model, the report and the runtime all read, so they
live in the framework-free core (no deep-learning framework is imported here). This module holds
the schedule names (ours and SMP's, :func:`normalize_schedule`), the in-flight-microbatch rule
(:func:`inflight_microbatches`, Note [in-flight microbatches]), the :class:`Action` type both
executors run, and the action lists themselves.

A :class:`Schedule` holds one list of :class:`Action` values per stage. :func:`gpipe` (SMP
``"simple"``) runs every forward, then every backward; :func:`one_f_one_b` (SMP
``"interleaved"``) runs backward-first: ``p - s - 1`` warm-up forwards on stage ``s``, then
alternates one forward and one backward, then drains the remaining backwards. :func:`simulate`
plays a schedule against per-stage compute times and a link latency to predict its timeline and
bubble.

Note [schedule communication model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The runtime (``modelparallel/runtime/executor.py``) runs each stage's list in order. Sends are
asynchronous: a stage posts an activation (after a forward) or a gradient (after a backward) and
goes on; receives block: ``F(s, i)`` waits for the activations of ``F(s - 1, i)`` and ``B(s, i)``
for the gradients of ``B(s + 1, i)``. :meth:`Schedule.validate` checks deadlock freedom under
exactly this model, by simulation: a schedule passes when every stage can run its whole list
with blocking receives and buffered sends. (With rendezvous sends, where a send blocks until the
peer posts the matching receive, classic 1F1B deadlocks on two stages; our sends never block.)

Note [in-flight microbatches]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
How many microbatches' activations stage ``i`` of ``p`` holds at its peak with ``m``
microbatches: GPipe runs every forward before any backward, so every stage holds all ``m``;
1F1B lets stage ``i`` run at most ``p - i`` forwards ahead of its backwards, so it holds
``min(m, p - i)``. :func:`inflight_microbatches` is the one statement of the rule: the cost
model's activation memory (``modelparallel/cost_model/costs.py``, the partitioner's
``Problem.inflight``), the plan's ``StageEstimate.inflight_microbatches`` and
:meth:`Schedule.validate` all read it, and :func:`one_f_one_b` builds lists that meet it.

Example:
    >>> s = one_f_one_b(2, 3)
    >>> print(s)
    1f1b p=2 m=3
    0: 0F0 0F1 0B0 0F2 0B1 0B2
    1: 1F0 1B0 1F1 1B1 1F2 1B2
    >>> Schedule.parse(str(s)) == s
    True
    >>> round(simulate(gpipe(4, 4), 1.0, 2.0).bubble_fraction, 4)
    0.4286
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelparallel.errors import ConfigError

__all__ = [
    "SCHEDULE_ALIASES",
    "Action",
    "Schedule",
    "Timeline",
    "TimelineEntry",
    "gpipe",
    "inflight_microbatches",
    "make_schedule",
    "normalize_schedule",
    "one_f_one_b",
    "simulate",
    "theoretical_bubble",
]

#: Accepted schedule names, ours and SMP's, to ours: SMP's ``"simple"`` is GPipe and its
#: ``"interleaved"`` is 1F1B.
SCHEDULE_ALIASES: Mapping[str, str] = {
    "gpipe": "gpipe", "simple": "gpipe",
    "1f1b": "1f1b", "interleaved": "1f1b",
}

_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FB])\s*(\d+)\s*$")
_HEADER_RE = re.compile(r"^\s*(\S+)\s+p=(\d+)\s+m=(\d+)\s*$")
_LINE_RE = re.compile(r"^\s*(\d+)\s*:(.*)$")


def normalize_schedule(name: str) -> str:
    """Our name for a schedule given by our name or SMP's.

    Raises:
        ConfigError: for a name that is neither.

    Example:
        >>> normalize_schedule("simple"), normalize_schedule("Interleaved")
        ('gpipe', '1f1b')
    """
    try:
        return SCHEDULE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown schedule {name!r}; use 'gpipe' (SMP 'simple') or '1f1b' "
            "(SMP 'interleaved')") from None


def inflight_microbatches(schedule: str, microbatches: int, partitions: int, stage: int) -> int:
    """How many microbatches' activations stage ``stage`` holds at its peak (Note [in-flight
    microbatches]).

    GPipe runs every forward before any backward, so every stage holds all ``m``. 1F1B lets stage
    ``i`` (0-based) run at most ``p - i`` forwards ahead of its backwards: ``min(m, p - i)``.

    Raises:
        ConfigError: for an unknown schedule name or a stage outside ``0..p-1``.

    Example:
        >>> [inflight_microbatches("1f1b", 8, 4, i) for i in range(4)]
        [4, 3, 2, 1]
        >>> inflight_microbatches("gpipe", 8, 4, 3)
        8
    """
    if not 0 <= stage < partitions:
        raise ConfigError(f"stage {stage} is outside 0..{partitions - 1}")
    if normalize_schedule(schedule) == "gpipe":
        return microbatches
    return min(microbatches, partitions - stage)


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work of one stage.

    Attributes:
        stage: Stage index, 0-based.
        kind: ``"F"`` (forward) or ``"B"`` (backward).
        microbatch: Microbatch index, 0-based.
    """

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B"):
            raise ConfigError(f"action kind {self.kind!r}; use 'F' (forward) or 'B' (backward)")
        if self.stage < 0 or self.microbatch < 0:
            raise ConfigError(
                f"action {self.stage}{self.kind}{self.microbatch}: stage and microbatch must "
                "be >= 0")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read ``"2B3"`` (stage 2, backward, microbatch 3).

        Raises:
            ConfigError: if the text is not ``<stage><F|B><microbatch>``.

        Example:
            >>> Action.parse("1F0")
            Action(stage=1, kind='F', microbatch=0)
        """
        m = _ACTION_RE.match(text)
        if m is None:
            raise ConfigError(
                f"cannot read action {text!r}; write <stage><F|B><microbatch>, e.g. '1F0'")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists of one training step.

    Attributes:
        name: ``"gpipe"``, ``"1f1b"`` or any label for a hand-written schedule.
        num_stages: Pipeline stages ``p``.
        num_microbatches: Microbatches per step ``m``.
        actions: One tuple of actions per stage, in execution order; every action of list ``s``
            has ``stage == s``.
    """

    name: str
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.num_microbatches < 1:
            raise ConfigError(
                f"a schedule needs >= 1 stage and >= 1 microbatch, got p={self.num_stages}, "
                f"m={self.num_microbatches}")
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"schedule name {self.name!r} must be one word")
        acts = tuple(tuple(a) for a in self.actions)
        object.__setattr__(self, "actions", acts)
        if len(acts) != self.num_stages:
            raise ConfigError(
                f"schedule {self.name!r} has {len(acts)} action lists for {self.num_stages} "
                "stages; give one list per stage")
        for s, lst in enumerate(acts):
            for a in lst:
                if a.stage != s:
                    raise ConfigError(f"action {a} is in the list of stage {s}; it names "
                                      f"stage {a.stage}")

    def __str__(self) -> str:
        lines = [f"{self.name} p={self.num_stages} m={self.num_microbatches}"]
        for s, lst in enumerate(self.actions):
            lines.append(f"{s}: " + " ".join(str(a) for a in lst))
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Read the text :meth:`__str__` writes (the header line is optional).

        Without a header the name is ``"custom"``, ``p`` the number of stage lines and ``m``
        one more than the largest microbatch index.

        Raises:
            ConfigError: on a malformed line.

        Example:
            >>> Schedule.parse("0: 0F0 0B0").num_microbatches
            1
        """
        name, p, m = "custom", None, None
        lists: dict[int, tuple[Action, ...]] = {}
        for raw in text.strip().splitlines():
            if not raw.strip():
                continue
            line = _LINE_RE.match(raw)
            if line is None:
                head = _HEADER_RE.match(raw)
                if head is None or lists or p is not None:
                    raise ConfigError(
                        f"cannot read schedule line {raw!r}; expected '<name> p=<P> m=<M>' "
                        "first, then '<stage>: <action> <action> ...' lines")
                name, p, m = head.group(1), int(head.group(2)), int(head.group(3))
                continue
            stage = int(line.group(1))
            if stage in lists:
                raise ConfigError(f"schedule text lists stage {stage} twice")
            lists[stage] = tuple(Action.parse(t) for t in line.group(2).split())
        if not lists:
            raise ConfigError("schedule text has no stage lines")
        if p is None:
            p = max(lists) + 1
        if m is None:
            m = 1 + max((a.microbatch for lst in lists.values() for a in lst), default=0)
        return cls(name, p, m, tuple(lists.get(s, ()) for s in range(p)))

    def validate(self) -> None:
        """Check the schedule can run (Note [schedule communication model]).

        Checks that each stage runs every ``F`` and ``B`` of its stage exactly once, ``B(s, i)``
        after ``F(s, i)``; that neighbours run their forwards (and their backwards) in the same
        microbatch order, since messages on a link arrive in order; that the stages together
        never deadlock (``F(s, i)`` after
        ``F(s - 1, i)``, ``B(s, i)`` after ``B(s + 1, i)``, simulated); and, for ``"1f1b"``, that
        stage ``s`` never holds more than ``min(m, p - s)`` microbatches forwarded but not yet
        backwarded (:func:`inflight_microbatches`).

        Raises:
            ConfigError: naming the first broken rule.
        """
        p, m = self.num_stages, self.num_microbatches
        for s, lst in enumerate(self.actions):
            want = {Action(s, k, i) for k in "FB" for i in range(m)}
            got = list(lst)
            if len(got) != len(set(got)) or set(got) != want:
                missing = sorted(want - set(got))
                extra = sorted({a for a in got if a not in want or got.count(a) > 1})
                raise ConfigError(
                    f"stage {s} of schedule {self.name!r} must run each of F and B once for "
                    f"microbatches 0..{m - 1}; missing {[str(a) for a in missing]}, "
                    f"unexpected or repeated {[str(a) for a in extra]}")
            seen_f: set[int] = set()
            inflight, peak = 0, 0
            for a in got:
                if a.kind == "F":
                    seen_f.add(a.microbatch)
                    inflight += 1
                    peak = max(peak, inflight)
                else:
                    if a.microbatch not in seen_f:
                        raise ConfigError(
                            f"stage {s} runs {a} before {Action(s, 'F', a.microbatch)}: a "
                            "backward needs its forward first")
                    inflight -= 1
            bound = inflight_microbatches("1f1b", m, p, s)
            if self.name == "1f1b" and peak > bound:
                raise ConfigError(
                    f"stage {s} of 1F1B holds {peak} microbatches in flight; at most "
                    f"min(m, p - s) = {bound} are allowed")
        for s in range(p - 1):
            for kind, what in (("F", "activations"), ("B", "gradients")):
                here = [a.microbatch for a in self.actions[s] if a.kind == kind]
                there = [a.microbatch for a in self.actions[s + 1] if a.kind == kind]
                if here != there:
                    raise ConfigError(
                        f"stages {s} and {s + 1} run their {kind} actions in different "
                        f"microbatch orders ({here} vs {there}); {what} travel in order over "
                        "each link, so neighbours must agree")
        _play_order(self)

    def inflight_peak(self, stage: int) -> int:
        """Most microbatches forwarded but not yet backwarded at once on ``stage``."""
        inflight, peak = 0, 0
        for a in self.actions[stage]:
            inflight += 1 if a.kind == "F" else -1
            peak = max(peak, inflight)
        return peak


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (SMP ``"simple"``): every forward, then every backward, in microbatch order.

    Example:
        >>> str(gpipe(2, 2)).splitlines()[1]
        '0: 0F0 0F1 0B0 0B1'
    """
    _check_pm(p, m)
    acts = tuple(
        tuple(Action(s, "F", i) for i in range(m)) + tuple(Action(s, "B", i) for i in range(m))
        for s in range(p))
    return Schedule("gpipe", p, m, acts)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (SMP ``"interleaved"``, backward-first).

    Stage ``s`` runs ``min(p - s - 1, m)`` warm-up forwards, then alternates one forward and the
    oldest pending backward, then runs the remaining backwards; it holds at most
    ``min(m, p - s)`` microbatches in flight (Note [in-flight microbatches]).

    Example:
        >>> str(one_f_one_b(3, 3)).splitlines()[1]
        '0: 0F0 0F1 0F2 0B0 0B1 0B2'
    """
    _check_pm(p, m)
    lists = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [Action(s, "F", i) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            acts += [Action(s, "F", f), Action(s, "B", b)]
            f, b = f + 1, b + 1
        acts += [Action(s, "B", i) for i in range(b, m)]
        lists.append(tuple(acts))
    return Schedule("1f1b", p, m, tuple(lists))


def make_schedule(name: str, p: int, m: int) -> Schedule:
    """The schedule called ``name``: ``"gpipe"``/``"simple"`` or ``"1f1b"``/``"interleaved"``.

    Raises:
        ConfigError: for another name or ``p``/``m`` below 1.

    Example:
        >>> make_schedule("interleaved", 2, 4).name
        '1f1b'
    """
    kind = normalize_schedule(name)
    return gpipe(p, m) if kind == "gpipe" else one_f_one_b(p, m)


def theoretical_bubble(p: int, m: int) -> float:
    """The idle fraction ``(p - 1) / (m + p - 1)`` of GPipe and 1F1B with equal stages.

    Example:
        >>> theoretical_bubble(4, 8)
        0.2727272727272727
    """
    _check_pm(p, m)
    return (p - 1) / (m + p - 1)


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
        entries: Per stage, its actions with start and end times, in execution order.
        makespan: Seconds from the first start to the last end.
        busy: Per stage, seconds of compute.
    """

    schedule: Schedule
    entries: tuple[tuple[TimelineEntry, ...], ...]
    makespan: float
    busy: tuple[float, ...]

    @property
    def stage_bubbles(self) -> tuple[float, ...]:
        """Per stage, the idle fraction of the step."""
        if self.makespan <= 0:
            return tuple(0.0 for _ in self.busy)
        return tuple(1.0 - b / self.makespan for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle fraction of all stages together: ``1 - sum(busy) / (p * makespan)``."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: Schedule, fwd_times: float | Sequence[float],
             bwd_times: float | Sequence[float], comm_time: float = 0.0) -> Timeline:
    """Play ``schedule`` with per-stage forward/backward seconds and a per-transfer latency.

    Each stage runs its list in order; an action starts when its stage is free and its input has
    arrived (``comm_time`` after the producing action ended, for values crossing a boundary).

    Args:
        schedule: The schedule (validated first).
        fwd_times: Forward seconds per microbatch, one for all stages or one per stage.
        bwd_times: Backward seconds per microbatch, likewise.
        comm_time: Seconds per boundary transfer (activations forward, gradients backward).

    Raises:
        ConfigError: if the schedule is invalid or the time lists have the wrong length.

    Example:
        >>> t = simulate(one_f_one_b(2, 2), 1.0, 1.0)
        >>> t.makespan, round(t.bubble_fraction, 3)
        (6.0, 0.333)
    """
    schedule.validate()
    p = schedule.num_stages
    fwd, bwd = _per_stage(fwd_times, p, "fwd_times"), _per_stage(bwd_times, p, "bwd_times")
    if comm_time < 0:
        raise ConfigError(f"comm_time = {comm_time} must be >= 0")
    ends: dict[Action, float] = {}
    entries: list[list[TimelineEntry]] = [[] for _ in range(p)]
    free = [0.0] * p
    for a in _play_order(schedule):  # every dependency ends before its consumer starts
        s = a.stage
        dep = _dependency(a, p)
        start = max(free[s], ends[dep] + comm_time if dep is not None else 0.0)
        ends[a] = free[s] = start + (fwd[s] if a.kind == "F" else bwd[s])
        entries[s].append(TimelineEntry(a, start, free[s]))
    makespan = max(free)
    busy = tuple(sum(e.end - e.start for e in lst) for lst in entries)
    return Timeline(schedule, tuple(tuple(lst) for lst in entries), makespan, busy)


# -- helpers ---------------------------------------------------------------------------------------


def _check_pm(p: int, m: int) -> None:
    if not isinstance(p, int) or not isinstance(m, int) or p < 1 or m < 1:
        raise ConfigError(f"a schedule needs integers p >= 1 and m >= 1, got p={p!r}, m={m!r}")


def _per_stage(value: float | Sequence[float], p: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * p
    else:
        values = [float(v) for v in value]
    if len(values) != p or any(v < 0 for v in values):
        raise ConfigError(f"{what} must be one non-negative number or {p} of them, got {value!r}")
    return values


def _dependency(a: Action, p: int) -> Action | None:
    """The action on a neighbouring stage whose output ``a`` receives, if any."""
    if a.kind == "F":
        return Action(a.stage - 1, "F", a.microbatch) if a.stage > 0 else None
    return Action(a.stage + 1, "B", a.microbatch) if a.stage < p - 1 else None


def _play_order(schedule: Schedule) -> list[Action]:
    """Every action, in an order in which each runs after the action it receives from: the
    stages play their lists with blocking receives and buffered sends.

    Raises:
        ConfigError: if the schedule deadlocks (naming what each stuck stage waits for).
    """
    p = schedule.num_stages
    done: set[Action] = set()
    order: list[Action] = []
    pos = [0] * p
    remaining = sum(len(lst) for lst in schedule.actions)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(schedule.actions[s]):
                a = schedule.actions[s][pos[s]]
                dep = _dependency(a, p)
                if dep is not None and dep not in done:
                    break
                done.add(a)
                order.append(a)
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [f"stage {s} at {schedule.actions[s][pos[s]]} waits for "
                     f"{_dependency(schedule.actions[s][pos[s]], p)}"
                     for s in range(p) if pos[s] < len(schedule.actions[s])]
            raise ConfigError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(stuck))
    return order
