"""The ILP method's search paths (Note [ILP pipeline], modelparallel/partitioner/methods.py): proof
phases at op level, coarse units then refinement, module and layer granularity."""

from __future__ import annotations

import numpy as np
import pytest

from modelparallel.partitioner import methods as methods_mod
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.partitioner.coarsen import make_units
from modelparallel.partitioner.problem import Problem, build_problem
from modelparallel.plan import Plan, PlanConfig


def test_flat_ilp_reports_the_proofs_it_ran() -> None:
    graph = transformer_graph(6, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=4, microbatches=8, time_limit=10)
    plan = partition(graph, cfg, "h100")
    notes = " ".join(plan.solver.notes)
    assert "op-level ILP (within 0.99%)" in notes or "no stage left" in notes
    dp = partition(graph, cfg, "h100", method="dp")
    assert plan.solver.objective <= dp.solver.objective + 1e-12
    assert plan.solver.lower_bound <= plan.solver.objective
    assert plan.solver.gap <= 0.02


def test_coarse_and_refine_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods_mod, "_FLAT_COLUMNS", 0)  # force the coarse ILP + refinement
    graph = transformer_graph(8, hidden=128, seq=64, vocab=2000)
    cfg = PlanConfig(partitions=4, microbatches=8, time_limit=4)
    plan = partition(graph, cfg, "h100")
    assert plan.solver.coarse_nodes > 0 and plan.solver.refined
    dp = partition(graph, cfg, "h100", method="dp")
    assert plan.solver.objective <= dp.solver.objective + 1e-12
    assert plan.solver.lower_bound <= plan.solver.objective


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


def test_layer_granularity_keeps_every_innermost_module_whole() -> None:
    # Note [layer granularity]: no op-level candidate competes, so no innermost module is cut
    graph = transformer_graph(4, hidden=128, seq=64, vocab=2000, tied=False)
    cfg = PlanConfig(partitions=4, microbatches=4, granularity="layer", time_limit=3)
    plan = partition(graph, cfg, "h100")
    prob = build_problem(graph, cfg, "h100")
    units = make_units(prob, 0, contract=False, innermost=True)
    assert len(units) < prob.n and not plan.solver.refined
    st = _stage_array(plan, prob)
    assert all(len(set(st[m].tolist())) == 1 for m in units.members)
    assert len(set(st.tolist()) - {-1}) == 4
    paths = {prob.graph.node(prob.names[m[0]]).module_path for m in units.members
             if len(m) > 1}
    assert all(len({prob.graph.node(prob.names[i]).module_path for i in m}) == 1
               for m in units.members)  # one innermost module per unit
    assert paths


def _stage_array(plan: Plan, prob: Problem) -> np.ndarray:
    return np.array([plan.assignment[x] for x in prob.names])
