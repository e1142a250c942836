"""Run every stage of a pipeline in one process: the single-GPU mode and the test bed of codegen.

:class:`LocalPipeline` executes the stage programs of :func:`modelparallel.codegen.build_stages`
the way the distributed runtime does, minus the processes: the batch is split into microbatches,
each microbatch flows forward through the stages in schedule order, the loss is computed on the
last stage, and backward runs stage by stage in reverse with autograd cut at every boundary
(Note [local boundaries]). Stage ``k`` may sit on its own device; values move with ``.to``.

Note [local boundaries]
~~~~~~~~~~~~~~~~~~~~~~~
At each stage boundary a value is detached, moved to the receiving stage's device, and (when it
is a floating tensor that requires grad) made a leaf that requires grad, just as a received
buffer is in the distributed runtime. Values go where the stage programs say (``dests`` and
``sources``, Note [stage calling convention] in ``modelparallel/codegen/program.py``): under a
direct plan a value read on several later stages becomes one leaf on each of them (Note
[direct communication] in ``modelparallel/plan.py``), and the producer's backward passes every
leaf's gradient to autograd, which sums them. A stage's backward starts from the gradients its
consumers left on those leaves (or from the loss on the last stage) and leaves the gradients of
its own input leaves for its producers. Under a relay plan a relayed value is its stage's input
leaf returned unchanged, so the gradients of its later uses and of uses on the way add up on
that leaf (Note [relay communication]). Autograd refuses in-place writes on such a leaf;
``StageProgram.run`` passes clones where needed, as for the distributed runtime (Note [stage
calling convention]).

Note [one backward in one process]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A split backward (ZB-H1's ``I`` and ``W``, Note [split backward] in
``modelparallel/schedule/__init__.py``) pays off only where something runs in the gap it
opens: another rank's critical path. In one process on one device the actions run one after
another and nothing overlaps, so the split is pure cost: two autograd passes per microbatch
and stage, the graph walk that separates them, and the microbatch's activations held until
its ``W``. :class:`LocalPipeline` therefore runs each ``I`` as the microbatch's whole backward
and each ``W`` as nothing when every stage is on one device (``split_backward=None``, the
default). The gradients are the same up to the order in which microbatches add into
``.grad`` (fp32 rounding). With stages on several devices, whose kernels run asynchronously
and can overlap, or with ``split_backward=True`` (the test bed of the split itself), the two
halves run as the distributed runtime runs them. Figures: docs/schedules.md, "On one GPU".

Note [local tied parameters]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Stages built in one process from one traced model share the very parameter objects of a tied
weight, so autograd already sums the gradients of all its uses into one ``.grad``: nothing more
to do. When the holders are distinct tensors (stages materialized separately, or put on different
devices, which forces copies), the gradients of this step are summed among the copies after
backward, as the distributed runtime's all-reduce does (``StageProgram.shared_params``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.codegen.program import StageProgram, add_step_grads, check_loss
from modelparallel.errors import ConfigError
from modelparallel.runtime.microbatch import (
    merge_outputs,
    resolve_split,
    split_inputs,
    split_target,
)
from modelparallel.runtime.split_backward import (
    PendingWeightGrad,
    backward_input,
    backward_weight,
)
from modelparallel.schedule import Action, Schedule, make_schedule
from modelparallel.schedule._types import play_order

__all__ = ["LocalPipeline", "action_order"]


def action_order(schedule: str | Schedule, num_stages: int,
                 microbatches: int) -> list[Action]:
    """A single-process order of a schedule's actions: the :class:`~modelparallel.schedule.Action`
    values the distributed executor runs, every stage's interleaved into one list.

    Each stage keeps its action order from the schedule (:mod:`modelparallel.schedule`); the
    stages are interleaved by running every action as soon as its inputs are ready (the
    forward of the previous stage, the backward of the next), so the peak of activations held is
    the schedule's (Note [in-flight microbatches] in ``modelparallel/schedule/__init__.py``).

    Raises:
        ConfigError: for an unknown schedule name or a schedule of another shape.

    Example:
        >>> " ".join(str(a) for a in action_order("1f1b", 2, 2))
        '0F0 0F1 1F0 1B0 1F1 1B1 0B0 0B1'
    """
    sched = (schedule if isinstance(schedule, Schedule)
             else make_schedule(schedule, num_stages, microbatches))
    p, m = num_stages, microbatches
    if (sched.num_stages, sched.num_microbatches) != (p, m):
        raise ConfigError(
            f"schedule {sched.name!r} is for {sched.num_stages} stages and "
            f"{sched.num_microbatches} microbatches; the pipeline has {p} and {m}")
    sched.validate()
    return play_order(sched)


@dataclass
class _Slot:
    """What one stage keeps between the forward and backward of one microbatch.

    Attributes:
        outputs: The values the stage sends, until they are passed on.
        pairs: For the boundaries into later stages: (output tensor here, leaf there) pairs of
            the tensors through which a gradient flows back (a tensor sent to several stages
            appears once per stage).
        leaves: The stage's own received leaves that require grad (where its consumers'
            gradients for its producers end up).
        loss: The microbatch loss (last stage only).
    """

    outputs: list[Any] = field(default_factory=list)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    leaves: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    pending: PendingWeightGrad | None = None


class LocalPipeline:
    """All stages of a pipeline in one process (Note [local boundaries]).

    Args:
        stages: Every stage's program, in order (``build_stages``).
        microbatches: Microbatches per step; the batch must divide by it.
        loss_fn: ``loss_fn(model_output, target) -> scalar``, mean-reduced over the batch; called
            per microbatch on the last stage with the rebuilt model output.
        schedule: ``"gpipe"`` (SMP ``"simple"``), ``"1f1b"`` (SMP ``"interleaved"``),
            ``"zb-h1"`` (backwards split into ``I`` and ``W``, Note [split backward]), or a
            :class:`~modelparallel.schedule.Schedule` of ``p`` stages and ``microbatches``
            microbatches (one of interleaved 1F1B's, say: its ranks' lists are merged).
        devices: One device per stage; the stage modules are moved there (tied weights shared
            between stages on different devices become copies, Note [local tied parameters]).
            ``None`` leaves each stage where its parameters are.
        input_split_axes: Flat input (name or index) to the axis it is split along (default 0).
        non_split_inputs: Flat inputs (names or indices) given whole to every microbatch.
            Splitting follows SMP (:mod:`modelparallel.runtime.microbatch`).
        average_grads: Average gradients over microbatches (SMP's default); ``False`` sums.
        split_backward: Whether a split backward (the ``I`` and ``W`` actions of ZB-H1) runs
            as two autograd passes (Note [one backward in one process]). ``None`` (default):
            only when the stages sit on more than one device; on one device each ``I`` runs
            the microbatch's whole backward and its ``W`` nothing.

    Example:
        >>> import torch
        >>> from modelparallel.codegen import build_stages
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> traced = trace(model, (x,))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> pipe = LocalPipeline(build_stages(traced, plan), microbatches=4,
        ...                      loss_fn=torch.nn.functional.mse_loss)
        >>> loss, out = pipe.train_step([x], y)
        >>> out.shape
        torch.Size([8, 1])
    """

    def __init__(self, stages: Sequence[StageProgram], *, microbatches: int,
                 loss_fn: Callable[[Any, Any], torch.Tensor], schedule: str | Schedule = "gpipe",
                 devices: Sequence[torch.device | str] | None = None,
                 input_split_axes: Mapping[str | int, int] | None = None,
                 non_split_inputs: Sequence[str | int] = (),
                 average_grads: bool = True, split_backward: bool | None = None) -> None:
        self.stages = tuple(stages)
        _check_stages(self.stages)
        if not isinstance(microbatches, int) or microbatches < 1:
            raise ConfigError(f"microbatches = {microbatches!r} must be an integer >= 1")
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self._order = action_order(schedule, len(self.stages), microbatches)
        self.schedule = schedule if isinstance(schedule, str) else schedule.name
        self.average_grads = bool(average_grads)
        self._split = resolve_split(self.stages[0].input_names, microbatches, input_split_axes,
                                    non_split_inputs)
        if devices is not None:
            if len(devices) != len(self.stages):
                raise ConfigError(f"{len(devices)} devices given for {len(self.stages)} stages; "
                                  "give one device per stage")
            self.devices = [torch.device(d) for d in devices]
            _place_stages(self.stages, self.devices)
        else:
            self.devices = [_module_device(s.module) for s in self.stages]
        self.split_backward = (len(set(self.devices)) > 1 if split_backward is None
                               else bool(split_backward))

    # -- public API ------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        """Stages in the pipeline."""
        return len(self.stages)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Every parameter of every stage once (copies of a tied weight each once)."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(canonical name, parameter)`` for every distinct parameter of every stage."""
        seen: set[int] = set()
        for stage in self.stages:
            for name, p in stage.module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield stage.param_names.get(name, name), p

    def train_step(self, flat_inputs: Sequence[Any], target: Any) -> tuple[torch.Tensor, Any]:
        """One forward and backward pass over the batch, microbatch by microbatch.

        Gradients accumulate into the parameters' ``.grad`` (zero them between steps, as with
        plain PyTorch); they are averaged over microbatches unless ``average_grads=False``.

        Args:
            flat_inputs: The flat model inputs of the whole batch (``traced.flatten_inputs``).
            target: The target of the whole batch; tensor leaves are split along dim 0.

        Returns:
            ``(loss, outputs)``: the mean microbatch loss (detached), and the model output
            merged over microbatches (``modelparallel.runtime.microbatch.merge_outputs``:
            tensors concatenated along dim 0, 0-d tensors stacked, other leaves from the first
            microbatch).

        Raises:
            ConfigError: if the batch (or target) does not divide into the microbatches, or the
                number of inputs is wrong.
        """
        m, p = self.microbatches, self.num_stages
        mb_inputs = self._split_inputs(flat_inputs)
        mb_targets = split_target(target, m)
        tied = self._tied_groups()
        before = [[None if t.grad is None else t.grad.clone() for t in g] for g in tied]
        slots: dict[tuple[int, int], _Slot] = {}
        received: dict[tuple[int, int], dict[int, list[Any]]] = {}
        outputs: list[Any] = [None] * m
        losses: list[torch.Tensor] = [torch.zeros(())] * m
        for a in self._order:
            s, i = a.stage, a.microbatch
            if a.kind == "F":
                values = self._gather(s, received.pop((s, i), {}))
                slot, out = self._forward(s, mb_inputs[i], values, grad=True)
                slot.leaves = [t for v in values for t in pytree.tree_leaves(v)
                               if isinstance(t, torch.Tensor) and t.requires_grad]
                slots[(s, i)] = slot
                if s < p - 1:
                    for dst, moved in self._transfer(s, slot):
                        received.setdefault((dst, i), {})[s] = moved
                else:
                    outputs[i] = pytree.tree_map(_detach, out)
                    slot.loss = check_loss(self.loss_fn(out, pytree.tree_map(
                        lambda v: _move(v, self.devices[-1]), mb_targets[i])))
                    losses[i] = slot.loss.detach()
            elif a.kind == "B" or (a.kind == "I" and not self.split_backward):
                self._backward(slots, s, i)
            elif a.kind == "I":
                self._backward_input(slots, s, i)
            elif self.split_backward:
                slot = slots.pop((s, i))
                if slot.pending is not None:
                    backward_weight(slot.pending)
        self._sum_tied_grads(tied, before)
        loss = torch.stack([x.to(losses[-1].device) for x in losses]).mean()
        return loss, merge_outputs(outputs)

    def eval_step(self, flat_inputs: Sequence[Any]) -> Any:
        """A forward pass over the batch without gradients; returns the merged model output."""
        mb_inputs = self._split_inputs(flat_inputs)
        outputs = []
        with torch.no_grad():
            for inputs in mb_inputs:
                received: dict[int, dict[int, list[Any]]] = {}
                for s in range(self.num_stages):
                    slot, out = self._forward(s, inputs, self._gather(s, received.pop(s, {})),
                                              grad=False)
                    if s < self.num_stages - 1:
                        for dst, moved in self._transfer(s, slot):
                            received.setdefault(dst, {})[s] = moved
                    else:
                        outputs.append(out)
        return merge_outputs(outputs)

    # -- forward / backward ----------------------------------------------------------------------

    def _forward(self, s: int, inputs: Sequence[Any], received: list[Any], *,
                 grad: bool) -> tuple[_Slot, Any]:
        """Run stage ``s`` on one microbatch: its sends and (last stage) the model output."""
        stage = self.stages[s]
        dev = self.devices[s]
        local = [_move(inputs[i], dev) for i in stage.model_inputs]
        out = stage.run(local, received, grad_leaves=grad)
        return _Slot(outputs=list(out.sends)), out.model_output

    def _gather(self, s: int, by_source: dict[int, list[Any]]) -> list[Any]:
        """Stage ``s``'s received values in ``recv`` order, from what each source sent it."""
        out: list[Any] = []
        for src, names in self.stages[s].sources:
            got = by_source.get(src, [])
            assert len(got) == len(names), (s, src, names)
            out.extend(got)
        return out

    def _transfer(self, s: int, slot: _Slot) -> list[tuple[int, list[Any]]]:
        """Per receiving stage, its values: detached, moved to its device, grad-carrying ones
        made leaves (Note [local boundaries])."""
        stage = self.stages[s]
        moved_to = []
        for dest, _ in stage.dests:
            dev = self.devices[dest]
            values = []
            for j in stage.send_indices(dest):
                leaves, spec = pytree.tree_flatten(slot.outputs[j])
                moved = []
                for leaf in leaves:
                    if isinstance(leaf, torch.Tensor):
                        new = leaf.detach().to(dev)
                        if leaf.requires_grad:
                            new.requires_grad_(True)
                            slot.pairs.append((leaf, new))
                        moved.append(new)
                    else:
                        moved.append(leaf)
                values.append(pytree.tree_unflatten(moved, spec))
            moved_to.append((dest, values))
        slot.outputs = []
        return moved_to

    def _backward(self, slots: dict[tuple[int, int], _Slot], s: int, i: int) -> None:
        slot = slots.pop((s, i))
        if slot.loss is not None:
            scale = 1.0 / self.microbatches if self.average_grads else 1.0
            if slot.loss.requires_grad:
                (slot.loss * scale).backward()
        else:
            tensors, grads = [], []
            for out, leaf in slot.pairs:
                if leaf.grad is not None:
                    tensors.append(out)
                    grads.append(leaf.grad.to(out.device))
            if tensors:
                torch.autograd.backward(tensors, grads)

    def _backward_input(self, slots: dict[tuple[int, int], _Slot], s: int, i: int) -> None:
        """``I`` of a split backward (Note [split backward] in
        ``modelparallel/schedule/__init__.py``): the gradients of stage ``s``'s input leaves,
        left on them for stage ``s - 1``; the weight part waits in the slot for ``W``."""
        slot = slots[(s, i)]
        roots: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if slot.loss is not None:
            if slot.loss.requires_grad:
                scale = 1.0 / self.microbatches if self.average_grads else 1.0
                roots, grads = [slot.loss * scale], [None]
        else:
            for out, leaf in slot.pairs:
                if leaf.grad is not None:
                    roots.append(out)
                    grads.append(leaf.grad.to(out.device))
        leaves = slot.leaves
        params = [t for t in self.stages[s].module.parameters() if t.requires_grad]
        got, slot.pending = backward_input(roots, grads, leaves, params)
        for leaf, g in zip(leaves, got):
            if g is not None:
                leaf.grad = g if leaf.grad is None else leaf.grad + g

    # -- tied parameters -------------------------------------------------------------------------

    def _tied_groups(self) -> list[list[torch.Tensor]]:
        """Distinct tensors of each shared parameter, when there is more than one
        (Note [local tied parameters])."""
        groups: dict[str, list[torch.Tensor]] = {}
        for stage in self.stages:
            for name in stage.shared_params:
                t = stage.tensor(name)
                group = groups.setdefault(name, [])
                if all(t is not other for other in group):
                    group.append(t)
        return [g for g in groups.values() if len(g) > 1]

    @staticmethod
    def _sum_tied_grads(groups: list[list[torch.Tensor]],
                        before: list[list[torch.Tensor | None]]) -> None:
        for group, old in zip(groups, before):
            deltas = []
            for t, g0 in zip(group, old):
                if t.grad is not None:
                    deltas.append(t.grad if g0 is None else t.grad - g0)
            if not deltas:
                continue
            dev = group[0].device
            total = torch.stack([d.to(dev) for d in deltas]).sum(0)
            add_step_grads(group, [total] * len(group), old)

    # -- microbatches ----------------------------------------------------------------------------

    def _split_inputs(self, flat_inputs: Sequence[Any]) -> list[list[Any]]:
        names = self.stages[0].input_names
        if names and len(flat_inputs) != len(names):
            raise ConfigError(
                f"{len(flat_inputs)} flat inputs given; the model takes {len(names)} "
                f"({', '.join(names)}). Flatten the batch with traced.flatten_inputs(args, "
                "kwargs).")
        return split_inputs(flat_inputs, self._split)


# -- helpers ----------------------------------------------------------------------------------------


def _check_stages(stages: tuple[StageProgram, ...]) -> None:
    if not stages:
        raise ConfigError("LocalPipeline needs at least one stage")
    p = len(stages)
    for k, stage in enumerate(stages):
        if stage.index != k or stage.num_stages != p:
            raise ConfigError(
                f"stage programs must be given in order, one per stage: position {k} holds "
                f"stage {stage.index} of {stage.num_stages}; pass build_stages(traced, plan)")
    sent = {(a.index, dst): names for a in stages for dst, names in a.dests}
    got = {(src, b.index): names for b in stages for src, names in b.sources}
    for pair in sorted(set(sent) | set(got)):
        if sent.get(pair) != got.get(pair):
            raise ConfigError(
                f"stage {pair[0]} sends {list(sent.get(pair, ()))} to stage {pair[1]}, which "
                f"receives {list(got.get(pair, ()))} from it; the stages come from different "
                "plans")


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _place_stages(stages: tuple[StageProgram, ...], devices: list[torch.device]) -> None:
    """Move each stage to its device; a tensor already placed by an earlier stage on another
    device is replaced by a copy in this stage (Note [local tied parameters])."""
    from modelparallel.codegen.materialize import held_tensors, replace_tensors

    placed: dict[int, torch.device] = {}
    for stage, dev in zip(stages, devices):
        copies: dict[int, torch.Tensor] = {}
        for t in held_tensors(stage.module):
            if id(t) in placed and placed[id(t)] != dev:
                new = t.detach().to(dev).clone()
                copies[id(t)] = (torch.nn.Parameter(new, requires_grad=t.requires_grad)
                                 if isinstance(t, torch.nn.Parameter) else new)
        replace_tensors(stage.module, copies)
        stage.module.to(dev)
        for t in held_tensors(stage.module):
            placed[id(t)] = dev
