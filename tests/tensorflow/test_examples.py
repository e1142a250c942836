"""The SMP-style TensorFlow example runs on CPU, trains, uses every stage and checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smp_tf_mnist_runs(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SM_HP_MP_PARAMETERS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "smp_tf_mnist.py"), "--steps", "6",
         "--batch-size", "16", "--checkpoint-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages used: [0, 1] of 2" in proc.stdout
    assert (tmp_path / "checkpoint").is_file()
