"""Graph analyses (modelparallel/ir/analysis.py): input-derived nodes, module groups whose
quotient stays acyclic, and one walk deciding what a stage recomputes (Note [recomputed nodes]):
the cost model's stage replay and codegen both call :func:`modelparallel.ir.recomputed_nodes`."""

from __future__ import annotations

from typing import Any

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modelparallel.ir import (
    CONSTANT_BUFFER_BYTES,
    Graph,
    Node,
    OpKind,
    Param,
    TensorMeta,
    input_derived_nodes,
    module_groups,
    recomputed_nodes,
)


class _Masked(nn.Module):
    """Two linears whose outputs are gated by masks computed from the input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x > 0).float()
        scale = mask.sum(-1, keepdim=True) + 1.0
        h = self.fc0(x) * mask
        h = self.fc1(h) / scale
        return self.fc2(h) * mask


def test_recomputed_nodes_walks_through_input_derived_nodes_only() -> None:
    meta = (TensorMeta((4, 8), "float32"),)
    graph = Graph("m", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=meta),
        Node("mask", OpKind.CALL_FUNCTION, "ne", ("x",), outputs=meta),
        Node("m2", OpKind.CALL_FUNCTION, "neg", ("mask",), outputs=meta),
        Node("fc0", OpKind.CALL_FUNCTION, "linear", ("x",), params=("w",), outputs=meta),
        Node("use", OpKind.CALL_FUNCTION, "mul", ("fc0", "m2"), outputs=meta),
        Node("output", OpKind.OUTPUT, "output", ("use",))),
        params=(Param("w", (8, 8), "float32"),))
    assert recomputed_nodes(graph, ["fc0"]) == ("x",)
    assert recomputed_nodes(graph, ["use"]) == ("x", "mask", "m2")
    assert recomputed_nodes(graph, ["fc0", "use"]) == ("x", "mask", "m2")
    assert recomputed_nodes(graph, []) == ()
    # a caller's own idea of what is recomputed (codegen: the plan's stage -1)
    assert recomputed_nodes(graph, ["use"], {"m2"}) == ("m2",)


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []
    real = module.recomputed_nodes

    def spy(*args: Any, **kwargs: Any) -> tuple[str, ...]:
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(module, "recomputed_nodes", spy)
    return calls


def test_codegen_and_the_stage_replay_recompute_the_same_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from _dist import cut_assignment

    import modelparallel.codegen.split as split
    import modelparallel.partitioner.evaluate as evaluate
    from modelparallel.codegen import build_stages
    from modelparallel.cost_model import HostReplay, estimate_costs
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig
    from modelparallel.tracer import trace

    traced = trace(_Masked(), (torch.randn(4, 8),))
    graph = traced.graph
    order = tuple(n.name for n in graph.nodes if n.op is not OpKind.OUTPUT)
    replay = HostReplay(order, {n: 1e-4 for n in order}, {n: 1e-4 for n in order}, {}, {})
    costs = estimate_costs(graph, "cpu", measured=replay.node_times(), replay=replay)
    config = PlanConfig(partitions=3)
    assignment = cut_assignment(graph, [0.34, 0.67])

    charged = _spy(monkeypatch, evaluate)
    plan = evaluate_assignment(graph, config, "cpu", assignment, costs=[costs])
    copied = _spy(monkeypatch, split)
    stages = build_stages(traced, plan)

    assert len(copied) == 3 and charged and len(charged) % 3 == 0  # one call per stage
    charged = charged[-3:]  # the last evaluation's
    placeholders = {n.name for n in graph.placeholders}
    for s, program in enumerate(stages):
        assert charged[s] == copied[s], s
        assert program.recomputed == tuple(n for n in copied[s] if n not in placeholders)
        assert sorted(program.model_inputs) == sorted(
            traced.input_names.index(n) for n in copied[s] if n in placeholders)
    assert any(program.recomputed for program in stages[1:])  # the masks are recomputed


def test_input_derived_nodes() -> None:
    g = Graph("m", (
        Node("ids", OpKind.PLACEHOLDER, "ids"),
        Node("n", OpKind.CALL_METHOD, "size", ("ids",), value_kind="scalar"),
        Node("mask", OpKind.CALL_FUNCTION, "ne", ("ids",)),
        Node("emb", OpKind.CALL_FUNCTION, "embedding", ("ids",), params=("w",)),
        Node("drop", OpKind.CALL_FUNCTION, "dropout", ("mask",), is_random=True),
        Node("add", OpKind.CALL_FUNCTION, "add", ("emb", "mask")),
        Node("output", OpKind.OUTPUT, "output", ("add", "drop")),
    ), params=(Param("w", (10, 4), "float32"),))
    assert input_derived_nodes(g) == {"ids", "n", "mask"}


def test_constant_buffers_make_their_readers_input_derived() -> None:
    """Note [constant buffers]: a small buffer nothing writes (a rotary ``inv_freq``) is
    recomputed with its readers; one written in place, a large one, or a trainable
    parameter is not."""
    buf = CONSTANT_BUFFER_BYTES // 4  # float32 elements at the limit
    g = Graph("m", (
        Node("ids", OpKind.PLACEHOLDER, "ids"),
        Node("freq", OpKind.CALL_FUNCTION, "aten.mul.Tensor", ("ids",), params=("inv_freq",)),
        Node("cos", OpKind.CALL_FUNCTION, "aten.cos.default", ("freq",)),
        Node("count", OpKind.CALL_FUNCTION, "aten.add_.Tensor", (), params=("tracked",)),
        Node("seen", OpKind.CALL_FUNCTION, "aten.mul.Tensor", ("ids",), params=("tracked",)),
        Node("big", OpKind.CALL_FUNCTION, "aten.mul.Tensor", ("ids",), params=("table",)),
        Node("ok", OpKind.CALL_FUNCTION, "aten.mul.Tensor", ("ids",), params=("limit",)),
        Node("emb", OpKind.CALL_FUNCTION, "aten.embedding", ("ids",), params=("w",)),
        Node("output", OpKind.OUTPUT, "output", ("emb", "cos", "count", "seen", "big", "ok")),
    ), params=(Param("w", (10, 4), "float32"),
               Param("inv_freq", (4,), "float32", is_buffer=True),
               Param("tracked", (), "int64", is_buffer=True),
               Param("table", (buf + 1,), "float32", is_buffer=True),
               Param("limit", (buf,), "float32", is_buffer=True)))
    assert input_derived_nodes(g) == {"ids", "freq", "cos", "ok"}


@st.composite
def _random_dag(draw):
    n = draw(st.integers(3, 25))
    modules = [f"m.{i}" for i in range(draw(st.integers(1, 5)))] + [""]
    nodes = [Node("in", OpKind.PLACEHOLDER, "in")]
    for i in range(n):
        preds = draw(st.sets(st.sampled_from([x.name for x in nodes]), min_size=1, max_size=3))
        path = draw(st.sampled_from(modules))
        sub = draw(st.integers(0, 2))
        nodes.append(Node(f"v{i}", OpKind.CALL_FUNCTION, "f", tuple(sorted(preds)),
                          module_path=f"{path}.s{sub}" if path else ""))
    nodes.append(Node("output", OpKind.OUTPUT, "output", (nodes[-1].name,)))
    return Graph("rand", tuple(nodes))


@settings(max_examples=60, deadline=None)
@given(_random_dag(), st.integers(0, 3))
def test_module_groups_quotient_is_acyclic(g: Graph, depth: int) -> None:
    groups = module_groups(g, depth)
    assert set(groups) == {n.name for n in g.nodes}
    q = nx.DiGraph()
    q.add_nodes_from(set(groups.values()))
    for n in g.nodes:
        for s in n.inputs:
            if groups[s] != groups[n.name]:
                q.add_edge(groups[s], groups[n.name])
    assert nx.is_directed_acyclic_graph(q)


def test_module_groups_keep_a_module_together() -> None:
    g = Graph("m", (
        Node("x", OpKind.PLACEHOLDER, "x"),
        Node("a", OpKind.CALL_FUNCTION, "f", ("x",), module_path="blk.0.fc"),
        Node("b", OpKind.CALL_FUNCTION, "g", ("a",), module_path="blk.0.act"),
        Node("c", OpKind.CALL_FUNCTION, "h", ("b",), module_path="blk.1.fc"),
        Node("output", OpKind.OUTPUT, "output", ("c",)),
    ))
    groups = module_groups(g, 2)
    assert groups["a"] == groups["b"] == "blk.0"
    assert groups["c"] == "blk.1"
    assert groups["x"] != groups["a"]
