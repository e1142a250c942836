"""modelparallel: automatic pipeline model parallelism for PyTorch.

Trace a model into a framework-neutral graph (:mod:`modelparallel.ir`), cost every node
(:mod:`modelparallel.cost_model`), assign nodes to pipeline stages with an ILP
(:mod:`modelparallel.partitioner`), and write a :class:`~modelparallel.plan.Plan` that codegen and
the runtime execute.
"""

from modelparallel.api import LoadResult, Pipeline, PlanningOptions, StepResult, pipeline
from modelparallel.errors import (
    CommunicationError,
    ConfigError,
    InfeasiblePlanError,
    IRFormatError,
    ModelParallelError,
    PeerFailedError,
    PlanFormatError,
    PlanMismatchError,
    SolverError,
    StepTimeoutError,
    TracingError,
)
from modelparallel.ir import Graph
from modelparallel.plan import Plan, PlanConfig, load_plan

__version__ = "0.1.0"

__all__ = [
    "CommunicationError",
    "ConfigError",
    "Graph",
    "IRFormatError",
    "InfeasiblePlanError",
    "LoadResult",
    "ModelParallelError",
    "PeerFailedError",
    "Pipeline",
    "Plan",
    "PlanConfig",
    "PlanFormatError",
    "PlanMismatchError",
    "PlanningOptions",
    "SolverError",
    "StepResult",
    "StepTimeoutError",
    "TracingError",
    "__version__",
    "load_plan",
    "pipeline",
]
