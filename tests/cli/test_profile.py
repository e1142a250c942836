"""Profiling mode from the command line: ``calibrate --model --ops-out`` and ``build --measured``
/ ``--profile``; node-time files; what ``profile_node_times`` measures (on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelparallel.cli import main
from modelparallel.cost_model.measure import profile_node_times
from modelparallel.cost_model.node_times import NODE_TIMES_FORMAT, load_node_times, save_node_times
from modelparallel.errors import ConfigError
from modelparallel.plan import load_plan
from modelparallel.tracer import trace

MODEL = "modelparallel.models:skip_mlp"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CPU spec and the node times of skip_mlp (batch 8, 2 microbatches) on the CPU."""
    d = tmp_path_factory.mktemp("cal")
    spec, ops = d / "cpu.json", d / "ops.json"
    assert main(["calibrate", "-o", str(spec), "--quick", "--device", "cpu", "--model", MODEL,
                 "-m", "2", "--ops-out", str(ops), "--repeat", "2", "--warmup", "1"]) == 0
    return spec, ops


def test_ops_file_holds_every_compute_node(calibrated: tuple[Path, Path]) -> None:
    _, ops = calibrated
    data = json.loads(ops.read_text())
    assert data["format"] == NODE_TIMES_FORMAT and data["metadata"]["microbatches"] == 2
    assert data["metadata"]["example_shapes"] == {"arg0": [4, 16]}
    from modelparallel import models

    case = models.skip_mlp(batch_size=4)
    graph = trace(case.model, case.args).graph
    assert data["graph"]["fingerprint"] == graph.fingerprint()
    compute = {n.name for n in graph.nodes if n.op.value not in ("placeholder", "output")}
    assert set(data["nodes"]) == compute
    assert all(f > 0 and b >= 0 for f, b in data["nodes"].values())


def test_build_measured_plans_with_the_measured_times(calibrated: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    spec, ops = calibrated
    out = tmp_path / "plan.json"
    assert main(["build", MODEL, "-p", "2", "-m", "2", "--device", str(spec), "--measured",
                 str(ops), "-o", str(out)]) == 0
    plan = load_plan(out)
    times = load_node_times(ops)
    for node in plan.nodes:
        if node.name in times:
            assert node.forward_time == pytest.approx(times[node.name][0])
            assert node.backward_time == pytest.approx(times[node.name][1])
    for s in range(2):
        own = [n for n in plan.nodes if n.stage == s]
        assert plan.stages[s].forward_time == pytest.approx(sum(n.forward_time for n in own))


def test_build_measured_replays_each_stage_with_the_files_host_times(
        calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    """A version 2 file carries host and device times per node: the plan's stage times are
    each stage replayed alone (Note [stage replay]), not the sums of the node times."""
    from modelparallel.cost_model.node_replay import host_replay
    from modelparallel.cost_model.node_times import load_call_overhead, load_node_profiles

    spec, ops = calibrated
    data = json.loads(ops.read_text())
    for v in data["profiles"].values():  # a slow host: every node 1 ms to queue
        v["host_forward_context"] = 1e-3
    # and a slow autograd engine: 50 ms per stage and microbatch (Note [call overhead])
    data["call_overhead"] = {"forward": 1e-4, "backward": 5e-2}
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(data))
    out = tmp_path / "plan.json"
    assert main(["build", MODEL, "-p", "2", "-m", "2", "--device", str(spec), "--measured",
                 str(slow), "-o", str(out)]) == 0
    plan = load_plan(out)
    profiles = load_node_profiles(slow)
    replay = host_replay([n.name for n in plan.nodes], profiles,
                         call=load_call_overhead(slow))
    for s in range(2):
        own = [n.name for n in plan.nodes if n.stage == s]
        fwd, bwd = replay.stage_times(own)
        assert plan.stages[s].forward_time == pytest.approx(fwd)
        assert plan.stages[s].backward_time == pytest.approx(bwd)
        assert fwd >= 1e-3 * sum(1 for n in own if n in profiles)
        assert fwd + bwd >= 5e-2


def test_build_measured_refuses_another_model_or_batch(calibrated: tuple[Path, Path],
                                                       tmp_path: Path, capsys) -> None:
    _, ops = calibrated
    out = str(tmp_path / "plan.json")
    assert main(["build", "modelparallel.models:resnet_tiny", "-p", "2", "--measured",
                 str(ops), "-o", out]) == 2
    assert "measured on graph 'SkipMLP'" in capsys.readouterr().err
    # Same graph, another microbatch size: the times would be for other shapes.
    assert main(["build", MODEL, "-p", "2", "-m", "4", "--measured", str(ops), "-o", out]) == 2
    assert "example shapes" in capsys.readouterr().err


def test_build_profile_measures_on_this_machine(tmp_path: Path) -> None:
    roof, prof = tmp_path / "roof.json", tmp_path / "prof.json"
    assert main(["build", MODEL, "-p", "2", "--device", "cpu", "-o", str(roof)]) == 0
    assert main(["build", MODEL, "-p", "2", "--device", "cpu", "--profile",
                 "--profile-device", "cpu", "-o", str(prof)]) == 0
    a, b = load_plan(roof), load_plan(prof)
    assert a.model.fingerprint == b.model.fingerprint
    assert [n.forward_time for n in a.nodes] != [n.forward_time for n in b.nodes]


@pytest.mark.parametrize(("argv", "message"), [
    (["calibrate", "-o", "x.json", "--model", MODEL], "--model and --ops-out go together"),
    (["build", MODEL, "-p", "2", "--measured", "m.json", "--profile", "-o", "p.json"],
     "not both"),
    (["build", MODEL, "-p", "2", "--measured", "no_such_file.json", "-o", "p.json"],
     "cannot read node times"),
    (["build", MODEL, "-p", "2", "--dtype", "int8", "-o", "p.json"],
     "not a floating torch dtype"),
])
def test_bad_profiling_flags_are_one_line_exit_2(argv: list[str], message: str,
                                                 tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("partition-plan: error:") and message in last


def test_node_times_files_round_trip_and_validate(tmp_path: Path) -> None:
    graph = trace(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).graph
    path = save_node_times(tmp_path / "t.json", {"linear": (1e-3, 2e-3)}, graph=graph,
                           device="cpu")
    assert load_node_times(path, graph) == {"linear": (1e-3, 2e-3)}
    other = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
                  (torch.randn(2, 4),)).graph
    with pytest.raises(ConfigError, match="not on this model's graph"):
        load_node_times(path, other)
    bad = tmp_path / "bad.json"
    for content, message in [
        ("{", "not valid JSON"),
        (json.dumps({"format": "other"}), "not a node-times file"),
        (json.dumps({"format": NODE_TIMES_FORMAT, "version": 9}), "version 9"),
        (json.dumps({"format": NODE_TIMES_FORMAT, "version": 1, "nodes": {"a": [1]}}),
         "must map to"),
        (json.dumps({"format": NODE_TIMES_FORMAT, "version": 1, "nodes": {"a": [-1, 0]}}),
         "must map to"),
    ]:
        bad.write_text(content)
        with pytest.raises(ConfigError, match=message):
            load_node_times(bad)


def test_only_values_computed_from_parameters_get_gradients() -> None:
    """A node reading only model inputs (no parameter upstream) has no backward; a node with
    parameters has one even when its input needs no gradient."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scaled = x * 2.0                    # input only: no gradient flows here
            return torch.tanh(self.fc(scaled))  # fc: weight gradient; tanh: input gradient

    gm = torch.fx.symbolic_trace(Net())
    times = profile_node_times(gm, [torch.randn(32, 64)], warmup=1, repeat=3)
    assert times["mul"][1] == 0.0
    assert times["fc"][1] > 0 and times["tanh"][1] > 0
    assert all(p.grad is None for p in gm.parameters())  # the model's .grad is never touched


def test_node_times_file_carries_the_profiles_and_reads_version_1(
        calibrated: tuple[Path, Path], tmp_path: Path) -> None:
    from modelparallel.cost_model.node_replay import NodeProfile
    from modelparallel.cost_model.node_times import load_node_profiles

    _, ops = calibrated
    data = json.loads(ops.read_text())
    assert data["version"] == 2
    profiles = load_node_profiles(ops)
    assert set(profiles) == set(data["nodes"])
    assert all(p.host_backward_context == 0.0 for p in profiles.values())  # measured, on CPU
    path = save_node_times(tmp_path / "p.json", {"fc": (1.0, 2.0)},
                           profiles={"fc": NodeProfile(1.0, 0.5, 2.0, 0.5, "k", 0.25)})
    assert load_node_profiles(path)["fc"] == NodeProfile(1.0, 0.5, 2.0, 0.5, "k", 0.25)
    old = tmp_path / "v1.json"  # a file of the first format: its times still read
    old.write_text(json.dumps({"format": NODE_TIMES_FORMAT, "version": 1,
                               "nodes": {"fc": [1.0, 2.0]}}))
    assert load_node_times(old) == {"fc": (1.0, 2.0)}
    with pytest.raises(ConfigError, match="carry no node profiles"):
        load_node_profiles(old)
