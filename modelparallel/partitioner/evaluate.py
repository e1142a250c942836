"""The single evaluation function: from an assignment to stage times, memory, objective and Plan.

Every method (ILP, DP, baselines, :func:`~modelparallel.partitioner.evaluate_assignment`) ends
here, so their estimates and objectives are comparable: the model is Note [stage time and
memory] and Note [objective] in :mod:`modelparallel.partitioner.problem`.

Example:
    >>> import numpy as np
    >>> from modelparallel.partitioner._synthetic import chain_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(chain_graph(4), PlanConfig(partitions=2), "h100")
    >>> ev = evaluate(prob, np.array([0, 0, 1, 1, 1]))
    >>> ev.pairs, ev.crossing
    (((0, 1),), ((1,),))
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from modelparallel._version import __version__
from modelparallel.errors import ConfigError
from modelparallel.ir import OpKind, recomputed_nodes
from modelparallel.partitioner.problem import Problem
from modelparallel.plan import (
    BoundaryEstimate,
    MemoryEstimate,
    ModelInfo,
    NodePlacement,
    PipelineEstimate,
    Plan,
    SolverReport,
    StageEstimate,
)
from modelparallel.schedule import make_schedule, simulate

__all__ = ["Evaluation", "assignment_array", "check_assignment", "evaluate", "make_plan",
           "stage_costs", "step_time"]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Estimates of one assignment (arrays are per stage unless noted).

    Attributes:
        stage: Stage of every assigned node, ``(n,)``.
        compute: Compute seconds (forward + backward), ``(p,)``.
        forward: Forward compute seconds, ``(p,)``.
        backward: Backward compute seconds, ``(p,)``.
        comm: Communication seconds, ``(p,)``.
        pairs: The ``(src, dst)`` stage pairs that exchange values, in order (Note [pipeline
            order]: with relaying every ``(b, b + 1)``).
        boundary_time: Seconds per pair on the sending stage's link, ``(len(pairs),)``.
        boundary_fwd_bytes: Activation bytes sent per pair, ``(len(pairs),)``.
        boundary_bwd_bytes: Gradient bytes sent back per pair, ``(len(pairs),)``.
        crossing: Node indices of the values sent per pair.
        held: Per stage, indices into ``problem.params`` of the parameters it holds.
        param_mem: Parameter state bytes per stage, ``(p,)``.
        act_mem: Activation bytes per stage (times microbatches in flight): saved, received,
            and computed there and sent on (Note [stage time and memory]), ``(p,)``.
        workspace: Workspace bytes per stage, ``(p,)``.
        time_term: The time term of ``J``: the largest ``T_s`` over the reference time.
        memory_term: The memory term of ``J``: the largest ``M_s`` over its device's memory,
            over the reference share.
        objective: ``J`` of Note [objective]: ``(1 - w)`` time term ``+ w`` memory term.
    """

    stage: np.ndarray
    compute: np.ndarray
    forward: np.ndarray
    backward: np.ndarray
    comm: np.ndarray
    pairs: tuple[tuple[int, int], ...]
    boundary_time: np.ndarray
    boundary_fwd_bytes: np.ndarray
    boundary_bwd_bytes: np.ndarray
    crossing: tuple[tuple[int, ...], ...]
    held: tuple[tuple[int, ...], ...]
    param_mem: np.ndarray
    act_mem: np.ndarray
    workspace: np.ndarray
    time_term: float
    memory_term: float
    objective: float

    @property
    def time(self) -> np.ndarray:
        """``T_s``: compute plus communication seconds per stage."""
        return self.compute + self.comm

    @property
    def memory(self) -> np.ndarray:
        """``M_s``: peak bytes per stage."""
        return self.param_mem + self.act_mem + self.workspace


def check_assignment(problem: Problem, stage: np.ndarray) -> None:
    """Check that ``stage`` is a valid assignment (range, order, pins, colocation).

    Raises:
        ConfigError: naming the first rule broken.
    """
    p = problem.p
    if stage.shape != (problem.n,):
        raise ConfigError(f"an assignment needs a stage for each of the {problem.n} assigned nodes")
    if len(stage) and (stage.min() < 0 or stage.max() >= p):
        v = int(np.nonzero((stage < 0) | (stage >= p))[0][0])
        raise ConfigError(f"node {problem.names[v]!r} is on stage {int(stage[v])}; stages are "
                          f"0..{p - 1}")
    bad = np.nonzero(stage[problem.edge_src] > stage[problem.edge_dst])[0]
    if len(bad):
        u, v = int(problem.edge_src[bad[0]]), int(problem.edge_dst[bad[0]])
        raise ConfigError(
            f"node {problem.names[u]!r} (stage {int(stage[u])}) feeds node {problem.names[v]!r} "
            f"(stage {int(stage[v])}); values only flow to the same or a later stage (Note "
            "[pipeline order] in modelparallel/partitioner/problem.py)")
    for v, s in problem.pinned.items():
        if stage[v] != s:
            what = "the output node" if v == problem.output else "a pin"
            raise ConfigError(f"node {problem.names[v]!r} is on stage {int(stage[v])} but "
                              f"{what} puts it on stage {s}")
    for group in problem.colocate:
        if len({int(stage[i]) for i in group}) > 1:
            raise ConfigError(
                f"nodes {[problem.names[i] for i in group]} read one parameter and "
                "tied='colocate' requires them on one stage")


def assignment_array(problem: Problem, assignment: Mapping[str, int]) -> np.ndarray:
    """The stage array of a name-to-stage mapping (input-derived nodes may be left out).

    Raises:
        ConfigError: if an assigned node is missing or a name is unknown.
    """
    unknown = [k for k in assignment if k not in problem.graph]
    if unknown:
        raise ConfigError(f"the assignment names nodes the graph does not have: {unknown[:5]}")
    missing = [x for x in problem.names if x not in assignment]
    if missing:
        raise ConfigError(f"the assignment lacks {len(missing)} nodes, e.g. {missing[:5]}; give "
                          "a stage for every node except input-derived ones")
    return np.array([int(assignment[x]) for x in problem.names], dtype=np.int64)


def evaluate(problem: Problem, stage: np.ndarray) -> Evaluation:
    """Stage times, memory and objective of a valid assignment (Note [objective]).

    Args:
        problem: The problem.
        stage: Stage of every assigned node, ``(n,)`` integers (not checked here; see
            :func:`check_assignment`).
    """
    p = problem.p
    stage = np.asarray(stage, dtype=np.int64)
    fwd, bwd = _compute(problem, stage)
    compute = fwd + bwd
    comm, pairs, b_time, b_fwd, b_bwd, crossing, recv, sends = (
        _direct(problem, stage) if problem.direct else _relay(problem, stage))
    param_mem, held_q, held_s = _param_memory(problem, stage)
    act, ws, time_term, memory_term, objective = _totals(problem, stage, compute, comm, recv,
                                                        sends, param_mem)
    held = tuple(tuple(int(q) for q in held_q[held_s == s]) for s in range(p))
    return Evaluation(stage=stage, compute=compute, forward=fwd, backward=bwd, comm=comm,
                      pairs=pairs, boundary_time=b_time, boundary_fwd_bytes=b_fwd, boundary_bwd_bytes=b_bwd,
                      crossing=crossing, held=held,
                      param_mem=param_mem, act_mem=act, workspace=ws,
                      time_term=time_term, memory_term=memory_term, objective=objective)


def stage_costs(problem: Problem, stage: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``T_s``, ``M_s`` and the objective of a valid assignment, as :func:`evaluate` computes
    them (the same arithmetic, so the same floats), without the per-pair and per-parameter
    detail: the inner loop of the cut descents and the DP.

    Example:
        >>> import numpy as np
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> from modelparallel.partitioner.problem import build_problem
        >>> from modelparallel.plan import PlanConfig
        >>> prob = build_problem(chain_graph(4), PlanConfig(partitions=2), "h100")
        >>> stage = np.array([0, 0, 1, 1, 1])
        >>> stage_costs(prob, stage)[2] == evaluate(prob, stage).objective
        True
    """
    stage = np.asarray(stage, dtype=np.int64)
    fwd, bwd = _compute(problem, stage)
    compute = fwd + bwd
    if problem.direct:
        comm, recv, sends = _direct_totals(problem, stage)[:3]
    else:
        comm, *_, recv, sends = _relay(problem, stage)
    param_mem = _param_memory(problem, stage)[0]
    act, ws, _, _, objective = _totals(problem, stage, compute, comm, recv, sends, param_mem)
    return compute + comm, param_mem + act + ws, objective


def _compute(problem: Problem, stage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward compute seconds per stage."""
    p = problem.p
    idx = np.arange(problem.n)
    fwd = np.bincount(stage, weights=problem.fwd[idx, stage], minlength=p)
    bwd = np.bincount(stage, weights=problem.bwd[idx, stage], minlength=p)
    _replay_stages(problem, stage, fwd, bwd)
    return fwd, bwd


#: Per problem: the parameter of every (parameter, reader) pair, its reader, and the state
#: bytes of each parameter per stage ``(len(params), p)``.
_READERS: weakref.WeakKeyDictionary[Problem, tuple[np.ndarray, np.ndarray, np.ndarray]] = (
    weakref.WeakKeyDictionary())


def _param_memory(problem: Problem, stage: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parameter state bytes per stage (each parameter's once on every stage that reads it),
    and the (parameter, stage) pairs held, ordered by parameter then stage."""
    p = problem.p
    if problem not in _READERS:
        q = [qi for qi, par in enumerate(problem.params) for _ in par.readers]
        r = [x for par in problem.params for x in par.readers]
        state = (np.array([np.asarray(par.state, dtype=float) for par in problem.params])
                 if problem.params else np.zeros((0, p)))
        _READERS[problem] = (np.array(q, dtype=np.int64), np.array(r, dtype=np.int64), state)
    q_of, reader, state = _READERS[problem]
    held = np.unique(q_of * p + stage[reader])
    held_q, held_s = held // p, held % p
    # bincount adds in input order, i.e. by parameter on each stage (as a loop over them would)
    return np.bincount(held_s, weights=state[held_q, held_s], minlength=p), held_q, held_s


def _totals(problem: Problem, stage: np.ndarray, compute: np.ndarray, comm: np.ndarray,
            recv: np.ndarray, sends: np.ndarray, param_mem: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Activation memory and workspace per stage, the time and memory terms and the objective
    (Note [stage time and memory], Note [objective])."""
    p = problem.p
    saved = np.bincount(stage, weights=problem.saved, minlength=p)
    act = problem.inflight * (saved + recv + sends)
    ws = np.zeros(p)
    np.maximum.at(ws, stage, problem.workspace)
    time = compute + comm
    mem = param_mem + act + ws
    w = problem.w
    time_term = float(time.max()) / problem.t_ref
    memory_term = float((mem / problem.caps).max()) / problem.u_ref
    return act, ws, time_term, memory_term, (1 - w) * time_term + w * memory_term


_Comm = tuple[np.ndarray, tuple[tuple[int, int], ...], np.ndarray, np.ndarray, np.ndarray,
              tuple[tuple[int, ...], ...], np.ndarray, np.ndarray]


def _relay(problem: Problem, stage: np.ndarray) -> _Comm:
    """Communication under relaying (Note [relay communication]): per stage its seconds, the
    pairs ``(b, b + 1)`` with their seconds, bytes and values, and per stage the bytes it
    receives and the sent bytes it holds (Note [sent values held])."""
    p, n = problem.p, problem.n
    idx = np.arange(n)
    # Values cross every boundary from their stage to their last consumer's.
    last = stage.copy()
    if len(problem.edge_src):
        np.maximum.at(last, problem.edge_src, stage[problem.edge_dst])
    nb = p - 1
    bnd = np.arange(nb)
    cross = (stage[:, None] <= bnd[None, :]) & (bnd[None, :] < last[:, None])  # (n, p-1)
    b_time = (cross * problem.comm[:, :nb]).sum(axis=0) if nb else np.zeros(0)
    b_fwd = (cross * problem.out_bytes[:, None]).sum(axis=0) if nb else np.zeros(0)
    b_bwd = (cross * problem.grad_bytes[:, None]).sum(axis=0) if nb else np.zeros(0)
    comm = np.zeros(p)
    comm[:nb] += b_time
    comm[1:] += b_time
    crossing = tuple(tuple(int(v) for v in np.nonzero(cross[:, b])[0]) for b in range(nb))
    recv = np.zeros(p)
    recv[1:] = b_fwd
    # Values computed on a stage and sent on stay held there (Note [sent values held]).
    sends = np.zeros(p)
    if nb:
        starts = cross[idx, np.minimum(stage, nb - 1)] & (stage < nb)
        np.add.at(sends, stage[starts], problem.sent[starts])
    pairs = tuple((b, b + 1) for b in range(nb))
    return comm, pairs, b_time, b_fwd, b_bwd, crossing, recv, sends


def _direct(problem: Problem, stage: np.ndarray) -> _Comm:
    """Communication under direct sends (Note [direct communication] in ``plan.py``): each
    value once from its stage to every other stage that reads it, on each side's own link;
    the same results as :func:`_relay`, with the pairs that exchange values."""
    p = problem.p
    comm, recv, sends, u, d, a = _direct_totals(problem, stage)
    pk = a * p + d
    pair_keys, inv = np.unique(pk, return_inverse=True)
    k = len(pair_keys)
    b_time = np.bincount(inv, weights=problem.link[u, a], minlength=k)
    b_fwd = np.bincount(inv, weights=problem.out_bytes[u], minlength=k)
    b_bwd = np.bincount(inv, weights=problem.grad_bytes[u], minlength=k)
    pairs = tuple((int(x // p), int(x % p)) for x in pair_keys)
    crossing = tuple(tuple(int(v) for v in u[inv == j]) for j in range(k))
    return comm, pairs, b_time, b_fwd, b_bwd, crossing, recv, sends


def _direct_totals(problem: Problem, stage: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per stage under direct sends: communication seconds, received bytes and held sent
    bytes; and each distinct transfer's value, receiving stage and sending stage."""
    p = problem.p
    su = stage[problem.edge_src]
    sd = stage[problem.edge_dst]
    keep = su != sd
    # Distinct (value, receiving stage) transfers.
    key = np.unique(problem.edge_src[keep].astype(np.int64) * p + sd[keep])
    u, d = key // p, key % p
    a = stage[u]
    comm = np.bincount(d, weights=problem.link[u, d], minlength=p) + np.bincount(
        a, weights=problem.link[u, a], minlength=p)
    recv = np.bincount(d, weights=problem.out_bytes[u], minlength=p)
    senders = np.unique(u)
    sends = np.bincount(stage[senders], weights=problem.sent[senders], minlength=p)
    return comm, recv, sends, u, d, a


def step_time(problem: Problem, ev: Evaluation) -> float:
    """Seconds per step of an evaluated assignment under the problem's schedule.

    GPipe and 1F1B with one stage per rank: ``sum(T_s) + (m - 1) max(T_s)``. Interleaved 1F1B
    and ZB-H1: the schedule simulated (:func:`modelparallel.schedule.simulate`) with each
    stage's forward and backward seconds, its communication split evenly between the two, and
    the stage pairs that exchange values as its links (Note [message channels] in
    ``modelparallel/runtime/channels.py``).
    """
    cfg = problem.config
    m, t = cfg.microbatches, ev.time
    if cfg.schedule in ("gpipe", "1f1b") and cfg.virtual_stages == 1:
        return float(t.sum()) + (m - 1) * float(t.max())
    sched = make_schedule(cfg.schedule, cfg.partitions, m, cfg.virtual_stages)
    return simulate(sched, list(ev.forward + ev.comm / 2),
                    list(ev.backward + ev.comm / 2), links=ev.pairs).makespan


def _replay_stages(problem: Problem, stage: np.ndarray, fwd: np.ndarray, bwd: np.ndarray
                   ) -> None:
    """Replace in place the summed forward and backward seconds of every stage whose costs
    carry a :class:`~modelparallel.cost_model.HostReplay` by the stage replayed alone, with
    the input-derived nodes it recomputes (Note [stage replay] in
    :mod:`modelparallel.cost_model.replay`); assigned nodes the replay does not know keep
    their own times, added on."""
    for s, costs in enumerate(problem.costs):
        replay = costs.replay
        if replay is None:
            continue
        members = [problem.names[i] for i in np.nonzero(stage == s)[0]]
        rest = [problem.index[n] for n in members if n not in replay]
        replayed = [n for n in [*members, *_recomputed(problem, members)] if n in replay]
        f, b = replay.stage_times(replayed)
        fwd[s] = f + float(problem.fwd[rest, s].sum())
        bwd[s] = b + float(problem.bwd[rest, s].sum())


def _recomputed(problem: Problem, members: list[str]) -> tuple[str, ...]:
    """The input-derived nodes (unassigned: not in ``problem.index``) that ``members`` read,
    directly or through others: what their stage recomputes (Note [recomputed nodes] in
    ``modelparallel/ir/analysis.py``, the walk codegen uses too)."""
    return recomputed_nodes(problem.graph, members, _Unassigned(problem.index))


class _Unassigned:
    """The nodes a problem leaves unassigned (the input-derived ones), as a container."""

    def __init__(self, index: Mapping[str, int]) -> None:
        self._index = index

    def __contains__(self, name: object) -> bool:
        return name not in self._index


def _memory_breakdown(problem: Problem, ev: Evaluation, s: int) -> MemoryEstimate:
    params = grads = opt = 0
    for qi in ev.held[s]:
        q = problem.params[qi]
        state = q.state[s]
        pb = min(q.nbytes, state)
        gb = min(q.nbytes if q.trainable else 0, state - pb)
        params += pb
        grads += gb
        opt += state - pb - gb
    return MemoryEstimate(parameters=int(params), gradients=int(grads), optimizer=int(opt),
                          activations=round(float(ev.act_mem[s])),
                          workspace=round(float(ev.workspace[s])))


def make_plan(problem: Problem, ev: Evaluation, report: SolverReport, *,
              samples_per_microbatch: int = 1) -> Plan:
    """The :class:`Plan` of an evaluated assignment, with ``report`` as its solver report.

    The report's ``objective`` is replaced by the evaluation's, and its gap recomputed from
    its lower bound, so every plan states the objective of the assignment it holds.
    """
    p, graph = problem.p, problem.graph
    stage_of = {name: int(ev.stage[i]) for i, name in enumerate(problem.names)}
    c0 = problem.costs[0]
    placements = []
    for nd in graph.nodes:
        s = stage_of.get(nd.name, -1)
        c = problem.costs[max(s, 0)].nodes.get(nd.name) or c0.nodes[nd.name]
        placements.append(NodePlacement(
            name=nd.name, stage=s, op=nd.op.value, target=nd.target,
            module_path=nd.module_path, forward_time=float(c.forward_time),
            backward_time=float(c.backward_time), saved_bytes=int(c.saved_bytes),
            output_bytes=int(c.output_bytes),
            param_bytes=int(sum(graph.param(q).nbytes for q in dict.fromkeys(nd.params))),
            pinned=problem.index.get(nd.name, -1) in problem.pinned
            and nd.op is not OpKind.OUTPUT, inputs=tuple(nd.inputs)))
    recv_b = np.zeros(p)
    sent_b = np.zeros(p)
    for (a, d), f, g in zip(ev.pairs, ev.boundary_fwd_bytes, ev.boundary_bwd_bytes):
        sent_b[a] += f
        recv_b[a] += g
        recv_b[d] += f
        sent_b[d] += g
    stages = []
    for s in range(p):
        stages.append(StageEstimate(
            index=s, device=problem.devices[s].name,
            num_nodes=int(np.count_nonzero(ev.stage == s)),
            num_parameters=int(sum(problem.params[q].numel for q in ev.held[s]
                                   if problem.params[q].trainable)),
            memory=_memory_breakdown(problem, ev, s),
            inflight_microbatches=int(problem.inflight[s]),
            forward_time=float(ev.forward[s]), backward_time=float(ev.backward[s]),
            comm_in_bytes=int(recv_b[s]), comm_out_bytes=int(sent_b[s]),
            comm_time=float(ev.comm[s]), capacity_bytes=int(problem.caps[s])))
    boundaries = tuple(
        BoundaryEstimate(src=a, dst=d, values=tuple(problem.names[v] for v in ev.crossing[j]),
                         forward_bytes=int(ev.boundary_fwd_bytes[j]),
                         backward_bytes=int(ev.boundary_bwd_bytes[j]),
                         time=float(ev.boundary_time[j]))
        for j, (a, d) in enumerate(ev.pairs))
    m = problem.config.microbatches
    t = ev.time
    t_max = float(t.max())
    step = step_time(problem, ev)
    ranks = problem.config.partitions
    rank_work = max(float(t[r::ranks].sum()) for r in range(ranks))
    pipeline = PipelineEstimate(
        step_time=step, bubble_fraction=(1.0 - m * rank_work / step) if step > 0 else 0.0,
        throughput=(m * samples_per_microbatch / step) if step > 0 else 0.0,
        bottleneck_stage=int(np.argmax(t)), bottleneck_time=t_max,
        samples_per_microbatch=samples_per_microbatch)
    shared = {}
    for qi, q in enumerate(problem.params):
        holders = tuple(s for s in range(p) if qi in ev.held[s])
        if len(holders) > 1:
            shared[q.name] = holders
    lb = report.lower_bound
    obj = float(ev.objective)
    gap = None if lb is None else (max(0.0, (obj - lb) / obj) if obj > 0 else 0.0)
    report = SolverReport(
        method=report.method, solver=report.solver, status=report.status, objective=obj,
        lower_bound=lb, gap=gap, solve_time=report.solve_time, coarse_nodes=report.coarse_nodes,
        refined=report.refined, num_variables=report.num_variables,
        num_constraints=report.num_constraints, notes=tuple(report.notes))
    model = ModelInfo(
        name=graph.name, fingerprint=graph.fingerprint(), num_nodes=len(graph),
        num_parameters=graph.num_parameters, tracer=graph.metadata.get("tracer", ""),
        example_shapes={nd.name: list(nd.outputs[0].shape) for nd in graph.placeholders
                        if nd.outputs})
    return Plan(config=problem.config, devices=problem.devices, model=model,
                nodes=tuple(placements), stages=tuple(stages), boundaries=boundaries,
                pipeline=pipeline, solver=report, shared_params=shared,
                created_by=f"modelparallel {__version__}")
