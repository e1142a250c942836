"""What the HTML report shows, as plain values: timeline blocks, memory rows, module groups.

Everything here reads a :class:`~modelparallel.plan.Plan` alone and imports no charting or
template library, so the content of the report is tested without a browser and the charts only
draw it (``_figures.py``).

Note [module groups]
~~~~~~~~~~~~~~~~~~~~
The graph view collapses the plan's nodes by module path to a depth: a node whose module path
is ``transformer.h.3.attn.c_attn`` belongs, at depth 3, to the group ``transformer.h.3``, and a
node with a shorter path to the group of its whole path (``""``, the top level, included). A group
is also split by stage, so that one group never straddles a boundary: ``transformer.h.3`` on
stage 1 and on stage 2 are two groups when the boundary cuts that block. Input-derived nodes
(stage ``-1``, recomputed by every stage) form groups of their own. :func:`choose_depth` picks
the deepest depth whose group count stays readable (a transformer shows its blocks, not its
ops). An edge joins two groups when a node of one reads a value of the other; its bytes are
those values' bytes, counted once per value, and it is a *boundary edge* when the two groups sit
on different stages.

Example:
    >>> from modelparallel.plan import NodePlacement
    >>> _group_key(NodePlacement("mm", 1, module_path="transformer.h.3.attn.c_attn"), 3)
    ('transformer.h.3', 1)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from modelparallel.plan import NodePlacement, Plan
from modelparallel.schedule import Timeline, make_schedule, simulate

__all__ = [
    "MEMORY_KINDS",
    "REPORT_SCHEDULES",
    "SENT_KIND",
    "GraphEdge",
    "ModuleGroup",
    "TimelineBlock",
    "choose_depth",
    "estimated_blocks",
    "lane_labels",
    "memory_rows",
    "module_graph",
    "other_schedules",
    "simulate_plan",
    "timeline_blocks",
]

#: The schedules a report draws, the plan's own first (Note [schedule names] in
#: ``modelparallel/schedule/__init__.py``).
REPORT_SCHEDULES = ("gpipe", "1f1b", "zb-h1")

#: The parts of a stage's peak memory, in the order the bars stack them, with their labels
#: (the fields of :class:`~modelparallel.plan.MemoryEstimate`).
MEMORY_KINDS: tuple[tuple[str, str], ...] = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations held for the schedule"),
    ("workspace", "workspace (largest op)"),
)

#: The stacked segment drawn above the plan's peak: values the stage sends, held until the
#: receiver has them. The report's estimate (not part of the plan's peak): the bytes the stage
#: sends per microbatch times its microbatches in flight.
SENT_KIND: tuple[str, str] = ("sent", "sent values (report's estimate, beyond the plan's peak)")

#: Above this many groups a depth is too deep to read (Note [module groups]).
MAX_GROUPS = 32


@dataclass(frozen=True)
class TimelineBlock:
    """One action of one microbatch on one rank, in a step's timeline.

    Attributes:
        rank: The rank (lane).
        stage: The stage it runs (the rank itself unless ranks hold virtual stages).
        kind: ``"F"``, ``"B"``, or a split backward's ``"I"``/``"W"``; a measured trace's
            action kinds too (:mod:`modelparallel.step_trace`).
        microbatch: The microbatch.
        start: Seconds from the start of the step.
        end: Seconds from the start of the step.
    """

    rank: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float

    def __post_init__(self) -> None:
        assert self.end >= self.start, (self.start, self.end)


@dataclass(frozen=True)
class ModuleGroup:
    """Nodes of one module path prefix on one stage (Note [module groups]).

    Attributes:
        id: Unique id, ``"<path>@<stage>"``.
        path: The module path prefix (``""`` for the top level).
        stage: The stage, ``-1`` for input-derived nodes.
        nodes: Names of its nodes, in the plan's order.
        forward_time: Sum of its nodes' forward seconds per microbatch.
        backward_time: Sum of their backward seconds.
        param_bytes: Sum of the parameter bytes its nodes read.
        saved_bytes: Sum of the activation bytes saved for backward per microbatch.
    """

    id: str
    path: str
    stage: int
    nodes: tuple[str, ...]
    forward_time: float
    backward_time: float
    param_bytes: int
    saved_bytes: int

    @property
    def label(self) -> str:
        """What the graph shows on the node."""
        name = self.path or "(top level)"
        return f"{name} (inputs)" if self.stage < 0 else name


@dataclass(frozen=True)
class GraphEdge:
    """Values of one group read by another (Note [module groups]).

    Attributes:
        source: The producing group's id.
        target: The consuming group's id.
        values: Names of the nodes whose values it carries.
        bytes: Their bytes per microbatch, each value once.
        boundary: Whether the two groups are on different stages (both >= 0).
    """

    source: str
    target: str
    values: tuple[str, ...]
    bytes: int
    boundary: bool


def other_schedules(name: str) -> tuple[str, ...]:
    """The schedules a report shows beside the plan's own.

    Example:
        >>> other_schedules("1f1b")
        ('gpipe', 'zb-h1')
    """
    return tuple(s for s in REPORT_SCHEDULES if s != name)


def simulate_plan(plan: Plan, schedule: str | None = None) -> Timeline:
    """The estimated timeline of one step of ``plan`` under ``schedule`` (default: its own),
    with its stages' forward and backward times, communication split between the two
    directions (as ``partition-plan inspect`` draws it).

    A plan with virtual stages runs them under its own schedule (interleaved 1F1B); under a
    schedule without virtual stages each rank runs its stages as one (their times summed), so
    the comparison keeps the ranks and the work.
    """
    p, m, v = plan.partitions, plan.config.microbatches, plan.config.virtual_stages
    name = schedule or plan.config.schedule
    fwd = [s.forward_time + s.comm_time / 2 for s in plan.stages]
    bwd = [s.backward_time + s.comm_time / 2 for s in plan.stages]
    if v > 1 and name == plan.config.schedule:
        return simulate(make_schedule(name, p, m, v), fwd, bwd, links=plan.links)
    if v > 1:
        fwd = [sum(fwd[r::p]) for r in range(p)]
        bwd = [sum(bwd[r::p]) for r in range(p)]
        return simulate(make_schedule(name, p, m), fwd, bwd)
    return simulate(make_schedule(name, p, m), fwd, bwd, links=plan.links)


def lane_labels(plan: Plan) -> list[str]:
    """One label per rank: ``"stage 2"``, or with virtual stages ``"rank 2 (stages 2, 6)"``;
    the bottleneck's lane is marked."""
    p, v = plan.partitions, plan.config.virtual_stages
    hot = plan.pipeline.bottleneck_stage
    out = []
    for r in range(p):
        stages = list(range(r, p * v, p))
        label = f"stage {r}" if v == 1 else f"rank {r} (stages {', '.join(map(str, stages))})"
        out.append(label + (" ◀ bottleneck" if hot in stages else ""))
    return out


def estimated_blocks(plan: Plan, schedule: str | None = None) -> tuple[TimelineBlock, ...]:
    """Every block of the estimated timeline: ``partitions × microbatches × 2`` of them (× 3
    for a schedule that splits backwards).

    Example:
        >>> from modelparallel.plan import load_plan  # doctest: +SKIP
        >>> len(estimated_blocks(load_plan("plan.json")))  # doctest: +SKIP
        24
    """
    return timeline_blocks(simulate_plan(plan, schedule))


def timeline_blocks(timeline: Timeline) -> tuple[TimelineBlock, ...]:
    """The blocks of a simulated timeline, rank by rank in execution order."""
    return tuple(TimelineBlock(rank, e.action.stage, e.action.kind, e.action.microbatch,
                               e.start, e.end)
                 for rank, entries in enumerate(timeline.entries) for e in entries)


def memory_rows(plan: Plan) -> list[dict[str, int]]:
    """Per stage, its peak memory by kind (:data:`MEMORY_KINDS`), the values it sends
    (:data:`SENT_KIND`) and ``"capacity"``."""
    rows = []
    for s in plan.stages:
        row = {kind: int(getattr(s.memory, kind)) for kind, _ in MEMORY_KINDS}
        row[SENT_KIND[0]] = int(s.comm_out_bytes * s.inflight_microbatches)
        row["capacity"] = int(s.capacity_bytes)
        rows.append(row)
    return rows


def _prefix(path: str, depth: int) -> str:
    return ".".join(path.split(".")[:depth]) if path else ""


def _group_key(node: NodePlacement, depth: int) -> tuple[str, int]:
    return _prefix(node.module_path, depth), node.stage


def _group_count(nodes: Sequence[NodePlacement], depth: int) -> int:
    return len({_group_key(n, depth) for n in nodes})


def choose_depth(plan: Plan, max_groups: int = MAX_GROUPS) -> int:
    """The deepest module-path depth with at most ``max_groups`` groups (at least 1).

    Example:
        >>> from modelparallel.plan import load_plan  # doctest: +SKIP
        >>> choose_depth(load_plan("gpt2-small.plan.json"))  # doctest: +SKIP
        3
    """
    deepest = max((len(n.module_path.split(".")) for n in plan.nodes if n.module_path),
                  default=1)
    depth = 1
    for d in range(1, deepest + 1):
        if _group_count(plan.nodes, d) > max_groups:
            break
        depth = d
    return depth


def module_graph(plan: Plan, depth: int | None = None
                 ) -> tuple[int, list[ModuleGroup], list[GraphEdge]]:
    """The plan's nodes collapsed by module path (Note [module groups]).

    Args:
        plan: The plan.
        depth: Module-path components kept; default :func:`choose_depth`.

    Returns:
        The depth used, the groups in order of their first node, and the edges between them.
    """
    depth = choose_depth(plan) if depth is None else max(1, depth)
    members: dict[tuple[str, int], list[NodePlacement]] = {}
    of: dict[str, tuple[str, int]] = {}
    for n in plan.nodes:
        key = _group_key(n, depth)
        members.setdefault(key, []).append(n)
        of[n.name] = key
    ids = {key: f"{key[0]}@{key[1]}" for key in members}
    groups = [ModuleGroup(
        id=ids[key], path=key[0], stage=key[1], nodes=tuple(n.name for n in ns),
        forward_time=sum(n.forward_time for n in ns),
        backward_time=sum(n.backward_time for n in ns),
        param_bytes=sum(n.param_bytes for n in ns),
        saved_bytes=sum(n.saved_bytes for n in ns)) for key, ns in members.items()]
    size = {n.name: n.output_bytes for n in plan.nodes}
    carried: dict[tuple[tuple[str, int], tuple[str, int]], list[str]] = defaultdict(list)
    for n in plan.nodes:
        for src in n.inputs:
            if src in of and of[src] != of[n.name] and src not in carried[of[src], of[n.name]]:
                carried[of[src], of[n.name]].append(src)
    edges = [GraphEdge(ids[a], ids[b], tuple(values), sum(size[v] for v in values),
                       a[1] != b[1] and a[1] >= 0 and b[1] >= 0)
             for (a, b), values in carried.items()]
    return depth, groups, edges
