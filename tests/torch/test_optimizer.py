"""``smp.DistributedOptimizer`` with ``shard_optimizer_state`` (Note [smp sharded optimizer]):
ZeRO-1 over the data-parallel replicas trains like one device, writes SMP's ``_{pp}_{tp}_{rdp}``
files, and resumes exactly."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

from modelparallel.errors import UnsupportedFeatureError

pytestmark = pytest.mark.multiprocess


def _setup(seed: int) -> tuple[Any, Any, Any, nn.Module]:
    import modelparallel.torch as smp

    smp.init({"partitions": 1, "microbatches": 2, "ddp": True,
              "shard_optimizer_state": True})
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    dm = smp.DistributedModel(model)
    groups = [{"params": list(dm.module[0].parameters()), "weight_decay": 0.0},
              {"params": [p for m in list(dm.module)[1:] for p in m.parameters()]}]
    opt = smp.DistributedOptimizer(torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1))
    opt.sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return smp, dm, opt, ref


def _batches(step: int, dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + d)),
             torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(7 + step + d)))
            for d in range(dp)]


def _train(smp: Any, dm: Any, opt: Any, steps: range) -> list[float]:
    import torch.nn.functional as F

    @smp.step
    def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        loss = F.cross_entropy(model(x), y)
        model.backward(loss)
        return loss

    losses = []
    for s in steps:
        x, y = _batches(s, smp.dp_size())[smp.dp_rank()]
        opt.zero_grad()
        losses.append(float(train_step(dm, x, y).reduce_mean()))
        opt.step()
        opt.sched.step()
    return losses


def _sharded_job(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.nn.functional as F

    from modelparallel.torch.state_mod import shutdown

    try:
        smp, dm, opt, ref = _setup(0)
        first = _train(smp, dm, opt, range(2))
        smp.save_checkpoint(root, "step2", partial=True,
                            user_content={"sched": opt.sched.state_dict()})
        smp.save(opt.local_state_dict(), os.path.join(root, "opt.pt"), partial=True)
        shard = sum(v.numel() for st in opt.local_state_dict()["state"].values()
                    for k, v in st.items() if k == "exp_avg")
        try:
            opt.state_dict()
            full_refused = False
        except UnsupportedFeatureError:
            full_refused = True
        straight = _train(smp, dm, opt, range(2, 4))
        params = {n: p.detach().clone() for n, p in dm.module.named_parameters()}
        shutdown()
        smp, dm, opt, _ = _setup(5)  # other weights: the resume restores them
        opt.sched.load_state_dict(smp.resume_from_checkpoint(root, tag="step2")["sched"])
        resumed = _train(smp, dm, opt, range(2, 4))
        # one device on the replicas' concatenated batches, the same optimizer and schedule
        ref_opt = torch.optim.AdamW(
            [{"params": list(ref[0].parameters()), "weight_decay": 0.0},
             {"params": [p for m in list(ref)[1:] for p in m.parameters()]}],
            lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
        for s in range(4):
            b = _batches(s, world)
            ref_opt.zero_grad()
            F.cross_entropy(ref(torch.cat([x for x, _ in b])),
                            torch.cat([y for _, y in b])).backward()
            ref_opt.step()
            sched.step()
        diff = max(float((params[n] - p).abs().max()) for n, p in ref.named_parameters())
        return {"first": first, "straight": straight, "resumed": resumed, "diff": diff,
                "shard": shard, "total": sum(p.numel() for p in ref.parameters()),
                "full_refused": full_refused}
    finally:
        shutdown()


def test_sharded_optimizer_state_trains_saves_and_resumes_exactly(tmp_path: Path) -> None:
    results = [r.unwrap() for r in run_ranks(_sharded_job, 2, str(tmp_path))]
    for r in results:
        assert r["resumed"] == r["straight"], r  # exactly
        assert r["diff"] < 1e-5, r
        assert 0 < r["shard"] < r["total"] and r["full_refused"], r
    assert results[0]["shard"] + results[1]["shard"] == results[0]["total"]
    assert sorted(p.name for p in (tmp_path / "step2_partial").iterdir()) == [
        "model_0_0_0.pt", "optimizer_0_0_0.pt", "optimizer_0_0_1.pt", "partition.json",
        "user_content.pt"]
    assert (tmp_path / "opt.pt_0_0_0").is_file() and (tmp_path / "opt.pt_0_0_1").is_file()
