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

    def flatten_inputs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                       ) -> list[Any]:
        """The flat input leaves for ``gm`` from call arguments shaped like the example.

        Raises:
            ConfigError: if the arguments are structured differently from the traced example
                (other keyword names, another nesting).
        """
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise ConfigError(
                "the inputs are structured differently from the example the model was traced "
                f"with: expected {self.in_spec}, got {spec}. Pass the same positional and "
                "keyword arguments as the example batch.")
        return leaves

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the model's output structure from the flat output leaves."""
        return pytree.tree_unflatten(list(flat), self.out_spec)
