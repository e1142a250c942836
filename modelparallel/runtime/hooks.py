"""A public hook into the steps of :class:`~modelparallel.runtime.executor.StageExecutor`.

Note [action hook]
~~~~~~~~~~~~~~~~~~
``StageExecutor(..., on_action=hook)`` calls ``hook(event, "start")`` before and
``hook(event, "end")`` after every piece of a step's work on its rank, ``event`` being a
:class:`StageEvent` (kind, stage, microbatch):

- ``"recv_wait"``: waiting for what an action receives (activations before a forward,
  gradients before a backward), on the stages that receive;
- ``"forward"`` / ``"backward"``: an action's compute (for the last stage's forward, the loss
  too); ``"backward"`` is also the input-gradient half ``I`` of a split backward, and
  ``"weight_backward"`` its weight-gradient half ``W`` (Note [split backward] in
  ``modelparallel/schedule/__init__.py``);
- ``"send"``: posting an action's sends (asynchronous: their completion is not waited for);
- ``"grad_sync"``: the sum of tied parameters' gradients among their stages after the last
  backward (``microbatch`` is ``None``);
- ``"batch_wait"``: sharing pipeline rank 0's batch at the start of the step (Note [batch from
  rank 0] in ``batch.py``; a collective: it waits for every rank), ``"result_wait"``: the
  exchange of the step's loss and outputs at its end (Note [early result] in ``result.py``);
  both with ``microbatch`` ``None``, on the rank's first stage, and both idle time in a
  bubble, like ``"recv_wait"``.

Starts and ends nest properly and come in the order the work runs; the ``"end"`` of a piece of
work that raised is still reported (from a ``finally``), a ``"start"`` that raised has none.
Times are the caller's to take (``time.perf_counter``, CUDA events): the hook runs on the
host, so on a GPU the work it brackets is queued, not necessarily done. With no hook the
executor only tests ``on_action is None``. Benchmarks time actions this way (``TimedExecutor``
in ``benchmarks/multigpu.py``) and a hook may raise to inject a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["EVENT_KINDS", "ActionHook", "Phase", "StageEvent"]

#: The kinds of work a hook is told about (Note [action hook]).
EVENT_KINDS = ("recv_wait", "forward", "backward", "weight_backward", "send", "grad_sync",
               "batch_wait", "result_wait")

#: ``"start"`` before a piece of work, ``"end"`` after it.
Phase = Literal["start", "end"]


@dataclass(frozen=True)
class StageEvent:
    """One piece of a step's work on one stage (Note [action hook]).

    Attributes:
        kind: One of :data:`EVENT_KINDS`.
        stage: The stage (this rank's; with virtual stages, the one of its stages) doing it.
        microbatch: The microbatch of the schedule action it belongs to; ``None`` for
            ``"grad_sync"``, ``"batch_wait"`` and ``"result_wait"``.

    Example:
        >>> StageEvent("forward", 1, 0)
        StageEvent(kind='forward', stage=1, microbatch=0)
    """

    kind: str
    stage: int
    microbatch: int | None

    def __post_init__(self) -> None:
        assert self.kind in EVENT_KINDS, self.kind


class ActionHook(Protocol):
    """What ``StageExecutor(on_action=...)`` takes: called with ``(event, phase)``."""

    def __call__(self, event: StageEvent, phase: Phase) -> None:
        """Called at the start and at the end of ``event``'s work."""
