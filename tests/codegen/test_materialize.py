"""Materialising one stage of a meta-device model (modelparallel/codegen/materialize.py): only its
own weights, from a checkpoint with alias names, refusing bad shapes."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from _stage_cases import RTOL, Case, make_plan, rel_err
from torch import nn

from modelparallel import models
from modelparallel.codegen import build_stage, materialize
from modelparallel.errors import ConfigError
from modelparallel.runtime.local import LocalPipeline
from modelparallel.tracer import trace


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Wide(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_materialize_one_stage_of_a_meta_model() -> None:
    width, depth, p = 2048, 8, 4  # 8 x 16 MiB of weights in all
    with torch.device("meta"):
        model = Wide(width, depth)
    traced = trace(model, (torch.randn(4, width, device="meta"),))
    plan = make_plan(traced, p, [0.25, 0.5, 0.75])
    program = build_stage(traced, plan, 1)
    assert all(t.is_meta for t in program.module.parameters())
    before = _rss()
    materialize(program, "cpu")
    grown = _rss() - before
    local = {program.param_names[n] for n, _ in program.module.named_parameters()}
    stage_bytes = sum(t.nbytes for t in program.module.parameters())
    total_bytes = sum(p.nbytes for p in traced.graph.params)
    assert 0 < stage_bytes < total_bytes / 2
    assert grown < stage_bytes + (total_bytes - stage_bytes) / 2, (grown, stage_bytes)
    for name, t in model.named_parameters():
        assert t.is_meta != (name in local), name
    assert all(not t.is_meta for t in program.module.parameters())
    assert program.module.get_parameter(sorted(local)[0]).detach().abs().sum().item() > 0


def test_materialize_from_checkpoint_with_alias_names(tmp_path: Any) -> None:
    torch.manual_seed(0)
    real = models.gpt2(size="tiny", batch_size=4)
    state = real.model.state_dict()
    tied = next(n for n in ("transformer.wte.weight", "lm_head.weight") if n in state)
    alias = "lm_head.weight" if tied == "transformer.wte.weight" else "transformer.wte.weight"
    state = {k: v for k, v in state.items() if k != tied}
    state[alias] = real.model.state_dict()[tied]
    torch.save(state, tmp_path / "ckpt.pt")
    meta = models.gpt2(size="tiny", batch_size=4, device="meta")
    traced = trace(meta.model, meta.args, meta.kwargs)
    plan = make_plan(traced, 3, [0.3, 0.7])
    stages = [materialize(build_stage(traced, plan, k), "cpu", state_dict=tmp_path / "ckpt.pt")
              for k in range(3)]
    ref = dict(real.model.named_parameters())
    for s in stages:
        for local, canonical in s.param_names.items():
            t = s.tensor(local)
            assert not t.is_meta
            if canonical in ref:
                assert torch.equal(t, ref[canonical]), local
    # each stage materialised its own copy of the tied weight: the pipeline sums their gradients
    name = next(p.name for p in traced.graph.params if p.aliases)
    assert stages[0].tensor(name) is not stages[2].tensor(name)
    c = Case(lambda: models.gpt2(size="tiny", batch_size=4))
    ref_model = c.reference
    ref_model.load_state_dict(real.model.state_dict())
    flat = traced.flatten_inputs(c.case.args, c.case.kwargs)
    pipe = LocalPipeline(stages, microbatches=2, loss_fn=c.case.loss_fn)
    loss, _ = pipe.train_step(flat, c.case.target)
    ref_loss = c.case.loss_fn(ref_model(*c.case.args, **c.case.kwargs), c.case.target)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    ref_grads = dict(ref_model.named_parameters())
    assert rel_err(stages[0].tensor(name).grad, ref_grads[name].grad) <= RTOL
    assert torch.equal(stages[0].tensor(name).grad, stages[2].tensor(name).grad)


def test_materialize_refuses_bad_shapes(tmp_path: Any) -> None:
    with torch.device("meta"):
        model = Wide(8, 2)
    traced = trace(model, (torch.randn(2, 8, device="meta"),))
    program = build_stage(traced, make_plan(traced, 2, [0.5]), 0)
    name = next(iter(program.param_names))
    with pytest.raises(ConfigError, match="shape"):
        materialize(program, "cpu", state_dict={name: torch.zeros(3)})
    with pytest.raises(ConfigError, match="strict"):
        materialize(program, "cpu", state_dict={}, strict=True)
