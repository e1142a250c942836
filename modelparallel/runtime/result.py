"""What a pipeline step returns on every rank: the mean loss and the merged outputs, which only
the last stage computes, and their exchange (:class:`StepResult`).

Note [early result]
~~~~~~~~~~~~~~~~~~~
The last stage knows the step's result (every microbatch's loss, every microbatch's output) as
soon as its last forward has run, which in every schedule is well before the step ends (the
last backwards, and on 1F1B-like schedules the backwards of the other stages, come after it).
Broadcasting it after the last action puts one collective on the end of every rank's step,
after the slowest rank's last backward: a synchronisation of the whole pipeline that no work
overlaps. So on gloo each rank starts the broadcast (asynchronous, ``async_op=True``) right
after its own last forward action, the last stage with the result, the others into buffers of
the result's template, and waits for it only after its last action, when it has long arrived.
A gloo collective runs on the process group's own thread and is independent of its
point-to-point operations, so issuing it mid-step is safe as long as every rank issues the
pipeline group's collectives in the same order (the step issues no other collective on it
between the batch exchange at its start and its end; the tied-parameter sums and data-parallel
syncs use their own groups). Each rank issues it after its own last forward, not at the start
of the step, so that no wait is longer than the waits of the actions around it (the pipeline's
``timeout`` bounds every wait).

The buffers need the result's template (the loss's dtype, the outputs' structure and shapes),
broadcast from the last stage on the first step of a shape key (Note [boundary metadata] in
``templates.py``); that step, and every step on NCCL (where collectives and point-to-point
operations share one stream in issue order, so a broadcast issued early would block the sends
behind it), broadcast the result after the last action as before. The last stage checks that
its outputs still match the template of the shape key and raises
:class:`~modelparallel.errors.CommunicationError` if they do not (outputs whose shapes depend on
the data, not supported), rather than broadcasting into wrongly sized buffers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from modelparallel.errors import CommunicationError
from modelparallel.runtime.boundary import allocate, pack, unpack
from modelparallel.runtime.comm import StageComm
from modelparallel.runtime.microbatch import merge_outputs, stack_outputs, unstack_outputs

__all__ = ["StepOutput", "StepResult"]


class StepOutput(NamedTuple):
    """What a training step returns on every rank.

    Attributes:
        loss: Mean of the microbatch losses (a 0-d tensor, detached; NaN for an eval step).
        outputs: The model output, microbatches merged (tensors concatenated on axis 0), detached;
            ``None`` when output broadcasting was turned off.
    """

    loss: torch.Tensor
    outputs: Any


class StepResult:
    """The result of one step on this rank: collected on the last stage, exchanged with every
    rank (Note [early result]).

    Args:
        comm: The pipeline's communication (``None``: one stage).
        is_last: Whether this rank runs the last stage.
        microbatches: Microbatches of the step.
        train: Whether the step trains (it has losses).
        return_outputs: Whether every rank gets the outputs.
        merge: Merge the outputs over microbatches (else the per-microbatch list).
        templates: The shape key's result templates, ``return_outputs -> (loss dtype, output
            template)`` (``Templates.result``); filled on the first step of the key.
        device: Where received buffers live.

    Example:
        >>> r = StepResult(None, is_last=True, microbatches=1, train=True, return_outputs=True,
        ...                merge=True, templates={}, device=torch.device("cpu"))
        >>> r.record(0, torch.ones(2), torch.tensor(0.5))
        >>> r.finish().loss
        tensor(0.5000)
    """

    def __init__(self, comm: StageComm | None, *, is_last: bool, microbatches: int,
                 train: bool, return_outputs: bool, merge: bool,
                 templates: dict[bool, tuple[Any, Any]], device: torch.device) -> None:
        self.comm = comm
        self.is_last = is_last
        self.train = train
        self.return_outputs = return_outputs
        self.merge = merge
        self.templates = templates
        self.device = device
        #: The losses of the microbatches run so far on the last stage (detached).
        self.losses: list[torch.Tensor] = []
        #: Per microbatch, its output (detached) on the last stage, when outputs are returned.
        self.outputs: list[Any] = [None] * microbatches
        self._last = comm.num_stages - 1 if comm is not None else 0
        self._early = (comm is not None and comm.num_stages > 1 and not comm.grouped
                       and return_outputs in templates)
        self._buffers: list[torch.Tensor] = []
        self._works: list[Any] = []
        self._started = False

    def record(self, i: int, output: Any, loss: torch.Tensor | None) -> None:
        """Keep microbatch ``i``'s output and loss (last stage)."""
        if self.return_outputs:
            self.outputs[i] = output
        if loss is not None:
            self.losses.append(loss)

    def start(self) -> None:
        """Start the exchange early if it can be (after this rank's last forward; Note [early
        result]); idempotent."""
        if not self._early or self._started:
            return
        assert self.comm is not None
        self._started = True
        loss_dtype, template = self.templates[self.return_outputs]
        if self.is_last:
            buffers = [self._loss().reshape(1)] if self.train else []
            if self.return_outputs:
                got, tensors = pack([self._merged()])
                if got != template:
                    raise CommunicationError(
                        f"the model outputs of this step ({got!r}) differ in structure or "
                        f"shape from the first step with the same input shapes ({template!r});"
                        " outputs whose shapes depend on the data are not supported: return "
                        "them with return_outputs=False or keep the input shapes fixed")
                buffers += tensors
        else:
            buffers = ([torch.empty(1, dtype=loss_dtype, device=self.device)]
                       if self.train else [])
            if self.return_outputs:
                buffers += allocate(template, self.device)
        self._buffers = buffers
        self._works = self.comm.broadcast_async(buffers, self._last)

    def finish(self) -> StepOutput:
        """The step's output on this rank (collective over the pipeline)."""
        if self._early:
            self.start()
            return self._finish_early()
        return self._finish_late()

    # -- the two exchanges -------------------------------------------------------------------------

    def _loss(self) -> torch.Tensor:
        return torch.stack(self.losses).mean() if self.losses else torch.tensor(math.nan)

    def _merged(self) -> Any:
        return merge_outputs(self.outputs) if self.merge else stack_outputs(self.outputs)

    def _finish_early(self) -> StepOutput:
        assert self.comm is not None
        self.comm.wait_works(self._works, "the step's result")
        if self.is_last:
            loss = self._loss() if self.train else torch.tensor(math.nan)
            if not self.return_outputs:
                return StepOutput(loss, None)
            return StepOutput(loss, self._merged() if self.merge else list(self.outputs))
        tensors = self._buffers
        loss = tensors[0].reshape(()) if self.train else torch.tensor(math.nan)
        if not self.return_outputs:
            return StepOutput(loss, None)
        merged = unpack(self.templates[True][1], tensors[1:] if self.train else tensors)[0]
        return StepOutput(loss, merged if self.merge
                          else unstack_outputs(merged, len(self.outputs)))

    def _finish_late(self) -> StepOutput:
        """Broadcast after the last action (the first step of a shape key, NCCL)."""
        want = self.return_outputs
        loss = self._loss() if self.is_last and self.losses else None
        merged = self._merged() if self.is_last and want else None
        nan = torch.tensor(math.nan)
        comm = self.comm
        if comm is None:
            return StepOutput(loss if loss is not None else nan,
                              merged if self.merge or not want else list(self.outputs))
        if want not in self.templates:
            info = ((loss.dtype if loss is not None else None,
                     pack([merged])[0] if merged is not None else None)
                    if self.is_last else None)
            self.templates[want] = comm.broadcast_object(info, self._last,
                                                         "the step's result metadata")
        loss_dtype, out_template = self.templates[want]
        if self.train:
            buf = (loss.reshape(1) if loss is not None
                   else torch.empty(1, dtype=loss_dtype, device=self.device))
            comm.broadcast([buf], self._last, "the step's loss")
            loss = buf.reshape(())
        else:
            loss = nan
        if not want:
            return StepOutput(loss, None)
        tensors = pack([merged])[1] if self.is_last else allocate(out_template, self.device)
        comm.broadcast(tensors, self._last, "the step's outputs")
        if not self.is_last:
            merged = unpack(out_template, tensors)[0]
        if not self.merge:  # per microbatch (stacked for one broadcast per leaf)
            merged = (list(self.outputs) if self.is_last
                      else unstack_outputs(merged, len(self.outputs)))
        return StepOutput(loss, merged)
