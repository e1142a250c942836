"""One stage-call contract (Note [stage calling convention] in ``modelparallel/codegen/program.py``)
for both executors: in-place writes on received values train exactly like the single-device
model in :class:`LocalPipeline` and in :class:`StageExecutor` on 2 gloo ranks; and the
executor's ``on_action`` hook (Note [action hook]) reports every piece of a step's work."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

RTOL = 1e-5
STEPS = 2
M = 2


class ViewWrite(nn.Module):
    """Writes its input in place through a view (codegen does not see through views, so the
    write hits the received autograd leaf: the retry path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, :2].mul_(2.0)
        return x


def _model(case: str) -> nn.Module:
    torch.manual_seed(0)
    inplace = nn.ReLU(inplace=True) if case == "relu-inplace" else ViewWrite()
    return nn.Sequential(nn.Linear(5, 7), inplace, nn.Linear(7, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _plan(model: nn.Module, x: torch.Tensor) -> tuple[Any, Any]:
    """The model traced and cut right before its in-place module (module ``1``)."""
    from modelparallel.ir import input_derived_nodes
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig
    from modelparallel.tracer import trace

    traced = trace(model, (x[: x.shape[0] // M],))
    derived = input_derived_nodes(traced.graph)
    names = [n.name for n in traced.graph.nodes if n.name not in derived]
    cut = next(i for i, n in enumerate(names)
               if traced.graph.node(n).module_path.startswith("1"))
    assignment = {n: int(i >= cut) for i, n in enumerate(names)}
    plan = evaluate_assignment(traced.graph, PlanConfig(partitions=2, microbatches=M), "cpu",
                               assignment)
    return traced, plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _train(step: Any, params: dict[str, nn.Parameter], ref: nn.Module, x: torch.Tensor,
           y: torch.Tensor) -> dict[str, float]:
    """``STEPS`` SGD steps of ``step`` and of the single-device ``ref``: the largest relative
    errors of the loss and of the parameters held (by canonical name)."""
    opt = torch.optim.SGD(params.values(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_err = 0.0
    for _ in range(STEPS):
        opt.zero_grad()
        ropt.zero_grad()
        loss = step(x, y)
        ref_loss = nn.functional.mse_loss(ref(x), y)
        ref_loss.backward()
        opt.step()
        ropt.step()
        loss_err = max(loss_err, _rel(loss, ref_loss.detach()))
    refp = dict(ref.named_parameters())
    return {"loss": loss_err,
            "params": max(_rel(p.detach(), refp[n].detach()) for n, p in params.items())}


def contract_job(rank: int, world: int, case: str) -> dict[str, Any]:
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split

    model = _model(case)
    ref = copy.deepcopy(model)
    x, y = _data()
    traced, plan = _plan(model, x)
    prog = build_stage(traced, plan, rank)
    events: list[tuple[str, int, int | None, str]] = []
    comm = StageComm.create(rank, list(range(world)), "cpu", 60.0)
    ex = StageExecutor(prog, comm, loss_fn=nn.functional.mse_loss, schedule="1f1b",
                       split=resolve_split(prog.input_names, M),
                       on_action=lambda e, phase: events.append(
                           (e.kind, e.stage, e.microbatch, phase)))
    params = {prog.param_names[n]: p for n, p in prog.module.named_parameters()}
    errs = _train(lambda a, b: ex.train_step([a], b).loss, params, ref, x, y)
    comm.teardown()
    return {**errs, "mutated": list(prog.mutated_inputs), "cloned": prog.clones_received,
            "events": events}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["relu-inplace", "view-write"])
def test_in_place_writes_on_received_values_in_both_executors(case: str) -> None:
    from modelparallel.codegen import build_stages
    from modelparallel.runtime.local import LocalPipeline

    # one process: LocalPipeline
    model = _model(case)
    ref = copy.deepcopy(model)
    x, y = _data()
    traced, plan = _plan(model, x)
    stages = build_stages(traced, plan)
    pipe = LocalPipeline(stages, microbatches=M, loss_fn=nn.functional.mse_loss,
                         schedule="1f1b")
    local = _train(lambda a, b: pipe.train_step([a], b)[0], dict(pipe.named_parameters()),
                   ref, x, y)
    assert local["loss"] <= RTOL and local["params"] <= RTOL, local
    detected = case == "relu-inplace"
    assert bool(stages[1].mutated_inputs) == detected
    assert stages[1].clones_received == (not detected)  # the view write took the retry

    # two gloo ranks: StageExecutor
    results = run_ranks(contract_job, 2, case, timeout=180.0)
    values = [r.unwrap() for r in results]
    for rank, v in enumerate(values):
        assert v["loss"] <= RTOL and v["params"] <= RTOL, (rank, v)
    assert bool(values[1]["mutated"]) == detected
    assert values[1]["cloned"] == (not detected)

    # the hook: every piece of work of each rank bracketed, with its stage and microbatch
    for rank, v in enumerate(values):
        events = v["events"]
        assert {e[1] for e in events} == {rank}
        starts = [e[:3] for e in events[0::2]]
        assert [e[3] for e in events] == ["start", "end"] * len(starts)  # no piece nests
        assert starts == [e[:3] for e in events[1::2]]
        for kind in ("forward", "backward"):
            assert sorted(e[2] for e in starts if e[0] == kind) == sorted(
                list(range(M)) * STEPS), (rank, kind)
        waits = {(e[0], e[2]) for e in starts if e[0] == "recv_wait"}
        assert len(waits) == M  # rank 0 waits for gradients, rank 1 for activations
        assert any(e[0] == "send" for e in starts)
        assert [e for e in starts if e[0] == "grad_sync"] == [("grad_sync", rank, None)] * STEPS
