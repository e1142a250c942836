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
1b. *Splits* (:func:`_split_bound`): the nodes on stages ``0..b`` form a downset ``D`` (closed
   under ancestors). Let ``h(v)`` be the fastest time of ``v`` and its ancestors (it grows
   along every edge; ranked by ``h``, ties by index, a topological order) and ``v`` the node of
   ``D`` ranked last: ``D`` holds ``v`` and its ancestors, and no node ranked after ``v`` (so
   the other stages hold all of those); ``v``'s value, read by nodes ranked after it, is sent
   from ``D``'s stages (its send time, its held sent bytes) and received on the others
   (receive time, received bytes). Each side's time and
   memory is then bounded as in part 1 over its own stages (time over ``b + 1`` and ``p - b -
   1`` stages, memory by the plain and the ``1 / inflight``-weighted averages), weighted as in
   the objective; the minimum over the choices of ``v`` (``D`` empty included) bounds ``J``
   for boundary ``b``, and the largest over ``b`` is the bound. Unlike part 1 it sees the
   trade between the early stages' memory (more microbatches in flight under 1F1B) and the
   late stages' time: on a 192-layer decoder at p = 16 it is within 2.5% of the incumbent
   where part 1 is 13% below (figures: ``docs/measurements.md``).
1c. *Chains* (Note [chain bound] in ``_chain_bound.py``): every boundary at once, through the
   last-ranked node of each stage's downset (in the same rank as part 1b), minimised over
   those sequences by a greedy that decides each pair of time and utilisation limits exactly;
   each stage's sends and receives counted. On the 96- and 192-layer decoders at p = 16 it is
   within 1.8% and 0.9% of the incumbent (part 1b: 4.8%, 2.5%).
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
   part 1, at least ``(saved + state / max_J k) / Z_J`` (valid for any in-flight counts; it
   narrows the windows: ``docs/measurements.md``, Note [lower bound]). Node ``v`` can
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
   assignment counted lies in both). Under direct sends (Note [pipeline order]) a value crossing
   ``b`` is sent by some stage ``<= b`` and received by some stage ``> b``, once whatever it
   crosses besides, so the cuts give less: stages ``0..s`` carry at least ``max_{b<=s} c_b``,
   stages ``s..p-1`` at least ``max_{b>=s-1} c_b`` and hold ``max_{b>=s-1} r_b`` at least
   ``min_{j>=s} inflight_j`` times, all stages ``2 max_b c_b``. This removes window binaries and shortens the proof
   phases of Note [ILP pipeline] accordingly (figures: ``docs/measurements.md``). With
   ``_CHAIN_WINDOWS`` on, each window's start is first raised to the chain windows' (Note
   [chain bound], the windows): the earliest stage whose downset can reach the node.
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

The LP relaxation of the op-level model is well below the optimum, because fractional
assignments mix cut positions and so balance the stages without paying for the granularity of
the cheap cut points. Two strengthenings tried did not pay: rows charging each node the time
and memory its ancestors and descendants force at its stage (part 2 as ``t >= sum_s x[v, s]
a(v, s)``), and a DP over boundary classes (the first node of a heaviest path outside the
boundary's downset) with per-class min cuts (``docs/measurements.md`` has the figures). What
closes the gap is branching, which the windows, the reduction of Note [exact reduction] and a
cutoff below the incumbent make cheap enough.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> lb = lower_bound(prob)  # the optimum: half the chain each, one value sent across
    >>> round(lb.value, 4), lb.source
    (1.4824, 'split')
"""

from __future__ import annotations

import time as _time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelparallel.errors import ConfigError
from modelparallel.partitioner._bound_model import _solve_windowed
from modelparallel.partitioner._chain_bound import chain_bound, chain_windows
from modelparallel.partitioner.problem import Problem

__all__ = ["LowerBound", "lower_bound", "stage_windows", "window_for"]

_SAFETY = 1e-6  # relative slack for solver tolerances
_MIN_SECONDS = 0.3  # less time than this for the windowed model: analytic bound only
_MIP_COLUMNS = 4000  # windowed binaries up to which the bound model is solved as a MIP
_CUT_ROUNDS = 3  # rounds of windows narrowed by boundary cuts (Note [lower bound], part 2)
#: Narrow the windows by Note [chain bound]'s as well. Off: the proof phases they shorten then
#: reach a later phase that overruns the call's deadline, and T5-small's proof at p = 8 ran
#: slower (``docs/measurements.md``, "Chain windows").
_CHAIN_WINDOWS = False


@dataclass(frozen=True)
class LowerBound:
    """A proven lower bound and what it is made of.

    Attributes:
        value: Lower bound on the objective ``J`` (Note [objective]).
        time: Lower bound on ``max_s T_s / T_ref`` (analytic part).
        memory: Lower bound on ``max_s (M_s / cap_s) / U_ref`` (analytic part).
        min_memory_bytes: No plan fits on devices that each have less memory than this.
        source: Which bound gave ``value``: ``"analytic"`` (part 1), ``"split"`` (part 1b),
            ``"chain"`` (part 1c), ``"lp"`` or ``"incumbent"`` (no
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
        if self.source not in ("analytic", "split", "chain", "lp", "incumbent"):
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


def _split_bound(prob: Problem) -> float:
    """Part 1b of Note [lower bound]: the best split bound over the boundaries ``b``."""
    p, n, w = prob.p, prob.n, prob.w
    if p < 2 or n == 0:
        return 0.0
    a_lb, b_lb, _ = _analytic(prob)
    anc, _ = _closure_weights(prob)
    h = anc[:, 0] + prob.time.min(axis=1)
    # Ranks by h, ties by index: a topological order (h never falls along an edge).
    order = np.argsort(h, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)

    def beyond(x: np.ndarray) -> np.ndarray:
        """Sum of ``x`` over the nodes ranked after each node, then over all (D empty)."""
        tail = np.concatenate([np.cumsum(x[order][::-1])[::-1], [0.0]])
        return np.append(tail[rank + 1], float(x.sum()))

    q = prob.single_param_state.min(axis=1)
    k, caps = prob.inflight.astype(float), prob.caps.astype(float)
    read = np.bincount(prob.edge_src, minlength=n) > 0  # v's value is read later
    q_before = np.append(anc[:, 1] + q, 0.0)  # the last entry: D empty
    s_before = np.append(anc[:, 2] + prob.saved + np.where(read, prob.sent, 0.0), 0.0)
    q_after = beyond(q)
    s_after = beyond(prob.saved) + np.append(np.where(read, prob.out_bytes, 0.0), 0.0)

    def mem(qs: np.ndarray, ss: np.ndarray, stages: np.ndarray) -> np.ndarray:
        ks, cs = k[stages], caps[stages]
        return np.maximum((qs + ks.min() * ss) / cs.sum(),
                          (ss + qs / ks.max()) / (cs / ks).sum()) / prob.u_ref

    best = 0.0
    for b in range(p - 1):
        first, rest = np.arange(b + 1), np.arange(b + 1, p)
        comm = prob.link if prob.direct else prob.comm[:, [b]]
        send = np.where(read, comm[:, first].min(axis=1) if prob.direct else comm[:, 0], 0.0)
        recv = np.where(read, comm[:, rest].min(axis=1) if prob.direct else comm[:, 0], 0.0)
        t_first = np.append(h + send, 0.0) / (b + 1)
        t_rest = (beyond(prob.time[:, rest].min(axis=1)) + np.append(recv, 0.0)) / (p - b - 1)
        a = np.maximum(np.maximum(t_first, t_rest) / prob.t_ref, a_lb)
        m = np.maximum(np.maximum(mem(q_before, s_before, first), mem(q_after, s_after, rest)),
                       b_lb)
        best = max(best, float(((1 - w) * a + w * m).min()))
    return best


_CLOSURES: weakref.WeakKeyDictionary[Problem, tuple[np.ndarray, np.ndarray]] = (
    weakref.WeakKeyDictionary())


def _closure_weights(prob: Problem, omega: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Weights of each node's ancestors and descendants (node excluded): the columns of
    ``omega``, by default ``(fastest time, own parameter state, saved bytes)``, the ones every
    window reads (then cached per problem). Closures are bit rows of an ``(n, n / 8)`` array,
    built in topological order and weighed in blocks."""
    default = omega is None
    if default and prob in _CLOSURES:
        return _CLOSURES[prob]
    if omega is None:
        omega = np.stack([prob.time.min(axis=1), prob.single_param_state.min(axis=1),
                          prob.saved], axis=1)
    n = prob.n
    nbytes = (n + 7) // 8
    own = np.zeros((n, nbytes), dtype=np.uint8)
    own[np.arange(n), np.arange(n) // 8] = (1 << (np.arange(n) % 8)).astype(np.uint8)

    def weigh(bits: np.ndarray) -> np.ndarray:
        out = np.empty((n, omega.shape[1]))
        for a in range(0, n, 512):
            mask = np.unpackbits(bits[a: a + 512], axis=1, bitorder="little")[:, :n]
            out[a: a + 512] = mask @ omega
        return out

    anc = np.zeros((n, nbytes), dtype=np.uint8)
    for v in range(n):
        for u in prob.producers[v]:
            np.bitwise_or(anc[v], anc[u], out=anc[v])
            np.bitwise_or(anc[v], own[u], out=anc[v])
    wa = weigh(anc)
    del anc
    desc = np.zeros((n, nbytes), dtype=np.uint8)
    for v in range(n - 1, -1, -1):
        for c in prob.consumers[v]:
            np.bitwise_or(desc[v], desc[c], out=desc[v])
            np.bitwise_or(desc[v], own[c], out=desc[v])
    out = (wa, weigh(desc))
    if default:
        _CLOSURES[prob] = out
    return out


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
    anc, desc = _closure_weights(prob)
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


#: Memory-term range of the assignments a window is for: ``(at least, at most)``, in the units
#: of the objective's memory term (Note [memory sides] in ``_pieces.py``).
MemoryRange = tuple[float, float]

_ANY_MEMORY: MemoryRange = (0.0, np.inf)
_CACHED = 3  # windows kept per problem: a proof phase asks for its own and its two sides'
_WINDOWS: weakref.WeakKeyDictionary[
    Problem, dict[tuple[float, MemoryRange], tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary())


def window_for(prob: Problem, incumbent: float, memory: MemoryRange = _ANY_MEMORY
               ) -> tuple[np.ndarray, np.ndarray]:
    """Stage windows of the assignments strictly better than ``incumbent`` (Note [lower
    bound], part 2): node ``v`` may take stage ``s`` only if the time and memory that ``v`` on
    ``s`` forces, weighted as in the objective, stay below ``incumbent``; then again with the
    least communication and received bytes each boundary carries within those windows, while
    that narrows them. With ``memory = (lo, hi)``, only the assignments whose memory term lies
    in that range count: the forced memory is at least ``lo`` and at most ``hi`` (Note [memory
    sides] in ``_pieces.py``). Cached per problem, incumbent and range, a few at a time (the ILP
    pipeline and the bound ask for the same windows; on 10,000 ops their minimum cuts take
    seconds)."""
    if not 0.0 <= memory[0] <= memory[1]:
        raise ConfigError(f"window_for: the memory range must be (at least, at most) with "
                          f"0 <= at least <= at most, got {memory!r}; pass (0.0, inf) for "
                          "every assignment")
    cache = _WINDOWS.setdefault(prob, {})
    key = (float(incumbent), (float(memory[0]), float(memory[1])))
    if key not in cache:
        while len(cache) >= _CACHED:  # the arrays are (n,) each
            del cache[next(iter(cache))]
        cache[key] = _window_for(prob, key[0], key[1])
    lo, hi = cache[key]
    return lo.copy(), hi.copy()


def _window_for(prob: Problem, incumbent: float, memory: MemoryRange
                ) -> tuple[np.ndarray, np.ndarray]:
    p = prob.p
    cuts = np.zeros((max(p - 1, 0), 2))
    lo, hi = _windows_with_cuts(prob, incumbent, cuts, memory)
    if _CHAIN_WINDOWS:  # Note [chain bound], the windows
        lo = np.maximum(lo, chain_windows(prob, incumbent, memory))
    for _ in range(_CUT_ROUNDS if p > 1 else 0):
        if np.any(lo > hi):
            break
        new = _boundary_cuts(prob, lo, hi, np.stack([prob.comm[:, : p - 1], np.broadcast_to(
            prob.out_bytes[:, None], (prob.n, p - 1))]))
        if np.all(new <= cuts):
            break
        cuts = np.maximum(cuts, new)
        lo2, hi2 = _windows_with_cuts(prob, incumbent, cuts, memory)
        lo, hi = np.maximum(lo, lo2), np.minimum(hi, hi2)
    return lo, hi


def _windows_with_cuts(prob: Problem, incumbent: float, cuts: np.ndarray,
                       memory: MemoryRange = _ANY_MEMORY) -> tuple[np.ndarray, np.ndarray]:
    """The windows of :func:`window_for` given, per boundary, a least communication time
    (``cuts[:, 0]``) and least bytes received (``cuts[:, 1]``) of every assignment counted."""
    p, w = prob.p, prob.w
    a_lb, b_lb, _ = _analytic(prob)
    omega = prob.time.min(axis=1)
    params = prob.single_param_state.min(axis=1)
    anc, desc = _closure_weights(prob)
    stages = np.arange(p)
    before, after = (stages + 1)[None, :], (p - stages)[None, :]
    # A value crossing boundary b costs its time on stages b and b + 1: stages 0..s carry
    # boundaries 0..s-1 twice and boundary s once; stages s..p-1 boundary s-1 once and
    # s..p-2 twice. Stage j >= 1 holds what crosses boundary j - 1, inflight_j times.
    c = cuts[:, 0] / prob.t_ref
    k = prob.inflight
    if prob.direct:
        # Direct sends (Note [pipeline order]): a value crossing boundary b is sent by a stage
        # <= b and received by one > b, so stages 0..s carry at least max_{b <= s} c_b,
        # stages s..p-1 at least max_{b >= s-1} c_b, all together 2 max_b c_b; stages s..p-1
        # hold what crosses b >= s - 1 at least min_{j >= s} k_j times.
        c_before = np.append(np.maximum.accumulate(c), c.max(initial=0.0))[:p] if p > 1 \
            else np.zeros(p)
        c_after = np.concatenate([[0.0], np.maximum.accumulate(c[::-1])[::-1]]) if p > 1 \
            else np.zeros(p)
        c_after[0] = c.max(initial=0.0)
        c_total = 2 * float(c.max(initial=0.0))
        r_max = np.concatenate([[0.0], np.maximum.accumulate(cuts[::-1, 1])[::-1]])
        r_before = np.zeros(p)
        r_after = np.minimum.accumulate(k[::-1])[::-1] * r_max
        rb_before, rb_after = np.zeros(p), r_max
    else:
        c_before = np.concatenate([[0.0], np.cumsum(2 * c)])[:p] + np.append(c, 0.0)
        c_after = np.concatenate([[0.0], c]) + np.append(np.cumsum((2 * c)[::-1])[::-1], 0.0)
        c_total = 2 * float(c.sum())
        recv = np.concatenate([[0.0], k[1:] * cuts[:, 1]])  # per stage
        r_before, r_after = np.cumsum(recv), np.cumsum(recv[::-1])[::-1]
        rb = np.concatenate([[0.0], cuts[:, 1]])  # per stage
        rb_before, rb_after = np.cumsum(rb), np.cumsum(rb[::-1])[::-1]
    a = np.maximum(((anc[:, 0] + omega)[:, None] / prob.t_ref + c_before[None, :]) / before,
                   ((desc[:, 0] + omega)[:, None] / prob.t_ref + c_after[None, :]) / after)
    a_all = (float(omega.sum()) / prob.t_ref + c_total) / p  # every stage
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
    wb = ((anc[:, 2] + prob.saved)[:, None] + (anc[:, 1] + params)[:, None]
          / kmax_before[None, :] + rb_before[None, :]) / z_before[None, :]
    wa = ((desc[:, 2] + prob.saved)[:, None] + (desc[:, 1] + params)[:, None]
          / kmax_after[None, :] + rb_after[None, :]) / z_after[None, :]
    b = np.maximum(b, np.maximum(wb, wa)) / (float(prob.caps.max()) * prob.u_ref)
    b = np.maximum(b, b_lb)
    forced = np.where(b <= memory[1] * (1 + 1e-9) + 1e-12,
                      (1 - w) * a + w * np.maximum(b, memory[0]), np.inf)
    return _window_range(prob, forced, incumbent)


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
    counts once whatever number of its consumers lie beyond (under either communication rule
    it is sent at least once from a stage <= b to one > b).
    Forced nodes are contracted into the source and the sink, so each graph holds only the
    nodes free at that boundary."""
    nb = prob.p - 1
    out = np.zeros((nb, cost.shape[0]))
    for b in range(nb):
        if not np.any(hi <= b) or not np.any(lo > b):
            continue
        side: list[Any] = ["s" if hi[v] <= b else ("t" if lo[v] > b else v)
                           for v in range(prob.n)]
        values: list[tuple[Any, Any, int]] = []  # (producer's side, head, u) of a value
        order: set[tuple[Any, Any]] = set()  # infinite edges
        for u in range(prob.n):
            su = side[u]
            if su == "t":
                continue
            beyond = {side[c] for c in prob.consumers[u] if side[c] != "s"}
            if len(beyond) == 1:  # one side beyond: no value node needed
                values.append((su, next(iter(beyond)), u))
            elif beyond:
                values.append((su, ("value", u), u))
                order.update((("value", u), sc) for sc in beyond)
            if su != "s":
                order.update((side[c], su) for c in prob.consumers[u]
                             if side[c] not in ("t", su))  # c before the cut: so is u
        for k in range(cost.shape[0]):
            out[b, k] = _min_cut(values, order, cost[k, :, b])
    return out


def _min_cut(values: list[tuple[Any, Any, int]], order: set[tuple[Any, Any]],
             cost: np.ndarray) -> float:
    """The minimum ``"s"``-``"t"`` cut of the graph with an edge ``side -> head`` of capacity
    ``cost[u]`` per value ``u`` (``head``: the side of its consumers beyond when they are on
    one, else a node ``("value", u)`` with an infinite edge to each) and the infinite ``order``
    edges, by networkx's Dinitz on the residual network built here (the layout
    ``build_residual_network`` documents: each edge with its reverse, infinity a finite value
    above every cut)."""
    import networkx as nx
    from networkx.algorithms.flow import dinitz

    caps: dict[tuple[Any, Any], float] = {}
    for su, head, u in values:
        c = float(cost[u])
        if c > 0:
            caps[su, head] = caps.get((su, head), 0.0) + c
    finite = sum(caps.values())
    inf = 3.0 * finite or 1.0
    for edge in order:  # no self-loops: a node is never its own consumer's side
        caps[edge] = inf
    residual = nx.DiGraph()
    residual.__networkx_cache__ = None  # type: ignore[attr-defined]  # as networkx's own
    residual.add_nodes_from(("s", "t"))
    residual.add_edges_from((x, y, {"capacity": c}) for (x, y), c in caps.items())
    residual.add_edges_from((y, x, {"capacity": 0.0}) for x, y in caps if (y, x) not in caps)
    residual.graph["inf"] = inf
    dinitz(residual, "s", "t", residual=residual, value_only=True)
    value = float(residual.graph["flow_value"])
    assert value <= finite * (1 + 1e-9), "an infinite path from the nodes forced before to after"
    return value


def lower_bound(prob: Problem, *, incumbent: float | None = None,
                incumbent_stage: np.ndarray | None = None, time_limit: float = 5.0
                ) -> LowerBound:
    """A proven lower bound on the objective of any valid assignment (Note [lower bound]).

    Args:
        prob: The problem.
        incumbent: The objective of a known assignment; enables the windows and the LP.
        incumbent_stage: That assignment, to warm-start the windowed MIP.
        time_limit: Seconds the windows and the windowed model may take together, their
            building included (Note [whole-call deadline]).
    """
    a_lb, b_lb, mem_bytes = _analytic(prob)
    w = prob.w
    value = (1 - w) * a_lb + w * b_lb
    source = "analytic"
    notes: list[str] = []
    split = _split_bound(prob) * (1 - _SAFETY)
    if split > value:
        value, source = split, "split"
    chain = chain_bound(prob) * (1 - _SAFETY)
    if chain > value:
        value, source = chain, "chain"
    lp_seconds = 0.0
    t0 = _time.perf_counter()
    if incumbent is not None and prob.p > 1 and w < 1.0 and incumbent > value and (
            time_limit >= _MIN_SECONDS):
        lo, hi = window_for(prob, incumbent)
        left = time_limit - (_time.perf_counter() - t0)
        if incumbent_stage is not None:
            incumbent_stage = np.asarray(incumbent_stage)
        if np.any(lo > hi):
            value, source = incumbent, "incumbent"
            notes.append("no assignment beats the incumbent (empty stage window)")
        elif left < _MIN_SECONDS:
            notes.append(f"windowed model skipped: the windows took {time_limit - left:.1f} s "
                         f"of its {time_limit:.1f} s (Note [whole-call deadline])")
        else:
            # Large models: the LP relaxation alone (a MIP would not get past its root).
            integral = int((hi - lo).sum()) <= _MIP_COLUMNS
            lp_val, word, ncol, nrow = _solve_windowed(prob, lo, hi, left,
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
