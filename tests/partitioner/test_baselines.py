"""The baselines (Note [layers], modelparallel/partitioner/baselines.py): uniform and parameter-
balanced splits over layers."""

from __future__ import annotations

import numpy as np

from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.partitioner.baselines import find_layers, uniform_split
from modelparallel.partitioner.dp import split_to_stages
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


def test_baselines_split_layers() -> None:
    graph = transformer_graph(8, hidden=128, seq=64, vocab=2000)
    prob = build_problem(graph, PlanConfig(partitions=4), "h100")
    layers = find_layers(prob)
    assert [name for name, _ in layers] == [f"transformer.h.{i}" for i in range(8)]
    cuts, _ = uniform_split(prob)
    st = split_to_stages(np.arange(prob.n), cuts, prob.n)
    per_stage = [{name for name, ix in layers if st[ix[0]] == s} for s in range(4)]
    assert [len(x) for x in per_stage] == [2, 2, 2, 2]
    plan = partition(graph, PlanConfig(partitions=4), "h100", method="param_balanced")
    counts = [s.num_parameters for s in plan.stages]
    assert max(counts) < sum(counts) / 2
