"""The planner prices the memory features (Note [memory features]) and checkpoints only what
a plan needs to fit (``checkpointing="auto"``)."""

from __future__ import annotations

import pytest

from modelparallel.cost_model.device import stage_devices
from modelparallel.errors import InfeasiblePlanError
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import transformer_graph
from modelparallel.plan import PlanConfig


def _graph():  # type: ignore[no-untyped-def]
    return transformer_graph(layers=4, hidden=64, seq=32, batch=8)


def _peak(plan) -> int:  # type: ignore[no-untyped-def]
    return max(st.memory.peak for st in plan.stages)


def _acts(plan) -> int:  # type: ignore[no-untyped-def]
    return sum(st.memory.activations for st in plan.stages)


def test_each_feature_lowers_what_it_should() -> None:
    g = _graph()
    base = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe"), "h100", method="dp")
    for kw in ({"checkpointing": "all"}, {"offload_activations": True},
               {"precision": "bf16"}, {"active_microbatches": 1}):
        plan = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", **kw), "h100",
                         method="dp")
        assert _acts(plan) < _acts(base), kw
    ck = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", checkpointing="all"),
                   "h100", method="dp")
    assert ck.pipeline.step_time > base.pipeline.step_time  # recomputation costs time
    zero = partition(g, PlanConfig(2, microbatches=4, data_parallel=4,
                                   shard_optimizer_state=True), "h100", method="dp")
    opt = sum(st.memory.optimizer for st in zero.stages)
    assert opt * 4 == pytest.approx(sum(st.memory.optimizer for st in base.stages), rel=0.01)


def test_a_checkpointing_path_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match=r"\['transformer\.h\.O'\] hold no op"):
        partition(_graph(), PlanConfig(2, checkpointing=("transformer.h.0", "transformer.h.O")),
                  "h100", method="dp")


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_auto_checkpoints_the_fewest_regions_that_fit(method: str) -> None:
    g = _graph()
    cfg = PlanConfig(2, microbatches=4, schedule="gpipe")
    full = _peak(partition(g, cfg, "h100", method="dp"))
    least = _peak(partition(g, PlanConfig(2, microbatches=4, schedule="gpipe",
                                          checkpointing="all"), "h100", method="dp"))
    devices = stage_devices("h100", 2, memory=(full + least) // 2)
    with pytest.raises(InfeasiblePlanError, match="checkpointing='auto'"):
        partition(g, cfg, devices, method=method)
    plan = partition(g, PlanConfig(2, microbatches=4, schedule="gpipe", checkpointing="auto"),
                     devices, method=method)
    chosen = plan.config.checkpointing
    assert isinstance(chosen, tuple) and 0 < len(chosen) < 4, chosen
    assert _peak(plan) <= (full + least) // 2
    # the plan file keeps the choice
    from modelparallel.plan import Plan

    assert Plan.from_json(plan.to_json()).config.checkpointing == chosen


def _mlp_graph():  # type: ignore[no-untyped-def]
    import torch

    from modelparallel.tracer import trace

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256),
                                torch.nn.Linear(256, 256))
    return trace(model, (torch.randn(2, 256),)).graph


def test_autocast_dtypes_follow_the_device_lists() -> None:
    from modelparallel.partitioner.memory_features import autocast_half

    g = _mlp_graph()
    ln = next(nd.name for nd in g.nodes if nd.module_type == "LayerNorm")
    mm = [nd.name for nd in g.nodes if nd.module_type == "Linear"]
    assert all(autocast_half(g, "h100")[n] for n in mm)
    assert not autocast_half(g, "h100")[ln]  # float32 list on CUDA
    assert autocast_half(g, "cpu")[ln]  # not on the CPU's: follows its half input


def test_bf16_keeps_a_weight_copy_per_microbatch_in_flight() -> None:
    g = _mlp_graph()
    cfg = {"partitions": 1, "microbatches": 4, "schedule": "gpipe"}
    fp32 = partition(g, PlanConfig(**cfg), "h100", method="uniform").stages[0].memory
    bf16 = partition(g, PlanConfig(**cfg, precision="bf16"), "h100",
                     method="uniform").stages[0].memory
    weights = sum(p.nbytes for p in g.params if "1." not in p.name)  # the two linears
    assert bf16.activations >= 4 * weights // 2
    assert bf16.activations > fp32.activations  # small batch: the copies dominate
    assert (bf16.parameters, bf16.gradients) == (fp32.parameters, fp32.gradients)


def test_offload_and_checkpointing_keep_the_held_outputs_and_the_loss() -> None:
    from modelparallel.cost_model.costs import held_output_bytes

    g = _mlp_graph()
    held = sum(v + loss for v, loss in held_output_bytes(g).values())
    assert held == 2 * (2 * 256 * 4)  # the output and the loss's float32 copy of it
    for kw in ({"offload_activations": True}, {"checkpointing": ("0", "1", "2")}):
        mem = partition(g, PlanConfig(1, microbatches=4, schedule="gpipe", **kw), "h100",
                        method="uniform").stages[0].memory
        assert mem.activations >= 4 * held, kw


def test_data_parallel_gradient_all_reduce_is_priced() -> None:
    import dataclasses

    import numpy as np

    from modelparallel.cost_model import get_device_spec
    from modelparallel.partitioner.gradient_sync import (
        BUCKET_BYTES,
        allreduce_seconds,
        node_allreduce,
    )
    from modelparallel.partitioner.problem import build_problem
    from modelparallel.runtime.data_parallel import DEFAULT_BUCKET_BYTES

    assert BUCKET_BYTES == DEFAULT_BUCKET_BYTES
    g = _graph()
    slow = dataclasses.replace(get_device_spec("h100"), link_bandwidth=1e8)
    fast = dataclasses.replace(get_device_spec("h100"), link_bandwidth=1e18, link_latency=0.0)
    cfg = {"partitions": 1, "microbatches": 4, "schedule": "gpipe"}
    one = partition(g, PlanConfig(**cfg), slow, method="uniform").pipeline.step_time
    four = partition(g, PlanConfig(**cfg, data_parallel=4), slow, method="uniform")
    grads = sum(p.nbytes for p in g.params if p.trainable)
    ar = allreduce_seconds(grads, 4, slow)
    assert four.pipeline.step_time > one
    assert four.pipeline.step_time - one <= ar * (1 + 1e-9)  # overlap hides some
    assert any("all-reduce over 4 replicas" in n for n in four.solver.notes)
    hidden = partition(g, PlanConfig(**cfg, data_parallel=4), fast, method="uniform")
    assert hidden.pipeline.step_time == pytest.approx(
        partition(g, PlanConfig(**cfg), fast, method="uniform").pipeline.step_time)
    # every method sees it: the problem's per-node backward carries the exposed part
    p1 = build_problem(g, PlanConfig(**cfg), slow)
    p4 = build_problem(g, PlanConfig(**cfg, data_parallel=4), slow)
    a = node_allreduce(np.zeros(p1.n), 4, [slow])
    assert float(a.sum()) == 0.0
    assert float(p4.time.sum()) > float(p1.time.sum())
