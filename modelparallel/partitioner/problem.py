"""The partitioning problem: what is assigned, what it costs, and what the objective is.

:func:`build_problem` turns a graph, a :class:`~modelparallel.plan.PlanConfig`, the devices and
their per-node costs into a :class:`Problem`: flat numpy arrays indexed by the *assigned* nodes
(in topological order) that every method (ILP, DP, baselines, bounds) and the single evaluation
function (:mod:`modelparallel.partitioner.evaluate`) read. The modelling decisions are the notes
below; other modules point here.

Note [inputs on every rank]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of a pipeline holds the whole input batch. Placeholders and the nodes computed from
inputs alone (:func:`modelparallel.ir.input_derived_nodes`: attention masks, position ids,
shapes, and what constant buffers give, such as rotary cosines and sines: Note [constant
buffers] in ``modelparallel/ir/analysis.py``) are therefore *not assigned*: their
:class:`~modelparallel.plan.NodePlacement` has stage ``-1``, every stage that needs them
recomputes them (codegen copies them in), and they cost no communication. Their compute is not
charged to any stage in the sums the solvers optimise (it is small by construction: no
parameters); where measured host times let the evaluation replay each stage (Note [stage
replay] in ``modelparallel/cost_model/replay.py``), a stage's replay includes the ones it
recomputes, whose many small ops can cost host time.

Note [tied parameters]
~~~~~~~~~~~~~~~~~~~~~~
A parameter may be read by several nodes (tied weights such as GPT-2's ``wte``/``lm_head``,
or a weight used twice). With ``config.tied == "replicate"`` (the default) every stage that runs
a reader holds its own copy: its ``param_state_bytes`` (value, gradient, optimizer state) count
on each of those stages, and the runtime sums the copies' gradients after backward so they stay
equal. :attr:`Plan.shared_params <modelparallel.plan.Plan.shared_params>` lists each such
parameter with its stages. With ``"colocate"`` all readers of a parameter must share one stage
(equality constraints in the ILP, forbidden cuts in the DP), so nothing is replicated. A
parameter read by one node needs no extra variables either way.

Note [pipeline order]
~~~~~~~~~~~~~~~~~~~~~
Every assigned node goes to one of ``p`` stages, and for every edge ``u -> v`` between assigned
nodes ``stage(u) <= stage(v)``: values only flow forward through the pipeline. The output node
is on the last stage (the loss is computed there). How a value that skips stages travels is
``config.communication``:

- ``"direct"`` (the default, Note [direct communication] in ``modelparallel/plan.py``): the
  producing stage sends the value once to each distinct later stage that reads it, and each of
  those stages receives it once. A value of node ``u`` on stage ``a`` read on the stages ``D(u)``
  (``a`` excluded) costs stage ``a`` ``|D(u)| * link[u, a]`` and every ``d`` in ``D(u)``
  ``link[u, d]``, where ``link[u, s] = transfer_time(output_bytes) + transfer_time(grad_bytes)``
  (forward value, backward gradient) on stage ``s``'s device: each stage pays for its own
  traffic on its own link.
- ``"relay"`` (Note [relay communication] in ``modelparallel/plan.py``): it crosses every
  boundary ``b`` (between stages ``b`` and ``b + 1``) with ``stage(u) <= b <
  max(stage(consumers))``, and crossing boundary ``b`` costs ``comm[u, b] = link[u, b]`` (the
  sending stage's link) on *both* stage ``b`` and stage ``b + 1``. Stages may be empty (they
  still relay what crosses them).

Pins (``config.pins``) fix nodes to stages: a key is a node name, or a module path that matches
every node whose ``module_path`` equals it or starts with it followed by ``"."``. An exact node
name beats a module path, and a longer module path beats a shorter one. Pins on input-derived
nodes are refused (those nodes run on every stage that needs them).

Note [stage time and memory]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Per microbatch, stage ``s`` takes ``T_s = sum(forward_time + backward_time of its nodes on device
s) + its communication time`` (Note [pipeline order]). At its peak it holds ``M_s =
sum(param_state_bytes of the parameters it holds) + inflight_s * (sum(saved_bytes of its nodes) +
bytes of the values it receives + sent_held_bytes of the values it computes and sends) +
max(workspace_bytes of its nodes)``, with ``inflight_s = inflight_microbatches(schedule, m, p,
s)``. A stage keeps what it sends until the gradient returns (once, however many stages it
sends a value to), and a value relayed through it is the received tensor passed on, so a value
occupies every stage that receives it or computes and sends it, once (Note [sent values held]
in ``modelparallel/cost_model/costs.py``: the sender's bytes are 0 when the producing op saves
its own output). ``M_s <= memory_bytes`` of the stage's device is a hard constraint.

Note [objective]
~~~~~~~~~~~~~~~~
Following SMP's ``optimize`` / ``memory_weight``, every method minimises::

    J = (1 - w) * max_s T_s / T_ref  +  w * max_s (M_s / cap_s) / U_ref,     w = memory_weight

The normalisers do not depend on the assignment; each term is 1.0 for a perfectly balanced,
communication-free split:

- ``T_ref = 1 / sum_s (1 / W_s)`` where ``W_s`` is the compute time of the whole graph on stage
  ``s``'s device: the time at which stages that each take a share of the work proportional to
  their speed all finish together (``W / p`` for identical devices).
- ``U_ref = M_bal / sum_s cap_s`` with ``M_bal = sum of every parameter's state bytes (once) +
  mean_s(inflight_s) * sum of every node's saved bytes + the largest workspace``: the
  utilisation every device would have if that memory were spread in proportion to capacity.

(Either normaliser falls back to 1 when the graph has no work or no memory.) The reported
:attr:`SolverReport.objective <modelparallel.plan.SolverReport.objective>` is always ``J``
recomputed from the final assignment by :func:`modelparallel.partitioner.evaluate.evaluate`.

Note [virtual stages in the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``virtual_stages = v > 1`` (interleaved 1F1B, Note [virtual stages] in
``modelparallel/schedule/__init__.py``) the problem has ``p * v`` stages and stage ``s`` runs
on rank ``s % p``: it gets that rank's device (its speed and link) and ``1 / v`` of its memory,
so the per-stage memory caps every method enforces imply the rank's cap for the sum of its
stages (conservative when a rank's stages need unequal memory), and the per-stage objective,
bounds and DP stay exact for this model. ``inflight_s`` is the stage's peak in the interleaved
schedule. Balancing the ``p * v`` stages balances the ranks, each of which runs ``v`` of them.

Example:
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(6), PlanConfig(partitions=2), "h100")
    >>> prob.n, prob.p, int(prob.output)
    (7, 2, 6)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from modelparallel.cost_model import (
    DeviceSpec,
    GraphCosts,
    estimate_costs,
)
from modelparallel.cost_model.device import DevicesArg, stage_devices
from modelparallel.errors import ConfigError, InfeasiblePlanError
from modelparallel.ir import Graph, input_derived_nodes
from modelparallel.partitioner.gradient_sync import node_allreduce
from modelparallel.partitioner.memory_features import FeatureArrays, apply_features
from modelparallel.partitioner.order import canonical_order
from modelparallel.plan import PlanConfig
from modelparallel.schedule import inflight_microbatches

__all__ = ["DevicesArg", "ParamInfo", "Problem", "build_problem", "normalize_devices"]



@dataclass(frozen=True)
class ParamInfo:
    """One canonical parameter read by assigned nodes.

    Attributes:
        name: Canonical parameter name.
        readers: Indices (into :attr:`Problem.names`) of the assigned nodes that read it.
        state: Bytes a stage holds for it (value, gradient, optimizer state), per stage.
        nbytes: Bytes of the value alone.
        numel: Elements.
        trainable: Whether it has a gradient and optimizer state.
    """

    name: str
    readers: tuple[int, ...]
    state: tuple[int, ...]
    nbytes: int
    numel: int
    trainable: bool

    def __post_init__(self) -> None:
        assert self.readers, f"parameter {self.name!r} has no reader"


@dataclass(frozen=True, eq=False)
class Problem:
    """The partitioning problem as flat arrays over the assigned nodes.

    Attributes:
        graph: The op-level graph.
        config: The plan options.
        devices: One device per stage.
        costs: One :class:`GraphCosts` per stage (entries may be the same object).
        names: Assigned node names, in the canonical topological order of Note [canonical
            order] in ``modelparallel/partitioner/order.py`` (index = position).
        fwd: Forward seconds, shape ``(n, p)`` (node, stage device).
        bwd: Backward seconds, ``(n, p)``.
        saved: Saved activation bytes, ``(n,)``.
        workspace: Workspace bytes, ``(n,)``.
        out_bytes: Bytes of each node's value, ``(n,)``.
        sent: Bytes the computing stage holds per microbatch when it sends the value (Note
            [sent values held]), ``(n,)``.
        grad_bytes: Bytes of its gradient, ``(n,)``.
        comm: Seconds to move each value across boundary ``b`` (forward + backward, device of
            stage ``b``), shape ``(n, max(p - 1, 1))``: ``link[:, :p - 1]`` (relay).
        link: Seconds to move each value and its gradient over stage ``s``'s link, ``(n, p)``
            (Note [pipeline order]).
        edge_src: Producer index of every edge between assigned nodes.
        edge_dst: Consumer index of every edge.
        params: Parameters read by assigned nodes.
        inflight: Microbatches in flight per stage.
        caps: Memory capacity per stage, bytes.
        lo: Smallest stage each node may take (pins, order, output), ``(n,)``.
        hi: Largest stage each node may take, ``(n,)``.
        pinned: Node index to the stage a pin put it on (the output node included).
        colocate: Groups of node indices that must share a stage (``tied="colocate"``).
        t_ref: Time normaliser (Note [objective]).
        u_ref: Utilisation normaliser (Note [objective]).
        notes: Remarks made while building.
    """

    graph: Graph
    config: PlanConfig
    devices: tuple[DeviceSpec, ...]
    costs: tuple[GraphCosts, ...]
    names: tuple[str, ...]
    fwd: np.ndarray
    bwd: np.ndarray
    saved: np.ndarray
    workspace: np.ndarray
    out_bytes: np.ndarray
    sent: np.ndarray
    grad_bytes: np.ndarray
    comm: np.ndarray
    link: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    params: tuple[ParamInfo, ...]
    inflight: np.ndarray
    caps: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    pinned: Mapping[int, int]
    colocate: tuple[tuple[int, ...], ...]
    t_ref: float
    u_ref: float
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n, p = len(self.names), self.config.num_stages
        assert self.fwd.shape == self.bwd.shape == (n, p)
        assert self.saved.shape == self.workspace.shape == self.out_bytes.shape == (n,)
        assert self.sent.shape == (n,) and np.all(self.sent <= self.out_bytes)
        assert len(self.devices) == len(self.costs) == p == len(self.caps) == len(self.inflight)
        assert self.link.shape == (n, p)
        assert np.all(self.edge_src < self.edge_dst), "edges must follow the topological order"
        assert self.t_ref > 0 and self.u_ref > 0

    # -- sizes and simple views -------------------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of assigned nodes."""
        return len(self.names)

    @property
    def p(self) -> int:
        """Number of stages (``partitions * virtual_stages``, Note [virtual stages] in
        ``modelparallel/schedule/__init__.py``)."""
        return self.config.num_stages

    @property
    def direct(self) -> bool:
        """Whether values go straight to the stages that read them (``communication="direct"``,
        Note [pipeline order]); else they are relayed."""
        return self.config.communication == "direct"

    @property
    def w(self) -> float:
        """The memory weight of the objective."""
        return float(self.config.memory_weight)  # type: ignore[arg-type]

    @property
    def output(self) -> int:
        """Index of the output node (the last assigned node)."""
        return self.n - 1

    @cached_property
    def time(self) -> np.ndarray:
        """Forward plus backward seconds, ``(n, p)``."""
        return self.fwd + self.bwd

    @cached_property
    def index(self) -> dict[str, int]:
        """Node name to index."""
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def homogeneous(self) -> bool:
        """Whether every stage has the same node times and link (one device class)."""
        return bool(np.all(self.time == self.time[:, :1]) and np.all(self.link == self.link[:, :1]))

    @cached_property
    def last_use(self) -> np.ndarray:
        """Index of each node's last consumer (itself when it has none), ``(n,)``."""
        last = np.arange(self.n)
        if len(self.edge_src):
            np.maximum.at(last, self.edge_src, self.edge_dst)
        return last

    @cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        """Consumer indices of each node."""
        return self._grouped(self.edge_src, self.edge_dst)

    @cached_property
    def producers(self) -> tuple[tuple[int, ...], ...]:
        """Producer indices (among assigned nodes) of each node."""
        return self._grouped(self.edge_dst, self.edge_src)

    def _grouped(self, keys: np.ndarray, values: np.ndarray) -> tuple[tuple[int, ...], ...]:
        """Per node index ``i``, the ``values`` of the edges whose ``keys`` is ``i``."""
        out: list[list[int]] = [[] for _ in range(self.n)]
        for k, v in zip(keys.tolist(), values.tolist()):
            out[k].append(v)
        return tuple(tuple(c) for c in out)

    @cached_property
    def single_param_state(self) -> np.ndarray:
        """Per node and stage, the state bytes of parameters read by that node only, ``(n, p)``."""
        out = np.zeros((self.n, self.p))
        for q in self.params:
            if len(set(q.readers)) == 1:
                out[q.readers[0]] += np.asarray(q.state, dtype=float)
        return out

    @cached_property
    def shared(self) -> tuple[ParamInfo, ...]:
        """Parameters read by more than one assigned node."""
        return tuple(q for q in self.params if len(set(q.readers)) > 1)


# -- building ---------------------------------------------------------------------------------------


def normalize_devices(devices: DevicesArg, partitions: int) -> tuple[DeviceSpec, ...]:
    """One :class:`DeviceSpec` per stage from one device or a sequence of them
    (:func:`~modelparallel.cost_model.device.stage_devices`).

    Raises:
        ConfigError: if a sequence does not have one device per stage, or a name is unknown.

    Example:
        >>> [d.name for d in normalize_devices("a100", 2)]
        ['a100', 'a100']
    """
    return stage_devices(devices, partitions)


def _stage_specs(devices: DevicesArg, config: PlanConfig) -> tuple[DeviceSpec, ...]:
    """One spec per stage: stage ``s`` gets rank ``s % partitions``'s device (Note [virtual
    stages in the plan]); a sequence may also give one per stage."""
    ranks, n = config.partitions, config.num_stages
    if n != ranks and isinstance(devices, Sequence) and not isinstance(devices, str) \
            and len(devices) == n:
        return normalize_devices(devices, n)
    per_rank = normalize_devices(devices, ranks)
    return tuple(per_rank[s % ranks] for s in range(n))


def _stage_costs(graph: Graph, config: PlanConfig, devices: tuple[DeviceSpec, ...],
                 costs: Sequence[GraphCosts] | None) -> tuple[GraphCosts, ...]:
    p = config.num_stages
    if costs is None:
        cache: dict[int, GraphCosts] = {}
        out = []
        for d in devices:
            key = next((k for k, c in cache.items() if c.device == d), None)
            if key is None:
                key = len(cache)
                cache[key] = estimate_costs(graph, d, optimizer=config.optimizer)
            out.append(cache[key])
        return tuple(out)
    given = tuple(costs)
    if len(given) == 1:
        given = given * p
    elif len(given) == config.partitions:
        given = tuple(given[s % config.partitions] for s in range(p))
    if len(given) != p:
        raise ConfigError(f"got {len(given)} GraphCosts for {p} partitions; give one per stage")
    for c in given:
        missing = [n.name for n in graph.nodes if n.name not in c.nodes]
        if missing:
            raise ConfigError(
                f"the costs given lack {len(missing)} nodes of the graph (e.g. {missing[:3]}); "
                "compute them with estimate_costs(graph, device) for this graph")
    return given


def _resolve_pins(graph: Graph, config: PlanConfig, index: Mapping[str, int],
                  derived: frozenset[str]) -> dict[int, int]:
    """Node index to pinned stage; exact names beat module paths, longer paths beat shorter."""
    names = {i: name for name, i in index.items()}
    chosen: dict[int, tuple[int, int]] = {}  # node -> (priority, stage)
    for key, stage in config.pins.items():
        if key in derived:
            raise ConfigError(
                f"pin {key!r} names an input-derived node, which every stage recomputes (Note "
                "[inputs on every rank]); pin the nodes that consume it instead")
        if key in index:
            matches = [(index[key], 1 << 30)]
        else:
            matches = [(index[n.name], len(key)) for n in graph.nodes
                       if n.name in index and (n.module_path == key
                                               or n.module_path.startswith(key + "."))]
        if not matches:
            raise ConfigError(
                f"pin {key!r} matches no node name and no module path of the graph's assigned "
                "nodes; use a node name or a module path such as 'transformer.h.3'")
        for i, prio in matches:
            old = chosen.get(i)
            if old is None or prio > old[0]:
                chosen[i] = (prio, stage)
            elif prio == old[0] and old[1] != stage:
                raise ConfigError(
                    f"node {names[i]!r} is pinned to stages {old[1]} and {stage} by pins of "
                    "equal precedence; remove one of them")
    return {i: s for i, (_, s) in chosen.items()}


def _domains(n: int, p: int, src: np.ndarray, dst: np.ndarray, pinned: Mapping[int, int],
             colocate: Sequence[Sequence[int]], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest feasible stage of every node under pins, order and colocation."""
    lo = np.zeros(n, dtype=np.int64)
    hi = np.full(n, p - 1, dtype=np.int64)
    for i, s in pinned.items():
        lo[i] = s
        hi[i] = s
    succ: list[list[int]] = [[] for _ in range(n)]
    pred: list[list[int]] = [[] for _ in range(n)]
    for u, v in zip(src.tolist(), dst.tolist()):
        succ[u].append(v)
        pred[v].append(u)
    for _ in range(len(colocate) + 1):
        for v in range(n):  # forward: lo grows along edges (topological order)
            for u in pred[v]:
                if lo[u] > lo[v]:
                    lo[v] = lo[u]
        for u in range(n - 1, -1, -1):  # backward: hi shrinks against edges
            for v in succ[u]:
                if hi[v] < hi[u]:
                    hi[u] = hi[v]
        changed = False
        for group in colocate:
            g_lo, g_hi = max(lo[i] for i in group), min(hi[i] for i in group)
            for i in group:
                if lo[i] != g_lo or hi[i] != g_hi:
                    lo[i], hi[i] = g_lo, g_hi
                    changed = True
        if not changed:
            break
    bad = np.nonzero(lo > hi)[0]
    if len(bad):
        v = int(bad[0])
        raise InfeasiblePlanError(
            f"the pins contradict the pipeline order (Note [pipeline order]): node "
            f"{names[v]!r} must be on a stage >= {lo[v]} because of pinned producers but <= "
            f"{hi[v]} because of pinned consumers (or the output on the last stage, or "
            "tied='colocate'). Pin producers to stages <= their consumers' stages.")
    return lo, hi


def _canonical_names(graph: Graph, config: PlanConfig, derived: frozenset[str],
                     costs: GraphCosts) -> tuple[str, ...]:
    """The assigned nodes in the canonical order of Note [canonical order] (which does not
    depend on the order the graph lists them in)."""
    listed = [nd.name for nd in graph.nodes if nd.name not in derived]
    at = {name: i for i, name in enumerate(listed)}
    preds = [tuple(dict.fromkeys(at[s] for s in graph.node(x).inputs if s in at)) for x in listed]
    weight = [costs.nodes[x].forward_time + costs.nodes[x].backward_time for x in listed]
    groups: list[list[int]] = []
    if config.tied == "colocate":
        readers: dict[str, list[int]] = {}
        for i, x in enumerate(listed):
            for q in dict.fromkeys(graph.node(x).params):
                readers.setdefault(q, []).append(i)
        groups = [rs for rs in readers.values() if len(rs) > 1]
    order = canonical_order(preds, weight, names=listed, colocate=groups)
    return tuple(listed[i] for i in order)


def _sharded(state: int, nbytes: int, trainable: bool, shard: int) -> int:
    """A parameter's state bytes with its optimizer state divided by ``shard`` (ZeRO-1)."""
    if shard == 1 or not trainable:
        return state
    keep = min(state, 2 * nbytes)  # the value and its gradient
    return keep + (state - keep) // shard


def _charge_gradient_sync(graph: Graph, config: PlanConfig, names: Sequence[str],
                          bwd: np.ndarray, stage_costs: Sequence[GraphCosts]) -> str:
    """Add to ``bwd`` (in place) each node's all-reduce seconds not hidden behind its backward,
    spread over the microbatches (Note [data-parallel gradient time])."""
    grads = np.zeros(len(names))
    seen: set[str] = set()
    for i, name in enumerate(names):
        for q in dict.fromkeys(graph.node(name).params):
            if q not in seen and graph.param(q).trainable:
                seen.add(q)
                grads[i] += graph.param(q).nbytes
    ar = node_allreduce(grads, config.data_parallel, [c.device for c in stage_costs])
    exposed = np.maximum(ar - bwd, 0.0)
    bwd += exposed / config.microbatches
    return (f"gradient all-reduce over {config.data_parallel} replicas: "
            f"{float(ar[:, 0].sum()) * 1e3:.2f} ms per step, {float(exposed[:, 0].sum()) * 1e3:.2f}"
            " ms not hidden behind backward (stage 0's device)")


def build_problem(graph: Graph, config: PlanConfig, devices: DevicesArg, *,
                  costs: Sequence[GraphCosts] | None = None) -> Problem:
    """Build the :class:`Problem` for ``graph`` under ``config`` on ``devices``.

    Args:
        graph: The op-level IR graph.
        config: Plan options (partitions, microbatches, schedule, memory weight, pins, tied).
        devices: One device for every stage or one per stage (name, spec, or spec file).
        costs: One :class:`GraphCosts` per stage (or one for all); default
            ``estimate_costs(graph, device, optimizer=config.optimizer)`` per distinct device.

    Raises:
        ConfigError: on a bad device list, costs or pin.
        InfeasiblePlanError: if the pins contradict the pipeline order.

    Example:
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> prob = build_problem(chain_graph(4), PlanConfig(partitions=2), "cpu")
        >>> prob.names[-1]
        'output'
    """
    p = config.num_stages
    specs = _stage_specs(devices, config)
    stage_costs = _stage_costs(graph, config, specs, costs)
    derived = input_derived_nodes(graph)
    names = _canonical_names(graph, config, derived, stage_costs[0])
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    fwd = np.array([[c.nodes[name].forward_time for c in stage_costs] for name in names],
                   dtype=float).reshape(n, p)
    bwd = np.array([[c.nodes[name].backward_time for c in stage_costs] for name in names],
                   dtype=float).reshape(n, p)
    c0 = stage_costs[0]
    saved = np.array([c0.nodes[x].saved_bytes for x in names], dtype=float)
    workspace = np.array([c0.nodes[x].workspace_bytes for x in names], dtype=float)
    out_b = np.array([c0.nodes[x].output_bytes for x in names], dtype=float)
    sent = np.minimum(out_b, np.array([c0.nodes[x].sent_held for x in names], dtype=float))
    grad_b = np.array([c0.nodes[x].grad_bytes for x in names], dtype=float)
    src: list[int] = []
    dst: list[int] = []
    for nd in graph.nodes:
        if nd.name in index:
            for s in nd.inputs:
                if s in index:
                    src.append(index[s])
                    dst.append(index[nd.name])
    edge_src = np.array(src, dtype=np.int64)
    edge_dst = np.array(dst, dtype=np.int64)
    # Note [memory features]: checkpointing, offload and precision rewrite the node costs.
    feature_notes = apply_features(config, graph, names, edge_src, edge_dst, FeatureArrays(
        fwd=fwd, bwd=bwd, saved=saved, workspace=workspace, out_bytes=out_b, sent=sent,
        grad_bytes=grad_b), [c.device for c in stage_costs])
    if config.data_parallel > 1:  # Note [data-parallel gradient time]
        feature_notes.append(_charge_gradient_sync(graph, config, names, bwd, stage_costs))
    link = np.zeros((n, p))
    for st in range(p):
        dev = stage_costs[st].device
        link[:, st] = [dev.transfer_time(o) + dev.transfer_time(g) for o, g in zip(out_b, grad_b)]
    comm = link[:, :max(p - 1, 1)].copy()
    readers: dict[str, list[int]] = {}
    for nd in graph.nodes:
        if nd.name in index:
            for q in dict.fromkeys(nd.params):
                readers.setdefault(q, []).append(index[nd.name])
    shard = config.data_parallel if config.shard_optimizer_state else 1
    params = tuple(
        ParamInfo(name=q, readers=tuple(rs),
                  state=tuple(_sharded(int(c.param_state_bytes[q]), graph.param(q).nbytes,
                                       graph.param(q).trainable, shard) for c in stage_costs),
                  nbytes=graph.param(q).nbytes, numel=graph.param(q).numel,
                  trainable=graph.param(q).trainable)
        for q, rs in readers.items())
    v = config.virtual_stages
    inflight = np.array([inflight_microbatches(config.schedule, config.microbatches,
                                               config.partitions, s, v)
                         for s in range(p)], dtype=float)
    if config.active_microbatches is not None:  # Note [memory features]
        inflight = np.minimum(inflight, float(config.active_microbatches))
    # Note [virtual stages in the plan]: each of a rank's v stages gets 1/v of its memory.
    caps = np.array([d.memory_bytes / v for d in specs], dtype=float)
    pinned = _resolve_pins(graph, config, index, derived)
    out_idx = n - 1
    if pinned.get(out_idx, p - 1) != p - 1:
        raise ConfigError(
            f"the output node {names[out_idx]!r} is always on the last stage ({p - 1}); "
            f"a pin puts it on stage {pinned[out_idx]}")
    pinned[out_idx] = p - 1
    colocate: tuple[tuple[int, ...], ...] = ()
    if config.tied == "colocate":
        colocate = tuple(tuple(sorted(set(q.readers))) for q in params if len(set(q.readers)) > 1)
    lo, hi = _domains(n, p, edge_src, edge_dst, pinned, colocate, names)
    time = fwd + bwd
    per_stage_work = time.sum(axis=0)
    t_ref = 1.0 / float(np.sum(1.0 / per_stage_work)) if np.all(per_stage_work > 0) else 1.0
    state_mean = sum(float(np.mean(q.state)) for q in params)
    m_bal = state_mean + float(np.mean(inflight)) * float(saved.sum()) + float(
        workspace.max(initial=0.0))
    u_ref = m_bal / float(caps.sum()) if m_bal > 0 else 1.0
    notes: list[str] = list(feature_notes)
    if shard > 1:
        notes.append(f"optimizer state sharded over {shard} data-parallel replicas (ZeRO-1)")
    if derived:
        notes.append(f"{len(graph) - n} input-derived nodes are recomputed on every stage "
                     "that needs them (Note [inputs on every rank])")
    return Problem(
        graph=graph, config=config, devices=specs, costs=stage_costs, names=names,
        fwd=fwd, bwd=bwd, saved=saved, workspace=workspace, out_bytes=out_b, sent=sent,
        grad_bytes=grad_b, comm=comm, link=link, edge_src=edge_src, edge_dst=edge_dst, params=params,
        inflight=inflight, caps=caps, lo=lo, hi=hi, pinned=pinned, colocate=colocate,
        t_ref=t_ref, u_ref=u_ref, notes=tuple(notes))

