"""The PuLP model of Note [ILP formulation] (in :mod:`~modelparallel.partitioner.ilp`), one
constraint family per method, the same families as the bound model's builders in
``_bound_model.py``; :func:`~modelparallel.partitioner.ilp.solve_items` builds and solves it.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.coarsen import singletons
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(4), PlanConfig(partitions=2), "h100")
    >>> u = singletons(prob)
    >>> model = _Model(prob, u.members, u.lo, u.hi)
    >>> model.k == len(u.members), model.lp.sense == 1
    (True, True)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from modelparallel.partitioner._pulp import pulp
from modelparallel.partitioner.problem import Problem

__all__: list[str] = []  # private to modelparallel.partitioner.ilp


class _Model:
    """Builds the PuLP model of Note [ILP formulation] for a set of items, one constraint family
    per method (the same families as the bound model's builders in ``_bound_model.py``)."""

    def __init__(self, prob: Problem, items: Sequence[np.ndarray], lo: np.ndarray,
                 hi: np.ndarray, memory: tuple[float, float] | None = None) -> None:
        self.prob = prob
        self.memory = memory
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
        self.r: dict[tuple[int, int], pulp.LpVariable | float] = {}
        self.f: dict[tuple[int, int], pulp.LpVariable | float] = {}
        self.e: dict[tuple[int, int], pulp.LpVariable] = {}
        self._item_costs()
        self._assignment()
        self._order()
        if prob.direct:
            self._direct_sends()
        else:
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

    def _direct_sends(self) -> None:
        """Communication under direct sends (Note [ILP formulation]): per value group, the
        receive indicators ``r[g, d] >= x[c, d] - x[a, d]`` (a consumer item on ``d``, the
        producer item elsewhere), the send indicators ``f[g, s] >= x[a, s] - x[c, s]`` and, for
        several consumer items, the send count ``e[g, s] >= sum_{d > s} r[g, d] - M (1 - x[a,
        s])``, ``e >= f``; their time on their own stages, the received bytes on ``d`` and the
        sent bytes held on ``s`` (Note [sent values held])."""
        prob, p = self.prob, self.prob.p
        inv_m, k = self.inv_m, prob.inflight
        for gi, (a, cs, vals) in enumerate(self.groups):
            link = prob.link[vals].sum(axis=0) * self.inv_t
            cbytes = float(prob.out_bytes[vals].sum())
            sbytes = float(prob.sent[vals].sum())
            lo_a, hi_a = int(self.lo[a]), int(self.hi[a])
            recv: dict[int, pulp.LpVariable | float] = {}
            for d in range(min(int(self.lo[c]) for c in cs), max(int(self.hi[c]) for c in cs) + 1):
                if lo_a == hi_a == d:
                    continue
                r = self._indicator(f"r_{gi}_{d}", [
                    self._x(c, d) + self._x(a, d, -1.0) for c in cs
                    if self.lo[c] <= d <= self.hi[c]])
                if r is None:
                    continue
                recv[d] = self.r[gi, d] = r
                self._charge(self.time_terms[d], self.const_t, d, r, float(link[d]))
                self._charge(self.mem_terms[d], self.const_m, d, r,
                             float(k[d]) * cbytes * inv_m[d])
            for s in range(lo_a, min(hi_a, p - 2) + 1):
                f = self._indicator(f"f_{gi}_{s}", [self._x(a, s) + self._x(c, s, -1.0)
                                                    for c in cs])
                if f is None:
                    continue
                self.f[gi, s] = f
                if sbytes > 0:
                    self._charge(self.mem_terms[s], self.const_m, s, f,
                                 float(k[s]) * sbytes * inv_m[s])
                beyond = [r for d, r in recv.items() if d > s]
                if len(beyond) <= 1:  # at most one receiving stage: one send
                    self._charge(self.time_terms[s], self.const_t, s, f, float(link[s]))
                    continue
                e = pulp.LpVariable(f"e_{gi}_{s}", lowBound=0)
                self.e[gi, s] = e
                self.rows.append(_affine([(e, 1.0), (f, -1.0)]) >= 0)
                big = float(len(beyond))
                self.rows.append(_affine([(e, 1.0), *[(r, -1.0) for r in beyond], (1.0, big),
                                          *self._x(a, s, -big)]) >= 0)
                self.time_terms[s].append((e, float(link[s])))

    def _x(self, a: int, s: int, coef: float = 1.0) -> list[tuple[Any, float]]:
        """``coef * x[a, s]`` as terms (``x = Y(a, s) - Y(a, s - 1)``; constants as floats)."""
        return [(self.Y(a, s), coef), (self.Y(a, s - 1), -coef)]

    def _indicator(self, name: str, diffs: list[list[tuple[Any, float]]]
                   ) -> pulp.LpVariable | float | None:
        """A variable in [0, 1] at least every expression of ``diffs`` (rows added): 1.0 if
        one of them is the constant 1, ``None`` if none can be positive."""
        live = []
        for terms in diffs:
            if all(isinstance(v, float) for v, _ in terms):
                if sum(v * c for v, c in terms) >= 1.0:
                    return 1.0
                continue
            live.append(terms)
        if not live:
            return None
        var = pulp.LpVariable(name, lowBound=0, upBound=1)
        for terms in live:
            self.rows.append(_affine([(var, 1.0), *[(v, -c) for v, c in terms]]) >= 0)
        return var

    @staticmethod
    def _charge(terms: list[tuple[Any, float]], const: np.ndarray, s: int,
                v: pulp.LpVariable | float, coef: float) -> None:
        """Add ``coef * v`` to stage ``s``'s row (its constant when ``v`` is one)."""
        if isinstance(v, float):
            const[s] += coef * v
        else:
            terms.append((v, coef))

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
        caps; within ``memory`` when given, Note [memory sides] in ``_pieces.py``), the
        objective ``(1 - w) t + w u`` (memory balance) and every row into the LP."""
        prob = self.prob
        u_lo, u_hi = (0.0, np.inf) if self.memory is None else self.memory
        self.t = pulp.LpVariable("t", lowBound=0)
        self.u = pulp.LpVariable("u", lowBound=max(0.0, float(u_lo)),
                                 upBound=min(1.0 / prob.u_ref, float(u_hi)))
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
        return propagate_ranges(self.prob, self.item_of, lo, hi)

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
        for (gi, d), rv in self.r.items():
            if isinstance(rv, pulp.LpVariable):
                a, cs, _ = self.groups[gi]
                vals[rv.name] = 1.0 if item_stage[a] != d and any(
                    item_stage[c] == d for c in cs) else 0.0
        for (gi, s), fv in self.f.items():
            if isinstance(fv, pulp.LpVariable):
                a, cs, _ = self.groups[gi]
                vals[fv.name] = 1.0 if item_stage[a] == s and any(
                    item_stage[c] != s for c in cs) else 0.0
        for (gi, s), ev in self.e.items():
            a, cs, _ = self.groups[gi]
            vals[ev.name] = float(len({int(item_stage[c]) for c in cs} - {s})) \
                if item_stage[a] == s else 0.0
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

    def objective_at(self, item_stage: np.ndarray) -> float:
        """The objective ``(1 - w) t + w u`` of an assignment, every other variable at its
        least feasible value (what :meth:`warm_values` gives): the assignment's own objective,
        without the slack a solver's incumbent may carry within its MIP gap."""
        vals = self.warm_values(item_stage)
        return (1.0 - self.prob.w) * vals["t"] + self.prob.w * vals["u"]


def _affine(terms: list[tuple[Any, float]]) -> pulp.LpAffineExpression:
    expr = pulp.LpAffineExpression()
    for v, c in terms:
        if isinstance(v, float):
            expr.constant += v * c
        elif c:
            expr.addterm(v, c)
    return expr


def propagate_ranges(prob: Problem, item_of: np.ndarray, lo: np.ndarray, hi: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Item stage ranges tightened along item edges, in place: a consumer starts no earlier than
    its producer, a producer ends no later than its consumer (the pipeline order), and the
    items of a colocated group (``tied="colocate"``) share one range. ``item_of`` maps each
    node to its item; a range left empty (``lo > hi``) means no assignment fits."""
    src_i, dst_i = item_of[prob.edge_src], item_of[prob.edge_dst]
    keep = src_i != dst_i
    pairs = sorted(set(zip(src_i[keep].tolist(), dst_i[keep].tolist())))
    groups = [sorted({int(item_of[v]) for v in g}) for g in prob.colocate]
    groups = [g for g in groups if len(g) > 1]
    for _ in range(int(item_of.max(initial=0)) + 2):
        changed = False
        for g in groups:
            glo, ghi = lo[g].max(), hi[g].min()
            if np.any(lo[g] != glo) or np.any(hi[g] != ghi):
                lo[g], hi[g] = glo, ghi
                changed = True
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
