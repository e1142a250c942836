"""Measuring on a device (torch): profiling mode and calibration.

Note [measure split]
~~~~~~~~~~~~~~~~~~~~
The cost model's measuring half needs torch and lives here, one module per part:

- :mod:`.clocks`: timing one call (CPU wall clock, CUDA events behind a spin kernel);
- :mod:`.nodes`: which fx nodes are timed and how one is called alone;
- :mod:`.isolated`: each node timed alone (Note [profiling isolated nodes]);
- :mod:`.backward`, :mod:`.forward`: host times in context (Notes [in-context backward host
  time], [in-context forward host time]) and each stage's call overhead;
- :mod:`.calibrate`: a device measured into a :class:`~modelparallel.cost_model.DeviceSpec`.

What needs no torch stays beside the estimates: the replay arithmetic from profiles to node and
stage times in :mod:`modelparallel.cost_model.node_replay` (Notes [host and device time], [host
time statistic]) and the node-times file in :mod:`modelparallel.cost_model.node_times`.
``modelparallel.cost_model.profile`` and ``.calibrate`` re-export the names from their earlier
homes.
"""

from modelparallel.cost_model.measure.backward import backward_host_times
from modelparallel.cost_model.measure.calibrate import calibrate, op_overhead
from modelparallel.cost_model.measure.clocks import Clock, time_call
from modelparallel.cost_model.measure.forward import (
    call_overhead,
    forward_host_times,
    stamped_module,
)
from modelparallel.cost_model.measure.isolated import profile_node_times, profile_nodes
from modelparallel.cost_model.measure.nodes import graph_users

__all__ = [
    "Clock",
    "backward_host_times",
    "calibrate",
    "call_overhead",
    "forward_host_times",
    "graph_users",
    "op_overhead",
    "profile_node_times",
    "profile_nodes",
    "stamped_module",
    "time_call",
]
