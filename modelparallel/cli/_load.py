"""Loading MODEL for the CLI: an IR JSON file (no torch), or a factory traced on one microbatch of
its example batch (cut like the training batches: ``runtime/microbatch.first_microbatch``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelparallel.errors import ConfigError, ModelParallelError
from modelparallel.ir import Graph


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


def _split_flags(split_axes: Sequence[str], non_split: Sequence[str]
                 ) -> tuple[dict[str | int, int], list[str | int]]:
    """``--split-axis NAME=AXIS`` and ``--non-split NAME`` as ``first_microbatch``'s rules (a
    NAME of digits is a flat input index)."""
    def key(name: str) -> str | int:
        return int(name) if name.isdigit() else name

    axes: dict[str | int, int] = {}
    for item in split_axes:
        name, sep, axis = item.partition("=")
        if not sep or not name or not axis.lstrip("-").isdigit():
            raise ConfigError(f"--split-axis {item!r} must be NAME=AXIS, e.g. "
                              "attention_mask=1 (NAME an input's name or flat index)")
        axes[key(name)] = int(axis)
    return axes, [key(n) for n in non_split]


def _load_model(spec: str, *, input_shapes: Sequence[str], inputs: Sequence[str],
                microbatches: int, method: str, console: Any, dtype: str | None = None,
                framework: str = "auto", split_axes: Sequence[str] = (),
                non_split: Sequence[str] = ()) -> _Loaded:
    """Trace MODEL (or read its IR JSON) with one microbatch of the example batch, in ``dtype``
    (floating weights and inputs cast) when given; a Keras model (``framework`` "tensorflow" or
    detected) is traced by ``_load_tf``."""
    path = Path(spec)
    if spec.endswith(".py"):
        raise ConfigError(f"MODEL {spec!r} is a Python file without a factory: write "
                          f"'{spec}:FACTORY', FACTORY being the function that builds the model")
    if spec.endswith(".json") or (path.is_file() and ":" not in spec):
        if not path.is_file():
            raise ConfigError(f"IR file {spec!r} does not exist")
        graph = Graph.from_json(path)
        return _Loaded(graph, None, {}, 1)
    factory = _import_factory(spec)
    if not console.is_terminal:  # a status line shows nothing in a pipe or a CI log
        console.print(f"building {spec}", markup=False, highlight=False, soft_wrap=True)
    with console.status(f"building {spec}"):
        try:
            result = factory()
        except ModelParallelError:
            raise
        except Exception as e:  # the user's code: a user error (exit 2), not ours
            raise ConfigError(f"the MODEL factory {spec!r} raised {type(e).__name__}: "
                              f"{e}") from e
    from modelparallel.cli._load_tf import is_keras_result, load_keras

    if framework == "tensorflow" or (framework == "auto" and is_keras_result(result)):
        if split_axes or non_split:
            raise ConfigError("--split-axis and --non-split are not supported yet for Keras "
                              "models (their example batch is cut along axis 0); give "
                              "--input-shape of one microbatch times --microbatches instead")
        return load_keras(spec, result, input_shapes=input_shapes, microbatches=microbatches,
                          console=console, dtype=dtype)
    import torch

    model, args, kwargs = _unpack_factory_result(result)
    flags = _example_from_flags(input_shapes, inputs)
    if flags is not None:
        args, kwargs = flags
    if args is None:
        raise ConfigError(
            f"MODEL {spec!r} returned a bare module, so the example batch is unknown; give "
            "--input-shape 8,3,224,224 (positional) or --input input_ids=8x512:int64 (keyword)")
    from modelparallel.runtime.microbatch import first_microbatch

    axes, whole = _split_flags(split_axes, non_split)
    args, kwargs = first_microbatch(model, tuple(args), dict(kwargs), microbatches, axes, whole)
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
    if not console.is_terminal:
        console.print(f"tracing {type(model).__name__} ({method})", markup=False, soft_wrap=True,
                      highlight=False)
    with console.status(f"tracing {type(model).__name__} ({method})"):
        traced = trace(model, args, kwargs, method=method)
    console.print(f"[dim]traced {type(model).__name__} with {traced.method}: "
                  f"{len(traced.graph)} nodes in {time.perf_counter() - start:.1f} s[/dim]")
    for note in traced.notes:
        console.print(f"[dim]  note: {escape(note)}[/dim]")
    if axes or whole:  # names that matched no argument, checked against the placeholders
        from modelparallel.runtime.microbatch import resolve_split

        resolve_split(traced.input_names, microbatches, axes, whole)
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
