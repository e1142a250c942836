"""Topological orders of the assigned nodes that do not depend on the order the graph lists them in.

Note [canonical order]
~~~~~~~~~~~~~~~~~~~~~~
The contiguous DP (:mod:`~modelparallel.partitioner.dp`), the baselines, the coarsening runs of
:func:`modelparallel.ir.module_groups` and the warm starts all cut one topological order into
segments, so a poor order makes poor plans: an IR file that lists a colocated group
(``tied="colocate"``) first and last forbids every cut in between, and a cheap branch listed long
before its consumer sends its value across every boundary in between. :func:`build_problem
<modelparallel.partitioner.problem.build_problem>` therefore indexes the assigned nodes in a
*canonical* order computed from the graph's structure alone (edges, operand order, node names,
costs), never from its listing:

1. colocated groups are closed into *hulls*: the group plus every node on a path between two of
   its members (they must share its stage anyway, Note [pipeline order]); overlapping hulls, and
   hulls that would form a cycle when contracted, are merged until the contracted graph is a DAG;
2. the order is the post-order of a depth-first search from the sinks (other sinks first, by
   depth and name; the output node last), over the contracted graph, that visits a node's
   producers heaviest first: a producer's *depth* is the largest compute time (then node count)
   of a path ending at it. The main trunk is emitted before the cheap side branches that join
   it, so each side branch sits right before the node that reads it, chains stay contiguous,
   and the nodes of a module (all between its input and its output) stay together;
3. a hull is emitted where the search reaches it, its members in the order step 2 gives them
   without contraction.

The result depends on the graph as a set of nodes only, so an equally valid listing of the same
graph gives the same problem and the same plan (up to the solver's time limit). The ILP pipeline
also tries the DP on a few other orders (:func:`warm_orders`: the graph's own listing, a
light-branch-first search, and the later readers of a shared parameter moved up to its first
reader with the work that follows from them alone, :func:`tied_early_order`) for its first
incumbent (Note [ILP pipeline] in
:mod:`~modelparallel.partitioner.methods`); the op-level ILP and the bounds do not depend on any
order.

Example:
    >>> order = canonical_order([(), (0,), (), (1, 2)], [1.0, 1.0, 0.0, 1.0], names="abcd")
    >>> order.tolist()  # 'c' is cheap and read by 'd' only: it goes right before 'd'
    [0, 1, 2, 3]
    >>> canonical_order([(), (), (0, 1)], [1.0, 5.0, 1.0], names="xyz").tolist()
    [1, 0, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np

__all__ = ["canonical_order", "hulls", "tied_early_order", "warm_orders"]


def _succs(preds: Sequence[Sequence[int]]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in preds]
    for v, ps in enumerate(preds):
        for u in ps:
            out[u].append(v)
    return out


def _depths(preds: Sequence[Sequence[int]], weight: Sequence[float]) -> list[tuple[float, int]]:
    """Per node, (largest summed weight, largest node count) of a path ending at it. ``preds``
    must list producers before consumers (any topological indexing)."""
    depth: list[tuple[float, int]] = []
    for v, ps in enumerate(preds):
        w, c = 0.0, 0
        for u in ps:
            du = depth[u]
            if du[0] > w:
                w = du[0]
            if du[1] > c:
                c = du[1]
        depth.append((w + float(weight[v]), c + 1))
    return depth


def _reach(start: Sequence[int], adj: Sequence[Sequence[int]]) -> set[int]:
    seen = set(start)
    stack = list(start)
    while stack:
        for v in adj[stack.pop()]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def hulls(preds: Sequence[Sequence[int]], groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The merged hulls of ``groups`` (Note [canonical order], step 1), sorted node lists whose
    contraction leaves the graph acyclic.

    Example:
        >>> hulls([(), (0,), (1,), (2,)], [(0, 2)])
        [[0, 1, 2]]
    """
    succs = _succs(preds)
    pending = [set(g) for g in groups if len(set(g)) > 1]
    while True:
        closed: list[set[int]] = []
        for g in pending:  # hull of each, merging any that overlap
            h = g | (_reach(list(g), succs) & _reach(list(g), preds))
            for other in [c for c in closed if c & h]:
                closed.remove(other)
                h |= other
            closed.append(h)
        if len(closed) < len(pending) or any(c != g for c, g in zip(closed, pending)):
            pending = closed
            continue
        label = {v: i for i, c in enumerate(closed) for v in c}
        q = nx.DiGraph()
        q.add_nodes_from(range(len(closed)))
        n = len(preds)
        for v in range(n):
            for u in preds[v]:
                a, b = label.get(u, ("n", u)), label.get(v, ("n", v))
                if a != b:
                    q.add_edge(a, b)
        cyclic = [c for c in nx.strongly_connected_components(q) if len(c) > 1]
        if not cyclic:
            return sorted(sorted(c) for c in closed)
        merged: list[set[int]] = []
        for comp in cyclic:
            s: set[int] = set()
            for x in comp:
                s |= closed[x] if isinstance(x, int) else {x[1]}
            merged.append(s)
        inside = {x for comp in cyclic for x in comp}
        pending = merged + [c for i, c in enumerate(closed) if i not in inside]


def _postorder(preds: Sequence[Sequence[int]], roots: Sequence[int],
               key: Sequence[tuple[object, ...]], n: int) -> list[int]:
    """Post-order of a depth-first search from ``roots`` (in turn) over ``preds``, visiting the
    producers of each node by ``key`` ascending."""
    seen = bytearray(n)
    out: list[int] = []
    for r in roots:
        if seen[r]:
            continue
        seen[r] = 1
        stack = [(r, iter(sorted(preds[r], key=key.__getitem__)))]
        while stack:
            v, it = stack[-1]
            for u in it:
                if not seen[u]:
                    seen[u] = 1
                    stack.append((u, iter(sorted(preds[u], key=key.__getitem__))))
                    break
            else:
                stack.pop()
                out.append(v)
    return out


def _search(preds: Sequence[Sequence[int]], weight: Sequence[float], names: Sequence[str],
            heavy_first: bool) -> list[int]:
    n = len(preds)
    depth = _depths(preds, weight)
    sign = -1 if heavy_first else 1
    key = [(sign * depth[v][0], sign * depth[v][1], names[v]) for v in range(n)]
    has_succ = bytearray(n)
    for ps in preds:
        for u in ps:
            has_succ[u] = 1
    out = n - 1
    sinks = sorted((v for v in range(n - 1) if not has_succ[v]),
                   key=lambda v: (depth[v][0], depth[v][1], names[v]))
    return _postorder(preds, [*sinks, out], key, n)


def canonical_order(preds: Sequence[Sequence[int]], weight: Sequence[float], *,
                    names: Sequence[str], colocate: Sequence[Sequence[int]] = (),
                    heavy_first: bool = True) -> np.ndarray:
    """The canonical order of Note [canonical order], as indices into ``preds``.

    Args:
        preds: Producers of each node (indices; any topological indexing), in operand order.
            The last node is the output: it comes last.
        weight: Compute time (or any cost) of each node.
        names: Unique node names, the last tie-break.
        colocate: Groups of nodes that must share a stage.
        heavy_first: Visit producers heaviest first (the canonical order); ``False`` visits
            the lightest first, which places cheap branches early (an alternative warm start).
    """
    n = len(preds)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    plain = _search(preds, weight, names, heavy_first)
    groups = hulls(preds, colocate) if colocate else []
    if not groups:
        return np.asarray(plain, dtype=np.int64)
    # Contract each hull and search again; the quotient is numbered topologically (by the
    # plain order, which depends on the structure only), the output last.
    pos = np.empty(n, dtype=np.int64)
    pos[plain] = np.arange(n)
    rep = list(range(n))
    members: dict[int, list[int]] = {}
    for h in groups:
        ms = sorted(h, key=pos.__getitem__)
        for v in ms:
            rep[v] = ms[0]
        members[ms[0]] = ms
    q = nx.DiGraph()
    q.add_nodes_from(set(rep))
    q.add_edges_from((rep[u], rep[v]) for v in range(n) for u in preds[v] if rep[u] != rep[v])
    last = {r: (np.inf if r == rep[n - 1] else max(pos[m] for m in members.get(r, [r])))
            for r in q.nodes}
    seq = list(nx.lexicographical_topological_sort(q, key=last.__getitem__))
    qid = {r: i for i, r in enumerate(seq)}
    q_preds = [sorted({qid[rep[u]] for m in members.get(r, [r]) for u in preds[m]} - {i})
               for i, r in enumerate(seq)]
    q_weight = [sum(float(weight[m]) for m in members.get(r, [r])) for r in seq]
    q_names = [min(names[m] for m in members.get(r, [r])) for r in seq]
    q_order = _search(q_preds, q_weight, q_names, heavy_first)
    return np.asarray([m for i in q_order for m in members.get(seq[i], [seq[i]])],
                      dtype=np.int64)


def warm_orders(preds: Sequence[Sequence[int]], weight: Sequence[float], *,
                names: Sequence[str], colocate: Sequence[Sequence[int]] = (),
                tied: Sequence[Sequence[int]] = ()) -> dict[str, np.ndarray]:
    """Other topological orders to try the DP on (Note [canonical order]), in the problem's
    indexing (whose own order is the canonical one): the light-branch-first search and, when
    ``tied`` (reader groups of parameters shared between nodes that may sit on different
    stages, largest first) moves anything, :func:`tied_early_order`.

    Example:
        >>> sorted(warm_orders([(), (0,), (1,)], [1.0, 1.0, 1.0], names="abc"))
        ['light-first']
    """
    out = {"light-first": canonical_order(preds, weight, names=names, colocate=colocate,
                                          heavy_first=False)}
    early = tied_early_order(preds, tied)
    if np.any(early != np.arange(len(preds))):
        out["tied-early"] = early
    return out


#: Later readers of shared parameters that :func:`tied_early_order` tries to move at most (each
#: try is linear in the graph's size; the largest parameters come first).
_TIED_TRIES = 16


def tied_early_order(preds: Sequence[Sequence[int]], tied: Sequence[Sequence[int]]
                     ) -> np.ndarray:
    """The canonical order (``preds``' own indexing) with the later readers of each shared
    parameter moved up to its first reader, each with the work that follows from it without
    the nodes it was moved over (Note [canonical order], the ``tied-early`` warm start).

    A parameter read by an early and a late node (T5's embedding, read by the encoder's and the
    decoder's embedding lookups) costs its state on both stages unless both readers share one.
    The canonical order puts the decoder's lookup, which reads only the inputs, right before the
    decoder, so no contiguous split puts it on the encoder's first stage. Here each later
    reader ``r`` of ``tied[i]`` (in the order given, the first ``_TIED_TRIES``) moves right after
    the first reader ``f`` together with every node that follows from ``r`` without reading
    anything between ``f`` and ``r`` (and what those need): T5-small's decoder embedding and
    its first self-attention block. A reader that depends on the nodes in between stays.

    Example:
        >>> # 0 -> 1 -> 2 is the trunk; 3 reads the parameter that 0 reads, 4 follows from 3.
        >>> tied_early_order([(), (0,), (1,), (), (3,), (2, 4)], [(0, 3)]).tolist()
        [0, 3, 4, 1, 2, 5]
    """
    order = list(range(len(preds)))
    later = [(min(readers), r) for readers in tied for r in sorted(set(readers))[1:]]
    for first, r in later[:_TIED_TRIES]:
        moved = _follows_alone(preds, order, first, r)
        if moved:
            rest = [v for v in order if v not in moved]
            at = rest.index(first) + 1
            order = rest[:at] + [v for v in order if v in moved] + rest[at:]
    return np.asarray(order, dtype=np.int64)


def _follows_alone(preds: Sequence[Sequence[int]], order: list[int], first: int, r: int
                   ) -> set[int]:
    """The nodes of ``order`` from ``r`` on that follow from ``r`` and read nothing between
    ``first`` and ``r`` (directly or not), with the nodes after ``first`` they need; empty if
    ``r`` itself reads something in between."""
    pos = {v: i for i, v in enumerate(order)}
    if pos[r] <= pos[first] + 1:
        return set()
    between = set(order[pos[first] + 1:pos[r]])
    tainted: set[int] = set()
    for v in order[pos[r]:]:
        if any(u in between or u in tainted for u in preds[v]):
            tainted.add(v)
    if r in tainted:
        return set()
    follow = {r}
    for v in order[pos[r] + 1:]:
        if v not in tainted and any(u in follow for u in preds[v]):
            follow.add(v)
    need = set(follow)
    for v in reversed(order[pos[r]:]):
        if v in need:
            need.update(u for u in preds[v] if pos[u] > pos[first])
    return need
