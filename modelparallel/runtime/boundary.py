"""Boundary values as tensors plus a picklable template (Note [boundary metadata] in
``modelparallel/runtime/templates.py``).

A stage sends a tuple of values: tensors, tuples/lists of them, and non-tensors (ints, shapes,
``None``); the last stage broadcasts the model output (any pytree). :func:`pack` flattens them
with ``torch.utils._pytree``, replaces every tensor by a :class:`TensorSlot` (shape, dtype,
whether a gradient flows back) and returns the template and the tensors; the receiver allocates
buffers from the template's slots, receives into them, and :func:`unpack` puts them back.
Non-tensor values travel inside the template.

Example:
    >>> import torch
    >>> template, tensors = pack((torch.zeros(2, 3), (torch.ones(1), 4), None))
    >>> [s.shape for s in slots(template)]
    [(2, 3), (1,)]
    >>> unpack(template, tensors)[1][1]
    4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["TensorSlot", "allocate", "grad_flags", "pack", "slots", "unpack"]


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor goes in a template.

    Attributes:
        index: Position in the flat tensor list.
        shape: Its shape.
        dtype: Its dtype.
        requires_grad: Whether the sender will take a gradient for it (a floating tensor that
            requires grad); the receiver then sends one back.
    """

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def pack(values: Sequence[Any]) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """Split ``values`` into a template and the list of its tensors, in slot order.

    The template is ``(treespec, leaves)``: the pytree structure of ``values`` (tuples, lists,
    dicts, ``ModelOutput``...) and its leaves with every tensor replaced by a slot.
    """
    leaves, spec = pytree.tree_flatten(tuple(values))
    tensors: list[torch.Tensor] = []
    out: list[Any] = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            grad = bool(v.requires_grad and (v.is_floating_point() or v.is_complex()))
            out.append(TensorSlot(len(tensors), tuple(v.shape), v.dtype, grad))
            tensors.append(v)
        else:
            out.append(v)
    return (spec, tuple(out)), tensors


def unpack(template: tuple[Any, ...], tensors: Sequence[torch.Tensor]) -> list[Any]:
    """Rebuild the values of ``template`` with ``tensors`` in its slots."""
    spec, leaves = template
    filled = [tensors[v.index] if isinstance(v, TensorSlot) else v for v in leaves]
    return list(pytree.tree_unflatten(filled, spec))


def slots(template: tuple[Any, ...]) -> list[TensorSlot]:
    """The template's tensor slots in index order."""
    return [v for v in template[1] if isinstance(v, TensorSlot)]


def grad_flags(template: tuple[Any, ...]) -> list[bool]:
    """Per slot, whether a gradient flows back through it."""
    return [s.requires_grad for s in slots(template)]


def allocate(template: tuple[Any, ...], device: torch.device) -> list[torch.Tensor]:
    """Empty receive buffers for the template's slots."""
    return [torch.empty(s.shape, dtype=s.dtype, device=device) for s in slots(template)]
