"""Part 1c of Note [lower bound], chains: every boundary at once, through the last-ranked node of
each stage's downset.

Note [chain bound]
~~~~~~~~~~~~~~~~~~
Rank the nodes by ``h(v)`` (the fastest time of ``v`` and its ancestors), ties by index, as in
the split bound (part 1b of Note [lower bound]): a topological order. In any valid assignment
let ``D_b`` be the nodes on stages ``0..b`` (a downset) and ``v_b`` the node of ``D_b`` ranked
last (``D_b`` empty: none). The ``v_b`` are ranked in order (``D_b`` grows with ``b``) and none
is the output node (it is on the last stage). If ``v_s`` is ranked after ``v_{s-1}``, it is on
stage ``s`` exactly, so stage ``s`` holds

- ``v_s`` and every ancestor of ``v_s`` ranked after ``v_{s-1}`` (those are not in
  ``D_{s-1}``): their compute time (on stage ``s``'s device), parameter state read by that node
  only and saved bytes ``inflight_s`` times, summed exactly from bit rows of the ancestor sets
  in rank order (candidates first screened by the cheaper ``H(v_s) - P(v_{s-1})``: the
  closure's weight less the prefix's);
- a send of every one of those read by a node ranked after ``v_s`` (not in ``D_s``): its time
  on stage ``s``'s link, its held sent bytes ``inflight_s`` times; ``v_s``'s workspace;
- for each node ranked among the ``_WINDOW`` just before ``v_{s-1}`` and read by one of those
  ancestors: its receive (it is in ``D_{s-1}``) or its own time and memory (it is on stage
  ``s``), the smaller; or else, as an envelope over earlier ends ``a' <= a`` of ``D_{s-1}``,
  what lies between plus the receive of the node at ``a'`` (the larger of the two terms).
  Both only fall as ``v_{s-1}`` moves later;
- *siblings*: each node ``y`` ranked after ``v_{s-1}`` and before ``v_s``, not an ancestor of
  ``v_s``, that reads one of those ancestors not already counted as sent. Either ``y`` is on
  stage ``s`` (it cannot be in ``D_{s-1}``: what it reads is not), so its time and memory count,
  or it is not in ``D_s``, so what it reads is sent: the smaller of the two, each value's send
  shared equally among its sibling readers (so a value read by several siblings is not counted
  twice). No other term counts these nodes or sends, and they too only fall as ``v_{s-1}`` moves
  later. Only siblings ranked within ``_BAND`` before ``v_s`` are looked at (fewer terms: still
  a lower bound). This is the cut inside a layer: at ``v_s`` the query projection of an
  attention, the key and value projections ranked before it compute on stage ``s`` or have
  their input sent.

The last stage holds every node ranked after ``v_{p-2}`` (their time, state, saved bytes and
largest workspace, exactly) and receives every one of ``v_{p-2}`` and its ancestors read by a
node ranked after it (those readers are all on the last stage). Each of these per-stage amounts
is a lower bound of the assignment's stage time and memory, so ``J`` of the assignment is at
least ``J`` of the sequence ``v_0 <= ... <= v_{p-2}`` under them (with the analytic ``A_lb``,
``B_lb`` of part 1 as floors); the bound is the least such ``J`` over all sequences.

That minimum: the middle stages' amounts only fall as ``v_{s-1}`` moves later (the last
stage's are made so by a running minimum, still a lower bound), so for limits ``tau`` on every
stage's time and ``theta`` on its utilisation, the greedy that takes each ``v_s`` as late as
the limits allow (or stays) dominates every feasible sequence position by position: it decides
feasibility exactly. Bisection on ``tau`` gives ``A*(theta)``, the least time for utilisation at
most ``theta``; a sequence with utilisation in ``(theta_lo, theta_hi]`` has ``J >= (1 - w)
A*(theta_hi) + w theta_lo``, and a best-first split of the ``theta`` range into such intervals
gives the minimum to a tolerance, from below. Unlike the split bound it sees every boundary at
once: the trade between the early stages' memory (more microbatches in flight under 1F1B) and
the late stages' time over the whole pipeline, and each stage's sends and a receive. It is strong on graphs
that are nearly chains (decoders, ResNets) and weak on wide ones (an ancestor set is then far
from a prefix of the rank).

*Windows* (:func:`chain_windows`): the same greedy narrows the stage windows of part 2 of Note
[lower bound]. An assignment with objective below an incumbent and utilisation in an interval
``[theta_k, theta_k+1]`` keeps every stage within ``theta_k+1`` and the time ``(incumbent - w
theta_k) / (1 - w)``; under those limits the greedy's positions are the latest any such
assignment's ``v_s`` can take. A node ranked at or after the latest position after stage ``s``
over all intervals is in no such ``D_s``: its stage is above ``s``. Measured in
``docs/measurements.md``, "Chain windows".

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> round(chain_bound(prob), 4)  # the optimum: half the chain each, one value sent across
    1.4824
    >>> chain_windows(prob, 1.49).tolist()  # just above it: the late half on the last stage
    [0, 0, 0, 0, 1, 1, 1, 1, 1]
"""

from __future__ import annotations

import heapq
import weakref

import numpy as np

from modelparallel.partitioner.problem import Problem

__all__ = ["chain_bound", "chain_windows"]

_TOL = 1e-4  # relative tolerance of the bisections and of the theta intervals
_WINDOW = 6  # earlier positions whose receives the envelope of Note [chain bound] looks at
_CACHE = 20_000  # exact stage amounts kept per (stage, position)
_ROWS = 1024  # rows of ancestor bits unpacked at a time
_SPAN = 1  # stages a window of consecutive stages spans at most
_ROUNDING = 1e-5  # relative margin for float32 sums
_GRID = 64  # utilisation intervals of chain_windows
_BAND = 64  # rows of a siblings block, and ranks before its first row it looks at


def chain_bound(prob: Problem) -> float:
    """The chain bound of Note [chain bound] (0 for fewer than two stages), computed once per
    problem."""
    if prob.p < 2 or prob.n < 2:
        return 0.0
    chain = _chain_for(prob)
    if chain.value is None:
        chain.value = _least_j(prob, chain)
    return chain.value


def _least_j(prob: Problem, chain: _Chain) -> float:
    """The least ``J`` over the sequences of Note [chain bound]."""
    from modelparallel.partitioner.bounds import _analytic

    p, w = prob.p, prob.w
    a_lb, b_lb, _ = _analytic(prob)
    last_t, last_m = chain.last, chain.last_m

    def feasible(tau: float, theta: float) -> bool:
        pos = [0]  # the position before each stage
        for s in range(p - 1):
            pos.append(chain.step(s, pos, tau, theta))
        return bool(last_t[pos[-1]] <= tau and last_m[pos[-1]] <= theta)

    t_top = float(prob.time.sum() + prob.link.sum() + prob.comm.sum()) / prob.t_ref + 1.0

    def a_star(theta: float, floor: float = a_lb) -> float:
        """A lower bound on the least time limit feasible with utilisation limit ``theta``
        (inf if none is); ``floor`` above ``A_lb``: a limit known infeasible (the value for
        a larger ``theta``)."""
        if not feasible(t_top, theta):
            return np.inf
        if floor <= a_lb:
            if feasible(a_lb, theta):
                return a_lb
            floor = a_lb
        lo, step = floor, 0.01 * floor  # infeasible at lo
        hi = lo + step
        while not feasible(hi, theta):
            lo, step = hi, 2 * step
            hi = min(t_top, lo + step)
        while hi - lo > _TOL * hi:  # infeasible at lo, feasible at hi: A* is in (lo, hi]
            m = 0.5 * (lo + hi)
            if feasible(m, theta):
                hi = m
            else:
                lo = m
        return lo

    def value(a_: float, b_: float) -> float:
        if not np.isfinite(a_):  # no sequence within that utilisation
            return np.inf
        return (1 - w) * max(a_, a_lb) + w * max(b_, b_lb)

    if w == 0.0:
        return value(a_star(np.inf), b_lb)
    top = chain.top_utilisation()
    a_top = a_star(top)
    a_bottom = a_star(b_lb)
    # Intervals (lo, hi] of theta with their A*(hi); the first one is [.., b_lb]. No
    # sequence has a utilisation above ``top``.
    heap: list[tuple[float, float, float, float]] = [
        (value(a_bottom, b_lb), -np.inf, b_lb, a_bottom),
        (value(a_top, b_lb), b_lb, top, a_top)]
    heapq.heapify(heap)
    while True:
        lb, lo, hi, a_hi = heapq.heappop(heap)
        if not np.isfinite(lb) or lo == -np.inf or w * (hi - lo) <= _TOL * lb:
            return lb
        mid_t = 0.5 * (lo + hi)
        a_mid = a_star(mid_t, a_hi)
        heapq.heappush(heap, (value(a_mid, lo), lo, mid_t, a_mid))
        heapq.heappush(heap, (value(a_hi, mid_t), mid_t, hi, a_hi))


def chain_windows(prob: Problem, incumbent: float,
                  memory: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
    """The lowest stage each node can take in an assignment with objective below
    ``incumbent`` and memory term within ``memory``: the windows of Note [chain bound]."""
    from modelparallel.partitioner.bounds import _analytic

    p, n, w = prob.p, prob.n, prob.w
    lo = np.zeros(n, dtype=np.int64)
    if p < 2 or n < 2:
        return lo
    _, b_lb, _ = _analytic(prob)
    chain = _chain_for(prob)
    limit = incumbent * (1 + _ROUNDING)  # margins for the sums' rounding
    bottom = max(b_lb, memory[0] * (1 - _ROUNDING))
    hi_u = min(memory[1] * (1 + _ROUNDING), limit / w if w > 0 else np.inf)
    if bottom > hi_u:  # no assignment counts: nothing to narrow
        return lo
    pairs = _limit_pairs(prob, limit, bottom, hi_u, chain.top_utilisation())
    reach = np.zeros(p - 1, dtype=np.int64)  # the latest position after each stage s < p - 1
    for tau, theta in pairs:
        pos = [0]
        for s in range(p - 1):
            pos.append(chain.step(s, pos, tau, theta))
        if chain.last[pos[-1]] <= tau and chain.last_m[pos[-1]] <= theta:
            reach = np.maximum(reach, pos[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[chain.order] = np.arange(n)
    ok = reach[None, :] > rank[:, None]  # node v in D_s needs the position after v_s past v
    return np.where(ok.any(axis=1), ok.argmax(axis=1), p - 1)


def _limit_pairs(prob: Problem, limit: float, bottom: float, hi_u: float, top: float
                 ) -> list[tuple[float, float]]:
    """Limits ``(tau, theta)`` on every stage's time and utilisation that every assignment
    with objective at most ``limit`` and memory term in ``[bottom, hi_u]`` meets for one of
    them: utilisation intervals ``(theta_k, theta_k+1]`` with the time limit their lower end
    leaves (above ``top``, no chain amount reaches the utilisation: one interval)."""
    w = prob.w
    if w == 0.0:
        return [(limit, hi_u)]
    if w == 1.0:  # no limit on time
        t_top = float(prob.time.sum() + prob.link.sum() + prob.comm.sum()) / prob.t_ref + 1.0
        return [(t_top, hi_u)]
    edges = np.linspace(bottom, max(bottom, min(hi_u, top)), _GRID + 1)
    pairs = [((limit - w * edges[k]) / (1 - w), float(edges[k + 1])) for k in range(_GRID)]
    if hi_u > edges[-1]:
        pairs.append(((limit - w * edges[-1]) / (1 - w), np.inf))
    return pairs


_CHAINS: weakref.WeakKeyDictionary[Problem, _Chain] = weakref.WeakKeyDictionary()


def _chain_for(prob: Problem) -> _Chain:
    """The problem's :class:`_Chain` (its amounts are cached across bounds and windows)."""
    chain = _CHAINS.get(prob)
    if chain is None:
        chain = _CHAINS[prob] = _Chain(prob)
    return chain


class _Chain:
    """The per-stage amounts of Note [chain bound] over the rank, and the greedy step."""

    def __init__(self, prob: Problem) -> None:
        from modelparallel.partitioner.bounds import _closure_weights

        self.prob = prob
        n, p = prob.n, prob.p
        anc, _ = _closure_weights(prob)
        tmin = prob.time.min(axis=1)
        self.order = order = np.argsort(anc[:, 0] + tmin, kind="stable")
        self.q = q = prob.single_param_state.min(axis=1)[order]
        self.saved = saved = prob.saved[order]
        self.t = prob.time[order]  # (n, p) in rank order
        self.rd = rd = (np.bincount(prob.edge_src, minlength=n) > 0)[order]
        self.valid = order != prob.output
        self.k = prob.inflight.astype(float)
        self.caps = prob.caps.astype(float)
        # Cheap bounds of the exact amounts (for the candidates): the closure less the prefix.
        self.h_t = (anc[:, 0] + tmin)[order]
        self.h_m = [(anc[:, 1] + prob.single_param_state.min(axis=1))[order],
                    (anc[:, 2] + prob.saved)[order]]
        self.p_t = _prefix(tmin[order])
        self.p_q, self.p_s = _prefix(q), _prefix(saved)
        send_link = prob.link if prob.direct else np.concatenate(
            [prob.comm[:, : p - 1], np.zeros((n, 1))], axis=1)
        self.send = np.where(rd[:, None], send_link[order], 0.0)  # (n, p)
        self.held = (np.where(rd, prob.sent[order], 0.0)[:, None] * self.k[None, :]
                     + prob.workspace[order][:, None])  # (n, p)
        recv_link = prob.link if prob.direct else np.concatenate(
            [np.zeros((n, 1)), prob.comm[:, : p - 1]], axis=1)
        self.recv = np.where(rd[:, None], recv_link[order], 0.0)  # (n, p): stage s's receive
        self.recv_bytes = np.where(rd, prob.out_bytes[order], 0.0)
        self.bits = _ancestor_bits(prob, order)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        self.cons = [np.sort(rank[list(prob.consumers[v])]).astype(np.int64) for v in order]
        self.last_read = np.array([c[-1] if len(c) else -1 for c in self.cons], dtype=np.int64)
        self.sent = prob.sent[order]
        e_src, e_dst = rank[prob.edge_src], rank[prob.edge_dst]
        by = np.lexsort((e_dst, e_src))
        self.e_src, self.e_dst = e_src[by], e_dst[by]  # edges in rank terms, by producer
        self.cache: dict[tuple[int, ...], tuple[int, np.ndarray, np.ndarray]] = {}
        self.sib_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.value: float | None = None  # the bound, once computed
        self.last, self.last_m = self.last_stage()

    def last_stage(self) -> tuple[np.ndarray, np.ndarray]:
        """Time and utilisation of the last stage from each position ``a = 0..n`` (the nodes
        ranked ``a`` on), made non-increasing by a running minimum."""
        prob, p = self.prob, self.prob.p
        s = p - 1
        t = _prefix(self.t[:, s])
        rt_, rb_ = self._last_receives()
        recv_t = np.concatenate([[0.0], rt_])
        recv_b = np.concatenate([[0.0], rb_])
        ws = prob.workspace[self.order]
        ws_suffix = np.concatenate([np.maximum.accumulate(ws[::-1])[::-1], [0.0]])
        mem = (self.p_q[-1] - self.p_q) + self.k[s] * (self.p_s[-1] - self.p_s + recv_b) + ws_suffix
        return (np.minimum.accumulate(t[-1] - t + recv_t) / prob.t_ref,
                np.minimum.accumulate(mem) / (self.caps[s] * prob.u_ref))

    def _last_receives(self) -> tuple[np.ndarray, np.ndarray]:
        """Per rank ``r`` as ``v_{p-2}``: the last stage's receives of ``v_{p-2}`` and its
        ancestors read by a node ranked after it (those are all on the last stage): time and
        bytes."""
        n, s = self.prob.n, self.prob.p - 1
        f32 = np.float32
        rt, rb = np.zeros(n), np.zeros(n)
        for r0 in range(0, n, _ROWS):
            r1 = min(n - 1, r0 + _ROWS - 1)
            u = np.unpackbits(self.bits[r0: r1 + 1, : r1 // 8 + 1], axis=1,
                              bitorder="little")[:, : r1 + 1].astype(f32)
            rows = np.arange(r0, r1 + 1)
            out = u * (self.last_read[None, : r1 + 1] > rows[:, None])
            rt[r0: r1 + 1] = (out @ self.recv[: r1 + 1, s].astype(f32)).astype(float)
            rb[r0: r1 + 1] = (out @ self.recv_bytes[: r1 + 1].astype(f32)).astype(float)
        return rt * (1 - _ROUNDING), rb * (1 - _ROUNDING)

    def top_utilisation(self) -> float:
        """A utilisation no stage of any sequence reaches."""
        prob = self.prob
        k = float(self.k.max())
        return float((self.p_q[-1] + k * (self.p_s[-1] + prob.sent.sum() + prob.out_bytes.sum())
                      + prob.workspace.max(initial=0.0)) / (self.caps.min() * prob.u_ref)) + 1.0

    def last_windows(self, pos: list[int], tau: float, theta: float) -> bool:
        """Whether the windows of the last stages (every node ranked from their start on)
        keep within the limits."""
        prob, p = self.prob, self.prob.p
        for j in range(2, min(_SPAN, p) + 1):
            start = pos[p - j]
            t_win, q_div, m_lim = self._window(p - j, p - 1, theta)
            t_sum = float(t_win[start:].sum())
            m_sum = float(self.q[start:].sum()) / q_div + float(self.saved[start:].sum())
            if t_sum > j * tau * prob.t_ref * (1 + 1e-12) or m_sum > m_lim * (1 + 1e-12):
                return False
        return True

    def _window(self, first: int, last: int, theta: float) -> tuple[np.ndarray, float, float]:
        """Stages ``first..last``: the fastest time of each node (rank order) on their
        devices, the largest microbatch count, and the limit on the sum over the stages of
        memory / inflight that utilisation ``theta`` sets (``sum_t cap_t / k_t``)."""
        prob = self.prob
        win = slice(first, last + 1)
        return (self.t[:, win].min(axis=1), float(self.k[win].max()),
                theta * prob.u_ref * float((self.caps[win] / self.k[win]).sum()))

    def step(self, s: int, pos: list[int], tau: float, theta: float) -> int:
        """The latest position stage ``s`` can reach from position ``a = pos[s]`` within the
        limits (``a`` itself if none: the stage stays empty)."""
        a = pos[s]
        prob = self.prob
        t_lim = tau * prob.t_ref
        m_lim = theta * self.caps[s] * prob.u_ref
        ks = self.k[s]
        cheap_t = np.maximum(self.h_t[a:] - self.p_t[a], 0.0) + self.send[a:, s]
        cheap_m = (np.maximum(self.h_m[0][a:] - self.p_q[a], 0.0)
                   + ks * np.maximum(self.h_m[1][a:] - self.p_s[a], 0.0) + self.held[a:, s])
        cand = np.nonzero((cheap_t <= t_lim) & (cheap_m <= m_lim) & self.valid[a:])[0]
        if len(cand) == 0:
            return a
        r_max = a + int(cand[-1])
        hit = self.cache.get((s, a))
        if hit is None or hit[0] < r_max:
            if len(self.cache) > _CACHE:
                self.cache.clear()
            hit = (r_max, *self._exact(s, a, r_max))
            self.cache[(s, a)] = hit
        t_ex, m_ex = hit[1][: r_max - a + 1], hit[2][: r_max - a + 1]
        keep = (t_ex[cand] <= t_lim) & (m_ex[cand] <= m_lim)
        for j in range(2, min(_SPAN, s + 1) + 1):  # stages s - j + 1 .. s
            if not keep.any():
                break
            start = pos[s - j + 1]
            key = (s, -j, start, a)
            win = self.cache.get(key)
            if win is None or win[0] < r_max:
                win = (r_max, *self._window_sums(s, j, start, a, r_max))
                self.cache[key] = win
            t_lim_w = j * t_lim
            _, _, m_lim_w = self._window(s - j + 1, s, theta)
            keep &= (win[1][cand] <= t_lim_w) & (win[2][cand] <= m_lim_w)
        ok = cand[np.nonzero(keep)[0]]  # positions after a passing without the siblings
        for end in range(len(ok), 0, -_BAND):  # the siblings' amounts, latest rows first
            rows = ok[max(0, end - _BAND): end]
            sib_t, sib_m = self._sibling_amounts(s, a, rows)
            fits = np.nonzero((t_ex[rows] + sib_t <= t_lim) & (m_ex[rows] + sib_m <= m_lim))[0]
            if len(fits):
                return a + int(rows[fits[-1]]) + 1
        return a

    def _sibling_amounts(self, s: int, a: int, rows: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """The siblings' time and memory of ``v_s`` ranked ``a + rows`` (sorted), computed
        once per stage, position and row."""
        need = int(rows[-1]) + 1
        got = self.sib_cache.get((s, a))
        if got is None or len(got[0]) < need:  # grown to the rows asked for
            if got is None and len(self.sib_cache) > _CACHE:
                self.sib_cache.clear()
            more = np.full(need - (0 if got is None else len(got[0])), np.nan)
            got = (more.copy(), more.copy()) if got is None else (
                np.concatenate([got[0], more]), np.concatenate([got[1], more]))
            self.sib_cache[(s, a)] = got
        todo = rows[np.isnan(got[0][rows])]
        if len(todo):
            r = a + todo
            r1 = int(r[-1])
            u = np.unpackbits(self.bits[r, a // 8: r1 // 8 + 1], axis=1,
                              bitorder="little")[:, a % 8: a % 8 + r1 + 1 - a]
            x = u.astype(np.float32)
            out = x * (self.last_read[None, a: r1 + 1] > r[:, None])
            got[0][todo], got[1][todo] = self._siblings(s, a, x, out, r)
        return got[0][rows], got[1][rows]

    def _window_sums(self, s: int, j: int, start: int, a: int, r_max: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """For ``v_s`` ranked ``a..r_max``, stages ``s - j + 1..s`` together (from position
        ``start``): the time of ``v_s`` and its ancestors ranked from ``start`` on (plus
        ``v_s``'s send), and their memory over inflight (Note [chain bound])."""
        t_win, q_div, _ = self._window(s - j + 1, s, 0.0)
        ts, ms = [], []
        for r0 in range(a, r_max + 1, _ROWS):
            r1 = min(r_max, r0 + _ROWS - 1)
            u = np.unpackbits(self.bits[r0: r1 + 1, start // 8: r1 // 8 + 1], axis=1,
                              bitorder="little")[:, start % 8: start % 8 + r1 + 1 - start]
            x = u.astype(float)
            ts.append(x @ t_win[start: r1 + 1] + self.send[r0: r1 + 1, s])
            ms.append(x @ (self.q[start: r1 + 1] / q_div + self.saved[start: r1 + 1])
                      + self.held[r0: r1 + 1, s] / self.k[s])
        return np.concatenate(ts), np.concatenate(ms)

    def _exact(self, s: int, a: int, r_max: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage ``s``'s time and memory for ``v_s`` ranked ``a..r_max`` after position
        ``a``: the weight of ``v_s`` and its ancestors ranked from ``a`` on, its send, and the
        envelope of the receives (Note [chain bound])."""
        ts, ms = [], []
        for r0 in range(a, r_max + 1, _ROWS):  # in blocks of rows: bounded memory
            t, m = self._exact_rows(s, a, r0, min(r_max, r0 + _ROWS - 1))
            ts.append(t)
            ms.append(m)
        return np.concatenate(ts), np.concatenate(ms)

    def _exact_rows(self, s: int, a: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_exact` for ``v_s`` ranked ``r0..r1``."""
        a0 = max(0, a - _WINDOW - 1)
        u = np.unpackbits(self.bits[r0: r1 + 1, a0 // 8: r1 // 8 + 1], axis=1,
                          bitorder="little")[:, a0 % 8: a0 % 8 + r1 + 1 - a0].astype(np.float32)
        ks = self.k[s]
        ws_t = self.t[:, s]
        ws_m = self.q + ks * self.saved
        x = u[:, a - a0:]  # v_s and its ancestors ranked from a on: on stage s
        rows = np.arange(r0, r1 + 1)
        # Those read by nodes ranked after v_s (not in D_s) are sent by stage s.
        out = x * (self.last_read[None, a: r1 + 1] > rows[:, None])
        f32 = np.float32
        # float32 products (the bits are exact), less a margin for their rounding.
        t = (x @ ws_t[a: r1 + 1].astype(f32) + out @ self.send[a: r1 + 1, s].astype(f32)
             ).astype(float) * (1 - _ROUNDING)
        m = (x @ ws_m[a: r1 + 1].astype(f32) + out @ (ks * self.sent[a: r1 + 1]).astype(f32)
             ).astype(float) * (1 - _ROUNDING) + self.prob.workspace[self.order[r0: r1 + 1]]
        if a == 0:
            return t, m
        # Nodes ranked before a read by those: each is received (it is in D_{s-1}) or
        # computed on stage s; the least of the two (Note [chain bound]).
        rt, rm = np.zeros(len(t)), np.zeros(len(t))
        for j in range(a0, a):
            cons = self.cons[j]
            cons = cons[(cons >= a) & (cons <= r1)]
            if len(cons) == 0:
                continue
            read = u[:, cons - a0].max(axis=1)
            rt += read * min(self.recv[j, s], ws_t[j])
            rm += read * min(ks * self.recv_bytes[j], ws_m[j])
        # Or: D_{s-1} ends at an earlier position a' (the envelope).
        et = np.full(len(t), np.inf)
        em = np.full(len(t), np.inf)
        cum_t = np.zeros(len(t))
        cum_m = np.zeros(len(t))
        a2 = a
        while True:
            if a2 == 0:  # D empty: nothing received
                np.minimum(et, cum_t, out=et)
                np.minimum(em, cum_m, out=em)
                break
            j = a2 - 1  # the last node of position a2
            col = u[:, j - a0]
            recv = col if self.prob.direct else np.ones(len(t))
            np.minimum(et, cum_t + recv * self.recv[j, s], out=et)
            np.minimum(em, cum_m + recv * (ks * self.recv_bytes[j]), out=em)
            cum_t += col * ws_t[j]
            cum_m += col * ws_m[j]
            a2 -= 1
            if a2 < a - _WINDOW:  # every earlier position: at least what lies between
                np.minimum(et, cum_t, out=et)
                np.minimum(em, cum_m, out=em)
                break
        return t + np.maximum(et, rt), m + np.maximum(em, rm)


    def _siblings(self, s: int, a: int, x: np.ndarray, out: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The siblings' amounts of Note [chain bound] per row ``v_s`` (``x``: its ancestors
        ranked from ``a`` on, ``out``: those sent), each over the :data:`_BAND` ranks before
        it, in blocks of :data:`_BAND` rows."""
        tt, mm = np.zeros(len(rows)), np.zeros(len(rows))
        for b0 in range(0, len(rows), _BAND):
            b1 = min(len(rows), b0 + _BAND)
            c0 = max(a, int(rows[b0]) - _BAND)
            c1 = int(rows[b1 - 1]) + 1
            cols = slice(c0 - a, c1 - a)
            tt[b0:b1], mm[b0:b1] = self._sibling_block(s, c0, x[b0:b1, cols],
                                                       out[b0:b1, cols], rows[b0:b1])
        return tt, mm

    def _sibling_block(self, s: int, c0: int, x: np.ndarray, out: np.ndarray,
                       rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_siblings` for ``rows`` over the ranks ``c0..`` of ``x`` and ``out``."""
        span = x.shape[1]
        lo, hi = np.searchsorted(self.e_src, [c0, c0 + span])
        keep = self.e_dst[lo:hi] < c0 + span
        src, dst = self.e_src[lo:hi][keep] - c0, self.e_dst[lo:hi][keep] - c0  # by src
        if len(src) == 0:
            return np.zeros(len(rows)), np.zeros(len(rows))
        f32 = np.float32
        # Transposed: a column per row v_s, so that the sums run along axis 0. Each row looks
        # at the ranks from _BAND before it only, whatever its block: its amounts then depend
        # on a and itself alone, and only fall as a grows (the greedy's premise).
        at = np.arange(span)[:, None]
        band = ((at >= (rows - c0 - _BAND)[None, :]) & (at < (rows - c0)[None, :]))
        sib = np.ascontiguousarray((1.0 - x.T) * band)  # not ancestors, just before v_s
        deg = _sum_by(sib[dst], src, span) * (x.T - out.T) * band  # readers of unsent values
        inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
        ks = self.k[s]
        by_dst = np.argsort(dst, kind="stable")
        d_src, d_dst = src[by_dst], dst[by_dst]
        ranks = slice(c0, c0 + span)
        res = []
        for cost, own in ((self.send[ranks, s], self.t[ranks, s]),
                          (ks * self.sent[ranks], (self.q + ks * self.saved)[ranks])):
            share = inv * cost.astype(f32)[:, None]
            charge = _sum_by(share[d_src], d_dst, span) * sib
            res.append(np.minimum(charge, own.astype(f32)[:, None]).sum(axis=0).astype(float)
                       * (1 - _ROUNDING))
        return res[0], res[1]


def _sum_by(vals: np.ndarray, keys: np.ndarray, width: int) -> np.ndarray:
    """Rows of ``vals`` summed by their sorted ``keys`` into ``width`` rows."""
    out = np.zeros((width, vals.shape[1]), dtype=vals.dtype)
    uniq, starts = np.unique(keys, return_index=True)
    out[uniq] = np.add.reduceat(vals, starts, axis=0)
    return out


def _prefix(x: np.ndarray) -> np.ndarray:
    """Sums of ``x`` over its first ``a`` entries, ``a = 0..len(x)``."""
    return np.concatenate([[0.0], np.cumsum(x)])


def _ancestor_bits(prob: Problem, order: np.ndarray) -> np.ndarray:
    """Per rank ``r``, the node ranked ``r`` and its ancestors as bits over ranks (``(n, n /
    8)``, little-endian bit order)."""
    n = prob.n
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    bits = np.zeros((n, (n + 7) // 8), dtype=np.uint8)
    for v in range(n):  # problem indices are topological
        row = bits[rank[v]]
        for u in prob.producers[v]:
            np.bitwise_or(row, bits[rank[u]], out=row)
        row[rank[v] // 8] |= np.uint8(1 << (int(rank[v]) % 8))
    return bits
