"""The distributed pipeline runtime on real gloo processes: training parity, non-tensor boundary
values, failures (a rank raising, killed, or stuck) reported to every rank without hangs."""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import pytest
import torch
from _dist import RankResult, cut_assignment, cut_plan, run_ranks
from torch import nn

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5


# -- jobs (run on every rank; module level so the worker processes can import them) -------------


def _case(name: str) -> Any:
    from modelparallel import models

    return {"gpt2": lambda: models.gpt2("tiny", batch_size=8, seq_len=16),
            "resnet": lambda: models.resnet_tiny(batch_size=8),
            "skip": lambda: models.skip_mlp(batch_size=8),
            "encdec": lambda: models.encoder_decoder(batch_size=8)}[name]()


def _first_microbatch(args: tuple[Any, ...], kwargs: dict[str, Any], m: int
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    cut = lambda v: v[: v.shape[0] // m] if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _stage(traced: Any, plan: Any, rank: int, world: int, loss_fn: Any, schedule: str, m: int,
           timeout: float = 60.0) -> tuple[Any, Any, Any]:
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split

    prog = build_stage(traced, plan, rank)
    torch.distributed.barrier()  # ranks trace at different speeds; start the clock together
    comm = StageComm.create(rank, list(range(world)), "cpu", timeout)
    ex = StageExecutor(prog, comm, loss_fn=loss_fn, schedule=schedule,
                       split=resolve_split(prog.input_names, m))
    return prog, comm, ex


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def parity_job(rank: int, world: int, model: str, m: int, steps: int,
               communication: str = "direct",
               schedules: tuple[str, ...] = ("gpipe", "1f1b")) -> dict[str, Any]:
    """Train ``steps`` steps through the pipeline under both schedules and, alongside, the
    same model in one process; report the largest relative errors of this rank."""
    from modelparallel.tracer import trace

    case = _case(model)
    init = copy.deepcopy(case.model.state_dict())
    ref = copy.deepcopy(case.model)
    bs = next(a for a in case.args if isinstance(a, torch.Tensor)).shape[0]
    batches = [case.make_batch(bs, 100 + i) for i in range(steps)]
    traced = trace(case.model, *_first_microbatch(case.args, case.kwargs, m))
    plan = cut_plan(traced.graph, [k / world for k in range(1, world)], microbatches=m,
                    communication=communication)
    report: dict[str, Any] = {}
    for schedule in schedules:
        case.model.load_state_dict(init)
        ref.load_state_dict(init)
        prog, comm, ex = _stage(traced, plan, rank, world, case.loss_fn, schedule, m)
        params = list(prog.module.parameters())
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        loss_err = out_err = 0.0
        for args, kwargs, target in batches:
            opt.zero_grad()
            ropt.zero_grad()
            res = ex.train_step(traced.flatten_inputs(args, kwargs), target)
            ref_out = ref(*args, **kwargs)
            ref_loss = case.loss_fn(ref_out, target)
            ref_loss.backward()
            loss_err = max(loss_err, _rel(res.loss, ref_loss.detach()))
            got = torch.utils._pytree.tree_leaves(res.outputs)[0]
            want = torch.utils._pytree.tree_leaves(ref_out)[0].detach()
            out_err = max(out_err, _rel(got, want))
            opt.step()
            ropt.step()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        errs = {name: _rel(p.detach(), ref_params[name].detach())
                for name, p in prog.module.named_parameters()}
        comm.teardown()
        report[schedule] = {
            "loss_err": loss_err, "out_err": out_err,
            "param_err": max(errs.values(), default=0.0), "worst": max(errs, key=errs.get,
                                                                      default=""),
            "params": sorted(errs), "shared": sorted(prog.shared_params),
            "recv": [v.name for v in prog.recv], "send": [v.name for v in prog.send],
            "sources": [src for src, _ in prog.sources], "dests": [d for d, _ in prog.dests],
        }
    report["all_params"] = sorted(dict(ref.named_parameters()))
    return report


class ShapeNet(nn.Module):
    """A model whose stage 0 sends an int (a size read off an activation) to stage 1."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 12)
        self.l2 = nn.Linear(12, 12)
        self.l3 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        width = h.size(1)
        return self.l3(torch.tanh(self.l2(h))) * (width / 12)


def scalar_boundary_job(rank: int, world: int) -> dict[str, Any]:
    from modelparallel.ir import OpKind
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig
    from modelparallel.tracer import trace

    torch.manual_seed(0)
    model = ShapeNet()
    ref = copy.deepcopy(model)
    x, y = torch.randn(6, 8), torch.randn(6, 3)
    traced = trace(model, (x[:3],))
    size_node = next(n for n in traced.graph.nodes if n.value_kind == "scalar"
                     and n.op is not OpKind.PLACEHOLDER)
    order = [n.name for n in traced.graph.nodes]
    assignment = {n.name: int(order.index(n.name) > order.index(size_node.name))
                  for n in traced.graph.nodes if n.op is not OpKind.PLACEHOLDER}
    plan = evaluate_assignment(traced.graph, PlanConfig(partitions=2, microbatches=2), "cpu",
                               assignment)
    loss_fn = nn.functional.mse_loss
    prog, comm, ex = _stage(traced, plan, rank, world, loss_fn, "1f1b", 2)
    kinds = {v.name: v.kind for v in (*prog.recv, *prog.send)}
    losses = []
    for _ in range(2):
        res = ex.train_step([x], y)
        ref_loss = loss_fn(ref(x), y)
        losses.append((float(res.loss), float(ref_loss)))
    comm.teardown()
    return {"kinds": kinds, "losses": losses}


class InplaceNet(nn.Module):
    """In-place writes right after the cuts: an in-place ReLU module, and a write through a
    view of a received value."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 12)
        self.act = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(12, 12)
        self.l3 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.l2(self.act(self.l1(x)))
        g[:, :4].mul_(2.0)
        return self.l3(g)


def inplace_job(rank: int, world: int) -> dict[str, Any]:
    from modelparallel.ir import OpKind
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig
    from modelparallel.tracer import trace

    torch.manual_seed(0)
    model = InplaceNet()
    ref = copy.deepcopy(model)
    x, y = torch.randn(6, 8), torch.randn(6, 3)
    traced = trace(model, (x[:3],))
    home = {"l1": 0, "act": 1, "l2": 1, "l3": 2}
    nodes = [n for n in traced.graph.nodes if n.op is not OpKind.PLACEHOLDER]
    assignment = {}
    for k, n in enumerate(nodes):  # unowned ops go with the next module's stage
        owner = next((m.module_path for m in nodes[k:] if m.module_path in home), "l3")
        assignment[n.name] = home.get(n.module_path, home[owner])
    plan = evaluate_assignment(traced.graph, PlanConfig(partitions=3, microbatches=2), "cpu",
                               assignment)
    loss_fn = nn.functional.mse_loss
    prog, comm, ex = _stage(traced, plan, rank, world, loss_fn, "gpipe", 2)
    opt = torch.optim.SGD(prog.module.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        ropt.zero_grad()
        res = ex.train_step([x], y)
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        opt.step()
        ropt.step()
        losses.append(_rel(res.loss, ref_loss.detach()))
    refp = dict(ref.named_parameters())
    errs = [_rel(p.detach(), refp[n].detach()) for n, p in prog.module.named_parameters()]
    comm.teardown()
    return {"losses": losses, "param_err": max(errs), "mutated": list(prog.mutated_inputs),
            "cloned_all": prog.clones_received}


def failure_job(rank: int, world: int, mode: str, victim: int, timeout: float
                ) -> dict[str, Any]:
    """Train skip-MLP; on step 1 the victim fails in its third forward (``mode``: ``raise``,
    ``exit`` (killed), or ``hang``). Report what this rank raised and when."""
    from modelparallel.tracer import trace

    case = _case("skip")
    m = 4
    traced = trace(case.model, *_first_microbatch(case.args, case.kwargs, m))
    plan = cut_plan(traced.graph, [k / world for k in range(1, world)], microbatches=m)
    prog, _comm, ex = _stage(traced, plan, rank, world, case.loss_fn, "1f1b", m, timeout)
    calls = {"n": 0}
    step = {"i": 0}
    forward = prog.module.forward

    def sabotaged(*a: Any) -> Any:
        if rank == victim and step["i"] == 1:
            calls["n"] += 1
            if calls["n"] == 3:
                if mode == "raise":
                    raise ValueError("injected failure on purpose")
                if mode == "exit":
                    os._exit(3)
                time.sleep(3 * timeout)
        return forward(*a)

    prog.module.forward = sabotaged
    flat = traced.flatten_inputs(case.args, case.kwargs)
    for i in range(3):
        step["i"] = i
        start = time.monotonic()
        try:
            ex.train_step(flat, case.target)
        except Exception as e:
            return {"step": i, "type": type(e).__name__, "peer": getattr(e, "peer", None),
                    "message": str(e), "seconds": time.monotonic() - start}
    return {"step": None}


# -- tests -----------------------------------------------------------------------------------------


def _values(results: list[RankResult]) -> list[Any]:
    return [r.unwrap() for r in results]


@pytest.mark.parametrize(("model", "world"), [
    ("gpt2", 2), ("gpt2", 4), ("resnet", 2), ("resnet", 4), ("skip", 2), ("skip", 4),
    ("encdec", 2), ("encdec", 4),
])
def test_training_parity_with_single_process(model: str, world: int) -> None:
    """Three SGD (momentum) steps through the pipeline (both schedules, 4 microbatches) give the same
    losses, outputs and parameters as single-process training on the same batches."""
    reports = _values(run_ranks(parity_job, world, model, 4, 3, timeout=240))
    held: set[str] = set()
    for rank, rep in enumerate(reports):
        for schedule in ("gpipe", "1f1b"):
            r = rep[schedule]
            assert r["loss_err"] <= RTOL, (rank, schedule, r)
            assert r["out_err"] <= RTOL, (rank, schedule, r)
            assert r["param_err"] <= RTOL, (rank, schedule, r["worst"], r["param_err"])
            held.update(r["params"])
    assert set(reports[0]["all_params"]) <= held, "some parameter is held by no stage"
    if model == "gpt2":  # tied wte/lm_head: replicated on the first and last stage
        assert any(rep["1f1b"]["shared"] for rep in reports)
    if model == "skip" and world == 4:  # h0 goes straight from stage 0 to stage 3
        assert 3 in reports[0]["1f1b"]["dests"] and 0 in reports[3]["1f1b"]["sources"]


@pytest.mark.parametrize(("model", "world", "communication"), [
    ("skip", 3, "direct"), ("skip", 4, "relay"), ("encdec", 4, "direct"),
    ("encdec", 4, "relay"),
])
def test_skip_over_stage_parity(model: str, world: int, communication: str) -> None:
    """Values read two or more stages later, sent straight to each reading stage (Note [direct
    communication]) or relayed through the stages in between (Note [relay communication]):
    three SGD steps under GPipe, 1F1B and ZB-H1 match single-process training."""
    schedules = ("gpipe", "1f1b", "zb-h1")
    reports = _values(run_ranks(parity_job, world, model, 4, 3, communication, schedules,
                                timeout=240))
    for rank, rep in enumerate(reports):
        for schedule in schedules:
            r = rep[schedule]
            for what in ("loss_err", "out_err", "param_err"):
                assert r[what] <= RTOL, (rank, schedule, what, r)
    far = [(k, d) for k, rep in enumerate(reports) for d in rep["1f1b"]["dests"] if d > k + 1]
    assert bool(far) == (communication == "direct"), far
    if communication == "relay":
        relayed = [set(rep["1f1b"]["recv"]) & set(rep["1f1b"]["send"]) for rep in reports]
        assert any(relayed), "a value is relayed through a middle stage"


def test_non_tensor_boundary_value() -> None:
    """An int computed on stage 0 crosses to stage 1 inside the boundary metadata."""
    first, last = _values(run_ranks(scalar_boundary_job, 2))
    assert "scalar" in first["kinds"].values()
    assert first["kinds"] == last["kinds"]
    for got, want in first["losses"] + last["losses"]:
        assert got == pytest.approx(want, rel=RTOL)


def test_in_place_writes_on_received_values() -> None:
    """Received tensors are autograd leaves; in-place writes on them still train correctly."""
    results = _values(run_ranks(inplace_job, 3))
    assert results[1]["mutated"], "codegen flags the in-place ReLU after the cut"
    assert results[2]["mutated"] or results[2]["cloned_all"], "the view write was handled"
    for r in results:
        assert max(r["losses"]) <= RTOL and r["param_err"] <= RTOL, r


def test_rank_raising_is_reported_to_every_rank() -> None:
    results = _values(run_ranks(failure_job, 4, "raise", 2, 30.0, timeout=120))
    assert results[2]["type"] == "ValueError"
    for rank in (0, 1, 3):
        r = results[rank]
        assert r["step"] == 1 and r["type"] == "PeerFailedError", (rank, r)
        assert r["peer"] == 2
        assert "rank 2" in r["message"] and "injected failure on purpose" in r["message"]


def test_killed_rank_is_named_by_every_other_rank() -> None:
    results = run_ranks(failure_job, 4, "exit", 1, 30.0, timeout=120)
    assert results[1].error_type == "died"
    for rank in (0, 2, 3):
        r = results[rank].unwrap()
        assert r["step"] == 1 and r["type"] == "PeerFailedError", (rank, r)
        assert r["peer"] == 1 and "rank 1" in r["message"]


def test_stuck_rank_times_out_instead_of_hanging() -> None:
    results = _values(run_ranks(failure_job, 3, "hang", 1, 3.0, timeout=120))
    others = [results[0], results[2]]
    assert all(r["type"] in ("StepTimeoutError", "PeerFailedError") for r in others), others
    assert any(r["type"] == "StepTimeoutError" for r in others), others
    for r in others:
        assert "rank 1" in r["message"]
        if r["type"] == "PeerFailedError":
            assert r["peer"] == 1


def test_cut_assignment_helper_is_contiguous() -> None:
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.skip_mlp()
    graph = trace(case.model, case.args).graph
    stages = list(cut_assignment(graph, [0.25, 0.5, 0.75]).values())
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3}
