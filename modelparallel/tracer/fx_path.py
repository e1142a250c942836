"""Module-level tracing: torch.fx symbolic tracing with user-chosen leaf modules.

A leaf module is recorded as one ``call_module`` node instead of being traced through. torch's
defaults apply (modules of ``torch.nn`` are leaves, ``nn.Sequential`` is not); the user adds
module types or qualified names. The model is traced through a thin wrapper whose ``forward``
takes the flat input leaves (Note [flat graph modules] in ``normalize.py``); the wrapper's
attribute prefix is stripped from every target afterwards, so ``call_module`` and ``get_attr``
targets are the model's own qualified names and module paths are relative to the model.

Example:
    >>> import torch
    >>> raw = trace_fx(torch.nn.Sequential(torch.nn.Linear(2, 2)), (torch.zeros(1, 2),), {}, ())
    >>> [n.op for n in raw.graph.nodes]
    ['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from modelparallel.tracer.normalize import leaf_names, shared_children_holder

__all__ = ["LeafSpec", "RawTrace", "trace_fx"]

#: A leaf module given as a type (every instance) or a qualified name (that one module).
LeafSpec = type[nn.Module] | str

_PREFIX = "_mp_root"


@dataclass
class RawTrace:
    """A traced graph before the shared post-processing (internal to the tracer).

    Attributes:
        graph: The flat graph (placeholders in flat-input order, tuple output).
        holder: A module that resolves every ``get_attr``/``call_module`` target of ``graph``.
        out_spec: Pytree spec of the model's output.
        dynamic: Whether the graph accepts other batch and sequence sizes than the example.
        notes: What happened while tracing.
    """

    graph: torch.fx.Graph
    holder: nn.Module
    out_spec: pytree.TreeSpec
    dynamic: bool
    notes: list[str] = field(default_factory=list)


def _strip(path: str) -> str:
    if path == _PREFIX:
        return ""
    if path.startswith(_PREFIX + "."):
        return path[len(_PREFIX) + 1:]
    return path


class _LeafTracer(torch.fx.Tracer):
    """fx tracer honouring extra leaf modules, reporting model-relative module paths."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...], leaf_names: frozenset[str]
                 ) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def path_of_module(self, mod: nn.Module) -> str:
        return _strip(super().path_of_module(mod))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == "":
            return False  # the model itself is always traced through
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _FlatWrapper(nn.Module):
    """Calls the model from flat input leaves and returns flat output leaves."""

    def __init__(self, model: nn.Module, in_spec: pytree.TreeSpec, consts: Mapping[int, Any]
                 ) -> None:
        super().__init__()
        setattr(self, _PREFIX, model)
        self._mp_in_spec = in_spec
        self._mp_consts = dict(consts)
        self._mp_out_spec: pytree.TreeSpec | None = None

    def _mp_call(self, leaves: list[Any]) -> tuple[Any, ...]:
        full = [self._mp_consts.get(i, leaf) for i, leaf in enumerate(leaves)]
        args, kwargs = pytree.tree_unflatten(full, self._mp_in_spec)
        out = getattr(self, _PREFIX)(*args, **kwargs)
        flat, spec = pytree.tree_flatten(out)
        self._mp_out_spec = spec
        return tuple(flat)


def _wrapper(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _FlatWrapper:
    leaves, in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    names = leaf_names(model, args, kwargs)
    consts = {i: leaf for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
    params = ", ".join(names)
    src = f"def forward(self{', ' if names else ''}{params}):\n" \
          f"    return self._mp_call([{params}])\n"
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<modelparallel flat forward of {type(model).__name__}>", "exec"),
         namespace)
    cls = type(f"Flat{type(model).__name__}", (_FlatWrapper,), {"forward": namespace["forward"]})
    return cls(model, in_spec, consts)


def trace_fx(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
             leaf_modules: Sequence[LeafSpec]) -> RawTrace:
    """Trace ``model`` with torch.fx into a flat graph (Note [flat graph modules]).

    Args:
        model: The model.
        args: Example positional inputs.
        kwargs: Example keyword inputs.
        leaf_modules: Extra leaf modules: types, or qualified names relative to ``model``.

    Raises:
        Exception: whatever torch.fx raises; :func:`modelparallel.tracer.trace` turns it into
            a :class:`~modelparallel.errors.TracingError` or falls back to torch.export.
    """
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    names = frozenset(m for m in leaf_modules if isinstance(m, str))
    wrapper = _wrapper(model, args, kwargs)
    tracer = _LeafTracer(types, names)
    graph = tracer.trace(wrapper)
    assert wrapper._mp_out_spec is not None
    constants: list[tuple[str, torch.Tensor]] = []
    for node in graph.nodes:
        if node.op == "get_attr":
            target = str(node.target)
            stripped = _strip(target)
            if stripped != target:
                node.target = stripped
                node._rename(stripped.replace(".", "_"))
            else:
                value = getattr(wrapper, target)
                if isinstance(value, torch.Tensor):
                    constants.append((target, value))
    holder = shared_children_holder(model, constants)
    return RawTrace(graph=graph, holder=holder, out_spec=wrapper._mp_out_spec, dynamic=True)
