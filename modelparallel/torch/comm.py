"""SMP's object communication on torch.distributed: ``broadcast``/``send``/``recv_from``/
``allgather``/``barrier`` and the ``CommGroup``/``RankType`` enums.

Objects are pickled by torch.distributed's object collectives (``send_object_list``,
``broadcast_object_list``...) on the group the call names; nothing else carries them. SMP's
``broadcast(obj, group)`` is point-to-point: the sender sends to every other member and each
receiver calls ``recv_from(src, rank_type)``, as in SMP.

Example:
    >>> CommGroup.DP_GROUP.rank_type is RankType.DP_RANK
    True
"""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.errors import ConfigError
from modelparallel.torch import state_mod as sm

__all__ = [
    "DP_GROUP",
    "MP_GROUP",
    "PP_GROUP",
    "RDP_GROUP",
    "TP_GROUP",
    "WORLD",
    "CommGroup",
    "RankType",
    "allgather",
    "barrier",
    "broadcast",
    "dp_barrier",
    "mp_barrier",
    "pp_barrier",
    "rdp_barrier",
    "recv_from",
    "send",
    "tp_barrier",
]


class RankType(enum.Enum):
    """How a rank number is read: globally or within one kind of group."""

    WORLD_RANK = "world"
    MP_RANK = "mp"
    DP_RANK = "dp"
    PP_RANK = "pp"
    TP_RANK = "tp"
    RDP_RANK = "rdp"


class CommGroup(enum.Enum):
    """A kind of group."""

    WORLD = "world"
    MP_GROUP = "mp"
    DP_GROUP = "dp"
    PP_GROUP = "pp"
    TP_GROUP = "tp"
    RDP_GROUP = "rdp"

    @property
    def rank_type(self) -> RankType:
        """The rank type that numbers this group's members."""
        return RankType(self.value)


WORLD = CommGroup.WORLD
MP_GROUP = CommGroup.MP_GROUP
DP_GROUP = CommGroup.DP_GROUP
PP_GROUP = CommGroup.PP_GROUP
TP_GROUP = CommGroup.TP_GROUP
RDP_GROUP = CommGroup.RDP_GROUP


def _members(kind: str) -> list[int]:
    lay = sm.state.require()
    if kind == "world":
        return list(range(lay.world))
    return {"mp": lay.mp_group, "dp": lay.dp_group, "pp": lay.pp_group, "tp": lay.tp_group,
            "rdp": lay.rdp_group}[kind](sm.state.rank)


def _pg(kind: str) -> Any:
    if kind == "world":
        return dist.group.WORLD
    return sm.state.groups.get(kind)


def _kind(value: Any, enum_type: type[enum.Enum], what: str) -> str:
    if isinstance(value, (CommGroup, RankType)):
        return str(value.value)
    raise ConfigError(f"{what} must be an smp.{enum_type.__name__}, not {value!r}")


def _device() -> torch.device:
    if sm.state.distributed and dist.get_backend() == "nccl":
        return sm.state.device
    return torch.device("cpu")


def send(obj: Any, dest_rank: int, rank_type: RankType) -> None:
    """Send a picklable object to ``dest_rank`` (read in ``rank_type``'s group); blocking."""
    kind = _kind(rank_type, RankType, "rank_type")
    members = _members(kind)
    if not 0 <= dest_rank < len(members):
        raise ConfigError(f"dest_rank {dest_rank} is out of range for {rank_type} (group of "
                          f"{len(members)} ranks)")
    if not sm.state.distributed:
        raise ConfigError("smp.send needs more than one process")
    dist.send_object_list([obj], dst=members[dest_rank], group=_pg(kind), device=_device())


def recv_from(src_rank: int, rank_type: RankType) -> Any:
    """Receive an object sent by ``src_rank`` (read in ``rank_type``'s group) with
    :func:`send` or :func:`broadcast`; blocking."""
    kind = _kind(rank_type, RankType, "rank_type")
    members = _members(kind)
    if not 0 <= src_rank < len(members):
        raise ConfigError(f"src_rank {src_rank} is out of range for {rank_type} (group of "
                          f"{len(members)} ranks)")
    if not sm.state.distributed:
        raise ConfigError("smp.recv_from needs more than one process")
    box: list[Any] = [None]
    dist.recv_object_list(box, src=members[src_rank], group=_pg(kind), device=_device())
    return box[0]


def broadcast(obj: Any, group: CommGroup) -> None:
    """Send ``obj`` to every other member of ``group``; they call :func:`recv_from`."""
    kind = _kind(group, CommGroup, "group")
    me = sm.state.rank
    for r in _members(kind):
        if r != me:
            dist.send_object_list([obj], dst=r, group=_pg(kind), device=_device())


def allgather(obj: Any, group: CommGroup) -> list[Any]:
    """Every member's ``obj`` (tensors too), ordered by rank in ``group``."""
    kind = _kind(group, CommGroup, "group")
    members = _members(kind)
    if len(members) == 1 or not sm.state.distributed:
        return [obj]
    out: list[Any] = [None] * len(members)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu() if _device().type == "cpu" else obj.detach()
    dist.all_gather_object(out, obj, group=_pg(kind))
    # all_gather_object orders by the group's own ranks, which follow the global order; ours
    # follow the group rank, so reorder.
    by_global = dict(zip(sorted(members), out))
    return [by_global[r] for r in members]


def barrier(group: CommGroup = CommGroup.WORLD) -> None:
    """Wait until every member of ``group`` arrives."""
    kind = _kind(group, CommGroup, "group")
    if not sm.state.distributed or len(_members(kind)) == 1:
        sm.state.require()
        return
    if _device().type == "cuda":
        dist.barrier(group=_pg(kind), device_ids=[sm.state.device.index])
    else:
        dist.barrier(group=_pg(kind))


def mp_barrier() -> None:
    """:func:`barrier` over the model-parallel group."""
    barrier(CommGroup.MP_GROUP)


def dp_barrier() -> None:
    """:func:`barrier` over the data-parallel group."""
    barrier(CommGroup.DP_GROUP)


def pp_barrier() -> None:
    """:func:`barrier` over the pipeline group."""
    barrier(CommGroup.PP_GROUP)


def tp_barrier() -> None:
    """:func:`barrier` over the tensor-parallel group."""
    barrier(CommGroup.TP_GROUP)


def rdp_barrier() -> None:
    """:func:`barrier` over the reduced data-parallel group."""
    barrier(CommGroup.RDP_GROUP)
