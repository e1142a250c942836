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
    """Our stage module in the calling convention of torch.distributed.pipelining."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> Any:
        out = self.module(*args)
        return out[0] if len(out) == 1 else tuple(out)


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
    """A stage ``GraphModule`` of our codegen in the calling convention of
    ``torch.distributed.pipelining``: the first stage takes its model inputs as positional
    arguments (as ``schedule.step(x)`` gives them); a later stage takes the received
    activations as positional arguments and any model inputs it reads (input-derived values it
    recomputes) as keyword arguments ``in<i>`` (``PipelineSchedule.step`` passes keyword
    arguments, split into microbatches, to every stage). It returns a tensor or a tuple of
    tensors (the model output on the last stage)."""

    def __init__(self, program: StageProgram) -> None:
        super().__init__()
        self.module = program.module
        self.is_first = program.is_first
        self.is_last = program.is_last
        self.inputs = [f"in{i}" for i in program.model_inputs]
        self.n_send = len(program.send)
        self.out_spec = program.out_spec
        mutated = set(program.mutated_inputs)
        self.mutated = {k for k, b in enumerate(program.recv) if b.name in mutated}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch.utils._pytree as pytree

        if self.is_first:
            values = list(args)
        else:
            received = [v.clone() if k in self.mutated and isinstance(v, torch.Tensor) else v
                        for k, v in enumerate(args)]
            values = [kwargs[n] for n in self.inputs] + received
        out = self.module(*values)
        if self.is_last:
            flat = list(out[self.n_send:])
            return (pytree.tree_unflatten(flat, self.out_spec) if self.out_spec is not None
                    else flat[0] if len(flat) == 1 else tuple(flat))
        sends = tuple(out[:self.n_send])
        return sends[0] if len(sends) == 1 else sends


def torch_unsupported(program: StageProgram) -> str:
    """Why torch.distributed.pipelining cannot run this stage ('' if it can)."""
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

    return TimedStage
