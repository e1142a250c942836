"""Shared post-processing of traced graphs: flat calling convention, shared tensors, any device.

Both tracer paths (:mod:`~modelparallel.tracer.fx_path`, module level, and
:mod:`~modelparallel.tracer.export_path`, op level) end here, so the graph module they produce
obeys the :class:`~modelparallel.tracer.traced.TracedModel` contract the same way.

Note [flat graph modules]
~~~~~~~~~~~~~~~~~~~~~~~~~
The user calls ``model(*args, **kwargs)`` with any nesting of tensors and Python values. The traced
``gm.forward`` instead takes one placeholder per leaf of
``torch.utils._pytree.tree_flatten((args, kwargs))``, in that order, and returns a plain tuple of
the output leaves. Non-tensor leaves (bools, ints, floats) keep a placeholder each, so the flat
inputs always line up with :meth:`TracedModel.flatten_inputs`, but the graph was specialised to
their example values: passing another value later has no effect. ``gm`` is always a plain
``torch.fx.GraphModule`` (no input-checking hooks, ``train()``/``eval()`` work) whose parameters
and buffers are the user model's own tensor objects under the same qualified names; tensor
constants created during tracing become non-persistent buffers. Train/eval behaviour is that of
the model when traced: an exported graph has dropout and BatchNorm baked in as ATen ops (so
``gm.eval()`` does not change them), while fx ``call_module`` leaves follow ``gm.train()``.

Note [device-neutral graphs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``torch.export`` freezes the device of the example into the graph: factory calls such as
``aten.arange(..., device=cpu)`` and ``aten.to(..., device=meta)`` carry it as a constant, and
``aten._assert_tensor_metadata`` nodes check it. A model traced on the meta device (or on CPU)
must later run on every stage's own accelerator, so the tracer erases the metadata assertions and
replaces every constant equal to the tracing device by a value computed at run time: the device
of the first tensor model input (node ``input_device``, calling :func:`input_device`). Every
pipeline rank moves its batch to its own device, so factory tensors follow. The node reads only
a model input, so it is input-derived (see ``ir.input_derived_nodes``) and every stage that needs
it recomputes it. torch.fx graphs read devices off live tensors (``x.device``) and need nothing.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = [
    "build_graph_module",
    "input_device",
    "leaf_names",
    "make_device_neutral",
    "make_flat_output",
    "model_device",
    "remove_export_checks",
    "reorder_placeholders",
    "shared_children_holder",
]


def input_device(tensor: torch.Tensor) -> torch.device:
    """The device of ``tensor``: where a device-neutral graph creates its factory tensors.

    See Note [device-neutral graphs].

    Example:
        >>> input_device(torch.zeros(1))
        device(type='cpu')
    """
    return tensor.device


def model_device(model: nn.Module, leaves: Sequence[Any]) -> torch.device:
    """The device a model is traced on: its first parameter's, else its first buffer's, else the
    first tensor input's, else CPU.

    Example:
        >>> model_device(nn.Linear(2, 2), [])
        device(type='cpu')
    """
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


_IDENT = re.compile(r"[^0-9a-zA-Z_]+")


def _sanitize(name: str) -> str:
    name = _IDENT.sub("_", name).strip("_") or "arg"
    if name[0].isdigit():
        name = f"arg_{name}"
    if keyword.iskeyword(name) or name in ("self", "forward") or hasattr(builtins, name):
        name = f"{name}_"
    return name


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
    """Readable, unique Python identifiers for the flat input leaves of ``(args, kwargs)``.

    Positional arguments take the name of the matching parameter of ``model.forward``, keyword
    arguments their key; nested leaves append their path (``batch_0``, ``inputs_mask``).

    Example:
        >>> leaf_names(nn.Linear(2, 2), (torch.zeros(1, 2),), {})
        ['input_']
    """
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    paths, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    names: list[str] = []
    used: set[str] = set()
    for path, _leaf in paths:
        top, rest = path[0], path[1:]
        if _key_name(top) == "0":  # positional
            idx = int(_key_name(rest[0]))
            base = params[idx].name if idx < len(params) else f"arg{idx}"
            rest = rest[1:]
        else:
            base = _key_name(rest[0])
            rest = rest[1:]
        name = _sanitize("_".join([base, *(_key_name(k) for k in rest)]))
        unique, i = name, 1
        while unique in used:
            unique, i = f"{name}_{i}", i + 1
        used.add(unique)
        names.append(unique)
    return names


def reorder_placeholders(graph: torch.fx.Graph, order: Sequence[str]) -> None:
    """Move the placeholders of ``graph`` into ``order`` (node names), before every other node."""
    by_name = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    assert sorted(by_name) == sorted(order), (sorted(by_name), sorted(order))
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for name in order:
        anchor.prepend(by_name[name])


def make_flat_output(graph: torch.fx.Graph) -> None:
    """Make the graph's output node return a plain tuple of leaves (Note [flat graph modules])."""
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    flat = list(value) if isinstance(value, list | tuple) else [value]
    out.args = (tuple(flat),)
    graph._codegen = torch.fx.graph.CodeGen()


def remove_export_checks(graph: torch.fx.Graph) -> list[str]:
    """Erase the input guards and tensor-metadata assertions of an exported graph.

    Returns:
        A note per kind of node removed.
    """
    removed: dict[str, int] = {}
    for node in list(graph.nodes):
        kind = None
        if node.op == "call_module" and node.target == "_guards_fn":
            kind = "input guard (_guards_fn)"
        elif node.op == "call_function" and node.target in (
                torch.ops.aten._assert_tensor_metadata.default,):
            kind = "aten._assert_tensor_metadata"
        if kind is None:
            continue
        for user in list(node.users):
            # Only dead uses are expected; guard against anything else.
            if user.op != "output":
                raise AssertionError(f"{node.name} has a live user {user.name}")
        graph.erase_node(node)
        removed[kind] = removed.get(kind, 0) + 1
    return [f"removed {n} {k} node(s) so the graph runs on any device; which input "
            "dimensions may vary is in the 'dynamic dimensions' note"
            for k, n in removed.items()]


def make_device_neutral(graph: torch.fx.Graph, device: torch.device,
                        example_leaves: Sequence[Any]) -> list[str]:
    """Replace constants equal to ``device`` by the run-time input device.

    See Note [device-neutral graphs].

    Returns:
        Notes on what was rewritten (or why it could not be).
    """
    uses: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node.op == "call_function" and any(
                isinstance(v, torch.device) and v == device
                for v in (*node.args, *node.kwargs.values())):
            uses.append(node)
    if not uses:
        return []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    source = next((ph for ph, leaf in zip(placeholders, example_leaves)
                   if isinstance(leaf, torch.Tensor)), None)
    if source is None:
        return [f"{len(uses)} node(s) create tensors on the fixed device {device}: the model has "
                "no tensor input to take the run-time device from"]
    with graph.inserting_after(placeholders[-1]):
        dev = graph.create_node("call_function", input_device, (source,), name="input_device")
    dev.meta["nn_module_stack"] = {}
    for node in uses:
        node.args = tuple(dev if isinstance(v, torch.device) and v == device else v
                          for v in node.args)
        node.kwargs = {k: dev if isinstance(v, torch.device) and v == device else v
                       for k, v in node.kwargs.items()}
    return [f"{len(uses)} factory/conversion node(s) fixed to {device} now use the device of "
            f"input {source.name!r} at run time (node 'input_device')"]


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor, *, persistent: bool) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    if isinstance(value, nn.Parameter):
        mod._buffers.pop(leaf, None)
        mod._parameters[leaf] = value
    else:
        mod._parameters.pop(leaf, None)
        mod._buffers[leaf] = value
        if persistent:
            mod._non_persistent_buffers_set.discard(leaf)
        else:
            mod._non_persistent_buffers_set.add(leaf)


def build_graph_module(holder: nn.Module, graph: torch.fx.Graph, model: nn.Module,
                       class_name: str) -> tuple[torch.fx.GraphModule, list[str]]:
    """A plain ``GraphModule`` over ``graph`` holding the model's own tensors.

    Args:
        holder: Resolves every ``get_attr``/``call_module`` target of ``graph``.
        graph: The normalised graph.
        model: The user's model: every target that names one of its parameters or buffers is
            pointed at that very tensor (no copies, Note [flat graph modules]).
        class_name: Class name of the generated module (shown in its code).

    Returns:
        The module, and notes on tensors that had to be re-pointed.
    """
    gm = torch.fx.GraphModule(holder, graph, class_name=class_name)
    model_params = dict(model.named_parameters(remove_duplicate=False))
    model_buffers = dict(model.named_buffers(remove_duplicate=False))
    non_persistent = _non_persistent_buffers(model)
    repointed = 0
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        target = str(node.target)
        current = _resolve(gm, target)
        if not isinstance(current, torch.Tensor):
            continue
        own: torch.Tensor | None = model_params.get(target)
        if own is None:
            own = model_buffers.get(target)
        if own is not None:
            if current is not own:
                repointed += 1
            _set_tensor(gm, target, own, persistent=target not in non_persistent)
        elif not isinstance(current, nn.Parameter):
            _set_tensor(gm, target, current, persistent=False)  # a traced constant
    gm.recompile()
    notes = [f"re-pointed {repointed} graph tensor(s) at the model's own parameters/buffers"
             ] if repointed else []
    return gm, notes


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name in mod._non_persistent_buffers_set:
            out.add(f"{prefix}.{name}" if prefix else name)
    return out


def shared_children_holder(model: nn.Module, constants: Iterable[tuple[str, torch.Tensor]]
                           ) -> nn.Module:
    """A module exposing the model's children, direct parameters and buffers (same objects) plus
    traced tensor constants, so ``GraphModule`` can resolve every target of an fx graph."""
    holder = nn.Module()
    for name, child in model.named_children():
        holder.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        holder.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        holder.register_buffer(name, b)
    for name, c in constants:
        if "." not in name and not hasattr(holder, name):
            holder.register_buffer(name, c, persistent=False)
    return holder
