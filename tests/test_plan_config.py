"""Planning options are declared once (Note [planning options] in modelparallel/plan_config.py): the
CLI's flags and the Python front end's PlanningOptions follow PlanConfig, one function resolves
the devices, and measured node times reach the planner from the API too."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from modelparallel import PlanningOptions, pipeline
from modelparallel.cli import _build_parser
from modelparallel.cli._options import FLAG_OF
from modelparallel.cost_model.device import stage_devices
from modelparallel.cost_model.node_times import save_node_times
from modelparallel.errors import ConfigError
from modelparallel.plan import PartitionOptions, PlanConfig
from modelparallel.runtime.microbatch import first_microbatch


def _flags(command: str) -> dict[str, str]:
    """Option string to argparse dest, for one subcommand."""
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    cmd = sub.choices[command]  # type: ignore[index]
    return {o: a.dest for a in cmd._actions for o in a.option_strings}


@pytest.mark.parametrize("command", ["build", "compare"])
def test_every_plan_config_field_has_its_flag(command: str) -> None:
    flags = _flags(command)
    for f in dataclasses.fields(PlanConfig):
        flag = FLAG_OF.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in flags, f"PlanConfig.{f.name} has no {flag} flag on '{command}'"
        assert flags[flag] == f.name, (flag, flags[flag])


def test_planning_options_derive_from_partition_options() -> None:
    shared = {f.name: f.default for f in dataclasses.fields(PartitionOptions)}
    mine = {f.name: f.default for f in dataclasses.fields(PlanningOptions)}
    assert {k: mine[k] for k in shared} == shared
    opts = PlanningOptions(granularity="module", module_depth=2, device_spec="cpu")
    config = PlanConfig.of(opts, partitions=2, microbatches=2)
    assert (config.granularity, config.module_depth, config.partitions) == ("module", 2, 2)
    with pytest.raises(ConfigError, match="granularity"):
        PlanningOptions(granularity="layer")


def test_plan_config_file_order_keeps_the_shape_first() -> None:
    data = PlanConfig(2, microbatches=4, optimize="memory").to_dict()
    assert list(data)[:3] == ["partitions", "microbatches", "schedule"]
    assert PlanConfig.from_dict(data) == PlanConfig(2, microbatches=4, optimize="memory")


def test_stage_devices_one_or_one_per_stage_with_memory() -> None:
    assert [d.name for d in stage_devices(["a100"], 3)] == ["a100"] * 3
    mixed = stage_devices(["cpu", "h100"], 2, memory="2GiB")
    assert [d.name for d in mixed] == ["cpu", "h100"]
    assert {d.memory_bytes for d in mixed} == {2 * 2**30}
    with pytest.raises(ConfigError, match="--device"):
        stage_devices(["cpu", "cpu"], 3, what="--device")


def test_first_microbatch_cuts_along_the_given_axis() -> None:
    model = torch.nn.Linear(4, 2)
    (x,), _ = first_microbatch(model, (torch.zeros(8, 4),), {}, 4)
    assert tuple(x.shape) == (2, 4)
    (x,), _ = first_microbatch(model, (torch.zeros(4, 8),), {}, 4, axes={0: 1})
    assert tuple(x.shape) == (4, 2)
    with pytest.raises(ConfigError, match="divide"):
        first_microbatch(model, (torch.zeros(6, 4),), {}, 4)


def test_pipeline_plans_with_measured_node_times(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4)
    loss = torch.nn.functional.mse_loss
    plain = pipeline(model, x, loss_fn=loss, microbatches=2, device_spec="cpu")
    graph = plain.traced.graph
    times = {n.name: (0.5, 1.0) for n in graph.nodes if n.name == "_0"}
    path = save_node_times(tmp_path / "t.json", times, graph=graph)
    measured = pipeline(model, x, loss_fn=loss, microbatches=2,
                        planning=PlanningOptions(device_spec="cpu", node_times=path))
    stage = measured.plan.stages[0]
    assert stage.forward_time >= 0.5 and stage.backward_time >= 1.0
    assert plain.plan.stages[0].forward_time < 0.5
    data = json.loads(path.read_text())
    data["graph"]["fingerprint"] = "0" * 64
    other = tmp_path / "o.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not on this model's graph"):
        pipeline(model, x, loss_fn=loss, microbatches=2, device_spec="cpu", node_times=other)
