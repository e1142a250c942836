"""How one rank's failure reaches every other rank of the pipeline (no hangs).

Note [failure propagation]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Ranks only wait on their neighbours, so a failure travels along the pipeline:

1. A rank whose step raises (any exception once communication has started) posts a report on
   the :class:`FailureBoard`, a few keys in the job's c10d store: who failed, and why. Then it
   tears its pipeline process groups down (``StageComm.teardown``): with gloo this closes its
   TCP connections, so a neighbour blocked on a receive from it fails at once with "Connection
   closed by peer". With NCCL the failing rank aborts its communicators; a neighbour's pending
   NCCL operation then ends at the latest at the process group's timeout (the pipeline's
   ``timeout``), through NCCL's watchdog. (The NCCL path has not been run on several GPUs.)
2. A rank whose wait fails that way reads the board and raises :class:`PeerFailedError` naming
   the rank that failed first (the *origin*), with its message. With no report on the board,
   the peer it waited on exited without reporting (killed, or crashed in native code), and the
   error names that peer. Either way it posts its own report (with the same origin) and tears
   down, so the next rank along learns of it the same way.
3. A rank that is alive but stuck (an endless loop, a deadlock elsewhere) posts nothing and closes
   nothing; its neighbours' waits end after the pipeline's ``timeout`` (the process groups'
   timeout), and they raise :class:`StepTimeoutError` naming the peer and what they waited
   for; then 2. carries it on.

Why not poll: gloo's send/receive works cannot be waited on with a short timeout (a timed-out
wait closes the connection) and do not report completion without a wait, and a blocking wait
cannot be interrupted from another thread. Blocking waits plus closing connections cost nothing
on the fast path, which a polling or helper-thread wait does not (what a helper thread costs per
wait: ``docs/measurements.md``).

After a failure the pipeline is unusable (its process groups are gone); build a new one.

Example:
    >>> import torch.distributed as dist
    >>> board = FailureBoard(dist.HashStore(), "job", rank=1)
    >>> board.first() is None
    True
    >>> board.post(origin=1, kind="error", message="ValueError: bad loss")
    >>> board.first().describe()
    'rank 1 failed: ValueError: bad loss'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from modelparallel.errors import ModelParallelError, PeerFailedError, StepTimeoutError

__all__ = ["FailureBoard", "FailureReport", "map_comm_error", "report_for"]

_READ_WAIT = timedelta(seconds=5)


@dataclass(frozen=True)
class FailureReport:
    """One rank's report of a failure.

    Attributes:
        origin: Global rank that failed first, as far as the reporter knows.
        reporter: Global rank that posted the report.
        kind: ``"error"`` (an exception in a step), ``"exited"`` (a peer vanished without a
            report), ``"timeout"`` (a wait ran out) or ``"peer"`` (passing on another report).
        message: What happened.
    """

    origin: int
    reporter: int
    kind: str
    message: str

    def describe(self) -> str:
        """One line for an error message."""
        if self.kind == "timeout":
            return f"rank {self.reporter} timed out waiting for rank {self.origin}: {self.message}"
        if self.kind == "exited":
            return f"rank {self.origin} exited or was killed ({self.message})"
        return f"rank {self.origin} failed: {self.message}"


class FailureBoard:
    """Failure reports of one pipeline, kept in the c10d store (Note [failure propagation]).

    Args:
        store: The job's store (``torch.distributed`` default store, a ``FileStore``...).
        prefix: A key prefix unique to the pipeline, the same on every rank.
        rank: This process's global rank.
    """

    def __init__(self, store: dist.Store, prefix: str, rank: int) -> None:
        self._store = dist.PrefixStore(f"{prefix}/failures/", store)
        self.rank = rank
        self._posted = False

    def post(self, origin: int, kind: str, message: str) -> None:
        """Add a report (once per rank; later calls are ignored). Best effort: if the store is
        unreachable (its host died) nothing is posted."""
        if self._posted:
            return
        self._posted = True
        report = {"origin": origin, "reporter": self.rank, "kind": kind, "message": message}
        self._write(report)

    def _write(self, report: dict[str, object]) -> None:
        try:
            index = self._store.add("count", 1)
            self._store.set(f"report{index}", json.dumps(report))
        except (RuntimeError, ValueError):
            pass

    def first(self) -> FailureReport | None:
        """The first report posted, or ``None``. Never raises: an unreachable store reads as a
        report that the store's host (rank 0 under ``torch.multiprocessing`` launches) failed."""
        try:
            if self._store.add("count", 0) < 1:
                return None
            self._store.wait(["report1"], _READ_WAIT)
            data = json.loads(self._store.get("report1").decode())
            return FailureReport(int(data["origin"]), int(data["reporter"]), str(data["kind"]),
                                 str(data["message"]))
        except (RuntimeError, ValueError, KeyError) as e:
            return FailureReport(0, self.rank, "exited",
                                 f"the c10d store is unreachable ({_short(str(e))}); the process "
                                 "hosting it (usually rank 0 or the launcher) has probably died")


def map_comm_error(error: BaseException, board: FailureBoard | None, *, rank: int, peer: int,
                   what: str, timeout: float) -> ModelParallelError:
    """The error to raise for a failed wait on ``peer`` (Note [failure propagation]).

    The returned error carries, as its ``report`` attribute, the :class:`FailureReport` this
    rank should post before tearing down.

    Args:
        error: What the communication library raised.
        board: The pipeline's failure board.
        rank: This process's global rank.
        peer: Global rank of the peer the wait was on (-1: unknown).
        what: What was waited for, for the message ("activations of microbatch 2").
        timeout: The pipeline's timeout in seconds.
    """
    first = board.first() if board is not None else None
    text = str(error)
    lowered = text.lower()
    timed_out = ("timed out" in lowered or "timeout" in lowered) and "pair closure" not in lowered
    result: ModelParallelError
    if first is not None and first.reporter != rank:
        result = PeerFailedError(
            f"rank {rank} stopped waiting for {what} from rank {peer}: {first.describe()}. "
            "The pipeline is broken; fix the failing rank and start again.", peer=first.origin)
        report = FailureReport(first.origin, rank, "peer", first.message)
    elif timed_out:
        result = StepTimeoutError(
            f"rank {rank} waited more than {timeout:g} s for {what} from rank {peer}, which sent "
            "nothing and reported no error (stuck, or slower than the timeout allows). Check "
            "that every rank runs the same steps with the same batch shapes, or raise the "
            "pipeline's timeout.")
        report = FailureReport(peer, rank, "timeout", f"no {what} within {timeout:g} s")
    else:
        result = PeerFailedError(
            f"rank {rank} lost rank {peer} while waiting for {what}: rank {peer} exited or was "
            f"killed without reporting an error ({_short(text)}). Check its log.", peer=peer)
        report = FailureReport(peer, rank, "exited", _short(text))
    setattr(result, "report", report)  # noqa: B010 (an attribute our error classes lack)
    return result


def report_for(error: BaseException, rank: int) -> FailureReport:
    """The report to post for ``error`` raised on ``rank``: the one :func:`map_comm_error`
    attached, or this rank's own failure."""
    attached = getattr(error, "report", None)
    if isinstance(attached, FailureReport):
        return attached
    return FailureReport(rank, rank, "error", f"{type(error).__name__}: {_short(str(error), 400)}")


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    if "] " in line and line.startswith("["):
        line = line.split("] ", 1)[1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
