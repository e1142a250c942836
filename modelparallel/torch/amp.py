"""``smp.amp.GradScaler``: torch's gradient scaler, with the inf/NaN check agreed over the
pipeline.

Every stage checks only its own gradients; if one stage found an inf and skipped its step while
another stepped, the stages would drift apart. So after unscaling, the found-inf flags are
all-reduced (max) over the pipeline group and every stage skips, or steps, together; the scale
update then sees the same flag everywhere.

Example:
    >>> GradScaler(device="cpu").get_scale()
    65536.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` for a pipeline (same arguments; ``device`` defaults to the
    stage's device type)."""

    def __init__(self, device: str | None = None, **kwargs: Any) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(device, **kwargs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if self._enabled:
            self._agree_on_inf(optimizer)

    def _agree_on_inf(self, optimizer: torch.optim.Optimizer) -> None:
        from modelparallel.torch.state_mod import state

        group = state.groups.get("pp")
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        local = max((float(v.item()) for v in found.values()), default=0.0)
        if group is not None and state.require().pp > 1:
            nccl = dist.get_backend(group) == "nccl"
            flag = torch.tensor([local], device=state.device if nccl else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            local = float(flag.item())
        if not found:
            found[torch.device(self._device)] = torch.tensor(local, device=self._device)
        for v in found.values():
            v.fill_(local)
