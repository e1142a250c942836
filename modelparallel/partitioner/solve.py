"""The partitioner's entry points: :func:`partition`, :func:`compare`, :func:`evaluate_assignment`.

Note [ILP pipeline]
~~~~~~~~~~~~~~~~~~~
``method="ilp"`` runs, within ``config.time_limit`` seconds in all:

1. the exact contiguous DP at op level (:mod:`~modelparallel.partitioner.dp`) and the two
   baselines: incumbents, and the warm start of what follows;
2. stage windows from the best incumbent (Note [lower bound], part 2): the stages each node
   can take in any strictly better assignment. If some node has none, the incumbent is optimal;
3. if the windows leave at most ``_FLAT_COLUMNS`` binaries (every reference model of the
   benchmark): the op-level ILP itself (Note [ILP formulation]) restricted to the windows,
   warm-started from the incumbent. Its dual bound bounds every better assignment, so
   ``min(incumbent, dual bound)`` is a proven bound of the whole problem, and ``"optimal"``
   means proven optimal at op level;
4. otherwise (thousands of ops): the ILP over coarse units (Note [coarsening]), warm-started
   from the DP over the units' order, then op-level refinement around the boundaries of the
   best assignment so far (Note [refinement]), repeated while it improves; then the windowed
   bound model of :mod:`~modelparallel.partitioner.bounds` in the remaining time;
5. the best of every assignment seen (DP, baselines, ILPs), by the objective of the single
   evaluation function, so the ILP is never worse than the DP or a baseline.

With ``granularity="module"`` step 3 is skipped and step 4 solves at module units only, with
no refinement. The other methods report the analytic bound (Note [lower bound], part 1), or
the ILP's bound when run through :func:`compare`.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.plan import PlanConfig
    >>> plan = partition(transformer_graph(4), PlanConfig(partitions=2, time_limit=5), "h100")
    >>> plan.solver.method, plan.partitions, plan.solver.objective >= plan.solver.lower_bound
    ('ilp', 2, True)
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from modelparallel.cost_model import GraphCosts
from modelparallel.errors import ConfigError, InfeasiblePlanError
from modelparallel.ir import Graph
from modelparallel.partitioner.baselines import param_balanced_split, uniform_split
from modelparallel.partitioner.bounds import lower_bound, window_for
from modelparallel.partitioner.coarsen import (
    Units,
    auto_depth,
    make_units,
    singletons,
    unit_order,
)
from modelparallel.partitioner.dp import solve_dp, split_to_stages
from modelparallel.partitioner.evaluate import (
    assignment_array,
    check_assignment,
    evaluate,
    make_plan,
)
from modelparallel.partitioner.ilp import solve_items
from modelparallel.partitioner.problem import DevicesArg, Problem, build_problem
from modelparallel.partitioner.progress import ProgressEvent
from modelparallel.partitioner.refine import refine_once
from modelparallel.plan import Plan, PlanConfig, SolverReport

__all__ = ["METHODS", "compare", "evaluate_assignment", "partition"]

#: The partitioning methods, ILP first.
METHODS = ("ilp", "dp", "uniform", "param_balanced")

_FLAT_COLUMNS = 4000  # windowed binaries up to which the op-level ILP is solved directly
_ILP_SHARE = 0.55  # share of config.time_limit for the coarse and refinement ILPs
_ILP_SHARE_FLAT = 0.85  # share for the flat op-level ILP (its dual bound is the lower bound)
_GiB = 2**30

Progress = Callable[[ProgressEvent], None]


class _Clock:
    def __init__(self, progress: Progress | None) -> None:
        self.t0 = _time.perf_counter()
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


# -- infeasibility ---------------------------------------------------------------------------------


def _min_memory(prob: Problem) -> int | None:
    """Smallest memory per device for which a contiguous split exists (every device alike)."""
    big = float(prob.caps.sum()) * 1e6 + 1.0
    relaxed = replace(prob, caps=np.full(prob.p, big), config=prob.config)
    relaxed_w = replace(relaxed, config=replace(prob.config, memory_weight=1.0))
    res = solve_dp(relaxed_w)
    if res is None:
        return None
    ev = evaluate(relaxed_w, res.stage)
    return int(np.ceil(float(ev.memory.max()) * (1 + 1e-9))) + 1


def _infeasible(prob: Problem, what: str) -> InfeasiblePlanError:
    need = _min_memory(prob)
    caps = sorted({int(c) for c in prob.caps})
    have = ", ".join(f"{c / _GiB:.2f} GiB" for c in caps)
    lb = lower_bound(prob, incumbent=None)
    if need is None or need <= prob.caps.min():
        msg = (f"{what}: no assignment found that satisfies the pins and the pipeline order on "
               f"{prob.p} stages (no contiguous split of the topological order does, and the "
               f"ILP found none in {prob.config.time_limit:g} s); change or remove the pins, "
               "or raise time_limit")
        return InfeasiblePlanError(msg)
    msg = (f"{what}: no assignment of {prob.graph.name!r} to {prob.p} stages fits in device "
           f"memory ({have}). A plan exists with {need / _GiB:.2f} GiB on every device "
           f"({need} bytes; the contiguous split minimising the largest stage), and none can "
           f"fit below {lb.min_memory_bytes / _GiB:.2f} GiB. Use devices with at least "
           f"{need / _GiB:.2f} GiB, more partitions, schedule='1f1b' (fewer microbatches in "
           "flight than 'gpipe'), or a lighter optimizer.")
    return InfeasiblePlanError(msg, min_memory_bytes=need)


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
            f"method {method!r}: stage {s} needs {ev.memory[s] / _GiB:.2f} GiB but its device "
            f"has {prob.caps[s] / _GiB:.2f} GiB; this split fits with {need / _GiB:.2f} GiB "
            "per device. Use method='ilp' (which balances memory too) or larger devices.",
            min_memory_bytes=need)
    return stage, SolverReport(method=method, status="feasible", solve_time=clock.elapsed(),
                               notes=(note,))


def _run_dp(prob: Problem, clock: _Clock) -> tuple[np.ndarray, SolverReport]:
    clock.emit("dp", "contiguous split over the topological order")
    res = solve_dp(prob)
    if res is None:
        raise _infeasible(prob, "method 'dp'")
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

    def consider(self, stage: np.ndarray | None, label: str) -> None:
        if stage is None:
            return
        ev = evaluate(self.prob, stage)
        if np.all(ev.memory <= self.prob.caps):
            self.items.append((ev.objective, label, stage))

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
    clock.emit("dp", "contiguous split over the topological order")
    dp = solve_dp(prob)
    if dp is not None:
        cands.consider(dp.stage, "dp")
        clock.emit("dp", f"done in {dp.passes} passes", incumbent=dp.objective)
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
    inc = cands.best()
    lo, hi = prob.lo.copy(), prob.hi.copy()
    cutoff = np.inf
    if inc is not None:
        cutoff = inc[0]
        w_lo, w_hi = window_for(prob, cutoff)
        lo, hi = np.maximum(lo, w_lo), np.minimum(hi, w_hi)
        if np.any(lo > hi):
            report = SolverReport(
                method="ilp", solver="", status="optimal", lower_bound=cutoff,
                solve_time=clock.elapsed(), notes=(
                    cands.summary(), "no assignment can beat it: some node has no stage left "
                    "in the windows of Note [lower bound]"))
            return inc[2], report
    size = int((hi - lo).sum())
    if size <= _FLAT_COLUMNS:
        return _flat(prob, clock, cands, lo, hi, cutoff)
    return _units_then_refine(prob, clock, cands, make_units(prob, auto_depth(prob)), refine=True)


def _flat(prob: Problem, clock: _Clock, cands: _Candidates, lo: np.ndarray, hi: np.ndarray,
          cutoff: float) -> tuple[np.ndarray, SolverReport]:
    """The op-level ILP restricted to the stage windows (Note [ILP pipeline])."""
    cfg = prob.config
    units = singletons(prob)
    inc = cands.best()
    clock.emit("coarsen", f"op level: {prob.n} nodes, {int((hi - lo).sum())} binaries within "
               "the stage windows")
    limit = max(0.5, _ILP_SHARE_FLAT * cfg.time_limit - clock.elapsed())
    res = solve_items(prob, units.members, lo, hi, warm=None if inc is None else inc[2],
                      time_limit=limit, solver=cfg.solver, progress=clock.progress, phase="ilp")
    cands.consider(res.item_stage, "ilp-flat")
    best = cands.best()
    if best is None:
        raise _infeasible(prob, "method 'ilp'")
    clock.emit("ilp", f"{res.status} at op level", incumbent=best[0], bound=res.bound)
    bound = None
    if res.bound is not None:
        bound = min(cutoff, float(res.bound) * (1 - 1e-6))
    elif res.status == "infeasible" and np.isfinite(cutoff):
        bound = cutoff  # nothing within the windows: the incumbent is optimal
    optimal = (res.status in ("optimal", "infeasible") and np.isfinite(cutoff)) or \
        res.status == "optimal"
    notes = [cands.summary(), *res.notes]
    if np.isfinite(cutoff):
        notes.append(f"op-level ILP over stage windows from the incumbent {cutoff:.4f}; its "
                     "dual bound bounds every better assignment")
    report = SolverReport(method="ilp", solver=res.solver,
                          status="optimal" if optimal else "feasible", lower_bound=bound,
                          solve_time=clock.elapsed(), coarse_nodes=0, refined=False,
                          num_variables=res.num_variables, num_constraints=res.num_constraints,
                          notes=tuple(notes))
    return best[2], report


def _units_then_refine(prob: Problem, clock: _Clock, cands: _Candidates, units: Units, *,
                       refine: bool) -> tuple[np.ndarray, SolverReport]:
    """Coarse ILP over units, then op-level refinement near the boundaries."""
    cfg = prob.config
    budget = cfg.time_limit * _ILP_SHARE  # the rest is for the lower bound
    notes: list[str] = []
    clock.emit("coarsen", f"{len(units)} units (module depth {units.depth}) from {prob.n} nodes")
    # Warm start: the DP over the units' order (cuts only between units).
    order, allowed = unit_order(prob, units)
    udp = solve_dp(prob, order=order, allowed_cuts=allowed)
    warm = None
    if udp is not None:
        cands.consider(udp.stage, "dp-units")
        warm = np.array([int(udp.stage[m[0]]) for m in units.members])
    share = 1.0 if not refine else 0.45
    limit = max(0.5, share * budget - clock.elapsed())
    res = solve_items(prob, units.members, units.lo, units.hi, warm=warm, time_limit=limit,
                      solver=cfg.solver, progress=clock.progress, phase="ilp")
    notes.extend(res.notes)
    largest = res
    if res.item_stage is not None:
        cands.consider(_expand(units, res.item_stage, prob.n), "ilp-units")
    best = cands.best()
    if best is None:
        raise _infeasible(prob, "method 'ilp'")
    clock.emit("ilp", f"{res.status} over {len(units)} units", incumbent=best[0])
    refined = False
    if refine:
        window, rounds = 1, 0
        while clock.elapsed() < 0.95 * budget and rounds < 4:
            rounds += 1
            current = cands.best()
            assert current is not None
            limit = max(0.5, budget - clock.elapsed())
            new, rres = refine_once(prob, units, current[2], window=window, time_limit=limit,
                                    solver=cfg.solver, progress=clock.progress)
            refined = True
            notes.extend(rres.notes)
            if rres.num_variables > largest.num_variables:
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
    report = SolverReport(method="ilp", solver=res.solver, status="feasible",
                          solve_time=clock.elapsed(), coarse_nodes=len(units),
                          refined=refined, num_variables=largest.num_variables,
                          num_constraints=largest.num_constraints,
                          notes=(cands.summary(), *notes))
    return best[2], report


# -- public API ------------------------------------------------------------------------------------


def _finish(prob: Problem, stage: np.ndarray, report: SolverReport, clock: _Clock,
            samples_per_microbatch: int, *, search: bool,
            known_bound: float | None = None) -> Plan:
    """Evaluate, attach the lower bound and make the plan.

    ``search``: also run the windowed bound model of Note [lower bound] (the ILP method, when
    its own op-level ILP gave no dual bound); otherwise the analytic bound, the report's bound
    and ``known_bound`` (another method's proven bound for the same problem) are used.
    """
    check_assignment(prob, stage)
    ev = evaluate(prob, stage)
    clock.emit("bound", "proving a lower bound", incumbent=ev.objective)
    lb = lower_bound(prob, incumbent=ev.objective if search else None,
                     incumbent_stage=stage if search else None,
                     time_limit=0.97 * prob.config.time_limit - clock.elapsed())
    value = lb.value
    notes = [*report.notes, f"lower bound: {lb.describe()}"]
    if report.lower_bound is not None and report.lower_bound > value:
        value = report.lower_bound
        notes.append(f"the op-level ILP's dual bound {value:.4f} is the bound reported")
    if known_bound is not None and known_bound > value:
        value = known_bound
        notes.append(f"the ILP method's proven bound {value:.4f} is the bound reported")
    value = min(value, ev.objective)
    report = replace(report, lower_bound=value, solve_time=clock.elapsed(), notes=tuple(notes))
    clock.emit("bound", "done", incumbent=ev.objective, bound=value)
    return make_plan(prob, ev, report, samples_per_microbatch=samples_per_microbatch)


def partition(graph: Graph, config: PlanConfig, devices: DevicesArg, *, method: str = "ilp",
              costs: Sequence[GraphCosts] | None = None, samples_per_microbatch: int = 1,
              progress: Progress | None = None) -> Plan:
    """Assign every node of ``graph`` to a pipeline stage and estimate the result.

    Args:
        graph: The op-level IR graph (e.g. ``modelparallel.tracer.trace(...).graph``).
        config: Partitions, microbatches, schedule, memory weight, pins, solver and time limit.
        devices: One device for every stage, or one per stage (heterogeneous: each stage's speed
            and memory): a :class:`~modelparallel.cost_model.DeviceSpec`, a built-in name such as
            ``"h100"``, or a spec JSON path.
        method: ``"ilp"`` (Note [ILP pipeline]), ``"dp"`` (best contiguous split), or the
            baselines ``"uniform"`` and ``"param_balanced"`` (Note [layers]).
        costs: One :class:`~modelparallel.cost_model.GraphCosts` per stage; default
            ``estimate_costs(graph, device, optimizer=config.optimizer)``.
        samples_per_microbatch: Batch size of one microbatch, for the throughput estimate.
        progress: Called with :class:`ProgressEvent` values while the partitioner works.

    Returns:
        The plan, with estimates from the single evaluation function and a solver report
        (objective of Note [objective], proven lower bound, gap).

    Raises:
        ConfigError: for an unknown method, bad devices/costs or pins matching nothing.
        InfeasiblePlanError: if nothing fits in memory (``min_memory_bytes`` says what would)
            or the pins contradict the pipeline order.
        SolverError: if no ILP solver could run.

    Example:
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> plan = partition(chain_graph(8), PlanConfig(partitions=2), "h100", method="dp")
        >>> [len(plan.stage_nodes(s)) for s in range(2)]
        [4, 5]
    """
    return _partition(graph, config, devices, method=method, costs=costs,
                      samples_per_microbatch=samples_per_microbatch, progress=progress)


def _partition(graph: Graph, config: PlanConfig, devices: DevicesArg, *, method: str,
               costs: Sequence[GraphCosts] | None, samples_per_microbatch: int,
               progress: Progress | None, known_bound: float | None = None) -> Plan:
    if method not in METHODS:
        raise ConfigError(f"method = {method!r}; use one of {list(METHODS)}")
    if samples_per_microbatch < 1:
        raise ConfigError(f"samples_per_microbatch = {samples_per_microbatch} must be >= 1")
    clock = _Clock(progress)
    prob = build_problem(graph, config, devices, costs=costs)
    if method == "ilp":
        stage, report = _run_ilp(prob, clock)
    elif method == "dp":
        stage, report = _run_dp(prob, clock)
    else:
        stage, report = _run_baseline(prob, method, clock)
    report = replace(report, notes=(*prob.notes, *report.notes))
    return _finish(prob, stage, report, clock, samples_per_microbatch,
                   search=method == "ilp" and report.lower_bound is None,
                   known_bound=known_bound)


def compare(graph: Graph, config: PlanConfig, devices: DevicesArg, *,
            methods: Sequence[str] = METHODS, costs: Sequence[GraphCosts] | None = None,
            samples_per_microbatch: int = 1, progress: Progress | None = None
            ) -> dict[str, Plan]:
    """Run every method on the same graph and cost model.

    The ILP runs first; the other plans report its proven lower bound (the bound is a property
    of the problem, not of the method). Baselines that cannot produce a plan (over memory, or
    unable to honour pins) are left out of the result; ``partition`` with that method raises
    the reason.

    Example:
        >>> from modelparallel.partitioner._synthetic import transformer_graph
        >>> plans = compare(transformer_graph(4), PlanConfig(partitions=2, time_limit=5), "h100")
        >>> sorted(plans)
        ['dp', 'ilp', 'param_balanced', 'uniform']
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; use some of {list(METHODS)}")
    out: dict[str, Plan] = {}
    bound: float | None = None
    for m in sorted(methods, key=lambda m: m != "ilp"):
        try:
            out[m] = _partition(graph, config, devices, method=m, costs=costs,
                                samples_per_microbatch=samples_per_microbatch,
                                progress=progress, known_bound=bound)
        except (InfeasiblePlanError, ConfigError) as e:
            if m in ("ilp", "dp") or ("cannot honour" not in str(e) and not isinstance(
                    e, InfeasiblePlanError)):
                raise
            continue
        if m == "ilp":
            bound = out[m].solver.lower_bound
    return {m: out[m] for m in methods if m in out}


def evaluate_assignment(graph: Graph, config: PlanConfig, devices: DevicesArg,
                        assignment: Mapping[str, int], *,
                        costs: Sequence[GraphCosts] | None = None,
                        samples_per_microbatch: int = 1) -> Plan:
    """The plan of a given placement (method ``"manual"``), with the same estimates.

    Input-derived nodes may be omitted (they get stage ``-1``). The placement must respect the
    pipeline order, pins and colocation; it may exceed device memory (a solver note says so).

    Raises:
        ConfigError: if the placement misses a node, names an unknown one, or breaks a rule.

    Example:
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> g = chain_graph(2)
        >>> plan = evaluate_assignment(g, PlanConfig(partitions=2), "h100",
        ...                            {"fc0": 0, "fc1": 1, "output": 1})
        >>> plan.boundaries[0].values
        ('fc0',)
    """
    clock = _Clock(None)
    prob = build_problem(graph, config, devices, costs=costs)
    stage = assignment_array(prob, assignment)
    check_assignment(prob, stage)
    ev = evaluate(prob, stage)
    notes = list(prob.notes)
    for s in np.nonzero(ev.memory > prob.caps)[0]:
        notes.append(f"stage {int(s)} needs {ev.memory[s] / _GiB:.2f} GiB, over its device's "
                     f"{prob.caps[s] / _GiB:.2f} GiB")
    report = SolverReport(method="manual", status="feasible", notes=tuple(notes))
    return _finish(prob, stage, report, clock, samples_per_microbatch, search=False)
