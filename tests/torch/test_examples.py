"""The SMP example scripts run as written under torchrun (2 CPU ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_smp_mnist_trains_and_resumes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "examples" / "smp_mnist.py"), "--epochs", "1", "--max-steps", "3",
           "--checkpoint-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Partition assignments:" in first.stdout and "Test set:" in first.stdout
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after epoch 1" in again.stdout and "Train Epoch: 2" in again.stdout
    assert (tmp_path / "newest").read_text() == "epoch2"
    assert (tmp_path / "pt_mnist_checkpoint.pt_0").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_smp_gpt2_runs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "examples" / "smp_gpt2.py"), "--max-steps", "5", "--logits-output", "1",
           "--checkpoint-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 5 loss" in out.stdout and "validation loss" in out.stdout
    assert (tmp_path / "newest").read_text() == "total_steps5"
