"""The step's result on every rank (Note [early result]): the loss and outputs of every kind of
step, first and later steps of a shape key, equal a single-process run on every rank; turning
the early exchange and the receives ahead off (Note [receives ahead]) changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import cut_plan, run_ranks
from torch import nn

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def result_job(rank: int, world: int, schedule: str, early: bool, lookahead: int
               ) -> dict[str, float]:
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.tracer import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    m, loss_fn = 4, nn.functional.mse_loss
    traced = trace(model, (torch.randn(2, 6),))
    plan = cut_plan(traced.graph, [k / world for k in range(1, world)], microbatches=m)
    prog = build_stage(traced, plan, rank)
    torch.distributed.barrier()
    comm = StageComm.create(rank, list(range(world)), "cpu", 60.0)
    ex = StageExecutor(prog, comm, loss_fn=loss_fn, schedule=schedule,
                       split=resolve_split(prog.input_names, m), early_result=early,
                       lookahead=lookahead)
    errs: dict[str, float] = {}

    def err(key: str, got: torch.Tensor, want: torch.Tensor) -> None:
        errs[key] = max(errs.get(key, 0.0), _rel(got, want.detach()))

    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        for p in prog.module.parameters():
            p.grad = None
        res = ex.train_step([x], y, return_outputs=step != 1)
        want = ref(x)
        err("loss", res.loss, loss_fn(want, y))
        if step != 1:
            err("outputs", res.outputs, want)
        else:
            assert res.outputs is None
        with torch.no_grad():
            err("eval", ex.eval_step([x]), ref(x))
            assert ex.eval_step([x], return_outputs=False) is None
        per = ex.run_microbatches([[c] for c in x.chunk(m)], list(y.chunk(m)), train=True,
                                  merge=False)
        assert isinstance(per.outputs, list) and len(per.outputs) == m
        for c, o in zip(x.chunk(m), per.outputs):
            err("per_microbatch", o, ref(c))
        err("loss", per.loss, loss_fn(want, y))
    comm.teardown()
    return errs


@pytest.mark.parametrize(("schedule", "early", "lookahead"),
                         [("1f1b", True, 4), ("zb-h1", True, 4), ("gpipe", False, 1)])
def test_result_matches_single_process_on_every_rank(schedule: str, early: bool,
                                                     lookahead: int) -> None:
    for rank, r in enumerate(run_ranks(result_job, 2, schedule, early, lookahead)):
        errs = r.unwrap()
        assert set(errs) == {"loss", "outputs", "eval", "per_microbatch"}
        for key, e in errs.items():
            assert e <= RTOL, (rank, key, e)


def test_step_result_one_stage() -> None:
    from modelparallel.runtime.result import StepResult

    r = StepResult(None, is_last=True, microbatches=2, train=False, return_outputs=True,
                   merge=False, templates={}, device=torch.device("cpu"))
    r.record(0, torch.ones(1), None)
    r.record(1, torch.zeros(1), None)
    out = r.finish()
    assert torch.isnan(out.loss) and [o.item() for o in out.outputs] == [1.0, 0.0]
