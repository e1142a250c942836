"""What codegen hands the runtime for one stage: a graph module and how to wire it.

The calling convention of ``StageProgram.module`` is the contract between codegen and the
runtime (Note [stage calling convention]).

Note [stage calling convention]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``module.forward`` takes, in order:

1. the flat model inputs this stage reads, in the order of ``model_inputs`` (indices into the
   flat input list of :meth:`modelparallel.tracer.TracedModel.flatten_inputs`); every rank holds
   the whole batch, so these are sliced locally, never received;
2. the values received from the previous stage, in the order of ``recv``.

It returns a tuple holding, in order:

1. the values to send to the next stage, in the order of ``send`` (empty on the last stage);
2. on the last stage only, the flat model outputs (``num_model_outputs`` of them), which
   ``out_spec`` rebuilds into the model's output structure for the loss function.

A boundary value is whatever the producing node's value is: a tensor, a tuple/list of tensors, or
a non-tensor (an int, a shape, ``None``). Values relayed through a stage (Note [relay
communication] in ``modelparallel/plan.py``) appear in both its ``recv`` and ``send``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from modelparallel.ir import IRFormatError, TensorMeta

__all__ = ["BoundaryValue", "StageProgram"]

_KINDS = frozenset({"tensor", "tensors", "scalar", "none"})


@dataclass(frozen=True)
class BoundaryValue:
    """A value that crosses a stage boundary.

    Attributes:
        name: The IR node that produces it.
        kind: ``"tensor"``, ``"tensors"`` (tuple/list of tensors), ``"scalar"`` or ``"none"``
            (the IR node's ``value_kind``).
        metas: Metadata of its tensor leaves for the traced example microbatch; the runtime
            allocates receive buffers from these until shapes change (then it exchanges
            metadata).
    """

    name: str
    kind: str
    metas: tuple[TensorMeta, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "metas", tuple(self.metas))
        if self.kind not in _KINDS:
            raise IRFormatError(f"boundary value {self.name!r} has kind {self.kind!r}; "
                             f"use one of {sorted(_KINDS)}")

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor leaves at the traced shapes."""
        return sum(m.nbytes for m in self.metas)

    @property
    def requires_grad(self) -> bool:
        """Whether a gradient flows back through it (a floating leaf that requires grad)."""
        return any(m.requires_grad and m.is_floating for m in self.metas)


@dataclass
class StageProgram:
    """One pipeline stage, ready to run (Note [stage calling convention]).

    Attributes:
        index: Stage index, 0-based.
        num_stages: Stages in the pipeline.
        module: The stage's graph module. It holds only this stage's parameters and buffers,
            under their original qualified names.
        model_inputs: Indices of the flat model inputs the stage reads, in argument order.
        recv: Values received from stage ``index - 1``, in argument order.
        send: Values sent to stage ``index + 1``, in output order.
        num_model_outputs: Flat model outputs returned after ``send`` (last stage only).
        out_spec: Pytree spec rebuilding the model output from the flat outputs (last stage).
        shared_params: Qualified names of parameters this stage holds that other stages also
            hold (tied weights), with every stage holding each; their gradients are summed
            among those stages after backward (Note [tied parameters] in
            ``modelparallel/partitioner/problem.py``).
        input_names: Names of the flat model inputs (placeholders of the traced graph), for
            error messages and ``input_split_axes`` by name.
        param_names: Every qualified name under which ``module`` holds a parameter or buffer,
            mapped to its canonical name in the IR (Note [stage parameters] in
            ``modelparallel/codegen/build.py``). Every canonical name of a tensor the stage holds
            is itself a valid qualified name in ``module``, so ``shared_params`` keys resolve
            with ``module.get_parameter``.
        param_aliases: Canonical name to the other qualified names the same tensor has in the
            original model (tied weights), for loading state dicts keyed by any of them.
        stage_nodes: IR nodes this stage computes from the plan (its own nodes, not the
            input-derived ones it recomputes), in topological order.
        recomputed: Input-derived IR nodes this stage recomputes from the model inputs (Note
            [inputs on every rank] in ``modelparallel/partitioner/problem.py``).
        mutated_inputs: Received values the stage's code modifies in place (e.g. a
            ``ReLU(inplace=True)`` right after the cut). A runtime passes clones of them: a
            received tensor that requires grad is an autograd leaf, which must not be written
            in place.
    """

    index: int
    num_stages: int
    module: torch.fx.GraphModule
    model_inputs: tuple[int, ...]
    recv: tuple[BoundaryValue, ...]
    send: tuple[BoundaryValue, ...]
    num_model_outputs: int = 0
    out_spec: pytree.TreeSpec | None = None
    shared_params: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    param_names: Mapping[str, str] = field(default_factory=dict)
    param_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    stage_nodes: tuple[str, ...] = ()
    recomputed: tuple[str, ...] = ()
    mutated_inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.num_stages
        assert self.index > 0 or not self.recv, "stage 0 receives nothing"
        assert self.index < self.num_stages - 1 or not self.send, "the last stage sends nothing"

    @property
    def is_first(self) -> bool:
        """Whether this is stage 0."""
        return self.index == 0

    @property
    def is_last(self) -> bool:
        """Whether this is the last stage."""
        return self.index == self.num_stages - 1

    @property
    def code(self) -> str:
        """The generated Python source of ``module.forward``."""
        return self.module.code

    @property
    def num_inputs(self) -> int:
        """Positional arguments of ``module.forward``: local model inputs, then received values."""
        return len(self.model_inputs) + len(self.recv)

    def canonical_params(self) -> frozenset[str]:
        """Canonical names of every parameter and buffer the stage holds."""
        return frozenset(self.param_names.values())

    def tensor(self, name: str) -> torch.Tensor:
        """The stage's parameter or buffer called ``name`` (canonical, local or alias name).

        Raises:
            KeyError: if the stage holds no tensor of that name.
        """
        canonical = self.param_names.get(name, name)
        for canon, aliases in self.param_aliases.items():
            if name in aliases:
                canonical = canon
        for local in (name, canonical):
            if local in self.param_names:
                owner, _, attr = local.rpartition(".")
                value = getattr(self.module.get_submodule(owner), attr)
                assert isinstance(value, torch.Tensor)
                return value
        raise KeyError(f"stage {self.index} holds no parameter or buffer named {name!r}")
