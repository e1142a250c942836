"""The options a plan is made with, declared once (Note [planning options]): the choices,
:class:`PartitionOptions` and :class:`PlanConfig`. :mod:`modelparallel.plan` re-exports them.

Example:
    >>> PlanConfig(partitions=4, microbatches=8, schedule="interleaved").schedule
    '1f1b'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from modelparallel.errors import ConfigError, PlanFormatError
from modelparallel.schedule import (  # re-exported (moved)
    SCHEDULE_ALIASES,
    check_virtual_stages,
    normalize_schedule,
)

__all__ = [
    "CHECKPOINTING_CHOICES",
    "COMMUNICATION_CHOICES",
    "GRANULARITIES",
    "PRECISIONS",
    "OPTIMIZE_CHOICES",
    "SCHEDULE_ALIASES",
    "SOLVERS",
    "TIED_CHOICES",
    "PartitionOptions",
    "PlanConfig",
    "normalize_schedule",
]

_OPTIMIZE_DEFAULT_WEIGHT = {"speed": 0.2, "memory": 0.8}


#: The values of the planning options that are a choice among names (Note [planning options]).
OPTIMIZE_CHOICES = ("speed", "memory")
GRANULARITIES = ("op", "module", "layer")
TIED_CHOICES = ("replicate", "colocate")
SOLVERS = ("highs", "cbc")
CHECKPOINTING_CHOICES = ("none", "all", "auto")
PRECISIONS = ("fp32", "bf16", "fp16")
COMMUNICATION_CHOICES = ("direct", "relay")
#: The order of :class:`PlanConfig`'s fields in plan files (the pipeline's shape first).
_CONFIG_ORDER = ("partitions", "microbatches", "schedule", "virtual_stages")


# Note [planning options]
# ~~~~~~~~~~~~~~~~~~~~~~~
# The options a plan is made with are declared once, here: :class:`PartitionOptions` holds those
# that do not depend on the pipeline's shape, :class:`PlanConfig` adds the shape (partitions,
# microbatches, schedule). The Python front end's ``PlanningOptions`` (api.py) derives from
# PartitionOptions and adds only what is not part of a plan (device specs, a memory override,
# the method, measured node times); the CLI builds PlanConfig from its flags field by field and
# takes its choices from the tuples above (tests/cli/test_options.py checks that every
# field has a flag). The devices are resolved by one function for all three,
# :func:`modelparallel.cost_model.device.stage_devices`.


@dataclass(frozen=True, kw_only=True)
class PartitionOptions:
    """The planning options that do not depend on the pipeline's shape (Note [planning
    options]).

    Attributes:
        optimize: ``"speed"`` or ``"memory"``; sets the default ``memory_weight`` (0.2 / 0.8).
        memory_weight: Weight in [0, 1] of memory balance against compute balance in the
            objective; ``None`` takes the default of ``optimize``.
        optimizer: Optimizer whose state memory is counted (``"adam"``, ``"sgd"``, ...), or bytes
            per parameter element.
        granularity: ``"op"`` (partition single ops, coarsened internally), ``"module"``
            (the ILP over whole modules up to ``module_depth``) or ``"layer"`` (every op stays
            with the other ops of its innermost module, a Keras layer or a leaf ``nn.Module``:
            Note [layer granularity] in ``modelparallel/partitioner/methods.py``).
        module_depth: Module-path depth of the units for ``granularity="module"``; ``None`` picks
            the depth that gives enough units per stage.
        tied: ``"replicate"``: a parameter read on several stages is copied to each and its
            gradients are summed between them (Note [tied parameters] in
            ``modelparallel/partitioner/problem.py``); ``"colocate"``: its readers share a stage.
        pins: Node name or module path to stage index; pinned nodes go to that stage.
        solver: ``"highs"`` (default) or ``"cbc"``.
        time_limit: Seconds the ILP solver may take in all.
        checkpointing: Activation checkpointing (Note [memory features] in
            ``modelparallel/partitioner/memory_features.py``): ``"none"``; ``"all"`` (every
            region: each transformer block, or each module at ``module_depth``); ``"auto"``
            (the planner checkpoints the fewest regions that make the plan fit, and the plan
            records them); or the module paths to checkpoint.
        offload_activations: Move saved activations to host memory between forward and
            backward.
        precision: ``"fp32"``, ``"bf16"`` (autocast, fp32 master weights) or ``"fp16"``
            (autocast with dynamic loss scaling).
        active_microbatches: Most microbatches in flight per stage (SMP's
            ``active_microbatches``); ``None``: as many as the schedule keeps.
        data_parallel: Replicas of the pipeline the plan is made for (one replica's plan; the
            optimizer state divides by it with ``shard_optimizer_state``).
        shard_optimizer_state: ZeRO-1: each replica keeps ``1 / data_parallel`` of the
            optimizer state.
        communication: How a value read several stages later travels: ``"direct"`` (its
            stage sends it once to each stage that reads it) or ``"relay"`` (through every
            stage in between); Note [direct communication] in ``modelparallel/plan.py``.
    """

    optimize: str = "speed"
    memory_weight: float | None = None
    optimizer: str | float = "adam"
    granularity: str = "op"
    module_depth: int | None = None
    tied: str = "replicate"
    pins: Mapping[str, int] = field(default_factory=dict)
    solver: str = "highs"
    time_limit: float = 10.0
    checkpointing: str | tuple[str, ...] = "none"
    offload_activations: bool = False
    precision: str = "fp32"
    active_microbatches: int | None = None
    data_parallel: int = 1
    shard_optimizer_state: bool = False
    communication: str = "direct"

    def __post_init__(self) -> None:
        if self.optimize not in _OPTIMIZE_DEFAULT_WEIGHT:
            raise ConfigError(f"optimize = {self.optimize!r}; use 'speed' or 'memory'")
        if self.memory_weight is None:
            object.__setattr__(self, "memory_weight", _OPTIMIZE_DEFAULT_WEIGHT[self.optimize])
        elif not 0.0 <= float(self.memory_weight) <= 1.0:
            raise ConfigError(f"memory_weight = {self.memory_weight} must be in [0, 1]")
        object.__setattr__(self, "memory_weight", float(self.memory_weight))  # type: ignore[arg-type]
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity = {self.granularity!r}; use 'op', 'module' or "
                              "'layer'")
        if self.module_depth is not None and self.module_depth < 1:
            raise ConfigError(f"module_depth = {self.module_depth} must be >= 1")
        if self.tied not in TIED_CHOICES:
            raise ConfigError(f"tied = {self.tied!r}; use 'replicate' or 'colocate'")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver = {self.solver!r}; use 'highs' or 'cbc'")
        if self.time_limit <= 0:
            raise ConfigError(f"time_limit = {self.time_limit} must be > 0 seconds")
        if not isinstance(self.optimizer, str) and (
                isinstance(self.optimizer, bool) or not float(self.optimizer) >= 0):
            raise ConfigError(f"optimizer = {self.optimizer!r}: bytes of optimizer state per "
                              "parameter element must be >= 0 (or give a name: sgd, momentum, "
                              "adam, adamw)")
        object.__setattr__(self, "pins", dict(self.pins))
        ck = self.checkpointing
        if not isinstance(ck, str):
            ck = tuple(str(x) for x in ck)
            object.__setattr__(self, "checkpointing", ck)
            if not ck:
                object.__setattr__(self, "checkpointing", "none")
        elif ck not in CHECKPOINTING_CHOICES:
            raise ConfigError(f"checkpointing = {ck!r}; use one of {list(CHECKPOINTING_CHOICES)} "
                              "or a list of module paths")
        if self.communication not in COMMUNICATION_CHOICES:
            raise ConfigError(f"communication = {self.communication!r}; use one of "
                              f"{list(COMMUNICATION_CHOICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision = {self.precision!r}; use one of {list(PRECISIONS)}")
        if self.active_microbatches is not None and (
                isinstance(self.active_microbatches, bool)
                or not isinstance(self.active_microbatches, int) or self.active_microbatches < 1):
            raise ConfigError(f"active_microbatches = {self.active_microbatches!r} must be an "
                              "int >= 1 or None")
        if isinstance(self.data_parallel, bool) or not isinstance(self.data_parallel, int) \
                or self.data_parallel < 1:
            raise ConfigError(f"data_parallel = {self.data_parallel!r} must be an int >= 1")

    def partition_options(self) -> dict[str, Any]:
        """This value's :class:`PartitionOptions` fields, by name (for :meth:`PlanConfig.of`)."""
        return {f.name: getattr(self, f.name) for f in fields(PartitionOptions)}


@dataclass(frozen=True)
class PlanConfig(PartitionOptions):
    """The options a plan is made with: the pipeline's shape and the :class:`PartitionOptions`
    (given by keyword).

    Attributes:
        partitions: Pipeline ranks, one device each (with ``virtual_stages = 1``, the stages).
        microbatches: Microbatches per step; the batch must divide by it.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"zb-h1"`` (SMP's ``"simple"`` / ``"interleaved"``
            accepted, Note [schedule names] in ``modelparallel/schedule/__init__.py``).
        virtual_stages: Stages per rank ``v``: the plan has ``partitions * v`` stages and
            stage ``s`` runs on rank ``s % partitions`` (interleaved 1F1B, Note [virtual
            stages]); only ``"1f1b"`` takes ``v > 1``.

    Example:
        >>> PlanConfig(2, optimize="memory").memory_weight
        0.8
    """

    partitions: int
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise ConfigError(f"partitions = {self.partitions!r} must be an integer >= 1")
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ConfigError(f"microbatches = {self.microbatches!r} must be an integer >= 1")
        check_virtual_stages(self.schedule, self.virtual_stages, ranks=self.partitions)
        object.__setattr__(self, "schedule", normalize_schedule(self.schedule))
        if self.virtual_stages > 1:
            from modelparallel.schedule import make_schedule

            make_schedule(self.schedule, self.partitions, self.microbatches,
                          self.virtual_stages)  # raises for microbatches it cannot run
        super().__post_init__()
        for key, stage in self.pins.items():
            if not isinstance(stage, int) or not 0 <= stage < self.num_stages:
                raise ConfigError(
                    f"pin {key!r} -> {stage!r}: the stage must be an integer in "
                    f"0..{self.num_stages - 1}")

    @property
    def num_stages(self) -> int:
        """Pipeline stages: ``partitions * virtual_stages`` (Note [virtual stages])."""
        return self.partitions * self.virtual_stages

    @classmethod
    def of(cls, options: PartitionOptions, *, partitions: int, microbatches: int = 1,
           schedule: str = "1f1b", virtual_stages: int = 1) -> PlanConfig:
        """The config of a pipeline's shape with ``options``' partition options."""
        return cls(partitions=partitions, microbatches=microbatches, schedule=schedule,
                   virtual_stages=virtual_stages, **options.partition_options())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (the pipeline's shape first)."""
        data = asdict(self)
        return {k: data[k] for k in (*_CONFIG_ORDER, *(k for k in data
                                                      if k not in _CONFIG_ORDER))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanConfig:
        """Read :meth:`to_dict` data; unknown keys are an error."""
        return _from_dict(cls, data, "config")


def _from_dict(cls: Any, data: Mapping[str, Any], what: str) -> Any:
    if not isinstance(data, Mapping):
        raise PlanFormatError(f"plan field {what!r} must be an object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanFormatError(f"plan field {what!r} has unknown keys {unknown}")
    try:
        return cls(**data)
    except TypeError as e:
        raise PlanFormatError(f"plan field {what!r} is incomplete: {e}") from None
