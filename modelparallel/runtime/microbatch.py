"""Splitting a batch into microbatches and merging per-microbatch outputs (SMP semantics).

Every rank holds the whole batch (Note [inputs on every rank] in
``modelparallel/partitioner/problem.py``) and splits it locally, so a batch that does not divide
into the microbatches is reported on every rank before any communication.

Rules, per flat input leaf (the leaves of ``(args, kwargs)`` that
:meth:`~modelparallel.tracer.TracedModel.flatten_inputs` gives):

- a tensor is split along axis 0, or along the axis ``input_split_axes`` gives for its name or
  flat index, into equal consecutive pieces (views, no copies);
- an input named in ``non_split_inputs`` (by name or flat index), a 0-d tensor, and a non-tensor
  leaf are passed whole to every microbatch;
- an object with a ``smp_slice(num_mb, mb, axis)`` method splits itself.

Targets are split the same way (tensor leaves along axis 0, ``smp_slice`` objects, the rest whole).

Example:
    >>> import torch
    >>> spec = resolve_split(("x", "flag"), 2)
    >>> mbs = split_inputs([torch.arange(4), True], spec)
    >>> [mb[0].tolist() for mb in mbs], mbs[1][1]
    ([[0, 1], [2, 3]], True)
    >>> merge_outputs([torch.ones(2), torch.zeros(2)]).tolist()
    [1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError

__all__ = [
    "SplitSpec",
    "first_microbatch",
    "merge_outputs",
    "resolve_split",
    "shape_key",
    "split_inputs",
    "split_target",
    "stack_outputs",
    "unstack_outputs",
]


@dataclass(frozen=True)
class SplitSpec:
    """How to split the flat model inputs into microbatches.

    Attributes:
        num_microbatches: Microbatches per step.
        names: Names of the flat inputs, for messages.
        axes: Flat input index to split axis, for inputs not split along axis 0.
        whole: Flat input indices passed whole to every microbatch.
    """

    num_microbatches: int
    names: tuple[str, ...] = ()
    axes: Mapping[int, int] = field(default_factory=dict)
    whole: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ConfigError(
                f"microbatches = {self.num_microbatches!r} must be an integer >= 1")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "axes", dict(self.axes))
        object.__setattr__(self, "whole", frozenset(self.whole))

    def name(self, index: int) -> str:
        """A readable name of flat input ``index``."""
        if index < len(self.names) and self.names[index]:
            return repr(self.names[index])
        return f"#{index}"


def resolve_split(names: Sequence[str], num_microbatches: int,
                  input_split_axes: Mapping[str | int, int] | None = None,
                  non_split_inputs: Iterable[str | int] = ()) -> SplitSpec:
    """Turn user options keyed by input name or flat index into a :class:`SplitSpec`.

    Args:
        names: Names of the flat inputs, in order (``StageProgram.input_names``).
        num_microbatches: Microbatches per step.
        input_split_axes: Input name or flat index to the axis to split along (default 0).
        non_split_inputs: Input names or flat indices passed whole.

    Raises:
        ConfigError: for an unknown name, an index out of range or a negative axis.

    Example:
        >>> resolve_split(("a", "b"), 2, {"b": 1}, ["a"]).axes
        {1: 1}
    """
    names = tuple(names)

    def index_of(key: str | int, option: str) -> int:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ConfigError(f"{option} key {key!r} must be an input name or a flat index")
        if isinstance(key, int):
            if key < 0 or (names and key >= len(names)):
                raise ConfigError(f"{option} index {key} is out of range; the model has "
                                  f"{len(names)} flat inputs {list(names)}")
            return key
        if key not in names:
            raise ConfigError(f"{option} names input {key!r}, but the model's inputs are "
                              f"{list(names)}; use one of those names or a flat index")
        return names.index(key)

    axes: dict[int, int] = {}
    for key, axis in dict(input_split_axes or {}).items():
        if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
            raise ConfigError(f"input_split_axes[{key!r}] = {axis!r} must be an integer >= 0")
        i = index_of(key, "input_split_axes")
        if axis != 0:
            axes[i] = axis
    whole = frozenset(index_of(k, "non_split_inputs") for k in non_split_inputs)
    return SplitSpec(num_microbatches, names, axes, whole)


def split_inputs(flat: Sequence[Any], spec: SplitSpec) -> list[list[Any]]:
    """Split the flat inputs into ``spec.num_microbatches`` lists of flat inputs.

    Raises:
        ConfigError: if a split tensor's size along its axis does not divide by the number of
            microbatches, or its axis is out of range. Raised identically on every rank.
    """
    m = spec.num_microbatches
    columns = [_split_leaf(v, m, spec.axes.get(i, 0), i in spec.whole, spec.name(i))
               for i, v in enumerate(flat)]
    return [[col[j] for col in columns] for j in range(m)]


def split_target(target: Any, num_microbatches: int) -> list[Any]:
    """Split a target structure: tensor leaves along axis 0, ``smp_slice`` objects, rest whole.

    Raises:
        ConfigError: if a target tensor's batch size does not divide by the microbatches.

    Example:
        >>> [t.tolist() for t in split_target(torch.tensor([1, 2]), 2)]
        [[1], [2]]
    """
    leaves, spec = pytree.tree_flatten(target)
    columns = [_split_leaf(v, num_microbatches, 0, False, f"target leaf #{i}")
               for i, v in enumerate(leaves)]
    return [pytree.tree_unflatten([c[j] for c in columns], spec)
            for j in range(num_microbatches)]


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Merge per-microbatch outputs: tensors concatenated on axis 0 (0-d tensors stacked),
    anything else taken from the first microbatch.

    Example:
        >>> merge_outputs([(torch.tensor(1.0), 3), (torch.tensor(2.0), 3)])
        (tensor([1., 2.]), 3)
    """
    if not outputs:
        raise ConfigError("no microbatch outputs to merge")
    if len(outputs) == 1:
        return outputs[0]
    flats = [pytree.tree_flatten(o) for o in outputs]
    spec = flats[0][1]
    merged = []
    for i, first in enumerate(flats[0][0]):
        if isinstance(first, torch.Tensor):
            parts = [f[0][i] for f in flats]
            merged.append(torch.stack(parts) if first.dim() == 0 else torch.cat(parts, 0))
        else:
            merged.append(first)
    return pytree.tree_unflatten(merged, spec)


def stack_outputs(outputs: Sequence[Any]) -> Any:
    """Per-microbatch outputs as one structure whose tensors are stacked on a new axis 0 (one
    tensor per leaf to broadcast instead of one per leaf and microbatch); other leaves are taken
    from the first microbatch. :func:`unstack_outputs` inverts it exactly.

    Example:
        >>> s = stack_outputs([(torch.tensor(1.0), 3), (torch.tensor(2.0), 3)])
        >>> s[0].tolist(), [o[0].dim() for o in unstack_outputs(s, 2)]
        ([1.0, 2.0], [0, 0])
    """
    if not outputs:
        raise ConfigError("no microbatch outputs to stack")
    flats = [pytree.tree_flatten(o) for o in outputs]
    spec = flats[0][1]
    stacked = [torch.stack([f[0][i] for f in flats]) if isinstance(first, torch.Tensor)
               else first for i, first in enumerate(flats[0][0])]
    return pytree.tree_unflatten(stacked, spec)


def unstack_outputs(stacked: Any, num_microbatches: int) -> list[Any]:
    """The per-microbatch outputs of :func:`stack_outputs`."""
    leaves, spec = pytree.tree_flatten(stacked)
    return [pytree.tree_unflatten([v[j] if isinstance(v, torch.Tensor) else v for v in leaves],
                                  spec) for j in range(num_microbatches)]


def shape_key(flat: Sequence[Any], mode: str) -> tuple[Any, ...]:
    """What every rank can tell locally about a batch: its leaves' shapes and dtypes, and the
    values of its hashable non-tensor leaves. Boundary metadata is exchanged when it changes
    (Note [boundary metadata] in ``modelparallel/runtime/templates.py``).

    Example:
        >>> shape_key([torch.zeros(2, 3), 5], "train")
        ('train', ((2, 3), torch.float32), ('v', 5))
    """
    parts: list[Any] = [mode]
    for v in flat:
        if isinstance(v, torch.Tensor):
            parts.append((tuple(v.shape), v.dtype))
        else:
            try:
                hash(v)
                parts.append(("v", v))
            except TypeError:
                parts.append(("t", type(v).__qualname__))
    return tuple(parts)


def _split_leaf(value: Any, m: int, axis: int, whole: bool, name: str) -> list[Any]:
    if whole or m == 1:
        return [value] * m
    if hasattr(value, "smp_slice") and callable(value.smp_slice):
        return [value.smp_slice(m, j, axis) for j in range(m)]
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return [value] * m
    if axis >= value.dim():
        raise ConfigError(
            f"input {name} has {value.dim()} dimensions, so it cannot be split along axis "
            f"{axis}; fix input_split_axes or list it in non_split_inputs")
    size = value.shape[axis]
    if size % m:
        raise ConfigError(
            f"input {name} has size {size} along axis {axis}, which does not divide into "
            f"{m} microbatches; use a batch size that is a multiple of {m}, another number of "
            "microbatches, or list the input in non_split_inputs")
    step = size // m
    return [value.narrow(axis, j * step, step) for j in range(m)]


def first_microbatch(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     m: int, axes: Mapping[str | int, int] | None = None,
                     whole: Iterable[str | int] = ()) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Microbatch 0 of an example call of ``model``, for tracing: cut by the same rules as the
    training batches (:func:`resolve_split`, :func:`split_inputs`), so the CLI and
    :func:`modelparallel.pipeline` trace the same microbatch. Inputs are named here by their
    argument names; names that do not match are checked again, against the traced placeholder
    names, when the pipeline is built.

    Example:
        >>> mb, _ = first_microbatch(torch.nn.Linear(4, 2), (torch.zeros(8, 4),), {}, 4)
        >>> tuple(mb[0].shape)
        (2, 4)
    """
    axes = axes or {}
    leaves, spec = pytree.tree_flatten((args, kwargs))
    names = _leaf_names(model, args, kwargs, len(leaves))
    known_axes = {k: v for k, v in axes.items() if isinstance(k, int) or k in names}
    known_whole = [k for k in whole if isinstance(k, int) or k in names]
    split = resolve_split(names, m, known_axes, known_whole)
    first = split_inputs(leaves, split)[0]
    mb_args, mb_kwargs = pytree.tree_unflatten(first, spec)
    return tuple(mb_args), dict(mb_kwargs)


def _leaf_names(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: int
                ) -> tuple[str, ...]:
    import inspect

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(f"arg{i}" for i in range(n))
    names: list[str] = []
    for name, value in bound.arguments.items():
        count = len(pytree.tree_leaves(value))
        names += [name] if count == 1 else [f"{name}_{i}" for i in range(count)]
    return tuple(names) if len(names) == n else tuple(f"arg{i}" for i in range(n))
