"""SMP's ``fp16`` and ``bf16`` config keys on the runtime's mixed precision (Note [smp fp16]):
the loss scaler's rules, bf16 training against single-device autocast, and an injected fp16
overflow that every rank skips, and the loss scaler's state in a checkpoint."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

from modelparallel.errors import ConfigError, UnsupportedFeatureError
from modelparallel.torch.fp16 import LossScaler


def test_loss_scaler_follows_smps_dynamic_rules() -> None:
    s = LossScaler.from_smp(None, True, {"dynamic_loss_args": {
        "init_scale": 16.0, "scale_window": 2, "delayed_shift": 2, "min_scale": 4.0}})
    s.update_scale(True)  # the first overflow only uses up the hysteresis
    assert s.loss_scale == 16.0
    s.update_scale(True)
    assert s.loss_scale == 8.0
    for _ in range(2):  # a clean window doubles it
        s.update_scale(False)
    assert s.loss_scale == 16.0
    for _ in range(4):
        s.update_scale(True)
    assert s.loss_scale == 4.0  # never below min_scale
    again = LossScaler(dynamic=True)
    again.load_state_dict(s.state_dict())
    assert again.state_dict() == s.state_dict()
    static = LossScaler.from_smp(128.0, False, {})
    static.update_scale(True)
    assert static.loss_scale == 128.0 and not static.dynamic
    with pytest.raises(ConfigError, match="unknown dynamic_loss_args"):
        LossScaler.from_smp(None, True, {"growth": 2})


def test_loss_scaling_arguments_need_fp16() -> None:
    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": 1})
        opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
        with pytest.raises(UnsupportedFeatureError, match="'fp16': True"):
            smp.DistributedOptimizer(opt, static_loss_scale=None, dynamic_loss_scale=True)
    finally:
        shutdown()


def _mlp(world: int) -> nn.Module:
    import modelparallel.torch as smp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 4))
    for i, layer in enumerate(model):
        smp.set_partition(layer, min(world - 1, i * world // len(model)))
    return model


def _precision_job(rank: int, world: int, key: str) -> dict[str, Any]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    dtype = torch.float16 if key == "fp16" else torch.bfloat16
    m, steps = 2, 3
    try:
        smp.init({"partitions": world, "microbatches": m, "auto_partition": False,
                  "default_partition": 0, key: True})
        model = _mlp(world)
        ref = copy.deepcopy(model)
        dm = smp.DistributedModel(model)
        scaling: dict[str, Any] = ({"static_loss_scale": None, "dynamic_loss_scale": True,
                                    "dynamic_loss_args": {"init_scale": 2.0**10}}
                                   if key == "fp16" else {})
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1), **scaling)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        dtypes: list[str] = []

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            out = model(x)
            dtypes.append(str(out.dtype))
            loss = F.mse_loss(out.float(), y)
            model.backward(loss)
            return loss

        overflow, scales = [], []
        for i in range(steps):
            g = torch.Generator().manual_seed(10 + i)
            x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
            opt.zero_grad()
            hook = None
            if key == "fp16" and i == 1 and rank == 0:  # an overflow on one rank only
                hook = next(dm.local_parameters()).register_hook(lambda g: g * float("inf"))
            train_step(dm, x, y)
            if hook is not None:
                hook.remove()
            opt.step()
            overflow.append(opt.overflow)
            scales.append(opt.loss_scaler.loss_scale if key == "fp16" else None)
            # single device, the same microbatches under the same autocast
            ref_opt.zero_grad()
            for xs, ys in zip(x.chunk(m), y.chunk(m)):
                with torch.autocast("cpu", dtype=dtype):
                    out = ref(xs)
                (F.mse_loss(out.float(), ys) / m).backward()
            if not (key == "fp16" and i == 1):
                ref_opt.step()
        full = dm.state_dict()
        err = max(float((full[k] - v).abs().max() / v.abs().max())
                  for k, v in ref.state_dict().items())
        moved = max(float((full[k] - v).abs().max())
                    for k, v in _mlp(world).state_dict().items())
        return {"err": err, "moved": moved, "overflow": overflow, "scales": scales,
                "dtypes": sorted(set(dtypes))}
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_bf16_trains_like_single_device_autocast() -> None:
    for r in [r.unwrap() for r in run_ranks(_precision_job, 2, "bf16")]:
        assert r["dtypes"] == ["torch.bfloat16"], r  # every stage ran under bf16
        assert r["err"] < 1e-2 and r["moved"] > 1e-3, r  # bf16 tolerance; it trained
        assert r["overflow"] == [False] * 3


@pytest.mark.multiprocess
def test_fp16_overflow_skips_the_same_step_on_every_rank() -> None:
    results = [r.unwrap() for r in run_ranks(_precision_job, 2, "fp16")]
    for r in results:
        assert r["overflow"] == [False, True, False], r
        assert r["scales"] == [2.0**10, 2.0**9, 2.0**9], r
        assert r["dtypes"] == ["torch.float16"] and r["err"] < 1e-2, r
    assert results[0]["err"] == results[1]["err"]  # the same full model on both ranks


def _scaler_resume_job(rank: int, world: int, root: str) -> dict[str, Any]:
    """An fp16 run whose scale halved at an overflow, saved and resumed in a fresh job with
    another initial scale: the loss scaler's state comes back from the checkpoint."""
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    def setup(init_scale: float) -> tuple[Any, Any]:
        smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
                  "default_partition": 0, "fp16": True})
        dm = smp.DistributedModel(_mlp(world))
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1),
                                       static_loss_scale=None, dynamic_loss_scale=True,
                                       dynamic_loss_args={"init_scale": init_scale})
        return dm, opt

    @smp.step
    def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        loss = F.mse_loss(model(x).float(), y)
        model.backward(loss)
        return loss

    try:
        dm, opt = setup(2.0**10)
        for i in range(2):
            g = torch.Generator().manual_seed(10 + i)
            x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
            opt.zero_grad()
            hook = (next(dm.local_parameters()).register_hook(lambda g: g * float("inf"))
                    if i == 1 and rank == 0 else None)
            train_step(dm, x, y)
            if hook is not None:
                hook.remove()
            opt.step()
        saved = opt.loss_scaler.state_dict()
        smp.save_checkpoint(root, "s", partial=True)
        shutdown()
        dm, opt = setup(2.0**4)
        smp.resume_from_checkpoint(root, tag="s")
        return {"saved": saved, "resumed": opt.loss_scaler.state_dict(),
                "scale": opt.loss_scaler.loss_scale}
    finally:
        shutdown()


@pytest.mark.multiprocess
def test_fp16_loss_scaler_state_is_checkpointed(tmp_path: Any) -> None:
    for r in [r.unwrap() for r in run_ranks(_scaler_resume_job, 2, str(tmp_path))]:
        assert r["scale"] == 2.0**9, r  # halved at the overflow, not the new job's 2**4
        assert r["resumed"] == r["saved"], r
    assert sorted(p.name for p in (tmp_path / "s_partial").glob("fp16_states_*")) == [
        "fp16_states_0_0_0.pt", "fp16_states_1_0_0.pt"]
