"""Point-to-point and collective communication of one pipeline rank.

:class:`StageComm` owns the pipeline's process groups: one over all its ranks (timeouts set to the
pipeline's ``timeout``) for neighbour sends and receives and the loss/output broadcast, and one
subgroup per set of stages sharing a tied parameter. Sends and receives are asynchronous
(``isend``/``irecv``); a receive's buffers are filled when :meth:`StageComm.wait` returns, a sent
tensor stays referenced until :meth:`StageComm.drain_sends`. A failed or timed-out wait becomes a
:class:`~modelparallel.errors.PeerFailedError` or :class:`~modelparallel.errors.StepTimeoutError`
(Note [failure propagation] in ``modelparallel/runtime/failure.py``).

On NCCL the sends of one action and the receives of the next are issued as one group
(``batch_isend_irecv``), Megatron-style, because NCCL runs the operations between two ranks in
issue order and a large send and a large receive issued separately in opposite orders on the two
sides would wait on each other. Gloo needs no grouping; there a thread of the comm posts the
sends and receives (Note [posting thread]).

Note [posting thread]
~~~~~~~~~~~~~~~~~~~~~
Posting one gloo send or receive costs the calling thread 40-110 microseconds (a system call on
the peer's TCP connection, and the rendezvous notice of Note [receives ahead] in
``executor.py``); with a few posts per action that is several percent of a step, spent between
computes and so on the critical path (``docs/schedules.md``). So on gloo :meth:`StageComm.issue`
queues its receives, and one thread of the comm posts them, in issue order (which gloo's
matching of the messages between two ranks needs), while the calling thread goes on computing
(the posts and the compute release the GIL). A receive is waited for after its posting
(:meth:`StageComm.wait`), and an error of the thread is raised, mapped as any other, by the next
wait, issue or drain of the calling thread.

The sends are posted by the calling thread, where their data is ready: queued to the thread,
a send waits for that thread to get the GIL and a CPU from the computing thread, and on a busy
host it leaves only when the next action ends, with the receiver idle meanwhile; posted in
place it costs the post but leaves at once (measured in ``docs/schedules.md``, "Posting the
sends"). The order that matters is kept: gloo matches sends in the order of the sends to a
peer and receives in the order of the receives from it, each posted by one thread. A send's
tensors are kept until it completes. ``StageComm(post_thread=True)`` (``MODELPARALLEL_POST_THREAD=1``) posts the sends on
the thread too; ``post_thread=False`` (``MODELPARALLEL_POST_THREAD=0``) posts everything on the
calling thread.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import queue
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.errors import CommunicationError, ConfigError
from modelparallel.runtime.distributed import pipeline_namespace
from modelparallel.runtime.failure import FailureBoard, map_comm_error, report_for, summarize

__all__ = ["PendingRecv", "StageComm"]

#: One point-to-point operation: kind, tensor, peer's global rank, its receive, what it keeps,
#: its tag (Note [message channels] in ``modelparallel/runtime/channels.py``).
_Op = tuple[str, torch.Tensor, int, "PendingRecv | None", list[torch.Tensor], int]

#: A send: the destination stage and the tensors, optionally a tag (default 0).
Send = tuple[int, Sequence[torch.Tensor]] | tuple[int, Sequence[torch.Tensor], int]


@dataclass
class PendingRecv:
    """Receives posted for one message (a set of tensors from one peer).

    Attributes:
        src_stage: The stage they come from.
        buffers: The tensors being filled.
        what: What they are, for error messages.
        works: The library's handles (empty until issued).
        posted: Set once the receives are posted (Note [posting thread]).
        tag: The message tag (gloo matches messages per peer and tag, Note [message
            channels] in ``modelparallel/runtime/channels.py``; NCCL ignores it).
    """

    src_stage: int
    buffers: list[torch.Tensor]
    what: str
    tag: int = 0
    works: list[Any] = field(default_factory=list)
    posted: threading.Event = field(default_factory=threading.Event)


#: ``MODELPARALLEL_POST_THREAD`` values (Note [posting thread]).
_POST_THREAD_ENV: dict[str, bool | str] = {"receives": "receives", "1": True, "0": False}


class StageComm:
    """Communication of stage ``stage`` of a pipeline of ``len(ranks)`` stages.

    Creating one is collective: every rank of the job must create its pipeline's comm at the
    same point (``torch.distributed.new_group`` is collective over the whole job).

    Args:
        stage: This rank's stage.
        ranks: Global rank of each stage.
        device: Device of the boundary tensors (CUDA: NCCL; otherwise gloo).
        timeout: Seconds any wait may take before :class:`StepTimeoutError`.
        board: Where failures are reported.
        replicas: With data-parallel replicas of the pipeline, every replica's ranks in stage
            order (``ranks`` among them): process groups are created for all of them, in the
            same order on every rank, because ``torch.distributed.new_group`` is collective over
            the whole job (Note [placement order] in ``modelparallel/placement.py``).
        post_thread: On gloo, ``"receives"``: post the receives from a thread of the comm
            and the sends on the calling thread (Note [posting thread]); ``True``: both from
            the thread; ``False``: both on the calling thread. Ignored on NCCL. ``None``:
            ``MODELPARALLEL_POST_THREAD`` (``receives``, ``1`` or ``0``), else ``"receives"``.
    """

    def __init__(self, stage: int, ranks: Sequence[int], device: torch.device, timeout: float,
                 board: FailureBoard | None,
                 replicas: Sequence[Sequence[int]] | None = None,
                 post_thread: bool | str | None = None) -> None:
        self.stage = stage
        self.ranks = tuple(ranks)
        self.num_stages = len(self.ranks)
        self.device = device
        self.timeout = float(timeout)
        self.board = board
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.rank = self.ranks[stage]
        self._group: Any = None
        self._subgroups: dict[tuple[int, ...], Any] = {}
        self._pending_sends: list[tuple[Any, list[torch.Tensor], str]] = []
        self._sends_lock = threading.Lock()
        self._broken: str | None = None
        self.replicas = (tuple(tuple(r) for r in replicas) if replicas is not None
                         else (self.ranks,))
        if self.ranks not in self.replicas or any(len(r) != self.num_stages
                                                  for r in self.replicas):
            raise CommunicationError(f"replicas {self.replicas} must hold this pipeline's "
                                     f"ranks {self.ranks}, each with {self.num_stages} stages")
        if post_thread is None:
            env = os.environ.get("MODELPARALLEL_POST_THREAD", "receives")
            if env not in _POST_THREAD_ENV:
                raise ConfigError(f"MODELPARALLEL_POST_THREAD={env!r}: use one of "
                                  f"{list(_POST_THREAD_ENV)} (Note [posting thread])")
            post_thread = _POST_THREAD_ENV[env]
        if post_thread not in (True, False, "receives"):
            raise ConfigError(f"post_thread={post_thread!r}: use True, False or 'receives' "
                              "(Note [posting thread])")
        self._extra: list[Any] = []
        #: The pipeline group's rank of each pipeline rank (its ranks sorted).
        self._group_rank: dict[int, int] = {}
        if self.num_stages > 1:
            self._group = self._new_groups(self.replicas)
            self._group_rank = {r: dist.get_group_rank(self._group, r) for r in self.ranks}
        #: Whether sends are posted on the calling thread (receives on the posting thread).
        self._sends_here = post_thread == "receives"
        self._poster = (_Poster(self._post_ops) if post_thread and not self.grouped
                        and self.num_stages > 1 else None)

    def own_group(self, rank_lists: Sequence[Sequence[int]]) -> Any:
        """Create one process group per rank list, in order, on every rank (collective over
        the job); return the one holding this rank (``None`` if none does). The comm tears it
        down with its own groups (Note [failure propagation] in ``failure.py``), so a failure
        reaches the ranks waiting on it too.
        """
        mine = self._new_groups(rank_lists)
        if mine is not None:
            self._extra.append(mine)
        return mine

    def _new_groups(self, rank_lists: Sequence[Sequence[int]]) -> Any:
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(list(ranks), timeout=timedelta(seconds=self.timeout),
                               backend=self.backend)
            if self.rank in ranks:
                mine = g
        return mine

    @classmethod
    def create(cls, stage: int, ranks: Sequence[int], device: torch.device | str,
               timeout: float, namespace: str | None = None,
               replicas: Sequence[Sequence[int]] | None = None,
               post_thread: bool | str | None = None) -> StageComm:
        """Create the comm of ``stage`` with a failure board in the job's default store.

        Collective over the whole job (it creates process groups).

        Args:
            stage: This rank's stage.
            ranks: Global rank of each stage.
            device: Device of the boundary tensors.
            timeout: Seconds any wait may take.
            namespace: The pipeline's store key prefix; by default the next one of this rank
                (Note [setup agreement] in ``modelparallel/runtime/distributed.py``).
            replicas: Every data-parallel replica's ranks (see the class).
            post_thread: Post gloo sends and receives from a thread (see the class).
        """
        comm = cls(stage, ranks, torch.device(device), timeout, board=None, replicas=replicas,
                   post_thread=post_thread)
        store = dist.distributed_c10d._get_default_store()
        if namespace is None:
            namespace = pipeline_namespace(store, comm.rank)
        comm.board = FailureBoard(store, namespace, comm.rank)
        ref = weakref.ref(comm)
        atexit.register(_close_at_exit, ref)
        return comm

    # -- state -----------------------------------------------------------------------------------

    @property
    def grouped(self) -> bool:
        """Whether sends and the next receives are issued as one group (NCCL)."""
        return self.backend == "nccl"

    def check_usable(self) -> None:
        """Raise if an earlier failure tore the pipeline down."""
        if self._broken is not None:
            raise CommunicationError(
                f"this pipeline's communication was torn down after an earlier failure "
                f"({self._broken}); create a new pipeline")

    # -- point to point --------------------------------------------------------------------------

    def issue(self, sends: Sequence[Send], recvs: Sequence[PendingRecv],
              label: str = "") -> None:
        """Post sends (``(dst_stage, tensors)`` or ``(dst_stage, tensors, tag)``) and
        receives, asynchronously (on gloo through the posting thread, Note [posting thread]).

        The sends are kept, under ``label``, until :meth:`release` or :meth:`drain_sends`.
        """
        self.check_usable()
        ops: list[_Op] = []
        for send in sends:
            dst, tensors = send[0], send[1]
            tag = send[2] if len(send) > 2 else 0
            kept = [t.detach().contiguous() for t in tensors]
            for t in kept:
                ops.append(("send", t, self.ranks[dst], None, kept, tag))
        for r in recvs:
            for b in r.buffers:
                ops.append(("recv", b, self.ranks[r.src_stage], r, r.buffers, r.tag))
            if not r.buffers:  # nothing to receive (an empty boundary): posted at once
                r.posted.set()
        if not ops:
            return
        if self._poster is None:
            self._post_ops(ops, label)
            return
        if self._sends_here:
            mine = [op for op in ops if op[0] == "send"]
            if mine:
                self._post_ops(mine, label)
            ops = [op for op in ops if op[0] != "send"]
        if ops:
            self._poster.submit(ops, label)

    def _post_ops(self, ops: list[_Op], label: str) -> None:
        """Post ``ops`` (on the posting thread, Note [posting thread], or the caller's)."""
        issued: list[Any]
        try:
            if self.grouped:
                issued = dist.batch_isend_irecv([
                    dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer,
                               group=self._group, tag=tag)
                    for kind, t, peer, _, _, tag in ops])
            else:  # the group's own calls: dist.isend's checks cost 10-20 us a post
                pg, local = self._group, self._group_rank
                issued = [pg.send([t], local[peer], tag) if kind == "send"
                          else pg.recv([t], local[peer], tag)
                          for kind, t, peer, _, _, tag in ops]
        except RuntimeError as e:
            if not _is_link_failure(e):
                raise
            raise map_comm_error(e, self.board, rank=self.rank, peer=ops[0][2],
                                 what="the sends and receives it posted",
                                 timeout=self.timeout) from None
        works = [w for w in issued if w is not None]
        # A coalesced group may come back as one work for all its operations.
        per_op = [[w] for w in works] if len(works) == len(ops) else [works] * len(ops)
        sent = []
        for (kind, _, _, recv, kept, _), mine in zip(ops, per_op):
            for work in mine:
                if kind == "send":
                    sent.append((work, kept, label))
                else:
                    assert recv is not None
                    recv.works.append(work)
        with self._sends_lock:
            self._pending_sends.extend(sent)
        for _, _, _, recv, _, _ in ops:
            if recv is not None:
                recv.posted.set()

    def _check_poster(self) -> None:
        """Raise what the posting thread raised, if anything (Note [posting thread])."""
        if self._poster is not None and self._poster.error is not None:
            raise self._poster.error

    def wait(self, recv: PendingRecv) -> list[torch.Tensor]:
        """Block until ``recv``'s buffers are filled; return them."""
        self.check_usable()
        if self._poster is not None:
            deadline = time.monotonic() + self.timeout
            while not recv.posted.wait(0.05):
                self._check_poster()
                self.check_usable()
                if time.monotonic() > deadline:  # an internal error: never hang on it
                    raise CommunicationError(
                        f"rank {self.rank}: the receive of {recv.what} was not posted within "
                        f"{self.timeout} s by the posting thread (Note [posting thread]); "
                        "this is a bug of modelparallel: report it, and set "
                        "MODELPARALLEL_POST_THREAD=0 meanwhile")
            self._check_poster()
        try:
            for w in recv.works:
                w.wait()
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=self.ranks[recv.src_stage],
                                 what=recv.what, timeout=self.timeout) from None
        recv.works.clear()
        return recv.buffers

    def drain_sends(self) -> None:
        """Wait for every posted send to complete, then drop its tensors."""
        self._wait_sends(lambda label: True)

    def release(self, label: str) -> None:
        """Wait for the sends posted under ``label`` (the caller knows they were received)
        and drop their tensors."""
        self._wait_sends(lambda mine: mine == label)

    def _wait_sends(self, which: Callable[[str], bool]) -> None:
        if self._poster is not None:
            self._poster.flush(self.check_usable)
            self._check_poster()
        with self._sends_lock:
            done = [s for s in self._pending_sends if which(s[2])]
            self._pending_sends = [s for s in self._pending_sends if not which(s[2])]
        try:
            for w, _, _ in done:
                w.wait()
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1,
                                 what="a send to complete", timeout=self.timeout) from None

    def send_object(self, dst_stage: int, obj: Any, tag: int = 0) -> None:
        """Send a picklable object (a length, then the bytes) under ``tag``."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        self.issue([(dst_stage, [length.to(self.device), data.to(self.device)], tag)], [])

    def recv_object(self, src_stage: int, what: str, tag: int = 0) -> Any:
        """Receive an object sent with :meth:`send_object` under ``tag`` (blocking)."""
        length = PendingRecv(src_stage, [torch.empty(1, dtype=torch.int64, device=self.device)],
                             what, tag)
        self.issue([], [length])
        n = int(self.wait(length)[0].item())
        data = PendingRecv(src_stage, [torch.empty(n, dtype=torch.uint8, device=self.device)],
                           what, tag)
        self.issue([], [data])
        with _no_treespec_warning():
            return pickle.loads(self.wait(data)[0].cpu().numpy().tobytes())

    # -- collectives -----------------------------------------------------------------------------

    def broadcast(self, tensors: Sequence[torch.Tensor], src_stage: int, what: str) -> None:
        """Broadcast ``tensors`` in place from ``src_stage`` to every stage."""
        if self._group is None:
            return
        self.check_usable()
        try:
            for t in tensors:
                dist.broadcast(t, self.ranks[src_stage], group=self._group)
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1,
                                 what=what, timeout=self.timeout) from None

    def broadcast_async(self, tensors: Sequence[torch.Tensor], src_stage: int
                        ) -> list[Any]:
        """Start broadcasting ``tensors`` in place from ``src_stage`` (gloo only: a gloo
        collective runs on the process group's own thread, independent of its point-to-point
        operations, so it may be issued mid-step; Note [early result] in
        ``modelparallel/runtime/result.py``); finish with :meth:`wait_works`."""
        assert not self.grouped, "NCCL orders collectives with the sends and receives"
        if self._group is None:
            return []
        self.check_usable()
        try:
            return [dist.broadcast(t, self.ranks[src_stage], group=self._group, async_op=True)
                    for t in tensors]
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1,
                                 what="a broadcast", timeout=self.timeout) from None

    def wait_works(self, works: Sequence[Any], what: str) -> None:
        """Wait for operations started by :meth:`broadcast_async`."""
        self.check_usable()
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1, what=what,
                                 timeout=self.timeout) from None

    def broadcast_object(self, obj: Any, src_stage: int, what: str) -> Any:
        """Broadcast a picklable object from ``src_stage``; every stage returns it."""
        if self._group is None:
            return obj
        self.check_usable()
        box = [obj if self.stage == src_stage else None]
        try:
            with _no_treespec_warning():
                dist.broadcast_object_list(box, self.ranks[src_stage], group=self._group,
                                           device=self.device)
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1,
                                 what=what, timeout=self.timeout) from None
        return box[0]

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every stage's ``obj``, in stage order (collective over the pipeline)."""
        if self._group is None:
            return [obj]
        self.check_usable()
        out: list[Any] = [None] * self.num_stages
        try:
            with _no_treespec_warning():
                dist.all_gather_object(out, obj, group=self._group)
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1, what=what,
                                 timeout=self.timeout) from None
        return out

    def all_gather_int(self, value: int, what: str) -> list[int]:
        """Every stage's ``value`` (a signed 64-bit integer), in stage order (collective over
        the pipeline; one small tensor collective, cheaper than :meth:`all_gather_object`)."""
        return self.all_gather_int_finish(self.all_gather_int_start(value, async_op=False), what)

    def all_gather_int_start(self, value: int, *, async_op: bool) -> Any:
        """Start :meth:`all_gather_int` (asynchronously on gloo with ``async_op``, like
        :meth:`broadcast_async`); :meth:`all_gather_int_finish` gives the values."""
        if self._group is None:
            return ([torch.tensor([value], dtype=torch.int64)], None)
        self.check_usable()
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.num_stages)]
        try:
            work = dist.all_gather(out, mine, group=self._group,
                                   async_op=async_op and not self.grouped)
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1,
                                 what="an all-gather", timeout=self.timeout) from None
        return out, work

    def all_gather_int_finish(self, started: Any, what: str) -> list[int]:
        """The values of an all-gather begun with :meth:`all_gather_int_start`."""
        out, work = started
        if work is not None:
            self.wait_works([work], what)
        return [int(t.item()) for t in out]

    def make_subgroups(self, stage_sets: Sequence[tuple[int, ...]]) -> None:
        """Create one subgroup per set of stages, in the given order, on every rank.

        Collective over the whole job: every rank must pass the same sets in the same order.
        """
        for stages in stage_sets:
            key = tuple(sorted(stages))
            if key in self._subgroups or len(key) < 2:
                continue
            mine = None
            for ranks in self.replicas:  # one subgroup per replica, on every rank
                g = dist.new_group([ranks[s] for s in key],
                                   timeout=timedelta(seconds=self.timeout), backend=self.backend)
                if ranks == self.ranks:
                    mine = g
            self._subgroups[key] = mine

    def all_reduce_sum(self, tensor: torch.Tensor, stages: tuple[int, ...], what: str) -> None:
        """Sum ``tensor`` in place over the stages ``stages`` (their subgroup)."""
        key = tuple(sorted(stages))
        if len(key) < 2:
            return
        self.check_usable()
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._subgroups[key])
        except RuntimeError as e:
            raise map_comm_error(e, self.board, rank=self.rank, peer=-1, what=what,
                                 timeout=self.timeout) from None

    # -- failure ---------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Report ``error`` (raised on this rank during a step) and tear down, so every other
        rank learns of it (Note [failure propagation]). Idempotent."""
        report = report_for(error, self.rank)
        if self.board is not None:
            self.board.post(origin=report.origin, kind=report.kind, message=report.message)
        if self._broken is None:
            summarize(error, self.rank, self.stage)
        if error.__traceback__ is not None:
            traceback.clear_frames(error.__traceback__)
        self.teardown(f"{type(error).__name__}: {_first_line(error)}")

    def close(self, reason: str = "closed with Pipeline.close()") -> None:
        """Leave the pipeline: post a ``"closed"`` report, so a rank still running a step
        learns that this one left rather than crashed (Note [failure propagation]), and tear
        down. Idempotent."""
        if self._broken is not None:
            return
        if self.board is not None:
            self.board.post(origin=self.rank, kind="closed", message=reason)
        self.teardown(reason)

    def teardown(self, reason: str = "closed") -> None:
        """Destroy the pipeline's process groups, closing connections (Note [failure
        propagation]). The comm is unusable afterwards."""
        if self._broken is not None:
            return
        self._broken = reason
        if self._poster is not None:
            self._poster.stop()
        groups = [g for g in (self._group, *self._subgroups.values(), *self._extra)
                  if g is not None]
        self._group = None
        self._subgroups.clear()
        self._extra.clear()
        self._pending_sends.clear()
        for g in groups:
            if self.backend == "nccl" and hasattr(g, "abort"):
                with contextlib.suppress(RuntimeError):
                    g.abort()
            with contextlib.suppress(RuntimeError, ValueError, AssertionError):
                dist.destroy_process_group(g)
        groups.clear()
        gc.collect()


class _Poster:
    """The thread that posts a comm's gloo sends and receives in order (Note [posting
    thread])."""

    def __init__(self, post: Callable[[list[_Op], str], None]) -> None:
        self._post = post
        self._queue: queue.SimpleQueue[tuple[list[_Op], str] | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._submitted = 0
        self._finished = 0
        #: What posting raised (the thread stops at the first error).
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="modelparallel-post",
                                        daemon=True)
        self._thread.start()

    def submit(self, ops: list[_Op], label: str) -> None:
        if self.error is not None:
            raise self.error
        with self._done:
            self._submitted += 1
        self._queue.put((ops, label))

    def flush(self, check: Callable[[], None]) -> None:
        """Block until every submitted operation is posted (or posting failed)."""
        with self._done:
            while self._finished < self._submitted and self.error is None:
                self._done.wait(0.05)
                check()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._post(*item)
                except BaseException as e:  # raised on the caller's next wait (the Note)
                    self.error = e
                    for _, _, _, recv, _, _ in item[0]:
                        if recv is not None:
                            recv.posted.set()
            with self._done:
                self._finished += 1
                self._done.notify_all()


@contextlib.contextmanager
def _no_treespec_warning() -> Iterator[None]:
    """Unpickling a pytree TreeSpec (boundary and output templates) warns, on every rank and
    every metadata exchange, that ``LeafSpec`` is deprecated (torch 2.13): the warning is about
    torch's own pickled classes, not something the user can change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _close_at_exit(ref: weakref.ref[StageComm]) -> None:
    comm = ref()
    if comm is not None:
        with contextlib.suppress(Exception):
            comm.close("its process ended")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_link_failure(error: BaseException) -> bool:
    """Whether a library error is about the connection to a peer (not a local mistake)."""
    text = str(error).lower()
    return any(w in text for w in ("connection", "closed", "broken pipe", "timed out", "timeout",
                                   "pair", "peer", "socket", "reset"))
