"""The failure board and error mapping (Note [failure propagation],
modelparallel/runtime/failure.py), without a second process; the multi-process failures are in
tests/runtime/test_executor.py."""

from __future__ import annotations

import torch.distributed as dist

from modelparallel.errors import PeerFailedError, StepTimeoutError
from modelparallel.runtime.failure import FailureBoard, map_comm_error, report_for


def test_failure_board_keeps_the_first_report() -> None:
    store = dist.HashStore()
    board1, board2 = FailureBoard(store, "p", rank=1), FailureBoard(store, "p", rank=2)
    assert board1.first() is None
    board1.post(origin=1, kind="error", message="ValueError: boom")
    board1.post(origin=1, kind="error", message="ignored: posted once")
    board2.post(origin=1, kind="peer", message="ValueError: boom")
    first = board2.first()
    assert first is not None and (first.origin, first.reporter) == (1, 1)
    assert first.describe() == "rank 1 failed: ValueError: boom"


def test_comm_errors_become_named_errors() -> None:
    store = dist.HashStore()
    board = FailureBoard(store, "q", rank=0)
    closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    err = map_comm_error(closed, board, rank=0, peer=1, what="the gradients of microbatch 2",
                         timeout=30)
    assert isinstance(err, PeerFailedError) and err.peer == 1 and "rank 1" in str(err)
    assert report_for(err, 0).kind == "exited"
    timed = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")
    err2 = map_comm_error(timed, board, rank=0, peer=1, what="activations", timeout=30)
    assert isinstance(err2, StepTimeoutError) and "30 s" in str(err2)
    FailureBoard(store, "q", rank=3).post(origin=3, kind="error", message="KeyError: 'x'")
    err3 = map_comm_error(closed, board, rank=0, peer=1, what="activations", timeout=30)
    assert isinstance(err3, PeerFailedError) and err3.peer == 3 and "KeyError" in str(err3)
    own = report_for(ValueError("bad"), 5)
    assert (own.origin, own.kind) == (5, "error") and "ValueError: bad" in own.message
