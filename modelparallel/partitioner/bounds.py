"""Proven lower bounds on the objective of any valid op-level assignment.

Note [lower bound]
~~~~~~~~~~~~~~~~~~
Every bound here holds for every assignment that respects the pipeline order, puts the output
node on the last stage and fits in memory; pins and colocation are ignored (dropping
constraints can only lower a minimum, so the bound stays valid). With ``J = (1 - w) A + w B``,
``A = max_s T_s / T_ref`` and ``B = max_s (M_s / cap_s) / U_ref``:

1. *Analytic*: ``J >= (1 - w) A_lb + w B_lb``. ``A_lb``: the stages run every node once, so the
   slowest takes at least ``W / p`` for identical devices (``sum_v min_s time[v, s] / p``
   otherwise), and at least the fastest time of the largest node. ``B_lb``: every parameter is
   held at least once and every saved activation at least ``min_s inflight_s`` times, so
   ``max_s M_s / cap_s >= (that total) / sum_s cap_s``; weighting stage ``s`` by ``cap_s /
   inflight_s`` instead gives ``(saved + state / max_s inflight_s) / sum_s (cap_s /
   inflight_s)`` (strong for 1F1B, whose early stages hold more microbatches); and the largest
   parameter or workspace over the largest capacity.
2. *Windows*: given the objective ``J*`` of a known assignment, any strictly better one has
   ``J < J*``. If node ``v`` is on stage ``s``, stages ``0..s`` run ``v`` and its ancestors and
   stages ``s..p-1`` run ``v`` and its descendants, so the slowest stage takes at least
   ``a(v, s) = max(c(anc(v) + v) / (s + 1), c(desc(v) + v) / (p - s)) / T_ref`` with ``c`` = the
   fastest compute time (and at least ``A_lb``); likewise the fullest stage holds at least
   ``b(v, s)``: a node's own parameters' state plus its saved bytes times ``inflight_s`` over
   ``s + 1`` stages towards the start (in-flight counts only grow towards the start, for both
   schedules; otherwise the smallest count is used), or times ``min_s inflight_s`` over ``p -
   s`` stages towards the end, over the largest capacity (and at least ``B_lb``); and, weighting
   each stage ``j`` of those sets ``J`` by ``(1 / k_j) / Z_J`` (``Z_J = sum_J 1 / k_j``) as in
   part 1, at least ``(saved + state / max_J k) / Z_J`` (valid for any in-flight counts; 4 to
   10% fewer window binaries on the reference models at p = 8). Node ``v`` can
   take stage ``s`` only if ``(1 - w) a(v, s) + w b(v, s) < J*``: its window is the range of
   such stages. A node with an empty window proves the incumbent optimal. (Weighing both terms
   together gives much narrower windows than bounding ``A`` and ``B`` separately.)
   Then, in up to ``_CUT_ROUNDS`` rounds: the windows force some nodes before boundary ``b``
   (``hi <= b``) and some after it (``lo > b``), so every assignment in them sends across
   ``b`` at least the minimum cut ``c_b`` (communication time) and ``r_b`` (bytes) between
   those sets, over sets closed under ancestors, a value counting once however many of its
   consumers lie beyond (:func:`_boundary_cuts`, networkx on the nodes free at ``b``). A
   crossing costs its time on stages ``b`` and ``b + 1`` and its bytes ``inflight_{b+1}``
   times on stage ``b + 1``, so the time of stages ``0..s`` grows by ``2 sum_{b<s} c_b +
   c_s``, that of ``s..p-1`` by ``c_{s-1} + 2 sum_{b>=s} c_b``, that of all stages by ``2
   sum_b c_b`` (raising ``A_lb``), and their memory by the received bytes; the windows of
   these larger ``a`` and ``b`` are intersected with the previous ones (valid: every
   assignment counted lies in both). On the reference models at p = 8 this removes 5 to 10%
   of the window binaries (Llama 991 to 898, T5 1179 to 1119 at the 1.97% target) and
   shortens the proof phases of Note [ILP pipeline] accordingly.
   :func:`stage_windows` gives the windows for separate limits on ``A`` and ``B``.
3. *Windowed model*: the ILP of Note [ILP formulation] over single ops, restricted to the windows
   (``y`` fixed outside them), with the shared-parameter terms exact and the workspace term over
   the largest-workspace nodes only (a relaxation). Solved as a MIP (``y`` binary; for more than
   ``_MIP_COLUMNS`` binaries, its LP relaxation only), its dual bound at any moment bounds every
   assignment better than ``J*``; so ``min(J*, bound)`` bounds every assignment. The windows
   also pin down, for each boundary, nodes that must lie before or after it; even a fractional
   cut between those costs at least their minimum cut (the cut polytope is integral), which is
   what makes the communication part of the bound tight.

:func:`lower_bound` returns the largest valid value it could compute within its time limit; the
ILP pipeline reports instead the bounds its op-level proof phases establish when it solves the
op-level problem directly (Note [ILP pipeline]): windows for a target below the incumbent,
searched with that target as a cutoff.

Measured on the reference models at p = 8 (Llama, T5, GPT-2 medium, Inception): the LP
relaxation of the op-level model is 6 to 16% below the optimum, because fractional
assignments mix cut positions and so balance the stages without paying for the granularity of
the cheap cut points. Two strengthenings tried did not pay: rows charging each node the time
and memory its ancestors and descendants force at its stage (part 2 as ``t >= sum_s x[v, s]
a(v, s)``) raised the root relaxation by 0.2% (Llama, Inception); a DP over boundary classes
(the first node of a heaviest path outside the boundary's downset) with per-class min cuts
came within 2.3% of the optimum on Llama for time alone, short of 2% before memory. What closes
the gap is branching, which the windows, the reduction of Note [exact reduction] and a cutoff
below the incumbent make cheap enough.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> round(lower_bound(prob).value, 6)
    1.0
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass

import numpy as np

from modelparallel.errors import ConfigError
from modelparallel.partitioner.problem import Problem

__all__ = ["LowerBound", "lower_bound", "stage_windows", "window_for"]

_WS_NODES = 32  # largest-workspace nodes whose workspace the windowed model keeps
_SAFETY = 1e-6  # relative slack for solver tolerances
_MIN_SECONDS = 0.3  # less time than this for the windowed model: analytic bound only
_MIP_COLUMNS = 4000  # windowed binaries up to which the bound model is solved as a MIP
_CUT_ROUNDS = 3  # rounds of windows narrowed by boundary cuts (Note [lower bound], part 2)


@dataclass(frozen=True)
class LowerBound:
    """A proven lower bound and what it is made of.

    Attributes:
        value: Lower bound on the objective ``J`` (Note [objective]).
        time: Lower bound on ``max_s T_s / T_ref`` (analytic part).
        memory: Lower bound on ``max_s (M_s / cap_s) / U_ref`` (analytic part).
        min_memory_bytes: No plan fits on devices that each have less memory than this.
        source: Which bound gave ``value``: ``"analytic"``, ``"lp"`` or ``"incumbent"`` (no
            assignment better than the incumbent exists within the windows).
        lp_seconds: Seconds spent on the LP relaxation (0 if skipped).
        notes: Remarks (why the LP was skipped, its size).
    """

    value: float
    time: float
    memory: float
    min_memory_bytes: int
    source: str = "analytic"
    lp_seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not np.isfinite(self.value):
            raise ConfigError(f"a lower bound must be finite, got {self.value}")
        if self.source not in ("analytic", "lp", "incumbent"):
            raise ConfigError(f"unknown bound source {self.source!r}")

    def describe(self) -> str:
        """A one-line description."""
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"{self.value:.4f} from {self.source} (analytic: time {self.time:.4f}, "
                f"memory {self.memory:.4f}){extra}")


def _analytic(prob: Problem) -> tuple[float, float, float]:
    """(A_lb, B_lb, bytes_lb) of part 1 of Note [lower bound]."""
    t = prob.time
    fluid = float(t[:, 0].sum()) / prob.p if prob.homogeneous else float(
        t.min(axis=1).sum()) / prob.p
    biggest = float(t.min(axis=1).max(initial=0.0))
    a = max(fluid, biggest) / prob.t_ref
    k = prob.inflight
    caps = prob.caps
    ws_max = float(prob.workspace.max(initial=0.0))
    state = sum(float(min(q.state)) for q in prob.params)
    saved = float(prob.saved.sum())
    # With weights alpha_s = (cap_s / k_s) / sum(cap / k): max_s M_s / cap_s >= sum_s alpha_s
    # M_s / cap_s >= (saved + state / max k) / sum_s (cap_s / k_s), wherever the nodes go.
    weighted = (saved + state / float(k.max())) / float((caps / k).sum())
    plain = (state + float(k.min()) * saved + ws_max) / float(caps.sum())
    largest_param = max((float(min(q.state)) for q in prob.params), default=0.0)
    single = max(largest_param, ws_max) / float(caps.max())
    b = max(weighted, plain, single)
    total = state + float(k.min()) * saved + ws_max
    return a, b / prob.u_ref, max(total / prob.p, largest_param, ws_max)


def _closure_weights(prob: Problem, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights (columns of ``omega``) of each node's ancestors and descendants (node
    excluded)."""
    n = prob.n
    nbytes = (n + 7) // 8

    def weigh(bits: list[int]) -> np.ndarray:
        out = np.empty((n, omega.shape[1]))
        for v, b in enumerate(bits):
            mask = np.unpackbits(np.frombuffer(b.to_bytes(nbytes, "little"), dtype=np.uint8),
                                 bitorder="little")[:n].astype(bool)
            out[v] = omega[mask].sum(axis=0)
        return out

    anc = [0] * n
    for v in range(n):
        a = 0
        for u in prob.producers[v]:
            a |= anc[u] | (1 << u)
        anc[v] = a
    desc = [0] * n
    for v in range(n - 1, -1, -1):
        d = 0
        for c in prob.consumers[v]:
            d |= desc[c] | (1 << c)
        desc[v] = d
    return weigh(anc), weigh(desc)


def _stages_needed(amount: np.ndarray, cap: float) -> np.ndarray:
    """How many stages of capacity ``cap`` ``amount`` needs at least (0 when ``cap`` is not a
    positive finite number: no restriction, which keeps windows valid)."""
    if not 0 < cap < np.inf:
        return np.zeros(len(amount), dtype=np.int64)
    return np.ceil(amount / cap - 1e-9).astype(np.int64)


def stage_windows(prob: Problem, a_max: float, b_max: float = np.inf
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Feasible stage range of every node in assignments with ``A < a_max`` and
    ``B < b_max`` (Note [lower bound], part 2); the output node is always on the last stage."""
    p = prob.p
    omega = prob.time.min(axis=1)
    cap = a_max * prob.t_ref * (1 + 1e-9)
    # Memory a stage must hold for a node: its own parameters (shared ones excluded) plus its
    # saved activations times the stage's microbatches in flight. Stages up to s hold at least
    # inflight_s per saved byte when in-flight counts do not grow with the stage index (as for
    # both schedules), and stages from s on at least the smallest count.
    params = prob.single_param_state.min(axis=1)
    share = min(1.0, b_max * prob.u_ref) if np.isfinite(b_max) else 1.0
    mem_cap = float(prob.caps.max()) * share * (1 + 1e-9)
    anc, desc = _closure_weights(prob, np.stack([omega, params, prob.saved], axis=1))
    lo = _stages_needed(anc[:, 0] + omega, cap) - 1
    hi = p - _stages_needed(desc[:, 0] + omega, cap)
    k = prob.inflight
    if np.all(np.diff(k) <= 0) and 0 < mem_cap < np.inf:
        need_anc = anc[:, 1:2] + params[:, None] + (anc[:, 2:3] + prob.saved[:, None]) * k[None, :]
        fits = need_anc <= (np.arange(p)[None, :] + 1) * mem_cap  # (n, p): stage s possible
        lo_m = np.where(fits.any(axis=1), np.argmax(fits, axis=1), p)
        lo = np.maximum(lo, lo_m)
    need_desc = desc[:, 1] + params + (desc[:, 2] + prob.saved) * float(k.min())
    hi = np.minimum(hi, p - _stages_needed(need_desc, mem_cap))
    lo = np.clip(lo, 0, p)
    hi = np.clip(hi, -1, p - 1)
    lo[prob.output] = max(int(lo[prob.output]), p - 1)
    hi[prob.output] = p - 1
    return lo, hi


def window_for(prob: Problem, incumbent: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage windows of the assignments strictly better than ``incumbent`` (Note [lower
    bound], part 2): node ``v`` may take stage ``s`` only if the time and memory that ``v`` on
    ``s`` forces, weighted as in the objective, stay below ``incumbent``; then again with the
    least communication and received bytes each boundary carries within those windows, while
    that narrows them."""
    p = prob.p
    cuts = np.zeros((max(p - 1, 0), 2))
    lo, hi = _windows_with_cuts(prob, incumbent, cuts)
    for _ in range(_CUT_ROUNDS if p > 1 else 0):
        if np.any(lo > hi):
            break
        new = _boundary_cuts(prob, lo, hi, np.stack([prob.comm[:, : p - 1], np.broadcast_to(
            prob.out_bytes[:, None], (prob.n, p - 1))]))
        if np.all(new <= cuts):
            break
        cuts = np.maximum(cuts, new)
        lo2, hi2 = _windows_with_cuts(prob, incumbent, cuts)
        lo, hi = np.maximum(lo, lo2), np.minimum(hi, hi2)
    return lo, hi


def _windows_with_cuts(prob: Problem, incumbent: float, cuts: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The windows of :func:`window_for` given, per boundary, a least communication time
    (``cuts[:, 0]``) and least bytes received (``cuts[:, 1]``) of every assignment counted."""
    p, w = prob.p, prob.w
    a_lb, b_lb, _ = _analytic(prob)
    omega = prob.time.min(axis=1)
    params = prob.single_param_state.min(axis=1)
    anc, desc = _closure_weights(prob, np.stack([omega, params, prob.saved], axis=1))
    stages = np.arange(p)
    before, after = (stages + 1)[None, :], (p - stages)[None, :]
    # A value crossing boundary b costs its time on stages b and b + 1: stages 0..s carry
    # boundaries 0..s-1 twice and boundary s once; stages s..p-1 boundary s-1 once and
    # s..p-2 twice. Stage j >= 1 holds what crosses boundary j - 1, inflight_j times.
    c = cuts[:, 0] / prob.t_ref
    k = prob.inflight
    c_before = np.concatenate([[0.0], np.cumsum(2 * c)])[:p] + np.append(c, 0.0)
    c_after = np.concatenate([[0.0], c]) + np.append(np.cumsum((2 * c)[::-1])[::-1], 0.0)
    recv = np.concatenate([[0.0], k[1:] * cuts[:, 1]])  # per stage
    r_before, r_after = np.cumsum(recv), np.cumsum(recv[::-1])[::-1]
    a = np.maximum(((anc[:, 0] + omega)[:, None] / prob.t_ref + c_before[None, :]) / before,
                   ((desc[:, 0] + omega)[:, None] / prob.t_ref + c_after[None, :]) / after)
    a_all = (float(omega.sum()) / prob.t_ref + 2 * float(c.sum())) / p  # every stage
    a = np.maximum(a, max(a_lb, a_all))
    k_before = k[None, :] if np.all(np.diff(k) <= 0) else np.full((1, p), float(k.min()))
    own_b = anc[:, 1:2] + params[:, None] + (anc[:, 2:3] + prob.saved[:, None]) * k_before
    own_a = (desc[:, 1] + params + (desc[:, 2] + prob.saved) * float(k.min()))[:, None]
    b = np.maximum((own_b + r_before[None, :]) / before, (own_a + r_after[None, :]) / after)
    # Weighted by 1 / inflight over the stages that hold them (as in _analytic): with
    # alpha_j = (1 / k_j) / Z_J on the stage set J, max_j M_j >= sum_j alpha_j M_j >=
    # (saved + state / max_J k) / Z_J.
    inv_k = 1.0 / k
    z_before = np.cumsum(inv_k)  # J = 0..s
    z_after = np.cumsum(inv_k[::-1])[::-1]  # J = s..p-1
    kmax_before = np.maximum.accumulate(k)
    kmax_after = np.maximum.accumulate(k[::-1])[::-1]
    # (received bytes weigh 1 / k_j: their own count cancels).
    rb = np.concatenate([[0.0], cuts[:, 1]])  # per stage
    wb = ((anc[:, 2] + prob.saved)[:, None] + (anc[:, 1] + params)[:, None]
          / kmax_before[None, :] + np.cumsum(rb)[None, :]) / z_before[None, :]
    wa = ((desc[:, 2] + prob.saved)[:, None] + (desc[:, 1] + params)[:, None]
          / kmax_after[None, :] + np.cumsum(rb[::-1])[::-1][None, :]) / z_after[None, :]
    b = np.maximum(b, np.maximum(wb, wa)) / (float(prob.caps.max()) * prob.u_ref)
    b = np.maximum(b, b_lb)
    return _window_range(prob, (1 - w) * a + w * b, incumbent)


def _window_range(prob: Problem, forced: np.ndarray, incumbent: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """First and last stage of each node whose forced objective stays below ``incumbent``."""
    p = prob.p
    ok = forced < incumbent * (1 + 1e-9) + 1e-12
    ok[prob.output, : p - 1] = False
    lo = np.where(ok.any(axis=1), np.argmax(ok, axis=1), p)
    hi = np.where(ok.any(axis=1), p - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    return lo.astype(np.int64), hi.astype(np.int64)


def _boundary_cuts(prob: Problem, lo: np.ndarray, hi: np.ndarray, cost: np.ndarray
                   ) -> np.ndarray:
    """For each boundary ``b`` and each ``k``: the least ``cost[k, u, b]`` summed over the values crossing each boundary ``b`` in any
    assignment within the windows ``lo``/``hi``: a minimum cut between the nodes forced before
    it (``hi <= b``) and after it (``lo > b``), over sets closed under ancestors, where a value
    counts once whatever number of its consumers lie beyond (Note [relay communication]).
    Forced nodes are contracted into the source and the sink, so each graph holds only the
    nodes free at that boundary."""
    import networkx as nx

    nb = prob.p - 1
    out = np.zeros((nb, cost.shape[0]))
    for b in range(nb):
        if not np.any(hi <= b) or not np.any(lo > b):
            continue

        def side(v: int, b: int = b) -> object:
            return "s" if hi[v] <= b else ("t" if lo[v] > b else v)

        graphs = [nx.DiGraph() for _ in range(cost.shape[0])]
        for g in graphs:
            g.add_nodes_from(("s", "t"))
        for u in range(prob.n):
            su = side(u)
            if su == "t":
                continue
            beyond = [side(c) for c in prob.consumers[u] if side(c) != "s"]
            for g, k in zip(graphs, range(cost.shape[0])):
                if beyond:
                    g.add_edge(su, ("value", u), capacity=float(cost[k, u, b]))
                    for sc in beyond:
                        g.add_edge(("value", u), sc)  # u before the cut, sc after: u crosses
                for c in prob.consumers[u]:
                    sc = side(c)
                    if sc not in ("t", su) and su != "s":
                        g.add_edge(sc, su)  # c before the cut: so is its producer u
        for k, g in enumerate(graphs):
            out[b, k] = nx.minimum_cut_value(g, "s", "t")
    return out


class _LP:
    """The windowed LP relaxation of part 3 of Note [lower bound], built with numpy."""

    def __init__(self, prob: Problem, lo: np.ndarray, hi: np.ndarray) -> None:
        self.prob = prob
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


def _solve_windowed(prob: Problem, lo: np.ndarray, hi: np.ndarray, time_limit: float, *,
                    integral: bool = True, incumbent_stage: np.ndarray | None = None
                    ) -> tuple[float | None, str, int, int]:
    """Lower bound from the windowed model (None if not reached), HiGHS status, columns,
    rows: the MIP's dual bound, or the LP optimum with ``integral=False``."""
    import highspy

    from modelparallel.partitioner.ilp import _HIGHS_OPTIONS, _silence_banner

    n, p = prob.n, prob.p
    nb = p - 1
    lp = _LP(prob, lo, hi)
    col, free = lp.col, lp.free
    inv_t = 1.0 / prob.t_ref
    inv_m = 1.0 / (prob.caps * prob.u_ref)
    w = prob.w
    # Monotone and order rows: y[a, b] - y[c, b] >= 0 where both are free.
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
    # Crossing: z[u, b] >= y[u, b] - y[c, b] per edge; z columns per (u, b) that may cross.
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
    t_col = int(lp.new_cols(1, 0.0, np.inf, 1.0 - w)[0])
    u_col = int(lp.new_cols(1, 0.0, 1.0 / prob.u_ref, w)[0])  # every M_s <= cap_s

    def stage_rows(coef: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Rows (one per stage) of sum_v coef[v, s] x[v, s]; returns entries and constants."""
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
                const[s] += sign * float((coef[~fv, s] * lp.const[~fv, b]).sum())
        return rr, cc, vals, const

    def minus_x(v: int, s: int, coef: float) -> tuple[list[int], list[float], float]:
        """``-coef x[v, s]`` in boundary variables (``x[v, s] = y[v, s] - y[v, s - 1]``, fixed
        ``y`` as constants): its columns and values, and the constant it moves to the
        right-hand side of a ``>= 0`` row."""
        cols: list[int] = []
        values: list[float] = []
        cst = 0.0
        for b, sign in ((s, 1.0), (s - 1, -1.0)):
            if b < 0:
                continue
            if b >= nb:
                cst += sign * coef
            elif free[v, b]:
                cols.append(int(col[v, b]))
                values.append(-sign * coef)
            else:
                cst += sign * coef * lp.const[v, b]
        return cols, values, cst

    # Time rows: t - sum work x - comm z >= const.
    rr, cc, vals, const = stage_rows(prob.time * inv_t)
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
    # Memory rows: u - (params + k saved) x - state h - k bytes z - ws >= const.
    k_s = prob.inflight
    mem_coef = (prob.single_param_state + prob.saved[:, None] * k_s[None, :]) * inv_m[None, :]
    rr, cc, vals, const = stage_rows(mem_coef)
    for b in range(nb):
        zs = zcol[:, b] >= 0
        s = b + 1
        cc.append(zcol[zs, b])
        vals.append(prob.out_bytes[zs] * k_s[s] * inv_m[s])
        rr.append(np.full(int(zs.sum()), s))
        const[s] += float(prob.out_bytes[forced_uv[:, b]].sum()) * k_s[s] * inv_m[s]
    # Shared parameters: h[q, s] >= x[r, s] for each reader.
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
                xc, xv, cst = minus_x(r, s, 1.0)
                ents_c, ents_v = [int(hcols[s]), *xc], [1.0, *xv]
                h_rows_r.append(np.full(len(ents_c), nh))
                h_rows_c.append(np.array(ents_c))
                h_rows_v.append(np.array(ents_v))
                h_lo.append(cst)
                nh += 1
    if nh:
        lp.add_rows(np.concatenate(h_rows_r), np.concatenate(h_rows_c),
                    np.concatenate(h_rows_v), np.array(h_lo), np.full(nh, np.inf))
    # Workspace of the largest-workspace nodes: ws_s >= ws_v x[v, s].
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
            xc, xv, cst = minus_x(v, s, float(prob.workspace[v] * inv_m[s]))
            ents_c, ents_v = [int(ws_cols[s]), *xc], [1.0, *xv]
            wr.append(np.full(len(ents_c), nw))
            wc.append(np.array(ents_c))
            wv.append(np.array(ents_v))
            wlo.append(cst)
            nw += 1
    lp.add_rows(np.concatenate([np.arange(p), *rr]), np.concatenate([np.full(p, u_col), *cc]),
                np.concatenate([np.ones(p), *[-x for x in vals]]), const, np.full(p, np.inf))
    if nw:
        lp.add_rows(np.concatenate(wr), np.concatenate(wc), np.concatenate(wv), np.array(wlo),
                    np.full(nw, np.inf))
    # Solve as a MIP (every y binary): its dual bound at any time is valid, and at the root it
    # is the LP relaxation's.
    _silence_banner()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(0.1, float(time_limit)))
    h.setOptionValue("threads", 1)
    h.setOptionValue("mip_rel_gap", 1e-5)
    for key, value in _HIGHS_OPTIONS.items():
        h.setOptionValue(key, value)
    ncol = lp.ncol
    lbs, ubs = np.concatenate(lp.lb), np.concatenate(lp.ub)
    h.addVars(ncol, lbs, ubs)
    h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), np.concatenate(lp.cost))
    ny = int(free.sum())
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
    if incumbent_stage is not None and integral:
        x = _warm_point(prob, lp, zcol, incumbent_stage, r, c, v, row_lo, t_col, u_col,
                        ws_cols, ny, ncol)
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
                ws_cols: np.ndarray, ny: int, ncol: int) -> np.ndarray | None:
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


def lower_bound(prob: Problem, *, incumbent: float | None = None,
                incumbent_stage: np.ndarray | None = None, time_limit: float = 5.0
                ) -> LowerBound:
    """A proven lower bound on the objective of any valid assignment (Note [lower bound]).

    Args:
        prob: The problem.
        incumbent: The objective of a known assignment; enables the windows and the LP.
        incumbent_stage: That assignment, to warm-start the windowed MIP.
        time_limit: Seconds the LP relaxation may take.
    """
    a_lb, b_lb, mem_bytes = _analytic(prob)
    w = prob.w
    value = (1 - w) * a_lb + w * b_lb
    source = "analytic"
    notes: list[str] = []
    lp_seconds = 0.0
    if incumbent is not None and prob.p > 1 and w < 1.0 and incumbent > value and (
            time_limit >= _MIN_SECONDS):
        t0 = _time.perf_counter()
        lo, hi = window_for(prob, incumbent)
        if incumbent_stage is not None:
            incumbent_stage = np.asarray(incumbent_stage)
        if np.any(lo > hi):
            value, source = incumbent, "incumbent"
            notes.append("no assignment beats the incumbent (empty stage window)")
        else:
            # Large models: the LP relaxation alone (a MIP would not get past its root).
            integral = int((hi - lo).sum()) <= _MIP_COLUMNS
            lp_val, word, ncol, nrow = _solve_windowed(prob, lo, hi, time_limit,
                                                       integral=integral,
                                                       incumbent_stage=incumbent_stage)
            lp_seconds = _time.perf_counter() - t0
            kind = "MIP" if integral else "LP"
            notes.append(f"windowed {kind} {ncol} columns x {nrow} rows: {word} in "
                         f"{lp_seconds:.2f} s")
            if lp_val is not None:
                lp_val = lp_val * (1 - _SAFETY) - _SAFETY
                if lp_val >= incumbent:
                    value, source = incumbent, "incumbent"
                elif lp_val > value:
                    value, source = lp_val, "lp"
    if incumbent is not None:
        value = min(value, incumbent)
    return LowerBound(value=value, time=a_lb, memory=b_lb, min_memory_bytes=int(mem_bytes),
                      source=source, lp_seconds=lp_seconds, notes=tuple(notes))
