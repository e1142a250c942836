"""Coarsening: group op nodes into units that the ILP assigns as wholes.

Note [coarsening]
~~~~~~~~~~~~~~~~~
A flat ILP over thousands of ops is too slow, so the ILP first assigns *units*: the nodes of one
module at a chosen depth of the module hierarchy (:func:`modelparallel.ir.module_groups`, which
keeps the quotient graph acyclic), after which chains are contracted: a unit is merged into its
neighbour across an edge ``A -> B`` when ``A`` has no other successor or ``B`` no other
predecessor (such a merge cannot create a cycle) and the merged unit stays small (at most
``max_share`` of a stage's fair share of compute). A unit whose nodes have no common feasible
stage (pins on both sides of it) is split into single nodes. The automatic depth is the
shallowest one giving at least ``4 p`` units. Refinement then revisits the units next to each
stage boundary op by op (:mod:`modelparallel.partitioner.refine`).

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(transformer_graph(8), PlanConfig(partitions=2), "h100")
    >>> units = make_units(prob, 3)
    >>> len(units) < prob.n
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from modelparallel.ir import module_groups
from modelparallel.partitioner.problem import Problem

__all__ = ["Units", "auto_depth", "make_units", "singletons", "unit_order"]


@dataclass(frozen=True, eq=False)
class Units:
    """A partition of the assigned nodes into units whose quotient graph is a DAG.

    Attributes:
        members: Node indices of each unit, sorted.
        unit_of: Unit index of every node, ``(n,)``.
        depth: Module depth the units came from (0: single nodes).
        lo: Smallest feasible stage of each unit.
        hi: Largest feasible stage of each unit.
    """

    members: tuple[np.ndarray, ...]
    unit_of: np.ndarray
    depth: int
    lo: np.ndarray
    hi: np.ndarray

    def __post_init__(self) -> None:
        assert len(self.lo) == len(self.hi) == len(self.members)

    def __len__(self) -> int:
        return len(self.members)


def _max_depth(prob: Problem) -> int:
    return max((len(prob.graph.node(x).module_path.split(".")) for x in prob.names
                if prob.graph.node(x).module_path), default=0)


def auto_depth(prob: Problem, min_units: int | None = None) -> int:
    """The shallowest module depth giving at least ``min_units`` (default ``4 p``) groups."""
    target = min(prob.n, min_units if min_units is not None else 4 * prob.p)
    deepest = _max_depth(prob)
    for d in range(1, deepest + 1):
        if len(set(module_groups(prob.graph, d, prob.names).values())) >= target:
            return d
    return deepest


def singletons(prob: Problem) -> Units:
    """Every node its own unit (the op level)."""
    members = tuple(np.array([i]) for i in range(prob.n))
    return Units(members=members, unit_of=np.arange(prob.n), depth=0, lo=prob.lo.copy(),
                 hi=prob.hi.copy())


def make_units(prob: Problem, depth: int, *, contract: bool = True,
               max_share: float = 0.5, innermost: bool = False) -> Units:
    """Units at module ``depth`` (Note [coarsening]); ``depth=0`` gives single nodes;
    ``innermost=True``: each node's innermost module (``depth`` ignored; Note [layer
    granularity] in ``methods.py``)."""
    if innermost:
        depth = max(_max_depth(prob), 1)
    elif depth <= 0:
        return singletons(prob)
    groups = module_groups(prob.graph, depth, prob.names, innermost=innermost)
    keys: dict[str, int] = {}
    label = np.empty(prob.n, dtype=np.int64)
    for i, name in enumerate(prob.names):
        label[i] = keys.setdefault(groups[name], len(keys))
    label = _split_infeasible(prob, label)
    if contract:
        work = prob.time.min(axis=1)
        limit = max_share * float(work.sum()) / prob.p
        label = _contract(prob, label, work, limit)
    return _finish(prob, label, depth)


def _split_infeasible(prob: Problem, label: np.ndarray) -> np.ndarray:
    """Split units whose nodes have no common feasible stage into single nodes."""
    label = label.copy()
    k = int(label.max()) + 1 if len(label) else 0
    lo = np.full(k, -1)
    hi = np.full(k, 1 << 30)
    np.maximum.at(lo, label, prob.lo)
    np.minimum.at(hi, label, prob.hi)
    nxt = k
    for u in np.nonzero(lo > hi)[0]:
        for i in np.nonzero(label == u)[0]:
            label[i] = nxt
            nxt += 1
    return label


def _contract(prob: Problem, label: np.ndarray, work: np.ndarray, limit: float) -> np.ndarray:
    """Merge units along edges that are their producer's only out-edge or consumer's only
    in-edge, while the merged unit's compute stays within ``limit`` and stages stay feasible."""
    parent = list(range(int(label.max()) + 1))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    k = len(parent)
    size = np.zeros(k)
    np.add.at(size, label, work)
    lo = np.full(k, -1)
    hi = np.full(k, 1 << 30)
    np.maximum.at(lo, label, prob.lo)
    np.minimum.at(hi, label, prob.hi)
    size_l, lo_l, hi_l = size.tolist(), lo.tolist(), hi.tolist()
    succ: list[set[int]] = [set() for _ in range(k)]
    pred: list[set[int]] = [set() for _ in range(k)]
    for u, v in zip(label[prob.edge_src].tolist(), label[prob.edge_dst].tolist()):
        if u != v:
            succ[u].add(v)
            pred[v].add(u)
    changed = True
    while changed:
        changed = False
        for a in range(k):
            if find(a) != a:
                continue
            for b in sorted(succ[a]):
                if len(succ[a]) != 1 and len(pred[b]) != 1:
                    continue
                if size_l[a] + size_l[b] > limit or max(lo_l[a], lo_l[b]) > min(hi_l[a], hi_l[b]):
                    continue
                # Merge b into a.
                parent[b] = a
                size_l[a] += size_l[b]
                lo_l[a], hi_l[a] = max(lo_l[a], lo_l[b]), min(hi_l[a], hi_l[b])
                succ[a].discard(b)
                for c in succ[b]:
                    pred[c].discard(b)
                    if c != a:
                        pred[c].add(a)
                        succ[a].add(c)
                for c in pred[b]:
                    succ[c].discard(b)
                    if c != a:
                        succ[c].add(a)
                        pred[a].add(c)
                pred[a].discard(a)
                succ[a].discard(a)
                succ[b], pred[b] = set(), set()
                changed = True
                break
    roots = np.array([find(a) for a in range(k)])
    return roots[label]


def _finish(prob: Problem, label: np.ndarray, depth: int) -> Units:
    uniq, dense = np.unique(label, return_inverse=True)
    k = len(uniq)
    order = np.argsort(dense, kind="stable")
    bounds = np.searchsorted(dense[order], np.arange(k + 1))
    members = tuple(np.sort(order[bounds[u]: bounds[u + 1]]) for u in range(k))
    # Renumber units by their first node so unit indices follow the topological order roughly.
    first = np.array([m[0] for m in members])
    perm = np.argsort(first, kind="stable")
    members = tuple(members[u] for u in perm)
    unit_of = np.empty(prob.n, dtype=np.int64)
    for u, m in enumerate(members):
        unit_of[m] = u
    lo = np.array([int(prob.lo[m].max()) for m in members], dtype=np.int64)
    hi = np.array([int(prob.hi[m].min()) for m in members], dtype=np.int64)
    return Units(members=members, unit_of=unit_of, depth=depth, lo=lo, hi=hi)


def unit_order(prob: Problem, units: Units) -> tuple[np.ndarray, np.ndarray]:
    """A topological order of the nodes with every unit contiguous, and the cut positions at
    unit boundaries (for the DP over units)."""
    q = nx.DiGraph()
    q.add_nodes_from(range(len(units)))
    uo = units.unit_of
    for u, v in zip(uo[prob.edge_src].tolist(), uo[prob.edge_dst].tolist()):
        if u != v:
            q.add_edge(u, v)
    seq = list(nx.lexicographical_topological_sort(q, key=lambda u: int(units.members[u][0])))
    order = np.concatenate([units.members[u] for u in seq]) if seq else np.zeros(0, np.int64)
    allowed = np.zeros(prob.n + 1, dtype=bool)
    allowed[np.cumsum([0, *[len(units.members[u]) for u in seq]])] = True
    return order.astype(np.int64), allowed
