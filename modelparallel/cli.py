"""``partition-plan``: build a partition plan offline, inspect it, compare planners, show stage code.

Commands:

- ``build MODEL ... -o plan.json``: trace, cost and partition a model; write the plan.
- ``inspect plan.json [--stage K] [--node NAME]``: per-stage table, estimated timeline and
  bottleneck; a stage's nodes; why a node sits where it does.
- ``compare MODEL ...``: the ILP beside every baseline on the same graph and cost model.
- ``codegen plan.json --stage K``: the generated code of one stage.
- ``calibrate -o spec.json``: measure this machine's device into a spec ``build --device`` reads;
  with ``--model MODEL --ops-out ops.json`` also the time of every node of that model on it.
- ``build MODEL --measured ops.json`` (or ``--profile``): plan with measured node times instead of
  the roofline (profiling mode; Note [profiling isolated nodes] in ``cost_model/measure/isolated.py``).

``MODEL`` is ``pkg.module:factory``, ``path/to/file.py:factory``, or an IR JSON file. A factory
returns an ``nn.Module`` (give ``--input-shape``/``--input``), a
:class:`modelparallel.models.ModelCase`, or a ``(module, example_inputs)`` pair.

Errors in what the user gave (a bad flag, a missing file, an infeasible plan) print one line to
stderr and exit with status 2, without a traceback; ``--debug`` shows the traceback.

Example:
    >>> main(["build", "no_such_module:factory", "--partitions", "2", "-o", "x.json"])
    2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from modelparallel.errors import ConfigError, ModelParallelError
from modelparallel.ir import Graph

__all__ = ["main"]

_PROG = "partition-plan"


class _UsageError(ModelParallelError, ValueError):
    """A command-line argument is wrong."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# -- model loading ---------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """A model ready to plan: the graph, and the traced module when it came from Python."""

    graph: Graph
    traced: Any | None
    example_shapes: dict[str, list[int]]
    samples_per_microbatch: int
    flat_inputs: list[Any] = field(default_factory=list)


def _import_factory(spec: str) -> Callable[[], Any]:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(
            f"MODEL {spec!r} must be 'pkg.module:factory', 'path/to/file.py:factory' or an IR "
            "JSON file")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"MODEL file {where!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"cannot import {where!r} as a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"cannot import module {where!r} for MODEL {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"module {where!r} has no callable {name!r} (MODEL {spec!r})")
    return factory  # type: ignore[no-any-return]


def _parse_shape(text: str) -> tuple[list[int], str]:
    shape_text, _, dtype = text.partition(":")
    try:
        shape = [int(s) for s in shape_text.replace("x", ",").split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"input shape {text!r} is not a list of integers; write e.g. '8,3,224,224' or "
            "'8x512:int64'") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input shape {text!r} needs at least one size, all > 0")
    return shape, dtype or "float32"


def _make_tensor(shape: list[int], dtype: str) -> Any:
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r} in an input spec; use e.g. float32, int64")
    if dt.is_floating_point:
        return torch.randn(shape, dtype=dt)
    return torch.zeros(shape, dtype=dt)


def _example_from_flags(positional: Sequence[str], named: Sequence[str]
                        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if not positional and not named:
        return None
    args = tuple(_make_tensor(*_parse_shape(s)) for s in positional)
    kwargs: dict[str, Any] = {}
    for item in named:
        key, sep, rest = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--input {item!r} must look like NAME=SHAPE[:DTYPE], "
                              "e.g. input_ids=8x512:int64")
        kwargs[key] = _make_tensor(*_parse_shape(rest))
    return args, kwargs


def _unpack_factory_result(result: Any) -> tuple[Any, tuple[Any, ...] | None, dict[str, Any]]:
    import torch

    if isinstance(result, torch.nn.Module):
        return result, None, {}
    if hasattr(result, "model") and hasattr(result, "args"):
        return result.model, tuple(result.args), dict(getattr(result, "kwargs", {}) or {})
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        inputs = result[1]
        if isinstance(inputs, dict):
            return result[0], (), dict(inputs)
        if isinstance(inputs, torch.Tensor):
            return result[0], (inputs,), {}
        return result[0], tuple(inputs), {}
    raise ConfigError(
        f"the MODEL factory returned {type(result).__name__}; return an nn.Module, a ModelCase, "
        "or a (module, example_inputs) pair")


def _microbatch(value: Any, microbatches: int, name: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] % microbatches:
        raise ConfigError(
            f"input {name!r} has batch size {value.shape[0]}, which does not divide into "
            f"{microbatches} microbatches; pick a batch size that is a multiple of "
            f"{microbatches} or fewer microbatches")
    return value[: value.shape[0] // microbatches]


def _load_model(spec: str, *, input_shapes: Sequence[str], inputs: Sequence[str],
                microbatches: int, method: str, console: Any, dtype: str | None = None
                ) -> _Loaded:
    """Trace MODEL (or read its IR JSON) with one microbatch of the example batch, in ``dtype``
    (floating weights and inputs cast) when given."""
    path = Path(spec)
    if spec.endswith(".json") or (path.is_file() and ":" not in spec):
        if not path.is_file():
            raise ConfigError(f"IR file {spec!r} does not exist")
        graph = Graph.from_json(path)
        return _Loaded(graph, None, {}, 1)
    import torch

    factory = _import_factory(spec)
    with console.status(f"building {spec}"):
        model, args, kwargs = _unpack_factory_result(factory())
    flags = _example_from_flags(input_shapes, inputs)
    if flags is not None:
        args, kwargs = flags
    if args is None:
        raise ConfigError(
            f"MODEL {spec!r} returned a bare module, so the example batch is unknown; give "
            "--input-shape 8,3,224,224 (positional) or --input input_ids=8x512:int64 (keyword)")
    args = tuple(_microbatch(a, microbatches, f"arg{i}") for i, a in enumerate(args))
    kwargs = {k: _microbatch(v, microbatches, k) for k, v in kwargs.items()}
    if dtype is not None:
        model, args, kwargs = _cast(model, args, kwargs, dtype)
    shapes = {f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    shapes.update({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    leaves = [*args, *kwargs.values()]
    samples = next((int(t.shape[0]) for t in leaves
                    if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    from rich.markup import escape

    from modelparallel.tracer import trace

    start = time.perf_counter()
    with console.status(f"tracing {type(model).__name__} ({method})"):
        traced = trace(model, args, kwargs, method=method)
    console.print(f"[dim]traced {type(model).__name__} with {traced.method}: "
                  f"{len(traced.graph)} nodes in {time.perf_counter() - start:.1f} s[/dim]")
    for note in traced.notes:
        console.print(f"[dim]  note: {escape(note)}[/dim]")
    return _Loaded(traced.graph, traced, shapes, samples,
                   flat_inputs=traced.flatten_inputs(args, kwargs))


def _cast(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: str
          ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The model and its floating example inputs in ``dtype`` (``--dtype``)."""
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(f"--dtype {dtype!r} is not a floating torch dtype; use e.g. float32, "
                          "bfloat16, float16")

    def cast(v: Any) -> Any:
        return v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return model.to(dtype=dt), tuple(cast(a) for a in args), {k: cast(v) for k, v in
                                                               kwargs.items()}


# -- planning options ------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="pkg.module:factory, path/to/file.py:factory, or an IR JSON file")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="a positional example input of the FULL batch, e.g. 8,3,224,224 or "
                        "8x512:int64 (repeat for more inputs)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="a keyword example input, e.g. input_ids=8x512:int64 (repeatable)")
    p.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto",
                   help="tracer path (default: fx, falling back to torch.export)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="cast the model's floating weights and inputs first (e.g. bfloat16)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partitions", "-p", type=int, required=True, help="pipeline stages")
    p.add_argument("--microbatches", "-m", type=int, default=1, help="microbatches per step")
    p.add_argument("--schedule", default="1f1b",
                   choices=("gpipe", "1f1b", "simple", "interleaved"))
    p.add_argument("--device", action="append", default=[], metavar="NAME|SPEC.json",
                   help="device for every stage, or repeat once per stage "
                        "(cpu, v100, a100, h100, h200, or a calibrated spec JSON; default h100)")
    p.add_argument("--memory", metavar="SIZE", help="memory per device, e.g. 80GiB (overrides "
                                                    "the device spec)")
    p.add_argument("--optimize", choices=("speed", "memory"), default="speed")
    p.add_argument("--memory-weight", type=float, default=None, metavar="W",
                   help="weight of memory balance in [0, 1] (default 0.2 speed / 0.8 memory)")
    p.add_argument("--optimizer", default="adam",
                   help="optimizer whose state is counted: sgd, momentum, adam, adamw, or bytes "
                        "per parameter")
    p.add_argument("--granularity", choices=("op", "module"), default="op")
    p.add_argument("--module-depth", type=int, default=None,
                   help="module depth of the units with --granularity module")
    p.add_argument("--tied", choices=("replicate", "colocate"), default="replicate",
                   help="tied parameters on several stages: replicate with gradient sync, or "
                        "keep their readers on one stage")
    p.add_argument("--pin", action="append", default=[], metavar="NAME=STAGE",
                   help="pin a node or module path to a stage (repeatable)")
    p.add_argument("--solver", choices=("highs", "cbc"), default="highs")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S",
                   help="seconds the ILP may take (default 10)")


def _config_from_args(a: argparse.Namespace) -> Any:
    from modelparallel.plan import PlanConfig

    pins: dict[str, int] = {}
    for item in a.pin:
        key, sep, stage = item.rpartition("=")
        if not sep or not key or not stage.lstrip("-").isdigit():
            raise ConfigError(f"--pin {item!r} must look like NAME=STAGE, e.g. "
                              "transformer.h.0=0")
        pins[key] = int(stage)
    optimizer: str | float = a.optimizer
    with contextlib.suppress(ValueError):
        optimizer = float(a.optimizer)
    return PlanConfig(
        partitions=a.partitions, microbatches=a.microbatches, schedule=a.schedule,
        optimize=a.optimize, memory_weight=a.memory_weight, optimizer=optimizer,
        granularity=a.granularity, module_depth=a.module_depth, tied=a.tied, pins=pins,
        solver=a.solver, time_limit=a.time_limit)


def _devices_from_args(a: argparse.Namespace) -> list[Any]:
    from modelparallel.cost_model import get_device_spec, parse_bytes

    names = a.device or ["h100"]
    if len(names) not in (1, a.partitions):
        raise ConfigError(
            f"--device was given {len(names)} times; give it once (every stage) or "
            f"{a.partitions} times (one per stage)")
    specs = [get_device_spec(n) for n in names]
    if a.memory:
        specs = [s.with_memory(parse_bytes(a.memory)) for s in specs]
    if len(specs) == 1:
        specs = specs * a.partitions
    return specs


def _progress_printer(status: Any) -> Callable[[Any], None]:
    def show(event: Any) -> None:
        parts = [f"{getattr(event, 'phase', '')}: {getattr(event, 'message', '')}"]
        inc, bound, gap = (getattr(event, k, None) for k in ("incumbent", "bound", "gap"))
        if inc is not None:
            parts.append(f"incumbent {inc:.4f}")
        if bound is not None:
            parts.append(f"bound {bound:.4f}")
        if gap is not None:
            parts.append(f"gap {100 * gap:.2f}%")
        status.update(" | ".join(parts))
    return show


# -- commands --------------------------------------------------------------------------------------


def _cmd_build(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.partitioner import partition

    config = _config_from_args(a)
    devices = _devices_from_args(a)
    if a.measured and a.profile:
        raise ConfigError("give --measured FILE or --profile, not both")
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype)
    costs = _measured_costs(a, loaded, devices, config, err)
    with err.status("partitioning") as status:
        plan = partition(loaded.graph, config, devices, costs=costs,
                         samples_per_microbatch=loaded.samples_per_microbatch,
                         progress=_progress_printer(status))
    plan = _with_source(plan, a, loaded)
    out = plan.save(a.output)
    from modelparallel import report

    report.print_summary(plan, console)
    err.print(f"wrote {out}")
    return 0


def _measured_costs(a: argparse.Namespace, loaded: _Loaded, devices: list[Any], config: Any,
                    err: Any) -> list[Any] | None:
    """Per-stage costs with measured node times (``--measured`` / ``--profile``), else None."""
    if not (a.measured or a.profile):
        return None
    from modelparallel.cost_model import CallOverhead, estimate_costs
    from modelparallel.cost_model.node_replay import host_replay
    from modelparallel.cost_model.node_times import NodeTimesFile

    profiles: dict[str, Any] = {}
    call = CallOverhead()
    if a.measured:
        measured = NodeTimesFile.load(a.measured, loaded.graph)
        times = dict(measured.times)
        _check_measured_shapes(a.measured, measured.metadata.get("example_shapes"), loaded)
        source = a.measured
        call = measured.call_overhead
        if measured.profiles is not None:
            profiles = dict(measured.profiles)
        else:  # a version 1 file: per-node sums only
            err.print("[dim]the node-times file carries no node profiles: stage times are "
                      "the sums of node times, not replayed per stage[/dim]")
    elif a.profile:
        calls: list[Any] = []
        times = _profile(loaded, a.profile_device, warmup=2, repeat=5, console=err,
                         profiles_out=profiles, call_out=calls)
        call = calls[0]
        source = "profiling on this machine"
    else:
        return None
    # Notes [stage replay] and [call overhead] in modelparallel/cost_model/replay.py
    replay = host_replay([n.name for n in loaded.graph.nodes], profiles,
                         call=call) if profiles else None
    costs = [estimate_costs(loaded.graph, d, optimizer=config.optimizer, measured=times,
                            replay=replay) for d in devices]
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
    inputs = tuple([*(f"arg{i}={s}" for i, s in enumerate(a.input_shape)), *a.input])
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
    from modelparallel.partitioner import compare

    config = _config_from_args(a)
    devices = _devices_from_args(a)
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype)
    with err.status("partitioning with every method") as status:
        plans = compare(loaded.graph, config, devices,
                        samples_per_microbatch=loaded.samples_per_microbatch,
                        progress=_progress_printer(status))
    report.print_comparison(plans, console)
    if a.output:
        Path(a.output).write_text(json.dumps({k: p.to_dict() for k, p in plans.items()}, indent=1))
        err.print(f"wrote {a.output}")
    return 0


def _cmd_codegen(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.codegen import stage_source
    from modelparallel.plan import load_plan

    plan = load_plan(a.plan)
    if not 0 <= a.stage < plan.partitions:
        raise ConfigError(f"--stage {a.stage} is outside 0..{plan.partitions - 1}")
    source = a.model or plan.model.source
    if not source:
        raise ConfigError("the plan does not say which model it was built from; give --model "
                          "pkg.module:factory")
    shapes = [s.split("=", 1)[1] for s in plan.model.inputs if s.startswith("arg")]
    named = [s for s in plan.model.inputs if not s.startswith("arg")]
    loaded = _load_model(source, input_shapes=a.input_shape or shapes, inputs=a.input or named,
                         microbatches=plan.config.microbatches, method=a.trace_method,
                         console=err, dtype=a.dtype)
    if loaded.traced is None:
        raise ConfigError("codegen needs the model itself, not an IR JSON file; give --model "
                          "pkg.module:factory")
    print(stage_source(loaded.traced, plan, a.stage))
    return 0


def _cmd_calibrate(a: argparse.Namespace, console: Any, err: Any) -> int:
    from modelparallel.cost_model.measure import calibrate

    if bool(a.model) != bool(a.ops_out):
        raise ConfigError("--model and --ops-out go together: --model names what to profile, "
                          "--ops-out where its node times go")
    spec = calibrate(device=a.device, name=a.name, quick=a.quick, console=err)
    Path(a.output).write_text(json.dumps(spec.to_dict(), indent=1))
    err.print(f"wrote {a.output}")
    if a.model:
        _calibrate_ops(a, spec, err)
    return 0


def _calibrate_ops(a: argparse.Namespace, spec: Any, err: Any) -> None:
    """Profile every node of ``--model`` on the calibrated device; write ``--ops-out``."""
    import torch

    from modelparallel.cost_model.node_times import save_node_times

    if a.microbatches < 1:
        raise ConfigError(f"--microbatches {a.microbatches} must be >= 1")
    loaded = _load_model(a.model, input_shapes=a.input_shape, inputs=a.input,
                         microbatches=a.microbatches, method=a.trace_method, console=err,
                         dtype=a.dtype)
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


def _build_parser() -> _Parser:
    parser = _Parser(prog=_PROG, description="Plan, inspect and compare pipeline partitions.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="trace, cost and partition a model; write a plan")
    _add_model_args(b)
    _add_plan_args(b)
    b.add_argument("-o", "--output", required=True, help="plan file to write")
    b.add_argument("--measured", default=None, metavar="OPS.json",
                   help="node times measured by 'calibrate --model MODEL --ops-out OPS.json' "
                        "(same model, inputs, dtype, microbatches) replace the roofline")
    b.add_argument("--profile", action="store_true",
                   help="time every node on this machine first and plan with those times")
    b.add_argument("--profile-device", default=None, metavar="DEVICE",
                   help="device for --profile (default: cuda if present, else cpu)")
    b.set_defaults(func=_cmd_build)

    i = sub.add_parser("inspect", help="show a plan")
    i.add_argument("plan", help="plan JSON file")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--stage", type=int, default=None, help="list the nodes of stage K")
    g.add_argument("--node", default=None, help="explain where node NAME went and why")
    g.add_argument("--json", action="store_true", help="print the plan JSON")
    i.set_defaults(func=_cmd_inspect)

    c = sub.add_parser("compare", help="the ILP beside every baseline, in one table")
    _add_model_args(c)
    _add_plan_args(c)
    c.add_argument("-o", "--output", default=None, help="also write every plan to this JSON")
    c.set_defaults(func=_cmd_compare)

    k = sub.add_parser("codegen", help="print the generated code of one stage")
    k.add_argument("plan", help="plan JSON file")
    k.add_argument("--stage", type=int, required=True)
    k.add_argument("--model", default=None, help="MODEL, if not the one recorded in the plan")
    k.add_argument("--input-shape", action="append", default=[])
    k.add_argument("--input", action="append", default=[])
    k.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto")
    k.add_argument("--dtype", default=None, help="the dtype the plan was built with (--dtype)")
    k.set_defaults(func=_cmd_codegen)

    cal = sub.add_parser("calibrate", help="measure this machine's device into a spec JSON")
    cal.add_argument("-o", "--output", required=True, help="spec JSON to write")
    cal.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    cal.add_argument("--name", default=None, help="name to record in the spec")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    cal.add_argument("--model", default=None, metavar="MODEL",
                     help="also time every node of this model on the device (with --ops-out)")
    cal.add_argument("--ops-out", default=None, metavar="FILE",
                     help="node-times JSON to write for --model ('build --measured' reads it)")
    cal.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                     help="a positional example input of the full batch (as for build)")
    cal.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                     help="a keyword example input (as for build)")
    cal.add_argument("--microbatches", "-m", type=int, default=1,
                     help="microbatches the batch is split into; nodes are timed on one")
    cal.add_argument("--dtype", default=None, help="cast the model first (e.g. bfloat16)")
    cal.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto")
    cal.add_argument("--warmup", type=int, default=2, help="untimed calls per node")
    cal.add_argument("--repeat", type=int, default=5, help="timed calls per node")
    cal.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``partition-plan`` with ``argv``; return the exit status.

    User errors print one line, ``partition-plan: error: ...``, and return 2.
    """
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _build_parser().parse_args(argv)
        # Tables keep their columns when written to a file or pipe instead of wrapping at 80.
        width = None if sys.stdout.isatty() else 160
        return int(args.func(args, Console(highlight=False, width=width),
                             Console(stderr=True, highlight=False)))
    except ModelParallelError as e:
        if debug:
            raise
        _one_line(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _one_line("interrupted")
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except Exception as e:
        if debug:
            raise
        _one_line(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                  "traceback, and please report it)")
        return 1


def _one_line(message: str) -> None:
    text = " ".join(str(message).split())
    print(f"{_PROG}: {text}", file=sys.stderr)



if __name__ == "__main__":
    sys.exit(main())
