"""The report's measured section: a recorded step drawn under the estimate, with a table of
predicted against measured time per stage and the measured bubble.

Note [measured against predicted]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The report draws one recorded step, the last one (the first steps warm up allocators and
caches), with its times counted from that step's first event on any rank. Per stage it sets the
plan's per-microbatch forward and backward estimates (compute plus half the stage's
communication each, as the estimated timeline plays them) beside the measured means of the
``forward`` and ``backward`` events, and the estimated busy time and idle fraction of the step
(simulating the schedule that ran) beside the measured ones: a stage's measured busy time is the
sum of its events other than waits (forward, backward, posting sends, gradient sync...), its
bubble ``1 - busy / step``, where ``step`` is the recorded step's span over every rank (with
virtual stages the bubble is that of the stage's rank, its stages' busy times together). Waiting to receive counts as idle:
that is what a bubble is on a real pipeline.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from modelparallel.plan import Plan
from modelparallel.report_html._model import REPORT_SCHEDULES, TimelineBlock, simulate_plan
from modelparallel.step_trace import StepTrace
from modelparallel.units import format_seconds

__all__ = ["WAIT_KINDS", "measured_blocks", "measured_section", "stage_rows"]

#: Event kinds that count as waiting, not work (Note [measured against predicted]).
WAIT_KINDS = ("recv_wait",)


def _busy(kind: str) -> bool:
    return kind not in WAIT_KINDS and not kind.endswith("_wait")


def measured_blocks(trace: StepTrace, step: int) -> tuple[TimelineBlock, ...]:
    """The events of ``step`` as timeline blocks, seconds from the step's first event."""
    events = trace.of(step=step)
    t0 = min((e.start for e in events), default=0.0)
    return tuple(TimelineBlock(e.rank, e.stage, e.kind,
                               -1 if e.microbatch is None else e.microbatch,
                               e.start - t0, e.end - t0) for e in events)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def stage_rows(plan: Plan, trace: StepTrace, step: int) -> list[dict[str, Any]]:
    """Per stage, predicted and measured forward, backward, busy time and bubble of ``step``
    (Note [measured against predicted]); ``None`` where the trace has no such event."""
    schedule = trace.schedule if trace.schedule in REPORT_SCHEDULES else None
    sim = simulate_plan(plan, schedule)
    blocks = measured_blocks(trace, step)
    span = max((b.end for b in blocks), default=0.0)
    p = plan.partitions
    predicted_busy = [0.0] * plan.num_stages
    for entries in sim.entries:
        for e in entries:
            predicted_busy[e.action.stage] += e.end - e.start
    rows = []
    for s in plan.stages:
        mine = [b for b in blocks if b.stage == s.index]
        rank = [b for b in blocks if b.rank == s.index % p]
        busy = sum(b.end - b.start for b in mine if _busy(b.kind))
        rank_busy = sum(b.end - b.start for b in rank if _busy(b.kind))
        wait = sum(b.end - b.start for b in mine if b.kind == "recv_wait")
        rows.append({
            "stage": s.index,
            "forward_predicted": s.forward_time + s.comm_time / 2,
            "forward_measured": _mean([b.end - b.start for b in mine if b.kind == "forward"]),
            "backward_predicted": s.backward_time + s.comm_time / 2,
            "backward_measured": _mean([b.end - b.start for b in mine
                                        if b.kind == "backward"]),
            "busy_predicted": predicted_busy[s.index] if s.index < len(predicted_busy) else None,
            "busy_measured": busy if mine else None,
            "wait_measured": wait if mine else None,
            "bubble_predicted": sim.stage_bubbles[s.index % p],
            "bubble_measured": (1.0 - rank_busy / span) if rank and span > 0 else None,
        })
    return rows


def _s(value: float | None) -> str:
    return "–" if value is None else format_seconds(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _ratio(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return "–"
    return f"×{measured / predicted:.2f}"


def measured_section(plan: Plan, trace: StepTrace,
                     figure_html: Callable[[Any, str], str]) -> dict[str, Any]:
    """What the template's measured section shows: the chart, the table and a headline."""
    from modelparallel.report_html._figures import timeline_figure

    steps = trace.steps
    if not steps:
        return {"headline": "the trace holds no steps", "html": "", "blocks": 0,
                "columns": [], "rows": [], "note": ""}
    step = steps[-1]
    blocks = measured_blocks(trace, step)
    ranks = sorted({b.rank for b in blocks})
    stages_of: dict[int, set[int]] = {}
    for b in blocks:
        stages_of.setdefault(b.rank, set()).add(b.stage)
    lanes = [f"rank {r} (stage{'s' if len(stages_of.get(r, ())) > 1 else ''} "
             f"{', '.join(map(str, sorted(stages_of.get(r, ()))))})"
             for r in range(max(ranks) + 1)] if ranks else []
    span = max((b.end for b in blocks), default=0.0)
    busy = sum(b.end - b.start for b in blocks if _busy(b.kind))
    bubble = 1.0 - busy / (len(ranks) * span) if ranks and span > 0 else 0.0
    schedule = trace.schedule if trace.schedule in REPORT_SCHEDULES else plan.config.schedule
    sim = simulate_plan(plan, schedule)
    spans = []
    for st in steps:
        evs = trace.of(step=st)
        spans.append(max(e.end for e in evs) - min(e.start for e in evs))
    title = (f"Measured step {step} ({trace.schedule or 'schedule not recorded'}): "
             f"{format_seconds(span)}, bubble {100 * bubble:.1f}%")
    fig = timeline_figure(blocks, lanes, title, kinds_of=[b.kind for b in blocks])
    rows = [[str(r["stage"]), _s(r["forward_predicted"]), _s(r["forward_measured"]),
             _ratio(r["forward_measured"], r["forward_predicted"]),
             _s(r["backward_predicted"]), _s(r["backward_measured"]),
             _ratio(r["backward_measured"], r["backward_predicted"]),
             _s(r["busy_predicted"]), _s(r["busy_measured"]), _s(r["wait_measured"]),
             _pct(r["bubble_predicted"]), _pct(r["bubble_measured"])]
            for r in stage_rows(plan, trace, step)]
    return {
        "headline": (f"{len(steps)} steps recorded on {len(ranks)} ranks; step {step} drawn: "
                     f"measured {format_seconds(span)} against an estimated "
                     f"{format_seconds(sim.makespan)} ({schedule}); measured bubble "
                     f"{100 * bubble:.1f}% against an estimated "
                     f"{100 * sim.bubble_fraction:.1f}%; median step "
                     f"{format_seconds(statistics.median(spans))}"),
        "html": figure_html(fig, "timeline-measured"), "blocks": len(blocks),
        "columns": ["stage", "forward est.", "forward meas.", "ratio", "backward est.",
                    "backward meas.", "ratio", "busy est.", "busy meas.", "waiting meas.",
                    "rank bubble est.", "rank bubble meas."],
        "rows": rows,
        "note": ("Per microbatch for forward and backward (means over the step), per step for "
                 "busy, waiting and bubble. Measured busy time counts forward, backward, "
                 "posting sends and gradient sync; waiting to receive is idle (Note [measured "
                 "against predicted] in modelparallel/report_html/_measured.py)."),
    }
