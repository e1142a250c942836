"""Adapters of our stage modules to ``torch.distributed.pipelining``, shared by the benchmarks
that compare our runtime with it (``benchmarks/multigpu.py``, ``benchmarks/runtime.py``).

``benchmarks/`` is not a package: import it as ``from _torch_pp import ...``.
"""

from __future__ import annotations

from typing import Any

import torch
from _timing import Busy
from torch import nn

from modelparallel.codegen import StageProgram

__all__ = ["TorchStage", "TorchStageModule", "schedule_step", "timed_stage_class",
           "torch_unsupported"]


class TorchStage(nn.Module):
    """Our stage in the calling convention of torch.distributed.pipelining, called through
    ``StageProgram.run`` (Note [stage calling convention] in ``modelparallel/codegen/program.py``):
    positional arguments are the model inputs on the first stage, the received values on the
    others (for stages that read no model input past the first: plain pipelines)."""

    def __init__(self, program: StageProgram) -> None:
        super().__init__()
        self.module = program.module  # registers the parameters
        self.program = program

    def forward(self, *args: torch.Tensor) -> Any:
        if self.program.is_first:
            out = self.program.run(args, ())
        else:
            out = self.program.run((), args, grad_leaves=torch.is_grad_enabled())
        values = (out.model_output,) if self.program.is_last else out.sends
        return values[0] if len(values) == 1 else tuple(values)


def schedule_step(sched: Any, rank: int, world: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of a torch schedule on a stage of a plain pipeline: inputs on the first
    rank, targets on the last."""
    if rank == 0:
        sched.step(x, return_outputs=False)
    elif rank == world - 1:
        sched.step(target=y, losses=[], return_outputs=False)
    else:
        sched.step(return_outputs=False)


class TorchStageModule(nn.Module):
    """A stage of our codegen in the calling convention of ``torch.distributed.pipelining``:
    the first stage takes its model inputs as positional arguments (as ``schedule.step(x)``
    gives them); a later stage takes the received activations as positional arguments and any
    model inputs it reads (input-derived values it recomputes) as keyword arguments ``in<i>``
    (``PipelineSchedule.step`` passes keyword arguments, split into microbatches, to every
    stage). It returns a tensor or a tuple of tensors (the model output on the last stage). The
    stage is called through ``StageProgram.run`` (Note [stage calling convention] in
    ``modelparallel/codegen/program.py``), like our executors do."""

    def __init__(self, program: StageProgram) -> None:
        super().__init__()
        self.module = program.module  # registers the parameters
        self.program = program
        self.inputs = [f"in{i}" for i in program.model_inputs]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.program.is_first:
            out = self.program.run(args, ())
        else:
            out = self.program.run([kwargs[n] for n in self.inputs], args,
                                   grad_leaves=torch.is_grad_enabled())
        if self.program.is_last:
            return out.model_output
        return out.sends[0] if len(out.sends) == 1 else out.sends


def torch_unsupported(program: StageProgram) -> str:
    """Why torch.distributed.pipelining cannot run this stage ('' if it can)."""
    far = [k for k, _ in (*program.sources, *program.dests) if abs(k - program.index) != 1]
    if far:
        return (f"stage {program.index} exchanges values with the non-adjacent stages {far}; "
                "torch.distributed.pipelining passes values between neighbours only (plan "
                "with communication='relay')")
    for b in (*program.recv, *program.send):
        if b.kind != "tensor":
            return (f"boundary value {b.name!r} is a {b.kind}; torch.distributed.pipelining "
                    "passes single tensors only")
    return ""


def timed_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):  # type: ignore[misc]
        """torch's stage with every forward and backward chunk bracketed by :class:`Busy`."""

        busy: Busy

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            token = self.busy.start()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                self.busy.stop("F", token)

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            token = self.busy.start()
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                self.busy.stop("B", token)

        def backward_weight_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            token = self.busy.start()  # the weight-gradient half of a zero-bubble backward
            try:
                return super().backward_weight_one_chunk(*args, **kwargs)
            finally:
                self.busy.stop("W", token)

    return TimedStage
