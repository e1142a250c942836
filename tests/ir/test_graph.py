"""The IR graph (modelparallel/ir/graph.py, ir/nodes.py): validation, JSON round trip, fingerprint,
tied parameters."""

from __future__ import annotations

import json

import pytest

from modelparallel.ir import (
    Graph,
    IRFormatError,
    ModelParallelError,
    Node,
    OpKind,
    Param,
    TensorMeta,
)


def _mlp() -> Graph:
    f32 = "float32"
    return Graph(
        name="mlp",
        nodes=(
            Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((8, 4), f32),)),
            Node("fc1", OpKind.CALL_MODULE, "fc1", ("x",), (TensorMeta((8, 16), f32, True),),
                 ("fc1.weight",), module_path="fc1", module_type="Linear", flops=2 * 8 * 4 * 16),
            Node("act", OpKind.CALL_FUNCTION, "aten.relu.default", ("fc1",),
                 (TensorMeta((8, 16), f32, True),), module_path="act"),
            Node("fc2", OpKind.CALL_MODULE, "fc2", ("act",), (TensorMeta((8, 4), f32, True),),
                 ("fc1.weight",), module_path="fc2", flops=2 * 8 * 16 * 4, saved_bytes=512),
            Node("output", OpKind.OUTPUT, "output", ("fc2",)),
        ),
        params=(Param("fc1.weight", (16, 4), f32, aliases=("fc2.weight",)),),
        metadata={"tracer": "hand"},
    )


def test_round_trip_and_fingerprint() -> None:
    g = _mlp()
    text = g.to_json()
    back = Graph.from_json(text)
    assert back == g
    assert back.fingerprint() == g.fingerprint()
    assert json.loads(text)["format"] == "modelparallel.ir"


def test_round_trip_through_file(tmp_path) -> None:
    path = tmp_path / "g.json"
    _mlp().to_json(path)
    assert Graph.from_json(path) == _mlp()
    assert Graph.from_json(str(path)) == _mlp()


def test_fingerprint_ignores_shapes_and_flops_but_not_structure() -> None:
    g = _mlp()
    bigger = g.replace(nodes=tuple(
        n if n.op is not OpKind.PLACEHOLDER else Node(n.name, n.op, n.target,
                                                      outputs=(TensorMeta((64, 4), "float32"),))
        for n in g.nodes))
    assert bigger.fingerprint() == g.fingerprint()
    rewired = g.replace(nodes=tuple(
        Node(n.name, n.op, n.target, ("x",), n.outputs, n.params) if n.name == "fc2" else n
        for n in g.nodes))
    assert rewired.fingerprint() != g.fingerprint()


def test_tied_params() -> None:
    g = _mlp()
    assert g.tied_params() == {"fc1.weight": ("fc1", "fc2")}
    assert g.param("fc2.weight").name == "fc1.weight"
    assert g.num_parameters == 64


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["nodes"].reverse(), "topological order"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "appears twice"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d["nodes"][1].update(params=["nope"]), "canonical"),
        (lambda d: d["nodes"][1]["outputs"][0].update(dtype="float7"), "unknown dtype"),
        (lambda d: d.update(fingerprint="0" * 64), "fingerprint"),
        (lambda d: d["nodes"].pop(), "output node"),
    ],
)
def test_malformed_json_is_refused(mutate, message) -> None:
    data = _mlp().to_dict()
    mutate(data)
    with pytest.raises(IRFormatError, match=message) as info:
        Graph.from_dict(data)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ModelParallelError)


def test_not_json() -> None:
    with pytest.raises(IRFormatError, match="not valid JSON"):
        Graph.from_json("{nope")


