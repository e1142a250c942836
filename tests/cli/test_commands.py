"""``partition-plan``: end to end on small models, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelparallel.cli import main
from modelparallel.ir import Graph
from modelparallel.plan import load_plan

MODEL = "modelparallel.models:skip_mlp"


@pytest.fixture(scope="module")
def fast_link(tmp_path_factory) -> Path:
    """A CPU-like device whose links are free, so even a tiny model spreads over the stages."""
    from modelparallel.cost_model import get_device_spec

    spec = get_device_spec("cpu").to_dict()
    spec.update(name="fastlink", link_bandwidth=1e15, link_latency=0.0)
    path = tmp_path_factory.mktemp("dev") / "fastlink.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, fast_link: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "plan.json"
    assert main(["build", MODEL, "-p", "3", "-m", "2", "--device", str(fast_link),
                 "--time-limit", "5", "-o", str(out)]) == 0
    return out


def test_build_writes_a_valid_plan(plan_file: Path, capsys) -> None:
    plan = load_plan(plan_file)
    assert plan.partitions == 3 and plan.config.microbatches == 2
    assert plan.devices[0].name == "fastlink"
    assert all(s.num_nodes > 0 for s in plan.stages)
    assert plan.model.source == MODEL
    assert {n.stage for n in plan.nodes if n.stage >= 0} <= {0, 1, 2}
    assert any(n.inputs for n in plan.nodes), "the plan records the graph's edges"


def test_inspect_views(plan_file: Path, capsys) -> None:
    assert main(["inspect", str(plan_file)]) == 0
    out = capsys.readouterr().out
    assert "Stages" in out and "bottleneck" in out and "timeline" in out
    plan = load_plan(plan_file)
    assert main(["inspect", str(plan_file), "--stage", "1"]) == 0
    assert "Stage 1" in capsys.readouterr().out
    name = next(n.name for n in plan.nodes if n.stage == 1 and n.inputs)
    assert main(["inspect", str(plan_file), "--node", name]) == 0
    out = capsys.readouterr().out
    assert "placed on stage 1" in out and "pipeline order allows" in out
    assert main(["inspect", str(plan_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "modelparallel.plan"


def test_compare_runs_every_method(tmp_path: Path, fast_link: Path, capsys) -> None:
    out = tmp_path / "all.json"
    assert main(["compare", MODEL, "-p", "2", "--device", str(fast_link), "--time-limit", "5",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for method in ("ilp", "dp", "uniform", "param_balanced"):
        assert method in text
    assert set(json.loads(out.read_text())) >= {"ilp", "dp", "uniform", "param_balanced"}
    for label in ("gpipe", "1f1b v=2", "zb-h1"):
        assert label in text, "compare shows every schedule's estimated step time"


def test_build_with_new_schedules(tmp_path: Path, fast_link: Path) -> None:
    out = tmp_path / "p.json"
    assert main(["build", MODEL, "-p", "2", "-m", "4", "--schedule", "1f1b",
                 "--virtual-stages", "2", "--device", str(fast_link), "-o", str(out)]) == 0
    plan = load_plan(out)
    assert (plan.partitions, plan.num_stages, plan.config.virtual_stages) == (2, 4, 2)
    assert main(["build", MODEL, "-p", "2", "-m", "4", "--schedule", "zb-h1",
                 "--device", str(fast_link), "-o", str(out)]) == 0
    assert load_plan(out).config.schedule == "zb-h1"
    assert main(["build", MODEL, "-p", "2", "--schedule", "interleaved",
                 "--virtual-stages", "2", "-o", str(out)]) == 2


def test_build_from_ir_json(tmp_path: Path) -> None:
    from modelparallel.models import skip_mlp
    from modelparallel.tracer import trace

    case = skip_mlp()
    graph_file = tmp_path / "g.json"
    trace(case.model, case.args, case.kwargs).graph.to_json(graph_file)
    out = tmp_path / "p.json"
    assert main(["build", str(graph_file), "-p", "2", "--device", "h100", "--memory", "1GiB",
                 "-o", str(out)]) == 0
    plan = load_plan(out, Graph.from_json(graph_file))
    assert plan.stages[0].capacity_bytes == 2**30


def test_codegen_prints_stage_source(plan_file: Path, capsys) -> None:
    assert main(["codegen", str(plan_file), "--stage", "1"]) == 0
    source = capsys.readouterr().out
    compile(source, "<stage 1>", "exec")
    assert "def forward" in source


@pytest.mark.parametrize(("argv", "message"), [
    (["build", "no_such_module_xyz:factory", "-p", "2", "-o", "x.json"], "cannot import"),
    (["build", "modelparallel.models:nope", "-p", "2", "-o", "x.json"], "no callable"),
    (["build", MODEL, "-p", "0", "-o", "x.json"], "partitions"),
    (["build", MODEL, "-p", "2", "--memory", "lots", "-o", "x.json"], "cannot read size"),
    (["build", MODEL, "-p", "2", "--device", "tpu9", "-o", "x.json"], "unknown device"),
    (["build", MODEL, "-p", "2", "--pin", "oops", "-o", "x.json"], "NAME=STAGE"),
    (["build", MODEL, "-p", "2", "--memory-weight", "3", "-o", "x.json"], "memory_weight"),
    (["build", MODEL, "-p", "2", "-m", "3", "-o", "x.json"], "microbatches"),
    (["build", MODEL, "-p", "2", "--device", "cpu", "--memory", "1KiB", "-o", "x.json"],
     "memory"),
    (["inspect", "missing.json"], "cannot read plan"),
    (["inspect"], "required"),
    (["frobnicate"], "invalid choice"),
    (["build", MODEL, "-o", "x.json"], "required"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("partition-plan:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("partition-plan: error:")
    assert message in errors[0]
    assert "Traceback" not in err


def test_bad_plan_node_and_stage(plan_file: Path, capsys) -> None:
    assert main(["inspect", str(plan_file), "--node", "no_such_node"]) == 2
    assert main(["inspect", str(plan_file), "--stage", "9"]) == 2
    assert main(["codegen", str(plan_file), "--stage", "9"]) == 2


def test_console_script_exit_status(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "modelparallel.cli", "inspect",
                             str(tmp_path / "none.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# -- issue 13 item 8: user errors are exit 2 and one line; item 10: plan files follow the umask


def test_user_mistakes_are_one_line_exit_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def boom():\n    raise ValueError('factory exploded')\n")
    cases = [
        (["build", f"{bad}:boom", "-p", "2", "-o", str(tmp_path / "x.json")],
         "the MODEL factory", "ValueError: factory exploded"),
        (["build", str(bad), "-p", "2", "-o", str(tmp_path / "x.json")],
         "Python file without a factory", f"{bad}:FACTORY"),
        (["build", MODEL, "-p", "2", "-o", str(tmp_path)], "is a directory", "plan.json"),
        (["build", MODEL, "-p", "1000", "-o", str(tmp_path / "x.json")],
         "--partitions 1000 but the model has only", "stages would be empty"),
        (["build", MODEL, "-p", "2", "--optimizer", "-4", "-o", str(tmp_path / "x.json")],
         "optimizer = -4.0", ">= 0"),
        (["build", MODEL, "--input-shape", "8,5", "-p", "2", "-o", str(tmp_path / "x.json")],
         "shape mismatch", "--input-shape"),
    ]
    for argv, *words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("partition-plan:")]
        assert len(lines) == 1 and lines[0].startswith("partition-plan: error:"), err
        assert "Traceback" not in err and len(err.splitlines()) < 12, err  # progress only
        for w in words:
            assert w in lines[0], (w, err)
        assert "what to try: - mark that module a leaf" not in lines[0].lower()


def test_plan_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "plan.json"
        assert main(["build", MODEL, "-p", "2", "--time-limit", "5", "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_build_shows_the_summary_once_and_plain_progress_off_a_terminal(tmp_path: Path,
                                                                         capsys) -> None:
    """Issue 13 item 12: build prints a headline (the tables are inspect's), and off a
    terminal (capsys is a pipe) its progress as plain lines."""
    out = tmp_path / "plan.json"
    assert main(["build", MODEL, "-p", "2", "--time-limit", "5", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Stage" not in captured.out and "bubble" in captured.out, captured.out
    assert "tracing SkipMLP" in captured.err and "partitioning" in captured.err, captured.err
    assert main(["inspect", str(out)]) == 0
    assert "bubble" in capsys.readouterr().out


_FEATURES_FIRST = '''
import torch


class FeaturesFirst(torch.nn.Module):
    """Takes its batch as (features, samples): microbatches are cut along axis 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.t())))


def factory():
    return FeaturesFirst(), (torch.randn(8, 8),)
'''


def test_split_axis_cuts_the_traced_microbatch_as_the_api_does(tmp_path: Path, capsys) -> None:
    """``--split-axis``/``--non-split`` are ``pipeline``'s ``input_split_axes`` /
    ``non_split_inputs``: the CLI traces the same microbatch as the API."""
    import torch

    from modelparallel.cli._load import _import_factory, _load_model
    from modelparallel.runtime.microbatch import first_microbatch
    from modelparallel.tracer import trace

    src = tmp_path / "features_first.py"
    src.write_text(_FEATURES_FIRST)
    model = f"{src}:factory"
    out = tmp_path / "p.json"
    assert main(["build", model, "-p", "2", "-m", "4", "--split-axis", "x=1", "-o",
                 str(out)]) == 0
    plan = load_plan(out)
    assert plan.model.inputs == ("--split-axis x=1",)
    assert list(plan.model.example_shapes.values()) == [[8, 2]]
    assert main(["codegen", str(out), "--stage", "1"]) == 0  # rebuilt with the recorded rule
    assert main(["build", model, "-p", "2", "-m", "4", "-o", str(out)]) == 2  # axis 0: (2, 8)
    assert main(["build", model, "-p", "2", "-m", "4", "--split-axis", "x:1", "-o",
                 str(out)]) == 2
    assert "must be NAME=AXIS" in capsys.readouterr().err
    assert main(["build", model, "-p", "2", "-m", "4", "--split-axis", "x=1", "--non-split",
                 "y", "-o", str(out)]) == 2  # no input y: an error, not an ignored flag
    assert "'y'" in capsys.readouterr().err
    from rich.console import Console

    quiet = Console(quiet=True)
    loaded = _load_model(model, input_shapes=[], inputs=[], microbatches=4, method="auto",
                         console=quiet, split_axes=["0=1"])
    m, args = _import_factory(model)()
    (mb,), _ = first_microbatch(m, args, {}, 4, axes={"x": 1})
    assert loaded.graph.fingerprint() == trace(m, (mb,)).graph.fingerprint()
    whole = _load_model(model, input_shapes=[], inputs=[], microbatches=4, method="auto",
                        console=quiet, non_split=["x"])
    assert whole.graph.fingerprint() == trace(m, (torch.randn(8, 8),)).graph.fingerprint()
