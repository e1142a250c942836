"""Interleaved 1F1B (virtual stages) and ZB-H1 (split backward) on real gloo processes: training
equals single-process training (Note [virtual stages], Note [split backward])."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import cut_plan, run_ranks

pytestmark = pytest.mark.multiprocess

RTOL = 1e-5


def _case(name: str) -> Any:
    from modelparallel import models

    return {"gpt2": lambda: models.gpt2("tiny", batch_size=8, seq_len=16),
            "skip": lambda: models.skip_mlp(batch_size=8),
            "encdec": lambda: models.encoder_decoder(batch_size=8)}[name]()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def schedule_parity_job(rank: int, world: int, model: str, m: int, steps: int,
                        runs: list[tuple[str, int]] | list[tuple[str, int, str]]
                        ) -> dict[str, Any]:
    """Train ``steps`` SGD steps per ``(schedule, virtual stages)`` run through the pipeline and
    in one process; report this rank's largest relative errors per run."""
    from modelparallel.codegen import build_stage
    from modelparallel.runtime.comm import StageComm
    from modelparallel.runtime.executor import StageExecutor
    from modelparallel.runtime.microbatch import resolve_split
    from modelparallel.tracer import trace

    case = _case(model)
    init = copy.deepcopy(case.model.state_dict())
    ref = copy.deepcopy(case.model)
    bs = next(a for a in case.args if isinstance(a, torch.Tensor)).shape[0]
    batches = [case.make_batch(bs, 100 + i) for i in range(steps)]
    cut = lambda t: t[: t.shape[0] // m] if isinstance(t, torch.Tensor) else t  # noqa: E731
    traced = trace(case.model, tuple(cut(a) for a in case.args),
                   {k: cut(t) for k, t in case.kwargs.items()})
    report: dict[str, Any] = {}
    for run in runs:
        schedule, v = run[0], run[1]
        communication = run[2] if len(run) > 2 else "direct"  # type: ignore[misc]
        n = world * v
        plan = cut_plan(traced.graph, [k / n for k in range(1, n)], microbatches=m,
                        communication=communication)
        case.model.load_state_dict(init)
        ref.load_state_dict(init)
        progs = [build_stage(traced, plan, s) for s in range(rank, n, world)]
        torch.distributed.barrier()
        comm = StageComm.create(rank, list(range(world)), "cpu", 60.0)
        ex = StageExecutor(progs, comm, loss_fn=case.loss_fn, schedule=schedule,
                           split=resolve_split(progs[0].input_names, m))
        params = [p for prog in progs for p in prog.module.parameters()]
        params = list({id(p): p for p in params}.values())
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
        actions = [a for a, _ in ex.stats.actions]
        evaluated = ex.eval_step(traced.flatten_inputs(*batches[0][:2]))
        with torch.no_grad():
            ref_eval = ref(*batches[0][0], **batches[0][1])
        eval_err = _rel(torch.utils._pytree.tree_leaves(evaluated)[0],
                        torch.utils._pytree.tree_leaves(ref_eval)[0])
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        errs = {name: _rel(p.detach(), ref_params[name].detach())
                for prog in progs for name, p in prog.module.named_parameters()}
        comm.teardown()
        report[_key(run)] = {
            "far": sorted((prog.index, dst) for prog in progs for dst, _ in prog.dests
                          if dst != prog.index + 1),
            "loss_err": loss_err, "out_err": out_err, "eval_err": eval_err,
            "param_err": max(errs.values(), default=0.0),
            "worst": max(errs, key=errs.get, default=""), "params": sorted(errs),
            "actions": actions,
            "shared": sorted({k for prog in progs for k in prog.shared_params}),
        }
    report["all_params"] = sorted(dict(ref.named_parameters()))
    return report


def _key(run: tuple[Any, ...]) -> str:
    return f"{run[0]}/v{run[1]}" + (f"/{run[2]}" if len(run) > 2 else "")


def _check(reports: list[dict[str, Any]], runs: list[tuple[str, int]] | list[tuple[str, int, str]]
           ) -> None:
    for run in runs:
        key = _key(run)
        held: set[str] = set()
        for rank, rep in enumerate(reports):
            r = rep[key]
            for what in ("loss_err", "out_err", "eval_err", "param_err"):
                assert r[what] <= RTOL, (rank, key, what, r[what], r["worst"])
            held.update(r["params"])
        assert set(reports[0]["all_params"]) <= held, (key, "some parameter is held by no stage")


RUNS = [("1f1b", 2), ("zb-h1", 1)]


@pytest.mark.parametrize("model", ["gpt2", "skip"])
def test_new_schedules_match_single_process_on_two_ranks(model: str) -> None:
    """Three SGD (momentum) steps, 4 microbatches: interleaved 1F1B (v = 2, four stages on two
    ranks) and ZB-H1 give the losses, outputs and parameters of one-process training."""
    reports = [r.unwrap() for r in run_ranks(schedule_parity_job, 2, model, 4, 3, RUNS,
                                             timeout=240)]
    _check(reports, RUNS)
    assert {a[-2] for a in reports[0]["zb-h1/v1"]["actions"]} >= {"I", "W"}
    stages = {int(a.split("F")[0]) for a in reports[1]["1f1b/v2"]["actions"] if "F" in a}
    assert stages == {1, 3}, "rank 1 runs stages 1 and 3"
    if model == "gpt2":  # tied wte/lm_head on stage 0 (rank 0) and stage 3 (rank 1)
        assert reports[0]["1f1b/v2"]["shared"] and reports[1]["1f1b/v2"]["shared"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "skip"])
def test_new_schedules_match_single_process_on_four_ranks(model: str) -> None:
    runs = [("1f1b", 2), ("zb-h1", 1)]
    reports = [r.unwrap() for r in run_ranks(schedule_parity_job, 4, model, 4, 2, runs,
                                             timeout=400)]
    _check(reports, runs)


DIRECT_RUNS = [("1f1b", 2, "direct"), ("1f1b", 2, "relay"), ("zb-h1", 1, "direct")]


def test_direct_sends_with_virtual_stages() -> None:
    """The encoder output of an encoder-decoder is read by both decoder stages: under a direct
    plan on two ranks with two virtual stages each, stage 1 sends it to stage 2 (rank 0) and
    stage 3 (its own rank 1, through the mailbox: Note [message channels]); training matches
    one process, as it does relayed and under ZB-H1."""
    reports = [r.unwrap() for r in run_ranks(schedule_parity_job, 2, "encdec", 4, 2,
                                             DIRECT_RUNS, timeout=240)]
    _check(reports, DIRECT_RUNS)
    far = {pair for rep in reports for pair in rep["1f1b/v2/direct"]["far"]}
    assert any((dst - src) % 2 == 0 for src, dst in far), far  # a channel inside a rank
    assert not any(rep["1f1b/v2/relay"]["far"] for rep in reports)
