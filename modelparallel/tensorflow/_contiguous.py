"""SMP's TensorFlow option ``contiguous``: every stage one connected subgraph.

Note [contiguous stages]
~~~~~~~~~~~~~~~~~~~~~~~~
The planner cuts a topological order of the graph, so a stage is a contiguous run of *some*
order, but parallel branches can interleave in that order: a stage may hold the first layer of
two branches that meet only later, i.e. two pieces with no edge between them (inputs, outputs
and constants do not connect pieces; a graph that is itself disconnected is exempt, as in SMP).
With ``contiguous=True`` (SMP's default) the model's plan is repaired after planning: each piece
of a stage other than its heaviest (by compute) moves, whole, to a stage it has an edge to,
if the move keeps every edge flowing forward (``stage(u) <= stage(v)``) and moves no
``smp.partition`` pin. A piece is made of whole units (a layer's ops are connected, and so are
the readers of one variable with everything between them), so a move never breaks the layer
rule of Note [layer granularity]; every move removes one piece from its stage and adds none to
the other (the piece joins a piece there), so the repair ends. The repaired assignment is then
planned again with every node pinned, which gives its costs, memory and schedule; the repair
only runs when a stage is disconnected, and a piece that cannot move leaves a warning naming
the stages. Training is exact whatever the stages (Note [op placement] in
``runtime/tf_pipeline.py``): ``contiguous`` is about SMP's plan shape, not correctness.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["disconnected_stages", "make_contiguous"]

_NOT_OPS = ("placeholder", "output", "get_attr")


def _ops(graph: Any, assignment: Mapping[str, int]) -> set[str]:
    return {n.name for n in graph if n.op.value not in _NOT_OPS
            and assignment.get(n.name, -1) >= 0}


def _pieces(graph: Any, assignment: Mapping[str, int], ops: set[str],
            same_stage: bool) -> dict[str, str]:
    """Node -> the root of its weakly connected piece (within its stage if ``same_stage``)."""
    parent = {n: n for n in ops}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for node in graph:
        if node.name not in parent:
            continue
        for src in node.inputs:
            if src in parent and (not same_stage or assignment[src] == assignment[node.name]):
                parent[find(src)] = find(node.name)
    return {n: find(n) for n in ops}


def disconnected_stages(graph: Any, assignment: Mapping[str, int]) -> dict[int, int]:
    """Stages (of ``assignment``, node name -> stage) whose nodes are not one weakly connected
    piece of ``graph``, with their number of pieces; empty when the graph itself is not
    connected (Note [contiguous stages]).

    Example:
        >>> from modelparallel.ir import Graph, Node, OpKind
        >>> g = Graph("g", (Node("x", OpKind.PLACEHOLDER, "x"),
        ...     Node("a", OpKind.CALL_FUNCTION, "f", ("x",)),
        ...     Node("b", OpKind.CALL_FUNCTION, "f", ("x",)),
        ...     Node("c", OpKind.CALL_FUNCTION, "g", ("a", "b")),
        ...     Node("output", OpKind.OUTPUT, "output", ("c",))))
        >>> disconnected_stages(g, {"a": 0, "b": 0, "c": 1})
        {0: 2}
    """
    ops = _ops(graph, assignment)
    if len(set(_pieces(graph, assignment, ops, same_stage=False).values())) > 1:
        return {}
    roots: dict[int, set[str]] = {}
    for n, root in _pieces(graph, assignment, ops, same_stage=True).items():
        roots.setdefault(assignment[n], set()).add(root)
    return {s: len(r) for s, r in sorted(roots.items()) if len(r) > 1}


def make_contiguous(graph: Any, assignment: Mapping[str, int],
                    pinned: frozenset[str] = frozenset()) -> dict[str, int]:
    """``assignment`` with the extra pieces of disconnected stages moved to a neighbouring
    stage where that keeps the pipeline order (Note [contiguous stages]); nodes in ``pinned``
    never move. What cannot be repaired stays; :func:`disconnected_stages` tells.

    Example:
        >>> from modelparallel.ir import Graph, Node, OpKind
        >>> g = Graph("g", (Node("x", OpKind.PLACEHOLDER, "x"),
        ...     Node("a", OpKind.CALL_FUNCTION, "f", ("x",), flops=2),
        ...     Node("b", OpKind.CALL_FUNCTION, "f", ("x",), flops=1),
        ...     Node("c", OpKind.CALL_FUNCTION, "g", ("a", "b")),
        ...     Node("output", OpKind.OUTPUT, "output", ("c",))))
        >>> make_contiguous(g, {"x": -1, "a": 0, "b": 0, "c": 1, "output": 1})["b"]
        1
    """
    stage = dict(assignment)
    if not disconnected_stages(graph, stage):
        return stage
    consumers: dict[str, list[str]] = {}
    for node in graph:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.name)
    flops = {n.name: float(n.flops or 0.0) + 1e-9 for n in graph}
    moved = True
    while moved:
        moved = False
        ops = _ops(graph, stage)
        pieces: dict[str, set[str]] = {}
        for n, root in _pieces(graph, stage, ops, same_stage=True).items():
            pieces.setdefault(root, set()).add(n)
        by_stage: dict[int, list[set[str]]] = {}
        for members in pieces.values():
            by_stage.setdefault(stage[next(iter(members))], []).append(members)
        for _, group in sorted(by_stage.items()):
            if len(group) < 2:
                continue
            group.sort(key=lambda m: -sum(flops[n] for n in m))
            for piece in group[1:]:
                target = _target(graph, stage, piece, consumers, ops, pinned)
                if target is not None:
                    for n in piece:
                        stage[n] = target
                    moved = True
                    break
            if moved:
                break
    return stage


def _target(graph: Any, stage: Mapping[str, int], piece: set[str],
            consumers: Mapping[str, list[str]], ops: set[str],
            pinned: frozenset[str]) -> int | None:
    """The stage ``piece`` can move to whole: one it has an edge to, with every producer at or
    before it and every consumer at or after it (None if there is none, or a pin is inside)."""
    if piece & pinned:
        return None
    lo, hi = 0, 1 << 30
    near: set[int] = set()
    for n in piece:
        for src in graph.node(n).inputs:
            if src in piece:
                continue
            lo = max(lo, stage.get(src, -1))
            if src in ops:
                near.add(stage[src])
        for dst in consumers.get(n, ()):
            if dst in piece:
                continue
            if dst in ops:
                hi = min(hi, stage[dst])
                near.add(stage[dst])
            elif stage.get(dst, -1) >= 0:  # the output node
                hi = min(hi, stage[dst])
    here = stage[next(iter(piece))]
    options = sorted((t for t in near if t != here and lo <= t <= hi), key=lambda t: abs(t - here))
    return options[0] if options else None
