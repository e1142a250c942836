"""``StageComm``'s point-to-point operations on real gloo processes, posted from the comm's
thread, from the caller's and split between them (Note [posting thread]): the same messages
arrive, in order, and a receive of no tensors (an empty stage boundary) is complete at once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist import run_ranks

pytestmark = pytest.mark.multiprocess


def exchange_job(rank: int, world: int, post_thread: bool | str) -> list[Any]:
    """Rank 0 sends three messages to rank 1, which posts a receive of nothing in between."""
    from modelparallel.runtime.comm import PendingRecv, StageComm

    comm = StageComm.create(rank, list(range(world)), "cpu", 30.0, post_thread=post_thread)
    try:
        if rank == 0:
            for i in range(3):
                comm.issue([(1, [torch.full((4,), float(i)), torch.arange(i + 1.0)])], [],
                           label=f"m{i}")
            comm.drain_sends()
            return []
        recvs = [PendingRecv(0, [torch.empty(4), torch.empty(i + 1)], f"message {i}")
                 for i in range(3)]
        nothing = PendingRecv(0, [], "an empty boundary")
        comm.issue([], [recvs[0], nothing])
        comm.issue([], recvs[1:])
        got = [comm.wait(nothing)] + [comm.wait(r) for r in recvs]
        return [[t.tolist() for t in ts] for ts in got]
    finally:
        comm.teardown()


@pytest.mark.parametrize("post_thread", [True, False, "receives"])
def test_messages_arrive_in_order_and_an_empty_receive_completes(post_thread: bool | str
                                                                 ) -> None:
    results = [r.unwrap() for r in run_ranks(exchange_job, 2, post_thread, timeout=120)]
    assert results[1] == [[]] + [[[float(i)] * 4, [float(j) for j in range(i + 1)]]
                                 for i in range(3)]


def both_ways_job(rank: int, world: int, post_thread: bool | str) -> list[list[float]]:
    """Each rank sends three messages to the other and receives three, each round's send and
    receive issued together (sends on this thread, receives on the comm's, for "receives")."""
    from modelparallel.runtime.comm import PendingRecv, StageComm

    comm = StageComm.create(rank, list(range(world)), "cpu", 30.0, post_thread=post_thread)
    try:
        peer = 1 - rank
        recvs = [PendingRecv(peer, [torch.empty(3)], f"message {i}") for i in range(3)]
        for i, r in enumerate(recvs):
            comm.issue([(peer, [torch.full((3,), 10.0 * rank + i)])], [r], label=f"m{i}")
        got = [comm.wait(r)[0].tolist() for r in recvs]
        comm.drain_sends()
        return got
    finally:
        comm.teardown()


@pytest.mark.parametrize("post_thread", [True, False, "receives"])
def test_messages_both_ways_arrive_in_order(post_thread: bool | str) -> None:
    results = [r.unwrap() for r in run_ranks(both_ways_job, 2, post_thread, timeout=120)]
    assert results == [[[10.0 + i] * 3 for i in range(3)], [[float(i)] * 3 for i in range(3)]]


@pytest.mark.parametrize("value", ["recieves", "yes"])
def test_an_unknown_posting_mode_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [posting thread]: a misspelt mode is an error, not silently one of the others."""
    from modelparallel.errors import ConfigError
    from modelparallel.runtime.comm import StageComm

    monkeypatch.setenv("MODELPARALLEL_POST_THREAD", value)
    with pytest.raises(ConfigError, match="MODELPARALLEL_POST_THREAD"):
        StageComm(0, [0], torch.device("cpu"), 1.0, None)
    monkeypatch.delenv("MODELPARALLEL_POST_THREAD")
    with pytest.raises(ConfigError, match="post_thread"):
        StageComm(0, [0], torch.device("cpu"), 1.0, None, post_thread=value)
