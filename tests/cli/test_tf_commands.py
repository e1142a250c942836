"""``partition-plan`` on Keras factories: build (framework detected or given), inspect, compare,
and a TensorFlow-only process that never imports torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from modelparallel.cli import main
from modelparallel.plan import load_plan

MODEL = "modelparallel.tensorflow.models:keras_gpt_factory"


def test_build_detects_keras_then_inspect_and_compare(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpt.plan.json"
    assert main(["build", MODEL, "-p", "2", "-m", "2", "--time-limit", "5", "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.partitions == 2 and plan.model.source == MODEL
    # a Keras model plans as smp does unless told otherwise (Note [layer granularity])
    assert (plan.config.granularity, plan.config.tied) == ("layer", "colocate")
    assert plan.model.example_shapes == {"arg0": [2, 16]}  # one microbatch of the batch of 4
    assert main(["inspect", str(out), "--stage", "1"]) == 0
    assert main(["compare", "modelparallel.tensorflow.models:keras_skip_factory", "-p", "2",
                 "--framework", "tensorflow", "--time-limit", "5"]) == 0
    assert "ilp" in capsys.readouterr().out
    op = tmp_path / "op.plan.json"
    assert main(["build", MODEL, "-p", "2", "-m", "2", "--time-limit", "5", "--granularity",
                 "op", "-o", str(op)]) == 0
    assert (load_plan(op).config.granularity, load_plan(op).config.tied) == ("op", "replicate")


def test_batch_not_divisible_by_microbatches_is_a_one_line_error(tmp_path: Path) -> None:
    assert main(["build", MODEL, "-p", "2", "-m", "3", "-o", str(tmp_path / "x.json")]) == 2


_BLOCK_TORCH = '''
import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name} is blocked: a TensorFlow user has no torch")
        return None


sys.meta_path.insert(0, _NoTorch())
'''


def test_keras_model_plans_without_torch(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_TORCH)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(site), str(root), os.environ.get("PYTHONPATH", "")])}
    code = textwrap.dedent(f"""
        import sys
        from modelparallel.cli import main
        code = main(["build", {MODEL!r}, "-p", "2", "-m", "2", "--time-limit", "5",
                     "-o", {str(tmp_path / "p.json")!r}])
        assert "torch" not in sys.modules, "torch was imported"
        raise SystemExit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "p.json").read_text())["model"]["source"] == MODEL
