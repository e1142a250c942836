"""The single evaluation function (modelparallel/partitioner/evaluate.py): sent values held on the
sender (Note [sent values held])."""

from __future__ import annotations

import numpy as np
import pytest
from _partition_cases import sender_graph

from modelparallel.partitioner import evaluate_assignment
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig


@pytest.mark.parametrize("act,held", [("gelu", True), ("relu", False)])
def test_sent_values_count_on_the_sender_unless_saved_there(act: str, held: bool) -> None:
    prob = build_problem(sender_graph(act), PlanConfig(partitions=3, microbatches=4,
                                                        schedule="1f1b"), "h100")
    b = 32 * 256 * 4
    assert prob.sent[prob.index["act"]] == (b if held else 0)
    assert prob.sent[prob.index["fc2"]] == b
    # act on stage 0 is read by fc2 (stage 1) and fc3 (stage 2): sent from 0, relayed by 1.
    stage = np.array([0, 0, 1, 2, 2])
    ev = evaluate(prob, stage)
    saved = {s: sum(prob.saved[i] for i in range(prob.n) if stage[i] == s) for s in range(3)}
    k = prob.inflight
    assert ev.act_mem[0] == k[0] * (saved[0] + (b if held else 0))
    assert ev.act_mem[1] == k[1] * (saved[1] + b + b)  # act received (and relayed), fc2 sent
    assert ev.act_mem[2] == k[2] * (saved[2] + b + b)  # act and fc2 received
    plan = evaluate_assignment(sender_graph(act), PlanConfig(partitions=3, microbatches=4,
                                                              schedule="1f1b"), "h100",
                               dict(zip(prob.names, stage.tolist())))
    assert plan.stages[0].memory.activations == ev.act_mem[0]
