"""The lower bound and stage windows (Note [lower bound], modelparallel/partitioner/bounds.py).

The stage windows and the exact reduction behind the ILP's proofs keep every assignment they
must keep (checked against every assignment of small graphs, and on random DAGs with
hypothesis); boundary cuts are valid by brute force; no lower bound exceeds the optimum.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _partition_cases import brute, valid_assignments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelparallel.errors import ConfigError
from modelparallel.partitioner import lower_bound
from modelparallel.partitioner._synthetic import random_graph
from modelparallel.partitioner.bounds import _boundary_cuts, _split_bound, window_for
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.partitioner.reduce import reduce_free_nodes
from modelparallel.plan import PlanConfig

_SETTINGS = settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _small_cases(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(3, 7))
    graph = random_graph(n, seed=draw(st.integers(0, 10_000)),
                         edge_prob=draw(st.floats(0.0, 0.8)), tie_prob=draw(st.floats(0.0, 0.5)),
                         view_prob=draw(st.sampled_from([0.0, 0.4, 0.7])))
    p = draw(st.integers(2, 3))
    cfg = PlanConfig(partitions=p, microbatches=draw(st.integers(1, 6)),
                     schedule=draw(st.sampled_from(["gpipe", "1f1b"])),
                     memory_weight=draw(st.floats(0.0, 1.0)))
    devices = draw(st.sampled_from(["h100", ("v100", "h100") if p == 2 else "a100"]))
    return graph, cfg, devices, draw(st.floats(0.0, 1.0))


@_SETTINGS
@given(_small_cases())
def test_windows_and_reduction_keep_better_assignments(case: tuple) -> None:
    graph, cfg, devices, quantile = case
    prob = build_problem(graph, cfg, devices)
    scored = []
    for head in itertools.product(range(prob.p), repeat=prob.n - 1):
        stage = np.array((*head, prob.p - 1))
        if np.all(stage[prob.edge_src] <= stage[prob.edge_dst]):
            scored.append((evaluate(prob, stage).objective, stage))
    values = sorted(o for o, _ in scored)
    cutoff = values[min(len(values) - 1, int(quantile * len(values)))] * (1 + 1e-9)
    lo, hi = window_for(prob, cutoff)
    red = reduce_free_nodes(prob)
    for obj, stage in scored:
        if obj < cutoff:  # Note [lower bound], part 2
            assert np.all(lo <= stage) and np.all(stage <= hi)
        moved = red.follow(stage)  # Note [exact reduction]
        check_assignment(prob, moved)
        after = evaluate(prob, moved)
        assert after.objective <= obj * (1 + 1e-12)
        assert np.all(after.memory <= evaluate(prob, stage).memory * (1 + 1e-12))


@pytest.mark.parametrize("seed", range(6))
def test_windows_contain_every_better_assignment(seed: int) -> None:
    graph = random_graph(7, seed=200 + seed, tie_prob=0.3, view_prob=0.2)
    for p, w, schedule in ((3, 0.2, "1f1b"), (3, 0.7, "gpipe"), (2, 0.5, "1f1b")):
        cfg = PlanConfig(partitions=p, memory_weight=w, microbatches=4, schedule=schedule)
        prob = build_problem(graph, cfg, "h100")
        scored = [(evaluate(prob, st).objective, st) for st in valid_assignments(prob)]
        values = sorted(o for o, _ in scored)
        near = sorted(set(values))[:5]  # just above the best few: the tightest windows
        for cutoff in [v * (1 + 1e-9) for v in near] + [values[len(values) // 2]]:
            lo, hi = window_for(prob, cutoff)
            for obj, st in scored:  # noqa: F402
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
        scored = [(evaluate(prob, st).objective, st) for st in valid_assignments(prob)]
        best = min(o for o, _ in scored)
        for cutoff in sorted({o for o, _ in scored})[:4]:
            cutoff *= 1 + 1e-9
            lo, hi = window_for(prob, cutoff)
            cost = np.stack([prob.comm[:, : p - 1],
                             np.broadcast_to(prob.out_bytes[:, None], (prob.n, p - 1))])
            cuts = _boundary_cuts(prob, lo, hi, cost)
            positive += int(np.count_nonzero(cuts[:, 0] > 0))
            for obj, st in scored:  # noqa: F402
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


@pytest.mark.parametrize("seed", range(8))
def test_lower_bound_never_exceeds_the_optimum(seed: int) -> None:
    graph = random_graph(8, seed=100 + seed, tie_prob=0.3)
    for p, w in ((2, 0.3), (3, 0.2), (3, 0.8)):
        prob = build_problem(graph, PlanConfig(partitions=p, memory_weight=w, microbatches=4),
                             "h100")
        best, arg = brute(prob)
        assert lower_bound(prob).value <= best * (1 + 1e-9)
        for factor in (1.0, 1.02, 1.5):  # windows and the windowed MIP from an incumbent
            lb = lower_bound(prob, incumbent=best * factor, incumbent_stage=arg, time_limit=5)
            assert lb.value <= best * (1 + 1e-9), lb.describe()


@pytest.mark.parametrize("seed", range(6))
def test_split_bound_never_exceeds_the_optimum(seed: int) -> None:
    """Part 1b of Note [lower bound], under both communication rules, both schedules and
    mixed devices, against every assignment."""
    graph = random_graph(7, seed=300 + seed, edge_prob=0.4, tie_prob=0.3)
    for p, w, schedule, comm, devices in ((2, 0.3, "1f1b", "direct", "h100"),
                                          (3, 0.2, "1f1b", "relay", "h100"),
                                          (3, 0.5, "gpipe", "direct", ("v100", "h100", "a100")),
                                          (3, 0.9, "1f1b", "direct", "a100")):
        prob = build_problem(graph, PlanConfig(partitions=p, memory_weight=w, microbatches=4,
                                               schedule=schedule, communication=comm), devices)
        best, _ = brute(prob)
        assert _split_bound(prob) <= best * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_memory_range_windows_contain_every_better_assignment_of_that_range(seed: int) -> None:
    # Note [memory sides] (_pieces.py): the windows of a memory range hold every assignment
    # below the cutoff whose memory term lies in it, and are no wider than the whole's.
    graph = random_graph(7, seed=300 + seed, tie_prob=0.3, view_prob=0.2)
    cfg = PlanConfig(partitions=3, memory_weight=0.4, microbatches=4, schedule="1f1b")
    prob = build_problem(graph, cfg, "h100")
    scored = []
    for stage in valid_assignments(prob):
        ev = evaluate(prob, stage)
        scored.append((ev.objective, ev.memory_term, stage))
    values = sorted(o for o, _, _ in scored)
    cutoff = values[len(values) // 3] * (1 + 1e-9)
    mems = sorted(u for o, u, _ in scored if o < cutoff)
    split = mems[len(mems) // 2]
    whole_lo, whole_hi = window_for(prob, cutoff)
    for memory in ((0.0, split), (split, np.inf)):
        lo, hi = window_for(prob, cutoff, memory)
        assert np.all(lo >= whole_lo) and np.all(hi <= whole_hi)
        for obj, u, stage in scored:
            if obj < cutoff and memory[0] <= u <= memory[1]:
                assert np.all(lo <= stage) and np.all(stage <= hi), (memory, obj, u, stage)


def test_a_reversed_memory_range_is_refused() -> None:
    prob = build_problem(random_graph(5, seed=1), PlanConfig(partitions=2), "h100")
    with pytest.raises(ConfigError, match="memory range"):
        window_for(prob, 2.0, (1.5, 1.0))


def _reference_cuts(prob, lo: np.ndarray, hi: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``_boundary_cuts`` the plain way: networkx builds the residual network of a graph with a
    node per value that may cross."""
    import networkx as nx

    out = np.zeros((prob.p - 1, cost.shape[0]))
    for b in range(prob.p - 1):
        if not np.any(hi <= b) or not np.any(lo > b):
            continue
        side = ["s" if hi[v] <= b else ("t" if lo[v] > b else v) for v in range(prob.n)]
        for k in range(cost.shape[0]):
            g = nx.DiGraph()
            g.add_nodes_from(("s", "t"))
            for u in range(prob.n):
                if side[u] == "t":
                    continue
                beyond = [side[c] for c in prob.consumers[u] if side[c] != "s"]
                if beyond:
                    g.add_edge(side[u], ("value", u), capacity=float(cost[k, u, b]))
                    g.add_edges_from((("value", u), sc) for sc in beyond)
                g.add_edges_from((side[c], side[u]) for c in prob.consumers[u]
                                 if side[c] not in ("t", side[u]) and side[u] != "s")
            out[b, k] = nx.minimum_cut_value(g, "s", "t")
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(5, 30), st.floats(0.05, 0.6), st.integers(2, 5),
       st.integers(0, 2))
def test_boundary_cuts_match_networkx_on_the_plain_graph(seed: int, n: int, edge_prob: float,
                                                         p: int, slack: int) -> None:
    # The residual network built in bounds._min_cut (values with one side beyond as a plain
    # edge) gives networkx's own minimum cut of the graph with a node per value.
    from modelparallel.partitioner._ilp_model import propagate_ranges

    prob = build_problem(random_graph(n, seed=seed, edge_prob=edge_prob, tie_prob=0.0),
                         PlanConfig(partitions=p), "h100")
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, prob.n, p - 1))
    stage = np.searchsorted(cuts, np.arange(prob.n), side="right")  # in index order: valid
    stage[prob.output] = p - 1
    lo = np.maximum(0, stage - rng.integers(0, slack + 1, prob.n))
    hi = np.minimum(p - 1, stage + rng.integers(0, slack + 1, prob.n))
    hi[prob.output] = lo[prob.output] = p - 1
    lo, hi = propagate_ranges(prob, np.arange(prob.n), lo, hi)
    cost = np.stack([prob.comm[:, : p - 1], rng.random((prob.n, p - 1)) * (
        rng.random((prob.n, 1)) < 0.7)])  # some values free to send
    np.testing.assert_allclose(_boundary_cuts(prob, lo, hi, cost),
                               _reference_cuts(prob, lo, hi, cost), rtol=1e-9, atol=1e-12)
