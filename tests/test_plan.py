"""Plan values (modelparallel/plan.py): JSON round trip, file errors, fingerprint and world-size
checks."""

from __future__ import annotations

import json

import pytest

from modelparallel.cost_model import get_device_spec
from modelparallel.errors import ConfigError, PlanFormatError, PlanMismatchError
from modelparallel.ir import Graph, Node, OpKind
from modelparallel.plan import (
    BoundaryEstimate,
    MemoryEstimate,
    ModelInfo,
    NodePlacement,
    PipelineEstimate,
    Plan,
    PlanConfig,
    SolverReport,
    StageEstimate,
    load_plan,
)


def _graph() -> Graph:
    return Graph("g", (Node("x", OpKind.PLACEHOLDER, "x"),
                       Node("a", OpKind.CALL_FUNCTION, "f", ("x",)),
                       Node("b", OpKind.CALL_FUNCTION, "g", ("a",)),
                       Node("output", OpKind.OUTPUT, "output", ("b",))))


def _plan(graph: Graph) -> Plan:
    dev = get_device_spec("h100")
    mem = MemoryEstimate(10, 10, 20, 5, 1)
    stages = tuple(StageEstimate(i, "h100", 1, 10, mem, 2 - i, 1e-3, 2e-3, 100, 100, 1e-5,
                                 dev.memory_bytes) for i in range(2))
    return Plan(
        config=PlanConfig(partitions=2, microbatches=4, pins={"a": 0}),
        devices=(dev, dev),
        model=ModelInfo(graph.name, graph.fingerprint(), len(graph), 20, "hand", {"x": [2, 3]},
                        source="m:f", inputs=("arg0=2x3",)),
        nodes=(NodePlacement("x", -1), NodePlacement("a", 0, pinned=True, inputs=("x",)),
               NodePlacement("b", 1, inputs=("a",)), NodePlacement("output", 1, inputs=("b",))),
        stages=stages,
        boundaries=(BoundaryEstimate(0, 1, ("a",), 100, 100, 1e-5),),
        pipeline=PipelineEstimate(0.02, 0.2, 400.0, 0, 3e-3, 2),
        solver=SolverReport("ilp", "highs", "optimal", 1.01, 1.0, 0.0099, 0.5, notes=("n",)),
        shared_params={"w": (0, 1)},
    )


def test_round_trip(tmp_path) -> None:
    g = _graph()
    plan = _plan(g)
    path = plan.save(tmp_path / "sub" / "p.json")
    back = load_plan(path, g)
    assert back == plan
    assert back.assignment == {"x": -1, "a": 0, "b": 1, "output": 1}
    assert back.stage_nodes(1) == ("b", "output")
    assert back.stages[0].memory.peak == 46
    assert not list(path.parent.glob(".p.json.*")), "no temporary file left behind"


def test_fingerprint_mismatch() -> None:
    plan = _plan(_graph())
    other = Graph("g", (Node("x", OpKind.PLACEHOLDER, "x"),
                        Node("output", OpKind.OUTPUT, "output", ("x",))))
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        plan.check_graph(other)


def test_world_size_check() -> None:
    plan = _plan(_graph())
    plan.check_world_size(4)
    with pytest.raises(PlanMismatchError, match="2 stages but 3 processes"):
        plan.check_world_size(3)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(version=7), "version 7"),
    (lambda d: d.update(format="x"), "not a modelparallel plan"),
    (lambda d: d["stages"].pop(), "stages"),
    (lambda d: d["nodes"][1].update(stage=5), "stage 5"),
    (lambda d: d["config"].update(partitions=-1), "partitions"),
    (lambda d: d["model"].update(colour="red"), "unknown keys"),
    (lambda d: d.pop("solver"), "solver"),
    (lambda d: d["boundaries"][0].update(dst=0), "later one"),
    (lambda d: d["boundaries"].append(dict(d["boundaries"][0])), "distinct"),
    (lambda d: d["boundaries"][0].update(dst=5), "stages 0..1"),
])
def test_bad_plan_files(tmp_path, mutate, message) -> None:
    data = _plan(_graph()).to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises((PlanFormatError, ConfigError), match=message):
        load_plan(path)


def test_version_1_plans_load_as_relay_plans(tmp_path) -> None:
    """Plans written before direct sends (format 1: boundaries ``index -> index + 1``) load as
    relay plans (Note [relay communication]), which the runtime executes as they were made."""
    g = _graph()
    plan = _plan(g)
    data = plan.to_dict()
    data["version"] = 1
    del data["config"]["communication"]
    data["boundaries"] = [{"index": 0, **{k: v for k, v in b.items() if k not in ("src", "dst")}}
                          for b in data["boundaries"]]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    old = load_plan(path, g)
    assert old.config.communication == "relay"
    assert old.boundaries == plan.boundaries
    assert old.version == 2 and old.to_dict()["version"] == 2
    assert plan.config.communication == "direct"


def test_unreadable_plan(tmp_path) -> None:
    with pytest.raises(PlanFormatError, match="cannot read"):
        load_plan(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(PlanFormatError, match="not valid JSON") as info:
        load_plan(tmp_path / "x.json")
    assert "x.json" in str(info.value)  # the file is named (issue 13 item 6)
