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


def _mlp(world: int, seed: int) -> nn.Module:
    import modelparallel.torch as smp

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    for i, layer in enumerate(model):
        smp.set_partition(layer, min(world - 1, i * world // len(model)))
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


def _setup(world: int, seed: int, opt_name: str) -> tuple[Any, Any, Any]:
    import modelparallel.torch as smp

    smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
              "default_partition": 0})
    dm = smp.DistributedModel(_mlp(world, seed))
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


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    with atomic_write(target) as f:
        f.write(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # the job killed during the save
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
