"""Model creation contexts: ``smp.delay_param_initialization``, ``smp.model_creation``, and
SMP's tensor-parallel and activation-checkpointing entry points, which are not implemented and
say so (``UnsupportedFeatureError``) instead of being ignored.

Note [delayed parameters]
~~~~~~~~~~~~~~~~~~~~~~~~~
``with smp.delay_param_initialization():`` builds the model on the meta device, so no parameter
memory is allocated. The trace runs on fake tensors; at partitioning each rank materialises only
its own stage (``modelparallel.codegen.materialize``: ``reset_parameters`` of its modules), so
every rank holds only its stage's parameters. Materialising makes new parameter objects, so the
DistributedOptimizer (built from the meta parameters) swaps them in, by name, after partitioning.
Parameters of other stages stay on the meta device on this rank. Load weights after wrapping
(``model.load_state_dict`` is deferred until partitioning and applied to the real stage).

Example:
    >>> with delay_param_initialization():
    ...     layer = torch.nn.Linear(4, 4)
    >>> layer.weight.is_meta
    True
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modelparallel.errors import ConfigError, UnsupportedFeatureError

__all__ = [
    "delay_param_initialization",
    "model_creation",
    "checkpoint_paths",
    "set_activation_checkpointing",
    "set_tensor_parallelism",
    "tensor_parallelism",
    "tp_register",
    "tp_register_with_module",
]

_TP = ("tensor parallelism is not implemented in modelparallel.torch; run the model unchanged "
       "(pipeline parallelism splits it across ranks) and remove the tensor-parallel call")
_CKPT = ("SMP's functional activation checkpointing (called inside forward) is not supported; "
         "mark the module instead with smp.set_activation_checkpointing(module) after building "
         "the model (the planner and runtime then recompute it in backward)")

#: Modules marked by set_activation_checkpointing (weak: a dropped model forgets them).
_checkpointed: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def delay_param_initialization(enabled: bool = True) -> Iterator[None]:
    """Build the model's parameters on the meta device (Note [delayed parameters])."""
    if not enabled:
        yield
        return
    with torch.device("meta"):
        yield


@contextlib.contextmanager
def model_creation(tensor_parallelism: bool = False, dtype: torch.dtype | None = None,
                   **tensor_parallel_config: Any) -> Iterator[None]:
    """SMP's creation context: ``dtype`` as the default dtype while the model is built, and
    delayed initialisation when the config's ``delayed_parameter_initialization`` is on.

    Raises:
        UnsupportedFeatureError: with ``tensor_parallelism=True``.
    """
    from modelparallel.torch.state_mod import state

    if tensor_parallelism:
        raise UnsupportedFeatureError(f"model_creation(tensor_parallelism=True): {_TP}")
    delay = bool(state.cfg is not None and state.cfg.delayed_parameter_initialization)
    old = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with delay_param_initialization(delay):
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def tensor_parallelism(enabled: bool = True, **kwargs: Any) -> Iterator[None]:
    """SMP's tensor-parallel context: refused when enabled (not implemented)."""
    if enabled:
        raise UnsupportedFeatureError(f"smp.tensor_parallelism(): {_TP}")
    yield


def set_tensor_parallelism(module: nn.Module, enabled: bool = True, **kwargs: Any) -> None:
    """Refused when enabled (tensor parallelism is not implemented)."""
    if enabled:
        raise UnsupportedFeatureError(f"smp.set_tensor_parallelism(): {_TP}")


def tp_register(dist_module: Any, init_hook: Any = None, forward_hook: Any = None,
                return_hook: Any = None) -> Any:
    """Refused (tensor parallelism is not implemented)."""
    raise UnsupportedFeatureError(f"smp.tp_register(): {_TP}")


def tp_register_with_module(module_cls: Any, dist_module: Any, init_hook: Any = None,
                            forward_hook: Any = None, return_hook: Any = None) -> None:
    """Refused (tensor parallelism is not implemented)."""
    raise UnsupportedFeatureError(f"smp.tp_register_with_module(): {_TP}")


def set_activation_checkpointing(module: nn.Module, preserve_rng_state: bool = True,
                                 pack_args_as_tuple: bool = False, strategy: str = "each"
                                 ) -> None:
    """Recompute ``module``'s forward in backward instead of keeping its activations (SMP's
    ``smp.set_activation_checkpointing``). For an ``nn.Sequential`` (SMP's rule: ``strategy``
    matters only there), ``"each"`` checkpoints each child on its own, ``"group_N"`` each run of
    ``N`` consecutive children as one, and ``"contiguous"`` the consecutive children on one
    stage as one (the children are one region, which each stage recomputes as a whole: Note
    [checkpoint regions] in ``modelparallel/codegen/checkpointing.py``). At partitioning the
    marked modules become the planner's checkpointing regions (Note [memory features] in
    ``modelparallel/partitioner/memory_features.py``), which the runtime recomputes.

    Raises:
        ConfigError: for a ``strategy`` other than ``"each"``, ``"contiguous"``, ``"group_N"``.
        UnsupportedFeatureError: for ``preserve_rng_state=False``.

    Example:
        >>> seq = nn.Sequential(*(nn.Linear(2, 2) for _ in range(5)))
        >>> set_activation_checkpointing(seq, strategy="group_2")
        >>> checkpoint_paths(seq)
        ('0+1', '2+3', '4')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"set_activation_checkpointing takes an nn.Module, not "
                        f"{type(module).__name__}")
    _group_size(strategy)
    if not preserve_rng_state:
        raise UnsupportedFeatureError("set_activation_checkpointing(preserve_rng_state=False) "
                                      "is not supported; leave it True")
    _checkpointed[module] = strategy


def _group_size(strategy: str) -> int | None:
    """Children per region of SMP's ``strategy``: 1 for ``"each"``, ``N`` for ``"group_N"``,
    None (all of them) for ``"contiguous"``."""
    if strategy == "each":
        return 1
    if strategy == "contiguous":
        return None
    n = strategy.removeprefix("group_")
    if strategy.startswith("group_") and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ConfigError(f"set_activation_checkpointing(strategy={strategy!r}): use 'each', "
                      "'contiguous' or 'group_N' (N >= 1 consecutive children of the "
                      "nn.Sequential per checkpoint)")


def checkpoint_paths(root: nn.Module) -> tuple[str, ...]:
    """The checkpoint regions under ``root`` marked by :func:`set_activation_checkpointing`:
    module paths, and for a marked ``nn.Sequential`` its children, grouped by its strategy
    (``"a.0+a.1"``: one region of two modules, ``region_of`` in ``modelparallel/ir``)."""
    out: list[str] = []
    for name, m in root.named_modules():
        if m in _checkpointed:
            if isinstance(m, nn.Sequential):
                kids = [f"{name}.{c}" if name else c for c, _ in m.named_children()]
                size = _group_size(_checkpointed[m]) or max(1, len(kids))
                out += ["+".join(kids[i:i + size]) for i in range(0, len(kids), size)]
            else:
                out.append(name)
    return tuple(out)
