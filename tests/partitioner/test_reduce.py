"""The exact reduction (Note [exact reduction], modelparallel/partitioner/reduce.py): attaching free
nodes never worsens an assignment."""

from __future__ import annotations

import numpy as np
from _partition_cases import valid_assignments

from modelparallel.partitioner._synthetic import random_graph, transformer_graph
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.partitioner.reduce import reduce_free_nodes
from modelparallel.plan import PlanConfig


def test_attaching_free_nodes_never_worsens_an_assignment() -> None:
    """The lemma of Note [exact reduction], on every valid assignment of small graphs."""
    attached = 0
    for seed in range(12):
        graph = random_graph(8, seed=seed, tie_prob=0.3, view_prob=0.5)
        for p, w, schedule in ((3, 0.3, "1f1b"), (2, 0.8, "gpipe")):
            cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule=schedule)
            prob = build_problem(graph, cfg, "h100")
            red = reduce_free_nodes(prob)
            attached += prob.n - len(red.units)
            for stage in valid_assignments(prob):
                moved = red.follow(stage)
                check_assignment(prob, moved)
                for m in red.units.members:
                    assert len(set(moved[m].tolist())) == 1
                assert red.unit_stage(stage).tolist() == [int(moved[m[0]]) for m in
                                                          red.units.members]
                before, after = evaluate(prob, stage), evaluate(prob, moved)
                assert np.all(after.time <= before.time * (1 + 1e-12))
                assert np.all(after.memory <= before.memory * (1 + 1e-12))
                assert after.objective <= before.objective * (1 + 1e-12)
    assert attached >= 10  # the graphs do have free nodes to attach


def test_reduction_attaches_views_of_a_traced_style_graph() -> None:
    graph = transformer_graph(2, hidden=64, seq=32, vocab=500)
    prob = build_problem(graph, PlanConfig(partitions=2), "h100")
    red = reduce_free_nodes(prob)
    group = red.units.members[red.units.unit_of[prob.index["h0_merge"]]].tolist()
    assert group == [prob.index["h0_ctx"], prob.index["h0_merge"]]  # joined its producer
    q = red.units.unit_of[prob.index["h0_q"]]  # qkv has other consumers; q is smaller
    assert red.units.members[q].tolist() == [prob.index["h0_q"]]
    for v in np.nonzero(red.anchor != np.arange(prob.n))[0]:
        assert prob.time[v].max() == 0 and prob.saved[v] == 0
