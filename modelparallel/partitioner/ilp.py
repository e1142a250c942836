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
the final objective is recomputed from the assignment anyway). This is exactly the relay rule
of Note [pipeline order]. With normalised units (times over ``T_ref``, bytes over
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

import itertools
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pulp

from modelparallel.errors import SolverError
from modelparallel.partitioner._highs import THREADS, highs_options, silence_banner
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
        objective: The solver's objective value (normalised, Note [ILP formulation]).
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
                    cutoff: float | None = None) -> Callable[..., None]:
    """Progress reports, and an interrupt at ``deadline`` (HiGHS checks its own time limit only
    between root-node steps, which on a model of a few thousand rows can overrun it by a
    second). With a ``cutoff``, HiGHS's primal bound is the cutoff until an assignment below it
    is found: it is not reported as an incumbent."""
    last = [0.0]

    def cb(kind: int, message: str, out: Any, inp: Any, user: Any) -> None:
        import highspy

        now = _time.perf_counter()
        if now > deadline and kind == int(highspy.cb.HighsCallbackType.kCallbackMipInterrupt):
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


# -- the model ---------------------------------------------------------------------------------------


class _Model:
    """Builds the PuLP model of Note [ILP formulation] for a set of items, one constraint family
    per method (the same families as the bound model's builders in ``_bound_model.py``)."""

    def __init__(self, prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray,
                 hi: np.ndarray) -> None:
        self.prob = prob
        p = prob.p
        self.k = len(items)
        self.items = items
        item_of = np.empty(prob.n, dtype=np.int64)
        for a, m in enumerate(items):
            item_of[m] = a
        self.item_of = item_of
        self.lo, self.hi = self._propagate(lo.copy(), hi.copy())
        self.lp = pulp.LpProblem("partition", pulp.LpMinimize)
        self.inv_t = 1.0 / prob.t_ref
        self.inv_m = 1.0 / (prob.caps * prob.u_ref)
        self.time_terms: list[list[tuple[Any, float]]] = [[] for _ in range(p)]
        self.mem_terms: list[list[tuple[Any, float]]] = [[] for _ in range(p)]
        self.const_t = np.zeros(p)
        self.const_m = np.zeros(p)
        self.rows: list[pulp.LpConstraint] = []
        self.z: dict[tuple[int, int], pulp.LpVariable | float] = {}
        self.w: dict[tuple[int, int], pulp.LpVariable] = {}
        self.h: dict[tuple[int, int], pulp.LpVariable] = {}
        self.ws: dict[int, pulp.LpVariable] = {}
        self._item_costs()
        self._assignment()
        self._order()
        self._boundaries()
        self._shared_parameters()
        self._workspace()
        self._bottleneck()

    # -- constraint families --------------------------------------------------------------------

    def _item_costs(self) -> None:
        """Per-item constants: compute time, saved bytes, workspace, parameter state (a parameter
        read within one item only is the item's own); the item edges and value groups."""
        prob, items, item_of, p = self.prob, self.items, self.item_of, self.prob.p
        self.work = np.stack([prob.time[m].sum(axis=0) for m in items]) * self.inv_t  # (k, p)
        self.saved = np.array([prob.saved[m].sum() for m in items])
        self.wsz = np.array([prob.workspace[m].max(initial=0.0) for m in items])
        self.pmem = np.stack([prob.single_param_state[m].sum(axis=0) for m in items]) \
            if self.k else np.zeros((0, p))
        # Parameters shared by several nodes: within one item they are constants of the item.
        self.shared: list[tuple[np.ndarray, list[int]]] = []
        for q in prob.shared:
            its = sorted({int(item_of[r]) for r in q.readers})
            if len(its) == 1:
                self.pmem[its[0]] += np.asarray(q.state, dtype=float)
            else:
                self.shared.append((np.asarray(q.state, dtype=float), its))
        src_i, dst_i = item_of[prob.edge_src], item_of[prob.edge_dst]
        cross = src_i != dst_i
        self.edges = sorted(set(zip(src_i[cross].tolist(), dst_i[cross].tolist())))
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        cons: dict[int, set[int]] = {}
        for u_, v_ in zip(prob.edge_src[cross].tolist(), prob.edge_dst[cross].tolist()):
            cons.setdefault(u_, set()).add(int(item_of[v_]))
        for u_, consumer_items in cons.items():
            groups.setdefault((int(item_of[u_]), tuple(sorted(consumer_items))), []).append(u_)
        self.groups = [(a, cs, np.array(vs)) for (a, cs), vs in groups.items()]

    def _assignment(self) -> None:
        """Assignment: the cumulative binaries ``y`` (pins and order are in the item ranges,
        :meth:`_propagate`), monotone in ``s``; each item's time and memory on its stage."""
        prob, k = self.prob, self.k
        self.y: dict[tuple[int, int], pulp.LpVariable] = {}
        for a in range(k):
            for s in range(int(self.lo[a]), int(self.hi[a])):
                self.y[a, s] = pulp.LpVariable(f"y_{a}_{s}", cat=pulp.LpBinary)
        for a in range(k):
            for s in range(int(self.lo[a]), int(self.hi[a]) + 1):
                self._add_x(a, s, float(self.work[a, s]), self.time_terms[s], self.const_t)
                mcoef = (float(self.pmem[a, s]) + float(prob.inflight[s]) * self.saved[a]) \
                    * self.inv_m[s]
                self._add_x(a, s, mcoef, self.mem_terms[s], self.const_m)
        for a in range(k):
            for s in range(int(self.lo[a]), int(self.hi[a]) - 1):
                self.rows.append(_affine([(self.y[a, s + 1], 1.0), (self.y[a, s], -1.0)]) >= 0)

    def _order(self) -> None:
        """Pipeline order: ``y[a, s] >= y[c, s]`` for every item edge ``a -> c``."""
        for a, c in self.edges:
            for s in range(self.prob.p - 1):
                ya, yc = self.Y(a, s), self.Y(c, s)
                if (isinstance(yc, float) and yc == 0.0) or (isinstance(ya, float) and ya == 1.0):
                    continue
                self.rows.append(_affine([(ya, 1.0), (yc, -1.0)]) >= 0)

    def _boundaries(self) -> None:
        """Communication: ``z[g, s] >= y[a, s] - y[c, s]`` per value group crossing boundary
        ``s``, its time on both stages, its bytes received on ``s + 1`` and held by the sender
        (:meth:`_add_sent`)."""
        prob, p = self.prob, self.prob.p
        comm = prob.comm[:, :max(p - 1, 1)]
        inv_m = self.inv_m
        for gi, (a, cs, vals) in enumerate(self.groups):
            ccomm = comm[vals].sum(axis=0) * self.inv_t
            cbytes = float(prob.out_bytes[vals].sum())
            sbytes = float(prob.sent[vals].sum())
            for s in range(int(self.lo[a]), min(p - 1, max(int(self.hi[c]) for c in cs))):
                ya = self.Y(a, s)
                diffs = [(ya, self.Y(c, s)) for c in cs]
                zval: pulp.LpVariable | float
                if any(isinstance(d0, float) and isinstance(d1, float) and d0 - d1 >= 1.0
                       for d0, d1 in diffs):
                    zval = 1.0
                else:
                    live = [(d0, d1) for d0, d1 in diffs
                            if not (isinstance(d0, float) and d0 == 0.0)
                            and not (isinstance(d1, float) and d1 == 1.0)]
                    if not live:
                        continue
                    zval = pulp.LpVariable(f"z_{gi}_{s}", lowBound=0, upBound=1)
                    for d0, d1 in live:
                        self.rows.append(_affine([(zval, 1.0), (d0, -1.0), (d1, 1.0)]) >= 0)
                self.z[gi, s] = zval
                for st, coef_t in ((s, ccomm[s]), (s + 1, ccomm[s])):
                    if isinstance(zval, float):
                        self.const_t[st] += coef_t
                    else:
                        self.time_terms[st].append((zval, coef_t))
                coef_m = float(prob.inflight[s + 1]) * cbytes * inv_m[s + 1]
                if isinstance(zval, float):
                    self.const_m[s + 1] += coef_m
                else:
                    self.mem_terms[s + 1].append((zval, coef_m))
                if sbytes > 0:
                    self._add_sent(gi, a, s, zval, float(prob.inflight[s]) * sbytes * inv_m[s],
                                   self.mem_terms[s], self.const_m, self.rows)

    def _shared_parameters(self) -> None:
        """Parameters read by several items: colocation (``tied="colocate"``: equal ``y``, the
        state charged once) or ``h[q, s] >= x[a, s]`` for every reader (Note [tied
        parameters])."""
        prob, p = self.prob, self.prob.p
        colocate = prob.config.tied == "colocate"
        for qi, (state, its) in enumerate(self.shared):
            if colocate:
                for a, b in itertools.pairwise(its):
                    for s in range(p - 1):
                        ya, yb = self.Y(a, s), self.Y(b, s)
                        if isinstance(ya, float) and isinstance(yb, float):
                            continue
                        self.rows.append(_affine([(ya, 1.0), (yb, -1.0)]) == 0)
            for s in range(p):
                readers = [a for a in its if self.lo[a] <= s <= self.hi[a]]
                if not readers:
                    continue
                coef = float(state[s]) * self.inv_m[s]
                if colocate:
                    self._add_x(readers[0], s, coef, self.mem_terms[s], self.const_m)
                    continue
                if any(self.lo[a] == self.hi[a] == s for a in readers):
                    self.const_m[s] += coef
                    continue
                hv = pulp.LpVariable(f"h_{qi}_{s}", lowBound=0, upBound=1)
                self.h[qi, s] = hv
                self.mem_terms[s].append((hv, coef))
                for a in readers:
                    self._at_least(hv, a, s, 1.0)

    def _workspace(self) -> None:
        """Workspace: ``ws_s >= workspace[a] x[a, s]`` (the largest on the stage)."""
        k, ws, inv_m = self.k, self.wsz, self.inv_m
        for s in range(self.prob.p):
            fixed = [ws[a] for a in range(k) if self.lo[a] == self.hi[a] == s]
            base = max(fixed, default=0.0)
            free = [a for a in range(k) if self.lo[a] <= s <= self.hi[a]
                    and self.lo[a] != self.hi[a] and ws[a] > base]
            if not free:
                self.const_m[s] += base * inv_m[s]
                continue
            wv = pulp.LpVariable(f"ws_{s}", lowBound=base * inv_m[s])
            self.ws[s] = wv
            self.mem_terms[s].append((wv, 1.0))
            for a in free:
                self._at_least(wv, a, s, float(ws[a]) * inv_m[s])

    def _bottleneck(self) -> None:
        """Time and memory epigraphs ``t >= T_s``, ``u >= M_s`` (``u <= 1 / U_ref``: memory
        caps), the objective ``(1 - w) t + w u`` (memory balance) and every row into the LP."""
        prob = self.prob
        self.t = pulp.LpVariable("t", lowBound=0)
        self.u = pulp.LpVariable("u", lowBound=0, upBound=1.0 / prob.u_ref)
        rows = self.rows
        for s in range(prob.p):
            rows.append(_affine([(self.t, 1.0)] + [(v, -c) for v, c in self.time_terms[s]])
                        >= self.const_t[s])
            rows.append(_affine([(self.u, 1.0)] + [(v, -c) for v, c in self.mem_terms[s]])
                        >= self.const_m[s])
        w = prob.w
        self.lp += _affine([(self.t, 1.0 - w), (self.u, w)])
        for i, c in enumerate(rows):
            self.lp.addConstraint(c, f"c{i}")

    # -- helpers --------------------------------------------------------------------------------

    def _add_x(self, a: int, s: int, coef: float, terms: list[tuple[Any, float]],
               const: np.ndarray) -> None:
        """Add ``coef * x[a, s]`` (x = Y(a,s) - Y(a,s-1))."""
        for ss, sign in ((s, 1.0), (s - 1, -1.0)):
            y = self.Y(a, ss)
            if isinstance(y, float):
                const[s] += sign * coef * y
            else:
                terms.append((y, sign * coef))

    def _at_least(self, var: pulp.LpVariable, a: int, s: int, coef: float) -> None:
        """The row ``var >= coef * x[a, s]``."""
        xs: list[tuple[Any, float]] = []
        cst = np.zeros(self.prob.p)
        self._add_x(a, s, coef, xs, cst)
        self.rows.append(_affine([(var, 1.0)] + [(v, -c) for v, c in xs]) >= cst[s])

    def _add_sent(self, gi: int, a: int, s: int, zval: pulp.LpVariable | float, coef: float,
                  terms: list[tuple[Any, float]], const: np.ndarray,
                  rows: list[pulp.LpConstraint]) -> None:
        """Charge ``coef`` to stage ``s`` when group ``gi`` crosses boundary ``s`` and its
        producer item ``a`` is on ``s`` (Note [sent values held]): ``w >= z[g, s] - y[a, s-1]``,
        ``w >= 0``; a relayed group (``y[a, s-1] = 1``) costs its receiver only."""
        prev = self.Y(a, s - 1)
        if isinstance(prev, float):
            if prev >= 1.0:
                return
            if isinstance(zval, float):
                const[s] += coef * zval
            else:
                terms.append((zval, coef))
            return
        wv = pulp.LpVariable(f"w_{gi}_{s}", lowBound=0, upBound=1)
        self.w[gi, s] = wv
        rows.append(_affine([(wv, 1.0), (zval, -1.0), (prev, 1.0)]) >= 0)
        terms.append((wv, coef))

    def _propagate(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tighten item ranges along item edges (the quotient is a DAG in item order)."""
        prob = self.prob
        src_i, dst_i = self.item_of[prob.edge_src], self.item_of[prob.edge_dst]
        keep = src_i != dst_i
        pairs = sorted(set(zip(src_i[keep].tolist(), dst_i[keep].tolist())))
        for _ in range(len(self.items) + 1):
            changed = False
            for a, c in pairs:
                if lo[c] < lo[a]:
                    lo[c] = lo[a]
                    changed = True
                if hi[a] > hi[c]:
                    hi[a] = hi[c]
                    changed = True
            if not changed:
                break
        return lo, hi

    def Y(self, a: int, s: int) -> pulp.LpVariable | float:
        """``y[a, s]`` or its constant value outside the item's range."""
        if s < self.lo[a]:
            return 0.0
        if s >= self.hi[a]:
            return 1.0
        return self.y[a, s]

    def warm_values(self, item_stage: np.ndarray) -> dict[str, float]:
        """Values of every variable for an assignment of the items."""
        prob, p = self.prob, self.prob.p
        vals: dict[str, float] = {}
        for (a, s), var in self.y.items():
            vals[var.name] = 1.0 if item_stage[a] <= s else 0.0
        for (gi, s), zv in self.z.items():
            if isinstance(zv, pulp.LpVariable):
                a, cs, _ = self.groups[gi]
                vals[zv.name] = 1.0 if item_stage[a] <= s < max(item_stage[c] for c in cs) \
                    else 0.0
        for (gi, s), wv in self.w.items():
            a, cs, _ = self.groups[gi]
            vals[wv.name] = 1.0 if item_stage[a] == s < max(item_stage[c] for c in cs) else 0.0
        for (qi, s), hv in self.h.items():
            vals[hv.name] = 1.0 if any(item_stage[a] == s for a in self.shared[qi][1]) else 0.0
        inv_m = 1.0 / (prob.caps * prob.u_ref)
        for s, wv in self.ws.items():
            on = [self.wsz[a] for a in range(self.k) if item_stage[a] == s]
            vals[wv.name] = max(max(on, default=0.0) * inv_m[s], wv.lowBound or 0.0)

        def row(terms: list[tuple[Any, float]], const: float) -> float:
            return const + sum(vals.get(v.name, 0.0) * c for v, c in terms)

        vals["t"] = max(row(self.time_terms[s], self.const_t[s]) for s in range(p))
        vals["u"] = max(row(self.mem_terms[s], self.const_m[s]) for s in range(p))
        return vals


def _affine(terms: list[tuple[Any, float]]) -> pulp.LpAffineExpression:
    expr = pulp.LpAffineExpression()
    for v, c in terms:
        if isinstance(v, float):
            expr.constant += v * c
        elif c:
            expr.addterm(v, c)
    return expr


def _status_word(code: int, has_solution: bool) -> str:
    if has_solution:
        return "feasible"
    return {pulp.LpStatusInfeasible: "infeasible"}.get(code, "failed")


def solve_items(prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray, *,
                warm: np.ndarray | None = None, time_limit: float = 10.0, solver: str = "highs",
                progress: Callable[[ProgressEvent], None] | None = None,
                phase: str = "ilp", gap_rel: float = 1e-4,
                cutoff: float | None = None) -> IlpResult:
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

    Returns:
        The result; its ``bound``, when set, is at most the objective of every assignment of
        the items within ``lo``/``hi``.

    Raises:
        SolverError: if every solver failed to run.
    """
    t0 = _time.perf_counter()
    model = _Model(prob, items, lo, hi)
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
                                   cutoff)
            else:
                res = _solve_cbc(model, warm_vals, remaining, gap_rel, cutoff)
        except Exception as e:
            notes.append(f"{name} failed: {type(e).__name__}: {e}")
            continue
        item_stage, status, obj, bound = res
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
                 t0: float, cutoff: float | None = None
                 ) -> tuple[np.ndarray | None, str, float | None, float | None]:
    import highspy

    silence_banner()
    cb = highspy.cb.HighsCallbackType
    kwargs: dict[str, Any] = dict(msg=False, **highs_options(time_limit=limit, gap_rel=gap_rel,
                                                             cutoff=cutoff))
    deadline = _time.perf_counter() + limit
    kwargs["callbackTuple"] = (_highs_callback(phase, progress, t0, deadline, cutoff=cutoff),
                               None)
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
    return stage, status, (float(obj) if obj is not None else None), (
        float(obj) if status == "optimal" and obj is not None else None)
