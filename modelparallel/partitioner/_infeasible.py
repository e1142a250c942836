"""The error for a planner call that finds no assignment: what would fit, and what to change.

Example:
    >>> size_up(1.5 * 2**30)
    '1.50 GiB'
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from modelparallel.errors import InfeasiblePlanError
from modelparallel.partitioner.bounds import lower_bound
from modelparallel.partitioner.dp import solve_dp
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import Problem
from modelparallel.units import format_bytes

__all__ = ["infeasible_error", "min_memory", "size_up"]


def min_memory(prob: Problem) -> int | None:
    """Smallest memory per device for which a contiguous split exists (every device alike)."""
    big = float(prob.caps.sum()) * 1e6 + 1.0
    relaxed = replace(prob, caps=np.full(prob.p, big), config=prob.config)
    relaxed_w = replace(relaxed, config=replace(prob.config, memory_weight=1.0))
    res = solve_dp(relaxed_w)
    if res is None:
        return None
    ev = evaluate(relaxed_w, res.stage)
    return int(np.ceil(float(ev.memory.max()) * (1 + 1e-9))) + 1


def size_up(nbytes: float) -> str:
    """``format_bytes`` of ``nbytes`` rounded up (a "fits with" figure must not under-state)."""
    return format_bytes(float(np.ceil(float(nbytes))))


def infeasible_error(prob: Problem, what: str) -> InfeasiblePlanError:
    """The error for ``what`` (a method) finding no assignment: the memory that would fit
    every device when memory is why, else the pins or the time limit."""
    need = min_memory(prob)
    caps = sorted({int(c) for c in prob.caps})
    have = ", ".join(size_up(c) for c in caps)
    lb = lower_bound(prob, incumbent=None)
    if need is None or need <= prob.caps.min():
        msg = (f"{what}: no assignment found that satisfies the pins and the pipeline order on "
               f"{prob.p} stages (no contiguous split of the topological order does, and the "
               f"ILP found none in {prob.config.time_limit:g} s); change or remove the pins, "
               "or raise time_limit")
        return InfeasiblePlanError(msg)
    msg = (f"{what}: no assignment of {prob.graph.name!r} to {prob.p} stages fits in device "
           f"memory ({have}). A plan exists with {size_up(need)} on every device "
           f"({need} bytes; the contiguous split minimising the largest stage), and none can "
           f"fit below {size_up(lb.min_memory_bytes)}. Use devices with at least "
           f"{size_up(need)}, more partitions, "
           + ("schedule='1f1b' (fewer microbatches in flight than 'gpipe'), "
              if str(prob.config.schedule) in ("gpipe", "simple") else "fewer microbatches, ")
           + "or a lighter optimizer.")
    return InfeasiblePlanError(msg, min_memory_bytes=need)
