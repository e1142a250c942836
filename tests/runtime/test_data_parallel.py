"""Data parallelism across pipeline replicas on real gloo processes: p stages × dp replicas
train like one process on the concatenated batch (Note [data-parallel gradient sync])."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import run_ranks

from modelparallel.errors import UnevenDataError

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5


def _case(name: str, batch: int) -> Any:
    from modelparallel import models

    return {"gpt2": lambda: models.gpt2("tiny", batch_size=batch, seq_len=16),
            "cnn": lambda: models.resnet_tiny(batch_size=batch, image_size=8, width=8),
            "mlp": lambda: models.skip_mlp(batch_size=batch)}[name]()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _shard(value: Any, index: int, parts: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        n = value.shape[0] // parts
        return value[index * n:(index + 1) * n]
    return value


def dp_parity_job(rank: int, world: int, model: str, p: int, dp: int, schedule: str,
                  m: int, steps: int, strategy: str = "cluster", v: int = 1
                  ) -> dict[str, Any]:
    """``steps`` SGD (momentum) steps through ``p × dp`` ranks and in one process on the global batch;
    this rank's largest relative errors."""
    import modelparallel
    from modelparallel.parallel import ParallelOptions

    global_batch = 4 * dp
    case = _case(model, global_batch)
    ref = copy.deepcopy(case.model)
    batches = [case.make_batch(global_batch, 100 + i) for i in range(steps)]
    pipe = modelparallel.pipeline(
        case.model, _shard(case.args[0], 0, dp) if len(case.args) == 1 else None,
        loss_fn=case.loss_fn, partitions=p, microbatches=m, schedule=schedule,
        virtual_stages=v, parallel=ParallelOptions(data_parallel=dp, placement_strategy=strategy,
                                 bucket_cap_mb=0.01),
        method="dp" if v > 1 else "uniform", timeout=60)
    d = pipe.dp_rank
    opt = torch.optim.SGD(pipe.parameters(), lr=0.05, momentum=0.9)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    loss_err = 0.0
    for args, kwargs, target in batches:
        opt.zero_grad()
        ropt.zero_grad()
        mine = tuple(_shard(a, d, dp) for a in args)
        res = pipe.step(mine if len(mine) != 1 else mine[0], _shard(target, d, dp))
        ref_out = ref(*args, **kwargs)
        ref_loss = case.loss_fn(ref_out, target)
        ref_loss.backward()
        replica_loss = case.loss_fn(ref(*mine), _shard(target, d, dp))
        loss_err = max(loss_err, _rel(res.loss, replica_loss.detach()))
        opt.step()
        ropt.step()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    errs = {name: _rel(t.detach(), ref_params[name].detach())
            for name, t in pipe.named_parameters()}
    pipe.close()
    return {"loss_err": loss_err, "param_err": max(errs.values(), default=0.0),
            "worst": max(errs, key=errs.get, default=""), "stage": pipe.stage, "dp_rank": d,
            "held": sorted(errs)}


def _check(results: list[Any], p: int, dp: int) -> None:
    reports = [r.unwrap() for r in results]
    for rank, r in enumerate(reports):
        assert r["loss_err"] <= RTOL and r["param_err"] <= RTOL, (rank, r)
    assert sorted((r["stage"], r["dp_rank"]) for r in reports) == sorted(
        (s, d) for s in range(p) for d in range(dp))


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_data_parallel_one_stage_two_replicas(model: str) -> None:
    """p = 1 × dp = 2: two replicas of a one-stage pipeline equal one process on the
    concatenated batch (tied GPT-2 weights included)."""
    _check(run_ranks(dp_parity_job, 2, model, 1, 2, "1f1b", 2, 3, timeout=240), 1, 2)


@pytest.mark.parametrize(("model", "schedule"), [("gpt2", "1f1b"), ("cnn", "gpipe")])
def test_data_parallel_by_pipeline_on_four_ranks(model: str, schedule: str) -> None:
    """p = 2 × dp = 2 on 4 gloo ranks equals single-process training to fp32 rounding."""
    _check(run_ranks(dp_parity_job, 4, model, 2, 2, schedule, 2, 2, timeout=400), 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "schedule"), [("gpt2", "gpipe"), ("cnn", "1f1b")])
def test_data_parallel_by_pipeline_other_schedules(model: str, schedule: str) -> None:
    _check(run_ranks(dp_parity_job, 4, model, 2, 2, schedule, 2, 2, "spread", timeout=400),
           2, 2)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "schedule", "v"), [("gpt2", "1f1b", 2), ("mlp", "zb-h1", 1)])
def test_data_parallel_with_virtual_stages_and_split_backward(model: str, schedule: str,
                                                              v: int) -> None:
    """Interleaved 1F1B (v = 2) and ZB-H1 (weight gradients written outside the hooks) on
    2 × 2 ranks."""
    _check(run_ranks(dp_parity_job, 4, model, 2, 2, schedule, 4, 2, "cluster", v,
                     timeout=400), 2, 2)


def uneven_job(rank: int, world: int, mode: str) -> str:
    import modelparallel

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    pipe = modelparallel.pipeline(model, torch.randn(4, 4), loss_fn=torch.nn.functional.mse_loss,
                                  partitions=1, data_parallel=2, method="uniform", timeout=20)
    if mode == "shape":
        n = 4 if rank == 0 else 6
        pipe.step(torch.randn(n, 4), torch.randn(n, 1))
        return "no error"
    batches = 3 if rank == 0 else 2
    for _ in range(batches):
        pipe.step(torch.randn(4, 4), torch.randn(4, 1))
    pipe.close()
    return "done"


def test_replicas_with_different_batch_shapes_raise_on_every_rank() -> None:
    results = run_ranks(uneven_job, 2, "shape", timeout=120)
    assert all(r.error_type == UnevenDataError.__name__ for r in results), results


def test_a_replica_with_a_batch_fewer_ends_with_a_named_error() -> None:
    results = run_ranks(uneven_job, 2, "count", timeout=120)
    assert results[0].error_type == UnevenDataError.__name__, results[0]
    assert results[0].seconds < 60
