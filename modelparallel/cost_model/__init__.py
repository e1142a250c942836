"""Cost model: how long each node takes and how much memory and communication it needs.

Reads only the IR and imports no deep-learning framework (Note [planning core]); measuring on a
device is the torch subpackage :mod:`modelparallel.cost_model.measure` (Note [measure split]). See :mod:`modelparallel.cost_model.device` for device specs and
:mod:`modelparallel.cost_model.costs` for the per-node estimates (Note [roofline]).
"""

from modelparallel.cost_model.costs import (
    OPTIMIZER_STATES,
    GraphCosts,
    NodeCost,
    estimate_costs,
    inflight_microbatches,
    is_view_like,
    param_state_bytes,
)
from modelparallel.cost_model.device import (
    BUILTIN_DEVICES,
    DeviceSpec,
    get_device_spec,
    load_device_spec,
    parse_bytes,
)
from modelparallel.cost_model.node_replay import NodeProfile, host_replay
from modelparallel.cost_model.node_times import NodeTimesFile
from modelparallel.cost_model.replay import CallOverhead, HostReplay, device_timeline

__all__ = [
    "BUILTIN_DEVICES",
    "OPTIMIZER_STATES",
    "CallOverhead",
    "DeviceSpec",
    "GraphCosts",
    "HostReplay",
    "NodeCost",
    "NodeProfile",
    "NodeTimesFile",
    "estimate_costs",
    "device_timeline",
    "get_device_spec",
    "host_replay",
    "inflight_microbatches",
    "is_view_like",
    "load_device_spec",
    "param_state_bytes",
    "parse_bytes",
]
