"""Schedule names, the :class:`Action` and :class:`Schedule` types, and their validation.

See the package docstring (:mod:`modelparallel.schedule`) for the notes these rules implement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from modelparallel.errors import ConfigError

__all__ = [
    "ACTION_KINDS",
    "SCHEDULE_ALIASES",
    "SMP_SCHEDULES",
    "Action",
    "Schedule",
    "check_channel_order",
    "check_virtual_stages",
    "normalize_schedule",
]

#: Accepted schedule names, ours and SMP's, to ours (Note [schedule names]): SMP's ``"simple"``
#: is GPipe and its ``"interleaved"`` is 1F1B with one stage per rank; interleaved virtual
#: stages are ``"1f1b"`` with ``virtual_stages > 1``; ``"zb-h1"`` is zero-bubble.
SCHEDULE_ALIASES: Mapping[str, str] = {
    "gpipe": "gpipe", "simple": "gpipe",
    "1f1b": "1f1b", "interleaved": "1f1b",
    "zb-h1": "zb-h1", "zbh1": "zb-h1",
}

#: SMP's ``pipeline`` values and the schedule each means (Note [schedule names]).
SMP_SCHEDULES: Mapping[str, str] = {"simple": "gpipe", "interleaved": "1f1b"}

#: ``F`` forward; ``B`` whole backward; ``I`` / ``W`` the input-gradient and weight-gradient
#: halves of a split backward (Note [split backward]).
ACTION_KINDS = ("F", "B", "I", "W")

_ACTION_RE = re.compile(r"^\s*(\d+)\s*([FBIW])\s*(\d+)\s*$")
_HEADER_RE = re.compile(r"^\s*(\S+)\s+p=(\d+)(?:\s+v=(\d+))?\s+m=(\d+)\s*$")
_LINE_RE = re.compile(r"^\s*(\d+)\s*:(.*)$")


def normalize_schedule(name: str) -> str:
    """Our name for a schedule given by our name or SMP's (Note [schedule names]).

    Raises:
        ConfigError: for a name that is neither.

    Example:
        >>> normalize_schedule("simple"), normalize_schedule("Interleaved"), normalize_schedule("ZB-H1")
        ('gpipe', '1f1b', 'zb-h1')
    """
    try:
        return SCHEDULE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConfigError(
            f"unknown schedule {name!r}; use 'gpipe' (SMP 'simple'), '1f1b' (SMP "
            "'interleaved'; with virtual_stages > 1 interleaved 1F1B) or 'zb-h1' "
            "(zero-bubble)") from None


def check_virtual_stages(name: str, virtual_stages: int, ranks: int | None = None) -> int:
    """Check that schedule ``name`` runs with ``virtual_stages`` stages per rank; return it.

    Only ``"1f1b"`` interleaves virtual stages. SMP's ``"interleaved"`` means one stage per rank
    and is refused with ``virtual_stages > 1``, so the two meanings of "interleaved" cannot be
    confused (Note [schedule names]).

    Raises:
        ConfigError: for ``virtual_stages < 1``, another schedule with ``virtual_stages > 1``, or
            virtual stages on a single rank.

    Example:
        >>> check_virtual_stages("1f1b", 2, ranks=4)
        2
    """
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) \
            or virtual_stages < 1:
        raise ConfigError(f"virtual_stages = {virtual_stages!r} must be an integer >= 1")
    if virtual_stages == 1:
        return 1
    if str(name).lower() == "interleaved":
        raise ConfigError(
            "SMP's 'interleaved' is 1F1B with one stage per rank; for interleaved virtual stages "
            f"use schedule='1f1b' with virtual_stages={virtual_stages}")
    if normalize_schedule(name) != "1f1b":
        raise ConfigError(
            f"schedule {name!r} runs one stage per rank; virtual_stages = {virtual_stages} "
            "needs schedule '1f1b' (interleaved 1F1B)")
    if ranks is not None and ranks < 2:
        raise ConfigError(
            f"virtual_stages = {virtual_stages} on {ranks} rank: interleaving needs >= 2 "
            "pipeline ranks; use virtual_stages=1")
    return virtual_stages


@dataclass(frozen=True, order=True)
class Action:
    """One unit of work of one stage.

    Attributes:
        stage: Stage index, 0-based (a virtual stage when ranks hold several).
        kind: ``"F"`` (forward), ``"B"`` (backward), or the two halves of a split backward:
            ``"I"`` (input gradients, sent on) and ``"W"`` (weight gradients) (Note [split
            backward]).
        microbatch: Microbatch index, 0-based.
    """

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ConfigError(
                f"action kind {self.kind!r}; use 'F' (forward), 'B' (backward), 'I' (input "
                "gradients) or 'W' (weight gradients)")
        if self.stage < 0 or self.microbatch < 0:
            raise ConfigError(
                f"action {self.stage}{self.kind}{self.microbatch}: stage and microbatch must "
                "be >= 0")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @property
    def sends_gradients(self) -> bool:
        """Whether this action sends gradients to the previous stage (``B`` or ``I``)."""
        return self.kind in ("B", "I")

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read ``"2B3"`` (stage 2, backward, microbatch 3); kinds ``F``, ``B``, ``I``, ``W``.

        Raises:
            ConfigError: if the text is not ``<stage><F|B|I|W><microbatch>``.

        Example:
            >>> Action.parse("1F0"), Action.parse("0W2").kind
            (Action(stage=1, kind='F', microbatch=0), 'W')
        """
        m = _ACTION_RE.match(text)
        if m is None:
            raise ConfigError(
                f"cannot read action {text!r}; write <stage><F|B|I|W><microbatch>, e.g. '1F0'")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists of one training step (Note [virtual stages]).

    Attributes:
        name: ``"gpipe"``, ``"1f1b"``, ``"zb-h1"`` or any label for a hand-written schedule.
        num_stages: Pipeline stages (``p * v``: ranks times virtual stages per rank).
        num_microbatches: Microbatches per step ``m``.
        actions: One tuple of actions per rank, in execution order; rank ``r`` runs the stages
            ``s`` with ``s % p == r``.
        virtual_stages: Stages per rank ``v`` (1: rank ``r`` runs stage ``r``).
    """

    name: str
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.num_microbatches < 1 or self.virtual_stages < 1:
            raise ConfigError(
                f"a schedule needs >= 1 stage, >= 1 microbatch and >= 1 virtual stage per rank, "
                f"got stages={self.num_stages}, m={self.num_microbatches}, "
                f"v={self.virtual_stages}")
        if self.num_stages % self.virtual_stages:
            raise ConfigError(
                f"{self.num_stages} stages do not divide into {self.virtual_stages} virtual "
                "stages per rank; give ranks * virtual_stages stages")
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"schedule name {self.name!r} must be one word")
        acts = tuple(tuple(a) for a in self.actions)
        object.__setattr__(self, "actions", acts)
        p, unit = self.num_ranks, ("stage" if self.virtual_stages == 1 else "rank")
        if len(acts) != p:
            raise ConfigError(
                f"schedule {self.name!r} has {len(acts)} action lists for {p} {unit}s; give "
                f"one list per {unit}")
        for r, lst in enumerate(acts):
            for a in lst:
                if a.stage >= self.num_stages or a.stage % p != r:
                    raise ConfigError(
                        f"action {a} is in the list of {unit} {r}; it names stage {a.stage}, "
                        f"which runs on rank {a.stage % p} of {p}")

    @property
    def num_ranks(self) -> int:
        """Pipeline ranks ``p`` (``num_stages / virtual_stages``)."""
        return self.num_stages // self.virtual_stages

    def rank_of(self, stage: int) -> int:
        """The rank that runs ``stage`` (``stage % p``, Note [virtual stages])."""
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages rank ``rank`` runs, in order: ``rank, rank + p, ...``."""
        return tuple(range(rank, self.num_stages, self.num_ranks))

    def __str__(self) -> str:
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        lines = [f"{self.name} p={self.num_ranks}{v} m={self.num_microbatches}"]
        for r, lst in enumerate(self.actions):
            lines.append(f"{r}: " + " ".join(str(a) for a in lst))
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """Read the text :meth:`__str__` writes (the header line is optional).

        The header is ``<name> p=<ranks> [v=<virtual stages>] m=<microbatches>``. Without one
        the name is ``"custom"``, ``p`` the number of rank lines, ``v`` 1 and ``m`` one more than
        the largest microbatch index.

        Raises:
            ConfigError: on a malformed line.

        Example:
            >>> Schedule.parse("0: 0F0 0B0").num_microbatches
            1
            >>> Schedule.parse("x p=2 v=2 m=1\\n0: 0F0 2F0 2B0 0B0\\n1: 1F0 3F0 3B0 1B0").num_stages
            4
        """
        name, p, v, m = "custom", None, 1, None
        lists: dict[int, tuple[Action, ...]] = {}
        for raw in text.strip().splitlines():
            if not raw.strip():
                continue
            line = _LINE_RE.match(raw)
            if line is None:
                head = _HEADER_RE.match(raw)
                if head is None or lists or p is not None:
                    raise ConfigError(
                        f"cannot read schedule line {raw!r}; expected '<name> p=<P> [v=<V>] "
                        "m=<M>' first, then '<rank>: <action> <action> ...' lines")
                name, p, m = head.group(1), int(head.group(2)), int(head.group(4))
                v = int(head.group(3)) if head.group(3) else 1
                continue
            rank = int(line.group(1))
            if rank in lists:
                raise ConfigError(f"schedule text lists stage {rank} twice")
            lists[rank] = tuple(Action.parse(t) for t in line.group(2).split())
        if not lists:
            raise ConfigError("schedule text has no stage lines")
        if p is None:
            p = max(lists) + 1
        if m is None:
            m = 1 + max((a.microbatch for lst in lists.values() for a in lst), default=0)
        return cls(name, p * v, m, tuple(lists.get(r, ()) for r in range(p)), v)

    def stage_actions(self, stage: int) -> tuple[Action, ...]:
        """The actions of ``stage``, in the order its rank runs them."""
        return tuple(a for a in self.actions[self.rank_of(stage)] if a.stage == stage)

    def validate(self) -> None:
        """Check the schedule can run (Note [schedule communication model]).

        Checks that each stage runs ``F`` once per microbatch and either ``B`` or ``I`` then
        ``W`` once, every backward after its forward; that on every link between two ranks the
        messages are received in the order they are sent; that the ranks together never
        deadlock (``F(s, i)`` after ``F(s - 1, i)``, ``B``/``I(s, i)`` after
        ``B``/``I(s + 1, i)``, simulated); and, for the built-in names, the in-flight bound of
        Note [in-flight microbatches] on every rank.

        Raises:
            ConfigError: naming the first broken rule.
        """
        m = self.num_microbatches
        for s in range(self.num_stages):
            _check_stage(self, s, m)
        for r in range(self.num_ranks):
            bound = _rank_bound(self, r)
            if bound is not None and self.rank_inflight_peak(r) > bound:
                what = (f"stage {r} of 1F1B" if self.name == "1f1b" and self.virtual_stages == 1
                        else f"rank {r} of {self.name} (v={self.virtual_stages})")
                rule = ("min(m, p - s)" if self.name == "1f1b" and self.virtual_stages == 1
                        else "its bound")
                raise ConfigError(
                    f"{what} holds {self.rank_inflight_peak(r)} microbatches in flight; at most "
                    f"{rule} = {bound} are allowed (Note [in-flight microbatches])")
        _check_links(self)
        play_order(self)

    def inflight_peak(self, stage: int) -> int:
        """Most microbatches whose activations ``stage`` holds at once: forwarded, and not yet
        backwarded (``B``) or weight-backwarded (``W``) (Note [in-flight microbatches])."""
        inflight, peak = 0, 0
        for a in self.stage_actions(stage):
            inflight += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
            peak = max(peak, inflight)
        return peak

    def rank_inflight_peak(self, rank: int) -> int:
        """Most (stage, microbatch) activations rank ``rank`` holds at once, over its stages."""
        inflight, peak = 0, 0
        for a in self.actions[rank]:
            inflight += 1 if a.kind == "F" else -1 if a.kind in ("B", "W") else 0
            peak = max(peak, inflight)
        return peak


def _check_stage(sched: Schedule, s: int, m: int) -> None:
    got = list(sched.stage_actions(s))
    split = any(a.kind in ("I", "W") for a in got)
    kinds = "FIW" if split else "FB"
    want = {Action(s, k, i) for k in kinds for i in range(m)}
    if len(got) != len(set(got)) or set(got) != want:
        missing = sorted(want - set(got))
        extra = sorted({a for a in got if a not in want or got.count(a) > 1})
        raise ConfigError(
            f"stage {s} of schedule {sched.name!r} must run each of "
            f"{' and '.join(kinds)} once for microbatches 0..{m - 1} (B, or I then W); missing "
            f"{[str(a) for a in missing]}, unexpected or repeated {[str(a) for a in extra]}")
    seen: set[tuple[str, int]] = set()
    for a in got:
        need = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
        if need is not None and (need, a.microbatch) not in seen:
            raise ConfigError(
                f"stage {s} runs {a} before {Action(s, need, a.microbatch)}: a backward needs "
                "its forward first, and a weight-gradient action its input-gradient action")
        seen.add((a.kind, a.microbatch))


def _rank_bound(sched: Schedule, r: int) -> int | None:
    """The in-flight bound of rank ``r`` for a built-in schedule name (Note [in-flight
    microbatches]); ``None`` for other names."""
    p, v, m = sched.num_ranks, sched.virtual_stages, sched.num_microbatches
    if sched.name == "1f1b" and v == 1:
        return min(m, p - r)
    if sched.name == "1f1b":
        return min(m * v, interleaved_warmup(p, v, m, r) + 1)
    if sched.name == "zb-h1":
        return min(m, p)
    return None


def interleaved_group(p: int, m: int) -> int:
    """Microbatches per round of interleaved 1F1B: ``m // max(1, m // p)`` (Note [virtual
    stages]); ``m`` must divide into the rounds."""
    rounds = max(1, m // p)
    if m % rounds:
        raise ConfigError(
            f"interleaved 1F1B runs the {m} microbatches in {rounds} rounds of >= {p} (the "
            f"ranks); {m} does not divide into {rounds} rounds. Use a multiple of {p} or "
            f"fewer than {2 * p} microbatches")
    return m // rounds


def interleaved_warmup(p: int, v: int, m: int, r: int) -> int:
    """Warm-up forwards of rank ``r`` in interleaved 1F1B (Megatron's count, capped at ``m v``):
    ``(v - 1) g + 2 (p - 1 - r)`` with ``g`` microbatches per round."""
    return min(m * v, (v - 1) * interleaved_group(p, m) + 2 * (p - 1 - r))


#: One message: what it carries, its sending stage, its receiving stage, the microbatch.
_Message = tuple[str, int, int, int]


def _sends(a: Action, p: int, out: dict[int, tuple[int, ...]],
           back: dict[int, tuple[int, ...]]) -> list[tuple[int, _Message]]:
    """``(destination rank, message)`` of every message ``a`` sends, in sending order, when
    stage ``s`` sends activations to the stages ``out[s]`` and gradients to ``back[s]``."""
    if a.kind == "F":
        return [(t % p, ("activations", a.stage, t, a.microbatch)) for t in out.get(a.stage, ())]
    if a.sends_gradients:
        return [(t % p, ("gradients", a.stage, t, a.microbatch)) for t in back.get(a.stage, ())]
    return []


def _receives(a: Action, out: dict[int, tuple[int, ...]], back: dict[int, tuple[int, ...]]
              ) -> list[_Message]:
    """The messages ``a`` receives, in receiving order (``back[s]``: the stages ``s`` gets
    activations from; ``out[s]``: those it gets gradients from)."""
    if a.kind == "F":
        return [("activations", t, a.stage, a.microbatch) for t in back.get(a.stage, ())]
    if a.kind in ("B", "I"):
        return [("gradients", t, a.stage, a.microbatch) for t in out.get(a.stage, ())]
    return []


def dependency(a: Action, stages: int) -> Action | None:
    """The action on a neighbouring stage whose message ``a`` receives (``B`` stands for
    whichever of ``B``/``I`` the sender runs)."""
    if a.kind == "F":
        return Action(a.stage - 1, "F", a.microbatch) if a.stage > 0 else None
    if a.kind == "W":
        return None
    return Action(a.stage + 1, "B", a.microbatch) if a.stage < stages - 1 else None


def _check_links(sched: Schedule) -> None:
    """On every directed link between two ranks, messages arrive in the order they are sent
    (Note [schedule communication model]): the receiver must run the receiving actions in the
    order the sender runs the sending ones."""
    n = sched.num_stages
    check_channel_order(sched, [(s, s + 1) for s in range(n - 1)])


def check_channel_order(sched: Schedule, pairs: Iterable[tuple[int, int]], *,
                        tagged: bool = False) -> None:
    """Check that the messages of ``sched`` arrive in the order they are sent when the stages
    ``(s, t)`` of ``pairs`` exchange values: activations ``s -> t`` after ``F(s, i)``,
    gradients ``t -> s`` after ``B``/``I(t, i)``; a forward sends to its stages in ascending
    order, and receives from them likewise (Note [message channels] in
    ``modelparallel/runtime/channels.py``).

    Args:
        sched: The schedule.
        pairs: The ``(sending stage, receiving stage)`` pairs of activations, ``s < t``.
        tagged: Messages are told apart per pair and direction (gloo's tags): each such
            channel must be in order. Otherwise (NCCL) all the messages between two ranks
            must be in one order. Pairs of stages on one rank never go over a link.

    Raises:
        ConfigError: naming the first link whose orders differ.

    Example:
        >>> from modelparallel.schedule import make_schedule
        >>> check_channel_order(make_schedule("1f1b", 3, 4), [(0, 1), (0, 2), (1, 2)])
    """
    p = sched.num_ranks
    out: dict[int, list[int]] = {}
    back: dict[int, list[int]] = {}
    for s, t in sorted(set(pairs)):
        if not 0 <= s < t < sched.num_stages:
            raise ConfigError(f"channel ({s}, {t}) is not a pair of stages s < t of "
                              f"{sched.num_stages}")
        out.setdefault(s, []).append(t)
        back.setdefault(t, []).append(s)
    fwd = {k: tuple(v) for k, v in out.items()}
    bwd = {k: tuple(v) for k, v in back.items()}

    def link(msg: _Message) -> tuple[int, ...]:
        src, dst = msg[1] % p, msg[2] % p
        return (src, dst, msg[1], msg[2], msg[0] == "gradients") if tagged else (src, dst)

    sent: dict[tuple[int, ...], list[_Message]] = {}
    recvd: dict[tuple[int, ...], list[_Message]] = {}
    for r, lst in enumerate(sched.actions):
        for a in lst:
            for dst_rank, msg in _sends(a, p, fwd, bwd):
                if dst_rank != r:
                    sent.setdefault(link(msg), []).append(msg)
            for msg in _receives(a, fwd, bwd):
                if msg[1] % p != r:
                    recvd.setdefault(link(msg), []).append(msg)
    for key in sorted(set(sent) | set(recvd)):
        here, there = sent.get(key, []), recvd.get(key, [])
        if here != there:
            k = next((j for j, (x, y) in enumerate(zip(here, there)) if x != y),
                     min(len(here), len(there)))
            sent_k = _describe(here[k]) if k < len(here) else "nothing"
            recv_k = _describe(there[k]) if k < len(there) else "nothing"
            raise ConfigError(
                f"schedule {sched.name!r}: on the link rank {key[0]} -> rank {key[1]}, message "
                f"{k} is {sent_k} in the sender's order but {recv_k} in the receiver's; "
                "messages travel in order over each link, so both ranks must run them in the "
                "same microbatch order")


def _describe(msg: _Message) -> str:
    kind, src, dst, i = msg
    return f"({kind!r}, stage {src} -> {dst}, microbatch {i})"


def play_order(schedule: Schedule) -> list[Action]:
    """Every action, in an order in which each runs after the action it receives from: the
    ranks play their lists with blocking receives and buffered sends.

    Raises:
        ConfigError: if the schedule deadlocks (naming what each stuck rank waits for).
    """
    p, n = schedule.num_ranks, schedule.num_stages
    done: set[tuple[int, str, int]] = set()
    order: list[Action] = []
    pos = [0] * p
    remaining = sum(len(lst) for lst in schedule.actions)

    def key(a: Action) -> tuple[int, str, int]:
        return (a.stage, "B" if a.kind == "I" else a.kind, a.microbatch)

    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(schedule.actions[r]):
                a = schedule.actions[r][pos[r]]
                dep = dependency(a, n)
                if dep is not None and key(dep) not in done:
                    break
                done.add(key(a))
                order.append(a)
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            unit = "stage" if schedule.virtual_stages == 1 else "rank"
            stuck = [f"{unit} {r} at {schedule.actions[r][pos[r]]} waits for "
                     f"{dependency(schedule.actions[r][pos[r]], n)}"
                     for r in range(p) if pos[r] < len(schedule.actions[r])]
            raise ConfigError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(stuck))
    return order
