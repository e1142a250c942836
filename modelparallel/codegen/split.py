"""Which nodes each stage computes, reads from the batch, receives and sends.

This is the analysis half of codegen: it reads the traced module and the plan and decides, for
every stage, the lists that :mod:`modelparallel.codegen.build` turns into a graph module. It
builds nothing and touches no tensor.

Note [stage contents]
~~~~~~~~~~~~~~~~~~~~~
Every node of the traced ``torch.fx`` module falls in one of four classes:

- a *placeholder* (a flat model input): every rank holds the whole batch (Note [inputs on every
  rank] in ``modelparallel/partitioner/problem.py``), so a stage that needs an input reads it
  locally; inputs are never sent;
- an *input-derived* node (plan stage ``-1``, see :func:`modelparallel.ir.input_derived_nodes`):
  recomputed from the inputs on every stage that needs it, never sent;
- a *parameter read* (a ``get_attr`` node that is no IR node): copied into every stage whose
  nodes read it, or whose recomputed nodes do (a constant buffer, Note [constant buffers] in
  ``modelparallel/ir/analysis.py``), together with the tensor it reads;
- every other node runs on the stage the plan gives it; the output node runs on the last stage.

How a value produced on stage ``i`` and read on later stages travels depends on the plan's
``communication`` (Note [direct communication] and Note [relay communication] in
``modelparallel/plan.py``):

- ``"direct"``: stage ``i`` sends it once to each distinct later stage ``j`` that reads it, and
  no stage in between sees it. Stage ``k``'s ``sources`` lists, per producing stage ``i < k``
  (ascending), the values it receives from ``i``; its ``dests``, per reading stage ``j > k``
  (ascending), the values it sends there; only pairs that exchange a value are listed. ``recv``
  is the concatenation of the ``sources`` groups, ``send`` every value sent to some later stage
  once, and each group is in topological order, so ``dests[j]`` of stage ``i`` equals
  ``sources[i]`` of stage ``j``;
- ``"relay"``: stages talk to their neighbours only. A value whose last consumer is on stage
  ``j > i`` is sent by stages ``i .. j-1`` and received by stages ``i+1 .. j``: a stage in
  between receives it and sends it on unchanged. ``send`` of stage ``k`` and ``recv`` of stage
  ``k+1`` are the values whose producer stage is ``<= k`` and whose last consumer stage is
  ``> k``, in topological order; ``sources`` is ``((k-1, recv),)`` and ``dests``
  ``((k+1, send),)`` (also when empty: every neighbour pair exchanges a message).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx

from modelparallel.errors import ConfigError, PlanFormatError
from modelparallel.ir import Graph, IRFormatError, OpKind, input_derived_nodes, recomputed_nodes
from modelparallel.plan import Plan
from modelparallel.plan_config import COMMUNICATION_CHOICES
from modelparallel.tracer.traced import TracedModel

__all__ = ["StageSplit", "split_stages"]

#: Home of a node computed wherever needed (placeholders, input-derived nodes, parameter reads).
_EVERYWHERE = -1


@dataclass(frozen=True)
class StageSplit:
    """What one stage computes and exchanges (Note [stage contents]).

    Attributes:
        index: Stage index.
        num_stages: Stages in the pipeline.
        model_inputs: Indices of the flat model inputs the stage reads, ascending.
        own: IR nodes the plan puts on this stage (the output node included on the last
            stage), in topological order.
        recomputed: Input-derived IR nodes the stage recomputes, in topological order.
        attrs: ``get_attr`` nodes (parameter and buffer reads) copied into the stage.
        recv: Values received, grouped by the stage they come from (``sources``).
        send: Values sent to later stages, each once, in topological order.
        params: Canonical names of the parameters and buffers the stage's nodes read.
        sources: ``(stage, values)`` per stage it receives from, ascending.
        dests: ``(stage, values)`` per stage it sends to, ascending.
    """

    index: int
    num_stages: int
    model_inputs: tuple[int, ...]
    own: tuple[str, ...]
    recomputed: tuple[str, ...]
    attrs: tuple[str, ...]
    recv: tuple[str, ...]
    send: tuple[str, ...]
    params: frozenset[str]
    sources: tuple[tuple[int, tuple[str, ...]], ...] = ()
    dests: tuple[tuple[int, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        assert 0 <= self.index < self.num_stages, (self.index, self.num_stages)
        assert self.index > 0 or not self.recv, "stage 0 receives nothing"
        assert not self.is_last or not self.send, "the last stage sends nothing"

    @property
    def is_last(self) -> bool:
        """Whether this is the last stage (which runs the output node)."""
        return self.index == self.num_stages - 1

    @property
    def computed(self) -> frozenset[str]:
        """Every traced-module node the stage evaluates (placeholders and output excluded)."""
        return frozenset(self.attrs) | frozenset(self.recomputed) | frozenset(self.own)


def split_stages(traced: TracedModel, plan: Plan, *,
                 communication: str | None = None) -> tuple[StageSplit, ...]:
    """Decide the contents of every stage of ``plan`` for ``traced`` (Note [stage contents]).

    Args:
        traced: The traced model.
        plan: A plan made for ``traced.graph``.
        communication: ``"direct"`` or ``"relay"`` (Note [direct communication]); ``None``:
            the plan's.

    Returns:
        One :class:`StageSplit` per stage.

    Raises:
        PlanMismatchError: if the plan was made for another graph (fingerprint).
        PlanFormatError: if the plan leaves a node out, breaks pipeline order, puts the output
            off the last stage, or marks a node ``-1`` that is not input-derived.
        IRFormatError: if the traced module and its IR disagree.

    Example:
        >>> import torch
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> traced = trace(model, (torch.randn(2, 4),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> first, second = split_stages(traced, plan)
        >>> first.send == second.recv
        True
    """
    plan.check_graph(traced.graph)
    graph = traced.graph
    p = plan.num_stages
    home = _homes(traced, plan)
    _check_order(traced.gm, home)
    readers = _readers(traced.gm, home)
    if communication is not None and communication not in COMMUNICATION_CHOICES:
        raise ConfigError(f"communication = {communication!r}; use one of "
                          f"{list(COMMUNICATION_CHOICES)} (Note [direct communication])")
    direct = (communication or plan.config.communication) == "direct"
    input_index = {name: i for i, name in enumerate(traced.input_names)}
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    return tuple(_split_one(nodes, graph, home, readers, input_index, k, p, direct)
                 for k in range(p))


def _homes(traced: TracedModel, plan: Plan) -> dict[str, int]:
    """Stage of every traced-module node; ``-1`` for nodes computed wherever needed."""
    graph, p = traced.graph, plan.num_stages
    assignment = plan.assignment
    derived = input_derived_nodes(graph)
    home: dict[str, int] = {}
    for node in traced.gm.graph.nodes:
        name = node.name
        if name not in graph:
            if node.op != "get_attr":
                raise IRFormatError(
                    f"the traced module has node {name!r} ({node.op}) that is not in its IR "
                    "graph; only get_attr nodes of parameters may be left out of the IR. "
                    "Re-trace the model with modelparallel.tracer.trace.")
            home[name] = _EVERYWHERE
            continue
        ir = graph.node(name)
        if name not in assignment:
            raise PlanFormatError(
                f"the plan has no placement for node {name!r}; a plan must place every node of "
                "the graph. Rebuild the plan with 'partition-plan build'.")
        stage = assignment[name]
        if ir.op is OpKind.PLACEHOLDER:
            home[name] = _EVERYWHERE
        elif ir.op is OpKind.OUTPUT:
            if stage not in (p - 1, _EVERYWHERE):
                raise PlanFormatError(
                    f"the plan puts the output node on stage {stage}; it must be on the last "
                    f"stage ({p - 1}), where the loss is computed")
            home[name] = p - 1
        elif stage == _EVERYWHERE:
            if name not in derived:
                raise PlanFormatError(
                    f"the plan marks node {name!r} as recomputed on every stage (stage -1), but "
                    "it reads parameters, is random, or depends on such a node; only "
                    "input-derived nodes may be recomputed. Give it a stage.")
            home[name] = _EVERYWHERE
        else:
            home[name] = stage
    missing = [n.name for n in graph if n.name not in home]
    if missing:
        raise IRFormatError(
            f"IR nodes {missing[:5]} have no node of the same name in the traced module; the "
            "TracedModel's graph and gm are out of step. Re-trace the model.")
    return home


def _check_order(gm: torch.fx.GraphModule, home: dict[str, int]) -> None:
    """Every producer runs on the consumer's stage or before it; recomputed nodes need only
    recomputable inputs."""
    for node in gm.graph.nodes:
        h = home[node.name]
        for src in node.all_input_nodes:
            hs = home[src.name]
            if h == _EVERYWHERE and hs != _EVERYWHERE:
                raise PlanFormatError(
                    f"node {node.name!r} is recomputed on every stage (stage -1) but reads "
                    f"{src.name!r} from stage {hs}; put both on stages or both on -1")
            if hs != _EVERYWHERE and hs > h:
                raise PlanFormatError(
                    f"node {node.name!r} on stage {h} reads {src.name!r} from the later stage "
                    f"{hs}; values flow only to the same or later stages. Fix the assignment "
                    "(the partitioner never produces this).")


def _readers(gm: torch.fx.GraphModule, home: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """For every node placed on a stage, the later stages that read its value, ascending."""
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        h = home[node.name]
        if h == _EVERYWHERE:
            continue
        out[node.name] = tuple(sorted({home[u.name] for u in node.users} - {h}))
        assert all(r > h for r in out[node.name])
    return out


def _split_one(nodes: dict[str, torch.fx.Node], graph: Graph, home: dict[str, int],
               readers: dict[str, tuple[int, ...]], input_index: dict[str, int], k: int,
               p: int, direct: bool) -> StageSplit:
    order = {name: i for i, name in enumerate(nodes)}
    own = [name for name in nodes if home[name] == k]
    # What the stage recomputes: Note [recomputed nodes] in modelparallel/ir/analysis.py, the walk the
    # cost model charges too. The IR leaves out the get_attr nodes of tensors (they are
    # ``params``), which the stage reads as attributes.
    everywhere = {n.name for n in graph if home[n.name] == _EVERYWHERE}
    needed = set(recomputed_nodes(graph, own, everywhere))
    attrs = {src.name for name in (*own, *needed) for src in nodes[name].all_input_nodes
             if src.name not in graph and src.op == "get_attr"}
    placeholders = {n for n in needed if nodes[n].op == "placeholder"}
    recomputed = needed - placeholders
    for name in placeholders:
        if name not in input_index:
            raise IRFormatError(
                f"placeholder {name!r} of the traced module is not among its input_names "
                f"{list(input_index)}")
    if direct:
        groups = [(i, _sorted((v for v, rs in readers.items() if home[v] == i and k in rs),
                              order)) for i in range(k)]
        sources = tuple((i, vs) for i, vs in groups if vs)
        send = _sorted((v for v, rs in readers.items() if home[v] == k and rs), order)
        dests = tuple((j, vs) for j in range(k + 1, p)
                      if (vs := tuple(v for v in send if j in readers[v])))
        recv = tuple(v for _, vs in sources for v in vs)
    else:
        last = {v: max(rs, default=home[v]) for v, rs in readers.items()}
        recv = _sorted((v for v, lu in last.items() if home[v] < k <= lu), order)
        send = _sorted((v for v, lu in last.items() if home[v] <= k < lu), order)
        sources = ((k - 1, recv),) if k > 0 else ()
        dests = ((k + 1, send),) if k < p - 1 else ()
    params: set[str] = set()
    for name in own:
        if name in graph:
            params.update(graph.node(name).params)
    return StageSplit(
        index=k,
        num_stages=p,
        model_inputs=tuple(sorted(input_index[n] for n in placeholders)),
        own=_sorted(own, order),
        recomputed=_sorted(recomputed, order),
        attrs=_sorted(attrs, order),
        recv=recv,
        send=send,
        params=frozenset(params),
        sources=sources,
        dests=dests,
    )


def _sorted(names: Iterable[str], order: dict[str, int]) -> tuple[str, ...]:
    return tuple(sorted(names, key=order.__getitem__))
