"""Codegen: one ``torch.fx.GraphModule`` per pipeline stage from a traced model and a plan.

- :func:`build_stage` / :func:`build_stages`: the stage programs (Note [stage calling
  convention] in ``program.py``, Note [stage contents] in ``split.py``, Note [stage parameters]
  in ``build.py``);
- :func:`materialize`: real parameters for one stage of a meta-device model (Note [materialize]);
- :func:`stage_source`: a stage's readable Python source.

Example:
    >>> import torch
    >>> from modelparallel.partitioner import partition
    >>> from modelparallel.plan import PlanConfig
    >>> from modelparallel.tracer import trace
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> traced = trace(model, (torch.randn(3, 4),))
    >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
    >>> first, last = build_stages(traced, plan)
    >>> [v.name for v in first.send] == [v.name for v in last.recv]
    True
"""

from modelparallel.codegen.build import build_stage, build_stages
from modelparallel.codegen.materialize import held_tensors, materialize, replace_tensors
from modelparallel.codegen.program import (
    BoundaryValue,
    StageOutputs,
    StageProgram,
    add_step_grads,
    check_loss,
)
from modelparallel.codegen.source import program_source, stage_source
from modelparallel.codegen.split import StageSplit, split_stages

__all__ = [
    "BoundaryValue",
    "StageOutputs",
    "StageProgram",
    "StageSplit",
    "add_step_grads",
    "build_stage",
    "build_stages",
    "check_loss",
    "held_tensors",
    "materialize",
    "program_source",
    "replace_tensors",
    "split_stages",
    "stage_source",
]
