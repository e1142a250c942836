"""Exact problem reduction: attach free nodes to a neighbour without losing any optimum.

Note [exact reduction]
~~~~~~~~~~~~~~~~~~~~~~
Traced graphs hold many *free* nodes: views, transposes, slices, reshapes and the like, whose
cost (Note [stage time and memory] in :mod:`~modelparallel.partitioner.problem`) is nothing but
the bytes of their value when it crosses a boundary (no compute on any device, nothing saved,
no parameters). A free node ``v`` that is not pinned and not the output is *attached* to a
neighbour, so that it always shares that neighbour's stage, when one of these holds:

- (into its producer) ``v`` has exactly one assigned producer ``u``, ``v`` is ``u``'s only
  consumer, ``comm[v, b] <= comm[u, b]`` on every boundary ``b``, ``out_bytes[v] <=
  out_bytes[u]`` and ``sent[v] <= sent[u]``;
- (into its consumer) ``v`` has exactly one consumer ``c``, and on every boundary the summed
  ``comm`` (and ``out_bytes``, and ``sent``) of ``v``'s producers is at most ``v``'s own.

In both cases ``workspace[v]`` must be at most the largest workspace of a node already in the
neighbour's group, so the stage's peak workspace cannot grow.

Attaching loses nothing: take any valid assignment and move ``v`` to its neighbour's stage. The
move respects the pipeline order (``v``'s only producer, or only consumer, is that neighbour),
changes no stage's compute, saved activations, parameters or peak workspace, and on each
boundary it can only replace values that crossed by values that are no larger: into the
producer, ``v`` now crosses exactly where ``u`` crossed because of ``v``; into the consumer,
``v`` no longer crosses the boundaries between it and ``c``, and its producers cross at most
those. The bytes a sending stage holds (``sent``, Note [sent values held] in
``modelparallel/cost_model/costs.py``) are replaced the same way, by no larger ones. Under
direct sends (Note [pipeline order]) the comparisons are of ``link`` on every stage, and
attaching into the producer needs ``v`` to have one consumer, or nothing to send: otherwise
``u``'s stage, which sent ``u`` once, would send ``v`` to each stage that reads it. Attaching
into the consumer needs ``v`` to be the only consumer of each of its producers: otherwise a
producer already sent to ``v``'s stage for another reader would also be sent to ``c``'s, a
second send charged to the producer's stage, which did not pay for ``v``'s. So every stage's
time and memory, hence the objective (Note [objective]), do not grow.
Attachments are made one at a time, each moving a node that nothing has been attached to yet,
so the argument applies to every assignment that honours the earlier ones: the best assignment
of the reduced problem is a best assignment of the original one, and a lower bound proven on the
reduced problem (Note [lower bound]) holds for the original. The op-level ILP (Note [ILP
pipeline]) therefore assigns the groups of this reduction, which removes a large share of the
nodes and about as many of the ILP's binaries (figures: ``docs/measurements.md``).

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(transformer_graph(2), PlanConfig(partitions=2), "h100")
    >>> len(reduce_free_nodes(prob).units) < prob.n
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelparallel.partitioner.coarsen import Units
from modelparallel.partitioner.problem import Problem

__all__ = ["Reduction", "reduce_free_nodes"]


class _Groups:
    """Union-find over node indices with the largest workspace of each group."""

    def __init__(self, prob: Problem) -> None:
        self.parent = list(range(prob.n))
        self.ws = prob.workspace.astype(float).tolist()
        self.size = [1] * prob.n

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def attach(self, v: int, host: int) -> None:
        r = self.find(host)
        self.parent[v] = r
        self.size[r] += 1
        self.ws[r] = max(self.ws[r], self.ws[v])


def _free_nodes(prob: Problem) -> np.ndarray:
    free = (prob.time.max(axis=1, initial=0.0) <= 0.0) & (prob.saved <= 0.0)
    free &= prob.single_param_state.max(axis=1, initial=0.0) <= 0.0
    for q in prob.params:
        free[list(q.readers)] = False
    free[prob.output] = False
    for v in prob.pinned:
        free[v] = False
    return free


def _try_attach(prob: Problem, groups: _Groups, v: int) -> bool:
    comm, out, sent = (prob.link if prob.direct else prob.comm), prob.out_bytes, prob.sent
    producers, consumers = prob.producers[v], set(prob.consumers[v])
    ws_v = float(prob.workspace[v])
    fans_out = prob.direct and len(consumers) > 1 and bool(np.any(comm[v] > 0))
    if len(set(producers)) == 1 and not fans_out:
        u = producers[0]
        if (set(prob.consumers[u]) == {v} and np.all(comm[v] <= comm[u])
                and out[v] <= out[u] and sent[v] <= sent[u]
                and ws_v <= groups.ws[groups.find(u)]):
            groups.attach(v, u)
            return True
    ps = sorted(set(producers))
    shared = prob.direct and any(set(prob.consumers[q]) != {v} for q in ps)
    if len(consumers) == 1 and not shared:
        c = next(iter(consumers))
        if (np.all(comm[ps].sum(axis=0) <= comm[v]) and float(out[ps].sum()) <= out[v]
                and float(sent[ps].sum()) <= sent[v] and ws_v <= groups.ws[groups.find(c)]):
            groups.attach(v, c)
            return True
    return False


@dataclass(frozen=True, eq=False)
class Reduction:
    """The groups of Note [exact reduction].

    Attributes:
        units: The groups as :class:`~modelparallel.partitioner.coarsen.Units` (depth 0); their
            ``lo``/``hi`` are the members' common stages.
        anchor: Per node, the node its group follows (itself for nodes nothing was attached
            to and for the anchors), ``(n,)``.
    """

    units: Units
    anchor: np.ndarray

    def __post_init__(self) -> None:
        assert len(self.anchor) == len(self.units.unit_of)

    def follow(self, stage: np.ndarray) -> np.ndarray:
        """``stage`` with every attached node moved to its anchor's stage: still valid and no
        worse (Note [exact reduction])."""
        return np.asarray(stage)[self.anchor]

    def unit_stage(self, stage: np.ndarray) -> np.ndarray:
        """The stage of every group under :meth:`follow` of ``stage``."""
        return np.asarray(stage)[self.anchor[[int(m[0]) for m in self.units.members]]]


def reduce_free_nodes(prob: Problem) -> Reduction:
    """Attach every free node where it loses nothing (Note [exact reduction]).

    Example:
        >>> import numpy as np
        >>> from modelparallel.partitioner._synthetic import transformer_graph
        >>> from modelparallel.partitioner.problem import build_problem
        >>> from modelparallel.plan import PlanConfig
        >>> prob = build_problem(transformer_graph(2), PlanConfig(partitions=2), "h100")
        >>> red = reduce_free_nodes(prob)
        >>> len(red.units) < prob.n
        True
        >>> moved = red.follow(np.minimum(np.arange(prob.n) * 2 // prob.n, 1))
        >>> bool(np.all(moved[prob.edge_src] <= moved[prob.edge_dst]))
        True
    """
    free = _free_nodes(prob)
    groups = _Groups(prob)
    pending = [int(v) for v in np.nonzero(free)[0]]
    for _ in range(2):  # a second sweep catches nodes whose neighbour's group grew
        left = []
        for v in pending:
            if groups.size[groups.find(v)] == 1 and _try_attach(prob, groups, v):
                continue
            left.append(v)
        if len(left) == len(pending):
            break
        pending = left
    label = np.array([groups.find(a) for a in range(prob.n)], dtype=np.int64)
    _, first, dense = np.unique(label, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # groups by first node
    dense = rank[dense]
    by = np.argsort(dense, kind="stable")
    cuts = np.searchsorted(dense[by], np.arange(len(first) + 1))
    members = tuple(by[cuts[u]: cuts[u + 1]] for u in range(len(first)))
    lo = np.array([int(prob.lo[m].max()) for m in members], dtype=np.int64)
    hi = np.array([int(prob.hi[m].min()) for m in members], dtype=np.int64)
    units = Units(members=members, unit_of=dense.astype(np.int64), depth=0, lo=lo, hi=hi)
    return Reduction(units=units, anchor=label)
