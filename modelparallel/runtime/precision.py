"""fp16 training across pipeline stages: a dynamic loss scale every rank agrees on.

Note [fp16 loss scaling]
~~~~~~~~~~~~~~~~~~~~~~~~
With ``precision="fp16"`` the last stage's loss is multiplied by the scale ``S`` before
backward (the executor's ``loss_scale``), so small gradients survive in fp16 activations'
gradients; parameters and their ``.grad`` stay fp32 (master weights). After the step's
backward (and the data-parallel average) :meth:`PipelineGradScaler.unscale` divides every
parameter gradient of the rank by ``S`` and checks it for inf/NaN; the verdict is reduced
(MAX) over *every* rank of the job (all stages of all replicas), so every rank skips the same
step. :meth:`PipelineGradScaler.step` runs the optimizer unless the step overflowed, and
:meth:`PipelineGradScaler.update` halves ``S`` after an overflow and doubles it after
``growth_interval`` clean steps, as ``torch.amp.GradScaler`` does. Its ``state_dict`` is saved
with the checkpoint. bf16 needs no scaling (its range is fp32's).

Example:
    >>> scaler = PipelineGradScaler(init_scale=4.0)
    >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.full((2,), 8.0)
    >>> scaler.unscale([p]); p.grad.tolist(), scaler.found_inf
    ([2.0, 2.0], False)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PipelineGradScaler"]


class PipelineGradScaler:
    """Dynamic loss scaling agreed over the job (Note [fp16 loss scaling]).

    Args:
        init_scale: First scale.
        growth_factor: Scale multiplier after ``growth_interval`` steps without overflow.
        backoff_factor: Scale multiplier after an overflow.
        growth_interval: Clean steps before growing.
        group: Process group the verdict is reduced over (``None``: the default group when
            torch.distributed runs, else this process alone).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 group: Any = None) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.group = group
        self.found_inf = False
        self.skipped_steps = 0
        self._good = 0

    def unscale(self, params: Iterable[torch.Tensor]) -> None:
        """Divide the gradients by the scale and agree on overflow over the job."""
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros(1)
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
            if not torch.isfinite(g).all():
                bad.fill_(1.0)
        if dist.is_initialized():
            device = grads[0].device if grads and grads[0].is_cuda else torch.device("cpu")
            bad = bad.to(device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
        self.found_inf = bool(bad.item() > 0)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Run ``optimizer.step()`` unless this step overflowed; return whether it ran."""
        if self.found_inf:
            self.skipped_steps += 1
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        """Adjust the scale after the step (back off after an overflow, grow after a run)."""
        if self.found_inf:
            self.scale *= self.backoff_factor
            self._good = 0
        else:
            self._good += 1
            if self._good >= self.growth_interval:
                self.scale *= self.growth_factor
                self._good = 0
        self.found_inf = False

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (save it with the checkpoint)."""
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "good_steps": self._good, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._good = int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
