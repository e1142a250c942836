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

- ``v_s`` and every ancestor of ``v_s`` not ranked before ``v_{s-1}`` (the others, ranked
  after ``v_{s-1}``, are not in ``D_{s-1}``). Their weight is at least ``H(v_s) - P(v_{s-1})``
  for any node weight (``H``: over ``v`` and its ancestors; ``P``: over the nodes ranked up to
  ``v``) and at least ``v_s``'s own: compute time (on stage ``s``'s device), parameter state
  read by that node only, saved bytes ``inflight_s`` times;
- ``v_s``'s value, read by nodes ranked after it (so on later stages): one send (its time on
  stage ``s``'s link, its held sent bytes ``inflight_s`` times) and ``v_s``'s workspace.

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
the late stages' time over the whole pipeline, and each stage's send. It is strong on graphs
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

_TOL = 1e-5  # relative tolerance of the bisections and of the theta intervals


def chain_bound(prob: Problem) -> float:
    """The chain bound of Note [chain bound] (0 for fewer than two stages)."""
    from modelparallel.partitioner.bounds import _analytic, _closure_weights

    p, n, w = prob.p, prob.n, prob.w
    if p < 2 or n < 2:
        return 0.0
    a_lb, b_lb, _ = _analytic(prob)
    anc, _ = _closure_weights(prob)
    tmin = prob.time.min(axis=1)
    h = anc[:, 0] + tmin
    order = np.argsort(h, kind="stable")
    cols = [prob.time[:, s] for s in range(p)]
    if prob.homogeneous:
        h_cols = {0: h}
        col_of = [0] * p
    else:  # per distinct device column: the ancestors' time on that stage's device
        distinct, col_of_arr = np.unique(prob.time.T, axis=0, return_inverse=True)
        col_of = [int(c) for c in np.ravel(col_of_arr)]
        anc_t, _ = _closure_weights(prob, np.ascontiguousarray(distinct.T))
        h_cols = {c: anc_t[:, c] + distinct[c] for c in range(len(distinct))}
    q = prob.single_param_state.min(axis=1)
    read = np.bincount(prob.edge_src, minlength=n) > 0
    k, caps = prob.inflight.astype(float), prob.caps.astype(float)

    def prefix(x: np.ndarray) -> np.ndarray:  # over the first a ranked nodes, a = 0..n
        return np.concatenate([[0.0], np.cumsum(x[order])])

    # Middle stages: per stage s, per rank r (the node v_s = order[r]), the amounts less the
    # prefix sums at the previous position.
    hq, hs = (anc[:, 1] + q)[order], (anc[:, 2] + prob.saved)[order]
    pq_, ps_ = prefix(q), prefix(prob.saved)
    own_q, own_s = q[order], prob.saved[order]
    rd = read[order]
    valid = order != prob.output
    link = prob.link if prob.direct else np.concatenate(
        [prob.comm[:, : p - 1], np.zeros((n, 1))], axis=1)
    mid = []
    for s in range(p - 1):
        c = col_of[s]
        ts = cols[s][order]
        send = np.where(rd, link[order, s], 0.0)
        held = k[s] * (np.where(rd, prob.sent[order], 0.0)) + prob.workspace[order]
        mid.append((h_cols[c][order], prefix(cols[s]), ts, send, k[s], held, caps[s]))
    # Last stage from position a (nodes ranked >= a): exact suffix amounts, the receive of the
    # node at a - 1, then a running minimum (non-increasing in a).
    last = p - 1
    t_last = prefix(cols[last])
    t_suffix = t_last[-1] - t_last
    recv_t = np.concatenate([[0.0], np.where(rd, (prob.link[order, last] if prob.direct
                                                  else prob.comm[order, p - 2]), 0.0)])
    recv_b = np.concatenate([[0.0], np.where(rd, prob.out_bytes[order], 0.0)])
    ws_suffix = np.concatenate([np.maximum.accumulate(prob.workspace[order][::-1])[::-1], [0.0]])
    m_suffix = (pq_[-1] - pq_) + k[last] * (ps_[-1] - ps_ + recv_b) + ws_suffix
    last_t = np.minimum.accumulate(t_suffix + recv_t) / prob.t_ref
    last_m = np.minimum.accumulate(m_suffix) / (caps[last] * prob.u_ref)

    def feasible(tau: float, theta: float) -> bool:
        a = 0
        for hc, pt, ts, send, ks, held, cap in mid:
            t_lim, m_lim = tau * prob.t_ref, theta * cap * prob.u_ref
            tv = np.maximum(hc[a:] - pt[a], ts[a:]) + send[a:]
            mv = (np.maximum(hq[a:] - pq_[a], own_q[a:])
                  + ks * np.maximum(hs[a:] - ps_[a], own_s[a:]) + held[a:])
            ok = np.nonzero((tv <= t_lim) & (mv <= m_lim) & valid[a:])[0]
            if len(ok):
                a += int(ok[-1]) + 1
        return bool(last_t[a] <= tau and last_m[a] <= theta)

    t_top = float(sum(cols[s].sum() + link[:, s].sum() for s in range(p))) / prob.t_ref + 1.0

    def a_star(theta: float) -> float:
        """Least time limit feasible with utilisation limit ``theta`` (inf if none)."""
        if not feasible(t_top, theta):
            return np.inf
        if feasible(a_lb, theta):
            return a_lb
        lo, hi = a_lb, t_top  # infeasible at lo, feasible at hi: A* is in (lo, hi]
        while hi - lo > _TOL * hi:
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
    top = float((pq_[-1] + k.max() * (ps_[-1] + prob.sent.sum() + prob.out_bytes.sum())
                 + prob.workspace.max(initial=0.0)) / (caps.min() * prob.u_ref)) + 1.0
    a_top = a_star(top)
    best_beyond = value(a_star(np.inf), top)  # utilisation above ``top``: never (kept valid)
    a_bottom = a_star(b_lb)
    # Intervals (lo, hi] of theta with their A*(hi); the first one is [.., b_lb].
    heap: list[tuple[float, float, float, float]] = [
        (value(a_bottom, b_lb), -np.inf, b_lb, a_bottom),
        (value(a_top, b_lb), b_lb, top, a_top)]
    heapq.heapify(heap)
    while True:
        lb, lo, hi, a_hi = heapq.heappop(heap)
        if not np.isfinite(lb) or lb >= best_beyond:
            return min(lb, best_beyond)
        if lo == -np.inf or w * (hi - lo) <= _TOL * lb:
            return min(lb, best_beyond)
        mid_t = 0.5 * (lo + hi)
        a_mid = a_star(mid_t)
        heapq.heappush(heap, (value(a_mid, lo), lo, mid_t, a_mid))
        heapq.heappush(heap, (value(a_hi, mid_t), mid_t, hi, a_hi))
