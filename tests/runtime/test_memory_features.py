"""The memory features on real gloo processes: checkpointing, active microbatches and ZeRO-1
train like one process; fp16 overflow skips the same step on every rank."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import pytest
import torch
from _dist import run_ranks

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def features_job(rank: int, world: int, features: dict[str, Any], p: int, dp: int,
                 steps: int, folder: str) -> dict[str, Any]:
    import modelparallel
    from modelparallel import models
    from modelparallel.runtime.zero import load_sharded, save_sharded

    case = models.gpt2("tiny", batch_size=4 * dp, seq_len=16)
    ref = copy.deepcopy(case.model)
    pipe = modelparallel.pipeline(case.model, case.args[0][:4], loss_fn=case.loss_fn,
                                  partitions=p, data_parallel=dp, microbatches=4,
                                  schedule="gpipe", method="uniform", timeout=60, **features)
    opt = pipe.make_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    ran = []
    d = pipe.dp_rank
    for i in range(steps):
        (x,), _, y = case.make_batch(4 * dp, 10 + i)
        opt.zero_grad()
        ropt.zero_grad()
        if features.get("precision") == "fp16" and i == 1 and rank == 0:
            hook = next(pipe.parameters()).register_hook(lambda g: g * float("inf"))
        pipe.step(x[4 * d:4 * d + 4], y[4 * d:4 * d + 4])
        if features.get("precision") == "fp16" and i == 1 and rank == 0:
            hook.remove()
        ran.append(pipe.optimizer_step(opt))
        case.loss_fn(ref(x), y).backward()
        ropt.step()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    err = max(_rel(t.detach(), ref_params[n].detach()) for n, t in pipe.named_parameters())
    out: dict[str, Any] = {"param_err": err, "ran": ran,
                           "scale": pipe.scaler.scale if pipe.scaler is not None else None}
    if features.get("shard_optimizer_state"):
        prefix = os.path.join(folder, "opt.pt")
        path = save_sharded(opt, prefix, pipe.stage, d)
        before = {k: v["momentum_buffer"].clone() for k, v in opt.optim.state_dict()["state"]
                  .items()}
        load_sharded(opt, prefix, pipe.stage, d)
        after = opt.optim.state_dict()["state"]
        out["path"] = os.path.basename(path)
        out["resumed"] = all(torch.equal(after[k]["momentum_buffer"], v)
                             for k, v in before.items())
        out["shard_elems"] = sum(v.numel() for v in before.values())
        out["total_elems"] = sum(t.numel() for t in pipe.parameters())
    pipe.close()
    return out


def _run(features: dict[str, Any], p: int, dp: int, steps: int = 3) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        return [r.unwrap() for r in run_ranks(features_job, p * dp, features, p, dp, steps,
                                              folder, timeout=300)]


@pytest.mark.parametrize("features", [{"checkpointing": "all"}, {"active_microbatches": 2},
                                      {"offload_activations": True}])
def test_pipelined_memory_features_match_one_process(features: dict[str, Any]) -> None:
    for r in _run(features, 2, 1):
        assert r["param_err"] <= RTOL, r


def test_optimizer_state_sharding_matches_and_resumes() -> None:
    """p = 1 × dp = 2 with ZeRO-1: each replica holds part of the momentum, training equals
    one process, and the shards saved as f"{f}_{pp}_{tp}_{rdp}" load back."""
    reports = _run({"shard_optimizer_state": True}, 1, 2)
    for r in reports:
        assert r["param_err"] <= RTOL and r["resumed"], r
        assert 0 < r["shard_elems"] < r["total_elems"], r
    assert sorted(r["path"] for r in reports) == ["opt.pt_0_0_0", "opt.pt_0_0_1"]


def test_fp16_overflow_skips_the_same_step_on_every_rank() -> None:
    reports = _run({"precision": "fp16"}, 2, 1)
    assert [r["ran"] for r in reports] == [[True, False, True]] * 2, reports
    assert reports[0]["scale"] == reports[1]["scale"] == 2.0**15
