"""The built-in schedules: GPipe, 1F1B, interleaved 1F1B (virtual stages) and ZB-H1.

See the package docstring (:mod:`modelparallel.schedule`) for the notes.
"""

from __future__ import annotations

from functools import lru_cache

from modelparallel.errors import ConfigError
from modelparallel.schedule._types import (
    Action,
    Schedule,
    check_virtual_stages,
    interleaved_group,
    interleaved_warmup,
    normalize_schedule,
)

__all__ = [
    "gpipe",
    "inflight_microbatches",
    "interleaved_one_f_one_b",
    "make_schedule",
    "one_f_one_b",
    "theoretical_bubble",
    "zb_h1",
]


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


def interleaved_one_f_one_b(p: int, v: int, m: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM's schedule) on ``p`` ranks with ``v`` stages each.

    The model is cut into ``p * v`` stages and rank ``r`` runs stages ``r, r + p, ...`` (Note
    [virtual stages]). Microbatches go in rounds of ``g = m // max(1, m // p)``: a rank runs the
    forwards of a round through its first stage, then through its second, and so on; backwards
    go the same way through its stages in reverse. Rank ``r`` runs ``(v - 1) g + 2 (p - 1 - r)``
    warm-up forwards, then alternates one forward and one backward, then drains.

    Raises:
        ConfigError: if ``p < 2`` with ``v > 1``, or ``m`` does not divide into rounds.

    Example:
        >>> print(interleaved_one_f_one_b(2, 2, 2))
        1f1b p=2 v=2 m=2
        0: 0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1
        1: 1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1
    """
    _check_pm(p, m)
    check_virtual_stages("1f1b", v, ranks=p)
    if v == 1:
        return one_f_one_b(p, m)
    g = interleaved_group(p, m)
    lists = []
    for r in range(p):
        fwd = [Action(c * p + r, "F", i) for k in range(0, m, g) for c in range(v)
               for i in range(k, k + g)]
        bwd = [Action(c * p + r, "B", i) for k in range(0, m, g) for c in reversed(range(v))
               for i in range(k, k + g)]
        warm = interleaved_warmup(p, v, m, r)
        acts = fwd[:warm]
        for j in range(len(fwd) - warm):
            acts += [fwd[warm + j], bwd[j]]
        acts += bwd[len(fwd) - warm:]
        lists.append(tuple(acts))
    return Schedule("1f1b", p * v, m, tuple(lists), v)


def zb_h1(p: int, m: int) -> Schedule:
    """Zero-bubble ZB-H1 (Qi et al., 2023): 1F1B with each backward split into ``I`` and ``W``.

    ``I`` (input gradients, sent to the previous stage) is on the critical path; ``W`` (weight
    gradients) is deferred into what would be bubbles (Note [split backward]). The lists come
    from a unit-time list schedule: at every step a rank runs its next ``F`` if its activations
    have arrived and the rank holds fewer than 1F1B's ``p - r`` microbatches between ``F`` and
    ``I`` and fewer than ``p`` (1F1B's peak) between ``F`` and ``W``; else its next ``I`` if its
    gradients have arrived; else its oldest pending ``W``. So no rank holds more activations than
    1F1B's first stage, and with ``F = I = W`` and ``m >= p`` the bubble is
    ``(p - 1) / (3 m + p - 1)``, a third of 1F1B's idle time.

    Example:
        >>> print(zb_h1(2, 2))
        zb-h1 p=2 m=2
        0: 0F0 0F1 0I0 0W0 0I1 0W1
        1: 1F0 1I0 1F1 1I1 1W0 1W1
    """
    _check_pm(p, m)
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, microbatch) -> end step
    nxt = {k: [0] * p for k in "FIW"}
    lists: list[list[Action]] = [[] for _ in range(p)]
    t = 0
    while any(nxt["W"][r] < m for r in range(p)):
        step: list[tuple[str, int, int]] = []
        for r in range(p):
            f, i, w = nxt["F"][r], nxt["I"][r], nxt["W"][r]
            i_ready = i < f and (r == p - 1 or done.get(("I", r + 1, i), t + 1) <= t)
            f_ready = (f < m and f - i < p - r and f - w < p
                       and (r == 0 or done.get(("F", r - 1, f), t + 1) <= t))
            kind = "F" if f_ready else "I" if i_ready else "W" if w < i else None
            if kind is not None:
                j = nxt[kind][r]
                lists[r].append(Action(r, kind, j))
                step.append((kind, r, j))
        for kind, r, j in step:
            done[(kind, r, j)] = t + 1
            nxt[kind][r] += 1
        t += 1
        assert t <= 4 * (m + p) * 3, "zb_h1 list scheduling made no progress"
    return Schedule("zb-h1", p, m, tuple(tuple(lst) for lst in lists))


def make_schedule(name: str, p: int, m: int, virtual_stages: int = 1) -> Schedule:
    """The schedule called ``name`` on ``p`` ranks (Note [schedule names]).

    ``"gpipe"``/``"simple"``, ``"1f1b"``/``"interleaved"`` (``virtual_stages > 1``: interleaved
    1F1B, ``"1f1b"`` only) or ``"zb-h1"``.

    Raises:
        ConfigError: for another name, ``p``/``m`` below 1, or virtual stages with a schedule
            other than ``"1f1b"``.

    Example:
        >>> make_schedule("interleaved", 2, 4).name
        '1f1b'
        >>> make_schedule("1f1b", 2, 4, virtual_stages=2).num_stages
        4
    """
    kind = normalize_schedule(name)
    v = check_virtual_stages(name, virtual_stages, ranks=p)
    return _cached(kind, p, m, v)


@lru_cache(maxsize=256)
def _cached(kind: str, p: int, m: int, v: int) -> Schedule:
    if kind == "gpipe":
        return gpipe(p, m)
    if kind == "zb-h1":
        return zb_h1(p, m)
    return interleaved_one_f_one_b(p, v, m)


def inflight_microbatches(schedule: str, microbatches: int, partitions: int, stage: int,
                          virtual_stages: int = 1) -> int:
    """How many microbatches' activations stage ``stage`` holds at its peak (Note [in-flight
    microbatches]).

    GPipe: all ``m``. 1F1B: stage ``i`` of ``p`` holds ``min(m, p - i)``. Interleaved 1F1B and
    ZB-H1: the peak of the built schedule's lists (a ZB-H1 stage holds a microbatch until its
    ``W``).

    Args:
        schedule: Schedule name (ours or SMP's).
        microbatches: ``m``.
        partitions: Pipeline ranks ``p``.
        stage: Stage index in ``0 .. p * virtual_stages - 1``.
        virtual_stages: Stages per rank ``v``.

    Raises:
        ConfigError: for an unknown schedule name or a stage outside the pipeline.

    Example:
        >>> [inflight_microbatches("1f1b", 8, 4, i) for i in range(4)]
        [4, 3, 2, 1]
        >>> inflight_microbatches("gpipe", 8, 4, 3)
        8
        >>> [inflight_microbatches("1f1b", 4, 2, s, virtual_stages=2) for s in range(4)]
        [4, 3, 2, 1]
    """
    n = partitions * virtual_stages
    if not 0 <= stage < n:
        raise ConfigError(f"stage {stage} is outside 0..{n - 1}")
    kind = normalize_schedule(schedule)
    if kind == "gpipe":
        return microbatches
    if kind == "1f1b" and virtual_stages == 1:
        return min(microbatches, partitions - stage)
    return make_schedule(schedule, partitions, microbatches, virtual_stages).inflight_peak(stage)


def theoretical_bubble(p: int, m: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """The idle fraction of a schedule with equal stages and no communication time.

    GPipe and 1F1B: ``(p - 1) / (m + p - 1)``; interleaved 1F1B: ``(p - 1) / (v m + p - 1)``;
    ZB-H1 with ``F = I = W``: ``(p - 1) / (3 m + p - 1)``.

    Example:
        >>> theoretical_bubble(4, 8)
        0.2727272727272727
        >>> round(theoretical_bubble(4, 8, "1f1b", 2), 4), round(theoretical_bubble(4, 8, "zb-h1"), 4)
        (0.1579, 0.1111)
    """
    _check_pm(p, m)
    kind = normalize_schedule(schedule)
    v = check_virtual_stages(schedule, virtual_stages, ranks=None)
    if kind == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    if kind == "1f1b":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


def _check_pm(p: int, m: int) -> None:
    if not isinstance(p, int) or not isinstance(m, int) or p < 1 or m < 1:
        raise ConfigError(f"a schedule needs integers p >= 1 and m >= 1, got p={p!r}, m={m!r}")
