"""Planning options are declared once (Note [planning options] in modelparallel/plan_config.py):
PlanConfig validates and resolves its aliases, the Python front end's PlanningOptions follow
PartitionOptions, and the config file keeps the shape first. (The CLI's flags: tests/cli/test_options.py;
the device resolution: tests/cost_model/test_device.py; measured node times through the API:
tests/test_api.py.)"""

from __future__ import annotations

import dataclasses

import pytest

from modelparallel import PlanningOptions
from modelparallel.errors import ConfigError
from modelparallel.plan import PartitionOptions, PlanConfig


def test_planning_options_derive_from_partition_options() -> None:
    shared = {f.name: f.default for f in dataclasses.fields(PartitionOptions)}
    mine = {f.name: f.default for f in dataclasses.fields(PlanningOptions)}
    assert {k: mine[k] for k in shared} == shared
    opts = PlanningOptions(granularity="module", module_depth=2, device_spec="cpu")
    config = PlanConfig.of(opts, partitions=2, microbatches=2)
    assert (config.granularity, config.module_depth, config.partitions) == ("module", 2, 2)
    with pytest.raises(ConfigError, match="granularity"):
        PlanningOptions(granularity="block")


def test_plan_config_file_order_keeps_the_shape_first() -> None:
    data = PlanConfig(2, microbatches=4, optimize="memory").to_dict()
    assert list(data)[:3] == ["partitions", "microbatches", "schedule"]
    assert PlanConfig.from_dict(data) == PlanConfig(2, microbatches=4, optimize="memory")


def test_config_defaults_and_aliases() -> None:
    assert PlanConfig(2, schedule="simple").schedule == "gpipe"
    assert PlanConfig(2, optimize="memory").memory_weight == 0.8
    assert PlanConfig(2, optimize="speed").memory_weight == 0.2
    assert PlanConfig(2, memory_weight=0).memory_weight == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(partitions=0), dict(partitions=2, microbatches=0), dict(partitions=2, schedule="zb"),
    dict(partitions=2, memory_weight=1.5), dict(partitions=2, optimize="fast"),
    dict(partitions=2, pins={"a": 2}), dict(partitions=2, solver="gurobi"),
    dict(partitions=2, time_limit=0), dict(partitions=2, granularity="block"),
])
def test_config_rejects_bad_values(kwargs) -> None:
    with pytest.raises(ConfigError):
        PlanConfig(**kwargs)
