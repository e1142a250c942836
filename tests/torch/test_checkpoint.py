"""Checkpoints: SMP's file names and layout, atomic writes, exact resume, a full checkpoint
into another number of partitions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

from modelparallel.torch.checkpoint import atomic_write


def _mlp(world: int, seed: int, other: bool = False) -> nn.Module:
    """Layers spread evenly; ``other``: the first on partition 0, the rest on the last."""
    import modelparallel.torch as smp

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    for i, layer in enumerate(model):
        even = min(world - 1, i * world // len(model))
        smp.set_partition(layer, (0 if i == 0 else world - 1) if other else even)
    return model


def _train(smp: Any, dm: Any, opt: Any, steps: range) -> list[float]:
    import torch.nn.functional as F

    @smp.step
    def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        loss = F.cross_entropy(model(x), y)
        model.backward(loss)
        return loss

    losses = []
    for s in steps:
        g = torch.Generator().manual_seed(100 + s)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        losses.append(float(train_step(dm, x, y).reduce_mean()))
        opt.step()
    return losses


def _setup(world: int, seed: int, opt_name: str, other: bool = False) -> tuple[Any, Any, Any]:
    import modelparallel.torch as smp

    smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
              "default_partition": 0})
    dm = smp.DistributedModel(_mlp(world, seed, other))
    params = dm.parameters()
    opt = (torch.optim.AdamW(params, lr=1e-2) if opt_name == "adamw"
           else torch.optim.SGD(params, lr=0.1, momentum=0.9))
    return smp, dm, smp.DistributedOptimizer(opt)


def _resume_job(rank: int, world: int, root: str, opt_name: str) -> dict[str, Any]:
    from modelparallel.torch.state_mod import shutdown

    try:
        smp, dm, opt = _setup(world, 0, opt_name)
        first = _train(smp, dm, opt, range(2))
        smp.save_checkpoint(root, "step2", partial=True, user_content={"step": 2})
        smp.save_checkpoint(root, "full2", partial=False, user_content={"step": 2})
        smp.save(dm.local_state_dict(), os.path.join(root, "model.pt"), partial=True)
        straight = _train(smp, dm, opt, range(2, 4))
        shutdown()
        smp, dm, opt = _setup(world, 123, opt_name)  # other weights: the resume must fix them
        content = smp.resume_from_checkpoint(root, tag="step2")
        resumed = _train(smp, dm, opt, range(2, 4))
        loaded = smp.load(os.path.join(root, "model.pt"), partial=True)
        return {"first": first, "straight": straight, "resumed": resumed, "content": content,
                "newest": (Path(root) / "newest").read_text(), "loaded": sorted(loaded)}
    finally:
        shutdown()


@pytest.mark.multiprocess
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_resume_gives_exactly_the_same_losses(tmp_path: Path, opt_name: str) -> None:
    results = [r.unwrap() for r in run_ranks(_resume_job, 2, str(tmp_path), opt_name)]
    for r in results:
        assert r["resumed"] == r["straight"]  # exactly
        assert r["content"] == {"step": 2} and r["newest"] == "full2"
        assert "_smp_is_partial" in r["loaded"]
    names = sorted(p.name for p in (tmp_path / "step2_partial").iterdir())
    assert names == ["model_0_0_0.pt", "model_1_0_0.pt", "optimizer_0_0_0.pt",
                     "optimizer_1_0_0.pt", "partition.json", "user_content.pt"]
    assert (tmp_path / "full2").is_file() and (tmp_path / "user_content_full2").is_file()
    assert (tmp_path / "model.pt_0").is_file() and (tmp_path / "model.pt_1").is_file()
    # A full checkpoint of the 2-stage run loads into one partition and trains the same.
    from modelparallel.torch.state_mod import shutdown

    try:
        smp, dm, _ = _setup(1, 7, opt_name)
        assert smp.resume_from_checkpoint(str(tmp_path), partial=False) == {"step": 2}
        full = torch.load(tmp_path / "full2", weights_only=False)
        for k, v in dm.module.state_dict().items():
            assert torch.equal(v, full[k])
    finally:
        shutdown()


def _plan_reuse_job(rank: int, world: int, root: str) -> dict[str, Any]:
    from modelparallel.torch.state_mod import shutdown

    try:
        smp, dm, opt = _setup(world, 0, "adamw")
        _train(smp, dm, opt, range(2))
        smp.save_checkpoint(root, "step2", partial=True)
        saved_local = sorted(n for n, _ in dm.local_named_parameters())
        straight = _train(smp, dm, opt, range(2, 4))
        shutdown()
        # The resumed script places the layers elsewhere: the checkpoint's partition wins.
        smp, dm, opt = _setup(world, 123, "adamw", other=True)
        smp.resume_from_checkpoint(root, tag="step2")
        resumed = _train(smp, dm, opt, range(2, 4))
        resumed_local = sorted(n for n, _ in dm.local_named_parameters())
        shutdown()
        smp, dm, opt = _setup(world, 123, "adamw", other=True)  # without the resume
        _train(smp, dm, opt, range(1))
        return {"saved_local": saved_local, "straight": straight, "resumed": resumed,
                "resumed_local": resumed_local,
                "other_local": sorted(n for n, _ in dm.local_named_parameters())}
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_resume_reuses_the_saved_partition(tmp_path: Path) -> None:
    results = [r.unwrap() for r in run_ranks(_plan_reuse_job, 2, str(tmp_path))]
    for r in results:
        assert r["resumed_local"] == r["saved_local"]
        assert r["resumed"] == r["straight"]  # exactly
    assert results[0]["saved_local"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert results[0]["other_local"] == ["0.bias", "0.weight"]  # the placement would differ


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    with atomic_write(target) as f:
        f.write(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # the job killed during the save
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL (no Python cleanup at all) half-way through a write: the old file loads."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "model.pt_0"
    with atomic_write(target) as f:
        torch.save({"w": torch.ones(3)}, f)
    code = (
        "import os, signal, sys, torch\n"
        "from modelparallel.torch.checkpoint import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f:\n"
        "    torch.save({'w': torch.zeros(1 << 16)}, f)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))

