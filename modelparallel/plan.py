"""The partition plan: which stage runs each node, and what the planner expects of it.

A :class:`Plan` is a frozen value, written as versioned JSON (``docs/plan-format.md``). The
partitioner makes one, ``partition-plan inspect`` shows one, codegen and the runtime execute one.
The runtime needs nothing else from the planner: a plan plus the model is enough to train.

Contents:

- :class:`PlanConfig`: the options the plan was made with (partitions, microbatches, schedule,
  optimize, memory_weight, ...), defined in :mod:`modelparallel.plan_config` (Note [planning
  options]) and re-exported here;
- the devices, one :class:`~modelparallel.cost_model.DeviceSpec` per stage;
- :class:`ModelInfo`: the model's name and graph fingerprint, checked when the plan is applied;
- :class:`NodePlacement` for every node: its stage and its costs;
- :class:`StageEstimate` per stage and :class:`BoundaryEstimate` per (sending stage, receiving
  stage) pair that exchanges values;
- :class:`PipelineEstimate`: step time, bubble fraction, throughput;
- :class:`SolverReport`: how the assignment was found and how far from optimal it may be.

Note [direct communication]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``communication="direct"`` (the default) a value produced on stage ``i`` goes straight to
every later stage that reads it: stage ``i`` sends it once to each distinct stage ``j > i``
holding one of its consumers, each such ``j`` receives it once from ``i`` (torch.distributed's
point-to-point operations and NCCL connect any two ranks), and in backward each ``j`` sends
its gradient back to ``i``, which sums them. Stages in between neither receive nor hold it. The
cost model charges the sender one transfer per receiving stage and each receiver one transfer
(Note [pipeline order] in ``modelparallel/partitioner/problem.py``), and the plan lists the
values per pair ``(src, dst)`` (:class:`BoundaryEstimate`); codegen gives every stage its
inputs grouped by the stage they come from and its outputs with the stages they go to (Note
[stage contents] in ``modelparallel/codegen/split.py``), and both runtimes execute exactly
that: the one-process pipeline (Note [local boundaries] in ``modelparallel/runtime/local.py``)
and the distributed executor, one message per pair and microbatch in each direction (Note
[message channels] in ``modelparallel/runtime/channels.py``, which also shows that every
schedule stays deadlock-free). The one case that cannot run direct is NCCL with virtual
stages, whose untagged links cannot keep such messages in order: the front end then relays,
with a ``RelayedSendWarning``.

Note [relay communication]
~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``communication="relay"`` stages talk only to their neighbours, and codegen and both
runtimes execute it so (an option kept beside the default direct sends). A value produced on
stage ``i`` and read on stage ``j > i`` crosses every boundary between them: stages
``i+1 .. j-1`` receive it and pass it on unchanged (it is an explicit input and output of each
of them), and its gradient travels back the same way, summed with the gradients of any uses on
the way. The cost model charges a value once per boundary it crosses, on both the sending and
the receiving stage, forward (its bytes) and backward (its gradient's bytes). Relaying sends
as many or more bytes, holds more memory and adds a hop per stage; measured side by side on CPU
(``benchmarks/direct_sends.py``, ``docs/schedules.md``) it was slower in every row (1.06-1.16x),
so it stays for pipelines that talk to neighbours only (``torch.distributed.pipelining``) and
for plans whose estimates assume it. Plans of format version 1
predate direct sends: they load as relay plans. Under either rule model inputs are not sent:
every rank holds the whole batch (Note [inputs on every rank] in
``modelparallel/partitioner/problem.py``). The model's output node is on the last stage, where
the loss is computed.

Example:
    >>> cfg = PlanConfig(partitions=4, microbatches=8, schedule="interleaved")
    >>> cfg.schedule, cfg.memory_weight
    ('1f1b', 0.2)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from modelparallel._jsonfile import check_envelope, write_text_atomic
from modelparallel.cost_model.device import DeviceSpec
from modelparallel.errors import ConfigError, PlanFormatError, PlanMismatchError
from modelparallel.ir import Graph
from modelparallel.plan_config import (
    GRANULARITIES,
    OPTIMIZE_CHOICES,
    SCHEDULE_ALIASES,
    SOLVERS,
    TIED_CHOICES,
    PartitionOptions,
    PlanConfig,
    _from_dict,
    normalize_schedule,
)

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "SCHEDULE_ALIASES",
    "BoundaryEstimate",
    "MemoryEstimate",
    "ModelInfo",
    "NodePlacement",
    "PipelineEstimate",
    "GRANULARITIES",
    "OPTIMIZE_CHOICES",
    "SOLVERS",
    "TIED_CHOICES",
    "PartitionOptions",
    "Plan",
    "PlanConfig",
    "SolverReport",
    "StageEstimate",
    "load_plan",
    "normalize_schedule",
]

PLAN_FORMAT = "modelparallel.plan"
PLAN_VERSION = 2
#: Plan format versions :meth:`Plan.from_dict` reads (1: relay only, Note [relay communication]).
_READ_VERSIONS = (1, 2)

@dataclass(frozen=True)
class ModelInfo:
    """Which model a plan is for.

    Attributes:
        name: The graph's name.
        fingerprint: :meth:`Graph.fingerprint` of the graph the plan was made from.
        num_nodes: Nodes in that graph.
        num_parameters: Trainable parameter elements (tied ones once).
        tracer: How the graph was made (``"fx"``, ``"export"``, ``"json"``...).
        example_shapes: Shapes of the example inputs per microbatch, for display.
        source: How to rebuild the model: the ``MODEL`` argument the CLI was given
            (``pkg.module:factory``, ``file.py:factory`` or an IR JSON path); empty when
            planned from Python.
        inputs: The CLI's input specifications (``name=8x512:int64``; ``--split-axis x=1``
            and ``--non-split x`` for how the microbatch was cut), to rebuild the example.
    """

    name: str
    fingerprint: str
    num_nodes: int
    num_parameters: int
    tracer: str = ""
    example_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    source: str = ""
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodePlacement:
    """One node's stage and costs.

    Attributes:
        name: Node name.
        stage: Stage index; ``-1`` for input-derived nodes, which every stage that needs them
            recomputes (see :func:`modelparallel.ir.input_derived_nodes`).
        op: Op kind value.
        target: What it calls.
        module_path: Module it ran in.
        forward_time: Seconds per microbatch on its stage's device.
        backward_time: Seconds per microbatch.
        saved_bytes: Activation bytes saved for backward per microbatch.
        output_bytes: Bytes of its value.
        param_bytes: Bytes of the parameters it reads.
        pinned: Whether a pin put it there.
        inputs: Names of the nodes whose values it reads (the graph's edges), so a plan can
            explain placements without its model.
    """

    name: str
    stage: int
    op: str = ""
    target: str = ""
    module_path: str = ""
    forward_time: float = 0.0
    backward_time: float = 0.0
    saved_bytes: int = 0
    output_bytes: int = 0
    param_bytes: int = 0
    pinned: bool = False
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one stage, by kind, in bytes.

    Attributes:
        parameters: Parameters and buffers held by the stage (replicated tied ones included).
        gradients: Their gradients.
        optimizer: Optimizer state.
        activations: Activations saved for backward, times the microbatches in flight.
        workspace: Transient memory of the largest op.
        peak: Sum of the above.
    """

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int

    @property
    def peak(self) -> int:
        """Sum of every kind."""
        return self.parameters + self.gradients + self.optimizer + self.activations + self.workspace


@dataclass(frozen=True)
class StageEstimate:
    """What the planner expects of one stage, per microbatch unless noted.

    Attributes:
        index: Stage index.
        device: Device spec name.
        num_nodes: Nodes assigned (input-derived copies not counted).
        num_parameters: Trainable parameter elements held.
        memory: Peak memory breakdown for the whole step.
        inflight_microbatches: Microbatches whose activations it holds at peak.
        forward_time: Compute seconds of forward.
        backward_time: Compute seconds of backward.
        comm_in_bytes: Bytes received per microbatch (activations in, gradients back in).
        comm_out_bytes: Bytes sent per microbatch (activations out, gradients back out).
        comm_time: Seconds of communication per microbatch.
        capacity_bytes: The device's memory capacity.
    """

    index: int
    device: str
    num_nodes: int
    num_parameters: int
    memory: MemoryEstimate
    inflight_microbatches: int
    forward_time: float
    backward_time: float
    comm_in_bytes: int
    comm_out_bytes: int
    comm_time: float
    capacity_bytes: int

    @property
    def compute_time(self) -> float:
        """Forward plus backward compute seconds."""
        return self.forward_time + self.backward_time

    @property
    def total_time(self) -> float:
        """Compute plus communication seconds: the stage's time per microbatch."""
        return self.compute_time + self.comm_time


@dataclass(frozen=True)
class BoundaryEstimate:
    """The values stage ``src`` sends to stage ``dst`` (Note [direct communication]; with
    relaying, ``dst = src + 1`` and relayed values are included).

    Attributes:
        src: The sending stage.
        dst: The receiving stage, ``> src``.
        values: Names of the nodes whose values it sends there.
        forward_bytes: Activation bytes per microbatch.
        backward_bytes: Gradient bytes per microbatch.
        time: Seconds per microbatch, both directions, on the sending stage's link.
    """

    src: int
    dst: int
    values: tuple[str, ...]
    forward_bytes: int
    backward_bytes: int
    time: float

    def __post_init__(self) -> None:
        if not 0 <= self.src < self.dst:
            raise PlanFormatError(f"a boundary goes from a stage to a later one; got "
                                  f"{self.src} -> {self.dst}")


@dataclass(frozen=True)
class PipelineEstimate:
    """What the planner expects of a whole training step.

    Attributes:
        step_time: Seconds per step: ``sum(stage times) + (m - 1) * bottleneck``.
        bubble_fraction: Idle fraction of the bottleneck stage, ``1 - m * t_max / step_time``.
        throughput: Samples per second, given the batch size per microbatch.
        bottleneck_stage: Index of the slowest stage.
        bottleneck_time: Its compute plus communication seconds per microbatch.
        samples_per_microbatch: Batch size of one microbatch.
    """

    step_time: float
    bubble_fraction: float
    throughput: float
    bottleneck_stage: int
    bottleneck_time: float
    samples_per_microbatch: int = 1


@dataclass(frozen=True)
class SolverReport:
    """How the assignment was found.

    Attributes:
        method: ``"ilp"``, ``"dp"``, ``"uniform"``, ``"param_balanced"`` or ``"manual"``.
        solver: ``"highs"``, ``"cbc"`` or ``""`` for non-ILP methods.
        status: ``"optimal"``, ``"feasible"`` (stopped at the time limit or gap), or the
            solver's status word.
        objective: The objective value of the assignment (recomputed from the estimates).
        lower_bound: A proven lower bound on the objective of any assignment, or ``None``.
        gap: ``(objective - lower_bound) / objective``, or ``None``.
        solve_time: Wall seconds spent.
        coarse_nodes: Units of the coarsened problem solved first (0 if not coarsened).
        refined: Whether an op-level refinement pass ran.
        num_variables: Variables of the largest ILP solved.
        num_constraints: Constraints of the largest ILP solved.
        notes: Free-form remarks (why a fallback ran, what the lower bound is made of).
    """

    method: str
    solver: str = ""
    status: str = "optimal"
    objective: float = 0.0
    lower_bound: float | None = None
    gap: float | None = None
    solve_time: float = 0.0
    coarse_nodes: int = 0
    refined: bool = False
    num_variables: int = 0
    num_constraints: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A partition plan: configuration, placement, estimates and solver report.

    Attributes:
        config: The options it was made with.
        devices: One device spec per stage.
        model: Which model it is for.
        nodes: Every node's placement and costs, in the graph's topological order.
        stages: Per-stage estimates.
        boundaries: Communication per (sending, receiving) stage pair, ordered by pair.
        pipeline: Whole-step estimates.
        solver: The solver report.
        shared_params: Parameters held by several stages (tied and replicated) with the stages
            that hold them; their gradients are summed among those stages.
        version: Plan format version.
        created_by: Which modelparallel version wrote it.
    """

    config: PlanConfig
    devices: tuple[DeviceSpec, ...]
    model: ModelInfo
    nodes: tuple[NodePlacement, ...]
    stages: tuple[StageEstimate, ...]
    boundaries: tuple[BoundaryEstimate, ...]
    pipeline: PipelineEstimate
    solver: SolverReport
    shared_params: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    version: int = PLAN_VERSION
    created_by: str = ""

    def __post_init__(self) -> None:
        p = self.config.num_stages
        if len(self.devices) != p:
            raise PlanFormatError(f"plan has {len(self.devices)} devices for {p} stages")
        if len(self.stages) != p or [s.index for s in self.stages] != list(range(p)):
            raise PlanFormatError(f"plan must have stages 0..{p - 1}, in order")
        pairs = [(b.src, b.dst) for b in self.boundaries]
        if pairs != sorted(set(pairs)) or any(d >= p for _, d in pairs):
            raise PlanFormatError(f"plan boundaries {pairs} must be distinct (src, dst) stage "
                                  f"pairs of stages 0..{p - 1}, in order")
        if self.config.communication == "relay" and any(d != s + 1 for s, d in pairs):
            raise PlanFormatError(f"a relay plan (Note [relay communication]) sends to the next "
                                  f"stage only; its boundaries are {pairs}")
        for n in self.nodes:
            if not -1 <= n.stage < p:
                raise PlanFormatError(
                    f"node {n.name!r} is on stage {n.stage}; stages are 0..{p - 1} (-1: every)")
        object.__setattr__(self, "shared_params",
                           {k: tuple(v) for k, v in dict(self.shared_params).items()})

    # -- views -----------------------------------------------------------------------------------

    @cached_property
    def assignment(self) -> dict[str, int]:
        """Node name to stage, for every node (``-1``: recomputed on every stage that needs it)."""
        return {n.name: n.stage for n in self.nodes}

    @property
    def partitions(self) -> int:
        """Pipeline ranks (the stages, unless ranks hold virtual stages)."""
        return self.config.partitions

    @property
    def num_stages(self) -> int:
        """Stages: ``partitions * virtual_stages`` (Note [virtual stages] in
        ``modelparallel/schedule/__init__.py``)."""
        return self.config.num_stages

    @property
    def links(self) -> tuple[tuple[int, int], ...]:
        """The ``(src, dst)`` stage pairs whose messages the runtime exchanges: the boundaries
        of a direct plan; every neighbour pair of a relay plan, which exchanges a message also
        when it carries no value (Note [message channels] in
        ``modelparallel/runtime/channels.py``)."""
        if self.config.communication == "relay":
            return tuple((s, s + 1) for s in range(self.num_stages - 1))
        return tuple((b.src, b.dst) for b in self.boundaries)

    def stage_nodes(self, stage: int) -> tuple[str, ...]:
        """Names of the nodes assigned to ``stage``, in topological order."""
        return tuple(n.name for n in self.nodes if n.stage == stage)

    def placement(self, name: str) -> NodePlacement:
        """The placement of node ``name``.

        Raises:
            KeyError: if the plan has no such node.
        """
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"the plan has no node named {name!r}")

    # -- checks ----------------------------------------------------------------------------------

    def check_graph(self, graph: Graph) -> None:
        """Check that this plan was made for ``graph``.

        Raises:
            PlanMismatchError: if the fingerprints differ, naming both and what to do.
        """
        fp = graph.fingerprint()
        if fp != self.model.fingerprint:
            raise PlanMismatchError(
                f"the plan was made for model {self.model.name!r} with fingerprint "
                f"{self.model.fingerprint[:12]}, but the model given traces to fingerprint "
                f"{fp[:12]} ({len(graph)} nodes vs {self.model.num_nodes} in the plan). The "
                "model's structure or parameter shapes changed since planning: build a new "
                "plan ('partition-plan build') or pass the model the plan was made for.")

    def check_world_size(self, world_size: int) -> None:
        """Check that ``world_size`` processes can run this plan (one per stage).

        Raises:
            PlanMismatchError: if they differ.
        """
        if world_size % self.partitions != 0:
            raise PlanMismatchError(
                f"the plan has {self.partitions} stages but {world_size} processes were "
                f"started; start a multiple of {self.partitions} processes (e.g. "
                f"'torchrun --nproc_per_node {self.partitions}') or make a plan with "
                f"--partitions {world_size}")

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (see ``docs/plan-format.md``)."""
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "created_by": self.created_by,
            "config": self.config.to_dict(),
            "devices": [d.to_dict() for d in self.devices],
            "model": asdict(self.model),
            "solver": {**asdict(self.solver), "notes": list(self.solver.notes)},
            "pipeline": asdict(self.pipeline),
            "stages": [{**asdict(s), "memory": {**asdict(s.memory), "peak": s.memory.peak}}
                       for s in self.stages],
            "boundaries": [{**asdict(b), "values": list(b.values)} for b in self.boundaries],
            "shared_params": {k: list(v) for k, v in self.shared_params.items()},
            "nodes": [{**asdict(n), "inputs": list(n.inputs)} for n in self.nodes],
        }

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` atomically (a temporary file, then a rename), with the
        permissions of a newly created file (``0o666`` less the user's umask).

        Raises:
            ConfigError: if ``path`` is a directory.
        """
        return write_text_atomic(path, self.to_json(), "plan")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Build a plan from :meth:`to_dict` data, validating the schema.

        Raises:
            PlanFormatError: on a wrong format, unsupported version, or missing/invalid fields.
        """
        check_envelope(data, fmt=PLAN_FORMAT, versions=_READ_VERSIONS, what="plan",
                       error=PlanFormatError, hint="(not a modelparallel plan)",
                       version_hint="Rebuild the plan with 'partition-plan build'.")
        try:
            if int(data["version"]) == 1:
                data = _upgrade_v1(data)
            stages = []
            for s in data["stages"]:
                s = dict(s)
                mem = {k: v for k, v in s.pop("memory").items() if k != "peak"}
                stages.append(StageEstimate(memory=_from_dict(MemoryEstimate, mem, "memory"),
                                            **s))
            solver = dict(data["solver"])
            solver["notes"] = tuple(solver.get("notes", ()))
            return cls(
                config=PlanConfig.from_dict(data["config"]),
                devices=tuple(DeviceSpec.from_dict(d) for d in data["devices"]),
                model=_from_dict(ModelInfo, {**data["model"],
                                             "inputs": tuple(data["model"].get("inputs", ()))},
                                 "model"),
                nodes=tuple(_from_dict(NodePlacement, {**n, "inputs": tuple(n.get("inputs", ()))},
                                       "node") for n in data["nodes"]),
                stages=tuple(stages),
                boundaries=tuple(BoundaryEstimate(**{**b, "values": tuple(b["values"])})
                                 for b in data["boundaries"]),
                pipeline=_from_dict(PipelineEstimate, data["pipeline"], "pipeline"),
                solver=_from_dict(SolverReport, solver, "solver"),
                shared_params={k: tuple(v) for k, v in data.get("shared_params", {}).items()},
                version=PLAN_VERSION,
                created_by=str(data.get("created_by", "")),
            )
        except (PlanFormatError, ConfigError):
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFormatError(f"plan JSON is missing or has an invalid field: "
                                  f"{type(e).__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse plan JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Plan:
        """A copy with some fields changed."""
        return replace(self, **changes)


def _upgrade_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """Version-1 plan data as version 2: relay plans (Note [relay communication]), their
    boundaries ``index -> index + 1``."""
    config = {**data["config"], "communication": "relay"}
    boundaries = []
    for b in data["boundaries"]:
        b = dict(b)
        i = int(b.pop("index"))
        boundaries.append({"src": i, "dst": i + 1, **b})
    return {**data, "config": config, "boundaries": boundaries}


def load_plan(path: str | Path, graph: Graph | None = None) -> Plan:
    """Read a plan file; with ``graph``, also check that the plan was made for it.

    Raises:
        PlanFormatError: if the file is unreadable or not a valid plan.
        PlanMismatchError: if ``graph`` is given and its fingerprint differs.

    Example:
        >>> load_plan("missing.json")
        Traceback (most recent call last):
        ...
        modelparallel.errors.PlanFormatError: cannot read plan file 'missing.json': No such file or directory
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlanFormatError(f"cannot read plan file {str(path)!r}: {e.strerror}") from None
    try:
        plan = Plan.from_json(text)
    except PlanFormatError as e:
        raise PlanFormatError(f"plan file {str(path)!r}: {e}") from None
    if graph is not None:
        plan.check_graph(graph)
    return plan
