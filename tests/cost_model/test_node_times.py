"""The node-times file as one value (NodeTimesFile), read and written without torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelparallel.cost_model import CallOverhead, NodeProfile, NodeTimesFile
from modelparallel.errors import ConfigError
from modelparallel.partitioner._synthetic import chain_graph


def test_round_trip_with_profiles_call_and_graph(tmp_path: Path) -> None:
    g = chain_graph(3)
    name = g.nodes[1].name
    f = NodeTimesFile(times={name: (1.0, 2.0)},
                      profiles={name: NodeProfile(1.0, 0.5, 2.0, 0.5, "k", 0.25, 0.125)},
                      call=CallOverhead(1e-5, 2e-5), device="cpu",
                      graph=NodeTimesFile.graph_record(g), metadata={"dtype": "float32"})
    back = NodeTimesFile.load(f.save(tmp_path / "t.json"), g)
    assert back == f
    assert NodeTimesFile(times={}).call_overhead == CallOverhead()
    with pytest.raises(ConfigError, match="not on this model's graph"):
        NodeTimesFile.load(tmp_path / "t.json", chain_graph(4))


def test_bad_entries_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "modelparallel.node_times", "version": 2,
                                "nodes": {}, "call_overhead": {"forward": 1}}))
    with pytest.raises(ConfigError, match=r"bad.json.*call_overhead"):
        NodeTimesFile.load(path)
    with pytest.raises(ConfigError, match="version"):
        NodeTimesFile(times={}, version=7)


def test_call_overhead_in_node_times_files(tmp_path) -> None:
    import json

    from modelparallel.cost_model import CallOverhead
    from modelparallel.cost_model.node_times import load_call_overhead, save_node_times

    with_call = save_node_times(tmp_path / "a.json", {"fc": (1e-3, 2e-3)},
                                call=CallOverhead(4e-5, 3e-4))
    assert load_call_overhead(with_call) == CallOverhead(4e-5, 3e-4)
    without = save_node_times(tmp_path / "b.json", {"fc": (1e-3, 2e-3)})
    assert load_call_overhead(without) == CallOverhead()
    data = json.loads(with_call.read_text())
    data["call_overhead"] = {"forward": "soon"}
    with_call.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"call_overhead .* is malformed"):
        load_call_overhead(with_call)
