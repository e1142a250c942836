"""Shared cases of the partitioner tests: every valid assignment of a small problem, the brute-force
optimum, a graph whose sent values the sender may hold."""

from __future__ import annotations

import itertools

import numpy as np

from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import Problem


def valid_assignments(prob: Problem):
    """Every assignment respecting order, the output node, pins and colocation."""
    n, p = prob.n, prob.p
    for head in itertools.product(range(p), repeat=n - 1):
        st = np.array((*head, p - 1))
        if np.any(st[prob.edge_src] > st[prob.edge_dst]):
            continue
        if any(st[v] != s for v, s in prob.pinned.items()):
            continue
        if any(len(set(st[list(g)].tolist())) > 1 for g in prob.colocate):
            continue
        yield st


def brute(prob: Problem) -> tuple[float, np.ndarray | None]:
    best, arg = np.inf, None
    for st in valid_assignments(prob):
        ev = evaluate(prob, st)
        if np.all(ev.memory <= prob.caps) and ev.objective < best:
            best, arg = ev.objective, st
    return best, arg


def sender_graph(act: str) -> Graph:
    """x -> fc1 -> act -> fc2 -> fc3 -> output, with fc2's output also read by fc3 only; act is
    an op that saves its own output (``relu``) or one that does not (``gelu``)."""
    def t() -> tuple[TensorMeta, ...]:
        return (TensorMeta((32, 256), "float32", True),)
    b = 32 * 256 * 4
    nodes = (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((32, 256), "float32"),)),
        Node("fc1", OpKind.CALL_FUNCTION, "aten.linear.default", inputs=("x",),
             params=("w1",), outputs=t(), flops=2 * 32 * 256 * 256, saved_bytes=b),
        Node("act", OpKind.CALL_FUNCTION, f"aten.{act}.default", inputs=("fc1",), outputs=t(),
             flops=32 * 256, saved_bytes=b),
        Node("fc2", OpKind.CALL_FUNCTION, "aten.linear.default", inputs=("act",),
             params=("w2",), outputs=t(), flops=2 * 32 * 256 * 256, saved_bytes=0),
        Node("fc3", OpKind.CALL_FUNCTION, "aten.linear.default", inputs=("fc2", "act"),
             params=("w3",), outputs=t(), flops=2 * 32 * 256 * 256, saved_bytes=b),
        Node("output", OpKind.OUTPUT, "output", inputs=("fc3",)))
    params = tuple(Param(w, (256, 256), "float32") for w in ("w1", "w2", "w3"))
    return Graph(f"sender_{act}", nodes, params=params)


def shuffled(graph: Graph, seed: int) -> Graph:
    """The same graph listed in another valid topological order (random Kahn; output last)."""
    import random

    rng = random.Random(seed)
    out_name = graph.output.name
    left = {nd.name: len(set(nd.inputs)) for nd in graph.nodes}
    ready = [nd.name for nd in graph.nodes if not nd.inputs and nd.name != out_name]
    order: list[str] = []
    while ready:
        name = ready.pop(rng.randrange(len(ready)))
        order.append(name)
        for user in dict.fromkeys(graph.users(name)):
            left[user] -= 1
            if left[user] == 0 and user != out_name:
                ready.append(user)
    order.append(out_name)
    assert len(order) == len(graph)
    return graph.replace(nodes=tuple(graph.node(x) for x in order))


def spread_tied_graph(layers: int = 8, *, spread: bool = True) -> Graph:
    """A decoder (``transformer_graph`` untied) with a second reader of ``transformer.wte.weight``:
    a type embedding of the input ids added before the final norm. With ``spread`` it is listed
    right before that add (a valid order that keeps the tied readers first and last), else right
    after the token embedding."""
    import dataclasses

    from modelparallel.partitioner._synthetic import transformer_graph

    g = transformer_graph(layers, tied=False)
    nodes = list(g.nodes)
    h = TensorMeta((4, 128, 256), "float32", True)
    extra = Node("type_emb", OpKind.CALL_FUNCTION, "aten.embedding.default",
                 inputs=("input_ids",), outputs=(h,), params=("transformer.wte.weight",),
                 module_path="transformer.wte", module_type="Embedding")
    at = [nd.name for nd in nodes].index("ln_f")
    ln = nodes[at]
    nodes[at] = Node("ln_f_in", OpKind.CALL_FUNCTION, "aten.add.Tensor",
                     inputs=(ln.inputs[0], "type_emb"), outputs=(h,), module_path="transformer",
                     module_type="GPT2")
    nodes.insert(at + 1, dataclasses.replace(ln, inputs=("ln_f_in",)))
    nodes.insert(at if spread else [nd.name for nd in nodes].index("wte") + 1, extra)
    return Graph("spread_tied", tuple(nodes), g.params, g.metadata)
