"""The ``partition-plan`` commands."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelparallel.cli._load import _load_model, _Loaded
from modelparallel.cli._options import (
    _config_from_args,
    _devices_from_args,
    _framework_defaults,
    _progress_printer,
)
from modelparallel.errors import ConfigError


def _cmd_build(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.partitioner import partition

    config = _config_from_args(a)
    devices = _devices_from_args(a)
    if a.measured and a.profile:
        raise ConfigError("give --measured FILE or --profile, not both")
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype, framework=a.framework,
                         split_axes=a.split_axis, non_split=a.non_split)
    config = _framework_defaults(a, config, loaded.graph)
    _check_partitions(config.partitions, loaded)
    costs = _measured_costs(a, loaded, devices, config, err)
    if not err.is_terminal:
        err.print("partitioning", markup=False, highlight=False, soft_wrap=True)
    with err.status("partitioning") as status:
        plan = partition(loaded.graph, config, devices, costs=costs,
                         samples_per_microbatch=loaded.samples_per_microbatch,
                         progress=_progress_printer(status, err))
    plan = _with_source(plan, a, loaded)
    out = plan.save(a.output)
    from modelparallel import report

    report.print_headline(plan, console)  # the tables once: 'partition-plan inspect PLAN'
    err.print(f"wrote {out} (the stage tables and timeline: partition-plan inspect {out})")
    return 0


def _check_partitions(partitions: int, loaded: _Loaded) -> None:
    """Refuse more stages than the model has operations: the rest could only be empty."""
    work = sum(1 for n in loaded.graph.nodes if n.op.value not in ("placeholder", "output"))
    if partitions > work:
        raise ConfigError(
            f"--partitions {partitions} but the model has only {work} operations to place, so "
            f"at least {partitions - work} stages would be empty; use --partitions {work} or "
            "fewer")


def _measured_costs(a: argparse.Namespace, loaded: _Loaded, devices: list[Any], config: Any,
                    err: Any) -> list[Any] | None:
    """Per-stage costs with measured node times (``--measured`` / ``--profile``), else None."""
    if not (a.measured or a.profile):
        return None
    from modelparallel.cost_model.node_times import NodeTimesFile, measured_costs

    if a.measured:
        measured = NodeTimesFile.load(a.measured, loaded.graph)
        _check_measured_shapes(a.measured, measured.metadata.get("example_shapes"), loaded)
        source = a.measured
        if measured.profiles is None:  # a version 1 file: per-node sums only
            err.print("[dim]the node-times file carries no node profiles: stage times are "
                      "the sums of node times, not replayed per stage[/dim]")
    else:
        profiles: dict[str, Any] = {}
        calls: list[Any] = []
        times = _profile(loaded, a.profile_device, warmup=2, repeat=5, console=err,
                         profiles_out=profiles, call_out=calls)
        measured = NodeTimesFile(times=times, profiles=profiles or None, call=calls[0])
        source = "profiling on this machine"
    costs = measured_costs(loaded.graph, devices, measured, optimizer=config.optimizer)
    times = dict(measured.times)
    timed = sum(1 for c in costs[0].nodes.values() if c.time > 0)
    hit = sum(1 for n in times if n in costs[0].nodes)
    err.print(f"[dim]measured times of {hit} nodes from {source}; the roofline keeps "
              f"{max(0, timed - hit)} others[/dim]")
    return costs


def _check_measured_shapes(path: str, recorded: Any, loaded: _Loaded) -> None:
    """Refuse node times measured on microbatches of other shapes than this build's."""
    if recorded and loaded.example_shapes and recorded != loaded.example_shapes:
        raise ConfigError(
            f"node times {path!r} were measured on microbatches with example shapes "
            f"{recorded}, but this build's microbatch has {loaded.example_shapes}; profile "
            "with the same --input-shape/--input and --microbatches as the build")


def _profile(loaded: _Loaded, device: str | None, *, warmup: int, repeat: int,
             console: Any, profiles_out: dict[str, Any] | None = None,
             call_out: list[Any] | None = None) -> dict[str, tuple[float, float]]:
    """Time every node of the loaded model on ``device`` (default: CUDA if present); the
    node profiles go into ``profiles_out`` and the call overhead (Note [call overhead]) is
    appended to ``call_out``, if given."""
    import torch
    import torch.utils._pytree as pytree

    from modelparallel.cost_model.measure import call_overhead, profile_node_times

    if loaded.traced is None:
        raise ConfigError("profiling needs the model itself, not an IR JSON file; give "
                          "MODEL as pkg.module:factory")
    dev = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("profiling was asked for on CUDA but no CUDA device is available")
    gm = loaded.traced.gm.to(dev)
    flat = pytree.tree_map_only(torch.Tensor, lambda t: t.to(dev), loaded.flat_inputs)
    with console.status(f"profiling {len(loaded.graph)} nodes on {dev}"):
        if call_out is not None:
            call_out.append(call_overhead(dev))
        return profile_node_times(gm, flat, warmup=warmup, repeat=repeat,
                                  profiles_out=profiles_out)


def _with_source(plan: Any, a: argparse.Namespace, loaded: _Loaded) -> Any:
    """Record how to rebuild the model, and the graph's edges if the planner left them out."""
    inputs = tuple([*(f"arg{i}={s}" for i, s in enumerate(a.input_shape)), *a.input,
                    *(f"--split-axis {s}" for s in a.split_axis),
                    *(f"--non-split {s}" for s in a.non_split)])
    model = replace(plan.model, source=str(a.model), inputs=inputs,
                    example_shapes=loaded.example_shapes or dict(plan.model.example_shapes))
    nodes = tuple(n if n.inputs or n.name not in loaded.graph
                  else replace(n, inputs=loaded.graph.node(n.name).inputs) for n in plan.nodes)
    return plan.replace(model=model, nodes=nodes)


def _cmd_inspect(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel import report
    from modelparallel.plan import load_plan

    plan = load_plan(a.plan)
    if a.json:
        print(plan.to_json())
    elif a.node is not None:
        report.print_node(plan, a.node, console)
    elif a.stage is not None:
        report.print_stage(plan, a.stage, console)
    else:
        report.print_summary(plan, console)
    return 0


def _cmd_compare(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel import report
    from modelparallel.partitioner import compare, compare_schedules

    config = _config_from_args(a)
    devices = _devices_from_args(a)
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype, framework=a.framework,
                         split_axes=a.split_axis, non_split=a.non_split)
    config = _framework_defaults(a, config, loaded.graph)
    _check_partitions(config.partitions, loaded)
    with err.status("partitioning with every method") as status:
        plans = compare(loaded.graph, config, devices,
                        samples_per_microbatch=loaded.samples_per_microbatch,
                        progress=_progress_printer(status, err))
    report.print_comparison(plans, console)
    with err.status("planning every schedule"):
        schedules = compare_schedules(loaded.graph, config, devices,
                                      samples_per_microbatch=loaded.samples_per_microbatch)
    report.print_schedule_comparison(schedules, console)
    if a.output:
        data = {k: p.to_dict() for k, p in plans.items()}
        data.update({f"schedule {k}": p.to_dict() for k, p in schedules.items()})
        Path(a.output).write_text(json.dumps(data, indent=1))
        err.print(f"wrote {a.output}")
    return 0


def _cmd_codegen(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.codegen import stage_source
    from modelparallel.plan import load_plan

    plan = load_plan(a.plan)
    if not 0 <= a.stage < plan.num_stages:
        raise ConfigError(f"--stage {a.stage} is outside 0..{plan.num_stages - 1}")
    source = a.model or plan.model.source
    if not source:
        raise ConfigError("the plan does not say which model it was built from; give --model "
                          "pkg.module:factory")
    recorded = plan.model.inputs
    shapes = [s.split("=", 1)[1] for s in recorded if s.startswith("arg")]
    named = [s for s in recorded if not s.startswith(("arg", "--"))]
    split = [s.split(" ", 1)[1] for s in recorded if s.startswith("--split-axis ")]
    whole = [s.split(" ", 1)[1] for s in recorded if s.startswith("--non-split ")]
    loaded = _load_model(source, input_shapes=a.input_shape or shapes, inputs=a.input or named,
                         microbatches=plan.config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype, split_axes=a.split_axis or split,
                         non_split=a.non_split or whole)
    if loaded.traced is None:
        raise ConfigError("codegen needs the model itself, not an IR JSON file; give --model "
                          "pkg.module:factory")
    print(stage_source(loaded.traced, plan, a.stage))
    return 0


def _cmd_calibrate(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.cost_model.device import save_device_spec
    from modelparallel.cost_model.measure import calibrate

    if bool(a.model) != bool(a.ops_out):
        raise ConfigError("--model and --ops-out go together: --model names what to profile, "
                          "--ops-out where its node times go")
    spec = calibrate(device=a.device, name=a.name, quick=a.quick, console=err)
    if a.ops:
        from modelparallel.cost_model.measure.ops import calibrate_ops

        table = calibrate_ops(device=a.device, quick=a.quick, console=err)
        ops = table.save(a.ops)
        err.print(f"wrote {ops} ({len(table.ops)} op families measured on {table.device})")
        spec = replace(spec, op_table=_relative_to(ops, Path(a.output).parent))
    save_device_spec(spec, a.output)
    err.print(f"wrote {a.output}")
    if a.model:
        _calibrate_ops(a, spec, err)
    return 0


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` where it lies inside it, else absolute (a spec names
    its op table relative to its own folder: ``load_device_spec``)."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())


def _calibrate_ops(a: argparse.Namespace, spec: Any, err: Any) -> None:
    """Profile every node of ``--model`` on the calibrated device; write ``--ops-out``."""
    import torch

    from modelparallel.cost_model.node_times import save_node_times

    if a.microbatches < 1:
        raise ConfigError(f"--microbatches {a.microbatches} must be >= 1")
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=a.microbatches, method=a.trace_method, console=err,
                         dtype=a.dtype, split_axes=a.split_axis, non_split=a.non_split)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profiles: dict[str, Any] = {}
    calls: list[Any] = []
    times = _profile(loaded, device, warmup=a.warmup, repeat=a.repeat, console=err,
                     profiles_out=profiles, call_out=calls)
    save_node_times(a.ops_out, times, graph=loaded.graph, profiles=profiles, call=calls[0],
                    device=str(spec.extra.get("product", spec.name)),
                    metadata={"model": a.model, "dtype": a.dtype or "as built",
                              "microbatches": a.microbatches,
                              "example_shapes": loaded.example_shapes,
                              "torch": torch.__version__, "spec": spec.name})
    err.print(f"wrote {a.ops_out} ({len(times)} nodes timed on {device})")
