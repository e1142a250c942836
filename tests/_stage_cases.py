"""Shared cases of the codegen and single-process pipeline tests: a traced reference model, plans
cut at fractions of the graph, relative errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelparallel.ir import input_derived_nodes
from modelparallel.partitioner import evaluate_assignment, partition
from modelparallel.plan import Plan, PlanConfig
from modelparallel.tracer import TracedModel, trace

RTOL = 1e-5


class Case:
    """A reference model case, traced once; ``fresh()`` gives an untouched model copy."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.case = make()
        self.reference = copy.deepcopy(self.case.model)
        self.traced = trace(self.case.model, self.case.args, self.case.kwargs)
        self.flat = self.traced.flatten_inputs(self.case.args, self.case.kwargs)

    @property
    def model(self) -> nn.Module:
        return self.case.model

    def reset(self) -> None:
        """Give the traced model the reference's values again and clear every gradient."""
        with torch.no_grad():
            ref = dict(self.reference.named_parameters())
            for name, p in self.model.named_parameters():
                p.copy_(ref[name])
                p.grad = None
        for p in self.reference.parameters():
            p.grad = None


def assignable(graph: Any) -> list[str]:
    derived = input_derived_nodes(graph)
    return [n.name for n in graph.nodes if n.name not in derived]


def cut_assignment(graph: Any, fractions: list[float]) -> dict[str, int]:
    """Contiguous split of the assignable nodes in topological order at the given fractions
    (cuts land on arbitrary ops, usually inside blocks)."""
    names = assignable(graph)
    cuts = [int(f * len(names)) for f in fractions]
    out = {name: sum(i >= c for c in cuts) for i, name in enumerate(names)}
    out[graph.output.name] = len(fractions)
    return out


def make_plan(traced: TracedModel, p: int, how: str | list[float],
              communication: str = "direct") -> Plan:
    config = PlanConfig(partitions=p, microbatches=4, time_limit=2.0,
                        communication=communication)
    if how == "ilp":
        return partition(traced.graph, config, "cpu")
    assert isinstance(how, list) and len(how) == p - 1
    return evaluate_assignment(traced.graph, config, "cpu", cut_assignment(traced.graph, how))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
