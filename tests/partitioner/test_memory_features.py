"""The planner prices the memory features (Note [memory features]) and checkpoints only what
a plan needs to fit (``checkpointing="auto"``)."""

from __future__ import annotations

import pytest

from modelparallel.cost_model.device import stage_devices
from modelparallel.errors import InfeasiblePlanError
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.plan import PlanConfig


def _graph():  # type: ignore[no-untyped-def]
    return transformer_graph(layers=4, hidden=64, seq=32, batch=8)


def _peak(plan) -> int:  # type: ignore[no-untyped-def]
    return max(st.memory.peak for st in plan.stages)


def _acts(plan) -> int:  # type: ignore[no-untyped-def]
    return sum(st.memory.activations for st in plan.stages)


def test_each_feature_lowers_what_it_should() -> None:
    g = _graph()
    base = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe"), "h100", method="dp")
    for kw in ({"checkpointing": "all"}, {"offload_activations": True},
               {"precision": "bf16"}, {"active_microbatches": 1}):
        plan = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", **kw), "h100",
                         method="dp")
        assert _acts(plan) < _acts(base), kw
    ck = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", checkpointing="all"),
                   "h100", method="dp")
    assert ck.pipeline.step_time > base.pipeline.step_time  # recomputation costs time
    zero = partition(g, PlanConfig(2, microbatches=4, data_parallel=4,
                                   shard_optimizer_state=True), "h100", method="dp")
    opt = sum(st.memory.optimizer for st in zero.stages)
    assert opt * 4 == pytest.approx(sum(st.memory.optimizer for st in base.stages), rel=0.01)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_auto_checkpoints_the_fewest_regions_that_fit(method: str) -> None:
    g = _graph()
    cfg = PlanConfig(2, microbatches=4, schedule="gpipe")
    full = _peak(partition(g, cfg, "h100", method="dp"))
    least = _peak(partition(g, PlanConfig(2, microbatches=4, schedule="gpipe",
                                          checkpointing="all"), "h100", method="dp"))
    devices = stage_devices("h100", 2, memory=(full + least) // 2)
    with pytest.raises(InfeasiblePlanError, match="checkpointing='auto'"):
        partition(g, cfg, devices, method=method)
    plan = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", checkpointing="auto"),
                     devices, method=method)
    chosen = plan.config.checkpointing
    assert isinstance(chosen, tuple) and 0 < len(chosen) < 4, chosen
    assert _peak(plan) <= (full + least) // 2
    # the plan file keeps the choice
    from modelparallel.plan import Plan

    assert Plan.from_json(plan.to_json()).config.checkpointing == chosen
