"""The three cost models of an assignment agree: the ILP (``partitioner/ilp.py``), the bound
model (``partitioner/_bound_model.py``) and :func:`~modelparallel.partitioner.evaluate.evaluate`.

Both communication rules are checked (Note [pipeline order]: direct sends, the default, and
relaying). For a fixed valid assignment:

- *ILP, fixed and solved*: every item's range is the assigned stage (``lo = hi``), so every
  constraint family turns into constants; HiGHS then solves for ``t`` and ``u`` alone and its
  objective must be ``evaluate``'s.
- *ILP, evaluated at the point*: with the full ranges, the model's variables are set to the
  assignment (:meth:`_Model.warm_values`); every row must hold there and the objective
  expression must equal ``evaluate``'s (the variable side of each family).
- *Bound model, fixed and solved*: stage windows of width zero, solved (the continuous ``h``,
  workspace, ``t`` and ``u`` columns are left to the solver). It is a relaxation (Note [lower
  bound], part 3): it keeps the workspace of the largest-workspace nodes only and does not
  charge values held by their sender (Note [sent values held]). So it never exceeds
  ``evaluate``'s objective, and on the same problem with those sender-held bytes set to zero
  (and at most ``_WS_NODES`` nodes with a workspace) it equals it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pulp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelparallel.partitioner import _bound_model
from modelparallel.partitioner._synthetic import (
    chain_graph,
    random_graph,
    transformer_graph,
    unet_graph,
)
from modelparallel.partitioner.evaluate import check_assignment, evaluate
from modelparallel.partitioner.ilp import _Model, solve_items
from modelparallel.partitioner.problem import Problem, build_problem
from modelparallel.plan import PlanConfig

_REL = 1e-6


def _random_assignment(prob: Problem, rng: np.random.Generator) -> np.ndarray | None:
    """A random valid assignment (``None`` when the draw breaks a rule), monotone in the
    topological order, so values only flow forward."""
    p, n = prob.p, prob.n
    for _ in range(20):
        cuts = np.sort(rng.integers(0, n, size=p - 1))
        stage = np.searchsorted(cuts, np.arange(n), side="right").astype(np.int64)
        stage = np.clip(stage, prob.lo, prob.hi)
        stage = np.maximum.accumulate(stage)
        for v, s in prob.pinned.items():
            stage[v] = s
        for group in prob.colocate:
            stage[list(group)] = stage[list(group)].max()
        try:
            check_assignment(prob, stage)
        except ValueError:
            continue
        return stage
    return None


def _ilp_fixed(prob: Problem, stage: np.ndarray) -> float:
    items = [np.array([i]) for i in range(prob.n)]
    res = solve_items(prob, items, stage.copy(), stage.copy(), time_limit=10)
    assert res.status == "optimal", res
    assert res.objective is not None
    return res.objective


def _ilp_at_point(prob: Problem, stage: np.ndarray) -> float:
    items = [np.array([i]) for i in range(prob.n)]
    model = _Model(prob, items, prob.lo.copy(), prob.hi.copy())
    values = model.warm_values(stage)
    for var in model.lp.variables():
        var.varValue = values.get(var.name, 0.0)
    for name, row in model.lp.constraints.items():
        slack = row.value()
        if row.sense == pulp.LpConstraintGE:
            assert slack >= -1e-9, (name, slack)
        elif row.sense == pulp.LpConstraintLE:
            assert slack <= 1e-9, (name, slack)
        else:
            assert abs(slack) <= 1e-9, (name, slack)
    return float(pulp.value(model.lp.objective))


def _bound_fixed(prob: Problem, stage: np.ndarray) -> float:
    value, word, _, _ = _bound_model._solve_windowed(prob, stage.copy(), stage.copy(), 10.0,
                                                     integral=False)
    assert value is not None, word
    return value


def _without_sent(prob: Problem) -> Problem | None:
    """The problem without sender-held bytes, on which the bound model charges every term
    ``evaluate`` does (``None`` if it keeps too few workspaces for that; see the module doc)."""
    if int((prob.workspace > 0).sum()) > _bound_model._WS_NODES:
        return None
    return dataclasses.replace(prob, sent=np.zeros_like(prob.sent))


def _check(prob: Problem, stage: np.ndarray) -> None:
    want = evaluate(prob, stage).objective
    assert _ilp_fixed(prob, stage) == pytest.approx(want, rel=_REL, abs=1e-9)
    assert _ilp_at_point(prob, stage) == pytest.approx(want, rel=_REL, abs=1e-9)
    assert _bound_fixed(prob, stage) <= want * (1 + _REL) + 1e-9
    exact = _without_sent(prob)
    if exact is not None:
        assert _bound_fixed(exact, stage) == pytest.approx(evaluate(exact, stage).objective,
                                                           rel=_REL, abs=1e-9)


_GRAPHS = {
    "chain": lambda: chain_graph(10),
    "transformer": lambda: transformer_graph(2, hidden=64, seq=16, batch=2),
    "unet": lambda: unet_graph(2, channels=8, size=16, batch=2),
    "random": lambda: random_graph(12, seed=3, tie_prob=0.4),
}


@pytest.mark.parametrize("communication", ["direct", "relay"])
@pytest.mark.parametrize("tied", ["replicate", "colocate"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", sorted(_GRAPHS))
def test_formulations_match_evaluate(name: str, schedule: str, tied: str,
                                     communication: str) -> None:
    graph = _GRAPHS[name]()
    rng = np.random.default_rng(0)
    for p, w in ((2, 0.0), (3, 0.5), (4, 1.0)):
        cfg = PlanConfig(partitions=p, microbatches=4, schedule=schedule, memory_weight=w,
                         tied=tied, communication=communication)
        prob = build_problem(graph, cfg, "h100")
        for _ in range(3):
            stage = _random_assignment(prob, rng)
            if stage is not None:
                _check(prob, stage)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000), p=st.integers(1, 4),
       edge_prob=st.floats(0.0, 0.8), tie_prob=st.floats(0.0, 0.5),
       w=st.floats(0.0, 1.0), m=st.integers(1, 6), schedule=st.sampled_from(["gpipe", "1f1b"]),
       tied=st.sampled_from(["replicate", "colocate"]), draw=st.integers(0, 2**31 - 1),
       communication=st.sampled_from(["direct", "relay"]))
def test_formulations_match_evaluate_on_random_dags(n: int, seed: int, p: int,
                                                    edge_prob: float, tie_prob: float,
                                                    w: float, m: int, schedule: str,
                                                    tied: str, draw: int,
                                                    communication: str) -> None:
    graph = random_graph(n, seed=seed, edge_prob=edge_prob, tie_prob=tie_prob)
    cfg = PlanConfig(partitions=p, microbatches=m, schedule=schedule, memory_weight=w,
                     tied=tied, communication=communication)
    prob = build_problem(graph, cfg, "h100")
    stage = _random_assignment(prob, np.random.default_rng(draw))
    if stage is not None:
        _check(prob, stage)
