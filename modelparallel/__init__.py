"""modelparallel: automatic pipeline model parallelism for PyTorch.

Trace a model into a framework-neutral graph (:mod:`modelparallel.ir`), cost every node
(:mod:`modelparallel.cost_model`), assign nodes to pipeline stages with an ILP
(:mod:`modelparallel.partitioner`), and write a :class:`~modelparallel.plan.Plan` that codegen and
the runtime execute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelparallel._version import __version__
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
    UnevenDataError,
    UnsupportedFeatureError,
    UsageError,
)
from modelparallel.ir import Graph
from modelparallel.parallel import ParallelOptions
from modelparallel.plan import Plan, PlanConfig, load_plan
from modelparallel.planning_options import PlanningOptions

if TYPE_CHECKING:
    from modelparallel.api import LoadResult, Pipeline, StepResult, pipeline

# Note [planning core]
# ~~~~~~~~~~~~~~~~~~~~
# ``import modelparallel`` and the planning modules (ir, plan, partitioner, the estimating half of
# cost_model, report, the CLI's planning of IR/plan files) import no deep-learning framework, so a
# plan can be made on a machine without torch. The PyTorch front end (api.py) is loaded on first
# use of one of its names (PEP 562); torch-only parts of cost_model (measure/, calibrate) and
# runtime/ are loaded lazily the same way. tests/test_planning_core.py checks it in a process
# where importing torch or tensorflow fails.
_LAZY = {
    "LoadResult": "modelparallel.pipeline_state",
    "Pipeline": "modelparallel.api",
    "StepResult": "modelparallel.api",
    "pipeline": "modelparallel.api",
}

__all__ = [
    "CommunicationError",
    "ConfigError",
    "Graph",
    "IRFormatError",
    "InfeasiblePlanError",
    "LoadResult",
    "ModelParallelError",
    "ParallelOptions",
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
    "UnevenDataError",
    "UnsupportedFeatureError",
    "UsageError",
    "__version__",
    "load_plan",
    "pipeline",
]


def __getattr__(name: str) -> Any:
    """The front end's names, imported on first use (Note [planning core])."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelparallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
