"""Graph analyses several stages share: input-derived nodes, what a stage recomputes, module groups.

Import them from :mod:`modelparallel.ir`.

Example:
    >>> g = Graph("id", (Node("x", OpKind.PLACEHOLDER, "x"),
    ...                  Node("output", OpKind.OUTPUT, "output", ("x",))))
    >>> sorted(input_derived_nodes(g))
    ['x']
"""

from __future__ import annotations

from collections.abc import Container, Iterable

import networkx as nx

from modelparallel.ir.graph import Graph
from modelparallel.ir.nodes import Node, OpKind, Param  # noqa: F401  (Param: doctests)

__all__ = ["CONSTANT_BUFFER_BYTES", "input_derived_nodes", "module_groups", "recomputed_nodes", "region_of"]


#: Bytes of a buffer that a stage may copy to recompute its readers (Note [constant buffers]).
CONSTANT_BUFFER_BYTES = 1 << 22


def input_derived_nodes(graph: Graph) -> frozenset[str]:
    """Nodes computed from model inputs alone, which every stage can recompute instead of receiving.

    A node is input-derived when it is a placeholder, or when it reads no parameter (only
    constant buffers, Note [constant buffers]), is not random, is not the output, and every
    input is input-derived. Examples: attention masks and position ids built from
    ``input_ids``, shapes read off the inputs, and the rotary embedding's cosines and sines
    built from its ``inv_freq`` buffer. Every rank of a pipeline holds the whole input batch
    (see Note [inputs on every rank] in ``modelparallel/partitioner/problem.py``), so such
    values cost no communication: the partitioner leaves them out and codegen copies them
    (with the buffers they read) into every stage that uses them.

    Note [constant buffers]
    ~~~~~~~~~~~~~~~~~~~~~~~
    A buffer is *constant* when it needs no gradient, holds at most
    :data:`CONSTANT_BUFFER_BYTES`, and no node that reads it writes in place (a trailing ``_``
    in its op name, as in ``add_`` or ``aten.copy_.default``, or an ``__i*__`` operator):
    BatchNorm's running statistics and ``num_batches_tracked`` are updated by the nodes that
    read them, so they never qualify, while a rotary embedding's ``inv_freq`` does. A stage
    that recomputes a reader holds its own copy of the buffer, as it does for a parameter that
    its own nodes read, so the copies stay equal: nothing writes them. Without this, the cosines
    and sines of a Llama-style model were computed once on the first stage and sent to every
    stage, two small values per layer whose placement the planner had to search
    (``docs/measurements.md``, "Constant buffers").

    Example:
        >>> g = Graph("m", (Node("ids", OpKind.PLACEHOLDER, "ids"),
        ...                 Node("mask", OpKind.CALL_FUNCTION, "ne", ("ids",)),
        ...                 Node("freq", OpKind.CALL_FUNCTION, "mul", ("ids",), params=("f",)),
        ...                 Node("emb", OpKind.CALL_FUNCTION, "emb", ("ids",), params=("w",)),
        ...                 Node("output", OpKind.OUTPUT, "output", ("emb", "mask", "freq"))),
        ...           params=(Param("w", (10, 4), "float32"),
        ...                   Param("f", (4,), "float32", is_buffer=True)))
        >>> sorted(input_derived_nodes(g))
        ['freq', 'ids', 'mask']
    """
    constant = _constant_buffers(graph)
    derived: set[str] = set()
    for n in graph.nodes:
        if n.op is OpKind.PLACEHOLDER or (
                n.op is not OpKind.OUTPUT and not n.is_random and n.op is not OpKind.GET_ATTR
                and all(s in derived for s in n.inputs)
                and (not n.params or (all(q in constant for q in n.params)
                                      and not _writes_in_place(n)))):
            derived.add(n.name)
    return frozenset(derived)


_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow",
                            "lshift", "rshift", "and", "or", "xor"))


def _writes_in_place(node: Node) -> bool:
    """Whether ``node``'s op name says it writes into an input (``add_``, ``__iadd__``)."""
    return any((part.endswith("_") and not part.endswith("__")) or part in _IN_PLACE_OPERATORS
               for part in node.target.split("."))


def _constant_buffers(graph: Graph) -> frozenset[str]:
    """The buffers of Note [constant buffers]."""
    written = {q for n in graph.nodes if _writes_in_place(n) for q in n.params}
    return frozenset(q.name for q in graph.params
                     if q.is_buffer and not q.requires_grad and q.name not in written
                     and q.nbytes <= CONSTANT_BUFFER_BYTES)


def recomputed_nodes(graph: Graph, members: Iterable[str],
                     derived: Container[str] | None = None) -> tuple[str, ...]:
    """The input-derived nodes a stage computing ``members`` recomputes instead of receiving.

    Note [recomputed nodes]
    ~~~~~~~~~~~~~~~~~~~~~~~
    A stage recomputes every input-derived node (:func:`input_derived_nodes`) its own nodes read,
    directly or through other input-derived nodes, and reads the placeholders among them from
    the batch every rank holds (Note [inputs on every rank] in
    ``modelparallel/partitioner/problem.py``). This function is the one statement of that walk:
    the cost model's stage replay (``modelparallel/partitioner/evaluate.py``) charges a stage
    with the nodes it returns and codegen (``modelparallel/codegen/split.py``) copies exactly
    those nodes into the stage's module, so the two always agree.

    Args:
        graph: The graph.
        members: The nodes the stage computes (its assigned nodes; input-derived names among
            them are walked through like any other).
        derived: The input-derived nodes, when the caller has them (default:
            ``input_derived_nodes(graph)``).

    Returns:
        The input-derived nodes read, placeholders included, in topological order; members
        themselves are left out.

    Example:
        >>> g = Graph("m", (Node("ids", OpKind.PLACEHOLDER, "ids"),
        ...                 Node("mask", OpKind.CALL_FUNCTION, "ne", ("ids",)),
        ...                 Node("emb", OpKind.CALL_FUNCTION, "emb", ("mask",), params=("w",)),
        ...                 Node("output", OpKind.OUTPUT, "output", ("emb",))),
        ...           params=(Param("w", (10, 4), "float32"),))
        >>> recomputed_nodes(g, ["emb"])
        ('ids', 'mask')
    """
    if derived is None:
        derived = input_derived_nodes(graph)
    own = set(members)
    out: set[str] = set()
    stack = [u for n in own for u in graph.node(n).inputs if u in derived and u not in own]
    while stack:
        name = stack.pop()
        if name in out:
            continue
        out.add(name)
        stack.extend(u for u in graph.node(name).inputs
                     if u in derived and u not in own and u not in out)
    return tuple(sorted(out, key=graph.index))


def module_groups(graph: Graph, depth: int, nodes: Iterable[str] | None = None, *,
                  innermost: bool = False) -> dict[str, str]:
    """Group nodes by their module path cut to ``depth`` levels, keeping the quotient acyclic.

    Each node maps to a group name: its module path truncated to ``depth`` dotted components
    (``"transformer.h.3"`` at depth 3 for ``"transformer.h.3.attn.c_attn"``). Nodes outside any
    module at that depth (or of depth 0) are singletons. Consecutive nodes of one module that are
    interleaved with other work can make the quotient graph cyclic (a module called twice, or a
    parent op between two child calls); such groups are split along the topological order until
    the quotient is a DAG. The result therefore always contracts to a valid pipeline unit graph.

    Args:
        graph: The op-level graph.
        depth: How many leading module-path components to keep; 0 makes every node its own group.
        nodes: Restrict grouping to these nodes (others are left out of the result), listed
            in a topological order: the runs follow that order (default: the graph's).
        innermost: Group by the whole module path instead (``depth`` is ignored): the ops of
            each innermost module together, the root's own ops singletons.

    Returns:
        Node name to group name. Group names are stable: the module path, with ``#k`` appended to
        the k-th piece of a split module and ``@node`` for singletons.

    Example:
        >>> g = Graph("m", (Node("x", OpKind.PLACEHOLDER, "x"),
        ...                 Node("a", OpKind.CALL_FUNCTION, "f", ("x",), module_path="blk.0.fc"),
        ...                 Node("b", OpKind.CALL_FUNCTION, "g", ("a",), module_path="blk.0.act"),
        ...                 Node("c", OpKind.CALL_FUNCTION, "h", ("b",), module_path="blk.1"),
        ...                 Node("output", OpKind.OUTPUT, "output", ("c",))))
        >>> module_groups(g, 2)["a"] == module_groups(g, 2)["b"]
        True
        >>> module_groups(g, 0, innermost=True)["a"] == module_groups(g, 0, innermost=True)["b"]
        False
    """
    selected = list(graph.nodes) if nodes is None else [graph.node(x) for x in nodes]
    keys: dict[str, str] = {}
    for n in selected:
        parts = n.module_path.split(".") if n.module_path else []
        if innermost:
            depth = max(len(parts), 1)
        if depth <= 0 or len(parts) < depth or n.op in (OpKind.PLACEHOLDER, OpKind.OUTPUT):
            keys[n.name] = f"@{n.name}"
        else:
            keys[n.name] = ".".join(parts[:depth])
    # Split each group into maximal runs that are contiguous in topological order among the
    # selected nodes: a contiguous run of a topological order can never create a cycle with its
    # complement order-wise, so the quotient of runs is acyclic. Then merge runs back where the
    # merge keeps the quotient acyclic (the common case: one module, one run).
    runs: dict[str, list[list[str]]] = {}
    prev_key: str | None = None
    for n in selected:
        k = keys[n.name]
        if k != prev_key or k not in runs:
            runs.setdefault(k, []).append([])
        runs[k][-1].append(n.name)
        prev_key = k
    groups: dict[str, str] = {}
    for k, pieces in runs.items():
        if len(pieces) == 1:
            for name in pieces[0]:
                groups[name] = k
        else:
            for i, piece in enumerate(pieces):
                for name in piece:
                    groups[name] = f"{k}#{i}"
    return _merge_split_runs(graph, groups, selected)


def _merge_split_runs(graph: Graph, groups: dict[str, str], selected: list[Node]) -> dict[str, str]:
    """Merge ``module#k`` pieces back into one group when that keeps the quotient acyclic."""
    split_bases = sorted({g.split("#", 1)[0] for g in groups.values() if "#" in g})
    if not split_bases:
        return groups
    sel = {n.name for n in selected}
    for base in split_bases:
        trial = {n: (base if g.split("#", 1)[0] == base and "#" in g else g)
                 for n, g in groups.items()}
        q = nx.DiGraph()
        q.add_nodes_from(set(trial.values()))
        for n in selected:
            for src in n.inputs:
                if src in sel and trial[src] != trial[n.name]:
                    q.add_edge(trial[src], trial[n.name])
        if nx.is_directed_acyclic_graph(q):
            groups = trial
    return groups


def region_of(module_path: str, mode: str | tuple[str, ...], depth: int | None) -> str | None:
    """The checkpoint region of a node of ``module_path`` (Note [memory features] in
    ``modelparallel/partitioner/memory_features.py``): the planner prices it and codegen
    checkpoints it (Note [checkpoint regions]), so both read this one function.

    Args:
        module_path: The node's module path (``""`` for the root's own ops).
        mode: ``"all"``/``"auto"`` (blocks, else modules at ``depth``) or module paths; an
            entry ``"a.0+a.1"`` is one region of several modules (SMP's ``group_N`` and
            ``contiguous`` strategies for an ``nn.Sequential``).
        depth: Module depth of the regions when the model has no numbered blocks.

    Example:
        >>> region_of("transformer.h.3.attn.c_attn", "all", None)
        'transformer.h.3'
        >>> region_of("layers.1.fc", ("layers.0+layers.1", "layers.2+layers.3"), None)
        'layers.0+layers.1'
    """
    if not module_path:
        return None
    if isinstance(mode, tuple):
        best, depth_of_best = None, -1
        for entry in mode:
            for path in entry.split("+"):
                if (module_path == path or module_path.startswith(path + ".")) and (
                        len(path) > depth_of_best):
                    best, depth_of_best = entry, len(path)
        return best
    parts = module_path.split(".")
    numbered = [i for i, c in enumerate(parts) if c.isdigit()]
    if numbered:
        return ".".join(parts[:numbered[-1] + 1])
    if depth is not None and len(parts) >= depth:
        return ".".join(parts[:depth])
    return None
