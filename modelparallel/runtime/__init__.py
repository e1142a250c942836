"""The pipeline runtime: schedules, microbatching, neighbour communication and the per-rank
executor that trains one :class:`~modelparallel.codegen.StageProgram` on torch.distributed.

- :mod:`modelparallel.schedule` (in the core, re-exported here): GPipe and 1F1B action lists,
  validation, simulation (Note [schedule communication model]);
- :mod:`.microbatch`: SMP's splitting rules (``input_split_axes``, ``non_split_inputs``,
  ``smp_slice``) and output merging;
- :mod:`.boundary`: boundary values as tensors plus a picklable template;
- :mod:`.comm`: asynchronous point-to-point and pipeline collectives (gloo on CPU, NCCL on CUDA);
- :mod:`.failure`: how a rank's failure reaches every rank (Note [failure propagation]);
- :mod:`.distributed`: joining torch.distributed, setup agreement through the store (Note
  [setup agreement]);
- :mod:`.executor`: :class:`StageExecutor`, one stage under a schedule (Note [boundary
  metadata]);
- :mod:`.hooks`: the executor's per-action hook, :class:`StageEvent` (Note [action hook]);
- :mod:`.local`: :class:`LocalPipeline`, every stage in one process.

The plain PyTorch front end over all of it is :func:`modelparallel.api.pipeline`.

Example:
    >>> print(one_f_one_b(2, 2))
    1f1b p=2 m=2
    0: 0F0 0F1 0B0 0B1
    1: 1F0 1B0 1F1 1B1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelparallel.runtime.hooks import ActionHook, StageEvent
from modelparallel.schedule import (
    Action,
    Schedule,
    Timeline,
    TimelineEntry,
    gpipe,
    make_schedule,
    one_f_one_b,
    simulate,
    theoretical_bubble,
)

if TYPE_CHECKING:
    from modelparallel.runtime.comm import PendingRecv, StageComm
    from modelparallel.runtime.distributed import SetupRound, default_device, init_distributed
    from modelparallel.runtime.executor import StageExecutor, StepOutput, StepStats
    from modelparallel.runtime.failure import FailureBoard, FailureReport
    from modelparallel.runtime.local import LocalPipeline, action_order
    from modelparallel.runtime.microbatch import (
        SplitSpec,
        merge_outputs,
        resolve_split,
        shape_key,
        split_inputs,
        split_target,
    )

# The torch modules load on first use, so the schedule vocabulary imports without torch
# (Note [planning core] in modelparallel/__init__.py).
_LAZY = {
    **dict.fromkeys(("PendingRecv", "StageComm"), "comm"),
    **dict.fromkeys(("SetupRound", "default_device", "init_distributed"), "distributed"),
    **dict.fromkeys(("StageExecutor", "StepOutput", "StepStats"), "executor"),
    **dict.fromkeys(("FailureBoard", "FailureReport"), "failure"),
    **dict.fromkeys(("LocalPipeline", "action_order"), "local"),
    **dict.fromkeys(("SplitSpec", "merge_outputs", "resolve_split", "shape_key", "split_inputs",
                     "split_target"), "microbatch"),
}

__all__ = [
    "Action",
    "ActionHook",
    "FailureBoard",
    "FailureReport",
    "LocalPipeline",
    "PendingRecv",
    "Schedule",
    "SetupRound",
    "SplitSpec",
    "StageComm",
    "StageEvent",
    "StageExecutor",
    "StepOutput",
    "StepStats",
    "Timeline",
    "TimelineEntry",
    "action_order",
    "default_device",
    "gpipe",
    "init_distributed",
    "make_schedule",
    "merge_outputs",
    "one_f_one_b",
    "resolve_split",
    "shape_key",
    "simulate",
    "split_inputs",
    "split_target",
    "theoretical_bubble",
]


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"modelparallel.runtime.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelparallel.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
