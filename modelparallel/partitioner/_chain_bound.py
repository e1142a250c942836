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
  Both only fall as ``v_{s-1}`` moves later.

The last stage holds every node ranked after ``v_{p-2}`` (their time, state, saved bytes and
largest workspace, exactly) and receives ``v_{p-2}``'s value. Each of these per-stage amounts
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

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> round(chain_bound(prob), 4)  # the optimum: half the chain each, one value sent across
    1.4824
"""

from __future__ import annotations

import heapq

import numpy as np

from modelparallel.partitioner.problem import Problem

__all__ = ["chain_bound"]

_TOL = 1e-4  # relative tolerance of the bisections and of the theta intervals
_WINDOW = 6  # earlier positions whose receives the envelope of Note [chain bound] looks at
_CACHE = 20_000  # exact stage amounts kept per (stage, position)
_ROWS = 1024  # rows of ancestor bits unpacked at a time
_SPAN = 1  # stages a window of consecutive stages spans at most
_ROUNDING = 1e-5  # relative margin for float32 sums


def chain_bound(prob: Problem) -> float:
    """The chain bound of Note [chain bound] (0 for fewer than two stages)."""
    from modelparallel.partitioner.bounds import _analytic

    p, n, w = prob.p, prob.n, prob.w
    if p < 2 or n < 2:
        return 0.0
    a_lb, b_lb, _ = _analytic(prob)
    chain = _Chain(prob)
    last_t, last_m = chain.last_stage()

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
        self.cache: dict[tuple[int, ...], tuple[int, np.ndarray, np.ndarray]] = {}

    def last_stage(self) -> tuple[np.ndarray, np.ndarray]:
        """Time and utilisation of the last stage from each position ``a = 0..n`` (the nodes
        ranked ``a`` on), made non-increasing by a running minimum."""
        prob, p = self.prob, self.prob.p
        s = p - 1
        t = _prefix(self.t[:, s])
        recv_t = np.concatenate([[0.0], self.recv[:, s]])
        recv_b = np.concatenate([[0.0], self.recv_bytes])
        ws = prob.workspace[self.order]
        ws_suffix = np.concatenate([np.maximum.accumulate(ws[::-1])[::-1], [0.0]])
        mem = (self.p_q[-1] - self.p_q) + self.k[s] * (self.p_s[-1] - self.p_s + recv_b) + ws_suffix
        return (np.minimum.accumulate(t[-1] - t + recv_t) / prob.t_ref,
                np.minimum.accumulate(mem) / (self.caps[s] * prob.u_ref))

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
        ok = np.nonzero(keep)[0]
        return a + int(cand[ok[-1]]) + 1 if len(ok) else a

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
