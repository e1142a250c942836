"""How each partitioning method finds an assignment; :mod:`~modelparallel.partitioner.solve` runs them.

Note [ILP pipeline]
~~~~~~~~~~~~~~~~~~~
``method="ilp"`` runs, within ``config.time_limit`` seconds in all (one deadline for every
stage and the bound: Note [whole-call deadline] in :mod:`~modelparallel.partitioner.deadline`):

1. the exact contiguous DP at op level (:mod:`~modelparallel.partitioner.dp`) over the
   canonical order (no pass starts after ``_DP_SHARE`` of the time) and, within
   ``_ORDERS_SHARE`` of the time, over a few other topological
   orders (Note [canonical order] in :mod:`~modelparallel.partitioner.order`), each split
   then moved cut by cut under the exact objective where the DP's send accounting is not exact
   (Note [cut descent] in :mod:`~modelparallel.partitioner.cut_descent`, ending at
   ``_DESCENT_SHARE`` of the time), and the two baselines: the first incumbents;
2. one short op-level refinement of the best of them around its stage boundaries (Note
   [refinement], ``_POLISH_SHARE`` of the time): it finds the branch orders a single
   topological order misses (an Inception block cut between its branches), and a better
   incumbent narrows everything after it. With a second core it starts after the best split's
   descent, on a thread beside the other descents and the windows of steps 3-4 (Note [polish
   alongside] in ``_polish.py``);
3. the exact reduction (Note [exact reduction]): free nodes (views, slices...) attached to a
   neighbour, which loses no optimum; the incumbent moved accordingly (never worse);
4. stage windows (Note [lower bound], part 2): the stages each node can take in any assignment
   better than a given value. If some node has none, nothing is better;
5. if the windows of the incumbent leave at most ``_FLAT_COLUMNS`` binaries over the reduced
   groups (every reference model of the benchmark, GPT-2 XL and a 48-layer Llama included):
   the op-level ILP itself (Note [ILP formulation]) over the groups, in proof phases of
   decreasing gap ``g`` (``_PROOF_GAPS``: 0.99%, then exact), each in the time left:

   - ``g > 0``: the windows of ``target = incumbent / (1 + g)`` and a search for an
     assignment below ``target`` (a cutoff, no primal heuristics). Every assignment below
     ``target`` lies in those windows, so ``min(target, dual bound)`` bounds every
     assignment; a complete search (``"infeasible"``) proves ``target`` itself, i.e. the
     incumbent within ``g``. Any better assignment found becomes the incumbent;
   - ``g = 0``: the windows of the incumbent and the same search below ``incumbent (1 -
     _EXACT_GAP)`` (the solver's relative gap, 1e-4): complete, it proves the incumbent
     optimal at op level, or finds the better assignments, each optimal in its piece.

   Each phase's search runs in pieces on several threads (Note [proof in pieces] in
   ``_pieces.py``): halves of the windows cut at a middle boundary, solved side by side,
   after a first split on the objective's memory term where it weighs at least as much as
   the time term in the incumbent (Note [memory sides], ibid.).
   A phase that runs out of time ends the sequence (a smaller gap would too), and so does
   less time left than the previous phase took. Proving a small gap first is much cheaper
   than proving optimality (the tighter windows and the cutoff prune most of the tree), so
   the time goes first to a bound that certifies the plan within 1%. A 1.97% phase before it
   (as until 2026-12-08) secured 2% on rows whose 1% proof does not fit, but the time it
   took was what the 1% proof then lacked; a 1% phase stopped at the deadline still bounds the
   plan by its finished pieces' target and the open ones' dual bounds (measured:
   ``docs/measurements.md``, "One proof phase before the exact one"). The phases end at
   ``_ILP_SHARE_FLAT`` of the time limit: HiGHS checks its time limit only between steps of
   its root node, and the interrupt callback of :mod:`~modelparallel.partitioner.ilp` stops
   the tree search at the deadline (timings of both: ``docs/measurements.md``);
6. otherwise (thousands of ops): the ILP over coarse units (Note [coarsening]), warm-started
   from the DP over the units' order (both skipped once their share of the time is spent, and
   a refinement round with less than ``_REFINE_MIN`` of the time left of it), then op-level refinement around the boundaries of the
   best assignment so far (Note [refinement]), repeated while it improves; then the windowed
   bound model of :mod:`~modelparallel.partitioner.bounds` in the remaining time;
7. the best of every assignment seen (DP, baselines, refinement, ILPs), by the objective of
   the single evaluation function, so the ILP is never worse than the DP or a baseline.

With ``granularity="module"`` steps 2 to 5 are skipped and step 6 solves at module units only,
with no refinement. The other methods report the analytic bound (Note [lower bound], part 1),
or the ILP's bound when run through :func:`compare`.

Note [layer granularity]
~~~~~~~~~~~~~~~~~~~~~~~~
``granularity="layer"`` is SMP's TensorFlow rule that the ops of one Keras layer stay together
(the TensorFlow front end's default, Note [keras capture] in ``tracer/tf_capture.py``; for torch
graphs, the ops of one leaf ``nn.Module``). The units are each node's innermost module path
(:func:`~modelparallel.ir.module_groups` with ``innermost=True``: a layer's own ops, not its
sublayers'; the root's own ops are single nodes; a layer called twice with other work between is
one unit per call, which ``tied="colocate"`` then keeps on one stage when the calls share a
variable). Unlike ``"module"``, no op-level assignment competes: only the DP over the units'
order and the ILP over the units run (step 6 without refinement), so every assignment returned
keeps every unit whole, by construction; pins that split a unit split it into single ops.


The exact DP (``"dp"``) and the baselines (``"uniform"``, ``"param_balanced"``, Note [layers])
run once each; every runner returns the node-to-stage array and a
:class:`~modelparallel.plan.SolverReport`, and raises
:class:`~modelparallel.errors.InfeasiblePlanError` with the memory that would fit when nothing
does.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(8), PlanConfig(partitions=2), "h100")
    >>> stage, report = run_method(prob, "dp", _Clock(None))
    >>> report.method, report.status, int(stage.max())
    ('dp', 'optimal', 1)
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable

import numpy as np

from modelparallel.errors import ConfigError, InfeasiblePlanError
from modelparallel.partitioner._chain_bound import chain_bound
from modelparallel.partitioner._infeasible import infeasible_error, size_up
from modelparallel.partitioner._pieces import WORKERS, MemorySide, solve_pieces
from modelparallel.partitioner._polish import BackgroundPolish, polish
from modelparallel.partitioner.baselines import param_balanced_split, uniform_split
from modelparallel.partitioner.bounds import window_for
from modelparallel.partitioner.coarsen import Units, auto_depth, make_units, unit_order
from modelparallel.partitioner.cut_descent import descend_cuts
from modelparallel.partitioner.deadline import Deadline
from modelparallel.partitioner.dp import solve_dp, split_to_stages
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.ilp import IlpResult, solve_items
from modelparallel.partitioner.order import warm_orders
from modelparallel.partitioner.problem import Problem
from modelparallel.partitioner.progress import ProgressEvent
from modelparallel.partitioner.reduce import Reduction, reduce_free_nodes
from modelparallel.partitioner.refine import refine_once
from modelparallel.plan import SolverReport

__all__ = ["METHODS", "run_method"]

#: The partitioning methods, ILP first.
METHODS = ("ilp", "dp", "uniform", "param_balanced")

_FLAT_COLUMNS = 4000  # windowed binaries up to which the op-level ILP is solved directly
_ILP_SHARE = 0.55  # share of config.time_limit for the coarse and refinement ILPs
_ILP_SHARE_FLAT = 0.9  # share for the flat op-level ILP (HiGHS may overrun it a little)
_PROOF_GAPS = (0.0099, 0.0)  # gaps the flat ILP proves in turn (the first reports within 1%)
_EXACT_GAP = 1e-4  # the exact phase searches below the incumbent less this (the solver's gap)
_MIN_PHASE = 1.0  # seconds left below which no further proof phase starts
_POLISH_SHARE = 0.05  # share of config.time_limit for refining the DP's split first
_POLISH_ALONGSIDE = 0.15  # the most a polish beside the descents takes (Note [polish alongside])
_ORDERS_SHARE = 0.1  # share of config.time_limit after which no other DP order is tried
_DESCENT_SHARE = 0.15  # share of config.time_limit by which the cut descents end
_DP_SHARE = 0.6  # share of config.time_limit after which the DP starts no further pass
_REFINE_MIN = 0.15  # share of config.time_limit a refinement round needs left to start

Progress = Callable[[ProgressEvent], None]
_Memo = dict[tuple[float, tuple[float, float]], tuple[np.ndarray, np.ndarray]]  # windows by cutoff


class _Clock:
    """Elapsed time, progress events, and the call's :class:`Deadline` (Note [whole-call
    deadline])."""

    def __init__(self, progress: Progress | None, limit: float = float("inf")) -> None:
        self.deadline = Deadline(limit)
        self.t0 = self.deadline.start
        self.progress = progress

    def elapsed(self) -> float:
        return _time.perf_counter() - self.t0

    def emit(self, phase: str, message: str, incumbent: float | None = None,
             bound: float | None = None) -> None:
        if self.progress is None:
            return
        gap = None
        if incumbent is not None and bound is not None and incumbent > 0:
            gap = max(0.0, (incumbent - bound) / incumbent)
        self.progress(ProgressEvent(phase=phase, message=message, incumbent=incumbent,
                                    bound=bound, gap=gap, elapsed=self.elapsed()))


# -- methods ---------------------------------------------------------------------------------------


def _baseline(prob: Problem, method: str) -> tuple[np.ndarray, str]:
    cuts, note = uniform_split(prob) if method == "uniform" else param_balanced_split(prob)
    return split_to_stages(np.arange(prob.n), cuts, prob.n), note


def _run_baseline(prob: Problem, method: str, clock: _Clock) -> tuple[np.ndarray, SolverReport]:
    stage, note = _baseline(prob, method)
    try:
        check_assignment(prob, stage)
    except ConfigError as e:
        raise ConfigError(f"method {method!r} cannot honour the pins or tied='colocate' of "
                          f"this config ({e}); use method='ilp' or 'dp'") from None
    ev = evaluate(prob, stage)
    over = np.nonzero(ev.memory > prob.caps)[0]
    if len(over):
        s = int(over[0])
        need = int(np.ceil(float(ev.memory.max())))
        raise InfeasiblePlanError(
            f"method {method!r}: stage {s} needs {size_up(ev.memory[s])} but its device has "
            f"{size_up(prob.caps[s])}; this split fits with {size_up(need)} ({need} bytes) per "
            "device. Use method='ilp' (which balances memory too) or larger devices.",
            min_memory_bytes=need)
    return stage, SolverReport(method=method, status="feasible", solve_time=clock.elapsed(),
                               notes=(note,))


def _run_dp(prob: Problem, clock: _Clock) -> tuple[np.ndarray, SolverReport]:
    clock.emit("dp", "contiguous split over the topological order")
    res = solve_dp(prob)
    if res is None:
        raise infeasible_error(prob, "method 'dp'")
    clock.emit("dp", f"done in {res.passes} passes", incumbent=res.objective)
    notes = (f"exact over contiguous splits of the topological order ({res.passes} passes)"
             if res.exact else f"stopped after {res.passes} passes; may not be optimal",)
    return res.stage, SolverReport(method="dp", status="optimal" if res.exact else "feasible",
                                   solve_time=clock.elapsed(), notes=notes)


def _expand(units: Units, item_stage: np.ndarray, n: int) -> np.ndarray:
    stage = np.empty(n, dtype=np.int64)
    for u, m in enumerate(units.members):
        stage[m] = item_stage[u]
    return stage


class _Candidates:
    """Every assignment seen, judged by the evaluation function (memory caps enforced)."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        self.items: list[tuple[float, str, np.ndarray]] = []

    def objective(self, stage: np.ndarray) -> float | None:
        """``stage``'s objective, or ``None`` when it is over a device's memory (no candidate)."""
        ev = evaluate(self.prob, stage)
        return ev.objective if np.all(ev.memory <= self.prob.caps) else None

    def consider(self, stage: np.ndarray | None, label: str) -> None:
        if stage is None:
            return
        value = self.objective(stage)
        if value is not None:
            self.items.append((value, label, stage))

    def best(self) -> tuple[float, str, np.ndarray] | None:
        return min(self.items, key=lambda c: c[0]) if self.items else None

    def summary(self) -> str:
        b = self.best()
        assert b is not None
        seen: dict[str, float] = {}
        for o, lab, _ in self.items:
            seen[lab] = min(o, seen.get(lab, np.inf))
        return f"best assignment from {b[1]}; candidates: " + ", ".join(
            f"{lab} {o:.4f}" for lab, o in sorted(seen.items(), key=lambda kv: kv[1]))


def _run_ilp(prob: Problem, clock: _Clock) -> tuple[np.ndarray, SolverReport]:
    cfg = prob.config
    cands = _Candidates(prob)
    if cfg.granularity == "layer":  # Note [layer granularity]: no op-level candidates
        units = make_units(prob, 0, contract=False, innermost=True)
        return _units_then_refine(prob, clock, cands, units, refine=False)
    clock.emit("dp", "contiguous split over the topological order")
    dp = solve_dp(prob, deadline=clock.deadline.at(_DP_SHARE))  # Note [whole-call deadline]
    splits: list[tuple[float, str, np.ndarray, np.ndarray]] = []  # objective, label, order, stage
    if dp is not None:
        cands.consider(dp.stage, "dp")
        splits.append((dp.objective, "dp", np.arange(prob.n), dp.stage))
        clock.emit("dp", f"done in {dp.passes} passes", incumbent=dp.objective)
    for label, order in _warm_orders(prob).items():  # Note [canonical order]
        if clock.elapsed() > _ORDERS_SHARE * cfg.time_limit:
            break
        other = solve_dp(prob, order=order)
        if other is not None:
            cands.consider(other.stage, f"dp-{label}")
            splits.append((other.objective, f"dp-{label}", order, other.stage))
    splits.sort(key=lambda split: split[0])  # the best first
    job: BackgroundPolish | None = None
    for _, label, order, stage in splits:  # Note [cut descent]
        left = _DESCENT_SHARE * cfg.time_limit - clock.elapsed()
        if left <= 0:
            break
        cands.consider(descend_cuts(prob, order, stage, deadline=left), f"{label}-descent")
        if job is None and WORKERS > 1 and cfg.granularity != "module" and len(splits) > 1:
            job = _polish_alongside(prob, clock, cands)  # Note [polish alongside]
    for method in ("uniform", "param_balanced"):
        try:
            stage, _ = _baseline(prob, method)
            check_assignment(prob, stage)
            cands.consider(stage, method)
        except ConfigError:
            pass
    if cfg.granularity == "module":
        depth = cfg.module_depth or auto_depth(prob)
        units = make_units(prob, depth, contract=False)
        return _units_then_refine(prob, clock, cands, units, refine=False)
    # Windows: where each node can be in any assignment better than the incumbent.
    red = reduce_free_nodes(prob)
    inc = cands.best()
    lo, hi = red.units.lo.copy(), red.units.hi.copy()
    memo: _Memo = {}
    if inc is not None:
        _polish_first(prob, clock, cands, inc[2], job,
                      meanwhile=lambda: _prefetch(prob, cands, red, memo))
        inc = cands.best()
        assert inc is not None
        cands.consider(red.follow(inc[2]), inc[1])  # no worse (Note [exact reduction])
        inc = cands.best()
        assert inc is not None
        lo, hi = _unit_windows(prob, red, inc[0], memo=memo)
        if np.any(lo > hi):
            report = SolverReport(
                method="ilp", solver="", status="optimal", lower_bound=inc[0],
                solve_time=clock.elapsed(), notes=(
                    cands.summary(), "no assignment can beat it: some node has no stage left "
                    "in the windows of Note [lower bound]"))
            return inc[2], report
    size = int((hi - lo).sum())
    if size <= _FLAT_COLUMNS:
        return _flat(prob, clock, cands, red, memo)
    return _units_then_refine(prob, clock, cands, make_units(prob, auto_depth(prob)), refine=True)


def _warm_orders(prob: Problem) -> dict[str, np.ndarray]:
    """Other topological orders for the DP's first incumbents (Note [canonical order]): the
    graph's own listing (when it differs from the canonical order), the light-branch-first
    search and the later readers of shared parameters moved up to their first reader."""
    out: dict[str, np.ndarray] = {}
    listed = np.array([prob.index[nd.name] for nd in prob.graph.nodes if nd.name in prob.index],
                      dtype=np.int64)
    if np.any(listed != np.arange(prob.n)):
        out["listed"] = listed
    tied = [] if prob.config.tied == "colocate" else [  # colocated readers share a hull
        q.readers for q in sorted(prob.shared, key=lambda q: -float(np.max(q.state)))]
    for label, order in warm_orders(prob.producers, prob.time.min(axis=1), names=prob.names,
                                    colocate=prob.colocate, tied=tied).items():
        if np.any(order != np.arange(prob.n)) and not any(
                np.array_equal(order, o) for o in out.values()):
            out[label] = order
    return out


def _polish_alongside(prob: Problem, clock: _Clock, cands: _Candidates) -> BackgroundPolish:
    """Start polishing the best assignment so far on a thread (Note [polish alongside] in
    ``_polish.py``): for at most ``_POLISH_ALONGSIDE`` of the time, and not beyond the descents'
    and the polish's shares."""
    best = cands.best()
    assert best is not None
    limit = max(0.05, min(_POLISH_ALONGSIDE * prob.config.time_limit,
                          (_DESCENT_SHARE + _POLISH_SHARE) * prob.config.time_limit
                          - clock.elapsed()))
    return BackgroundPolish(prob, best[2], time_limit=limit)


def _polish_first(prob: Problem, clock: _Clock, cands: _Candidates, stage: np.ndarray,
                  job: BackgroundPolish | None, meanwhile: Callable[[], None]) -> None:
    """Step 2 of Note [ILP pipeline]: the polish of ``stage`` (the best assignment after the
    descents), or the end of the one running since the first descent, within ``_POLISH_SHARE``
    of the time from now, after ``meanwhile()`` ran beside it; then, if a later descent's
    assignment beats both that polish's start and its result, that assignment's own polish
    with the same share."""
    share = _POLISH_SHARE * prob.config.time_limit
    t0 = clock.elapsed()
    if job is not None:
        meanwhile()
        found = job.finish(within=share - (clock.elapsed() - t0))
        cands.consider(found, "refined")
        best = cands.best()
        assert best is not None
        clock.emit("refine", "polished beside the descents", incumbent=best[0])
        if best[1] == "refined" or np.array_equal(best[2], job.stage):
            return
        stage, t0 = best[2], clock.elapsed()  # a later descent beat both: its own polish
    new = polish(prob, stage, time_limit=share - (clock.elapsed() - t0), progress=clock.progress)
    cands.consider(new, "refined")


def _prefetch(prob: Problem, cands: _Candidates, red: Reduction, memo: _Memo) -> None:
    """While the polish runs (Note [polish alongside] in ``_polish.py``): the windows of the
    reduced incumbent (Note [exact reduction]) and of the first proof phase's target, which
    stand unless the polish finds a better assignment. The reduced incumbent itself joins the
    candidates after the polish, as without it."""
    inc = cands.best()
    assert inc is not None
    followed = cands.objective(red.follow(inc[2]))
    value = inc[0] if followed is None else min(inc[0], followed)
    for cutoff in (value, value / (1 + _PROOF_GAPS[0])):
        _unit_windows(prob, red, cutoff, memo=memo)


def _unit_windows(prob: Problem, red: Reduction, cutoff: float,
                  memory: tuple[float, float] = (0.0, np.inf), *,
                  memo: _Memo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage ranges of the reduction's groups in assignments better than ``cutoff`` (whose
    memory term lies in ``memory``), kept in ``memo`` by their arguments."""
    key = (cutoff, memory)
    if memo is not None and key in memo:
        return memo[key]
    w_lo, w_hi = window_for(prob, cutoff, memory)
    members = red.units.members
    lo = np.maximum(red.units.lo, [int(w_lo[m].max()) for m in members])
    hi = np.minimum(red.units.hi, [int(w_hi[m].min()) for m in members])
    out = lo.astype(np.int64), hi.astype(np.int64)
    if memo is not None:
        memo[key] = out
    return out


class _Proof:
    """The best proven lower bound so far, and what the ILP solves said."""

    def __init__(self) -> None:
        self.bound: float | None = None
        self.notes: list[str] = []
        self.largest: IlpResult | None = None
        self.optimal = False
        self.solver = ""

    def prove(self, value: float, note: str) -> None:
        if self.bound is None or value > self.bound:
            self.bound = value
        self.notes.append(note)

    def ran(self, res: IlpResult) -> None:
        self.notes.extend(res.notes)
        if self.largest is None or res.num_variables > self.largest.num_variables:
            self.largest = res


def _flat(prob: Problem, clock: _Clock, cands: _Candidates, red: Reduction,
          memo: _Memo) -> tuple[np.ndarray, SolverReport]:
    """The op-level ILP over the reduction's groups within stage windows (Note [ILP
    pipeline]): proofs of ever smaller gaps, the last one exact."""
    cfg = prob.config
    units = red.units
    end = _ILP_SHARE_FLAT * cfg.time_limit
    proof = _Proof()
    chain_bound(prob)  # kept for the plan's bound: computed here, inside the phases' time
    clock.emit("coarsen", f"op level: {prob.n} nodes in {len(units)} groups (Note [exact "
               "reduction])")
    took = 0.0  # seconds the last proof phase took: a smaller gap takes longer
    for gap in _PROOF_GAPS if cands.best() is not None else (0.0,):
        best = cands.best()
        if best is not None and proof.bound is not None and proof.bound >= best[0] / (1 + gap):
            continue  # already proven
        if best is not None and _left(clock, end) < max(_MIN_PHASE, took):
            break
        start = clock.elapsed()
        if not _prove(prob, clock, cands, red, proof, gap, end, memo):
            break  # that proof ran out of time: a stronger one would too
        took = clock.elapsed() - start
    best = cands.best()
    if best is None:
        raise infeasible_error(prob, "method 'ilp'")
    clock.emit("ilp", "done at op level", incumbent=best[0], bound=proof.bound)
    largest = proof.largest
    report = SolverReport(method="ilp", solver=proof.solver,
                          status="optimal" if proof.optimal else "feasible",
                          lower_bound=proof.bound, solve_time=clock.elapsed(), coarse_nodes=0,
                          refined=False,
                          num_variables=0 if largest is None else largest.num_variables,
                          num_constraints=0 if largest is None else largest.num_constraints,
                          notes=(cands.summary(), *proof.notes))
    return best[2], report


def _prove(prob: Problem, clock: _Clock, cands: _Candidates, red: Reduction, proof: _Proof,
           gap: float, end: float, memo: _Memo) -> bool:
    """One proof phase: nothing better than ``best / (1 + gap)`` exists (``gap > 0``), or the
    exact optimum (``gap == 0``: nothing better than the best less the solver's gap), each a
    search with that cutoff, in pieces (Note [proof in pieces] in ``_pieces.py``). Returns
    whether the phase completed."""
    cfg = prob.config
    units = red.units
    best = cands.best()
    if best is None:
        return _prove_whole(prob, clock, cands, red, proof, end)
    exact = gap == 0
    target = best[0] * (1 - _EXACT_GAP) if exact else best[0] / (1 + gap)
    lo, hi = _unit_windows(prob, red, best[0] if exact else target, memo=memo)
    if np.any(lo > hi):
        proof.prove(target, f"no assignment beats {target:.4f}: a node has no stage left "
                    "in its window")
        proof.optimal = proof.optimal or exact
        return True
    what = "exact" if exact else f"within {100 * gap:.3g}%"
    clock.emit("ilp", f"proving {what}: {int((hi - lo).sum())} binaries within the stage "
               "windows", incumbent=best[0], bound=proof.bound)

    def report(started: int, res: IlpResult) -> None:
        if started > 1:
            clock.emit("ilp", f"a piece ({started} started): {res.status} in {res.seconds:.1f} s",
                       incumbent=best[0], bound=proof.bound)

    out = solve_pieces(prob, units.members, lo, hi, target=target, gap_rel=max(gap, 1e-4),
                       time_limit=max(0.5, _left(clock, end)), solver=cfg.solver,
                       report=report, sides=_memory_sides(prob, red, best[2], gap,
                                                          best[0] if exact else target))
    for res in out.results:
        proof.solver = res.solver
        proof.ran(res)
    for item_stage in out.found:
        cands.consider(_expand(units, item_stage, prob.n), "ilp-flat")
    pieces = f", {out.pieces} pieces" if out.pieces > 1 else ""
    if out.complete and not out.found:
        proof.prove(target * (1 - 1e-6), f"op-level ILP ({what}): no assignment below "
                    f"{target:.4f} (complete search of its windows{pieces})")
    elif out.bound is not None:
        state = "complete" if out.complete else "stopped"
        proof.prove(out.bound * (1 - 1e-6), (
            f"op-level ILP ({what}) over the windows of {target:.4f}{pieces}: {state}, dual "
            f"bound {out.bound:.4f} for every assignment below that"))
    if exact and out.complete:
        proof.optimal = True
    return out.complete


def _memory_sides(prob: Problem, red: Reduction, stage: np.ndarray, gap: float,
                  cutoff: float) -> list[MemorySide]:
    """The two memory sides of a proof phase (Note [memory sides] in ``_pieces.py``): none
    unless the memory term of the incumbent ``stage`` weighs at least as much as its time
    term."""
    if prob.w <= 0 or prob.p < 2:
        return []
    ev = evaluate(prob, stage)
    if ev.memory_term < ev.time_term:
        return []
    split = ev.memory_term / (1 + max(gap, _EXACT_GAP))
    return [MemorySide(m, *_unit_windows(prob, red, cutoff, m))
            for m in ((0.0, split), (split, np.inf))]


def _prove_whole(prob: Problem, clock: _Clock, cands: _Candidates, red: Reduction,
                 proof: _Proof, end: float) -> bool:
    """No incumbent: the ILP over the groups' whole ranges, to optimality."""
    cfg = prob.config
    units = red.units
    clock.emit("ilp", f"solving exactly: {int((units.hi - units.lo).sum())} binaries, no "
               "incumbent")
    res = solve_items(prob, units.members, units.lo, units.hi,
                      time_limit=max(0.5, _left(clock, end)), solver=cfg.solver,
                      progress=clock.progress, phase="ilp")
    proof.solver = res.solver
    proof.ran(res)
    if res.item_stage is not None:
        cands.consider(_expand(units, res.item_stage, prob.n), "ilp-flat")
    if res.bound is not None:
        proof.prove(float(res.bound) * (1 - 1e-6), f"op-level ILP (exact): {res.status}, dual "
                    f"bound {res.bound:.4f}")
    done = res.status in ("optimal", "infeasible")
    proof.optimal = proof.optimal or (done and res.item_stage is not None)
    return done


def _left(clock: _Clock, end: float) -> float:
    return max(0.0, end - clock.elapsed())


def _units_then_refine(prob: Problem, clock: _Clock, cands: _Candidates, units: Units, *,
                       refine: bool) -> tuple[np.ndarray, SolverReport]:
    """Coarse ILP over units, then op-level refinement near the boundaries."""
    cfg = prob.config
    budget = cfg.time_limit * _ILP_SHARE  # the rest is for the lower bound
    notes: list[str] = []
    clock.emit("coarsen", f"{len(units)} units (module depth {units.depth}) from {prob.n} nodes")
    share = 1.0 if not refine else 0.45
    # With an op-level incumbent, the coarse ILP is optional: skipped once its share of the
    # time is spent (Note [whole-call deadline]); otherwise it runs at least half a second.
    coarse = clock.deadline.budget(share * _ILP_SHARE, minimum=_MIN_PHASE) if (
        refine and cands.best() is not None) else max(0.5, share * budget - clock.elapsed())
    res: IlpResult | None = None
    if coarse is not None:
        # Warm start: the DP over the units' order (cuts only between units).
        order, allowed = unit_order(prob, units)
        udp = solve_dp(prob, order=order, allowed_cuts=allowed,
                       deadline=clock.deadline.at(share * _ILP_SHARE))
        warm = None
        if udp is not None:
            cands.consider(udp.stage, "dp-units")
            warm = np.array([int(udp.stage[m[0]]) for m in units.members])
        limit = max(0.5, share * budget - clock.elapsed())
        res = solve_items(prob, units.members, units.lo, units.hi, warm=warm, time_limit=limit,
                          solver=cfg.solver, progress=clock.progress, phase="ilp")
        notes.extend(res.notes)
        if res.item_stage is not None:
            cands.consider(_expand(units, res.item_stage, prob.n), "ilp-units")
    else:
        notes.append(f"coarse ILP over {len(units)} units skipped: its share of the time "
                     "limit was spent (Note [whole-call deadline])")
    largest = res
    best = cands.best()
    if best is None:
        raise infeasible_error(prob, "method 'ilp'")
    clock.emit("ilp", f"{'skipped' if res is None else res.status} over {len(units)} units",
               incumbent=best[0])
    refined = False
    if refine:
        window, rounds = 1, 0
        # A round builds its model before any solver time limit applies (seconds on 10,000
        # ops): none starts with less than _REFINE_MIN of the time limit left of the share.
        while rounds < 4 and clock.deadline.budget(
                _ILP_SHARE, minimum=max(_MIN_PHASE, _REFINE_MIN * cfg.time_limit)) is not None:
            rounds += 1
            current = cands.best()
            assert current is not None
            limit = max(0.5, budget - clock.elapsed())
            new, rres = refine_once(prob, units, current[2], window=window, time_limit=limit,
                                    solver=cfg.solver, progress=clock.progress)
            refined = True
            notes.extend(rres.notes)
            if largest is None or rres.num_variables > largest.num_variables:
                largest = rres
            cands.consider(new, "refined")
            now = cands.best()
            assert now is not None
            clock.emit("refine", f"round {rounds}: {rres.status}, {rres.num_variables} "
                       "variables", incumbent=now[0])
            if now[0] >= current[0] * (1 - 1e-9):
                if window >= 2:
                    break
                window += 1  # nothing moved: widen the window once
    best = cands.best()
    assert best is not None
    report = SolverReport(method="ilp", solver="" if largest is None else largest.solver,
                          status="feasible", solve_time=clock.elapsed(),
                          coarse_nodes=len(units), refined=refined,
                          num_variables=0 if largest is None else largest.num_variables,
                          num_constraints=0 if largest is None else largest.num_constraints,
                          notes=(cands.summary(), *notes))
    return best[2], report


def run_method(prob: Problem, method: str, clock: _Clock) -> tuple[np.ndarray, SolverReport]:
    """Run one of :data:`METHODS` on ``prob``: the node-to-stage array and the solver report."""
    if method == "ilp":
        return _run_ilp(prob, clock)
    if method == "dp":
        return _run_dp(prob, clock)
    return _run_baseline(prob, method, clock)
