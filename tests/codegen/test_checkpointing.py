"""Activation checkpointing, offload and mixed precision on a one-process pipeline train like the
plain model (Note [checkpoint regions])."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import modelparallel
from modelparallel import models
from modelparallel.errors import ConfigError

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _train(features: dict[str, Any], *, steps: int = 2, dropout: float = 0.1,
           autocast: torch.dtype | None = None) -> tuple[float, float, int]:
    case = models.gpt2("tiny", batch_size=4, seq_len=16, dropout=dropout)
    ref = copy.deepcopy(case.model)
    pipe = modelparallel.pipeline(case.model, case.args[0], loss_fn=case.loss_fn,
                                  method="uniform", **features)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.05, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    loss_err = 0.0
    for i in range(steps):
        (x,), _, y = case.make_batch(4, 10 + i)
        opt.zero_grad()
        ropt.zero_grad()
        torch.manual_seed(i)
        res = pipe.step(x, y)
        torch.manual_seed(i)
        with torch.autocast("cpu", dtype=autocast) if autocast else torch.enable_grad():
            out = ref(x)
        loss = case.loss_fn(out, y)
        loss.backward()
        loss_err = max(loss_err, _rel(res.loss, loss.detach()))
        pipe.optimizer_step(opt)
        ropt.step()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    param_err = max(_rel(t.detach(), ref_params[n].detach()) for n, t in pipe.named_parameters())
    regions = sum(1 for n in pipe.program.module.graph.nodes
                  if n.op == "call_function" and getattr(n.target, "__name__", "").startswith(
                      "checkpointed_region"))
    return loss_err, param_err, regions


@pytest.mark.parametrize("features", [
    {"checkpointing": "all"},
    {"checkpointing": ("transformer.h.1",)},
    {"offload_activations": True},
    {"checkpointing": "all", "offload_activations": True},
])
def test_memory_features_train_like_the_plain_model(features: dict[str, Any]) -> None:
    """Dropout on: the recomputed forward replays the same masks."""
    loss_err, param_err, regions = _train(features)
    assert loss_err <= RTOL and param_err <= RTOL, (loss_err, param_err)
    if "checkpointing" in features:
        assert regions >= 1


def test_bf16_matches_autocast_training_to_bf16_tolerance() -> None:
    loss_err, param_err, _ = _train({"precision": "bf16"}, dropout=0.0,
                                    autocast=torch.bfloat16)
    assert loss_err <= 1e-2 and param_err <= 1e-2, (loss_err, param_err)


def test_checkpointing_saves_fewer_activations() -> None:
    """Bytes autograd keeps after the forward: a checkpointed stage keeps less."""
    from modelparallel.codegen import build_stage
    from modelparallel.codegen.checkpointing import apply_memory_features
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig
    from modelparallel.tracer import trace

    case = models.gpt2("tiny", batch_size=4, seq_len=32)
    traced = trace(case.model, case.args)
    plan = partition(traced.graph, PlanConfig(1), "cpu", method="uniform")
    kept = {}
    for mode in ("none", "all"):
        program = build_stage(traced, plan, 0)
        apply_memory_features(program, traced.graph, checkpointing=mode)
        total = [0]

        def pack(t: torch.Tensor, total: list[int] = total) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            program.run([case.args[0]], [])
        kept[mode] = total[0]
    assert kept["all"] < kept["none"] / 2, kept


def test_auto_must_be_resolved_by_the_planner() -> None:
    from modelparallel.codegen.checkpointing import apply_memory_features

    with pytest.raises(ConfigError, match="planner"):
        apply_memory_features(None, None, checkpointing="auto")  # type: ignore[arg-type]
