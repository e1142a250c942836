"""``smp.DistributedOptimizer``: the user's optimizer, with full and partial state dicts.

SMP returned the user's optimizer with ``state_dict``/``load_state_dict``/``local_state_dict``
overridden, so ``torch.optim.lr_scheduler`` (which checks ``isinstance(opt, Optimizer)``) and
every attribute of the optimizer keep working. We do the same: the returned object *is* the
user's optimizer, its class swapped for a subclass of both its class and
:class:`DistributedOptimizer`; nothing is copied. Optimizers that are not ``torch.optim``
optimizers (the FP16_Optimizer wrappers of 1.6-era scripts) are wrapped the same way.

Note [smp sharded optimizer]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``shard_optimizer_state`` and more than one data-parallel replica, partitioning gives the
optimizer a ``torch.distributed.optim.ZeroRedundancyOptimizer`` (``modelparallel.runtime.zero``)
over this stage's parameters and the stage's data-parallel group, built with the user's class,
defaults and per-group hyperparameters: each replica keeps the state of its shard only, and
``step()`` updates the shard and broadcasts the parameters (gradients were averaged over the
replicas first). The user's object keeps its param groups (LR schedulers change them; each step
copies their hyperparameters to the sharded groups). ``local_state_dict()`` is this rank's
shard's state, saved one file per rank as ``_{pp}_{tp}_{rdp}`` (SMP's names); the full
``state_dict()`` is refused, as in SMP.

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

import torch

from modelparallel.errors import UnsupportedFeatureError
from modelparallel.torch.fp16 import LossScaler, clip_grad_norm_over_pipeline, unscale_and_check
from modelparallel.torch.model import PARTIAL_MARKER
from modelparallel.torch.state_mod import state

__all__ = ["DistributedOptimizer"]

_classes: dict[type, type] = {}


class DistributedOptimizer:
    """Make ``optimizer`` SMP's ``DistributedOptimizer`` (in place; returns it).

    Args:
        optimizer: A torch optimizer over ``model.parameters()`` (or any object with
            ``state_dict``/``load_state_dict``).
        static_loss_scale: With ``fp16``: the fixed loss scale; ``None`` means dynamic.
        dynamic_loss_scale: With ``fp16``: adjust the scale (Note [smp fp16] in
            ``modelparallel/torch/fp16.py``).
        **dynamic_loss_args: With ``fp16``: ``init_scale``, ``scale_factor``, ``scale_window``,
            ``min_scale``, ``delayed_shift``, ``consecutive_hysteresis`` (flat, or nested as
            ``dynamic_loss_args={...}`` as SMP's scripts pass them).

    Raises:
        UnsupportedFeatureError: loss-scaling arguments without ``fp16`` in the config, or
            ``shard_optimizer_state`` with an optimizer that is not a ``torch.optim`` one.
    """

    def __new__(cls, optimizer: Any, static_loss_scale: float | None = 1.0,
                dynamic_loss_scale: bool = False, **dynamic_loss_args: Any) -> Any:
        if isinstance(optimizer, DistributedOptimizer):
            return optimizer
        cfg = state.cfg
        fp16 = cfg is not None and cfg.fp16
        if not fp16 and (dynamic_loss_scale or dynamic_loss_args
                         or static_loss_scale not in (1.0, None)):
            raise UnsupportedFeatureError(
                "DistributedOptimizer's loss scaling (static_loss_scale, dynamic_loss_scale, "
                "dynamic_loss_args) belongs to SMP's fp16 mode; set 'fp16': True in the smp "
                "config, or drop the arguments")
        if cfg is not None and cfg.shard_optimizer_state and \
                not isinstance(optimizer, torch.optim.Optimizer):
            raise UnsupportedFeatureError(
                f"shard_optimizer_state needs a torch.optim optimizer, not "
                f"{type(optimizer).__name__}; wrap the torch optimizer itself")
        scaler = (LossScaler.from_smp(static_loss_scale, dynamic_loss_scale, dynamic_loss_args)
                  if fp16 else None)
        base = type(optimizer)
        sub = _classes.get(base)
        if sub is None:
            sub = type(base.__name__, (_Mixin, base), {"__module__": base.__module__})
            _classes[base] = sub
        optimizer.__class__ = sub
        optimizer._smp_deferred = []
        optimizer._smp_base = base
        optimizer._smp_zero = None
        optimizer._smp_unscaled = False
        optimizer.overflow = False
        if scaler is not None:
            optimizer.loss_scaler = scaler
        state.optimizer = optimizer
        return optimizer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: ``__new__`` set the optimizer up (Python calls this on what it returns)."""


class _Mixin(DistributedOptimizer):
    """The methods a DistributedOptimizer adds (before the user's optimizer class in the MRO)."""

    _smp_deferred: list[Any]
    _smp_base: type
    _smp_zero: Any
    _smp_unscaled: bool
    overflow: bool

    # -- stepping (fp16: Note [smp fp16]; sharded state: Note [smp sharded optimizer]) --------

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """The optimizer step: with ``fp16`` unscaled and skipped on every rank after an
        overflow (``self.overflow``); with ``shard_optimizer_state`` ZeRO-1's step."""
        scaler = getattr(self, "loss_scaler", None)
        run = self._smp_zero_step if self._smp_zero is not None else super().step  # type: ignore[misc]
        if scaler is None or not _partitioned():
            return run(*args, **kwargs)
        self._smp_unscale()
        out = None if self.overflow else run(*args, **kwargs)
        scaler.update_scale(self.overflow)
        self._smp_unscaled = False
        return out

    def _smp_unscale(self) -> None:
        """Divide this rank's gradients by the loss scale once per optimizer step and agree
        on overflow over the job (Note [smp fp16])."""
        scaler = getattr(self, "loss_scaler", None)
        if scaler is None or self._smp_unscaled or not _partitioned():
            return
        self.overflow = unscale_and_check(state.model.local_parameters(), scaler.loss_scale)
        self._smp_unscaled = True

    def clip_master_grads(self, max_norm: float, norm_type: float = 2.0) -> float:
        """Clip the (unscaled) gradients by their norm over the whole pipeline; returns the
        norm (inf after an overflow: the step is skipped anyway). A collective."""
        self._smp_unscale()
        params = state.model.local_parameters() if _partitioned() else (
            p for g in self.param_groups for p in g["params"])  # type: ignore[attr-defined]
        pp = state.groups.get("pp") if state.layout is not None and state.layout.pp > 1 \
            else None
        return clip_grad_norm_over_pipeline(list(params), max_norm, norm_type, pp)

    @property
    def fp32_from_fp16_groups(self) -> list[list[Any]]:
        """The fp32 master parameters by group: the parameters themselves (Note [smp fp16])."""
        return [list(g["params"]) for g in self.param_groups]  # type: ignore[attr-defined]

    def _smp_zero_step(self, *args: Any, **kwargs: Any) -> Any:
        zero, index = self._smp_zero
        for zg, i in zip(zero.param_groups, index):  # LR schedulers change our groups
            zg.update(_hyper(self.param_groups[i]))  # type: ignore[attr-defined]
        return zero.step(*args, **kwargs)

    # -- state ----------------------------------------------------------------------------------

    def orig_state_dict(self) -> Any:
        """The wrapped optimizer's own ``state_dict()`` (with sharded state: this rank's
        shard's)."""
        if self._smp_zero is not None:
            zero, index = self._smp_zero
            sd = zero.optim.state_dict()
            for g, i in zip(sd["param_groups"], index):  # our groups' current hyperparameters
                g.update(_hyper(self.param_groups[i]))  # type: ignore[attr-defined]
            return sd
        return super().state_dict()  # type: ignore[misc]

    def local_state_dict(self, gather_if_shard: bool = False) -> dict[str, Any]:
        """This rank's optimizer state (its stage's parameters, or with
        ``shard_optimizer_state`` its shard of them), marked partial."""
        sd = dict(self.orig_state_dict())
        sd[PARTIAL_MARKER] = True
        return sd

    def state_dict(self) -> dict[str, Any]:
        """The full optimizer state, gathered over the pipeline (collective: every rank)."""
        if self._smp_zero is not None:
            raise UnsupportedFeatureError(
                "the full optimizer state_dict() is not available with shard_optimizer_state "
                "(SMP's rule); save optimizer.local_state_dict() with smp.save(..., "
                "partial=True) on every rank, or smp.save_checkpoint(..., partial=True)")
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
        if self._smp_zero is not None:  # this rank's shard, as local_state_dict saved it
            zero, index = self._smp_zero
            zero.optim.load_state_dict(sd)
            for local, shown, i in zip(zero.optim.param_groups, zero.param_groups, index):
                shown.update(_hyper(local))  # the saved hyperparameters (lr...) everywhere
                self.param_groups[i].update(_hyper(local))  # type: ignore[attr-defined]
            return
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
        ``modelparallel/torch/creation.py``), shard the state over the stage's replicas with
        ``shard_optimizer_state``, then apply the deferred loads."""
        if renamed and hasattr(self, "param_groups"):
            for group in self.param_groups:
                group["params"] = [renamed.get(id(p), p) for p in group["params"]]
        cfg, layout = state.cfg, state.layout
        if cfg is not None and cfg.shard_optimizer_state and layout is not None \
                and layout.dp > 1:
            self._smp_zero = _shard(self)
        for sd in self._smp_deferred:
            self._load_local(sd)
        self._smp_deferred.clear()


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _partitioned() -> bool:
    return state.model is not None and state.model.partitioned


def _shard(opt: Any) -> tuple[Any, list[int]]:
    """ZeRO-1 over this stage's replicas (Note [smp sharded optimizer]): the groups' local
    parameters, the user's hyperparameters; and which of the user's groups each one is."""
    from modelparallel.runtime.zero import shard_optimizer

    local = {id(p) for p in state.model.local_parameters()}
    groups, index = [], []
    for i, g in enumerate(opt.param_groups):
        params = [p for p in g["params"] if id(p) in local]
        if params:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
            index.append(i)
    if not groups:
        raise UnsupportedFeatureError(
            f"shard_optimizer_state: pipeline rank {state.model.pipeline.stage} holds no "
            "parameter of the optimizer, so there is no state to shard; give every stage "
            "parameters (fewer partitions) or turn shard_optimizer_state off")
    import inspect

    # defaults the class's constructor takes (AdamW's include Adam's decoupled_weight_decay)
    accepted = inspect.signature(opt._smp_base.__init__).parameters
    defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
    return shard_optimizer(groups, opt._smp_base,  # type: ignore[arg-type]
                           state.model.pipeline.dp_group, **defaults), index


def _cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
