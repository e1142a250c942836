"""Recording real pipeline steps: :class:`StepRecorder`, an action hook that writes a trace.

``pipeline(..., trace="dir")``, or the environment variable ``MODELPARALLEL_TRACE=dir`` when
``trace`` is not given (for code that builds its pipeline elsewhere, the SMP layer included),
puts a :class:`StepRecorder` on every rank's executor as its ``on_action`` hook (Note [action
hook] in ``hooks.py``). It times every piece of each training step's work, opens a
``torch.profiler.record_function`` range named ``modelparallel::<event>`` around it (so the
actions show up in a user's own ``torch.profiler`` traces), and after the step gathers every
rank's events on rank 0, which rewrites ``dir/trace.json`` with the steps so far, the most
recent :data:`KEEP_STEPS` of them (Note [step trace format] in ``modelparallel/step_trace.py``).
Gathering is one collective per step: tracing costs a little step time, untraced pipelines pay
nothing (the executor tests ``on_action is None``).

Example:
    >>> rec = StepRecorder(None, rank=0, stage=0, ranks=1, schedule="1f1b", microbatches=1)
    >>> from modelparallel.runtime.hooks import StageEvent
    >>> rec(StageEvent("forward", 0, 0), "start"); rec(StageEvent("forward", 0, 0), "end")
    >>> rec.end_step(None).action_order(0, 0)
    ['0F0']
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelparallel.errors import ConfigError
from modelparallel.runtime.hooks import Phase, StageEvent
from modelparallel.schedule import make_schedule, normalize_schedule
from modelparallel.step_trace import StepTrace, TraceEvent

__all__ = ["KEEP_STEPS", "TRACE_ENV", "TRACE_FILE", "StepRecorder", "attach_recorder",
           "trace_directory"]

#: The environment variable naming a trace directory when ``pipeline(trace=...)`` is not given.
TRACE_ENV = "MODELPARALLEL_TRACE"
#: The merged trace's file name in the trace directory.
TRACE_FILE = "trace.json"
#: How many of the most recent steps the trace file keeps.
KEEP_STEPS = 50


def trace_directory(trace: str | os.PathLike[str] | None) -> Path | None:
    """The directory to trace into: ``trace``, else ``$MODELPARALLEL_TRACE``, else ``None``.

    Example:
        >>> trace_directory("out/trace")
        PosixPath('out/trace')
    """
    value = os.fspath(trace) if trace is not None else os.environ.get(TRACE_ENV, "")
    return Path(value) if value else None


class StepRecorder:
    """Records each training step's actions on this rank; rank 0 writes the merged trace.

    Call it as the executor's ``on_action`` hook, then :meth:`end_step` on every rank after
    each step (a collective when ``gather`` is given), or :meth:`discard` after a failed one.

    Args:
        directory: Where rank 0 writes ``trace.json`` (created); ``None``: keep in memory.
        rank: This rank.
        stage: This rank's (first) stage.
        ranks: Ranks of the pipeline.
        virtual_stages: Stages per rank (Note [virtual stages]).
        schedule: The schedule's name.
        microbatches: Microbatches per step.
        metadata: Recorded in the trace's ``otherData`` (model name, plan fingerprint...).
        profile_ranges: Open a ``torch.profiler.record_function`` range per event.
        keep_steps: The file holds the most recent this many steps (a long run keeps a
            trace of bounded size, rewritten in bounded time); ``None``: every step.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, *, rank: int, stage: int,
                 ranks: int, schedule: str, microbatches: int, virtual_stages: int = 1,
                 metadata: Mapping[str, Any] | None = None, profile_ranges: bool = True,
                 keep_steps: int | None = KEEP_STEPS) -> None:
        if ranks < 1 or not 0 <= rank < ranks:
            raise ConfigError(f"rank {rank} is outside 0..{ranks - 1}")
        self.directory = Path(directory) if directory is not None else None
        self.rank, self.stage, self.ranks = rank, stage, ranks
        self.schedule, self.microbatches = schedule, microbatches
        self.metadata = dict(metadata or {})
        self.profile_ranges = profile_ranges
        if keep_steps is not None and keep_steps < 1:
            raise ConfigError(f"keep_steps = {keep_steps} must be >= 1 (or None: every step)")
        self.keep_steps = keep_steps
        # A schedule that splits backwards runs its "backward" events as I actions.
        self._backward_letter = ("I" if any(a.kind == "I" for acts in
                                            make_schedule(schedule, ranks, microbatches,
                                                          virtual_stages).actions
                                            for a in acts) else "")
        self.step = 0
        self._wall0 = time.time()
        self._perf0 = time.perf_counter()
        self._open: list[tuple[StageEvent, float, Any]] = []
        self._pending: list[TraceEvent] = []
        self._merged: list[TraceEvent] = []
        if self.directory is not None and rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: StageEvent, phase: Phase) -> None:
        """The action hook: time ``event`` between its ``"start"`` and its ``"end"``."""
        if phase == "start":
            scope = None
            if self.profile_ranges:
                name = TraceEvent(self.rank, event.stage, event.kind, event.microbatch,
                                  self.step, 0.0, 0.0, self._letter(event.kind)).name
                scope = torch.profiler.record_function(f"modelparallel::{name}")
                scope.__enter__()
            self._open.append((event, time.perf_counter(), scope))
            return
        t1 = time.perf_counter()
        opened, t0, scope = self._open.pop()
        assert opened == event, (opened, event)  # starts and ends nest (Note [action hook])
        if scope is not None:
            scope.__exit__(None, None, None)
        self._pending.append(TraceEvent(
            self.rank, event.stage, event.kind, event.microbatch, self.step,
            self._wall(t0), self._wall(t1), self._letter(event.kind)))

    def _letter(self, kind: str) -> str:
        return self._backward_letter if kind == "backward" else ""

    def _wall(self, perf: float) -> float:
        return self._wall0 + (perf - self._perf0)

    def discard(self) -> None:
        """Forget the events of a step that failed (and close any range left open)."""
        for _, _, scope in reversed(self._open):
            if scope is not None:
                scope.__exit__(None, None, None)
        self._open.clear()
        self._pending.clear()

    def end_step(self, gather: Callable[[Any, str], list[Any]] | None) -> StepTrace:
        """Close the step: gather every rank's events (``gather(obj, what)`` returns every
        rank's ``obj``, e.g. ``StageComm.all_gather_object``; ``None`` for one rank), and on
        rank 0 rewrite ``trace.json``. Returns the trace of every step so far (on rank 0; the
        others get their own events only)."""
        mine = [(e.stage, e.kind, e.microbatch, e.step, e.start, e.end, e.letter)
                for e in self._pending]
        self._pending = []
        parts = gather(mine, "the step trace") if gather is not None else [mine]
        ranks = range(len(parts)) if gather is not None else [self.rank]
        if self.rank == 0 or gather is None:
            for rank, part in zip(ranks, parts):
                self._merged.extend(TraceEvent(rank, *row) for row in part)
        else:
            self._merged.extend(TraceEvent(self.rank, *row) for row in mine)
        if self.keep_steps is not None:
            first = self.step + 1 - self.keep_steps
            self._merged = [e for e in self._merged if e.step >= first]
        self.step += 1
        trace = self.trace()
        if self.rank == 0 and self.directory is not None:
            _write_atomic(self.directory / TRACE_FILE, trace)
        return trace

    def trace(self) -> StepTrace:
        """The steps recorded so far (every rank's on rank 0)."""
        return StepTrace(tuple(self._merged), schedule=self.schedule,
                         microbatches=self.microbatches, ranks=self.ranks,
                         metadata=self.metadata)


def _write_atomic(path: Path, trace: StepTrace) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trace.", suffix=".json")
    os.close(fd)
    try:
        trace.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a trace is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def attach_recorder(executor: Any, directory: str | os.PathLike[str] | None, *,
                    gather: Callable[[Any, str], list[Any]] | None,
                    metadata: Mapping[str, Any] | None = None) -> StepRecorder:
    """Record ``executor``'s steps: a :class:`StepRecorder` becomes its ``on_action`` hook
    (after any hook it had) and its ``after_step`` gathers and writes each training step
    (evaluation steps are not recorded).

    Args:
        executor: A :class:`~modelparallel.runtime.executor.StageExecutor`.
        directory: Where rank 0 writes ``trace.json``.
        gather: Every rank's object, e.g. ``StageComm.all_gather_object``; ``None`` for one
            stage.
        metadata: Recorded in the trace.
    """
    program = executor.program
    # A rank's lane is its place in the pipeline (the order ``gather`` returns), which is its
    # first stage (stage s runs on rank s % p, Note [virtual stages]).
    recorder = StepRecorder(directory, rank=program.index, stage=program.index,
                            ranks=executor.num_ranks, virtual_stages=executor.virtual_stages,
                            schedule=normalize_schedule(executor.schedule_name),
                            microbatches=executor.split.num_microbatches, metadata=metadata)
    previous = executor.on_action
    if previous is None:
        executor.on_action = recorder
    else:
        def both(event: StageEvent, phase: Phase) -> None:
            previous(event, phase)
            recorder(event, phase)

        executor.on_action = both

    def after_step(_result: Any, train: bool) -> None:
        if train:
            recorder.end_step(gather)
        else:  # evaluation steps are not traced
            recorder.discard()

    executor.after_step = after_step
    return recorder
