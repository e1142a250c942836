"""On CUDA: the single-process pipeline trains to parity, and calibration gives a usable spec.

Every test here is marked ``gpu`` and skipped where CUDA is not available (CI has none; run them
on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``).

Parity tolerance: ``RTOL = 1e-5`` (relative, on the loss, the output and every parameter
gradient's norm), with TF32 off for matrix products and convolutions: the same bound as on the
CPU (``tests/codegen/test_build.py``). On CUDA, float32 reductions are not bitwise reproducible across
shapes: cuBLAS and cuDNN choose other kernels (other blocking, split-K) for a microbatch than
for the whole batch, and some backward kernels accumulate with atomics, so sums come out in
another order, each off by a few float32 ulps. The worst error seen on an H100 was 4e-7
(``c_attn.weight`` of GPT-2, 4 microbatches; the test prints it), so 1e-5 leaves a margin of 25
while any real mistake (a missing microbatch, a wrong scale, a gradient left out) is an error of
1e-2 or more. The multi-step test trains with SGD: Adam divides each gradient entry by its own
running magnitude, so for entries whose gradient is rounding noise around zero (a bias that
starts at zero) it turns a 1e-7 difference into a step of ``lr``, and parameters after Adam
steps agree only to about ``lr`` (7e-4 relative was seen), which says nothing about the
pipeline.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modelparallel import models
from modelparallel.cli import main
from modelparallel.codegen import build_stages
from modelparallel.cost_model import load_device_spec
from modelparallel.ir import input_derived_nodes
from modelparallel.partitioner import evaluate_assignment
from modelparallel.plan import Plan, PlanConfig, load_plan
from modelparallel.runtime.local import LocalPipeline
from modelparallel.tracer import TracedModel, trace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

RTOL = 1e-5
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Exact float32 matrix products and convolutions (TF32 is 1e-3 relative)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cuts(traced: TracedModel, p: int, fractions: list[float]) -> Plan:
    """A plan cutting the assignable nodes at the given fractions (often inside blocks)."""
    derived = input_derived_nodes(traced.graph)
    names = [n.name for n in traced.graph.nodes if n.name not in derived]
    cuts = [int(f * len(names)) for f in fractions]
    assignment = {name: sum(i >= c for c in cuts) for i, name in enumerate(names)}
    assignment[traced.graph.output.name] = p - 1
    return evaluate_assignment(traced.graph, PlanConfig(partitions=p, microbatches=4), "h100",
                               assignment)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


MAKERS: dict[str, Callable[[], models.ModelCase]] = {
    "gpt2": lambda: models.gpt2("tiny", batch_size=8, device=DEVICE),
    "cnn": lambda: models.resnet_tiny(batch_size=8, device=DEVICE),
    "skip": lambda: models.skip_mlp(batch_size=8, device=DEVICE),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize(("p", "fractions", "microbatches", "schedule"), [
    (2, [0.5], 1, "gpipe"),
    (3, [0.3, 0.55], 4, "1f1b"),
    (4, [0.1, 0.45, 0.8], 4, "gpipe"),
], ids=["p2-m1", "p3-m4-1f1b", "p4-m4-gpipe"])
def test_local_pipeline_parity_on_cuda(name: str, p: int, fractions: list[float],
                                       microbatches: int, schedule: str) -> None:
    case = MAKERS[name]()
    reference = copy.deepcopy(case.model)
    traced = trace(case.model, case.args, case.kwargs)
    stages = build_stages(traced, _cuts(traced, p, fractions))
    pipe = LocalPipeline(stages, microbatches=microbatches, loss_fn=case.loss_fn,
                         schedule=schedule, devices=[DEVICE] * p)
    for stage in stages:
        assert all(t.is_cuda for t in stage.module.parameters())
    loss, out = pipe.train_step(traced.flatten_inputs(case.args, case.kwargs), case.target)
    ref_out = reference(*case.args, **case.kwargs)
    ref_loss = case.loss_fn(ref_out, case.target)
    ref_loss.backward()
    errors = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
    ref = dict(reference.named_parameters())
    for pname, param in case.model.named_parameters():
        if ref[pname].grad is None:
            continue
        assert param.grad is not None and param.grad.is_cuda, pname
        errors[pname] = _rel(param.grad, ref[pname].grad)
    first = torch.utils._pytree.tree_leaves(out)[0]
    errors["output"] = _rel(first, torch.utils._pytree.tree_leaves(ref_out)[0].detach())
    worst = max(errors, key=lambda k: errors[k])
    print(f"{name} p={p} m={microbatches}: worst relative error {errors[worst]:.2e} ({worst})")
    assert len(errors) > 3
    assert errors[worst] <= RTOL, (worst, errors[worst])


def test_training_steps_track_single_device_training_on_cuda() -> None:
    """Three SGD steps through a 3-stage pipeline follow single-device training."""
    case = models.gpt2("tiny", batch_size=8, device=DEVICE)
    reference = copy.deepcopy(case.model)
    traced = trace(case.model, case.args, case.kwargs)
    pipe = LocalPipeline(build_stages(traced, _cuts(traced, 3, [0.3, 0.7])), microbatches=4,
                         loss_fn=case.loss_fn, schedule="1f1b", devices=[DEVICE] * 3)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        args, kwargs, target = case.make_batch(8, 100 + step)
        opt.zero_grad()
        loss, _ = pipe.train_step(traced.flatten_inputs(args, kwargs), target)
        opt.step()
        ref_opt.zero_grad()
        ref_loss = case.loss_fn(reference(*args, **kwargs), target)
        ref_loss.backward()
        ref_opt.step()
        assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item()), step
    ref = dict(reference.named_parameters())
    for pname, param in case.model.named_parameters():
        assert _rel(param.detach(), ref[pname].detach()) <= RTOL, pname


def test_profile_node_times_on_cuda_measure_device_time() -> None:
    """Profiling on CUDA times every compute node; big matrix products dominate, and views
    (no kernel) cost next to nothing however slow their host-side call is."""
    from modelparallel.cost_model.measure import profile_node_times

    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.GELU(),
                                torch.nn.Flatten(0), torch.nn.Unflatten(0, (512, 4096)),
                                torch.nn.Linear(4096, 4096)).to(DEVICE)
    gm = torch.fx.symbolic_trace(model)
    times = profile_node_times(gm, [torch.randn(512, 4096, device=DEVICE)], repeat=10)
    assert set(times) == {"_0", "_1", "_2", "_3", "_4"}
    assert times["_0"][0] > 0 and times["_0"][1] > 0
    assert times["_4"][1] > 1.5 * times["_4"][0]      # backward: two products, forward: one
    assert times["_2"][0] + times["_3"][0] < 0.1 * times["_0"][0]


def test_calibrate_on_cuda_gives_a_spec_build_accepts(tmp_path: Path) -> None:
    spec_path = tmp_path / "gpu.json"
    assert main(["calibrate", "-o", str(spec_path), "--quick"]) == 0
    spec = load_device_spec(spec_path)
    assert spec.extra["product"] == torch.cuda.get_device_name()
    assert spec.peak_flops["bfloat16"] > spec.peak_flops["float32"] > 1e12
    assert spec.memory_bandwidth > 1e11
    assert spec.memory_bytes == pytest.approx(torch.cuda.get_device_properties(0).total_memory,
                                              rel=0.02)
    plan_path = tmp_path / "plan.json"
    assert main(["build", "modelparallel.models:skip_mlp", "-p", "2", "-m", "2",
                 "--device", str(spec_path), "-o", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    assert plan.devices[0].name == spec.name and plan.partitions == 2


def test_calibrate_ops_out_on_cuda_feeds_build_measured(tmp_path: Path) -> None:
    spec_path, ops, plan_path = tmp_path / "gpu.json", tmp_path / "ops.json", tmp_path / "p.json"
    assert main(["calibrate", "-o", str(spec_path), "--quick", "--model",
                 "modelparallel.models:skip_mlp", "-m", "2", "--ops-out", str(ops)]) == 0
    data: dict[str, Any] = json.loads(ops.read_text())
    assert data["device"] == torch.cuda.get_device_name()
    # Note [call overhead]: a stage's module call and autograd's start cost host time
    assert 0 < data["call_overhead"]["forward"] < data["call_overhead"]["backward"] < 0.05
    assert data["nodes"] and all(f >= 0 and b >= 0 for f, b in data["nodes"].values())
    assert main(["build", "modelparallel.models:skip_mlp", "-p", "2", "-m", "2", "--device",
                 str(spec_path), "--measured", str(ops), "-o", str(plan_path)]) == 0
    plan = load_plan(plan_path)
    for node in plan.nodes:
        if node.name in data["nodes"]:
            assert node.forward_time == pytest.approx(data["nodes"][node.name][0])
