"""Checking a rank's stage programs and the schedule of a step run in waves.

:func:`check_programs` checks that a rank holds stages ``r, r + p, ...`` of one pipeline (Note
[virtual stages] in ``modelparallel/schedule/__init__.py``); :func:`waves` is the schedule
:class:`~modelparallel.runtime.executor.StageExecutor` runs when ``active_microbatches`` caps the
microbatches in flight (Note [active microbatches]).
"""

from __future__ import annotations

from modelparallel.codegen.program import StageProgram
from modelparallel.errors import ConfigError
from modelparallel.schedule import Action, Schedule, make_schedule

__all__ = ["check_programs", "waves"]


def check_programs(programs: tuple[StageProgram, ...]) -> tuple[StageProgram, ...]:
    """This rank's programs: stages ``r, r + p, ...`` of one pipeline (Note [virtual stages])."""
    if not programs:
        raise ConfigError("StageExecutor needs at least one stage program")
    n, v = programs[0].num_stages, len(programs)
    p = n // v if n % v == 0 else 0
    want = list(range(programs[0].index, n, p)) if p else []
    if [q.index for q in programs] != want or any(q.num_stages != n for q in programs) \
            or programs[0].index >= p:
        raise ConfigError(
            f"a rank's stage programs must be stages r, r + p, ... of one pipeline (p ranks, "
            f"{v} virtual stages each); got stages {[q.index for q in programs]} of {n}. Build "
            "them with build_stage(traced, plan, s) for s in range(rank, stages, ranks)")
    return programs


# Note [active microbatches]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~
# SMP's ``active_microbatches`` caps the microbatches in flight (forward done, backward not yet)
# per stage. The executor runs the step's schedule in waves: microbatches ``0..a-1`` through the
# whole schedule of ``a`` microbatches, then the next ``a``, and so on (the last wave may be
# smaller); gradients accumulate over the waves as over microbatches, so the step's result is
# the same. A stage then holds at most ``min(a, what the schedule keeps)`` microbatches, which
# is what the memory model charges (Note [memory features] in
# ``modelparallel/partitioner/memory_features.py``); the bubble grows to one per wave.


def waves(name: str, p: int, m: int, v: int, active: int | None) -> Schedule:
    """The schedule of ``m`` microbatches run in waves of ``active`` (Note [active
    microbatches])."""
    if active is None or active >= m:
        return make_schedule(name, p, m, v)
    if v > 1:
        raise ConfigError(f"active_microbatches = {active} < microbatches = {m} is not "
                          "supported with virtual stages; leave it out")
    per_rank: list[list[Action]] = [[] for _ in range(p)]
    start = 0
    while start < m:
        size = min(active, m - start)
        wave = make_schedule(name, p, size, v)
        for r, lst in enumerate(wave.actions):
            per_rank[r].extend(Action(a.stage, a.kind, a.microbatch + start) for a in lst)
        start += size
    sched = Schedule(f"{name}-waves{active}", p * v, m,
                     tuple(tuple(x) for x in per_rank), v)
    sched.validate()
    return sched
