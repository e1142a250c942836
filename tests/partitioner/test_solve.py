"""Partitioner: exactness against brute force, the DP, bounds, errors, tied parameters, devices.

Brute force enumerates every valid assignment of small graphs with the single evaluation
function; the ILP must match it, the DP must match the best contiguous split, and every lower
bound must stay below it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelparallel.cost_model import estimate_costs, get_device_spec
from modelparallel.errors import ConfigError, InfeasiblePlanError
from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
from modelparallel.partitioner import (
    METHODS,
    ProgressEvent,
    compare,
    evaluate_assignment,
    lower_bound,
    partition,
)
from modelparallel.partitioner import methods as methods_mod
from modelparallel.partitioner._synthetic import (
    chain_graph,
    random_graph,
    transformer_graph,
    unet_graph,
)
from modelparallel.partitioner.baselines import find_layers, uniform_split
from modelparallel.partitioner.bounds import _boundary_cuts, window_for
from modelparallel.partitioner.coarsen import make_units, singletons
from modelparallel.partitioner.dp import solve_dp, split_to_stages
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.ilp import solve_items
from modelparallel.partitioner.problem import Problem, build_problem
from modelparallel.partitioner.reduce import reduce_free_nodes
from modelparallel.partitioner.refine import refine_once
from modelparallel.plan import Plan, PlanConfig


def _valid_assignments(prob: Problem):
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


def _brute(prob: Problem) -> tuple[float, np.ndarray | None]:
    best, arg = np.inf, None
    for st in _valid_assignments(prob):
        ev = evaluate(prob, st)
        if np.all(ev.memory <= prob.caps) and ev.objective < best:
            best, arg = ev.objective, st
    return best, arg


def _stage_array(plan: Plan, prob: Problem) -> np.ndarray:
    return np.array([plan.assignment[x] for x in prob.names])


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p,w,tied", [(2, 0.2, "replicate"), (3, 0.5, "replicate"),
                                      (3, 0.0, "colocate"), (2, 1.0, "replicate")])
def test_ilp_matches_brute_force(seed: int, p: int, w: float, tied: str) -> None:
    graph = random_graph(7, seed=seed, tie_prob=0.3)
    cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=3, tied=tied, time_limit=10)
    prob = build_problem(graph, cfg, "h100")
    assert prob.n <= 12
    best, _ = _brute(prob)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.objective == pytest.approx(best, rel=2e-4)
    assert plan.solver.lower_bound <= best * (1 + 1e-9)
    assert plan.solver.status == "optimal"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p,w", [(2, 0.2), (3, 0.5)])
def test_ilp_matches_brute_force_with_free_nodes(seed: int, p: int, w: float) -> None:
    graph = random_graph(7, seed=seed, tie_prob=0.3, view_prob=0.4)
    cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=3, time_limit=10)
    prob = build_problem(graph, cfg, "h100")
    best, _ = _brute(prob)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.objective == pytest.approx(best, rel=2e-4)
    assert plan.solver.lower_bound <= best * (1 + 1e-9)
    assert plan.solver.status == "optimal"


# -- exact reduction, windows and proofs (the flat ILP of Note [ILP pipeline] in partitioner/methods.py) -------------------


def test_attaching_free_nodes_never_worsens_an_assignment() -> None:
    """The lemma of Note [exact reduction], on every valid assignment of small graphs."""
    attached = 0
    for seed in range(12):
        graph = random_graph(8, seed=seed, tie_prob=0.3, view_prob=0.5)
        for p, w, schedule in ((3, 0.3, "1f1b"), (2, 0.8, "gpipe")):
            cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule=schedule)
            prob = build_problem(graph, cfg, "h100")
            red = reduce_free_nodes(prob)
            attached += prob.n - len(red.units)
            for stage in _valid_assignments(prob):
                moved = red.follow(stage)
                check_assignment(prob, moved)
                for m in red.units.members:
                    assert len(set(moved[m].tolist())) == 1
                assert red.unit_stage(stage).tolist() == [int(moved[m[0]]) for m in
                                                          red.units.members]
                before, after = evaluate(prob, stage), evaluate(prob, moved)
                assert np.all(after.time <= before.time * (1 + 1e-12))
                assert np.all(after.memory <= before.memory * (1 + 1e-12))
                assert after.objective <= before.objective * (1 + 1e-12)
    assert attached >= 10  # the graphs do have free nodes to attach


def test_reduction_attaches_views_of_a_traced_style_graph() -> None:
    graph = transformer_graph(2, hidden=64, seq=32, vocab=500)
    prob = build_problem(graph, PlanConfig(partitions=2), "h100")
    red = reduce_free_nodes(prob)
    group = red.units.members[red.units.unit_of[prob.index["h0_merge"]]].tolist()
    assert group == [prob.index["h0_ctx"], prob.index["h0_merge"]]  # joined its producer
    q = red.units.unit_of[prob.index["h0_q"]]  # qkv has other consumers; q is smaller
    assert red.units.members[q].tolist() == [prob.index["h0_q"]]
    for v in np.nonzero(red.anchor != np.arange(prob.n))[0]:
        assert prob.time[v].max() == 0 and prob.saved[v] == 0


@pytest.mark.parametrize("seed", range(6))
def test_windows_contain_every_better_assignment(seed: int) -> None:
    graph = random_graph(7, seed=200 + seed, tie_prob=0.3, view_prob=0.2)
    for p, w, schedule in ((3, 0.2, "1f1b"), (3, 0.7, "gpipe"), (2, 0.5, "1f1b")):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule=schedule)
        prob = build_problem(graph, cfg, "h100")
        scored = [(evaluate(prob, st).objective, st) for st in _valid_assignments(prob)]
        values = sorted(o for o, _ in scored)
        near = sorted(set(values))[:5]  # just above the best few: the tightest windows
        for cutoff in [v * (1 + 1e-9) for v in near] + [values[len(values) // 2]]:
            lo, hi = window_for(prob, cutoff)
            for obj, st in scored:
                if obj < cutoff:
                    assert np.all(lo <= st) and np.all(st <= hi), (cutoff, obj, st)
        # The best assignment is the only one below a hair above it: windows get narrow.
        lo, hi = window_for(prob, values[0] * (1 + 1e-9))
        assert int((hi - lo).sum()) < prob.n * (p - 1)


@pytest.mark.parametrize("seed", [505, 507])  # graphs on which the cuts bind
def test_boundary_cuts_and_cut_windows_are_valid_by_brute_force(seed: int) -> None:
    # Note [lower bound], part 2: the least communication and received bytes of each boundary
    # within the windows bound those of every assignment in the windows, and the windows they
    # narrow still hold every better assignment; the bound stays below the optimum.
    graph = random_graph(8, seed=seed, edge_prob=0.1, tie_prob=0.2, view_prob=0.2)
    positive = 0
    for p, w in ((4, 0.2), (3, 0.5)):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule="1f1b")
        prob = build_problem(graph, cfg, "h100")
        scored = [(evaluate(prob, st).objective, st) for st in _valid_assignments(prob)]
        best = min(o for o, _ in scored)
        for cutoff in sorted({o for o, _ in scored})[:4]:
            cutoff *= 1 + 1e-9
            lo, hi = window_for(prob, cutoff)
            cost = np.stack([prob.comm[:, : p - 1],
                             np.broadcast_to(prob.out_bytes[:, None], (prob.n, p - 1))])
            cuts = _boundary_cuts(prob, lo, hi, cost)
            positive += int(np.count_nonzero(cuts[:, 0] > 0))
            for obj, st in scored:
                inside = np.all(lo <= st) and np.all(st <= hi)
                if obj < cutoff:
                    assert inside, (cutoff, obj, st)
                if not inside:
                    continue
                last = st.copy()
                np.maximum.at(last, prob.edge_src, st[prob.edge_dst])
                for b in range(p - 1):
                    crosses = (st <= b) & (b < last)
                    assert cuts[b, 0] <= prob.comm[crosses, b].sum() * (1 + 1e-9) + 1e-15
                    assert cuts[b, 1] <= prob.out_bytes[crosses].sum() * (1 + 1e-9)
            assert lower_bound(prob, incumbent=cutoff, time_limit=5).value <= best * (1 + 1e-9)
    assert positive > 0  # the cuts do bind on these graphs


@pytest.mark.parametrize("solver", ["highs", "cbc"])
@pytest.mark.parametrize("seed", range(3))
def test_cutoff_search_proves_or_finds(seed: int, solver: str) -> None:
    graph = random_graph(7, seed=300 + seed, tie_prob=0.2, view_prob=0.3)
    prob = build_problem(graph, PlanConfig(partitions=3, microbatches=4), "h100")
    best, _ = _brute(prob)
    units = singletons(prob)
    below = solve_items(prob, units.members, units.lo, units.hi, cutoff=best * 0.97,
                        solver=solver, time_limit=10)
    assert below.status == "infeasible" and below.item_stage is None
    assert below.bound == pytest.approx(best * 0.97)
    above = solve_items(prob, units.members, units.lo, units.hi, cutoff=best * 1.05,
                        solver=solver, time_limit=10, gap_rel=1e-6)
    assert above.item_stage is not None
    found = evaluate(prob, above.item_stage).objective
    assert found < best * 1.05 and found == pytest.approx(best, rel=1e-4)
    assert above.bound is not None and above.bound <= best * (1 + 1e-6)


def test_flat_ilp_reports_the_proofs_it_ran() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=4, microbatches=8, time_limit=10)
    plan = partition(graph, cfg, "h100")
    notes = " ".join(plan.solver.notes)
    assert "op-level ILP (within 1.97%)" in notes or "no stage left" in notes
    dp = partition(graph, cfg, "h100", method="dp")
    assert plan.solver.objective <= dp.solver.objective + 1e-12
    assert plan.solver.lower_bound <= plan.solver.objective
    assert plan.solver.gap <= 0.02


@pytest.mark.parametrize("seed", range(8))
def test_lower_bound_never_exceeds_the_optimum(seed: int) -> None:
    graph = random_graph(8, seed=100 + seed, tie_prob=0.3)
    for p, w in ((2, 0.3), (3, 0.2), (3, 0.8)):
        prob = build_problem(graph, PlanConfig(partitions=p, memory_weight=w, microbatches=4),
                             "h100")
        best, arg = _brute(prob)
        assert lower_bound(prob).value <= best * (1 + 1e-9)
        for factor in (1.0, 1.02, 1.5):  # windows and the windowed MIP from an incumbent
            lb = lower_bound(prob, incumbent=best * factor, incumbent_stage=arg, time_limit=5)
            assert lb.value <= best * (1 + 1e-9), lb.describe()


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("p", [2, 3, 4])
def test_dp_is_optimal_among_contiguous_splits(seed: int, p: int) -> None:
    graph = chain_graph(7, seed=seed) if seed % 2 else random_graph(7, seed=seed)
    for w in (0.0, 0.2, 0.7, 1.0):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule="1f1b")
        prob = build_problem(graph, cfg, "h100")
        n = prob.n
        best = np.inf
        for cuts in itertools.combinations_with_replacement(range(n + 1), p - 1):
            st = split_to_stages(np.arange(n), list(cuts), n)
            if st[-1] != p - 1:
                continue
            ev = evaluate(prob, st)
            if np.all(ev.memory <= prob.caps):
                best = min(best, ev.objective)
        res = solve_dp(prob)
        assert res is not None and res.exact
        assert res.objective == pytest.approx(best, rel=1e-9)
        assert evaluate(prob, res.stage).objective == pytest.approx(res.objective)


def test_dp_respects_pins_and_allowed_cuts() -> None:
    graph = chain_graph(10)
    cfg = PlanConfig(partitions=3, pins={"fc2": 2})
    prob = build_problem(graph, cfg, "h100")
    res = solve_dp(prob)
    assert res is not None
    assert res.stage[prob.index["fc2"]] == 2
    assert np.all(res.stage[prob.index["fc2"]:] == 2)
    allowed = np.zeros(prob.n + 1, dtype=bool)
    allowed[[0, 5, prob.n]] = True
    res = solve_dp(build_problem(graph, PlanConfig(partitions=2), "h100"), allowed_cuts=allowed)
    assert res is not None
    assert res.stage.tolist() == [0] * 5 + [1] * (prob.n - 5)


# -- the pipeline on bigger graphs ------------------------------------------------------------


def test_ilp_is_never_worse_than_the_baselines() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=3, microbatches=6, time_limit=4)
    plans = compare(graph, cfg, "h100")
    assert set(plans) == set(METHODS)
    for m in ("dp", "uniform", "param_balanced"):
        assert plans["ilp"].solver.objective <= plans[m].solver.objective + 1e-12
    for plan in plans.values():
        assert plan.solver.lower_bound <= plan.solver.objective
        assert plan.solver.lower_bound == pytest.approx(plans["ilp"].solver.lower_bound)


def test_coarse_and_refine_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods_mod, "_FLAT_COLUMNS", 0)  # force the coarse ILP + refinement
    graph = transformer_graph(8, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=4, microbatches=8, time_limit=4)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.coarse_nodes > 0 and plan.solver.refined
    dp = partition(graph, cfg, "h100", method="dp")
    assert plan.solver.objective <= dp.solver.objective + 1e-12
    assert plan.solver.lower_bound <= plan.solver.objective


def test_refinement_moves_cuts_inside_units_and_never_worsens() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    prob = build_problem(graph, PlanConfig(partitions=3, microbatches=6), "h100")
    units = make_units(prob, 3)
    # A poor start: cut only between whole units, unevenly.
    stage = np.minimum(units.unit_of * 3 // len(units), 2)
    stage = np.maximum.accumulate(stage)
    stage[prob.output] = 2
    before = evaluate(prob, stage).objective
    new, res = refine_once(prob, units, stage, window=1, time_limit=5, solver="highs",
                           progress=None)
    assert res.item_stage is not None
    assert np.all(new[prob.edge_src] <= new[prob.edge_dst])
    assert evaluate(prob, new).objective <= before + 1e-12


def test_module_granularity_solves_units_only() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=2, granularity="module", module_depth=3, time_limit=3)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.coarse_nodes > 0 and not plan.solver.refined
    prob = build_problem(graph, cfg, "h100")
    units = make_units(prob, 3, contract=False)
    st = _stage_array(plan, prob)
    for m in units.members:
        assert len(set(st[m].tolist())) == 1  # every module unit on one stage


def test_skip_connections_are_relayed() -> None:
    graph = unet_graph(3)
    cfg = PlanConfig(partitions=4, microbatches=4)
    prob = build_problem(graph, cfg, "h100")
    stage = split_to_stages(np.arange(prob.n), [4, 10, 20], prob.n)
    plan = evaluate_assignment(graph, cfg, "h100", dict(zip(prob.names, stage.tolist())))
    skip = "enc0_b_relu"  # produced on stage 0, consumed by the last decoder level
    crossed = [b.index for b in plan.boundaries if skip in b.values]
    assert crossed == list(range(plan.placement(skip).stage, 3))
    ev = evaluate(prob, stage)
    for s in range(4):  # both sides of each boundary pay for it
        expect = (ev.boundary_time[s - 1] if s > 0 else 0) + (ev.boundary_time[s] if s < 3 else 0)
        assert plan.stages[s].comm_time == pytest.approx(expect)


# -- memory ---------------------------------------------------------------------------------------


def test_infeasible_memory_reports_the_memory_that_works() -> None:
    graph = transformer_graph(4, hidden=256, seq=128, vocab=4000)
    cfg = PlanConfig(partitions=2, microbatches=4, time_limit=3)
    tiny = get_device_spec("h100").with_memory(2**20)
    with pytest.raises(InfeasiblePlanError) as info:
        partition(graph, cfg, tiny)
    need = info.value.min_memory_bytes
    assert need is not None and need > 2**20
    msg = str(info.value)
    assert "MiB on every device" in msg and str(need) in msg  # adaptive units, exact bytes
    assert "0.00" not in msg and "1.00 MiB" in msg  # the 1 MiB device, not "0.00 GiB"
    plan = partition(graph, cfg, tiny.with_memory(need))  # that memory does work
    assert max(s.memory.peak for s in plan.stages) <= need
    with pytest.raises(InfeasiblePlanError):
        partition(graph, cfg, tiny.with_memory(int(need * 0.97)), method="dp")


def test_plans_respect_memory_caps_and_balance_memory() -> None:
    graph = transformer_graph(8, hidden=256, seq=128, vocab=4000)
    peaks = []
    for w in (0.0, 1.0):  # the speed-optimal split's peak, and the smallest peak
        prob = build_problem(graph, PlanConfig(partitions=2, microbatches=8, memory_weight=w),
                             "h100")
        peaks.append(evaluate(prob, solve_dp(prob).stage).memory.max())
    assert peaks[1] < peaks[0]
    cap = int(sum(peaks) / 2)  # below the speed-optimal split's peak
    plan = partition(graph, PlanConfig(partitions=2, microbatches=8, time_limit=5),
                     get_device_spec("h100").with_memory(cap))
    assert all(s.memory.peak <= cap for s in plan.stages)


# -- tied parameters ---------------------------------------------------------------------------


def test_tied_parameters_replicate_or_colocate() -> None:
    graph = transformer_graph(4, hidden=128, seq=64, vocab=8000)
    rep = partition(graph, PlanConfig(partitions=2, time_limit=3), "h100")
    assert rep.placement("wte").stage == 0 and rep.placement("lm_head").stage == 1
    assert rep.shared_params == {"transformer.wte.weight": (0, 1)}
    state = estimate_costs(graph, "h100").param_state_bytes["transformer.wte.weight"]
    for s in rep.stages:  # counted on both stages
        m = s.memory
        assert m.parameters + m.gradients + m.optimizer >= state
    col = partition(graph, PlanConfig(partitions=2, tied="colocate", time_limit=3), "h100")
    assert col.placement("wte").stage == col.placement("lm_head").stage == 1
    assert col.shared_params == {}


# -- devices, solvers, pins, progress ---------------------------------------------------------


def test_heterogeneous_devices_use_each_stage_device() -> None:
    graph = chain_graph(12, width=1024, batch=256)
    cfg = PlanConfig(partitions=2, memory_weight=0.0, time_limit=3)
    plan = partition(graph, cfg, ["v100", "h100"])
    assert [d.name for d in plan.devices] == ["v100", "h100"]
    costs = [estimate_costs(graph, d) for d in ("v100", "h100")]
    for s, stage in enumerate(plan.stages):
        expect = sum(costs[s].nodes[x].time for x in plan.stage_nodes(s))
        assert stage.compute_time == pytest.approx(expect)
    # The much faster device gets more of the (identical) layers.
    assert len(plan.stage_nodes(1)) > len(plan.stage_nodes(0))
    with pytest.raises(ConfigError):
        partition(graph, cfg, ["v100", "h100", "a100"])


def test_cbc_solver_path() -> None:
    graph = random_graph(7, seed=3)
    cfg = PlanConfig(partitions=2, solver="cbc", time_limit=5)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.solver == "cbc"
    best, _ = _brute(build_problem(graph, cfg, "h100"))
    assert plan.solver.objective == pytest.approx(best, rel=1e-4)


def test_pins_are_respected_and_bad_pins_refused() -> None:
    graph = transformer_graph(4, hidden=128, seq=64, vocab=2000)
    plan = partition(graph, PlanConfig(partitions=3, pins={"transformer.h.1": 2},
                                       time_limit=3), "h100")
    pinned = [n for n in plan.nodes if n.module_path.startswith("transformer.h.1")]
    assert pinned and all(n.stage == 2 and n.pinned for n in pinned)
    with pytest.raises(InfeasiblePlanError, match="contradict"):
        build_problem(graph, PlanConfig(partitions=3, pins={"h3_res2": 0, "h0_qkv": 2}), "h100")
    with pytest.raises(ConfigError, match="matches no node"):
        build_problem(graph, PlanConfig(partitions=2, pins={"decoder.block": 1}), "h100")
    with pytest.raises(ConfigError, match="input-derived"):
        build_problem(graph, PlanConfig(partitions=2, pins={"mask": 1}), "h100")
    with pytest.raises(ConfigError, match="cannot honour"):
        partition(graph, PlanConfig(partitions=3, pins={"transformer.h.0": 2}), "h100",
                  method="uniform")


def test_progress_events_cover_the_phases() -> None:
    events: list[ProgressEvent] = []
    partition(transformer_graph(4, hidden=128, seq=64, vocab=2000),
              PlanConfig(partitions=3, time_limit=3), "h100", progress=events.append)
    phases = {e.phase for e in events}
    assert {"dp", "coarsen", "ilp", "bound"} <= phases
    assert all(e.elapsed >= 0 for e in events)
    assert events[-1].bound is not None and events[-1].describe().startswith("bound")


def test_evaluate_assignment_checks_and_estimates() -> None:
    graph = transformer_graph(2, hidden=64, seq=32, vocab=500)
    cfg = PlanConfig(partitions=2, microbatches=4)
    prob = build_problem(graph, cfg, "h100")
    half = prob.n // 2
    assignment = {x: int(i >= half) for i, x in enumerate(prob.names)}
    plan = evaluate_assignment(graph, cfg, "h100", assignment, samples_per_microbatch=4)
    assert plan.solver.method == "manual"
    assert plan.placement("input_ids").stage == -1 and plan.placement("mask").stage == -1
    ev = evaluate(prob, np.array([assignment[x] for x in prob.names]))
    assert plan.solver.objective == pytest.approx(ev.objective)
    pipe = plan.pipeline
    t = [s.total_time for s in plan.stages]
    assert pipe.step_time == pytest.approx(sum(t) + 3 * max(t))
    assert pipe.throughput == pytest.approx(4 * 4 / pipe.step_time)
    assert Plan.from_json(plan.to_json()) == plan
    bad = dict(assignment, **{prob.names[0]: 1, prob.names[1]: 0})
    with pytest.raises(ConfigError, match="feeds"):
        evaluate_assignment(graph, cfg, "h100", bad)
    with pytest.raises(ConfigError, match="lacks"):
        evaluate_assignment(graph, cfg, "h100", {"output": 1})
    with pytest.raises(ConfigError, match="method"):
        partition(graph, cfg, "h100", method="greedy")


def test_baselines_split_layers() -> None:
    graph = transformer_graph(8, hidden=128, seq=64, vocab=2000)
    prob = build_problem(graph, PlanConfig(partitions=4), "h100")
    layers = find_layers(prob)
    assert [name for name, _ in layers] == [f"transformer.h.{i}" for i in range(8)]
    cuts, _ = uniform_split(prob)
    st = split_to_stages(np.arange(prob.n), cuts, prob.n)
    per_stage = [{name for name, ix in layers if st[ix[0]] == s} for s in range(4)]
    assert [len(x) for x in per_stage] == [2, 2, 2, 2]
    plan = partition(graph, PlanConfig(partitions=4), "h100", method="param_balanced")
    counts = [s.num_parameters for s in plan.stages]
    assert max(counts) < sum(counts) / 2


# -- sent values held on the sender (Note [sent values held]) ---------------------------------


def _sender_graph(act: str) -> Graph:
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


@pytest.mark.parametrize("act,held", [("gelu", True), ("relu", False)])
def test_sent_values_count_on_the_sender_unless_saved_there(act: str, held: bool) -> None:
    prob = build_problem(_sender_graph(act), PlanConfig(partitions=3, microbatches=4,
                                                        schedule="1f1b"), "h100")
    b = 32 * 256 * 4
    assert prob.sent[prob.index["act"]] == (b if held else 0)
    assert prob.sent[prob.index["fc2"]] == b
    # act on stage 0 is read by fc2 (stage 1) and fc3 (stage 2): sent from 0, relayed by 1.
    stage = np.array([0, 0, 1, 2, 2])
    ev = evaluate(prob, stage)
    saved = {s: sum(prob.saved[i] for i in range(prob.n) if stage[i] == s) for s in range(3)}
    k = prob.inflight
    assert ev.act_mem[0] == k[0] * (saved[0] + (b if held else 0))
    assert ev.act_mem[1] == k[1] * (saved[1] + b + b)  # act received (and relayed), fc2 sent
    assert ev.act_mem[2] == k[2] * (saved[2] + b + b)  # act and fc2 received
    plan = evaluate_assignment(_sender_graph(act), PlanConfig(partitions=3, microbatches=4,
                                                              schedule="1f1b"), "h100",
                               dict(zip(prob.names, stage.tolist())))
    assert plan.stages[0].memory.activations == ev.act_mem[0]


@pytest.mark.parametrize("w", [0.5, 1.0])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_ilp_and_dp_count_sent_values_like_the_evaluation(act: str, w: float) -> None:
    graph = _sender_graph(act)
    for p in (2, 3):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule="1f1b",
                         time_limit=10)
        prob = build_problem(graph, cfg, "h100")
        best, _ = _brute(prob)
        plan = partition(graph, cfg, "h100", method="ilp")
        assert plan.solver.objective == pytest.approx(best, rel=1e-6)
        u = singletons(prob)
        res = solve_items(prob, u.members, u.lo, u.hi, time_limit=10)
        assert res.objective is not None
        assert res.objective == pytest.approx(evaluate(prob, res.item_stage).objective, rel=1e-6)
        dp = solve_dp(prob)
        assert dp is not None and dp.exact
        assert dp.objective == pytest.approx(best, rel=1e-9)  # a chain: every split contiguous


def test_relu_graphs_ilp_matches_brute_force() -> None:
    graph = unet_graph(1, channels=4, size=8, batch=2)
    cfg = PlanConfig(partitions=2, memory_weight=0.7, microbatches=3, schedule="1f1b",
                     time_limit=10)
    prob = build_problem(graph, cfg, "h100")
    assert np.any(prob.sent < prob.out_bytes)  # ReLU outputs are held by their producer
    best, _ = _brute(prob)  # 2^12 assignments
    assert partition(graph, cfg, "h100").solver.objective == pytest.approx(best, rel=1e-6)
