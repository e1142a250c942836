"""Human-readable views of plans, for ``partition-plan inspect`` and ``compare``.

Everything here reads a :class:`~modelparallel.plan.Plan` value alone (no model, no graph), so a
plan file can be inspected anywhere.

Example:
    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
    >>> format_seconds(0.0123)
    '12.3 ms'
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from modelparallel.errors import ConfigError
from modelparallel.plan import NodePlacement, Plan
from modelparallel.schedule import Timeline, make_schedule, simulate
from modelparallel.units import format_bytes, format_count, format_seconds

__all__ = [
    "empty_stages_note",
    "explain_node",
    "format_bytes",
    "format_seconds",
    "print_comparison",
    "print_schedule_comparison",
    "print_headline",
    "print_node",
    "print_stage",
    "print_summary",
    "timeline_rows",
]


def _bar(fraction: float, width: int = 20) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = round(fraction * width)
    return "█" * full + "·" * (width - full)


def _header(plan: Plan) -> list[str]:
    m, c, s = plan.model, plan.config, plan.solver
    devices = sorted({d.name for d in plan.devices})
    lines = [
        f"[bold]Plan for {m.name}[/bold]  fingerprint {m.fingerprint[:12]}  {m.num_nodes} nodes  "
        f"{format_count(m.num_parameters)} parameters" + (f"  traced with {m.tracer}"
                                                          if m.tracer else ""),
        f"{c.num_stages} stages on {', '.join(devices)}"
        + (f" ({c.partitions} ranks x {c.virtual_stages} virtual stages)"
           if c.virtual_stages > 1 else "")
        + f"  ·  {c.microbatches} microbatches  ·  {c.schedule}  ·  optimize={c.optimize} (memory_weight {c.memory_weight:g})  ·  "
        f"optimizer {c.optimizer}  ·  granularity {c.granularity}  ·  tied {c.tied}",
    ]
    bound = "n/a" if s.lower_bound is None else f"{s.lower_bound:.4f}"
    gap = "n/a" if s.gap is None else f"{100 * s.gap:.2f}%"
    extra = []
    if s.coarse_nodes:
        extra.append(f"{s.coarse_nodes} coarse units")
    if s.refined:
        extra.append("refined at op level")
    lines.append(
        f"solver: {s.method}" + (f" ({s.solver})" if s.solver else "") +
        f"  status {s.status}  objective {s.objective:.4f}  lower bound {bound}  gap {gap}  "
        f"{s.solve_time:.1f} s" + (f"  ({', '.join(extra)})" if extra else ""))
    return lines


def _stage_table(plan: Plan) -> Table:
    devices = {s.device for s in plan.stages}
    caps = {s.capacity_bytes for s in plan.stages}
    one_device = len(devices) == 1 and len(caps) == 1
    title = "Stages, per microbatch" + (
        f" (each on {plan.stages[0].device}, {format_bytes(plan.stages[0].capacity_bytes)})"
        if one_device else "")
    table = Table(title=title, title_justify="left")
    cols = ["stage", *([] if one_device else ["device"]), "nodes", "params", "peak mem",
            "fwd", "bwd", "comm", "total", "load"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("device", "load") else "right",
                         no_wrap=True)
    tmax = max((s.total_time for s in plan.stages), default=0.0) or 1.0
    for s in plan.stages:
        mark = " ◀" if s.index == plan.pipeline.bottleneck_stage else ""
        mem = f"{format_bytes(s.memory.peak)} {100 * s.memory.peak / s.capacity_bytes:.0f}%"
        row = [str(s.index), *([] if one_device else [s.device]), str(s.num_nodes),
               format_count(s.num_parameters), mem, format_seconds(s.forward_time),
               format_seconds(s.backward_time), format_seconds(s.comm_time),
               format_seconds(s.total_time), _bar(s.total_time / tmax, 10) + mark]
        table.add_row(*row)
    return table


def _boundary_table(plan: Plan) -> Table:
    table = Table(title="Boundaries (per microbatch)", title_justify="left")
    for col in ("boundary", "values", "forward", "backward", "time", "crossing"):
        table.add_column(col, justify="left" if col == "crossing" else "right",
                         no_wrap=col != "crossing")
    for b in plan.boundaries:
        shown = ", ".join(b.values[:4]) + (f", … (+{len(b.values) - 4})"
                                           if len(b.values) > 4 else "")
        table.add_row(f"{b.src}→{b.dst}", str(len(b.values)),
                      format_bytes(b.forward_bytes), format_bytes(b.backward_bytes),
                      format_seconds(b.time), shown)
    return table


def timeline_rows(plan: Plan) -> Timeline:
    """The estimated timeline of one step: the plan's schedule played with its stages' forward
    and backward times (communication split evenly between the two directions), over the
    plan's links (:attr:`Plan.links`)."""
    p, m, v = plan.partitions, plan.config.microbatches, plan.config.virtual_stages
    fwd = [s.forward_time + s.comm_time / 2 for s in plan.stages]
    bwd = [s.backward_time + s.comm_time / 2 for s in plan.stages]
    return simulate(make_schedule(plan.config.schedule, p, m, v), fwd, bwd, links=plan.links)


def _timeline(plan: Plan, width: int = 72) -> list[str]:
    timeline = timeline_rows(plan)
    total = timeline.makespan
    if total <= 0:
        return []
    rows = []
    unit = "rank" if plan.config.virtual_stages > 1 else "stage"
    for stage, entries in enumerate(timeline.entries):
        line = [" "] * width
        for e in entries:
            a = int(e.start / total * width)
            b = max(a + 1, int(e.end / total * width))
            glyph = str(e.action.microbatch % 10)
            colour = "cyan" if e.action.kind == "F" else "magenta"
            for i in range(a, min(b, width)):
                line[i] = f"[{colour}]{glyph}[/{colour}]"
        rows.append(f"  {unit} {stage} │{''.join(line)}│ busy "
                    f"{100 * timeline.busy[stage] / total:.0f}%")
    return rows


def empty_stages_note(plan: Plan) -> str | None:
    """A sentence about the plan's stages that hold no operation, or ``None`` if every stage
    has work (the partitioner found fewer stages faster under the cost model: a model too small
    for its stages, where communication costs more than the compute it would spread).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> plan = NS(num_stages=4, stages=[NS(index=i, num_nodes=n)
        ...                                 for i, n in enumerate([0, 0, 0, 11])])
        >>> empty_stages_note(plan)[:21]
        'stages 0-2 are empty:'
    """
    empty = [s.index for s in plan.stages if s.num_nodes == 0]
    if not empty:
        return None
    used = plan.num_stages - len(empty)
    return (f"stage{'s' if len(empty) > 1 else ''} {_ranges(empty)} "
            f"{'are' if len(empty) > 1 else 'is'} empty: the model is too small for "
            f"{plan.num_stages} stages on this device (under the cost model, sending activations "
            f"between stages costs more than the compute they would take over), so the fastest "
            f"plan uses {used}; use fewer partitions ({used}), or a larger model or batch")


def _ranges(indices: list[int]) -> str:
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def print_summary(plan: Plan, console: Console | None = None) -> None:
    """Print the plan header, the stage and boundary tables, the estimated timeline and the
    bottleneck."""
    console = console or Console()
    for line in _header(plan):
        console.print(line)
    console.print(_stage_table(plan))
    note = empty_stages_note(plan)
    if note is not None:
        console.print(f"[yellow]warning: {note}[/yellow]")
    if plan.boundaries:
        console.print(_boundary_table(plan))
    if plan.shared_params:
        shared = ", ".join(f"{k} on stages {list(v)}" for k, v in plan.shared_params.items())
        console.print(f"replicated tied parameters (gradients summed): {shared}")
    pipe = plan.pipeline
    timeline = _timeline(plan)
    if timeline:
        console.print(f"Estimated timeline of one step ({plan.config.schedule}; "
                      "[cyan]forward[/cyan] / [magenta]backward[/magenta], digits = microbatch):")
        for row in timeline:
            console.print(row)
    console.print(
        f"step {format_seconds(pipe.step_time)}  ·  bubble {100 * pipe.bubble_fraction:.1f}%  ·  "
        f"throughput {pipe.throughput:.1f} samples/s  ·  bottleneck: stage "
        f"{pipe.bottleneck_stage} at {format_seconds(pipe.bottleneck_time)} per microbatch")


def print_headline(plan: Plan, console: Console | None = None) -> None:
    """Print the plan's one-line result (step time, bubble, throughput, bottleneck) and the
    empty-stages warning, without the tables (:func:`print_summary` prints those)."""
    console = console or Console()
    pipe = plan.pipeline
    console.print(
        f"{plan.num_stages} stages, {plan.config.microbatches} microbatches, "
        f"{plan.config.schedule}: step {format_seconds(pipe.step_time)}  ·  bubble "
        f"{100 * pipe.bubble_fraction:.1f}%  ·  throughput {pipe.throughput:.1f} samples/s  ·  "
        f"bottleneck: stage {pipe.bottleneck_stage}")
    note = empty_stages_note(plan)
    if note is not None:
        console.print(f"[yellow]warning: {note}[/yellow]")


def print_stage(plan: Plan, stage: int, console: Console | None = None) -> None:
    """Print every node of ``stage`` with its costs.

    Raises:
        ConfigError: if the stage does not exist.
    """
    console = console or Console()
    if not 0 <= stage < plan.num_stages:
        raise ConfigError(f"stage {stage} is outside 0..{plan.num_stages - 1}")
    nodes = [n for n in plan.nodes if n.stage == stage]
    table = Table(title=f"Stage {stage}: {len(nodes)} nodes", title_justify="left")
    for col in ("node", "op", "module", "fwd", "bwd", "saved", "output", "params"):
        left = col in ("node", "op", "module")
        table.add_column(col, justify="left" if left else "right", no_wrap=True,
                         overflow="ellipsis" if col in ("op", "module") else "fold")
    for n in nodes:
        table.add_row(n.name + (" (pinned)" if n.pinned else ""), _short(n.target),
                      n.module_path, format_seconds(n.forward_time),
                      format_seconds(n.backward_time), format_bytes(n.saved_bytes),
                      format_bytes(n.output_bytes), format_bytes(n.param_bytes))
    console.print(table)
    shared = [k for k, v in plan.shared_params.items() if stage in v]
    if shared:
        console.print(f"tied parameters also held by other stages: {', '.join(shared)}")


def _short(target: str, limit: int = 40) -> str:
    return target if len(target) <= limit else target[: limit - 1] + "…"


def explain_node(plan: Plan, name: str) -> list[str]:
    """Sentences saying where node ``name`` is, what it costs, and what kept it there.

    The order constraint (a node runs no earlier than its producers and no later than its
    consumers) gives the stages it could move to; for each, the sentence estimates what moving
    it alone would do to the two stages' times, the bottleneck and memory.

    Raises:
        ConfigError: if the plan has no such node.
    """
    by_name: Mapping[str, NodePlacement] = {n.name: n for n in plan.nodes}
    if name not in by_name:
        close = [n for n in by_name if name.lower() in n.lower()][:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"the plan has no node named {name!r}{hint}")
    node = by_name[name]
    lines = [f"{node.name}: {node.op} {node.target}" +
             (f" in module {node.module_path!r}" if node.module_path else "")]
    lines.append(f"costs per microbatch: forward {format_seconds(node.forward_time)}, backward "
                 f"{format_seconds(node.backward_time)}, saves {format_bytes(node.saved_bytes)} "
                 f"for backward, outputs {format_bytes(node.output_bytes)}, reads "
                 f"{format_bytes(node.param_bytes)} of parameters")
    if node.stage < 0:
        lines.append("it is computed from the model inputs (and constant buffers) alone, so every "
                     "stage that needs it recomputes it (no communication; Note [inputs on every "
                     "rank])")
        return lines
    lines.append(f"placed on stage {node.stage}" + (" by a pin" if node.pinned else ""))
    producers = [by_name[s] for s in node.inputs if s in by_name and by_name[s].stage >= 0]
    consumers = [n for n in plan.nodes if name in n.inputs and n.stage >= 0]
    lo = max((p.stage for p in producers), default=0)
    hi = min((c.stage for c in consumers), default=plan.num_stages - 1)
    if node.op == "output":
        lo = hi = plan.num_stages - 1
    if producers:
        lines.append("producers: " + ", ".join(f"{p.name} (stage {p.stage})" for p in producers[:6]))
    if consumers:
        lines.append("consumers: " + ", ".join(f"{c.name} (stage {c.stage})" for c in consumers[:6]))
    if node.pinned:
        return lines
    lines.append(f"pipeline order allows stages {lo}..{hi}")
    if lo == hi:
        lines.append("it cannot move alone: a producer and a consumer sit on that same stage")
        return lines
    stage_time = {s.index: s.total_time for s in plan.stages}
    tmax = max(stage_time.values())
    t = node.forward_time + node.backward_time
    for target in range(lo, hi + 1):
        if target == node.stage:
            continue
        new = dict(stage_time)
        new[node.stage] -= t
        new[target] += t
        new_max = max(new.values())
        inflight_here = plan.stages[node.stage].inflight_microbatches
        inflight_there = plan.stages[target].inflight_microbatches
        mem_there = (plan.stages[target].memory.peak + node.saved_bytes * inflight_there +
                     node.param_bytes)
        cap = plan.stages[target].capacity_bytes
        verdict = ("raises" if new_max > tmax + 1e-12 else "keeps" if
                   abs(new_max - tmax) <= 1e-12 else "lowers")
        lines.append(
            f"moving it to stage {target} (compute only; communication changes too) would make "
            f"stage {node.stage} {format_seconds(new[node.stage])} and stage {target} "
            f"{format_seconds(new[target])}: {verdict} the bottleneck "
            f"({format_seconds(tmax)} → {format_seconds(new_max)}); stage {target} memory about "
            f"{format_bytes(mem_there)} of {format_bytes(cap)}" +
            (" — over capacity" if mem_there > cap else "") +
            (f"; it frees {format_bytes(node.saved_bytes * inflight_here)} of activations on "
             f"stage {node.stage}" if node.saved_bytes else ""))
    lines.append("the solver weighs the bottleneck time against memory balance "
                 f"(memory_weight {plan.config.memory_weight:g}) and the bytes of every value "
                 "crossing a boundary; this node's position is what minimised that objective")
    return lines


def print_node(plan: Plan, name: str, console: Console | None = None) -> None:
    """Print :func:`explain_node`."""
    console = console or Console()
    for line in explain_node(plan, name):
        console.print(line, markup=False)


def print_schedule_comparison(plans: Mapping[str, Plan], console: Console | None = None,
                              title: str = "") -> None:
    """One row per schedule (``compare_schedules``): stages, estimated step time and bubble,
    activations held, peak memory."""
    console = console or Console()
    if not plans:
        return
    best = min(p.pipeline.step_time for p in plans.values())
    table = Table(title=title or "Schedules on the same graph (each planned by the DP)",
                  title_justify="left")
    for col in ("schedule", "stages", "step", "÷ best", "bubble", "in flight", "max memory"):
        table.add_column(col, justify="left" if col == "schedule" else "right", no_wrap=True)
    for name, p in plans.items():
        step = p.pipeline.step_time
        table.add_row(name + (" ★" if step <= best * (1 + 1e-12) else ""), str(p.num_stages),
                      format_seconds(step), f"{step / best:.3f}" if best > 0 else "n/a",
                      f"{100 * p.pipeline.bubble_fraction:.1f}%",
                      str(max(s.inflight_microbatches for s in p.stages)),
                      format_bytes(max(s.memory.peak for s in p.stages)))
    console.print(table)


def print_comparison(plans: Mapping[str, Plan], console: Console | None = None,
                     title: str = "") -> None:
    """One row per method: objective, ratio to the ILP's lower bound, bottleneck, memory, time."""
    console = console or Console()
    bounds = [p.solver.lower_bound for p in plans.values() if p.solver.lower_bound is not None]
    bound = max(bounds) if bounds else None
    best = min(p.solver.objective for p in plans.values())
    table = Table(title=title or "Planners on the same graph and cost model",
                  title_justify="left")
    for col in ("method", "status", "objective", "÷ bound", "bottleneck", "step",
                "max memory", "solve"):
        table.add_column(col, justify="left" if col in ("method", "status") else "right",
                         no_wrap=True)
    for name, p in plans.items():
        ratio = "n/a" if not bound else f"{p.solver.objective / bound:.4f}"
        peak = max(s.memory.peak for s in p.stages)
        over = any(s.memory.peak > s.capacity_bytes for s in p.stages)
        table.add_row(
            name + (" ★" if p.solver.objective <= best + 1e-12 else ""), p.solver.status,
            f"{p.solver.objective:.4f}", ratio, format_seconds(p.pipeline.bottleneck_time),
            format_seconds(p.pipeline.step_time),
            format_bytes(peak) + (" (over capacity)" if over else ""),
            f"{p.solver.solve_time:.2f} s")
    console.print(table)
    if bound:
        console.print(f"lower bound on the objective: {bound:.4f} (proven)")

