"""The tracer's product: an executable flat graph module and its IR, kept in step.

Example:
    >>> import torch
    >>> from modelparallel.tracer import trace
    >>> traced = trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> traced.method
    'fx'
    >>> [n.name for n in traced.graph.placeholders] == list(traced.input_names)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError
from modelparallel.ir import Graph

__all__ = ["TracedModel"]


@dataclass
class TracedModel:
    """A model traced into a flat ``torch.fx.GraphModule`` and the matching IR graph.

    Contract (codegen relies on it):

    - ``gm.forward(*flat_inputs)`` takes the leaves of the user's ``(args, kwargs)``, flattened
      with ``in_spec``, one placeholder each, and returns a tuple of the output leaves, which
      ``out_spec`` rebuilds into the model's output.
    - Every IR node has a ``gm`` node of the same name. ``gm`` also has ``get_attr`` nodes for
      parameters, buffers and tensor constants, which are not IR nodes: the IR lists them in the
      ``params`` of the nodes that read them (under canonical names, see ``param_names``).
    - ``gm`` holds the user model's own parameter and buffer tensors (no copies), under the same
      qualified names, so a model on the meta device gives a meta ``gm``.

    Attributes:
        graph: The IR graph.
        gm: The executable graph module.
        method: ``"fx"`` (torch.fx symbolic tracing) or ``"export"`` (torch.export, non-strict).
        in_spec: Pytree spec of ``(args, kwargs)`` as the example was given.
        out_spec: Pytree spec of the model's output.
        input_names: Placeholder names of ``gm``, in flat-input order.
        param_names: Every qualified parameter/buffer name (aliases included) to its canonical
            name in the IR.
        notes: What happened while tracing (e.g. why fx failed and export was used).
        dynamic: Whether ``gm`` accepts other batch and sequence sizes than the example (fx
            graphs always; export graphs when their input dimensions stayed symbolic, Note
            [dynamic export] in ``modelparallel/tracer/export_path.py``).
        timings: Seconds spent per tracing phase (``trace``, ``annotate``, ``ir``, ``total``).
        constants: ``(flat index, traced value)`` of every non-tensor input leaf of the example
            (``None``, flags, scalars): the graph has them baked in, so later calls must pass
            the same values (Note [guarded inputs]).
        static_dims: Placeholder name to its traced size per dimension, ``None`` where the
            dimension stays symbolic; absent names are fully dynamic (fx graphs). A call with
            another size in a static dimension is refused (:meth:`check_shapes`).

    Note [guarded inputs]
    ~~~~~~~~~~~~~~~~~~~~~
    A traced graph takes its tensor inputs as placeholders but bakes every non-tensor leaf of the
    example into the graph: a Python flag the model branches on, a keyword-only scalar, a
    ``None`` where a tensor may later come (an attention mask). Running the graph with other
    values would silently compute the traced branch, so :meth:`flatten_inputs` compares every
    such leaf with its traced value and raises :class:`~modelparallel.errors.ConfigError`
    naming the argument, the traced value and the new one; a tensor where the example had a
    non-tensor (or the reverse) is refused the same way. To vary such a value, trace (build a
    pipeline) once per value, or pass it as a tensor.
    """

    graph: Graph
    gm: torch.fx.GraphModule
    method: str
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: tuple[str, ...]
    param_names: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    dynamic: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)
    constants: tuple[tuple[int, Any], ...] = ()
    static_dims: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)

    def flatten_inputs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                       *, check: bool = True) -> list[Any]:
        """The flat input leaves for ``gm`` from call arguments shaped like the example.

        Args:
            args: Positional arguments.
            kwargs: Keyword arguments.
            check: Also refuse non-tensor values that differ from the traced ones (Note
                [guarded inputs]); a pipeline checks them later, on rank 0's batch.

        Raises:
            ConfigError: if the arguments are structured differently from the traced example
                (other keyword names, another nesting), or a non-tensor value differs.
        """
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise ConfigError(
                "the inputs are structured differently from the example the model was traced "
                f"with: expected {self.in_spec}, got {spec}. Pass the same positional and "
                "keyword arguments as the example batch.")
        if check:
            self._check_constants(leaves)
        return leaves

    def check_inputs(self, leaves: Sequence[Any]) -> None:
        """Refuse flat inputs (of a microbatch) the graph cannot run as traced: non-tensor
        values other than the traced ones (Note [guarded inputs]), sizes other than the traced
        ones in specialised dimensions (:meth:`check_shapes`).

        Raises:
            ConfigError: naming the input, the traced value and the new one.
        """
        self._check_constants(leaves)
        self.check_shapes(leaves)

    def _input_label(self, index: int) -> str:
        return repr(self.input_names[index]) if index < len(self.input_names) else f"#{index}"

    def _check_constants(self, leaves: Sequence[Any]) -> None:
        """Refuse non-tensor leaves that differ from the traced ones (Note [guarded inputs])."""
        constant = dict(self.constants)
        for i, leaf in enumerate(leaves):
            if i in constant:
                traced = constant[i]
                if not _same_value(traced, leaf):
                    raise ConfigError(
                        f"argument {self._input_label(i)} was {traced!r} when the model was "
                        f"traced and is {_describe(leaf)} now; the traced graph has the traced "
                        "value built in (Note [guarded inputs]), so it would silently compute "
                        "with the old one. Pass the same value at every step, or build the "
                        "pipeline with an example that has the new value (pass a value that "
                        "changes between steps as a tensor).")
            elif not isinstance(leaf, torch.Tensor) and not hasattr(leaf, "smp_slice"):
                raise ConfigError(
                    f"argument {self._input_label(i)} was a tensor when the model was traced "
                    f"and is {_describe(leaf)} now; pass a tensor, as in the example.")

    def check_shapes(self, leaves: Sequence[Any], what: str = "microbatch") -> None:
        """Refuse tensor leaves whose size differs from the traced one in a dimension the
        graph specialised (``static_dims``).

        Raises:
            ConfigError: naming the input, the dimension, the traced and the new size.
        """
        for i, leaf in enumerate(leaves):
            name = self.input_names[i] if i < len(self.input_names) else ""
            dims = self.static_dims.get(name)
            if dims is None or not isinstance(leaf, torch.Tensor):
                continue
            if leaf.dim() != len(dims):
                raise ConfigError(
                    f"input {name!r} was traced with {len(dims)} dimensions and has "
                    f"{leaf.dim()} in this {what} (shape {tuple(leaf.shape)})")
            for d, (traced, now) in enumerate(zip(dims, leaf.shape)):
                if traced is not None and traced != now:
                    raise ConfigError(
                        f"input {name!r} has size {now} in dimension {d} of this {what} but "
                        f"the traced graph fixed that dimension to {traced} (traced shape "
                        f"{tuple(x if x is not None else '*' for x in dims)}; '*' is dynamic). "
                        "Trace with the shapes you will train on (an example batch with "
                        "microbatches of the training size).")

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the model's output structure from the flat output leaves."""
        return pytree.tree_unflatten(list(flat), self.out_spec)


def _same_value(traced: Any, now: Any) -> bool:
    if isinstance(now, torch.Tensor) or type(traced) is not type(now):
        return False
    if traced is now:
        return True
    try:
        equal = traced == now
    except Exception:
        return False
    if isinstance(equal, bool):
        return equal or (isinstance(traced, float) and traced != traced and now != now)
    return False


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)
