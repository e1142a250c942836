"""Measured pipeline steps as Chrome trace / Perfetto JSON: the format, a reader, a writer.

``pipeline(..., trace="dir")`` (or ``MODELPARALLEL_TRACE=dir``) records every action of every
step on every rank (``modelparallel/runtime/trace.py``) and rank 0 writes them merged into
``dir/trace.json``; ``partition-plan report plan.json --trace dir/trace.json`` draws them under
the estimate. This module is the framework-free half: the event values and the file format.

Note [step trace format]
~~~~~~~~~~~~~~~~~~~~~~~~
The file is the JSON object form of the Trace Event Format that ``chrome://tracing``, Perfetto
and ``torch.profiler``'s ``export_chrome_trace`` use: ``{"traceEvents": [...], "displayTimeUnit":
"ms", "otherData": {...}}``. Every recorded piece of work is one complete event (``"ph": "X"``)
with ``ts`` and ``dur`` in microseconds, ``pid`` = the rank (one process lane per rank, named
``"rank R (stage S)"`` by ``process_name`` metadata events) and ``tid`` 0. An event's ``name`` is
the schedule action it runs (``"2F3"``: stage 2, forward, microbatch 3, as
:class:`~modelparallel.schedule.Schedule` prints it) for compute, and the kind and microbatch
otherwise (``"recv_wait 3"``, ``"send 3"``, ``"grad_sync"``); ``cat`` is
``"modelparallel.<kind>"``; ``args`` carries ``kind``, ``stage``, ``microbatch``, ``step`` and,
for a split backward's input half, ``letter`` (``"I"``). ``otherData`` holds ``format``
(``"modelparallel.step_trace"``), ``version``, the schedule, the microbatch count, the ranks and
``origin_unix_s``, the whole second (Unix time) that ``ts`` counts from (so microseconds keep
their precision). Times are each rank's wall clock (``time.time`` at the start of recording plus
``time.perf_counter`` since), so ranks on one host line up to microseconds and ranks on several
hosts only as well as their clocks agree.

Example:
    >>> t = StepTrace((TraceEvent(0, 0, "forward", 0, 0, 1.0, 1.5),
    ...                TraceEvent(0, 0, "backward", 0, 0, 2.0, 3.0)), schedule="1f1b",
    ...               microbatches=1, ranks=1)
    >>> t.action_order(0, 0)
    ['0F0', '0B0']
    >>> StepTrace.from_chrome(t.to_chrome()) == t
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelparallel.errors import ConfigError

__all__ = [
    "ACTION_LETTERS",
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "StepTrace",
    "TraceEvent",
    "load_trace",
]

TRACE_FORMAT = "modelparallel.step_trace"
TRACE_VERSION = 1
#: Compute kinds (Note [action hook] in ``modelparallel/runtime/hooks.py``) and the schedule's
#: letter for each (Note [split backward] in ``modelparallel/schedule/__init__.py``); the
#: ``"backward"`` of a schedule that splits backwards is its ``I`` (:attr:`TraceEvent.letter`).
ACTION_LETTERS: Mapping[str, str] = {"forward": "F", "backward": "B", "weight_backward": "W"}


@dataclass(frozen=True)
class TraceEvent:
    """One piece of one step's work on one rank, with its wall-clock start and end.

    Attributes:
        rank: The rank that did it.
        stage: The stage it belongs to.
        kind: ``"recv_wait"``, ``"forward"``, ``"backward"``, ``"send"``, ``"grad_sync"`` (Note
            [action hook]) or another kind a hook reports.
        microbatch: Its microbatch, ``None`` for ``"grad_sync"``.
        step: The step it belongs to, counted from 0 on the pipeline.
        start: Seconds (wall clock, Note [step trace format]).
        end: Seconds, ``>= start``.
        letter: The schedule's letter of the action it computes when it is not
            :data:`ACTION_LETTERS`' (``"I"`` for the backward of a split schedule); ``""``:
            that default.
    """

    rank: int
    stage: int
    kind: str
    microbatch: int | None
    step: int
    start: float
    end: float
    letter: str = ""

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ConfigError(f"trace event {self.kind} ends ({self.end}) before it starts "
                              f"({self.start})")

    @property
    def action(self) -> str | None:
        """The schedule action it computes (``"2F3"``), ``None`` for other work."""
        letter = self.letter or ACTION_LETTERS.get(self.kind)
        if letter is None or self.microbatch is None:
            return None
        return f"{self.stage}{letter}{self.microbatch}"

    @property
    def name(self) -> str:
        """The event's name in the Chrome trace."""
        if self.action is not None:
            return self.action
        return self.kind if self.microbatch is None else f"{self.kind} {self.microbatch}"


@dataclass(frozen=True)
class StepTrace:
    """Recorded steps of a pipeline, every rank's events (Note [step trace format]).

    Attributes:
        events: The events, in any order.
        schedule: The schedule's name.
        microbatches: Microbatches per step.
        ranks: Ranks of the pipeline.
        metadata: Anything else recorded (the model's name, the plan's fingerprint...).
    """

    events: tuple[TraceEvent, ...]
    schedule: str = ""
    microbatches: int = 0
    ranks: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps it holds, in order."""
        return tuple(sorted({e.step for e in self.events}))

    def of(self, rank: int | None = None, step: int | None = None) -> list[TraceEvent]:
        """Events of ``rank`` and ``step`` (each: all when ``None``), by start time."""
        return sorted((e for e in self.events if (rank is None or e.rank == rank)
                       and (step is None or e.step == step)), key=lambda e: (e.start, e.end))

    def action_order(self, rank: int, step: int) -> list[str]:
        """The schedule actions ``rank`` computed in ``step``, in the order it ran them: the
        line of the rank in the schedule's printed form."""
        return [a for e in self.of(rank, step) if (a := e.action) is not None]

    def to_chrome(self) -> dict[str, Any]:
        """The Chrome trace JSON object (Note [step trace format])."""
        meta: list[dict[str, Any]] = []
        stages: dict[int, set[int]] = {}
        for e in self.events:
            stages.setdefault(e.rank, set()).add(e.stage)
        for rank in sorted(stages):
            held = sorted(stages[rank])
            name = (f"rank {rank} (stage{'s' if len(held) > 1 else ''} "
                    f"{', '.join(map(str, held))})")
            meta.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                         "args": {"name": name}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                         "args": {"sort_index": rank}})
            meta.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0,
                         "args": {"name": "pipeline"}})
        origin = math.floor(min((e.start for e in self.events), default=0.0))
        events = [{
            "name": e.name, "cat": f"modelparallel.{e.kind}", "ph": "X",
            "ts": round((e.start - origin) * 1e6, 3), "dur": round((e.end - e.start) * 1e6, 3),
            "pid": e.rank, "tid": 0,
            "args": {"kind": e.kind, "stage": e.stage, "microbatch": e.microbatch,
                     "step": e.step, **({"letter": e.letter} if e.letter else {})},
        } for e in sorted(self.events, key=lambda e: (e.rank, e.start, e.end))]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms",
                "otherData": {"format": TRACE_FORMAT, "version": TRACE_VERSION,
                              "schedule": self.schedule, "microbatches": self.microbatches,
                              "ranks": self.ranks, "origin_unix_s": origin,
                              **dict(self.metadata)}}

    @classmethod
    def from_chrome(cls, data: Mapping[str, Any]) -> StepTrace:
        """Read :meth:`to_chrome`'s object; events of other tools (a ``torch.profiler``
        trace merged in) are skipped.

        Raises:
            ConfigError: if it is not a trace of this format.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("traceEvents"), list):
            raise ConfigError("not a Chrome trace: expected a JSON object with a "
                              "'traceEvents' list")
        other = dict(data.get("otherData") or {})
        if other.get("format") != TRACE_FORMAT:
            raise ConfigError(f"not a modelparallel step trace (otherData.format is "
                              f"{other.get('format')!r}, expected {TRACE_FORMAT!r}); record one "
                              "with pipeline(..., trace='DIR') or MODELPARALLEL_TRACE=DIR")
        if int(other.get("version", 0)) > TRACE_VERSION:
            raise ConfigError(f"step trace version {other.get('version')} is newer than this "
                              f"modelparallel reads ({TRACE_VERSION}); upgrade modelparallel")
        origin = float(other.get("origin_unix_s", 0.0))
        events = []
        for ev in data["traceEvents"]:
            if ev.get("ph") != "X" or not str(ev.get("cat", "")).startswith("modelparallel."):
                continue
            args = ev.get("args", {})
            start = origin + float(ev["ts"]) / 1e6
            events.append(TraceEvent(
                rank=int(ev["pid"]), stage=int(args["stage"]), kind=str(args["kind"]),
                microbatch=None if args.get("microbatch") is None else int(args["microbatch"]),
                step=int(args["step"]), start=start, end=start + float(ev["dur"]) / 1e6,
                letter=str(args.get("letter", ""))))
        known = ("format", "version", "schedule", "microbatches", "ranks", "origin_unix_s")
        return cls(tuple(sorted(events, key=lambda e: (e.rank, e.start, e.end))),
                   schedule=str(other.get("schedule", "")),
                   microbatches=int(other.get("microbatches", 0)),
                   ranks=int(other.get("ranks", 0)),
                   metadata={k: v for k, v in other.items() if k not in known})

    def save(self, path: str | Path) -> Path:
        """Write the Chrome trace JSON to ``path``; return it."""
        out = Path(path)
        out.write_text(json.dumps(self.to_chrome(), separators=(",", ":")), encoding="utf-8")
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepTrace):
            return NotImplemented
        key = lambda e: (e.rank, e.start, e.end, e.kind)  # noqa: E731
        return (sorted(self.events, key=key) == sorted(other.events, key=key)
                and (self.schedule, self.microbatches, self.ranks, dict(self.metadata))
                == (other.schedule, other.microbatches, other.ranks, dict(other.metadata)))

    __hash__ = None  # type: ignore[assignment]


def load_trace(path: str | Path) -> StepTrace:
    """Read a step trace file (Note [step trace format]).

    Raises:
        ConfigError: if the file is missing or not a step trace.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trace file {str(p)!r} does not exist; pipeline(..., trace='DIR') "
                          "writes DIR/trace.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"trace file {str(p)!r} is not JSON: {e}") from None
    return StepTrace.from_chrome(data)
