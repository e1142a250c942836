"""Ranks, groups, the communication helpers and ``smp.CheckpointManager`` of the TensorFlow API.

In one process (Note [tf process model] in ``_state.py``) every rank is 0 and every size 1;
``send``/``broadcast`` to this process are delivered to its own ``recv_from``, so SMP code that
exchanges objects between ranks runs unchanged. Across processes (Note [tf cluster process model]
in ``runtime/tf_cluster.py``) each process is one pipeline rank (``mp_rank() == pp_rank() ==
rank()``, one model replica: ``dp_size() == 1``) and objects travel through the processes'
mailboxes on TensorFlow's runtime.
"""

from __future__ import annotations

import enum
from collections import defaultdict, deque
from typing import Any

import tensorflow as tf

from modelparallel.errors import ConfigError

__all__ = ["DP_GROUP", "MP_GROUP", "PP_GROUP", "WORLD", "CheckpointManager", "CommGroup",
           "RankType", "allgather", "barrier", "broadcast", "dp_barrier", "dp_rank", "dp_size",
           "local_rank", "local_size", "mp_barrier", "mp_rank", "mp_size", "pp_rank", "pp_size",
           "rank", "recv_from", "send", "size"]


class CommGroup(enum.Enum):
    """SMP's process groups."""

    WORLD = 0
    MP_GROUP = 1
    DP_GROUP = 2
    PP_GROUP = 3


class RankType(enum.Enum):
    """How a rank number is read: in the world or in one of this process's groups."""

    WORLD_RANK = 0
    MP_RANK = 1
    DP_RANK = 2
    PP_RANK = 3


WORLD, MP_GROUP, DP_GROUP, PP_GROUP = (CommGroup.WORLD, CommGroup.MP_GROUP, CommGroup.DP_GROUP,
                                       CommGroup.PP_GROUP)


def _cluster() -> Any:
    from modelparallel.runtime.tf_cluster import current_cluster

    return current_cluster()


def rank() -> int:
    """This process's global rank (0 in one process: Note [tf process model]).

    Example:
        >>> rank(), size()
        (0, 1)
    """
    cl = _cluster()
    return 0 if cl is None else int(cl.rank)


def size() -> int:
    """The number of processes."""
    cl = _cluster()
    return 1 if cl is None else int(cl.size)


def local_rank() -> int:
    """This process's index on its host."""
    cl = _cluster()
    return 0 if cl is None else int(cl.config.local_rank)


def local_size() -> int:
    """The processes on this host."""
    cl = _cluster()
    return 1 if cl is None else int(cl.config.local_size)


def dp_rank() -> int:
    """The data-parallel rank (0: one model replica)."""
    return 0


def dp_size() -> int:
    """The data-parallel degree (1: one model replica)."""
    return 1


mp_rank = pp_rank = rank
mp_size = pp_size = size

_MAILBOX: dict[int, deque[Any]] = defaultdict(deque)


def _check_rank(r: int) -> None:
    if r != 0 and _cluster() is None:
        raise ConfigError(f"rank {r} does not exist: this TensorFlow job is one process (rank 0)"
                          " driving every stage")


def send(obj: Any, dest_rank: int, rank_type: RankType = RankType.WORLD_RANK) -> None:
    """Send ``obj`` to ``dest_rank`` (only this process exists: its own ``recv_from(0)``).

    Example:
        >>> send({"a": 1}, 0); recv_from(0)
        {'a': 1}
    """
    _check_rank(dest_rank)
    cl = _cluster()
    if cl is not None:
        cl.send(dest_rank, "user", obj)
        return
    _MAILBOX[0].append(obj)


def recv_from(src_rank: int, rank_type: RankType = RankType.WORLD_RANK) -> Any:
    """The next object sent to this process from ``src_rank``.

    Raises:
        ConfigError: if nothing was sent (it would block forever).
    """
    _check_rank(src_rank)
    cl = _cluster()
    if cl is not None:
        return cl.recv(src_rank, "user")
    if not _MAILBOX[0]:
        raise ConfigError("recv_from(0): nothing was sent to this process; a one-process job "
                          "receives only what it sent or broadcast")
    return _MAILBOX[0].popleft()


def broadcast(obj: Any, group: CommGroup = CommGroup.WORLD) -> None:
    """Send ``obj`` to the other members of ``group`` (there are none: a no-op).

    Example:
        >>> broadcast(1)
    """
    cl = _cluster()
    if cl is not None:
        for k in range(cl.size):
            if k != cl.rank:
                cl.send(k, "user", obj)


def allgather(obj: Any, group: CommGroup = CommGroup.WORLD) -> list[Any]:
    """``obj`` of every member of ``group``, by group rank.

    Example:
        >>> allgather(3)
        [3]
    """
    cl = _cluster()
    if cl is None:
        return [obj]
    for k in range(cl.size):
        if k != cl.rank:
            cl.send(k, "allgather", obj)
    return [obj if k == cl.rank else cl.recv(k, "allgather") for k in range(cl.size)]


def barrier(group: CommGroup = CommGroup.WORLD) -> None:
    """Wait for every member of ``group`` (only this process).

    Example:
        >>> barrier()
    """
    allgather(None, group)


def mp_barrier() -> None:
    """:func:`barrier` on the model-parallel group."""
    barrier()


def dp_barrier() -> None:
    """:func:`barrier` on the data-parallel group."""


class CheckpointManager(tf.train.CheckpointManager):  # type: ignore[misc]
    """SMP's ``CheckpointManager``: TensorFlow's, with SMP's defaults. Variables are the model's
    own (not per-stage copies), so a checkpoint restores onto any plan; TensorFlow writes the
    files before it updates the ``checkpoint`` state file, so a crash mid-save keeps the last
    good checkpoint.

    Example:
        >>> import tempfile  # doctest: +SKIP
        >>> ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))  # doctest: +SKIP
        >>> CheckpointManager(ckpt, tempfile.mkdtemp()).save()  # doctest: +SKIP
    """

    def __init__(self, checkpoint: Any, directory: str = "/opt/ml/checkpoints",
                 max_to_keep: int | None = None, checkpoint_name: str = "ckpt") -> None:
        super().__init__(checkpoint, directory, max_to_keep=max_to_keep,
                         checkpoint_name=checkpoint_name)
        self._checkpoint_ref = checkpoint

    def save(self, *args: Any, **kwargs: Any) -> Any:
        """Write a checkpoint; across processes only rank 0 writes (the other ranks' models are
        replicas of its: Note [tf cluster process model]) and the others return None."""
        if rank() != 0:
            return None
        return super().save(*args, **kwargs)

    def restore(self) -> Any:
        """Restore the latest checkpoint (None when there is none)."""
        path = self.latest_checkpoint
        return self._checkpoint_ref.restore(path) if path else None
