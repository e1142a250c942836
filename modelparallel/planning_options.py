"""How :func:`modelparallel.pipeline` plans when it is given no plan: :class:`PlanningOptions`.

The options a plan records are :class:`~modelparallel.plan.PartitionOptions` (Note [planning
options] in ``modelparallel/plan_config.py``); these add what is not part of a plan (the device
specs, a memory override, the method, measured node times). Framework-free, like the planner.

Example:
    >>> PlanningOptions(optimize="memory", device_spec="h100", memory="40GiB").method
    'ilp'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelparallel.cost_model.device import DeviceSpec
from modelparallel.errors import ConfigError
from modelparallel.plan import PartitionOptions
from modelparallel.units import parse_bytes

__all__ = ["METHODS", "PlanningOptions"]

#: The partitioning methods :class:`PlanningOptions` accepts.
METHODS = ("ilp", "dp", "uniform", "param_balanced")


@dataclass(frozen=True)
class PlanningOptions(PartitionOptions):
    """How to plan when no plan is given: the :class:`~modelparallel.plan.PartitionOptions`
    (``optimize``, ``memory_weight``, ``optimizer``, ``granularity``, ``module_depth``,
    ``tied``, ``pins``, ``solver``, ``time_limit``, given by keyword) and what is not part of a
    plan (Note [planning options] in ``modelparallel/plan_config.py``).

    Attributes:
        device_spec: Device spec(s) for the cost model: a built-in name (``"cpu"``, ``"h100"``...),
            a spec JSON path, a :class:`DeviceSpec`, or one per stage. ``None``: ``"cpu"`` for a
            CPU pipeline, ``"h100"`` for CUDA.
        memory: Memory per device (bytes or ``"80GiB"``), overriding the spec's.
        method: Partitioning method (``"ilp"``, ``"dp"``, ``"uniform"``, ``"param_balanced"``).
        node_times: A node-times file (``partition-plan calibrate --model ... --ops-out``)
            whose measured times replace the roofline, as ``partition-plan build --measured``;
            it must have been measured on this model's graph, on microbatches of the same
            shapes.
    """

    device_spec: str | DeviceSpec | Sequence[str | DeviceSpec] | None = None
    memory: int | str | None = None
    method: str = "ilp"
    node_times: str | Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method = {self.method!r}; use one of {list(METHODS)}")
        if self.memory is not None:
            parse_bytes(self.memory)
