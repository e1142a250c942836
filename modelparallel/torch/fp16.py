"""SMP's ``fp16: True`` on our runtime: the loss scaler of ``smp.DistributedOptimizer``.

Note [smp fp16]
~~~~~~~~~~~~~~~
SMP's ``fp16`` wrapped the model in an Apex-style ``FP16_Module`` (fp16 parameters) and the
optimizer in an ``FP16_Optimizer`` (fp32 master copies, a loss scaler). We keep SMP's user-facing
contract and run it on the runtime's mixed precision (Note [fp16 loss scaling] in
``modelparallel/runtime/precision.py``):

- Every stage's forward runs under fp16 autocast (the plan's ``precision="fp16"``); parameters
  and gradients stay fp32, so they *are* the master weights (``fp32_from_fp16_groups`` is the
  optimizer's own param groups).
- ``model.backward(loss)`` inside ``smp.step`` back-propagates ``loss * S``, where ``S`` is the
  ``DistributedOptimizer``'s current loss scale (:class:`LossScaler`, SMP's/Megatron's
  ``DynamicLossScaler`` rules: ``init_scale`` 2**32, ``scale_factor`` 2, ``scale_window`` 1000,
  ``min_scale`` 1, ``delayed_shift`` hysteresis, ``consecutive_hysteresis``; or a static
  scale). Gradients of several steps before one ``optimizer.step()`` accumulate at that one
  scale.
- ``optimizer.step()`` (or ``clip_master_grads`` first) divides this rank's gradients by ``S``
  once and checks them for inf/NaN; the verdict is reduced over *every* rank of the job, so
  every stage of every replica skips the same step (``optimizer.overflow`` is then True on
  every rank) and the scale changes alike everywhere.
- The scaler's state is saved in partial checkpoints (``fp16_states_<rankinfo>.pt``, SMP's
  name) and restored on resume.

Needs ``smp.DistributedOptimizer``: without it nothing would unscale the gradients, so a
training step with ``fp16`` and no DistributedOptimizer raises :class:`UsageError`.

Example:
    >>> s = LossScaler(dynamic=True, init_scale=8.0, scale_window=2)
    >>> s.update_scale(overflow=True); s.loss_scale
    4.0
    >>> s.update_scale(False); s.update_scale(False); s.loss_scale
    8.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.errors import ConfigError

__all__ = ["LossScaler", "clip_grad_norm_over_pipeline", "unscale_and_check"]

_DYNAMIC_KEYS = ("init_scale", "scale_factor", "scale_window", "min_scale", "delayed_shift",
                 "consecutive_hysteresis")


class LossScaler:
    """A static or dynamic loss scale with SMP's (Megatron's) update rules.

    Args:
        dynamic: Adjust the scale (else it stays ``static_scale``).
        static_scale: The scale when not dynamic.
        init_scale, scale_factor, scale_window, min_scale, delayed_shift,
        consecutive_hysteresis: SMP's ``dynamic_loss_args``.
    """

    def __init__(self, dynamic: bool = False, static_scale: float = 1.0,
                 init_scale: float = 2.0**32, scale_factor: float = 2.0,
                 scale_window: int = 1000, min_scale: float = 1.0, delayed_shift: int = 1,
                 consecutive_hysteresis: bool = False) -> None:
        if not dynamic and not float(static_scale) > 0:
            raise ConfigError(f"static_loss_scale = {static_scale!r} must be > 0")
        if not float(scale_factor) > 1 or int(scale_window) < 1 or int(delayed_shift) < 1 \
                or not float(min_scale) > 0:
            raise ConfigError("dynamic_loss_args: scale_factor must be > 1, scale_window >= 1, "
                              f"delayed_shift >= 1, min_scale > 0 (got scale_factor = "
                              f"{scale_factor}, scale_window = {scale_window}, delayed_shift = "
                              f"{delayed_shift}, min_scale = {min_scale})")
        self.dynamic = bool(dynamic)
        self.cur_scale = float(init_scale if dynamic else static_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.cur_iter = 0
        self.last_overflow_iter = -1

    @classmethod
    def from_smp(cls, static_loss_scale: float | None, dynamic_loss_scale: bool,
                 args: Mapping[str, Any]) -> LossScaler:
        """From ``DistributedOptimizer``'s arguments (``dynamic_loss_args`` given nested or
        flat)."""
        flat = dict(args)
        flat.update(flat.pop("dynamic_loss_args", None) or {})
        unknown = sorted(set(flat) - set(_DYNAMIC_KEYS))
        if unknown:
            raise ConfigError(f"unknown dynamic_loss_args {unknown}; SMP's keys are "
                              f"{list(_DYNAMIC_KEYS)}")
        dynamic = bool(dynamic_loss_scale) or static_loss_scale is None
        return cls(dynamic=dynamic, static_scale=1.0 if static_loss_scale is None
                   else float(static_loss_scale), **flat)

    @property
    def loss_scale(self) -> float:
        """The current scale."""
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """After an optimizer step: back off after an overflow (after ``delayed_shift`` of
        them), grow after ``scale_window`` clean iterations."""
        if self.dynamic:
            if overflow:
                if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                    self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                else:
                    self.cur_hysteresis -= 1
                self.last_overflow_iter = self.cur_iter
            else:
                if self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                    if not self.consecutive_hysteresis:
                        self.cur_hysteresis = self.delayed_shift
                    self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return dict(vars(self))

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key, value in sd.items():
            if key in vars(self):
                setattr(self, key, value)


def unscale_and_check(params: Iterable[torch.Tensor], scale: float) -> bool:
    """Divide the gradients by ``scale``; whether *any* rank of the job found inf/NaN (a
    collective over the default group when torch.distributed runs)."""
    from modelparallel.runtime.precision import PipelineGradScaler

    scaler = PipelineGradScaler(init_scale=scale)
    scaler.unscale(params)
    return scaler.found_inf


def clip_grad_norm_over_pipeline(params: Iterable[torch.Tensor], max_norm: float,
                                 norm_type: float = 2.0, group: Any = None) -> float:
    """Clip gradients by their norm over every stage of the pipeline (``group``: the pipeline's
    process group; each stage holds its own parameters, so the squares are summed over it).

    Returns:
        The total norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    nccl = group is not None and dist.get_backend(group) == "nccl"
    where = device if nccl else torch.device("cpu")
    inf = norm_type == float("inf")
    if inf:
        local = max((float(g.abs().max()) for g in grads), default=0.0)
    else:
        local = sum(float(g.double().norm(norm_type)) ** norm_type for g in grads)
    total = torch.tensor([local], dtype=torch.float64, device=where)
    if group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    norm = float(total.item()) if inf else float(total.item()) ** (1.0 / norm_type)
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm
