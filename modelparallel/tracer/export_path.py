"""Op-level tracing: ``torch.export`` (non-strict) into a flat ATen-level graph.

Used when torch.fx cannot trace the model (Hugging Face models, data-dependent Python), or on
request. The exported program's module is normalised like the fx path (Note [flat graph modules]
in ``normalize.py``): placeholders in the user's flat-input order, a plain tuple output, no input
guards or device assertions, device constants made run-time (Note [device-neutral graphs]).

Note [dynamic export]
~~~~~~~~~~~~~~~~~~~~~
With ``dynamic=True`` every dimension of every tensor input is exported as
``torch.export.Dim.AUTO``: dimensions the model does not specialise stay symbolic, so the graph
runs on microbatches and on other sequence lengths than the example. Export specialises
dimensions of size 0 or 1, and any dimension the model fixes (a reshape to a constant, a
comparison with a configuration value); those stay static. If a dynamic export fails, the model
is exported again with static shapes and a note says so. A batch of one would specialise the
batch dimension (a microbatch of size 1 is the common case), so tensor inputs whose dimension 0
has size 1 are exported on the example repeated twice along it; the graph's batch dimension
then stays symbolic and still runs on the size-1 example (the tracer annotates it with the
original example). If that export fails, the size-1 example is exported as is and
``TracedModel.static_dims`` records the dimensions it fixed.

Example:
    >>> import torch
    >>> raw = trace_export(torch.nn.Linear(4, 2), (torch.randn(3, 4),), {}, dynamic=True)
    >>> raw.dynamic
    True
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from modelparallel.tracer.fx_path import RawTrace
from modelparallel.tracer.normalize import (
    make_flat_output,
    remove_export_checks,
    reorder_placeholders,
)

__all__ = ["trace_export"]


def _auto_dims(value: Any) -> Any:
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(v.dim())}
        return None
    return pytree.tree_map(leaf, value)


def _dynamic_shapes(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
                    ) -> dict[str, Any]:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    return {name: _auto_dims(value) for name, value in bound.arguments.items()}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what a failing export prints (its partial graph, symbolic-shape warnings): the
    tracer reports failures itself, as a TracingError."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool
            ) -> tuple[torch.export.ExportedProgram, list[str]]:
    notes: list[str] = []
    if dynamic:
        wide = _widen_batch((args, kwargs))
        if wide is not None:
            try:
                shapes = _dynamic_shapes(model, *wide)
                with _quiet():
                    return torch.export.export(model, *wide, strict=False,
                                               dynamic_shapes=shapes), notes
            except Exception as e:
                notes.append(f"torch.export on the batch-1 example repeated to batch 2 failed "
                             f"({_short(e)}); exported the batch-1 example, whose batch "
                             "dimension export fixes to 1")
        try:
            shapes = _dynamic_shapes(model, args, kwargs)
            with _quiet():
                return torch.export.export(model, args, kwargs, strict=False,
                                           dynamic_shapes=shapes), notes
        except Exception as e:
            notes.append(f"torch.export with dynamic shapes failed ({_short(e)}); exported "
                         "with the example's static shapes, so batch and sequence sizes must "
                         "match the example")
    with _quiet():
        return torch.export.export(model, args, kwargs, strict=False), notes


def _widen_batch(example: tuple[tuple[Any, ...], dict[str, Any]]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The example with every tensor whose dimension 0 has size 1 repeated twice along it, or
    ``None`` if there is none (Note [dynamic export])."""
    leaves = pytree.tree_leaves(example)
    if not any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 for v in leaves):
        return None

    def widen(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t], 0) if t.dim() > 0 and t.shape[0] == 1 else t

    args, kwargs = pytree.tree_map_only(torch.Tensor, widen, example)
    return tuple(args), dict(kwargs)


def _path_keys(spec: pytree.TreeSpec) -> list[str]:
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(dummy)[0]]


def _dynamic_dims(graph: torch.fx.Graph) -> list[str]:
    dims: list[str] = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for i, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and not s.node.is_nested_int():
                    try:
                        int(str(s))
                    except ValueError:
                        dims.append(f"{node.name}[{i}]")
    return dims


def trace_export(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any], *,
                 dynamic: bool) -> RawTrace:
    """Export ``model`` (non-strict) and normalise the graph (Note [flat graph modules]).

    Args:
        model: The model.
        args: Example positional inputs.
        kwargs: Example keyword inputs.
        dynamic: Export every tensor dimension as ``Dim.AUTO`` (Note [dynamic export]).

    Raises:
        Exception: whatever torch.export raises; :func:`modelparallel.tracer.trace` turns it
            into a :class:`~modelparallel.errors.TracingError`.
    """
    args, kwargs = tuple(args), dict(kwargs)
    ep, notes = _export(model, args, kwargs, dynamic)
    gm = ep.module()
    graph = gm.graph
    in_spec: pytree.TreeSpec = gm._in_spec
    out_spec = gm._out_spec
    assert out_spec is not None
    # Placeholders follow export's input spec (kwargs in signature order); put them in the
    # user's flat order.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    export_keys = _path_keys(in_spec)
    user_keys = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path((args, kwargs))[0]]
    if len(placeholders) != len(export_keys) or sorted(export_keys) != sorted(user_keys):
        raise RuntimeError(
            f"torch.export produced inputs {export_keys} for example inputs {user_keys}; "
            "cannot line them up")
    by_key = dict(zip(export_keys, placeholders))
    reorder_placeholders(graph, [by_key[k].name for k in user_keys])
    make_flat_output(graph)
    notes += remove_export_checks(graph)
    dims = _dynamic_dims(graph)
    if dynamic and dims:
        notes.append(f"dynamic dimensions: {', '.join(dims)}")
    elif dynamic and not any(n.startswith("torch.export with dynamic") for n in notes):
        notes.append("torch.export specialised every input dimension (no dynamic dims)")
    graph.lint()
    return RawTrace(graph=graph, holder=gm, out_spec=out_spec, dynamic=bool(dims), notes=notes)
