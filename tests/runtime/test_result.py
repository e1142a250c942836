"""The step's result on every rank (Note [early result]): the loss and outputs of every kind of
step, first and later steps of a shape key, equal a single-process run on every rank; turning
the early exchange and the receives ahead off (Note [receives ahead]) changes nothing."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

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


def work_job(rank: int, world: int, schedule: str) -> dict[str, object]:
    """Record where the ``on_result`` work ran among this rank's actions, and what it got."""
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.hooks import StageEvent
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.runtime.result import StepOutput
    from modelparallel.tracer import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    m = 4
    traced = trace(model, (torch.randn(2, 6),))
    plan = cut_plan(traced.graph, [k / world for k in range(1, world)], microbatches=m)
    prog = build_stage(traced, plan, rank)
    torch.distributed.barrier()
    comm = StageComm.create(rank, list(range(world)), "cpu", 60.0)
    events: list[str] = []

    def hook(event: StageEvent, phase: str) -> None:
        if phase == "start" and event.kind in ("forward", "backward"):
            events.append(f"{event.kind[0].upper()}{event.microbatch}")

    ex = StageExecutor(prog, comm, loss_fn=nn.functional.mse_loss, schedule=schedule,
                       split=resolve_split(prog.input_names, m), on_action=hook)
    got: list[torch.Tensor] = []

    def work(result: StepOutput) -> list[Callable[[], None]]:
        def piece(o: torch.Tensor) -> None:
            events.append("work")
            got.append(o)

        return [functools.partial(piece, o) for o in result.outputs]

    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(2):  # the second step of the shape key has the early result
        events.clear()
        got.clear()
        res = ex.run_microbatches([[c] for c in x.chunk(m)], list(y.chunk(m)), train=True,
                                  merge=False, on_result=work)
        assert len(got) == m and all(torch.equal(a, b) for a, b in zip(got, res.outputs))
    comm.teardown()
    return {"events": list(events)}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_work_after_the_result_runs_on_rank0_while_it_waits(schedule: str) -> None:
    """Note [work after the result]: pipeline rank 0 does the work before the backward
    ``result_point`` names (GPipe: its first; 1F1B: its last); the last rank after its last
    action; the work gets this rank's outputs, once, in order."""
    first, last = (r.unwrap()["events"] for r in run_ranks(work_job, 2, schedule))
    assert isinstance(first, list) and isinstance(last, list)
    b = "B0" if schedule == "gpipe" else "B3"
    assert first[first.index(b) - 4:first.index(b)] == ["work"] * 4, first
    assert last[-4:] == ["work"] * 4, last


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize(("p", "m", "v"), [(2, 2, 1), (2, 5, 1), (3, 6, 1), (4, 8, 1),
                                           (4, 8, 2), (2, 4, 2)])
def test_result_point_is_after_every_send(name: str, p: int, m: int, v: int) -> None:
    """Only pipeline rank 0 gets a point; after it, nothing on that rank sends to a peer, and
    on the last stage that microbatch's backward follows the last forward."""
    from modelparallel.runtime.result import result_point
    from modelparallel.schedule import make_schedule

    if v > 1 and name != "1f1b":
        pytest.skip("virtual stages are interleaved 1F1B")
    sched = make_schedule(name, p, m, v)
    last = p * v - 1
    points = [result_point(sched, r) for r in range(p)]
    assert points[1:] == [None] * (p - 1)
    k = points[0]
    assert k is not None
    after = sched.actions[0][k:]
    assert all(a.kind != "F" and a.stage == 0 for a in after), after
    at_last = [(a.kind, a.microbatch) for a in sched.actions[last % p] if a.stage == last]
    i = sched.actions[0][k].microbatch
    assert at_last.index(("F", m - 1)) < max(
        j for j, (kind, mb) in enumerate(at_last) if kind in ("B", "I") and mb == i)
