"""Exact dynamic programme over contiguous splits of a topological order (PipeDream style).

A contiguous split cuts a topological order of the assigned nodes into ``p`` consecutive
segments, one per stage (some may be empty); it always respects the pipeline order. Over all
such splits of one order, :func:`solve_dp` finds one minimising the objective of Note
[objective], under the memory caps, pins and colocation, and optionally only cutting at allowed
positions (unit boundaries).

Note [DP for two maxima]
~~~~~~~~~~~~~~~~~~~~~~~~
The objective ``J = (1 - w) A + w B`` adds two maxima over stages (time ``A`` and utilisation
``B``), so it does not decompose over segments. For a utilisation cap ``theta`` the classic
min-max DP gives ``A(theta) = min A subject to every stage's B_s <= theta``. Starting from
``theta = 1`` (the hard memory cap), each pass yields a split with objective ``J``; any split
strictly better than the best ``J*`` found has ``A' >= A(theta)`` and therefore
``B' < (J* - (1 - w) A(theta)) / w``, which becomes the next ``theta``. The passes stop when no
split meets the cap. This visits only Pareto points that could improve, and is exact.

Each pass is vectorised with numpy over a band of segment lengths: a segment whose compute alone
makes ``(1 - w) * work / T_ref`` exceed the best objective known less ``w`` times the analytic
memory bound (Note [lower bound], part 1) cannot be in a better split, which bounds segment
lengths. The tables are stored with their columns reversed so that the previous stage's values
enter as a sliding window (no gather: 7x faster per stage on 10,000 ops). The first and last stages are vectors (they start at 0 / end at
``n``); only the middle stages need the ``(n + 1) x band`` matrices.

Note [DP under direct sends]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under relaying a segment's communication depends on its two cut positions only. Under direct
sends (Note [pipeline order] in ``modelparallel/partitioner/problem.py``) what a segment
``[i, j)`` receives still does: the values produced before ``i`` with a consumer in ``[i, j)``,
a union of rectangles in ``(i, j)`` (:class:`_Receives`). What it sends depends on how many
later segments read each value; the DP charges one send per value read after ``j``, which is
exact when the later readers of every value share a stage, and low otherwise. So under direct
sends the DP is exact over contiguous splits for graphs whose values are read on at most one
later stage, and otherwise a heuristic whose splits are evaluated exactly (every result's
objective is :func:`~modelparallel.partitioner.evaluate.evaluate`'s).

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2, memory_weight=0.0), "h100")
    >>> solve_dp(prob).stage.tolist()
    [0, 0, 0, 0, 1, 1, 1, 1, 1]
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass

import numpy as np

from modelparallel.partitioner.bounds import _analytic
from modelparallel.partitioner.evaluate import stage_costs
from modelparallel.partitioner.problem import Problem

__all__ = ["DPResult", "solve_dp", "split_to_stages"]

_INF = np.inf
_MAX_PASSES = 60


@dataclass(frozen=True, eq=False)
class DPResult:
    """The best contiguous split found.

    Attributes:
        stage: Stage of every assigned node (problem index order), ``(n,)``.
        objective: Its objective (recomputed by the evaluation function).
        passes: Min-max DP passes run (Note [DP for two maxima]).
        exact: Whether the search finished (False if it stopped at the pass limit).
        seconds: Wall time.
    """

    stage: np.ndarray
    objective: float
    passes: int
    exact: bool
    seconds: float


class _Receives:
    """Where a segment ``[i, j)`` of positions receives a value produced at position ``a`` with
    consumers at ``c_1 < ... < c_k`` (Note [DP under direct sends]): on the disjoint rectangles
    ``c_{m-1} < i <= c_m < j`` (``c_0 = a``)."""

    def __init__(self, n: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.n = n
        keys = np.unique(src.astype(np.int64) * (n + 1) + dst)
        a, c = keys // (n + 1), keys % (n + 1)
        first = np.ones(len(a), dtype=bool)
        first[1:] = a[1:] != a[:-1]
        prev = np.where(first, a, np.roll(c, 1))
        self.value = a  # position of the value
        self.lo = prev + 1  # i in [lo, hi]
        self.hi = c  # and j > hi

    def fixed_start(self, i0: int, j: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Received weight of ``[i0, j)`` for each ``j``."""
        on = (self.lo <= i0) & (i0 <= self.hi)
        curve = np.zeros(self.n + 2)
        np.add.at(curve, self.hi[on] + 1, w[self.value[on]])
        return np.cumsum(curve)[np.asarray(j)]

    def to_end(self, i: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Received weight of ``[i, n)`` for each ``i``."""
        diff = np.zeros(self.n + 2)
        np.add.at(diff, self.lo, w[self.value])
        np.add.at(diff, self.hi + 1, -w[self.value])
        return np.cumsum(diff)[np.asarray(i)]

    def band(self, k: int, w: np.ndarray) -> np.ndarray:
        """``M[j, d]``: received weight of ``[j - d, j)``, ``(n + 1, k + 1)``."""
        n = self.n
        out = np.zeros((n + 1, k + 1))
        f = np.zeros(n + 1)
        order = np.argsort(self.hi, kind="stable")
        starts = np.searchsorted(self.hi[order], np.arange(n + 1))
        d = np.arange(k + 1)
        for j in range(1, n + 1):  # rectangles with hi == j - 1 open at row j
            for r in order[starts[j - 1]:starts[j]].tolist():
                f[self.lo[r]:self.hi[r] + 1] += w[self.value[r]]
            i = j - d
            ok = i >= 0
            out[j, ok] = f[i[ok]]
        return out


def split_to_stages(order: np.ndarray, cuts: list[int], n: int) -> np.ndarray:
    """Stage per node index from cut positions in ``order`` (``cuts[s]`` ends stage ``s``)."""
    stage = np.empty(n, dtype=np.int64)
    start = 0
    for s, end in enumerate([*cuts, n]):
        stage[order[start:end]] = s
        start = end
    return stage


class _Arrays:
    """Position-space arrays of one order (prefix sums, cut costs, band matrices)."""

    def __init__(self, prob: Problem, order: np.ndarray, allowed: np.ndarray) -> None:
        n, p = prob.n, prob.p
        self.n, self.p = n, p
        self.order = order
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        self.allowed = allowed
        zero = np.zeros(1)
        self.work = [np.concatenate([zero, np.cumsum(prob.time[order, s])]) for s in range(p)]
        self.work_min = np.concatenate([zero, np.cumsum(prob.time[order].min(axis=1))])
        self.saved = np.concatenate([zero, np.cumsum(prob.saved[order])])
        self.single = [np.concatenate([zero, np.cumsum(prob.single_param_state[order, s])])
                       for s in range(p)]
        self.ws = prob.workspace[order]
        # Value at position a is cut by every cut position k with a < k <= last consumer pos.
        last = np.arange(n)
        if len(prob.edge_src):
            np.maximum.at(last, pos[prob.edge_src], pos[prob.edge_dst])
        last_pos = last  # indexed by position of producer
        a_pos = np.arange(n)
        has = last_pos > a_pos

        def cut_curve(weight: np.ndarray) -> np.ndarray:
            diff = np.zeros(n + 2)
            np.add.at(diff, a_pos[has] + 1, weight[has])
            np.add.at(diff, last_pos[has] + 1, -weight[has])
            return np.cumsum(diff)[: n + 1]

        self.direct = prob.direct
        self.cut = [cut_curve(prob.comm[order, b]) for b in range(max(p - 1, 1))]
        self.recv = cut_curve(prob.out_bytes[order])
        # Direct sends (Note [DP under direct sends]): per stage link weights, what a segment
        # receives, and what it sends as in seg_sent.
        self.link = prob.link[order]
        self.out_w = prob.out_bytes[order]
        self.receives = _Receives(n, pos[prob.edge_src], pos[prob.edge_dst])
        # Values computed in a segment and sent past its end (Note [sent values held]).
        self.sent_w = prob.sent[order]
        self.sent_curve = cut_curve(self.sent_w)
        self.last_pos = last_pos
        # Parameters read by several nodes: held by a segment [i, j) iff next reader < j.
        groups: dict[tuple[int, ...], np.ndarray] = {}
        for q in prob.shared:
            key = tuple(sorted({int(pos[r]) for r in q.readers}))
            groups[key] = groups.get(key, np.zeros(p)) + np.asarray(q.state, dtype=float)
        self.multi: list[tuple[np.ndarray, np.ndarray]] = []
        for readers, state in groups.items():
            nxt = np.full(n + 1, n + 1, dtype=np.int64)
            for r in readers:
                nxt[: r + 1] = np.minimum(nxt[: r + 1], r)
            self.multi.append((nxt, state))
        # Domain (pins, output, colocation): bad-node prefix counts per stage.
        lo, hi = prob.lo[order], prob.hi[order]
        self.bad = [np.concatenate([[0], np.cumsum((lo > s) | (hi < s))]) for s in range(p)]

    def seg_held(self, i: np.ndarray, j: np.ndarray, s: int) -> np.ndarray:
        """Parameter state bytes stage ``s`` holds when running positions ``[i, j)``."""
        held = self.single[s][j] - self.single[s][i]
        for nxt, state in self.multi:
            held += state[s] * (nxt[i] < j)
        return held

    def seg_sent(self, i: np.ndarray, j: np.ndarray, weight: np.ndarray | None = None
                 ) -> np.ndarray:
        """Sent-value bytes (or ``weight``) of positions ``[i, j)`` crossing cut ``j`` (Note
        [sent values held]), for one start ``i`` (a scalar or an array of equal values) or
        ``j == n``."""
        i_arr, j_arr = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        if i_arr.size == 0 or np.all(j_arr == self.n):
            return np.zeros(i_arr.shape)
        i0 = int(i_arr.flat[0])
        assert np.all(i_arr == i0), "seg_sent takes one start position"
        w = self.sent_w if weight is None else weight
        curve = self.sent_curve if weight is None else self._leaving(weight)
        # curve[j] counts producers a < j with last >= j; drop those before i0.
        before = np.zeros(self.n + 2)
        np.add.at(before, self.last_pos[:i0], w[:i0])
        t = np.cumsum(before[::-1])[::-1]  # t[j] = sum over a < i0 with last_a >= j
        return curve[j_arr] - t[j_arr]

    def _leaving(self, weight: np.ndarray) -> np.ndarray:
        """Per cut ``j``, the weight of the values produced before ``j`` and read after."""
        n = self.n
        a_pos = np.arange(n)
        has = self.last_pos > a_pos
        diff = np.zeros(n + 2)
        np.add.at(diff, a_pos[has] + 1, weight[has])
        np.add.at(diff, self.last_pos[has] + 1, -weight[has])
        return np.cumsum(diff)[: n + 1]

    def seg_recv(self, i: np.ndarray, j: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Under direct sends, the ``weight`` of what positions ``[i, j)`` receive, for one
        start ``i`` or ``j == n`` (Note [DP under direct sends])."""
        i_arr, j_arr = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        if i_arr.size == 0:
            return np.zeros(i_arr.shape)
        if np.all(j_arr == self.n):
            return self.receives.to_end(i_arr, weight)
        i0 = int(i_arr.flat[0])
        assert np.all(i_arr == i0), "seg_recv takes one start position"
        return self.receives.fixed_start(i0, j_arr, weight)

    def seg_mem(self, i: np.ndarray, j: np.ndarray, s: int, k: float, ws: np.ndarray) -> np.ndarray:
        """Memory of stage ``s`` holding positions ``[i, j)`` (broadcasting arrays; one start
        ``i`` or ``j == n``: see :meth:`seg_sent`)."""
        held = self.seg_held(i, j, s)
        act = self.saved[j] - self.saved[i] + self.seg_sent(i, j)
        if s > 0:
            act = act + (self.seg_recv(i, j, self.out_w) if self.direct else self.recv[i])
        return held + k * act + ws

    def seg_time(self, i: np.ndarray, j: np.ndarray, s: int) -> np.ndarray:
        """Time of stage ``s`` running positions ``[i, j)``."""
        t = self.work[s][j] - self.work[s][i]
        if self.direct:
            if s > 0:
                t = t + self.seg_recv(i, j, self.link[:, s])
            if s < self.p - 1:
                t = t + self.seg_sent(i, j, self.link[:, s])
            return t
        if s > 0:
            t = t + self.cut[s - 1][i]
        if s < self.p - 1:
            t = t + self.cut[s][j]
        return t

    def seg_ok(self, i: np.ndarray, j: np.ndarray, s: int) -> np.ndarray:
        """Whether positions ``[i, j)`` may all go to stage ``s``."""
        bad = np.flatnonzero(np.diff(self.bad[s]))
        if len(bad) > 4:
            return (self.bad[s][j] - self.bad[s][i]) == 0
        ok = np.ones(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=bool)
        for b in bad.tolist():
            ok &= (j <= b) | (i > b)
        return ok


def _band(arr: _Arrays, prob: Problem, best: float) -> int:
    """Largest segment length that could appear in a split better than ``best``."""
    n = arr.n
    if not np.isfinite(best):
        return n
    w = prob.w
    if w < 1.0:
        # A better split has (1 - w) A < best - w B_lb (B_lb: Note [lower bound], part 1).
        b_lb = _analytic(prob)[1] * (1 - 1e-9)
        limit = (best - w * b_lb) * prob.t_ref / (1.0 - w) * (1 + 1e-9) + 1e-15
        lo = np.searchsorted(arr.work_min, arr.work_min - limit, side="left")
    else:
        k_min = float(prob.inflight.min())
        mono = np.concatenate([[0.0], np.cumsum(
            prob.single_param_state[arr.order].min(axis=1) + k_min * prob.saved[arr.order])])
        limit = best * prob.u_ref * float(prob.caps.max()) * (1 + 1e-9) + 1.0
        lo = np.searchsorted(mono, mono - limit, side="left")
    return int(max(1, (np.arange(n + 1) - lo).max()))


class _Pass:
    """Min-max DP passes over one band; theta-independent matrices are built once and cached."""

    def __init__(self, arr: _Arrays, prob: Problem, band: int) -> None:
        self.arr, self.prob = arr, prob
        n, p = arr.n, arr.p
        self.K = K = min(band, n) if p > 2 else 0
        j = np.arange(n + 1)[:, None]
        d = np.arange(K + 1)[None, :]
        i = j - d
        valid = i >= 0
        self.i = np.where(valid, i, 0)
        self.j = np.broadcast_to(j, self.i.shape)
        # Largest workspace of positions [j - d, j): a running max along d.
        ws = np.where(valid & (d > 0), arr.ws[np.clip(self.i, 0, max(n - 1, 0))], 0.0) \
            if n else np.zeros((n + 1, K + 1))
        np.maximum.accumulate(ws, axis=1, out=ws)
        self.rows = np.arange(n + 1)
        # Stage-independent pieces of a middle stage's memory: held parameters plus workspace,
        # and activations (saved plus received) per microbatch in flight.
        act = arr.saved[self.j] - arr.saved[self.i]
        act += arr.receives.band(K, arr.out_w) if arr.direct else arr.recv[self.i]
        # Sent bytes of [j - d, j): producers there whose last consumer is at or after j.
        self._src = np.clip(self.i, 0, max(n - 1, 0))
        self._leaves = valid & (d > 0) & (arr.last_pos[self._src] >= self.j)
        act += self._leaving_band(arr.sent_w)
        base: dict[tuple[int, ...], np.ndarray] = {}
        # Per middle stage: time and utilisation matrices and the static feasibility mask,
        # shared between stages whose inputs are equal (identical devices, equal in-flight).
        self._a: dict[tuple[object, ...], np.ndarray] = {}
        self._b: dict[tuple[object, ...], np.ndarray] = {}
        self._ok: dict[tuple[object, ...], np.ndarray] = {}
        self.stage_keys = []
        for s in range(1, p - 1):
            ka = ("a", self._key_time(s))
            kb = ("b", self._key_mem(s))
            ko = ("ok", kb, self._key_dom(s))
            if ka not in self._a:
                self._a[ka] = arr.seg_time(self.i, self.j, s) if not arr.direct else (
                    arr.work[s][self.j] - arr.work[s][self.i]
                    + arr.receives.band(K, arr.link[:, s]) + self._leaving_band(arr.link[:, s]))
            if kb not in self._b:
                states = kb[1][0]
                assert isinstance(states, tuple)
                if states not in base:
                    held = arr.seg_held(self.i, self.j, s)
                    held += ws
                    base[states] = held
                b = act * float(prob.inflight[s])
                b += base[states]
                b *= 1.0 / float(prob.caps[s])
                self._b[kb] = b
            if ko not in self._ok:
                self._ok[ko] = valid & arr.seg_ok(self.i, self.j, s) & (self._b[kb] <= 1.0)
            self.stage_keys.append((ka, kb, ko))
        del ws, act, base
        # Stored with the columns reversed (column e = K - d, segment [j - K + e, j)), so that
        # f[j - d] is a plain sliding window over f in :meth:`run`.
        for table in (self._a, self._b, self._ok):
            for key, m in table.items():
                table[key] = np.ascontiguousarray(m[:, ::-1])
        # Per stage: its time where the segment is allowed at the hard cap, inf elsewhere.
        self._masked: dict[tuple[object, ...], np.ndarray] = {}
        for ka, _kb, ko in self.stage_keys:
            if (ka, ko) not in self._masked:
                self._masked[(ka, ko)] = np.where(self._ok[ko], self._a[ka], _INF)
        del self.i, self._src, self._leaves, self._a, self._ok  # the tables suffice now

    def _static(self, key: tuple[tuple[object, ...], ...], minimize_memory: bool) -> np.ndarray:
        """The time (or utilisation) table of a stage where its segment is allowed at the hard
        cap, inf elsewhere."""
        ka, kb, ko = key
        time = self._masked[(ka, ko)]
        return np.where(np.isfinite(time), self._b[kb], _INF) if minimize_memory else time

    def _leaving_band(self, weight: np.ndarray) -> np.ndarray:
        """``M[j, d]``: the ``weight`` of the values of ``[j - d, j)`` read at or after ``j``."""
        n = self.arr.n
        if not n:
            return np.zeros(self.i.shape)
        out = np.where(self._leaves, weight[self._src], 0.0)
        np.cumsum(out, axis=1, out=out)
        return out

    def _key_time(self, s: int) -> tuple[object, ...]:
        prob = self.prob
        if prob.direct:
            return (prob.time[:, s].tobytes(), prob.link[:, s].tobytes())
        return (prob.time[:, s].tobytes(), prob.comm[:, s - 1].tobytes(),
                prob.comm[:, s].tobytes())

    def _key_mem(self, s: int) -> tuple[object, ...]:
        prob = self.prob
        return (tuple(q.state[s] for q in prob.params), float(prob.inflight[s]),
                float(prob.caps[s]))

    def _key_dom(self, s: int) -> tuple[object, ...]:
        return (self.arr.bad[s].tobytes(),)

    def run(self, theta: float, minimize_memory: bool) -> list[int] | None:
        """Cut positions minimising max time (or max utilisation) with every B_s <= theta."""
        arr, prob = self.arr, self.prob
        n, p = arr.n, arr.p
        cap_b = min(theta, 1.0)
        if p == 1:
            return []
        args: list[np.ndarray] = []
        # Stage 0: segments [0, j).
        j0 = np.arange(n + 1)
        i0 = np.zeros(n + 1, dtype=np.int64)
        ws0 = np.concatenate([[0.0], np.maximum.accumulate(arr.ws)])
        b0 = arr.seg_mem(i0, j0, 0, prob.inflight[0], ws0) / prob.caps[0]
        a0 = b0 if minimize_memory else arr.seg_time(i0, j0, 0)
        ok = arr.seg_ok(i0, j0, 0) & (b0 <= cap_b) & arr.allowed
        f = np.where(ok, a0, _INF)
        args.append(j0.copy())
        masked: dict[tuple[object, ...], np.ndarray] = {}  # per pass: a where allowed, else inf
        K = self.K
        for ka, kb, ko in self.stage_keys:
            key = (ka, kb, ko)
            if key not in masked:
                static = self._static(key, minimize_memory)
                masked[key] = static if cap_b >= 1.0 else np.where(
                    self._b[kb] <= cap_b, static, _INF)
            # f[j - K + e] for every (j, e): a sliding window over f padded with inf (no
            # gather; rows j < d read the padding), 7x faster than indexing on 10,000 ops.
            shifted = np.lib.stride_tricks.sliding_window_view(
                np.concatenate([np.full(K, _INF), f]), K + 1)
            cand = np.maximum(shifted, masked[key])
            best_d = np.argmin(cand[:, ::-1], axis=1)  # the shortest segment among ties
            f_new = cand[self.rows, K - best_d]
            f = np.where(arr.allowed, f_new, _INF)
            args.append(self.rows - best_d)
        # Last stage: segments [i, n).
        s = p - 1
        il = np.arange(n + 1)
        jl = np.full(n + 1, n)
        wsl = np.concatenate([np.maximum.accumulate(arr.ws[::-1])[::-1], [0.0]])
        bl = arr.seg_mem(il, jl, s, prob.inflight[s], wsl) / prob.caps[s]
        al = bl if minimize_memory else arr.seg_time(il, jl, s)
        ok = arr.seg_ok(il, jl, s) & (bl <= cap_b)
        total = np.where(ok, np.maximum(f, al), _INF)
        i_best = int(np.argmin(total))
        if not np.isfinite(total[i_best]):
            return None
        cuts = [i_best]
        for s in range(p - 2, 0, -1):
            cuts.append(int(args[s][cuts[-1]]))
        return cuts[::-1]


def _greedy(arr: _Arrays, prob: Problem, slack: float) -> list[int] | None:
    """Fill stages in order up to ``slack`` times an equal share of the remaining compute,
    stopping earlier where memory or pins require; a cheap first incumbent for the band."""
    n, p = arr.n, arr.p
    cuts: list[int] = []
    start = 0
    for s in range(p - 1):
        j = np.arange(start, n + 1)
        i = np.full(len(j), start)
        remaining = arr.work[s][n] - arr.work[s][start]
        t = arr.seg_time(i, j, s)
        ws = np.maximum.accumulate(np.concatenate([[0.0], arr.ws[start:]]))
        mem = arr.seg_mem(i, j, s, float(prob.inflight[s]), ws[: len(j)]) / prob.caps[s]
        ok = (mem <= 1.0) & arr.seg_ok(i, j, s) & arr.allowed[start:] & (
            t <= slack * remaining / (p - s) + 1e-15)
        if not ok.any():
            return None
        start = int(j[np.nonzero(ok)[0][-1]])
        cuts.append(start)
    return cuts


def _valid(prob: Problem, stage: np.ndarray) -> bool:
    if any(stage[v] != s for v, s in prob.pinned.items()):
        return False
    if np.any(stage < prob.lo) or np.any(stage > prob.hi):
        return False
    return all(len({int(stage[i]) for i in g}) == 1 for g in prob.colocate)


def solve_dp(prob: Problem, *, order: np.ndarray | None = None,
             allowed_cuts: np.ndarray | None = None,
             deadline: float | None = None) -> DPResult | None:
    """The best contiguous split of ``order`` (default: the problem's topological order).

    Args:
        prob: The problem.
        order: A topological order of the assigned node indices.
        allowed_cuts: Boolean mask over cut positions ``0..n``; cuts elsewhere are forbidden
            (positions 0 and n are always allowed).
        deadline: A :func:`time.perf_counter` reading after which no further pass starts
            (the result is then not ``exact``; Note [whole-call deadline]).

    Returns:
        The best split, or ``None`` if no contiguous split meets the memory caps and pins.
    """
    t0 = _time.perf_counter()
    n, p, w = prob.n, prob.p, prob.w
    order = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    allowed = np.ones(n + 1, dtype=bool) if allowed_cuts is None else allowed_cuts.copy()
    allowed[0] = allowed[n] = True
    for group in prob.colocate:  # colocated readers may not be separated by a cut
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        ps = [int(pos[i]) for i in group]
        allowed[min(ps) + 1: max(ps) + 1] = False
    arr = _Arrays(prob, order, allowed)
    best_obj: float = _INF
    best_stage: np.ndarray | None = None
    for slack in (1.0, 1.15, 1.4):
        cuts = _greedy(arr, prob, slack)
        if cuts is None:
            continue
        g = split_to_stages(order, cuts, n)
        _, memory, objective = stage_costs(prob, g)
        if _valid(prob, g) and float((memory / prob.caps).max()) <= 1.0 and (
                objective < best_obj):
            best_obj, best_stage = objective, g
    band = _band(arr, prob, best_obj)
    if not np.isfinite(best_obj) and p > 2:
        # No incumbent: a pass over short segments usually finds one cheaply, which then
        # bounds the band; otherwise fall back to every segment length.
        trial = _Pass(arr, prob, min(n, 3 * n // p + 1)).run(1.0, w >= 1.0)
        if trial is not None:
            stage = split_to_stages(order, trial, n)
            best_obj, best_stage = stage_costs(prob, stage)[2], stage
            band = _band(arr, prob, best_obj)
    dp = _Pass(arr, prob, band)
    passes = 0

    def run(theta: float, memory: bool) -> tuple[float, float] | None:
        """One pass; returns (A, B) of its split and keeps the best split."""
        nonlocal best_obj, best_stage, passes
        passes += 1
        cuts = dp.run(theta, memory)
        if cuts is None:
            return None
        stage = split_to_stages(order, cuts, n)
        stage_time, stage_mem, objective = stage_costs(prob, stage)
        if objective < best_obj:
            best_obj, best_stage = objective, stage
        return float(stage_time.max()) / prob.t_ref, float((stage_mem / prob.caps).max())

    exact = True

    def late() -> bool:
        return deadline is not None and _time.perf_counter() > deadline

    if w >= 1.0:
        run(1.0, True)
    elif w <= 0.0:
        run(1.0, False)
    else:
        first = run(1.0, False)
        new_band = _band(arr, prob, best_obj)
        if new_band < dp.K * 0.7:
            dp = _Pass(arr, prob, new_band)
        if first is not None:
            # A few probes between the time-optimal and the memory-optimal split give a good
            # incumbent, so the exact walk below (Note [DP for two maxima]) jumps far.
            b_hi = first[1]
            skipped = late()  # then the walk below is not exact either
            low = None if skipped else run(1.0, True)
            b_lo = low[1] if low is not None else b_hi
            for frac in (0.5, 0.25, 0.75):
                if not late():
                    run(b_lo + (b_hi - b_lo) * frac, False)
            theta, a = 1.0, first[0]
            exact = not skipped
            while not skipped:
                nxt = (best_obj - (1 - w) * a) / w * prob.u_ref
                nxt = min(nxt, theta) * (1 - 1e-9) - 1e-15
                if nxt < b_lo * (1 - 1e-9) - 1e-15:
                    break
                if passes >= _MAX_PASSES or late():
                    exact = False
                    break
                theta = nxt
                res = run(theta, False)
                if res is None:
                    break
                a = res[0]
    if best_stage is None:
        return None
    return DPResult(stage=best_stage, objective=float(best_obj), passes=passes, exact=exact,
                    seconds=_time.perf_counter() - t0)
