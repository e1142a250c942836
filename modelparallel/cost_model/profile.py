"""Profiling mode's names from their earlier home: the measuring moved to
:mod:`modelparallel.cost_model.measure` (torch), the replay arithmetic to
:mod:`modelparallel.cost_model.node_replay` and the node-times file to
:mod:`modelparallel.cost_model.node_times` (Note [measure split] in ``measure/__init__.py``).
Importing this module imports torch; the planning core imports the torch-free modules directly.
"""

from modelparallel.cost_model.measure.backward import (
    _backward_roots,
    _FunctionMapper,
    backward_host_times,
)
from modelparallel.cost_model.measure.clocks import Clock, time_call
from modelparallel.cost_model.measure.forward import (
    call_overhead,
    forward_host_times,
    stamped_module,
)
from modelparallel.cost_model.measure.isolated import profile_node_times, profile_nodes
from modelparallel.cost_model.measure.nodes import graph_users
from modelparallel.cost_model.node_replay import (
    HOST_OUTLIER_CAP,
    BackwardMode,
    ForwardMode,
    NodeProfile,
    host_replay,
    node_times,
    robust_mean,
    stage_replay,
    with_backward_context,
    with_forward_context,
)
from modelparallel.cost_model.node_times import (
    NODE_TIMES_FORMAT,
    NodeTimesFile,
    load_call_overhead,
    load_node_profiles,
    load_node_times,
    save_node_times,
)

__all__ = [
    "HOST_OUTLIER_CAP",
    "NODE_TIMES_FORMAT",
    "BackwardMode",
    "Clock",
    "ForwardMode",
    "NodeProfile",
    "NodeTimesFile",
    "_FunctionMapper",
    "_backward_roots",
    "backward_host_times",
    "call_overhead",
    "forward_host_times",
    "graph_users",
    "host_replay",
    "load_call_overhead",
    "load_node_profiles",
    "load_node_times",
    "node_times",
    "profile_node_times",
    "profile_nodes",
    "robust_mean",
    "save_node_times",
    "stage_replay",
    "stamped_module",
    "time_call",
    "with_backward_context",
    "with_forward_context",
]
