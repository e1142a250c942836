"""Assign the nodes of a model's graph to pipeline stages.

:func:`partition` makes a :class:`~modelparallel.plan.Plan` with an ILP (PuLP; HiGHS by default,
CBC as fallback) at op level (Note [ILP pipeline] in :mod:`modelparallel.partitioner.methods`;
over coarse units refined op by op near the stage boundaries for very large graphs), or with one
of the reference methods: the exact contiguous DP (``"dp"``) and the baselines ``"uniform"`` and
``"param_balanced"``. :func:`compare` runs every method on the same graph and cost model, and
:func:`evaluate_assignment` estimates a placement given by hand, and :func:`compare_schedules`
plans the graph for every schedule. Every method is judged by the
same evaluation function and objective (Note [objective] in
:mod:`modelparallel.partitioner.problem`), and every plan carries a proven lower bound.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.plan import PlanConfig
    >>> plans = compare(transformer_graph(4), PlanConfig(partitions=2, time_limit=5), "h100")
    >>> plans["ilp"].solver.objective <= plans["uniform"].solver.objective
    True
"""

from modelparallel.partitioner.bounds import LowerBound, lower_bound
from modelparallel.partitioner.problem import DevicesArg
from modelparallel.partitioner.progress import PHASES, ProgressEvent
from modelparallel.partitioner.schedules import compare_schedules
from modelparallel.partitioner.solve import METHODS, compare, evaluate_assignment, partition

__all__ = [
    "METHODS",
    "PHASES",
    "DevicesArg",
    "LowerBound",
    "ProgressEvent",
    "compare",
    "compare_schedules",
    "evaluate_assignment",
    "lower_bound",
    "partition",
]
