"""The partitioner's entry points: :func:`partition`, :func:`compare`, :func:`evaluate_assignment`.

Each builds the :class:`~modelparallel.partitioner.problem.Problem`, runs a method
(:mod:`~modelparallel.partitioner.methods`: the ILP of Note [ILP pipeline], the exact DP, the
baselines), then evaluates the assignment with the single evaluation function, attaches the
proven lower bound (Note [lower bound]) and makes the :class:`~modelparallel.plan.Plan`.

Note [status and gap]
~~~~~~~~~~~~~~~~~~~~~
A plan's status and its bound always agree: ``"optimal"`` exactly when the objective is within
:data:`OPTIMAL_GAP` of the proven lower bound (the solver's relative MIP gap plus the bounds'
safety margins), ``"feasible"`` otherwise, whatever the method's own search said (the DP is exact
over contiguous splits of one order, which the op-level optimum may beat). A plan more than
:data:`WARN_GAP` above its bound is never returned silently: :func:`partition` (and
:func:`compare` for its ILP plan) warns with :class:`~modelparallel.errors.PlanGapWarning`,
saying what to try.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.plan import PlanConfig
    >>> plan = partition(transformer_graph(4), PlanConfig(partitions=2, time_limit=5), "h100")
    >>> plan.solver.method, plan.partitions, plan.solver.objective >= plan.solver.lower_bound
    ('ilp', 2, True)
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from modelparallel.cost_model import GraphCosts
from modelparallel.errors import ConfigError, InfeasiblePlanError, PlanGapWarning
from modelparallel.ir import Graph
from modelparallel.partitioner._infeasible import size_up
from modelparallel.partitioner.bounds import lower_bound
from modelparallel.partitioner.evaluate import (
    assignment_array,
    check_assignment,
    evaluate,
    make_plan,
)
from modelparallel.partitioner.memory_features import FeatureArrays, auto_checkpoint
from modelparallel.partitioner.methods import METHODS, Progress, _Clock, run_method
from modelparallel.partitioner.problem import DevicesArg, Problem, build_problem
from modelparallel.plan import Plan, PlanConfig, SolverReport

__all__ = ["METHODS", "OPTIMAL_GAP", "WARN_GAP", "compare", "evaluate_assignment", "partition"]

#: Largest gap to the proven bound at which a plan's status is ``"optimal"`` (the ILP solver's
#: relative MIP gap, 1e-4, plus the bounds' safety margins; Note [status and gap]).
OPTIMAL_GAP = 2e-4
#: Gap above which a plan comes with a :class:`~modelparallel.errors.PlanGapWarning`.
WARN_GAP = 0.10
#: Share of ``config.time_limit`` at which the bound's windowed model stops; the rest is the
#: reserve for evaluating and making the plan (Note [whole-call deadline]).
_BOUND_END = 0.9


def _finish(prob: Problem, stage: np.ndarray, report: SolverReport, clock: _Clock,
            samples_per_microbatch: int, *, search: bool,
            known_bound: float | None = None, warn: bool = True) -> Plan:
    """Evaluate, attach the lower bound and make the plan.

    ``search``: also run the windowed bound model of Note [lower bound] (the ILP method, when
    its own op-level ILP gave no dual bound, and the DP); otherwise the analytic bound, the report's bound
    and ``known_bound`` (another method's proven bound for the same problem) are used.
    ``warn``: warn (:class:`~modelparallel.errors.PlanGapWarning`) when the gap is above
    :data:`WARN_GAP`.
    """
    check_assignment(prob, stage)
    ev = evaluate(prob, stage)
    clock.emit("bound", "proving a lower bound", incumbent=ev.objective)
    lb = lower_bound(prob, incumbent=ev.objective if search else None,
                     incumbent_stage=stage if search else None,
                     time_limit=clock.deadline.until(_BOUND_END))
    value = lb.value
    notes = [*report.notes, f"lower bound: {lb.describe()}"]
    if report.lower_bound is not None and report.lower_bound > value:
        value = report.lower_bound
        notes.append(f"the op-level ILP's dual bound {value:.4f} is the bound reported")
    if known_bound is not None and known_bound > value:
        value = known_bound
        notes.append(f"the ILP method's proven bound {value:.4f} is the bound reported")
    value = min(value, ev.objective)
    gap = (ev.objective - value) / ev.objective if ev.objective > 0 else 0.0
    status = report.status
    if status in ("optimal", "feasible"):  # Note [status and gap]
        status = "optimal" if gap <= OPTIMAL_GAP else "feasible"
        if report.status == "optimal" and status == "feasible":
            notes.append(f"{report.method}'s own search was exact, but {100 * gap:.2f}% above "
                         "the proven bound: feasible")
    report = replace(report, status=status, lower_bound=value, solve_time=clock.elapsed(),
                     notes=tuple(notes))
    clock.emit("bound", "done", incumbent=ev.objective, bound=value)
    if warn and gap > WARN_GAP:
        _warn_gap(prob, report, ev.objective, value, gap)
    return make_plan(prob, ev, report, samples_per_microbatch=samples_per_microbatch)


def _warn_gap(prob: Problem, report: SolverReport, objective: float, bound: float,
              gap: float) -> None:
    """Warn that a plan is more than :data:`WARN_GAP` above its bound, with what to try."""
    cfg = prob.config
    tips = [f"a longer time_limit (now {cfg.time_limit:g} s)"] if report.method == "ilp" else [
        "method='ilp'"]
    if prob.colocate:
        tips.append("tied='replicate' (tied='colocate' keeps every reader of a tied parameter "
                    "on one stage, which the bound ignores)")
    if cfg.pins:
        tips.append("fewer pins (the bound ignores them)")
    tips.append("fewer partitions")
    warnings.warn(PlanGapWarning(
        f"plan of {prob.graph.name!r} by method {report.method!r} on {prob.p} stages: objective "
        f"{objective:.4f} is {100 * gap:.1f}% above the proven lower bound {bound:.4f} (status "
        f"{report.status}); the plan may be far from optimal or the bound weak. Try "
        + ", ".join(tips) + "."), stacklevel=_outside_level())


def _outside_level() -> int:
    """``stacklevel`` of the first caller outside the modelparallel package (for warnings)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


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
    def solve(cfg: PlanConfig) -> Plan:
        return _partition(graph, cfg, devices, method=method, costs=costs,
                          samples_per_microbatch=samples_per_microbatch, progress=progress)

    if config.checkpointing == "auto":  # Note [memory features]
        prob = build_problem(graph, replace(config, checkpointing="none"), devices, costs=costs)
        arrays = FeatureArrays(prob.fwd, prob.bwd, prob.saved, prob.workspace, prob.out_bytes,
                               prob.sent, prob.grad_bytes)
        return auto_checkpoint(graph, config, solve, prob.names, arrays, prob.edge_src,
                               prob.edge_dst)
    try:
        return solve(config)
    except InfeasiblePlanError as e:
        if config.checkpointing != "none" or config.offload_activations:
            raise
        try:
            solve(replace(config, checkpointing="all"))
        except InfeasiblePlanError:
            raise e from None
        raise InfeasiblePlanError(
            f"{e} Activation checkpointing would make it fit: pass checkpointing='auto' (the "
            "planner then checkpoints the fewest regions that fit)",
            min_memory_bytes=e.min_memory_bytes) from None


def _partition(graph: Graph, config: PlanConfig, devices: DevicesArg, *, method: str,
               costs: Sequence[GraphCosts] | None, samples_per_microbatch: int,
               progress: Progress | None, known_bound: float | None = None,
               warn: bool = True) -> Plan:
    if method not in METHODS:
        raise ConfigError(f"method = {method!r}; use one of {list(METHODS)}")
    if samples_per_microbatch < 1:
        raise ConfigError(f"samples_per_microbatch = {samples_per_microbatch} must be >= 1")
    clock = _Clock(progress, config.time_limit)  # Note [whole-call deadline]
    prob = build_problem(graph, config, devices, costs=costs)
    stage, report = run_method(prob, method, clock)
    report = replace(report, notes=(*prob.notes, *report.notes))
    return _finish(prob, stage, report, clock, samples_per_microbatch,
                   search=method in ("ilp", "dp") and report.lower_bound is None
                   and known_bound is None,
                   known_bound=known_bound, warn=warn)


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
                                progress=progress, known_bound=bound, warn=m == "ilp")
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
        notes.append(f"stage {int(s)} needs {size_up(ev.memory[s])}, over its device's "
                     f"{size_up(prob.caps[s])}")
    report = SolverReport(method="manual", status="feasible", notes=tuple(notes))
    return _finish(prob, stage, report, clock, samples_per_microbatch, search=False, warn=False)
