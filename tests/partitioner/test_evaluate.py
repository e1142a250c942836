"""The single evaluation function (modelparallel/partitioner/evaluate.py): sent values held on the
sender (Note [sent values held])."""

from __future__ import annotations

import numpy as np
import pytest
from _partition_cases import sender_graph

from modelparallel.cost_model import estimate_costs
from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
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


def test_the_partitioner_replays_each_stage_alone() -> None:
    """A host-bound stage after a device-bound one: the sums hide its queueing behind the
    first stage's kernels, the evaluation replays it alone (Note [stage replay])."""
    from modelparallel.cost_model import HostReplay
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.partitioner._synthetic import chain_graph
    from modelparallel.plan import PlanConfig

    graph = chain_graph(4)
    order = tuple(n.name for n in graph.nodes if n.name.startswith("fc"))
    # fc0, fc1: 3 ms of kernels, 0.1 ms of queueing; fc2, fc3: the reverse
    host = {"fc0": 1e-4, "fc1": 1e-4, "fc2": 3e-3, "fc3": 3e-3}
    device = {"fc0": 3e-3, "fc1": 3e-3, "fc2": 1e-4, "fc3": 1e-4}
    replay = HostReplay(order, host, device, {n: 0.0 for n in order}, dict(device))
    whole = replay.node_times()
    costs = estimate_costs(graph, "h100", measured=whole, replay=replay)
    summed = estimate_costs(graph, "h100", measured=whole)
    assignment = {"fc0": 0, "fc1": 0, "fc2": 1, "fc3": 1, "output": 1}
    config = PlanConfig(partitions=2)
    plan = evaluate_assignment(graph, config, "h100", assignment, costs=[costs])
    plain = evaluate_assignment(graph, config, "h100", assignment, costs=[summed])
    for s, names in enumerate((["fc0", "fc1"], ["fc2", "fc3"])):
        f, b = replay.stage_times(names)
        assert plan.stages[s].forward_time == pytest.approx(f)
        assert plan.stages[s].backward_time == pytest.approx(b)
        assert plain.stages[s].forward_time == pytest.approx(sum(whole[n][0] for n in names))
    # the second stage's queueing (6 ms) was hidden in the sums (0.2 ms of kernels)
    assert plain.stages[1].forward_time == pytest.approx(2e-4)
    assert plan.stages[1].forward_time == pytest.approx(6.1e-3)
    assert plan.pipeline.step_time > plain.pipeline.step_time


def test_a_stage_replay_counts_the_input_derived_nodes_it_recomputes() -> None:
    """Input-derived nodes are unassigned and recomputed by every stage that reads them
    (Note [inputs on every rank]): the replay of each such stage includes them."""
    from modelparallel.cost_model import HostReplay
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig

    meta = (TensorMeta((4, 8), "float32"),)
    graph = Graph("m", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=meta),
        Node("mask", OpKind.CALL_FUNCTION, "ne", ("x",), outputs=meta),
        Node("fc0", OpKind.CALL_FUNCTION, "linear", ("x",), params=("w0",), outputs=meta),
        Node("fc1", OpKind.CALL_FUNCTION, "linear", ("fc0",), params=("w1",), outputs=meta),
        Node("use", OpKind.CALL_FUNCTION, "mul", ("fc1", "mask"), outputs=meta),
        Node("output", OpKind.OUTPUT, "output", ("use",))),
        params=(Param("w0", (8, 8), "float32"), Param("w1", (8, 8), "float32")))
    order = ("x", "mask", "fc0", "fc1", "use")
    host = {"x": 0.0, "mask": 5e-3, "fc0": 1e-4, "fc1": 1e-4, "use": 1e-4}
    device = {n: 1e-4 for n in order}
    replay = HostReplay(order, host, device, {}, {})
    costs = estimate_costs(graph, "h100", measured=replay.node_times(), replay=replay)
    plan = evaluate_assignment(graph, PlanConfig(partitions=2), "h100",
                               {"fc0": 0, "fc1": 1, "use": 1, "output": 1}, costs=[costs])
    assert plan.stages[0].forward_time == pytest.approx(replay.stage_times(["fc0"])[0])
    assert plan.stages[1].forward_time == pytest.approx(
        replay.stage_times(["mask", "fc1", "use"])[0])
    assert plan.stages[1].forward_time > 5e-3  # the mask's queueing, recomputed there


@pytest.mark.parametrize("communication", ["direct", "relay"])
@pytest.mark.parametrize("seed", range(4))
def test_stage_costs_are_evaluates_own_floats(communication: str, seed: int) -> None:
    # The searches' fast path (cut descents, the DP) computes T_s, M_s and J with the same
    # arithmetic as evaluate: bit for bit, shared parameters and direct sends included.
    from modelparallel.partitioner._synthetic import random_graph
    from modelparallel.partitioner.evaluate import stage_costs

    graph = random_graph(40, seed=seed, edge_prob=0.3, tie_prob=0.4)
    cfg = PlanConfig(partitions=4, memory_weight=0.3, communication=communication)
    prob = build_problem(graph, cfg, ("h100", "a100", "h100", "v100"))
    rng = np.random.default_rng(seed)
    for _ in range(20):
        cuts = np.sort(rng.integers(0, prob.n, prob.p - 1))
        stage = np.searchsorted(cuts, np.arange(prob.n), side="right")
        stage[prob.output] = prob.p - 1
        ev = evaluate(prob, stage)
        time, memory, objective = stage_costs(prob, stage)
        assert np.array_equal(time, ev.time) and np.array_equal(memory, ev.memory)
        assert objective == ev.objective
