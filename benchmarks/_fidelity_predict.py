"""Predicting a raw fidelity record's stages with the current cost model (``--recompute`` of
``cost_model_fidelity.py``, and every fresh run): the roofline, the calibrated roofline and the
profiling-mode variants of Note [fidelity measurement], beside the measurements.

Run from ``benchmarks/`` (imported by ``cost_model_fidelity.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from modelparallel.cost_model import CallOverhead, DeviceSpec, estimate_costs, get_device_spec
from modelparallel.cost_model.analytic import analytic_costs
from modelparallel.cost_model.node_replay import (
    BackwardMode,
    ForwardMode,
    NodeProfile,
    host_replay,
    node_times,
    with_backward_context,
    with_forward_context,
)
from modelparallel.cost_model.op_table import OpTable
from modelparallel.ir import Graph
from modelparallel.partitioner import evaluate_assignment
from modelparallel.plan import Plan, PlanConfig

__all__ = ["OPTIMIZER", "PARTITIONS", "SCHEDULE", "_config", "_rel", "_roofline", "_with_context",
           "predict_model"]

PARTITIONS = 4
SCHEDULE = "1f1b"
OPTIMIZER = "adam"


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else math.nan


def _with_context(profiles: dict[str, NodeProfile], context: Mapping[str, Any]
                  ) -> dict[str, NodeProfile]:
    """``profiles`` with a raw record's in-context host times (``_ContextRounds.record`` in
    ``cost_model_fidelity.py``) folded into them as the cost model does now (Note [in-context
    forward host time] in ``cost_model/measure/forward.py``, Note [in-context backward host time]
    in ``cost_model/measure/backward.py``)."""
    order, flag = context["order"], context["host_is_device"]
    if "forward" in context:
        profiles = with_forward_context(profiles, order, context["forward"],
                                        host_is_device=flag, users=context["users"])
    if "backward" in context:
        profiles = with_backward_context(profiles, order, context["backward"],
                                         host_is_device=flag)
    return profiles


def _roofline(plan_device: str) -> DeviceSpec:
    """The built-in spec without its op table: the roofline column, and what plans the
    assignment (as in records made before op tables)."""
    return replace(get_device_spec(plan_device), op_table="")


def _config(microbatches: int, time_limit: float) -> PlanConfig:
    return PlanConfig(partitions=PARTITIONS, microbatches=microbatches, schedule=SCHEDULE,
                      optimizer=OPTIMIZER, time_limit=time_limit)


def _node_profile(values: list[Any], graph: Graph, name: str) -> NodeProfile:
    """A recorded node profile; records made before profiles had a kind get the IR's op and
    output shapes as their kind."""
    if len(values) >= 7:  # with the in-context forward host time (None: not measured)
        return NodeProfile(*values[:4], kind=str(values[4]), host_backward_context=values[5],
                           host_forward_context=values[6])
    if len(values) >= 6:  # with the in-context backward host time (None: not measured)
        return NodeProfile(*values[:4], kind=str(values[4]), host_backward_context=values[5])
    if len(values) >= 5:
        return NodeProfile(*values[:4], kind=str(values[4]))
    node = graph.node(name)
    kind = f"{node.target}|{[(m.shape, m.dtype) for m in node.outputs]}"
    return NodeProfile(*values[:4], kind=kind)


def predict_model(raw: dict[str, Any], *, plan_device: str, spec: Any,
                  ops: OpTable | None = None) -> dict[str, Any]:
    """Predictions of the cost model for every stage of a raw record, beside its measurements.

    The assignment is the recorded one (planned on ``plan_device``'s roofline); the modes are
    that roofline, the roofline on the calibrated ``spec`` (if any) and profiling mode
    (``node_times`` of the recorded node profiles), and, with ``ops``, the analytic model
    on that op table (Note [analytic cost model]: no profile of the model used). Memory is
    the plan's.
    """
    graph = Graph.from_dict(raw["graph"])
    config = _config(raw["microbatches"], raw.get("time_limit", 10.0))
    assignment = raw["assignment"]
    mb = raw["microbatch_size"]
    roof = _roofline(plan_device)
    plan = evaluate_assignment(graph, config, roof, assignment, samples_per_microbatch=mb)
    predictions: dict[str, Plan] = {"roofline": plan}
    if spec is not None:
        predictions["roofline_calibrated"] = evaluate_assignment(
            graph, config, spec, assignment, samples_per_microbatch=mb)
    if ops is not None:
        predictions["analytic"] = evaluate_assignment(
            graph, config, roof, assignment, samples_per_microbatch=mb,
            costs=[analytic_costs(graph, roof, ops, optimizer=OPTIMIZER)])
    profiles = {k: _node_profile(v, graph, k) for k, v in raw["profiles"].items()}
    if "context" in raw:  # re-fold the in-context times as measured (older records: as folded)
        profiles = _with_context(profiles, raw["context"])
    order = [n.name for n in graph.nodes]
    has_context = any(p.host_backward_context is not None for p in profiles.values())
    # profiled: node_times' default (what the partitioner gets); the backward counted from
    # device time only (the model before in-context host times), and replayed with the
    # in-context host times (Note [in-context backward host time]); the last falls back to the
    # device-only backward, with a note, where the in-context measurement is missing.
    # The forward the same way: its host time measured node by node alone (the model before
    # in-context forward host times) and in context (Note [in-context forward host time]);
    # both with the default backward.
    has_fwd = any(p.host_forward_context is not None for p in profiles.values())
    # (backward_host, forward_host) of each variant; every variant replays each stage alone
    # (Note [stage replay]), as the partitioner does; "profiled_additive" sums node_times
    # instead (the model before the stage replay).
    modes: dict[str, tuple[BackwardMode, ForwardMode]] = {
        "profiled": ("auto", "auto"),
        "profiled_additive": ("auto", "auto"),
        "profiled_device_bwd": ("device", "isolated"),
        "profiled_context_bwd": ("context" if has_context else "device", "isolated"),
        "profiled_isolated_fwd": ("auto", "isolated"),
        "profiled_context_fwd": ("auto", "auto")}
    by_mode = {m: node_times(order, profiles, backward_host=m[0], forward_host=m[1])
               for m in set(modes.values())}
    variants = {k: by_mode[m] for k, m in modes.items()}
    times = variants["profiled"]
    context_note = raw.get("backward_context_note") or (
        "" if has_context else "no in-context backward host times in this record: "
        "profiled_context_bwd = profiled_device_bwd")
    fwd_note = raw.get("forward_context_note") or (
        "" if has_fwd else "no in-context forward host times in this record: "
        "profiled_context_fwd = profiled_isolated_fwd = profiled")
    times_bh = node_times(order, profiles, backward_host="isolated")
    stage_nodes: dict[int, list[str]] = {}
    for name, st in assignment.items():
        stage_nodes.setdefault(int(st), []).append(name)
    call = CallOverhead(*raw.get("context", {}).get("call_overhead", (0.0, 0.0)))
    for mode, mode_times in variants.items():
        bh, fh = modes[mode]
        replay = None if mode == "profiled_additive" else host_replay(
            order, profiles, backward_host=bh, forward_host=fh,
            call=call if mode == "profiled" else None)
        costs = estimate_costs(graph, roof, optimizer=OPTIMIZER, measured=mode_times,
                               replay=replay)
        predictions[mode] = evaluate_assignment(graph, config, roof, assignment,
                                                costs=[costs], samples_per_microbatch=mb)
    rows = []
    for measured in raw["stages"]:
        s = measured["stage"]
        est = plan.stages[s]
        row = {key: v for key, v in measured.items()
               if key not in ("recomputed", "measured_host_ms")}
        row.update({
            "nodes": est.num_nodes, "parameters": est.num_parameters,
            "memory_predicted_bytes": est.memory.peak,
            "memory_predicted": {"parameters": est.memory.parameters,
                                 "gradients": est.memory.gradients,
                                 "optimizer": est.memory.optimizer,
                                 "activations": est.memory.activations,
                                 "workspace": est.memory.workspace},
            "memory_error": _rel(est.memory.peak, measured["memory_measured_bytes"]),
        })
        both = measured["measured_ms"] / 1e3
        for mode, p in predictions.items():
            st = p.stages[s]
            row[f"{mode}_ms"] = st.compute_time * 1e3
            row[f"{mode}_fwd_ms"] = st.forward_time * 1e3
            row[f"{mode}_error"] = _rel(st.compute_time, both)
            row[f"{mode}_fwd_error"] = _rel(st.forward_time, measured["measured_fwd_ms"] / 1e3)
        # Input-derived nodes the stage recomputes (Note [inputs on every rank]): in the
        # replayed modes' stage times since the stage replay (Note [stage replay]).
        row["recomputed_ms"] = 1e3 * sum(sum(times.get(n, (0.0, 0.0)))
                                         for n in measured.get("recomputed", ()))
        # Diagnosis: the backward replayed with the measured host backward times.
        bh = sum(sum(times_bh.get(n, (0.0, 0.0))) for n in stage_nodes[s])
        row["profiled_backward_host_ms"] = bh * 1e3
        row["profiled_backward_host_error"] = _rel(bh, both)
        row["context_backward_host_ms"] = 1e3 * sum(
            profiles[n].host_backward_context or 0.0 for n in stage_nodes[s] if n in profiles)
        row["device_backward_ms"] = 1e3 * sum(
            profiles[n].device_backward for n in stage_nodes[s] if n in profiles)
        # Diagnosis of the forward: host and device sums over the stage's nodes, against
        # measured_fwd_ms (the host-bound forward takes about the larger).
        row["isolated_forward_host_ms"] = 1e3 * sum(
            profiles[n].host_forward for n in stage_nodes[s] if n in profiles)
        row["context_forward_host_ms"] = math.nan if not has_fwd else 1e3 * sum(
            profiles[n].host_forward_context or 0.0 for n in stage_nodes[s] if n in profiles)
        row["device_forward_ms"] = 1e3 * sum(
            profiles[n].device_forward for n in stage_nodes[s] if n in profiles)
        rows.append(row)
    return {
        "model": raw["model"], "batch_size": raw["batch_size"],
        "microbatches": raw["microbatches"], "microbatch_size": mb, "sample": raw["sample"],
        "parameters": graph.num_parameters, "nodes": len(graph), "tracer": raw["tracer"],
        "trace_s": raw["trace_s"], "plan_s": raw["plan_s"], "profile_s": raw["profile_s"],
        "profiled_nodes": len(profiles), "stages": rows,
        "backward_context_note": context_note, "forward_context_note": fwd_note,
    }
