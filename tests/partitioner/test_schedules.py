"""Planning for interleaved 1F1B (p * v stages, stage s on rank s mod p) and ZB-H1."""

from __future__ import annotations

import pytest

from modelparallel.errors import ConfigError
from modelparallel.partitioner import compare_schedules, partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.plan import Plan, PlanConfig
from modelparallel.schedule import inflight_microbatches, theoretical_bubble


def test_plan_config_virtual_stages() -> None:
    cfg = PlanConfig(4, microbatches=8, schedule="1f1b", virtual_stages=2)
    assert cfg.num_stages == 8 and cfg.to_dict()["virtual_stages"] == 2
    assert PlanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="SMP's 'interleaved'"):
        PlanConfig(2, schedule="interleaved", virtual_stages=2)
    with pytest.raises(ConfigError, match="virtual_stages"):
        PlanConfig(2, schedule="zb-h1", virtual_stages=2)
    with pytest.raises(ConfigError, match="rounds"):
        PlanConfig(2, microbatches=5, virtual_stages=2)
    assert PlanConfig(2, pins={"x": 3}, virtual_stages=2).pins == {"x": 3}


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_interleaved_plan_places_stages_on_ranks(method: str) -> None:
    g = transformer_graph(layers=8, hidden=64, seq=16, batch=2)
    cfg = PlanConfig(2, microbatches=4, virtual_stages=2, time_limit=10)
    plan = partition(g, cfg, ["a100", "h100"], method=method)
    assert plan.num_stages == 4 and plan.partitions == 2
    assert [d.name for d in plan.devices] == ["a100", "h100", "a100", "h100"]
    assert [s.inflight_microbatches for s in plan.stages] == [
        inflight_microbatches("1f1b", 4, 2, s, virtual_stages=2) for s in range(4)]
    assert all(s.capacity_bytes == plan.devices[s.index].memory_bytes // 2 for s in plan.stages)
    assert {n.stage for n in plan.nodes} >= {0, 1, 2, 3}, "every stage gets work"
    assert Plan.from_json(plan.to_json()) == plan


def test_compare_schedules_orders_by_bubble_for_equal_stages() -> None:
    g = transformer_graph(layers=8, hidden=64, seq=16, batch=2)
    plans = compare_schedules(g, PlanConfig(2, microbatches=4), "h100")
    assert list(plans) == ["gpipe", "1f1b", "1f1b v=2", "zb-h1"]
    assert plans["zb-h1"].pipeline.bubble_fraction < plans["1f1b"].pipeline.bubble_fraction
    assert plans["1f1b v=2"].pipeline.bubble_fraction < plans["1f1b"].pipeline.bubble_fraction
    assert plans["1f1b"].pipeline.bubble_fraction >= theoretical_bubble(2, 4) - 0.05
    assert plans["1f1b v=2"].num_stages == 4
