"""What codegen hands the runtime for one stage: a graph module and how to wire it.

The calling convention of ``StageProgram.module`` is the contract between codegen and the
runtime (Note [stage calling convention]).

Note [stage calling convention]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``module.forward`` takes, in order:

1. the flat model inputs this stage reads, in the order of ``model_inputs`` (indices into the
   flat input list of :meth:`modelparallel.tracer.TracedModel.flatten_inputs`); every rank holds
   the whole batch, so these are sliced locally, never received;
2. the values received from earlier stages, in the order of ``recv``: grouped by the stage they
   come from (``sources``: ``(stage, value names)`` per sending stage, ascending).

It returns a tuple holding, in order:

1. the values to send to later stages, each once, in the order of ``send`` (empty on the last
   stage); ``dests`` (``(stage, value names)`` per receiving stage, ascending) says which go
   where: a value read on several later stages is sent to each of them (Note [direct
   communication] in ``modelparallel/plan.py``), and its gradients from those stages are summed;
2. on the last stage only, the flat model outputs (``num_model_outputs`` of them), which
   ``out_spec`` rebuilds into the model's output structure for the loss function.

A boundary value is whatever the producing node's value is: a tensor, a tuple/list of tensors, or
a non-tensor (an int, a shape, ``None``). Under a relay plan (Note [relay communication] in
``modelparallel/plan.py``) ``sources`` is the previous stage and ``dests`` the next one only
(listed even when empty), and values relayed through a stage appear in both its ``recv`` and
``send``.

Every runtime calls a stage the same way, through :meth:`StageProgram.run` (the distributed
:class:`~modelparallel.runtime.executor.StageExecutor`, the one-process
:class:`~modelparallel.runtime.local.LocalPipeline`, and the benchmarks' adapter for
``torch.distributed.pipelining``), which also holds the rest of the contract:

- *received values that are autograd leaves*: a received tensor through which a gradient flows
  back is a leaf that requires grad, which autograd refuses to write in place. The values
  ``mutated_inputs`` lists are passed as clones; should the module still write a received leaf
  in place (through a view, which codegen may not detect), the write fails before changing
  anything, and the call is repeated with every received tensor that requires grad cloned, as
  all later calls of that program are (side effects of the failed attempt before the write,
  such as batch-norm statistics, happen twice, once);
- *outputs*: a single non-tuple value counts as a one-element tuple; :class:`StageOutputs`
  holds the sends and, on the last stage, the model output rebuilt with ``out_spec`` (without
  an ``out_spec``: the one flat output, or a tuple of several);
- *the loss*: :func:`check_loss` makes ``loss_fn``'s result a 0-d tensor or raises;
- *tied parameters*: after backward, the gradients of this step of every copy of a shared
  parameter are summed (by an all-reduce, or in one process) and :func:`add_step_grads` adds
  the sum to what the copies held before the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError
from modelparallel.ir import IRFormatError, TensorMeta

__all__ = ["BoundaryValue", "StageOutputs", "StageProgram", "add_step_grads", "check_loss"]

_KINDS = frozenset({"tensor", "tensors", "scalar", "none"})
_INPLACE_LEAF_ERROR = "leaf Variable that requires grad is being used in an in-place operation"


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


@dataclass(frozen=True)
class StageOutputs:
    """What one call of a stage produced (Note [stage calling convention]).

    Attributes:
        sends: The values for later stages, in the order of ``StageProgram.send`` (empty on
            the last stage; :meth:`StageProgram.send_indices` picks each stage's).
        model_output: On the last stage, the model output rebuilt with ``out_spec`` (what
            ``loss_fn`` gets); ``None`` on the other stages.
    """

    sends: tuple[Any, ...]
    model_output: Any = None


@dataclass
class StageProgram:
    """One pipeline stage, ready to run (Note [stage calling convention]).

    Attributes:
        index: Stage index, 0-based.
        num_stages: Stages in the pipeline.
        module: The stage's graph module. It holds only this stage's parameters and buffers,
            under their original qualified names.
        model_inputs: Indices of the flat model inputs the stage reads, in argument order.
        recv: Values received from earlier stages, in argument order (grouped as ``sources``).
        send: Values sent to later stages, each once, in output order.
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
        sources: ``(stage, value names)`` per stage the values of ``recv`` come from, ascending
            (default: all from ``index - 1``).
        dests: ``(stage, value names)`` per stage values of ``send`` go to, ascending (default:
            all to ``index + 1``).
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
    sources: tuple[tuple[int, tuple[str, ...]], ...] = ()
    dests: tuple[tuple[int, tuple[str, ...]], ...] = ()
    _clone_received: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.num_stages
        assert self.index > 0 or not self.recv, "stage 0 receives nothing"
        assert self.index < self.num_stages - 1 or not self.send, "the last stage sends nothing"
        names = tuple(v.name for v in self.recv)
        if not self.sources and names:
            self.sources = ((self.index - 1, names),)
        if not self.dests and self.send:
            self.dests = ((self.index + 1, tuple(v.name for v in self.send)),)
        self.sources = tuple((int(k), tuple(vs)) for k, vs in self.sources)
        self.dests = tuple((int(k), tuple(vs)) for k, vs in self.dests)
        assert tuple(v for _, vs in self.sources for v in vs) == names, "recv is grouped by source"
        assert all(k < self.index for k, _ in self.sources)
        assert all(k > self.index for k, _ in self.dests)
        sent = {v.name for v in self.send}
        assert all(set(vs) <= sent for _, vs in self.dests)

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

    def recv_values(self, stage: int) -> tuple[BoundaryValue, ...]:
        """The values of ``recv`` that come from ``stage`` (in order; empty if none do)."""
        want = dict(self.sources).get(stage, ())
        by_name = {v.name: v for v in self.recv}
        return tuple(by_name[n] for n in want)

    def send_indices(self, stage: int) -> tuple[int, ...]:
        """Positions in ``send`` (and ``StageOutputs.sends``) of the values sent to ``stage``.

        Example:
            >>> import torch
            >>> from modelparallel.codegen import build_stages
            >>> from modelparallel.partitioner import partition
            >>> from modelparallel.plan import PlanConfig
            >>> from modelparallel.tracer import trace
            >>> traced = trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)),
            ...                (torch.randn(2, 4),))
            >>> first, _ = build_stages(traced, partition(traced.graph, PlanConfig(2), "cpu"))
            >>> first.send_indices(1) == tuple(range(len(first.send)))
            True
        """
        want = dict(self.dests).get(stage, ())
        pos = {v.name: j for j, v in enumerate(self.send)}
        return tuple(pos[n] for n in want)

    @property
    def clones_received(self) -> bool:
        """Whether :meth:`run` clones every received tensor that requires grad: after the
        module wrote one in place undetected (Note [stage calling convention])."""
        return self._clone_received

    def run(self, local: Sequence[Any], received: Sequence[Any], *,
            grad_leaves: bool = False) -> StageOutputs:
        """Call the stage module on one microbatch (Note [stage calling convention]).

        Args:
            local: The stage's model inputs of the microbatch, in the order of
                ``model_inputs``.
            received: The values from earlier stages, in the order of ``recv``.
            grad_leaves: Whether received tensors may be autograd leaves that require grad
                (training): then the ones the stage writes in place are passed as clones.

        Example:
            >>> import torch
            >>> from modelparallel.codegen import build_stage
            >>> from modelparallel.partitioner import partition
            >>> from modelparallel.plan import PlanConfig
            >>> from modelparallel.tracer import trace
            >>> traced = trace(torch.nn.Linear(4, 1), (torch.randn(2, 4),))
            >>> program = build_stage(traced, partition(traced.graph, PlanConfig(1), "cpu"), 0)
            >>> out = program.run([torch.randn(3, 4)], [])
            >>> out.sends, out.model_output.shape
            ((), torch.Size([3, 1]))
        """
        values = list(received)
        if grad_leaves:
            mutated = set(self.mutated_inputs)
            values = [_clone_grad_leaves(v) if self._clone_received or b.name in mutated else v
                      for b, v in zip(self.recv, values)]
        try:
            out = self.module(*local, *values)
        except RuntimeError as e:
            if not grad_leaves or self._clone_received or _INPLACE_LEAF_ERROR not in str(e):
                raise
            self._clone_received = True
            return self.run(local, received, grad_leaves=True)
        return self.split_outputs(out)

    def split_outputs(self, out: Any) -> StageOutputs:
        """The sends and the model output of what ``module`` returned (Note [stage calling
        convention])."""
        if not isinstance(out, (tuple, list)):
            out = (out,)
        n_send = len(self.send)
        sends = tuple(out[:n_send])
        if not self.is_last:
            return StageOutputs(sends)
        flat = list(out[n_send:])
        output = (pytree.tree_unflatten(flat, self.out_spec) if self.out_spec is not None
                  else flat[0] if len(flat) == 1 else tuple(flat))
        return StageOutputs(sends, output)

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


def check_loss(loss: Any) -> torch.Tensor:
    """``loss_fn``'s result as a 0-d tensor (Note [stage calling convention]).

    Raises:
        ConfigError: if it is not a tensor of one element.

    Example:
        >>> check_loss(torch.tensor([2.0])).shape
        torch.Size([])
    """
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else ""
        raise ConfigError(
            f"loss_fn must return a scalar tensor; it returned {type(loss).__name__}"
            f"{shape}. Reduce the loss (mean over the batch).")
    return loss.reshape(())


def add_step_grads(tensors: Sequence[torch.Tensor], totals: Sequence[torch.Tensor],
                   before: Sequence[torch.Tensor | None]) -> None:
    """Give every copy of a tied parameter the summed gradient of this step on top of what it
    held before the step (Note [stage calling convention]).

    Args:
        tensors: The copies this process holds.
        totals: Per copy, the gradient of this step summed over every copy (moved to the copy's
            device here).
        before: Per copy, its ``.grad`` before the step (``None``: none).

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> add_step_grads([w], [torch.ones(2)], [torch.ones(2)])
        >>> w.grad
        tensor([2., 2.])
    """
    for t, total, prev in zip(tensors, totals, before):
        new = total.to(t.device)
        t.grad = new.clone() if prev is None else prev + new


def _clone_grad_leaves(value: Any) -> Any:
    return pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v, value)
