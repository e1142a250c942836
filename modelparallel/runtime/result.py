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

Note [work after the result]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A caller may have work that needs the step's result on this rank (``smp.step`` resumes every
microbatch's step function there with the real outputs: Note [smp step], 5). Done after the
last action, it lengthens the step of the rank that finishes last, pipeline rank 0 (the first
stage's backwards end every schedule). But that rank, once past the last action that sends
anything (its last forward; on one stage per rank every later action is a backward of stage
0), is a sink: nothing any rank does depends on what it does next. So it may wait for the
result there without any risk of a deadlock, and it loses nothing by doing the work before a
backward rather than after the last one; it gains the time it would have waited for that
backward's gradient. :func:`result_point` picks the first backward of that quiet part whose
gradient cannot start back from the last stage before the result was sent (on the last stage,
that microbatch's backward comes after the last forward): there the result has arrived, or
arrives soon, and the gradient is still at least one backward per stage away (GPipe: the
first backward of stage 0, with ``p - 1`` backwards to wait; 1F1B: the last). The executor
calls :meth:`StepResult.work_now` there; every other rank, and every step without the early
result, does the work in :meth:`StepResult.finish`. The work is the caller's: its errors are
the caller's too (``smp.step`` keeps them until the step has ended, as before).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from modelparallel.errors import CommunicationError
from modelparallel.runtime.boundary import allocate, pack, unpack
from modelparallel.runtime.comm import StageComm
from modelparallel.runtime.microbatch import merge_outputs, stack_outputs, unstack_outputs
from modelparallel.schedule import Schedule

__all__ = ["ResultWork", "StepOutput", "StepResult", "result_point"]


class StepOutput(NamedTuple):
    """What a training step returns on every rank.

    Attributes:
        loss: Mean of the microbatch losses (a 0-d tensor, detached; NaN for an eval step).
        outputs: The model output, microbatches merged (tensors concatenated on axis 0), detached;
            ``None`` when output broadcasting was turned off.
    """

    loss: torch.Tensor
    outputs: Any


#: Work on this rank once the step's result is known: given the rank's :class:`StepOutput`,
#: returns the pieces of work, each run once, in order (Note [work after the result]).
ResultWork = Callable[[StepOutput], Iterable[Callable[[], None]]]


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
        on_result: Work that needs the result on this rank (Note [work after the result]).

    Example:
        >>> r = StepResult(None, is_last=True, microbatches=1, train=True, return_outputs=True,
        ...                merge=True, templates={}, device=torch.device("cpu"))
        >>> r.record(0, torch.ones(2), torch.tensor(0.5))
        >>> r.finish().loss
        tensor(0.5000)
    """

    def __init__(self, comm: StageComm | None, *, is_last: bool, microbatches: int,
                 train: bool, return_outputs: bool, merge: bool,
                 templates: dict[bool, tuple[Any, Any]], device: torch.device,
                 on_result: ResultWork | None = None) -> None:
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
        self._on_result = on_result
        self._output: StepOutput | None = None

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

    def work_now(self) -> None:
        """Wait for the early result and do the ``on_result`` work now, if both apply (the
        executor calls it at :func:`result_point`; Note [work after the result])."""
        if self._early and self._started and self._on_result is not None:
            self._work(self._finish_early())

    def finish(self) -> StepOutput:
        """The step's output on this rank (collective over the pipeline); runs the
        ``on_result`` work if :meth:`work_now` did not."""
        if self._output is not None:
            return self._output
        if self._early:
            self.start()
            out = self._finish_early()
        else:
            out = self._finish_late()
        self._work(out)
        return out

    def _work(self, out: StepOutput) -> None:
        self._output = out
        work, self._on_result = self._on_result, None
        for piece in work(out) if work is not None else ():
            piece()

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


def result_point(schedule: Schedule, rank: int) -> int | None:
    """The index of ``rank``'s action before whose receives it does the work that needs the
    step's result (Note [work after the result]); ``None``: after the last action.

    Example:
        >>> from modelparallel.schedule import make_schedule
        >>> gpipe = make_schedule("gpipe", 2, 3)  # rank 0: F0 F1 F2 B0 B1 B2
        >>> result_point(gpipe, 0), result_point(gpipe, 1)
        (3, None)
    """
    p = len(schedule.actions)
    last = schedule.num_stages - 1
    if p < 2:
        return None
    mine = schedule.actions[rank]
    sends = [k for k, a in enumerate(mine)
             if (a.kind == "F" and a.stage != last) or (a.kind in ("B", "I") and a.stage != 0)]
    quiet = sends[-1] + 1 if sends else 0
    at_last = schedule.actions[last % p]
    final_forward = max((k for k, a in enumerate(at_last) if a.kind == "F" and a.stage == last),
                        default=len(at_last))
    after = {a.microbatch for k, a in enumerate(at_last)
             if a.kind in ("B", "I") and a.stage == last and k > final_forward}
    return next((k for k, a in enumerate(mine) if k >= quiet and a.kind in ("B", "I")
                 and a.stage != last and a.microbatch in after), None)
