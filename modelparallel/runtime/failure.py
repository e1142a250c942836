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
   the rank that failed first (the *origin*), with its message. With no report on the board
   yet it waits a moment for one (the failing rank posts before it closes anything, and the
   neighbours of a killed rank post on its behalf as soon as they notice). With still none, a
   point-to-point wait names the peer it waited on, which exited without reporting (killed,
   or crashed in native code); a collective (the loss/output broadcast, a gather) names no
   rank, since the broken connection does not say which rank of the collective went away; in
   particular it never blames the broadcast's root for another rank's failure. Either way it
   posts its own report (with the same origin) and tears down, so the next rank along learns
   of it the same way. A pipeline closed with ``Pipeline.close()`` (or whose rank's process
   ends normally) posts a ``"closed"`` report, so a rank still stepping is told that a rank
   left early (a step fewer) instead of that it crashed.
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
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from modelparallel.errors import ModelParallelError, PeerFailedError, StepTimeoutError

__all__ = ["FailureBoard", "FailureReport", "map_comm_error", "report_for", "summarize"]

_READ_WAIT = timedelta(seconds=5)


@dataclass(frozen=True)
class FailureReport:
    """One rank's report of a failure.

    Attributes:
        origin: Global rank that failed first, as far as the reporter knows.
        reporter: Global rank that posted the report.
        kind: ``"error"`` (an exception in a step), ``"exited"`` (a peer vanished without a
            report), ``"timeout"`` (a wait ran out), ``"closed"`` (the rank closed its
            pipeline, or its process ended, while others still ran steps) or ``"peer"``
            (passing on another report).
        message: What happened.
    """

    origin: int
    reporter: int
    kind: str
    message: str

    def describe(self) -> str:
        """One line for an error message."""
        who = f"rank {self.origin}" if self.origin >= 0 else "a rank of the pipeline"
        if self.kind == "timeout":
            return f"rank {self.reporter} timed out waiting for {who}: {self.message}"
        if self.kind == "exited":
            return f"{who} exited or was killed ({self.message})"
        if self.kind == "closed":
            return (f"{who} left the pipeline ({self.message}) while this rank still ran a "
                    "step: every rank must run the same steps (a rank ran a step fewer?)")
        return f"{who} failed: {self.message}"


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

    def first(self, wait: float = 0.0) -> FailureReport | None:
        """The first report posted, or ``None`` (after waiting up to ``wait`` seconds for one).
        Never raises: an unreachable store reads as a report that the store's host (rank 0
        under ``torch.multiprocessing`` launches) failed."""
        deadline = time.monotonic() + wait
        while True:
            found = self._first()
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def _first(self) -> FailureReport | None:
        try:
            count = self._store.add("count", 0)
            if count < 1:
                return None
            self._store.wait(["report1"], _READ_WAIT)
            reports = []
            for i in range(1, min(count, 16) + 1):
                if i > 1 and not self._store.check([f"report{i}"]):
                    continue
                data = json.loads(self._store.get(f"report{i}").decode())
                reports.append(FailureReport(int(data["origin"]), int(data["reporter"]),
                                             str(data["kind"]), str(data["message"])))
        except (RuntimeError, ValueError, KeyError) as e:
            return FailureReport(0, self.rank, "exited",
                                 f"the c10d store is unreachable ({_short(str(e))}); the process "
                                 "hosting it (usually rank 0 or the launcher) has probably died")
        # The earliest report that names a rank: a collective's report names none
        return next((r for r in reports if r.origin >= 0), reports[0])


#: Seconds a failed wait waits for a report on the board before blaming without one (Note
#: [failure propagation]): short for a neighbour, longer for a collective, which names no rank.
_GRACE_P2P = 1.0
_GRACE_COLLECTIVE = 5.0


def map_comm_error(error: BaseException, board: FailureBoard | None, *, rank: int, peer: int,
                   what: str, timeout: float) -> ModelParallelError:
    """The error to raise for a failed wait on ``peer`` (Note [failure propagation]).

    The returned error carries, as its ``report`` attribute, the :class:`FailureReport` this
    rank should post before tearing down.

    Args:
        error: What the communication library raised.
        board: The pipeline's failure board.
        rank: This process's global rank.
        peer: Global rank of the peer the wait was on; -1 for a collective (no single peer:
            the error then names the failing rank only from the board).
        what: What was waited for, for the message ("the activations of microbatch 2").
        timeout: The pipeline's timeout in seconds.
    """
    text = str(error)
    lowered = text.lower()
    timed_out = ("timed out" in lowered or "timeout" in lowered) and "pair closure" not in lowered
    collective = peer < 0 or peer == rank
    grace = 0.0 if timed_out else min(timeout, _GRACE_COLLECTIVE if collective else _GRACE_P2P)
    first = board.first(wait=grace) if board is not None else None
    source = "" if collective else f" from rank {peer}"
    result: ModelParallelError
    if first is not None and first.reporter != rank:
        result = PeerFailedError(
            f"rank {rank} stopped waiting for {what}{source}: {first.describe()}. "
            "The pipeline is broken; fix the failing rank and start again.",
            peer=first.origin if first.origin >= 0 else None)
        report = FailureReport(first.origin, rank, "peer", first.message)
    elif timed_out:
        late = ("a rank of the pipeline did not take part (stuck, or slower than the timeout "
                "allows)" if collective else
                f"rank {peer} sent nothing and reported no error (stuck, or slower than the "
                "timeout allows)")
        result = StepTimeoutError(
            f"rank {rank} waited more than {timeout:g} s for {what}{source}: {late}. Check "
            "that every rank runs the same steps with the same batch shapes, or raise the "
            "pipeline's timeout.")
        report = FailureReport(-1 if collective else peer, rank, "timeout",
                               f"nothing received for {what} within {timeout:g} s")
    elif collective:
        result = PeerFailedError(
            f"rank {rank} lost a rank of the pipeline while waiting for {what}: it exited or "
            f"was killed without reporting an error ({_short(text)}). Check the other ranks' "
            "logs (torchrun's summary names the first rank that failed).", peer=None)
        report = FailureReport(-1, rank, "exited", _short(text))
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


def summarize(error: BaseException, rank: int, stage: int) -> None:
    """Write one line about a failure to stderr, before the error is re-raised (Note
    [failure summary]): a launcher that kills the other ranks at once (torchrun) may stop this
    process before its traceback is printed, and the line names the rank that failed first.

    Note [failure summary]
    ~~~~~~~~~~~~~~~~~~~~~~
    Under torchrun the agent kills every other rank within milliseconds of the first one
    exiting with an error, so the survivors' own messages are often never printed, and
    torchrun's closing "Root Cause (first observed failure)" names the first rank *to exit*,
    which may be a rank that merely lost its neighbour. So every rank writes one flushed line,
    ``modelparallel: rank R (stage S): ...``, to stderr as it fails, before re-raising: the
    failing rank's line (``failed: <its exception>``) comes first in the job's output, the
    others say whom they blame. ``docs/troubleshooting.md`` shows how to read the two together.
    """
    import sys

    own = not isinstance(getattr(error, "report", None), FailureReport)
    line = (f"{'failed' if own else 'stopped'}: {type(error).__name__}: "
            f"{_short(str(error), 600)}")
    try:
        sys.stderr.write(f"modelparallel: rank {rank} (stage {stage}): {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _short(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    if "] " in line and line.startswith("["):
        line = line.split("] ", 1)[1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
