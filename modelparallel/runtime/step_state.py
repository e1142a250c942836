"""The state of a step in flight on one rank of the pipeline, for :mod:`executor`: per
microbatch what its backward needs, the step's actions, inputs, receives and result; and the
small helpers that move a step's values (to the device, the random state around a forward
run ahead of the batch check, Note [batch overlapped] in ``batch.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.runtime.batch import BatchShare
from modelparallel.runtime.channels import ChannelRecv, Mailbox
from modelparallel.runtime.result import StepResult
from modelparallel.runtime.split_backward import PendingWeightGrad
from modelparallel.runtime.templates import Templates
from modelparallel.schedule import Action

__all__ = ["MicrobatchState", "Rebuild", "StepState", "StepStats", "get_rng", "samples_in",
           "set_rng", "to_device"]


@dataclass
class StepStats:
    """Timing of this rank's last step (for benchmarks).

    Attributes:
        compute_seconds: Wall seconds spent in forward/backward compute of its actions.
        step_seconds: Wall seconds of the whole step.
        actions: Actions run, in order, with their compute seconds.
    """

    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    actions: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class MicrobatchState:
    """What the backward of one microbatch needs: per stage sent to, the sent tensors a
    gradient comes back for; per stage received from, the received leaves that require grad."""

    roots: list[tuple[int, list[torch.Tensor]]]
    received: list[tuple[int, list[torch.Tensor]]]
    loss: torch.Tensor | None
    pending: PendingWeightGrad | None = None


#: ``(flat_inputs, target) -> (microbatches, targets)`` of a step (Note [batch overlapped]).
Rebuild = Callable[[list[Any], Any], tuple[list[list[Any]], list[Any]]]


@dataclass
class StepState:
    """The state of one step in flight on this rank."""

    actions: tuple[Action, ...]
    local: dict[int, list[list[Any]]]
    targets: list[Any]
    tpl: Templates
    train: bool
    result: StepResult
    context: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None
    microbatches: dict[tuple[int, int], MicrobatchState] = field(default_factory=dict)
    posted: dict[int, list[ChannelRecv]] = field(default_factory=dict)
    mailbox: Mailbox = field(default_factory=Mailbox)
    next_recv: int = 0  # the first action whose receive is not created yet (Note [receives ahead])
    share: BatchShare | None = None  # rank 0's batch being shared (Note [batch overlapped])
    rng: list[torch.Tensor] | None = None  # random state before a forward run ahead of the check
    rebuild: Rebuild | None = None  # (flat, target) -> (microbatches, targets), once shared



def samples_in(microbatches: Sequence[Sequence[Any]]) -> int:
    """Samples in the step: microbatches times the first batched input's leading size."""
    for v in pytree.tree_leaves(list(microbatches[0])) if microbatches else []:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return len(microbatches) * int(v.shape[0])
    return len(microbatches)


def get_rng(device: torch.device) -> list[torch.Tensor]:
    """The random state a forward on ``device`` draws from (CPU's, and the GPU's there)."""
    state = [torch.random.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def set_rng(state: list[torch.Tensor], device: torch.device) -> None:
    """Put back a state :func:`get_rng` took."""
    torch.random.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor on ``device`` (copied without blocking where it is elsewhere); else as is."""
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device, non_blocking=True)
    return value
