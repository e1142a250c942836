"""Step 1 of Note [causal masks] in :mod:`~modelparallel.tracer.masks`: recognising SDPA calls,
reads of tensor metadata and a mask's shape-only region.

A mask is *shape-only* when its ancestors, up to reads of tensor metadata, read no input values,
no parameter, no meta-device buffer and nothing random, and nothing outside the region writes into
it. :func:`_region` returns that subgraph and, when the mask is not shape-only, the reason.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x: x.size(1))
    >>> [_is_meta_read(n) for n in gm.graph.nodes]
    [False, True, False]
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch

from modelparallel.tracer.normalize import input_device

__all__: list[str] = []  # private helpers of modelparallel.tracer.masks

_SDPA_TARGETS: tuple[Any, ...] = (
    torch.nn.functional.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.scaled_dot_product_attention,
)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")
_META_FUNCTIONS: tuple[Any, ...] = (
    torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default,
    torch.ops.aten.sym_numel.default, input_device)
_META_METHODS = ("size", "dim", "ndimension", "numel")
# Ops that read only the metadata of their first input (their other inputs are values).
_FIRST_META_METHODS = ("new_ones", "new_zeros", "new_full", "new_empty", "new_tensor")
_FIRST_META_FUNCTIONS: tuple[Any, ...] = (
    torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like,
    torch.ops.aten.new_ones.default, torch.ops.aten.new_zeros.default,
    torch.ops.aten.new_full.default, torch.ops.aten.new_empty.default,
    torch.ops.aten.ones_like.default, torch.ops.aten.zeros_like.default,
    torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default)
_META_ATTRS = ("shape", "dtype", "device", "ndim")
_RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform")
_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.iand, operator.ior, operator.ixor, operator.setitem)


def _is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(node.target is t for t in _SDPA_TARGETS)


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    bound = dict(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def _is_meta_read(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only metadata (shape, dtype, device) of its tensor input."""
    if node.op == "call_function":
        if any(node.target is f for f in _META_FUNCTIONS):
            return True
        return (node.target is builtins.getattr and len(node.args) == 2
                and node.args[1] in _META_ATTRS)
    return node.op == "call_method" and node.target in _META_METHODS


def _metadata_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs of ``node`` whose values it does not read, only their metadata."""
    if _is_meta_read(node):
        return node.all_input_nodes
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node) or any(
            a is first for a in (*node.args[1:], *node.kwargs.values())):
        return []
    if (node.op == "call_method" and node.target in _FIRST_META_METHODS) or (
            node.op == "call_function" and any(node.target is f for f in _FIRST_META_FUNCTIONS)):
        return [first]
    return []


def _reads_device(node: torch.fx.Node) -> bool:
    return node.target is input_device or (
        node.target is builtins.getattr and node.args[1:] == ("device",))


def _target_name(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _is_random(node: torch.fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    name = _target_name(node).lower()
    return any(w in name for w in _RANDOM_WORDS)


def _mutates(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether ``node`` may write into one of its inputs."""
    target = node.target
    if node.op == "call_method":
        name = str(target)
        return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(target)), "inplace", False))
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return bool(target._schema.is_mutable)
    if any(target is op for op in _IN_PLACE_OPERATORS):
        return True
    name = _target_name(node)
    return (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True


def _region(mask: torch.fx.Node, gm: torch.fx.GraphModule, params: frozenset[str]
            ) -> tuple[set[torch.fx.Node], str | None]:
    """The mask's subgraph up to metadata reads, and why it is not shape-only (or None)."""
    region: set[torch.fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in region:
            continue
        region.add(node)
        if _is_meta_read(node):
            continue
        reason = _refusal(node, gm, params)
        if reason is not None:
            return region, reason
        skip = _metadata_inputs(node)
        stack.extend(a for a in node.all_input_nodes if a not in skip)
    for node in region:
        for user in node.users:
            if user not in region and not _is_sdpa(user) and _mutates(user, gm):
                return region, f"node {user.name!r} modifies the mask in place"
    return region, None


def _refusal(node: torch.fx.Node, gm: torch.fx.GraphModule, params: frozenset[str]
             ) -> str | None:
    if node.op == "placeholder":
        return f"it reads the values of input {node.target!r}"
    if node.op == "call_module":
        return f"it calls module {node.target!r}"
    if node.op == "get_attr":
        target = str(node.target)
        if target in params:
            return "it reads a parameter (a learned bias)"
        value = operator.attrgetter(target)(gm)
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return "it reads a buffer on the meta device (no values)"
        return None
    if _is_random(node):
        return f"it is random ({_target_name(node)})"
    return None
