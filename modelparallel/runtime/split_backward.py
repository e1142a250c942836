"""A stage's backward in two halves: input gradients now, weight gradients later (ZB schedules).

Note [split backward] in ``modelparallel/schedule/__init__.py`` says what the halves are for.
:func:`backward_input` runs ``torch.autograd.grad`` from the stage's outputs (or loss) to the
received tensors only, so autograd skips every weight-gradient product; on the way it saves,
with node pre-hooks, the gradients arriving at the autograd nodes where a parameter's gradient
path leaves the input-gradient path. :func:`backward_weight` later runs autograd from those
saved gradients to the parameters, accumulating into ``.grad`` as a backward does. Each node's backward thus
runs once in total (the nodes on the input path in ``I``, the rest in ``W``), as in
``torch.distributed.pipelining``'s zero-bubble stages; a parameter whose gradient path never
meets the input path (stage 0, which receives nothing; a branch of the stage that does not
depend on what it received) is reached from the stage's outputs themselves in ``W``.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> y = lin(x)
    >>> g = torch.ones_like(y)
    >>> (dx,), pending = backward_input([y], [g], [x], list(lin.parameters()))
    >>> lin.weight.grad is None
    True
    >>> backward_weight(pending)
    >>> torch.allclose(lin.weight.grad, g.T @ x.detach()), torch.allclose(dx, g @ lin.weight)
    (True, True)
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node

__all__ = ["PendingWeightGrad", "backward_input", "backward_weight"]


@dataclass
class _Group:
    """Parameters whose gradient paths meet the input path at the same nodes."""

    meet: set[Node] = field(default_factory=set)
    params: list[tuple[torch.Tensor, Node]] = field(default_factory=list)
    edges: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)
    clamps: list[tuple[Node, tuple[Any, ...]]] = field(default_factory=list)


@dataclass
class PendingWeightGrad:
    """What :func:`backward_weight` needs: per group of parameters, the saved gradients to
    start from and the parameters they reach.

    One autograd call per group (the parameters of one layer, typically) reaches only that
    group's parameters, so no input-path gradient is computed twice; within a group, a node
    whose gradient was saved gets exactly the saved one (so a gradient saved at a node and one
    saved at its descendant are not counted twice).

    Attributes:
        groups: The groups.
    """

    groups: list[_Group] = field(default_factory=list)


def backward_input(roots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
                   ) -> tuple[list[torch.Tensor | None], PendingWeightGrad]:
    """Gradients of ``inputs`` from ``roots`` (with ``grads``), keeping the weight part for later.

    Args:
        roots: The stage's sent tensors that get gradients back, or its (scaled) loss.
        grads: The gradient of each root (``None``: ones, for a loss).
        inputs: The received tensors (autograd leaves that require grad).
        params: The stage's parameters that require grad.

    Returns:
        The gradient of each input (``None`` if it does not reach it) and what
        :func:`backward_weight` runs.
    """
    live = [(r, g if g is not None else torch.ones_like(r)) for r, g in zip(roots, grads)
            if r.requires_grad]
    root_nodes = [n for n in (_node(r) for r, _ in live) if n is not None]
    input_nodes = [n for n in (_node(t) for t in inputs) if n is not None]
    param_nodes = {id(p): _node(p) for p in params if p.requires_grad}
    reverse = _reverse_edges(root_nodes)
    on_input_path = _upward(input_nodes, reverse, stop=set())
    groups = _groups([(p, param_nodes.get(id(p))) for p in params], reverse, on_input_path,
                     set(root_nodes))
    meet: set[Node] = set().union(*(g.meet for g in groups)) if groups else set()
    saved: dict[Node, tuple[Any, ...]] = {}
    handles = []
    for node in meet & on_input_path:
        def hook(grad_outputs: tuple[Any, ...], node: Node = node) -> None:
            saved[node] = tuple(grad_outputs)
        handles.append(node.register_prehook(hook))
    got: Sequence[torch.Tensor | None]
    try:
        if live and inputs:
            got = torch.autograd.grad([r for r, _ in live], list(inputs),
                                      [g for _, g in live], retain_graph=True,
                                      allow_unused=True)
        else:
            got = [None] * len(inputs)
    finally:
        for h in handles:
            h.remove()
    root_edges = [(r, g) for r, g in live if _node(r) not in saved]  # not run through by I
    for group in groups:
        for node in group.meet:
            if node in saved:
                group.clamps.append((node, saved[node]))
                group.edges += [(GradientEdge(node, k), g) for k, g in enumerate(saved[node])
                                if g is not None]
        group.edges += [(torch.autograd.graph.get_gradient_edge(r), g) for r, g in root_edges
                        if _node(r) in group.meet]
    return list(got), PendingWeightGrad([g for g in groups if g.edges])


def backward_weight(pending: PendingWeightGrad) -> None:
    """Add the parameters' gradients that :func:`backward_input` deferred to their ``.grad``."""
    for k, group in enumerate(pending.groups):
        handles = [node.register_prehook(lambda _g, outs=outs: outs)
                   for node, outs in group.clamps] if len(group.clamps) > 1 else []
        try:  # groups may share nodes below their meeting points: keep the graph until the last
            torch.autograd.backward([e for e, _ in group.edges], [g for _, g in group.edges],
                                    retain_graph=k < len(pending.groups) - 1,
                                    inputs=[p for p, _ in group.params])
        finally:
            for h in handles:
                h.remove()
    pending.groups.clear()


def _node(t: torch.Tensor) -> Node | None:
    """``t``'s autograd node: its ``grad_fn``, or for a leaf its gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    view = t.view_as(t)
    assert view.grad_fn is not None
    return view.grad_fn.next_functions[0][0]


def _reverse_edges(roots: list[Node]) -> dict[Node, list[Node]]:
    """For every node reachable from ``roots``, the nodes that feed it gradients."""
    reverse: dict[Node, list[Node]] = collections.defaultdict(list)
    seen = set(roots)
    queue = collections.deque(roots)
    for r in roots:
        reverse.setdefault(r, [])
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            reverse[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return reverse


def _upward(starts: list[Node], reverse: dict[Node, list[Node]], stop: set[Node]) -> set[Node]:
    """Every node from which one of ``starts`` is reached (``starts`` included)."""
    found = {n for n in starts if n in reverse}
    queue = collections.deque(found)
    while queue:
        for up in reverse.get(queue.popleft(), ()):
            if up not in found and up not in stop:
                found.add(up)
                queue.append(up)
    return found


def _groups(params: list[tuple[torch.Tensor, Node | None]], reverse: dict[Node, list[Node]],
            stops: set[Node], roots: set[Node]) -> list[_Group]:
    """The parameters reached from the graph, grouped by shared meeting nodes."""
    groups: list[_Group] = []
    owner: dict[Node, _Group] = {}
    for p, node in params:
        if node is None or node not in reverse:
            continue  # not used by this microbatch's graph
        meet = _meeting(node, reverse, stops, roots)
        found = list({id(owner[n]): owner[n] for n in meet if n in owner}.values())
        group = found[0] if found else _Group()
        if not found:
            groups.append(group)
        for other in found[1:]:  # merge groups that share a meeting node
            group.meet |= other.meet
            group.params += other.params
            groups.remove(other)
        group.meet |= meet
        group.params.append((p, node))
        for n in group.meet:
            owner[n] = group
    return groups


def _meeting(start: Node, reverse: dict[Node, list[Node]], stops: set[Node],
             roots: set[Node]) -> set[Node]:
    """Walking up from ``start`` toward the roots: the first nodes of ``stops`` met (nodes on
    the input path, whose whole gradient ``I`` saves), and every root passed on the way (whose
    own gradient is known, but which may also get gradients from other roots above it)."""
    met: set[Node] = set()
    seen = {start}
    queue = collections.deque([start])
    while queue:
        for up in reverse.get(queue.popleft(), ()):
            if up in seen:
                continue
            seen.add(up)
            if up in stops:
                met.add(up)
                continue
            if up in roots:
                met.add(up)
            queue.append(up)
    return met
