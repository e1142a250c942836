"""The windowed bound model of part 3 of Note [lower bound] (``bounds.py``), in raw highspy.

One builder per constraint family, the same families as the ILP's (``_ilp_model.py``, Note [ILP
formulation]) over single ops: assignment and precedence (:func:`_order_rows`), communication
(:func:`_crossing_rows`), time (:func:`_time_rows`), memory (:func:`_memory_terms`), shared
parameters (:func:`_shared_parameter_rows`) and workspace (:func:`_workspace_rows`); under
direct sends (Note [pipeline order]) the communication, its time and received bytes are
:func:`_direct_rows` instead. Pins and colocation are dropped (a relaxation). ``tests/partitioner/test_formulations.py`` checks both
models against :func:`~modelparallel.partitioner.evaluate.evaluate` at fixed assignments.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass

import numpy as np

from modelparallel.partitioner._highs import (
    BOUND_GAP_REL,
    apply_options,
    highs_options,
    silence_banner,
)
from modelparallel.partitioner.problem import Problem

_WS_NODES = 32  # largest-workspace nodes whose workspace the windowed model keeps


class _LP:
    """The windowed LP relaxation of part 3 of Note [lower bound], built with numpy."""

    def __init__(self, prob: Problem, lo: np.ndarray, hi: np.ndarray) -> None:
        self.prob = prob
        self.lo, self.hi = np.asarray(lo), np.asarray(hi)
        n, p = prob.n, prob.p
        nb = p - 1
        # Column index of y[v, b] where free (lo_v <= b < hi_v), else -1 (constant).
        b_idx = np.arange(nb)[None, :]
        free = (b_idx >= lo[:, None]) & (b_idx < hi[:, None])
        self.col = np.full((n, nb), -1, dtype=np.int64)
        self.col[free] = np.arange(int(free.sum()))
        self.const = (b_idx >= hi[:, None]).astype(float)  # value where not free
        self.ncol = int(free.sum())
        self.lb: list[np.ndarray] = [np.zeros(self.ncol)]
        self.ub: list[np.ndarray] = [np.ones(self.ncol)]
        self.cost: list[np.ndarray] = [np.zeros(self.ncol)]
        self.rows_r: list[np.ndarray] = []
        self.rows_c: list[np.ndarray] = []
        self.rows_v: list[np.ndarray] = []
        self.row_lo: list[np.ndarray] = []
        self.row_hi: list[np.ndarray] = []
        self.nrow = 0
        self.free = free

    def new_cols(self, k: int, lb: float = 0.0, ub: float = 1.0, cost: float = 0.0) -> np.ndarray:
        start = self.ncol
        self.ncol += k
        self.lb.append(np.full(k, lb))
        self.ub.append(np.full(k, ub))
        self.cost.append(np.full(k, cost))
        return np.arange(start, start + k)

    def add_rows(self, r: np.ndarray, c: np.ndarray, v: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray) -> None:
        """Rows given by local row ids ``r`` (0..k-1) with entries (c, v) and bounds."""
        k = len(lo)
        self.rows_r.append(r + self.nrow)
        self.rows_c.append(c)
        self.rows_v.append(v)
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        self.nrow += k

    def y_terms(self, v: np.ndarray, b: np.ndarray, coef: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Split ``coef * y[v, b]`` (b may be -1 or nb) into (mask_var, cols, coefs, const)."""
        nb = self.prob.p - 1
        const = np.zeros(len(v))
        inside = (b >= 0) & (b < nb)
        bb = np.clip(b, 0, max(nb - 1, 0))
        colv = np.where(inside, self.col[v, bb] if nb else -1, -1)
        val = np.where(b >= nb, 1.0, np.where(inside, self.const[v, bb] if nb else 0.0, 0.0))
        is_var = colv >= 0
        const = np.where(is_var, 0.0, coef * val)
        return is_var, colv, coef, const

    def stage_rows(self, coef: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray],
                                                    list[np.ndarray], np.ndarray]:
        """Rows (one per stage) of sum_v coef[v, s] x[v, s]; returns entries and constants."""
        p = self.prob.p
        nb = p - 1
        col, free = self.col, self.free
        rr, cc, vals = [], [], []
        const = np.zeros(p)
        for s in range(p):
            for b, sign in ((s, 1.0), (s - 1, -1.0)):
                if b < 0:
                    continue
                if b >= nb:
                    const[s] += sign * coef[:, s].sum()
                    continue
                fv = free[:, b]
                cc.append(col[fv, b])
                vals.append(sign * coef[fv, s])
                rr.append(np.full(int(fv.sum()), s))
                const[s] += sign * float((coef[~fv, s] * self.const[~fv, b]).sum())
        return rr, cc, vals, const

    def minus_x(self, v: int, s: int, coef: float) -> tuple[list[int], list[float], float]:
        """``-coef x[v, s]`` in boundary variables (``x[v, s] = y[v, s] - y[v, s - 1]``, fixed
        ``y`` as constants): its columns and values, and the constant it moves to the
        right-hand side of a ``>= 0`` row."""
        nb = self.prob.p - 1
        cols: list[int] = []
        values: list[float] = []
        cst = 0.0
        for b, sign in ((s, 1.0), (s - 1, -1.0)):
            if b < 0:
                continue
            if b >= nb:
                cst += sign * coef
            elif self.free[v, b]:
                cols.append(int(self.col[v, b]))
                values.append(-sign * coef)
            else:
                cst += sign * coef * self.const[v, b]
        return cols, values, cst


@dataclass(frozen=True, eq=False)
class _Windowed:
    """The windowed model of part 3 of Note [lower bound], built, with the columns that
    :func:`_warm_point` needs."""

    lp: _LP
    zcol: np.ndarray
    direct: _Direct | None
    t_col: int
    u_col: int
    ws_cols: np.ndarray


def _windowed_model(prob: Problem, lo: np.ndarray, hi: np.ndarray) -> _Windowed:
    """The windowed model, one constraint family per builder (the ILP's families in
    ``_ilp_model.py``, over single ops; pins and colocation are dropped, Note [lower bound])."""
    lp = _LP(prob, lo, hi)
    _order_rows(lp)
    direct: _Direct | None = None
    if prob.direct:
        direct = _direct_rows(lp)
        zcol = np.full((prob.n, max(prob.p - 1, 0)), -1, dtype=np.int64)
        forced_uv = np.zeros(zcol.shape, dtype=bool)
    else:
        zcol, forced_uv = _crossing_rows(lp)
    w = prob.w
    t_col = int(lp.new_cols(1, 0.0, np.inf, 1.0 - w)[0])
    u_col = int(lp.new_cols(1, 0.0, 1.0 / prob.u_ref, w)[0])  # every M_s <= cap_s
    _time_rows(lp, zcol, forced_uv, t_col, direct)
    terms = _memory_terms(lp, zcol, forced_uv, direct)
    _shared_parameter_rows(lp, terms)
    ws_cols, ws_rows = _workspace_rows(lp, terms)
    rr, cc, vals, const = terms
    p = prob.p
    lp.add_rows(np.concatenate([np.arange(p), *rr]), np.concatenate([np.full(p, u_col), *cc]),
                np.concatenate([np.ones(p), *[-x for x in vals]]), const, np.full(p, np.inf))
    if ws_rows is not None:
        lp.add_rows(*ws_rows)
    return _Windowed(lp, zcol, direct, t_col, u_col, ws_cols)


_Terms = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]


def _order_rows(lp: _LP) -> None:
    """Assignment and precedence: ``y[v, b + 1] >= y[v, b]`` and ``y[u, b] >= y[c, b]`` per
    edge, where both are free."""
    prob, col, free = lp.prob, lp.col, lp.free
    nb = prob.p - 1
    vv, bb = np.nonzero(free[:, :-1] & free[:, 1:]) if nb > 1 else (np.zeros(0, int),) * 2
    k = len(vv)
    lp.add_rows(np.repeat(np.arange(k), 2), np.stack([col[vv, bb + 1], col[vv, bb]], 1).ravel(),
                np.tile([1.0, -1.0], k), np.zeros(k), np.full(k, np.inf))
    eu, ec = prob.edge_src, prob.edge_dst
    both = free[eu] & free[ec]
    ei, bi = np.nonzero(both)
    k = len(ei)
    lp.add_rows(np.repeat(np.arange(k), 2),
                np.stack([col[eu[ei], bi], col[ec[ei], bi]], 1).ravel(),
                np.tile([1.0, -1.0], k), np.zeros(k), np.full(k, np.inf))


def _crossing_rows(lp: _LP) -> tuple[np.ndarray, np.ndarray]:
    """Communication: ``z[u, b] >= y[u, b] - y[c, b]`` per edge; z columns per (u, b) that may
    cross. Returns the z columns (-1: none) and the (u, b) that cross in every assignment."""
    prob, col, free = lp.prob, lp.col, lp.free
    n, nb = prob.n, prob.p - 1
    eu, ec = prob.edge_src, prob.edge_dst
    yu_const = lp.const[eu]  # (E, nb) value where not free
    yc_const = lp.const[ec]
    yu_free, yc_free = free[eu], free[ec]
    may = (yu_free | (yu_const == 1.0)) & (yc_free | (yc_const == 0.0))  # (E, nb)
    forced = (~yu_free & (yu_const == 1.0)) & (~yc_free & (yc_const == 0.0))
    cross_need = np.zeros((n, nb), dtype=bool)
    np.logical_or.at(cross_need, eu, may & ~forced)
    forced_uv = np.zeros((n, nb), dtype=bool)
    np.logical_or.at(forced_uv, eu, forced)
    cross_need &= ~forced_uv
    zcol = np.full((n, nb), -1, dtype=np.int64)
    zu, zb = np.nonzero(cross_need)
    zcol[zu, zb] = lp.new_cols(len(zu))
    ei, bi = np.nonzero(may & ~forced & cross_need[eu])
    u_, c_ = eu[ei], ec[ei]
    z_ = zcol[u_, bi]
    # z - y_u + y_c >= 0, with constants moved to the bound.
    entries_c = [z_]
    entries_v = [np.ones(len(ei))]
    rid = [np.arange(len(ei))]
    rhs = np.zeros(len(ei))
    uf = free[u_, bi]
    entries_c.append(col[u_, bi][uf])
    entries_v.append(-np.ones(int(uf.sum())))
    rid.append(np.arange(len(ei))[uf])
    rhs += np.where(uf, 0.0, lp.const[u_, bi])
    cf = free[c_, bi]
    entries_c.append(col[c_, bi][cf])
    entries_v.append(np.ones(int(cf.sum())))
    rid.append(np.arange(len(ei))[cf])
    rhs -= np.where(cf, 0.0, lp.const[c_, bi])
    lp.add_rows(np.concatenate(rid), np.concatenate(entries_c), np.concatenate(entries_v),
                rhs, np.full(len(ei), np.inf))
    return zcol, forced_uv


@dataclass(frozen=True, eq=False)
class _Direct:
    """The columns of :func:`_direct_rows`: receive indicators ``r[u, d]`` and send counts
    ``e[u, s]`` (node, stage, column each)."""

    r_u: np.ndarray
    r_d: np.ndarray
    r_col: np.ndarray
    e_u: np.ndarray
    e_s: np.ndarray
    e_col: np.ndarray


def _x_entries(lp: _LP, v: np.ndarray, s: np.ndarray, coef: np.ndarray, rid: np.ndarray
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]:
    """``coef * x[v, s]`` in rows ``rid``: row ids, columns, values of its free ``y`` and,
    per entry, its constant part."""
    rr, cc, vv = [], [], []
    const = np.zeros(len(v))
    for b, sign in ((s, 1.0), (s - 1, -1.0)):
        is_var, colv, cf, cst = lp.y_terms(v, b, coef * sign)
        rr.append(rid[is_var])
        cc.append(colv[is_var])
        vv.append(cf[is_var])
        const += cst
    return rr, cc, vv, const


def _direct_rows(lp: _LP) -> _Direct:
    """Communication under direct sends, over single ops (the ILP's ``_direct_sends``):
    ``r[u, d] >= x[c, d] - x[u, d]`` per edge ``u -> c`` and stage ``d`` of ``c``'s window;
    ``e[u, s] >= x[u, s] - x[c, s]`` per edge and stage of ``u``'s window below the last; and
    for a node with several consumers ``e[u, s] >= sum_{d > s} r[u, d] - M (1 - x[u, s])``."""
    prob = lp.prob
    p = prob.p
    lo, hi = lp.lo, lp.hi
    eu, ec = prob.edge_src, prob.edge_dst
    # r rows: one per (edge, d in c's window), d not the producer's only stage.
    width = np.maximum(hi[ec] - lo[ec] + 1, 0)
    ei = np.repeat(np.arange(len(eu)), width)
    d = lo[ec][ei] + (np.arange(len(ei)) - np.repeat(np.cumsum(width) - width, width))
    u, c = eu[ei], ec[ei]
    keep = ~((lo[u] == hi[u]) & (hi[u] == d))
    u, c, d = u[keep], c[keep], d[keep]
    keys, inv = np.unique(u * p + d, return_inverse=True)
    r_u, r_d = keys // p, keys % p
    r_col = lp.new_cols(len(keys))
    k = len(u)
    rid = np.arange(k)
    rr, cc, vv = [rid], [r_col[inv]], [np.ones(k)]
    rr1, cc1, vv1, k1 = _x_entries(lp, c, d, -np.ones(k), rid)
    rr2, cc2, vv2, k2 = _x_entries(lp, u, d, np.ones(k), rid)
    lp.add_rows(np.concatenate([*rr, *rr1, *rr2]), np.concatenate([*cc, *cc1, *cc2]),
                np.concatenate([*vv, *vv1, *vv2]), -(k1 + k2), np.full(k, np.inf))
    # e rows: at least one send per (edge, s in u's window, s < p - 1).
    top = np.minimum(hi[eu], p - 2)
    width = np.maximum(top - lo[eu] + 1, 0)
    ei = np.repeat(np.arange(len(eu)), width)
    s = lo[eu][ei] + (np.arange(len(ei)) - np.repeat(np.cumsum(width) - width, width))
    u, c = eu[ei], ec[ei]
    keys, inv = np.unique(u * p + s, return_inverse=True)
    e_u, e_s = keys // p, keys % p
    e_col = lp.new_cols(len(keys), 0.0, np.inf)
    k = len(u)
    rid = np.arange(k)
    rr1, cc1, vv1, k1 = _x_entries(lp, u, s, -np.ones(k), rid)
    rr2, cc2, vv2, k2 = _x_entries(lp, c, s, np.ones(k), rid)
    lp.add_rows(np.concatenate([rid, *rr1, *rr2]), np.concatenate([e_col[inv], *cc1, *cc2]),
                np.concatenate([np.ones(k), *vv1, *vv2]), -(k1 + k2), np.full(k, np.inf))
    # Send counts of nodes with several consumers.
    multi = {int(x) for x, n_c in zip(*np.unique(eu, return_counts=True)) if n_c > 1}
    by_u: dict[int, list[int]] = {}
    for j, x in enumerate(r_u.tolist()):
        if x in multi:
            by_u.setdefault(x, []).append(j)
    rows_r, rows_c, rows_v, rows_lo = [], [], [], []
    nrow = 0
    for j, (x, st) in enumerate(zip(e_u.tolist(), e_s.tolist())):
        beyond = [int(r_col[i]) for i in by_u.get(x, []) if r_d[i] > st]
        if len(beyond) <= 1:
            continue
        big = float(len(beyond))
        xc, xv, cst = lp.minus_x(x, st, big)
        ents_c = [int(e_col[j]), *beyond, *xc]
        rows_r.append(np.full(len(ents_c), nrow))
        rows_c.append(np.array(ents_c))
        rows_v.append(np.array([1.0, *([-1.0] * len(beyond)), *xv]))
        rows_lo.append(cst - big)
        nrow += 1
    if nrow:
        lp.add_rows(np.concatenate(rows_r), np.concatenate(rows_c), np.concatenate(rows_v),
                    np.array(rows_lo), np.full(nrow, np.inf))
    return _Direct(r_u, r_d, r_col, e_u, e_s, e_col)


def _time_rows(lp: _LP, zcol: np.ndarray, forced_uv: np.ndarray, t_col: int,
               direct: _Direct | None = None) -> None:
    """Time (bottleneck): ``t - sum work x - comm z >= const`` per stage, a crossing's time
    charged to both stages of its boundary (direct sends: ``link r`` on the receiver, ``link
    e`` on the sender)."""
    prob = lp.prob
    p, nb = prob.p, prob.p - 1
    inv_t = 1.0 / prob.t_ref
    rr, cc, vals, const = lp.stage_rows(prob.time * inv_t)
    if direct is not None:
        for us, ss, cols in ((direct.r_u, direct.r_d, direct.r_col),
                             (direct.e_u, direct.e_s, direct.e_col)):
            cc.append(cols)
            vals.append(prob.link[us, ss] * inv_t)
            rr.append(ss)
    for b in range(nb):
        zs = zcol[:, b] >= 0
        for s in (b, b + 1):
            cc.append(zcol[zs, b])
            vals.append(prob.comm[zs, b] * inv_t)
            rr.append(np.full(int(zs.sum()), s))
        fb = forced_uv[:, b]
        const[b] += float(prob.comm[fb, b].sum()) * inv_t
        const[b + 1] += float(prob.comm[fb, b].sum()) * inv_t
    lp.add_rows(np.concatenate([np.arange(p), *rr]), np.concatenate([np.full(p, t_col), *cc]),
                np.concatenate([np.ones(p), *[-x for x in vals]]), const, np.full(p, np.inf))


def _memory_terms(lp: _LP, zcol: np.ndarray, forced_uv: np.ndarray,
                  direct: _Direct | None = None) -> _Terms:
    """Memory of each stage without shared parameters and workspace: ``(params + k saved) x``
    and the received bytes ``k bytes z`` (direct sends: ``k bytes r``; sender-held bytes are
    not charged: a relaxation)."""
    prob = lp.prob
    nb = prob.p - 1
    inv_m = 1.0 / (prob.caps * prob.u_ref)
    k_s = prob.inflight
    mem_coef = (prob.single_param_state + prob.saved[:, None] * k_s[None, :]) * inv_m[None, :]
    rr, cc, vals, const = lp.stage_rows(mem_coef)
    if direct is not None:
        cc.append(direct.r_col)
        vals.append(prob.out_bytes[direct.r_u] * k_s[direct.r_d] * inv_m[direct.r_d])
        rr.append(direct.r_d)
    for b in range(nb):
        zs = zcol[:, b] >= 0
        s = b + 1
        cc.append(zcol[zs, b])
        vals.append(prob.out_bytes[zs] * k_s[s] * inv_m[s])
        rr.append(np.full(int(zs.sum()), s))
        const[s] += float(prob.out_bytes[forced_uv[:, b]].sum()) * k_s[s] * inv_m[s]
    return rr, cc, vals, const


def _shared_parameter_rows(lp: _LP, terms: _Terms) -> None:
    """Shared parameters: ``h[q, s] >= x[r, s]`` for each reader, ``state h`` into the memory
    terms (colocation is dropped: a relaxation)."""
    prob = lp.prob
    p = prob.p
    inv_m = 1.0 / (prob.caps * prob.u_ref)
    rr, cc, vals, _ = terms
    h_rows_r, h_rows_c, h_rows_v, h_lo = [], [], [], []
    nh = 0
    for q in prob.shared:
        readers = np.array(sorted(set(q.readers)))
        hcols = lp.new_cols(p)
        for s in range(p):
            cc.append(hcols[s:s + 1])
            vals.append(np.array([q.state[s] * inv_m[s]]))
            rr.append(np.array([s]))
            for r in readers.tolist():
                xc, xv, cst = lp.minus_x(r, s, 1.0)
                ents_c, ents_v = [int(hcols[s]), *xc], [1.0, *xv]
                h_rows_r.append(np.full(len(ents_c), nh))
                h_rows_c.append(np.array(ents_c))
                h_rows_v.append(np.array(ents_v))
                h_lo.append(cst)
                nh += 1
    if nh:
        lp.add_rows(np.concatenate(h_rows_r), np.concatenate(h_rows_c),
                    np.concatenate(h_rows_v), np.array(h_lo), np.full(nh, np.inf))


def _workspace_rows(lp: _LP, terms: _Terms) -> tuple[np.ndarray, tuple[np.ndarray, ...] | None]:
    """Workspace of the largest-workspace nodes: ``ws_s >= ws_v x[v, s]``; its columns into
    the memory terms. Returns the columns and the rows (added after the memory rows)."""
    prob = lp.prob
    p = prob.p
    inv_m = 1.0 / (prob.caps * prob.u_ref)
    rr, cc, vals, _ = terms
    top = np.argsort(-prob.workspace)[:_WS_NODES]
    ws_cols = lp.new_cols(p, 0.0, np.inf)
    for s in range(p):
        cc.append(ws_cols[s:s + 1])
        vals.append(np.array([1.0]))
        rr.append(np.array([s]))
    wr, wc, wv, wlo = [], [], [], []
    nw = 0
    for v in top.tolist():
        if prob.workspace[v] <= 0:
            continue
        for s in range(p):
            xc, xv, cst = lp.minus_x(v, s, float(prob.workspace[v] * inv_m[s]))
            ents_c, ents_v = [int(ws_cols[s]), *xc], [1.0, *xv]
            wr.append(np.full(len(ents_c), nw))
            wc.append(np.array(ents_c))
            wv.append(np.array(ents_v))
            wlo.append(cst)
            nw += 1
    if not nw:
        return ws_cols, None
    return ws_cols, (np.concatenate(wr), np.concatenate(wc), np.concatenate(wv), np.array(wlo),
                     np.full(nw, np.inf))


def _solve_windowed(prob: Problem, lo: np.ndarray, hi: np.ndarray, time_limit: float, *,
                    integral: bool = True, incumbent_stage: np.ndarray | None = None
                    ) -> tuple[float | None, str, int, int]:
    """Lower bound from the windowed model (None if not reached), HiGHS status, columns,
    rows: the MIP's dual bound, or the LP optimum with ``integral=False``. ``time_limit``
    covers building the model too (Note [whole-call deadline])."""
    import highspy

    t0 = _time.perf_counter()
    model = _windowed_model(prob, lo, hi)
    lp = model.lp
    # Solve as a MIP (every y binary): its dual bound at any time is valid, and at the root it
    # is the LP relaxation's.
    silence_banner()
    h = highspy.Highs()
    apply_options(h, highs_options(time_limit=max(0.1, float(time_limit)),
                                   gap_rel=BOUND_GAP_REL))
    if not integral:  # the interior point method: 1.6x faster on the LPs of 10,000-op graphs
        h.setOptionValue("solver", "ipm")
    ncol = lp.ncol
    lbs, ubs = np.concatenate(lp.lb), np.concatenate(lp.ub)
    h.addVars(ncol, lbs, ubs)
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), np.concatenate(lp.cost))
    ny = int(lp.free.sum())
    if integral and ny:
        h.changeColsIntegrality(ny, np.arange(ny, dtype=np.int32),
                                np.full(ny, highspy.HighsVarType.kInteger))
    r = np.concatenate(lp.rows_r)
    c = np.concatenate(lp.rows_c).astype(np.int32)
    v = np.concatenate(lp.rows_v)
    order = np.argsort(r, kind="stable")
    r, c, v = r[order], c[order], v[order]
    starts = np.searchsorted(r, np.arange(lp.nrow)).astype(np.int32)
    row_lo = np.concatenate(lp.row_lo)
    h.addRows(lp.nrow, row_lo, np.concatenate(lp.row_hi), len(c), starts, c, v)
    left = float(time_limit) - (_time.perf_counter() - t0)
    if left < 0.1:
        return None, "skipped (no time left after building the model)", ncol, lp.nrow
    # The interior point method checks its time limit between iterations, which take seconds
    # on 10,000-op graphs: stop it early enough to end by the deadline.
    h.setOptionValue("time_limit", left if integral else 0.85 * left)
    if incumbent_stage is not None and integral:
        x = _warm_point(prob, lp, model.zcol, incumbent_stage, r, c, v, row_lo, model.t_col,
                        model.u_col, model.ws_cols, ny, ncol, model.direct)
        if x is not None:
            sol = highspy.HighsSolution()
            sol.col_value = x.tolist()
            sol.value_valid = True
            h.setSolution(sol)
    h.run()
    status = h.getModelStatus()
    word = h.modelStatusToString(status)
    info = h.getInfo()
    if status == highspy.HighsModelStatus.kInfeasible:
        return np.inf, word, ncol, lp.nrow
    if integral:
        bound = float(info.mip_dual_bound)
        if status == highspy.HighsModelStatus.kOptimal:
            bound = max(bound, float(info.objective_function_value) * (1 - 1e-5))
        return (bound if np.isfinite(bound) and abs(bound) < 1e20 else None), word, ncol, lp.nrow
    if status == highspy.HighsModelStatus.kOptimal:
        return float(info.objective_function_value), word, ncol, lp.nrow
    return None, word, ncol, lp.nrow


def _warm_point(prob: Problem, lp: _LP, zcol: np.ndarray, stage: np.ndarray, r: np.ndarray,
                c: np.ndarray, v: np.ndarray, row_lo: np.ndarray, t_col: int, u_col: int,
                ws_cols: np.ndarray, ny: int, ncol: int, direct: _Direct | None = None
                ) -> np.ndarray | None:
    """Column values of the incumbent assignment (None if it lies outside the windows)."""
    nb = prob.p - 1
    ycum = (stage[:, None] <= np.arange(nb)[None, :]).astype(float)
    if np.any(ycum[~lp.free] != lp.const[~lp.free]):
        return None
    x = np.zeros(ncol)
    x[lp.col[lp.free]] = ycum[lp.free]
    last = stage.copy()
    np.maximum.at(last, prob.edge_src, stage[prob.edge_dst])
    crosses = (stage[:, None] <= np.arange(nb)[None, :]) & (np.arange(nb)[None, :] < last[:, None])
    zs = zcol >= 0
    x[zcol[zs]] = crosses[zs].astype(float)
    # Remaining columns (h, ws, t, u): the smallest values meeting their rows, by sweeps.
    rest = np.ones(ncol, dtype=bool)
    rest[:ny] = False
    rest[zcol[zs]] = False
    if direct is not None:
        on = np.zeros((prob.n, prob.p), dtype=bool)  # on[u, d]: a consumer of u on d
        on[prob.edge_src, stage[prob.edge_dst]] = True
        on[np.arange(prob.n), stage] = False
        x[direct.r_col] = on[direct.r_u, direct.r_d]
        mine = stage[direct.e_u] == direct.e_s
        x[direct.e_col] = np.where(mine, on[direct.e_u].sum(axis=1), 0.0)
        rest[direct.r_col] = False
        rest[direct.e_col] = False
    x[rest] = 0.0
    for _ in range(3):
        act = np.zeros(len(row_lo))
        np.add.at(act, r, v * x[c])
        short = row_lo - act
        for col_id in [*np.nonzero(rest)[0].tolist()]:
            rows = r[(c == col_id) & (v > 0)]
            need = short[rows] / v[(c == col_id) & (v > 0)] + x[col_id]
            if len(need):
                x[col_id] = max(x[col_id], float(need.max()))
    return x
