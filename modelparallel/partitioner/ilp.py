"""The ILP: assign items (units or single ops) to stages, in PuLP, solved by HiGHS or CBC.

Note [ILP formulation]
~~~~~~~~~~~~~~~~~~~~~~
Items ``a`` (units of nodes, or single nodes) each have a feasible stage range ``[lo_a, hi_a]``
(pins, order, the output node; an item with ``lo_a == hi_a`` is fixed and contributes
constants). Cumulative binaries ``y[a, s] = 1`` iff ``stage(a) <= s``, for ``lo_a <= s < hi_a``
(below the range ``y`` is 0, above it 1), are monotone in ``s``; ``x[a, s] = y[a, s] - y[a, s-1]``
is the one-hot stage. Pipeline order: ``y[a, s] >= y[c, s]`` for every item edge ``a -> c``.

Values are grouped by (producer item, set of consumer items); a group crosses boundary ``s``
iff ``y[a, s] = 1`` and ``y[c, s] = 0`` for a consumer ``c``: ``z[g, s] >= y[a, s] - y[c, s]``
(continuous in [0, 1]; minimisation keeps it at the crossing indicator on binding stages, and
the objective reported is recomputed at the assignment, ``_Model.objective_at``). This is
exactly the relay rule of Note [pipeline order] (``communication="relay"``). Under direct sends (the default) a group
instead has receive indicators ``r[g, d] >= x[c, d] - x[a, d]`` per consumer item ``c`` (its
receiver ``d`` pays ``link_g[d]`` and holds its bytes), send indicators ``f[g, s] >= x[a, s] -
x[c, s]`` (the sender holds its sent bytes once) and, when several stages may receive it, a
send count ``e[g, s] >= sum_{d > s} r[g, d] - M (1 - x[a, s])``, ``e >= f`` (``M`` the number
of those stages), the sender paying ``link_g[s]`` per send; the terms below then use ``r``,
``f`` and ``e`` for ``z`` and ``w``. With normalised units (times over ``T_ref``, bytes over
``cap_s * U_ref``):

- ``t >= sum_a work[a, s] x[a, s] + sum_g comm_g[s-1] z[g, s-1] + comm_g[s] z[g, s]``;
- ``u >= sum_a (param[a, s] + k_s saved[a]) x[a, s] + sum_q state[q, s] h[q, s]
  + k_s sum_g (bytes_g z[g, s-1] + sent_g w[g, s]) + ws_s``, where ``w[g, s] >= z[g, s] -
  y[a, s-1]`` (``w >= 0``) is 1 when the group's producer item ``a`` is on ``s`` and the group
  crosses boundary ``s`` (Note [sent values held]), and ``h[q, s] >= x[a, s]`` for every item reading a
  parameter shared between items (Note [tied parameters]; with ``colocate``, ``y`` of all its
  readers are equal instead) and ``ws_s >= workspace[a] x[a, s]``;
- ``u <= 1 / U_ref`` (every ``M_s <= cap_s``);
- minimise ``(1 - w) t + w u``.

With a ``cutoff`` (the proof phases of Note [ILP pipeline]) only assignments with an objective
below it are searched for: HiGHS gets it as ``objective_bound`` (a node whose bound reaches it
is pruned) and runs no primal heuristics; CBC gets the row ``objective <= cutoff``. A complete
search then proves that nothing within the items' ranges is below the cutoff.

A warm start (the DP's split, or the coarse solution) is passed to HiGHS with
``Highs.setSolution`` through a small subclass of ``pulp.HiGHS``, and to CBC with
``warmStart=True`` and ``LpVariable.setInitialValue``. Progress (incumbent, dual bound, gap) is
reported from HiGHS callbacks (``kCallbackMipImprovingSolution``, ``kCallbackMipInterrupt``).

The model itself (one method per constraint family) is built in ``_ilp_model.py``; this module
solves it.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.partitioner.coarsen import singletons
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(6), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> u = singletons(prob)
    >>> res = solve_items(prob, u.members, u.lo, u.hi, time_limit=5)
    >>> res.status, res.item_stage.tolist()
    ('optimal', [0, 0, 0, 1, 1, 1, 1])
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelparallel.errors import SolverError
from modelparallel.partitioner._highs import THREADS, highs_options, silence_banner
from modelparallel.partitioner._ilp_model import _Model
from modelparallel.partitioner._pulp import pulp
from modelparallel.partitioner.problem import Problem
from modelparallel.partitioner.progress import ProgressEvent

__all__ = ["IlpResult", "solve_items"]


@dataclass(frozen=True, eq=False)
class IlpResult:
    """Outcome of one ILP solve.

    Attributes:
        item_stage: Stage of every item, or ``None`` if no solution was found.
        status: ``"optimal"``, ``"feasible"`` (time limit), ``"stopped"`` (time limit before
            any assignment), ``"infeasible"`` or ``"failed"``.
        objective: The model's objective at ``item_stage`` (normalised, Note [ILP formulation]),
            every continuous variable at its least: not the solver's incumbent value, which
            may carry slack within the MIP gap.
        bound: The solver's proven lower bound on this ILP, if it reported one.
        solver: ``"highs"`` or ``"cbc"``.
        num_variables: Variables of the model.
        num_constraints: Constraints of the model.
        seconds: Wall time including model building.
        notes: Remarks (fallbacks, errors).
    """

    item_stage: np.ndarray | None
    status: str
    objective: float | None
    bound: float | None
    solver: str
    num_variables: int
    num_constraints: int
    seconds: float
    notes: tuple[str, ...] = ()


# -- HiGHS through PuLP, quietly, with a warm start and progress callbacks -------------------------

class _HiGHS(pulp.HiGHS):  # type: ignore[misc,name-defined]
    """``pulp.HiGHS`` that passes a warm start with ``Highs.setSolution`` before solving."""

    def __init__(self, warm: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.warm = warm

    def callSolver(self, lp: pulp.LpProblem) -> None:
        if self.warm:
            import highspy

            values = [0.0] * lp.solverModel.getNumCol()
            for var in lp.variables():
                values[var.index] = self.warm.get(var.name, 0.0)
            sol = highspy.HighsSolution()
            sol.col_value = values
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()


def _highs_callback(phase: str, progress: Callable[[ProgressEvent], None] | None,
                    t0: float, deadline: float, every: float = 0.5,
                    cutoff: float | None = None,
                    stop: Callable[[], bool] | None = None) -> Callable[..., None]:
    """Progress reports, and an interrupt at ``deadline`` (HiGHS checks its own time limit only
    between root-node steps, which on a model of a few thousand rows can overrun it by a
    second) or once ``stop()`` says so. With a ``cutoff``, HiGHS's primal bound is the cutoff
    until an assignment below it is found: it is not reported as an incumbent."""
    last = [0.0]

    def cb(kind: int, message: str, out: Any, inp: Any, user: Any) -> None:
        import highspy

        now = _time.perf_counter()
        if kind == int(highspy.cb.HighsCallbackType.kCallbackMipInterrupt) and (
                now > deadline or (stop is not None and stop())):
            inp.user_interrupt = True
        improving = kind == int(highspy.cb.HighsCallbackType.kCallbackMipImprovingSolution)
        if progress is None or (not improving and now - last[0] < every):
            return
        last[0] = now
        inc = float(out.objective_function_value) if improving else float(out.mip_primal_bound)
        if cutoff is not None and not improving and inc >= cutoff:
            inc = np.inf
        bound = float(out.mip_dual_bound)
        gap = float(out.mip_gap)
        progress(ProgressEvent(
            phase=phase, message="new incumbent" if improving else "searching",
            incumbent=inc if np.isfinite(inc) else None,
            bound=bound if np.isfinite(bound) else None,
            gap=gap if np.isfinite(gap) and gap < 1e20 else None, elapsed=now - t0))

    return cb


def _status_word(code: int, has_solution: bool) -> str:
    if has_solution:
        return "feasible"
    return {pulp.LpStatusInfeasible: "infeasible"}.get(code, "failed")


def solve_items(prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray, *,
                warm: np.ndarray | None = None, time_limit: float = 10.0, solver: str = "highs",
                progress: Callable[[ProgressEvent], None] | None = None,
                phase: str = "ilp", gap_rel: float = 1e-4,
                cutoff: float | None = None,
                stop: Callable[[], bool] | None = None,
                memory: tuple[float, float] | None = None) -> IlpResult:
    """Solve the ILP of Note [ILP formulation] over ``items``.

    Args:
        prob: The problem.
        items: Node indices of each item; together every assigned node once.
        lo: Smallest feasible stage per item.
        hi: Largest feasible stage per item (equal to ``lo``: the item is fixed).
        warm: A feasible stage per item to start from, if known.
        time_limit: Seconds for building the model and solving it (at least 0.05 s for the
            solver).
        solver: ``"highs"`` or ``"cbc"``; HiGHS falls back to CBC if it fails.
        progress: Called with progress events (HiGHS only).
        phase: The phase name for progress events.
        gap_rel: Relative MIP gap at which the solver may stop.
        cutoff: Search only for assignments with an objective below this (HiGHS's
            ``objective_bound``, a constraint for CBC), without primal heuristics. Status
            ``"infeasible"`` then means that none exists, and the result's ``bound`` is at
            most ``cutoff``.
        stop: Polled during HiGHS's search: once it returns true, the search stops as at its
            time limit (another thread found the answer; CBC ignores it).
        memory: Only assignments whose memory term (the objective's ``u``) lies in this range
            ``(at least, at most)``; the objective is then taken with ``u`` at least the lower
            end (Note [memory sides] in ``_pieces.py``). ``None``: every assignment.

    Returns:
        The result; its ``bound``, when set, is at most the objective of every assignment of
        the items within ``lo``/``hi``.

    Raises:
        SolverError: if every solver failed to run.
    """
    t0 = _time.perf_counter()
    model = _Model(prob, items, lo, hi, memory)
    if np.any(model.lo > model.hi):
        return IlpResult(None, "infeasible", None, None, solver, 0, 0,
                         _time.perf_counter() - t0, ("item ranges are empty after propagation",))
    warm_vals = model.warm_values(warm) if warm is not None else None
    notes: list[str] = []
    order = ["highs", "cbc"] if solver == "highs" else ["cbc"]
    for name in order:
        remaining = max(0.05, time_limit - (_time.perf_counter() - t0))
        try:
            if name == "highs":
                res = _solve_highs(model, warm_vals, remaining, progress, phase, gap_rel, t0,
                                   cutoff, stop)
                if warm_vals is not None and _inconsistent(model, res):
                    # HiGHS 1.16 with a start solution and presolve can report an objective
                    # (and dual bound) its own solution does not have: solve again cold.
                    notes.append("HiGHS's objective disagreed with its solution after a warm "
                                 "start; solved again without it")
                    remaining = max(0.05, time_limit - (_time.perf_counter() - t0))
                    res = _solve_highs(model, None, remaining, progress, phase, gap_rel, t0,
                                       cutoff, stop)
            else:
                res = _solve_cbc(model, warm_vals, remaining, gap_rel, cutoff)
        except Exception as e:
            notes.append(f"{name} failed: {type(e).__name__}: {e}")
            continue
        item_stage, status, obj, bound = res
        if item_stage is not None and obj is not None:
            # A solver may stop within gap_rel at an incumbent whose continuous variables
            # (t, u, z, ...) are not at their least: report the assignment's own objective.
            obj = min(obj, model.objective_at(item_stage))
        if cutoff is not None:
            if status == "infeasible":
                bound = cutoff  # nothing below the cutoff within the ranges
            elif bound is not None:
                bound = min(bound, cutoff)
        return IlpResult(item_stage, status, obj, bound, name, len(model.lp.variables()),
                         len(model.lp.constraints), _time.perf_counter() - t0,
                         tuple(notes))
    raise SolverError(
        "every ILP solver failed: " + "; ".join(notes) + ". Check that highspy and PuLP's "
        "bundled CBC are installed ('pip install highspy pulp'), or use method='dp'.")


def _inconsistent(model: _Model, res: tuple[np.ndarray | None, str, float | None,
                                             float | None]) -> bool:
    """Whether the solver's objective differs from its solution's (the objective expression
    at the variables' values)."""
    stage, _, obj, _ = res
    if stage is None or obj is None:
        return False
    value = pulp.value(model.lp.objective)
    return value is not None and abs(float(value) - obj) > 1e-7 * max(1.0, abs(obj))


def _extract(model: _Model) -> np.ndarray | None:
    stage = np.empty(model.k, dtype=np.int64)
    for a in range(model.k):
        s_a = int(model.hi[a])
        for s in range(int(model.lo[a]), int(model.hi[a])):
            v = model.y[a, s].varValue
            if v is None:
                return None
            if v > 0.5:
                s_a = s
                break
        stage[a] = s_a
    return stage


def _solve_highs(model: _Model, warm: dict[str, float] | None, limit: float,
                 progress: Callable[[ProgressEvent], None] | None, phase: str, gap_rel: float,
                 t0: float, cutoff: float | None = None, stop: Callable[[], bool] | None = None
                 ) -> tuple[np.ndarray | None, str, float | None, float | None]:
    import highspy

    silence_banner()
    cb = highspy.cb.HighsCallbackType
    kwargs: dict[str, Any] = dict(msg=False, **highs_options(time_limit=limit, gap_rel=gap_rel,
                                                             cutoff=cutoff))
    deadline = _time.perf_counter() + limit
    kwargs["callbackTuple"] = (_highs_callback(phase, progress, t0, deadline, cutoff=cutoff,
                                               stop=stop), None)
    kwargs["callbacksToActivate"] = [cb.kCallbackMipInterrupt] + (
        [cb.kCallbackMipImprovingSolution] if progress is not None else [])
    solver = _HiGHS(warm=warm, **kwargs)
    code = model.lp.solve(solver)
    h = model.lp.solverModel
    hs = h.getModelStatus()
    info = h.getInfo()
    found = int(info.primal_solution_status) != 0  # kSolutionStatusNone: no assignment
    stage = _extract(model) if code == pulp.LpStatusOptimal and found else None
    if stage is not None and cutoff is not None and float(h.getObjectiveValue()) >= cutoff:
        stage = None  # above the cutoff: not what was searched for (the bound still holds)
    done = hs in (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kInfeasible,
                  highspy.HighsModelStatus.kObjectiveBound)
    if hs == highspy.HighsModelStatus.kOptimal and stage is not None:
        status = "optimal"
    elif cutoff is not None and stage is None and done:
        status = "infeasible"  # the search is complete: nothing below the cutoff
    elif stage is None and hs in (highspy.HighsModelStatus.kTimeLimit,
                                  highspy.HighsModelStatus.kInterrupt):
        status = "stopped"
    else:
        status = _status_word(code, stage is not None)
    dual = float(info.mip_dual_bound)
    bound = dual if np.isfinite(dual) and abs(dual) < 1e20 else None
    obj = float(h.getObjectiveValue()) if stage is not None else None
    if status == "optimal" and obj is not None and bound is None:
        bound = obj
    return stage, status, obj, bound


def _solve_cbc(model: _Model, warm: dict[str, float] | None, limit: float,
               gap_rel: float, cutoff: float | None = None
               ) -> tuple[np.ndarray | None, str, float | None, float | None]:
    if cutoff is not None and "cutoff" not in model.lp.constraints:
        model.lp.addConstraint(model.lp.objective <= float(cutoff), "cutoff")
        warm = None  # the warm start is at or above the cutoff
    if warm:
        for var in model.lp.variables():
            if var.name in warm:
                var.setInitialValue(warm[var.name])
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(np.ceil(limit))),
                               gapRel=gap_rel, warmStart=bool(warm), threads=THREADS)
    code = model.lp.solve(solver)
    stage = _extract(model) if code == pulp.LpStatusOptimal else None
    optimal = code == pulp.LpStatusOptimal and model.lp.sol_status == pulp.LpSolutionOptimal
    status = "optimal" if optimal and stage is not None else _status_word(code, stage is not None)
    obj = pulp.value(model.lp.objective) if stage is not None else None
    # CBC reports no dual bound: "optimal" proves the objective within gap_rel of the best.
    return stage, status, (float(obj) if obj is not None else None), (
        float(obj) * (1 - gap_rel) if status == "optimal" and obj is not None else None)
