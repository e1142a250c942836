"""The chain bound (Note [chain bound], modelparallel/partitioner/_chain_bound.py) never exceeds
the objective of any valid assignment: checked against every assignment of small random DAGs
(hypothesis), under both communication rules, both schedules and mixed devices."""

from __future__ import annotations

import numpy as np
import pytest
from _partition_cases import valid_assignments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelparallel.partitioner._chain_bound import chain_bound, chain_windows
from modelparallel.partitioner._synthetic import chain_graph, random_graph
from modelparallel.partitioner.bounds import _split_bound, _windows_with_cuts
from modelparallel.partitioner.evaluate import evaluate
from modelparallel.partitioner.problem import build_problem
from modelparallel.plan import PlanConfig

_DEVICES = {2: ("h100", ("v100", "h100"), ("h100", "a100")),
            3: ("h100", ("v100", "h100", "a100"), ("h100", "h100", "a100")),
            4: ("a100", ("h100", "h100", "a100", "a100"))}


def _least(prob: object) -> float:
    """The least objective over every valid assignment (memory caps ignored: the bound holds
    for every assignment, so the tightest check)."""
    return min(evaluate(prob, s).objective for s in valid_assignments(prob))  # type: ignore


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), edge_prob=st.floats(0.0, 0.8),
       tie_prob=st.floats(0.0, 0.5), view_prob=st.sampled_from([0.0, 0.4]),
       p=st.integers(2, 4), w=st.floats(0.0, 1.0), m=st.integers(1, 6),
       schedule=st.sampled_from(["gpipe", "1f1b"]), comm=st.sampled_from(["direct", "relay"]),
       dev=st.integers(0, 2))
def test_chain_bound_never_exceeds_any_assignment(n: int, seed: int, edge_prob: float,
                                                  tie_prob: float, view_prob: float, p: int,
                                                  w: float, m: int, schedule: str, comm: str,
                                                  dev: int) -> None:
    if p == 4:
        n = min(n, 4)  # 4 ** (n + 2) assignments at most
    graph = random_graph(n, seed=seed, edge_prob=edge_prob, tie_prob=tie_prob,
                         view_prob=view_prob)
    devices = _DEVICES[p][dev % len(_DEVICES[p])]
    prob = build_problem(graph, PlanConfig(partitions=p, memory_weight=w, microbatches=m,
                                           schedule=schedule, communication=comm), devices)
    assert chain_bound(prob) <= _least(prob) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("p, w, devices, share", [
    (2, 0.2, "h100", 1.0), (3, 0.0, "h100", 1.0), (3, 0.2, "h100", 0.99),
    (4, 0.5, "h100", 0.75), (3, 0.3, ("v100", "h100", "a100"), 0.9)])
def test_chain_bound_is_strong_on_chains(p: int, w: float, devices: object,
                                         share: float) -> None:
    # On a chain every downset is a prefix: the bound sees every boundary's trade at once
    # (exact at two stages and for time alone; short of the optimum by the middle stages'
    # receives otherwise), well above the split bound.
    prob = build_problem(chain_graph(7), PlanConfig(partitions=p, memory_weight=w,
                                                    microbatches=4, schedule="1f1b"), devices)
    best = _least(prob)
    value = chain_bound(prob)
    assert np.isfinite(value)
    assert share * best * (1 - 1e-4) <= value <= best * (1 + 1e-9)
    assert value >= _split_bound(prob) * (1 + 1e-3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 6), seed=st.integers(0, 10_000), edge_prob=st.floats(0.0, 0.8),
       p=st.integers(2, 3), w=st.sampled_from([0.0, 0.2, 0.6, 1.0]), m=st.integers(1, 6),
       comm=st.sampled_from(["direct", "relay"]), quantile=st.floats(0.0, 1.0),
       side=st.sampled_from(["any", "low", "high"]))
def test_chain_windows_hold_every_better_assignment(n: int, seed: int, edge_prob: float, p: int,
                                                    w: float, m: int, comm: str,
                                                    quantile: float, side: str) -> None:
    # Note [chain bound], the windows: a node is on a stage below its window's start in no
    # assignment with a smaller objective (and a memory term in the range asked for).
    graph = random_graph(n, seed=seed, edge_prob=edge_prob, tie_prob=0.2, view_prob=0.2)
    prob = build_problem(graph, PlanConfig(partitions=p, memory_weight=w, microbatches=m,
                                           schedule="1f1b", communication=comm), "h100")
    scored = [(evaluate(prob, s), s) for s in valid_assignments(prob)]
    values = sorted(e.objective for e, _ in scored)
    cutoff = values[min(len(values) - 1, int(quantile * len(values)))] * (1 + 1e-9)
    mems = sorted(e.memory_term for e, _ in scored)
    mid = mems[len(mems) // 2]
    memory = {"any": (0.0, np.inf), "low": (0.0, mid), "high": (mid, np.inf)}[side]
    lo = chain_windows(prob, cutoff, memory)
    for e, stage in scored:
        if e.objective < cutoff and memory[0] <= e.memory_term <= memory[1]:
            assert np.all(lo <= stage), (cutoff, e.objective, stage, lo)


def test_chain_windows_narrow_a_chain_near_its_optimum() -> None:
    # Just above the optimum of a chain over 3 stages, the chain windows start later than
    # those of the forced weights alone (Note [lower bound], part 2), for half the nodes.
    prob = build_problem(chain_graph(9), PlanConfig(partitions=3, memory_weight=0.2,
                                                    microbatches=4, schedule="1f1b"), "h100")
    cutoff = _least(prob) * 1.001
    lo = chain_windows(prob, cutoff)
    forced, _ = _windows_with_cuts(prob, cutoff, np.zeros((2, 2)))
    assert np.all(lo >= forced) and np.count_nonzero(lo > forced) >= prob.n // 2
