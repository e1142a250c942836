"""Optimizer-state sharding (ZeRO-1) over a stage's data-parallel replicas.

Each stage's replicas split its optimizer state: torch's
``torch.distributed.optim.ZeroRedundancyOptimizer`` over the stage's data-parallel group keeps
``1 / dp`` of the state on each replica and broadcasts the updated parameters after its
``step``; gradients are still averaged over the replicas first (Note [data-parallel gradient
sync] in ``modelparallel/runtime/data_parallel.py``). The planner divides the optimizer state by
``dp`` (Note [memory features] in ``modelparallel/partitioner/memory_features.py``). Sharded
checkpoints are one file per rank, named as in SMP: ``f"{prefix}_{pp_rank}_{tp_rank}_{rdp_rank}"``.

Example:
    >>> sharded_state_path("ckpt/opt.pt", pp_rank=1, rdp_rank=3)
    'ckpt/opt.pt_1_0_3'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["load_sharded", "save_sharded", "shard_optimizer", "sharded_state_path"]


def sharded_state_path(prefix: str, pp_rank: int, rdp_rank: int, tp_rank: int = 0) -> str:
    """SMP's file name of one rank's optimizer shard."""
    return f"{prefix}_{pp_rank}_{tp_rank}_{rdp_rank}"


def shard_optimizer(params: Iterable[torch.Tensor], optimizer_class: type[torch.optim.Optimizer],
                    group: Any, **defaults: Any) -> torch.optim.Optimizer:
    """A ZeRO-1 optimizer over ``group`` (collective over it)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(list(params), optimizer_class=optimizer_class,
                                   process_group=group, **defaults)


def _local(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optim", optimizer)


def save_sharded(optimizer: torch.optim.Optimizer, prefix: str, pp_rank: int, rdp_rank: int,
                 tp_rank: int = 0) -> str:
    """Save this rank's shard (or the whole state of an unsharded optimizer); return the path."""
    path = sharded_state_path(prefix, pp_rank, rdp_rank, tp_rank)
    torch.save(_local(optimizer).state_dict(), path)
    return path


def load_sharded(optimizer: torch.optim.Optimizer, prefix: str, pp_rank: int, rdp_rank: int,
                 tp_rank: int = 0) -> None:
    """Load this rank's shard saved by :func:`save_sharded`."""
    path = sharded_state_path(prefix, pp_rank, rdp_rank, tp_rank)
    _local(optimizer).load_state_dict(torch.load(path, weights_only=False))
