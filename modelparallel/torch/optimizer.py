"""``smp.DistributedOptimizer``: the user's optimizer, with full and partial state dicts.

SMP returned the user's optimizer with ``state_dict``/``load_state_dict``/``local_state_dict``
overridden, so ``torch.optim.lr_scheduler`` (which checks ``isinstance(opt, Optimizer)``) and
every attribute of the optimizer keep working. We do the same: the returned object *is* the
user's optimizer, its class swapped for a subclass of both its class and
:class:`DistributedOptimizer`; nothing is copied. Optimizers that are not ``torch.optim``
optimizers (the FP16_Optimizer wrappers of 1.6-era scripts) are wrapped the same way.

The optimizer holds every parameter of the model; each rank's parameters of other stages never
get a gradient, so they are skipped by the optimizer and have no state. So this rank's torch
``state_dict()`` is already its partial state; the full one merges every rank's (by parameter
index, identical on every rank because every rank built the same model).

Example:
    >>> import torch
    >>> opt = DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    >>> isinstance(opt, torch.optim.SGD), isinstance(opt, DistributedOptimizer)
    (True, True)
"""

from __future__ import annotations

from typing import Any

from modelparallel.errors import UnsupportedFeatureError
from modelparallel.torch.model import PARTIAL_MARKER
from modelparallel.torch.state_mod import state

__all__ = ["DistributedOptimizer"]

_classes: dict[type, type] = {}


class DistributedOptimizer:
    """Make ``optimizer`` SMP's ``DistributedOptimizer`` (in place; returns it).

    Args:
        optimizer: A torch optimizer over ``model.parameters()`` (or any object with
            ``state_dict``/``load_state_dict``).
        static_loss_scale, dynamic_loss_scale, **dynamic_loss_args: SMP's fp16 options;
            accepted at their defaults (fp16 is not implemented: use autocast and
            ``smp.amp.GradScaler``).
    """

    def __new__(cls, optimizer: Any, static_loss_scale: float | None = 1.0,
                dynamic_loss_scale: bool = False, **dynamic_loss_args: Any) -> Any:
        if isinstance(optimizer, DistributedOptimizer):
            return optimizer
        if dynamic_loss_scale or dynamic_loss_args or static_loss_scale not in (1.0, None):
            raise UnsupportedFeatureError(
                "DistributedOptimizer's loss scaling (static_loss_scale, dynamic_loss_scale) "
                "belongs to SMP's fp16 mode, which is not implemented; use torch.autocast in "
                "the step function with modelparallel.torch.amp.GradScaler")
        base = type(optimizer)
        sub = _classes.get(base)
        if sub is None:
            sub = type(base.__name__, (_Mixin, base), {"__module__": base.__module__})
            _classes[base] = sub
        optimizer.__class__ = sub
        optimizer._smp_deferred = []
        state.optimizer = optimizer
        return optimizer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: ``__new__`` set the optimizer up (Python calls this on what it returns)."""


class _Mixin(DistributedOptimizer):
    """The methods a DistributedOptimizer adds (before the user's optimizer class in the MRO)."""

    _smp_deferred: list[Any]

    def orig_state_dict(self) -> Any:
        """The wrapped optimizer's own ``state_dict()``."""
        return super().state_dict()  # type: ignore[misc]

    def local_state_dict(self, gather_if_shard: bool = False) -> dict[str, Any]:
        """This rank's optimizer state (its stage's parameters), marked partial."""
        sd = dict(super().state_dict())  # type: ignore[misc]
        sd[PARTIAL_MARKER] = True
        return sd

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state, gathered over the pipeline (collective: every rank)."""
        local = dict(super().state_dict())  # type: ignore[misc]
        model = state.model
        if model is None or not model.partitioned or state.require().pp == 1:
            return local
        from modelparallel.torch._agree import collective

        pipe = model.pipeline
        comm = pipe._comm

        def gather() -> list[Any]:
            return comm.all_gather_object(_cpu(local), "the optimizer state") if comm else [local]

        parts = collective("optimizer.state_dict()", pipe, gather)
        merged = dict(parts[0])
        merged_state: dict[Any, Any] = {}
        for part in parts:
            for k, v in part.get("state", {}).items():
                merged_state.setdefault(k, v)
        merged["state"] = merged_state
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full or partial optimizer state; deferred until the model is partitioned
        (then only this rank's parameters' state is kept)."""
        sd = dict(state_dict)
        sd.pop(PARTIAL_MARKER, None)
        model = state.model
        if model is not None and not model.partitioned:
            self._smp_deferred.append(sd)
            return
        self._load_local(sd)

    def _load_local(self, sd: dict[str, Any]) -> None:
        model = state.model
        if model is not None and model.partitioned and "state" in sd:
            local = {id(p) for p in model.local_parameters()}
            index = 0
            keep = set()
            for group in self.param_groups:  # type: ignore[attr-defined]
                for p in group["params"]:
                    if id(p) in local:
                        keep.add(index)
                    index += 1
            sd = dict(sd, state={k: v for k, v in sd["state"].items() if k in keep})
        super().load_state_dict(sd)  # type: ignore[misc]

    def _after_partition(self, renamed: dict[int, Any]) -> None:
        """Swap in parameters materialised at partitioning (Note [delayed parameters] in
        ``modelparallel/torch/creation.py``), then apply the deferred loads."""
        if renamed and hasattr(self, "param_groups"):
            for group in self.param_groups:
                group["params"] = [renamed.get(id(p), p) for p in group["params"]]
        for sd in self._smp_deferred:
            self._load_local(sd)
        self._smp_deferred.clear()


def _cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
