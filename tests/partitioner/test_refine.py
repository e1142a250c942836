"""Op-level refinement around stage boundaries (Note [refinement],
modelparallel/partitioner/refine.py)."""

from __future__ import annotations

import numpy as np

from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.partitioner.coarsen import make_units
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.partitioner.refine import refine_once
from modelparallel.plan import PlanConfig


def test_refinement_moves_cuts_inside_units_and_never_worsens() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    prob = build_problem(graph, PlanConfig(partitions=3, microbatches=6), "h100")
    units = make_units(prob, 3)
    # A poor start: cut only between whole units, unevenly.
    stage = np.minimum(units.unit_of * 3 // len(units), 2)
    stage = np.maximum.accumulate(stage)
    stage[prob.output] = 2
    before = evaluate(prob, stage).objective
    new, res = refine_once(prob, units, stage, window=1, time_limit=5, solver="highs",
                           progress=None)
    assert res.item_stage is not None
    assert np.all(new[prob.edge_src] <= new[prob.edge_dst])
    assert evaluate(prob, new).objective <= before + 1e-12
