"""The plain PyTorch API, ``modelparallel.api.pipeline``: automatic planning on rank 0, plan
files, refusal of a mismatched plan before any communication, bad batches, variable sequence
length, state dicts. Multi-rank cases run on real gloo processes."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import cut_plan, run_ranks
from torch import nn

from modelparallel import PlanningOptions
from modelparallel.api import Pipeline, StepResult, pipeline
from modelparallel.cost_model.node_times import save_node_times
from modelparallel.errors import (
    ConfigError,
    PlanMismatchError,
)

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# -- jobs --------------------------------------------------------------------------------------------


def auto_plan_job(rank: int, world: int) -> dict[str, Any]:
    """No plan: rank 0 partitions; train 2 steps; gather and load state dicts."""
    from modelparallel import models

    case = models.gpt2("tiny", batch_size=4, seq_len=16)
    ref = copy.deepcopy(case.model)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2,
                    schedule="interleaved", time_limit=5.0)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses = []
    for seed in (1, 2):
        args, _kwargs, target = case.make_batch(4, seed)
        opt.zero_grad()
        ropt.zero_grad()
        res = pipe.step(args, target)
        ref_loss = case.loss_fn(ref(*args), target)
        ref_loss.backward()
        opt.step()
        ropt.step()
        losses.append(_rel(res.loss, ref_loss.detach()))
    full = pipe.state_dict()
    ref_sd = ref.state_dict()
    sd_err = max(_rel(full[k].float(), ref_sd[k].float()) for k in ref_sd
                 if ref_sd[k].is_floating_point())
    local = pipe.local_state_dict()
    # load a fresh model's weights, then the outputs are that model's
    fresh = models.gpt2("tiny", batch_size=4, seq_len=16, seed=7)
    loaded = pipe.load_state_dict(fresh.model.state_dict(), strict=True)
    out = pipe.eval_step(case.args)
    want = fresh.model(*case.args).logits
    return {
        "losses": losses, "keys_equal": list(full) == list(ref_sd), "sd_err": sd_err,
        "local": sorted(local), "plan": hashlib.sha256(pipe.plan.to_json().encode()).hexdigest(),
        "method": pipe.plan.solver.method, "missing": loaded.missing_keys,
        "eval_err": _rel(out.logits, want.detach()), "stage": pipe.stage,
        "num_params": sum(p.numel() for p in pipe.parameters()),
    }


def new_schedules_job(rank: int, world: int) -> dict[str, Any]:
    """``pipeline(schedule=..., virtual_stages=...)``: interleaved 1F1B and ZB-H1 planned on
    rank 0 (DP) and trained 2 steps against one process; the state dict gathers every stage."""
    from modelparallel import models

    out: dict[str, Any] = {}
    for schedule, v in (("1f1b", 2), ("zb-h1", 1)):
        case = models.gpt2("tiny", batch_size=4, seq_len=16)
        ref = copy.deepcopy(case.model)
        pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2,
                        schedule=schedule, virtual_stages=v, method="dp")
        opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
        ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
        errs = []
        for seed in (1, 2):
            args, _kwargs, target = case.make_batch(4, seed)
            opt.zero_grad()
            ropt.zero_grad()
            res = pipe.step(args, target)
            ref_loss = case.loss_fn(ref(*args), target)
            ref_loss.backward()
            opt.step()
            ropt.step()
            errs.append(_rel(res.loss, ref_loss.detach()))
        full, ref_sd = pipe.state_dict(), ref.state_dict()
        errs.append(max(_rel(full[k].float(), ref_sd[k].float()) for k in ref_sd
                        if ref_sd[k].is_floating_point()))
        out[schedule] = {"err": max(errs), "stages": [p.index for p in pipe.programs],
                         "num_stages": pipe.plan.num_stages}
        pipe.close()
    return out


def bad_batch_job(rank: int, world: int) -> dict[str, Any]:
    from modelparallel import models

    case = models.skip_mlp(batch_size=8)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=4)
    groups_before = len(dist.distributed_c10d._world.pg_map)
    try:
        pipe.step(torch.randn(6, 16), torch.randn(6, 8))
        raised = None
    except ConfigError as e:
        raised = str(e)
    groups_after = len(dist.distributed_c10d._world.pg_map)
    ok = pipe.step(*case.args, case.target)  # the pipeline still works: nothing was sent
    return {"raised": raised, "same_groups": groups_before == groups_after,
            "loss": float(ok.loss)}


def mismatch_job(rank: int, world: int, plan_path: str) -> dict[str, Any]:
    from modelparallel import models

    case = models.skip_mlp(depth=5)  # the plan was made for depth 6
    groups_before = len(dist.distributed_c10d._world.pg_map)
    try:
        pipeline(case.model, case.args, loss_fn=case.loss_fn, plan=plan_path)
        raised = ""
    except PlanMismatchError as e:
        raised = str(e)
    return {"raised": raised,
            "no_groups": len(dist.distributed_c10d._world.pg_map) == groups_before}


def infeasible_job(rank: int, world: int) -> dict[str, Any]:
    from modelparallel import models

    case = models.skip_mlp()
    try:
        pipeline(case.model, case.args, loss_fn=case.loss_fn, memory="1KiB", timeout=60)
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None}


def variable_length_job(rank: int, world: int) -> list[tuple[float, float]]:
    """Sequence length (and batch size) change between steps; every step matches a single
    process, including the outputs broadcast to every rank and an eval step."""
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.gpt2("tiny", batch_size=4, seq_len=16)
    ref = copy.deepcopy(case.model)
    traced = trace(case.model, (case.args[0][:2],))
    plan = cut_plan(traced.graph, [0.5], microbatches=2)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, plan=plan)
    errors = []
    for bs, seq in ((4, 16), (4, 8), (8, 12), (4, 16), (4, 8)):
        ids = torch.randint(0, 256, (bs, seq + 1), generator=torch.Generator().manual_seed(seq))
        x, y = ids[:, :-1], ids[:, 1:]
        res = pipe.step(x, y)
        ref_out = ref(x)
        ref_loss = case.loss_fn(ref_out, y)
        errors.append((_rel(res.loss, ref_loss.detach()),
                       _rel(res.outputs.logits, ref_out.logits.detach())))
    x = torch.randint(0, 256, (2, 10))
    errors.append((0.0, _rel(pipe.eval_step(x).logits, ref(x).logits.detach())))
    return errors


def meta_model_job(rank: int, world: int) -> dict[str, Any]:
    """A model built on the meta device: each rank makes only its own stage real."""
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.skip_mlp(device="meta")
    plan = cut_plan(trace(case.model, case.args).graph, [0.5])
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2, plan=plan)
    held = [t for t in [*pipe.program.module.parameters(), *pipe.program.module.buffers()]]
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(float(pipe.step(*case.args, case.target).loss))
        opt.step()
    still_meta = [n for n, p in case.model.named_parameters() if p.is_meta]
    return {"real": all(not t.is_meta for t in held), "losses": losses,
            "meta_elsewhere": len(still_meta)}


# -- single process ------------------------------------------------------------------------------


def test_single_process_pipeline_without_torchrun() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    pipe = pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, microbatches=4)
    assert isinstance(pipe, Pipeline) and pipe.partitioned and pipe.stage == 0
    res = pipe.step(x, y)
    assert isinstance(res, StepResult)
    ref_loss = torch.nn.functional.mse_loss(ref(x), y)
    ref_loss.backward()
    assert float(res.loss) == pytest.approx(ref_loss.item(), rel=RTOL)
    assert torch.allclose(res.outputs, ref(x), rtol=RTOL, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in pipe.named_parameters():
        assert _rel(p.grad, grads[name].grad) <= RTOL
    with pytest.raises(ConfigError, match="divide"):
        pipe.step(torch.randn(6, 4), torch.randn(6, 2))
    assert list(pipe.state_dict()) == list(ref.state_dict())
    assert pipe.eval_step(x).shape == (8, 2)
    assert pipe.step(x, y, return_outputs=False).outputs is None


def test_lazy_partitioning_at_first_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    pipe = pipeline(model, None, loss_fn=torch.nn.functional.mse_loss, microbatches=2)
    assert not pipe.partitioned
    with pytest.raises(ConfigError, match="not partitioned"):
        list(pipe.parameters())
    pipe.step(torch.randn(4, 4), torch.randn(4, 1))
    assert pipe.partitioned and len(list(pipe.parameters())) == 4


def test_options_are_checked() -> None:
    model = torch.nn.Linear(4, 1)
    x = torch.randn(4, 4)
    with pytest.raises(ConfigError, match="processes"):
        pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, partitions=2)
    with pytest.raises(ConfigError, match="schedule"):
        pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, schedule="zigzag")
    with pytest.raises(ConfigError, match="SMP's 'interleaved'"):
        pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, schedule="interleaved",
                 virtual_stages=2)
    with pytest.raises(ConfigError, match="input_split_axes"):
        pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, input_split_axes={"nope": 1})
    with pytest.raises(ConfigError):
        pipeline(model, x, loss_fn=torch.nn.functional.mse_loss, timeout=0)


# -- several processes ---------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_automatic_plan_training_and_state_dicts() -> None:
    results = [r.unwrap() for r in run_ranks(auto_plan_job, 2, timeout=240)]
    assert len({r["plan"] for r in results}) == 1, "every rank runs the plan rank 0 made"
    assert results[0]["method"] == "ilp"
    for r in results:
        assert max(r["losses"]) <= RTOL
        assert r["keys_equal"] and r["sd_err"] <= RTOL
        assert r["missing"] == [] and r["eval_err"] <= RTOL
    assert set(results[0]["local"]) != set(results[1]["local"])
    assert all(r["num_params"] > 0 for r in results)


@pytest.mark.multiprocess
def test_interleaved_and_zero_bubble_through_the_api() -> None:
    results = [r.unwrap() for r in run_ranks(new_schedules_job, 2, timeout=240)]
    for rank, r in enumerate(results):
        assert r["1f1b"]["err"] <= RTOL and r["zb-h1"]["err"] <= RTOL, (rank, r)
        assert r["1f1b"]["stages"] == [rank, rank + 2] and r["1f1b"]["num_stages"] == 4
        assert r["zb-h1"]["stages"] == [rank]


@pytest.mark.multiprocess
def test_meta_device_model_materializes_only_local_stage() -> None:
    results = [r.unwrap() for r in run_ranks(meta_model_job, 2)]
    for r in results:
        assert r["real"] and r["meta_elsewhere"] > 0
        assert all(x == x for x in r["losses"]) and r["losses"][-1] < r["losses"][0]
    assert results[0]["losses"] == results[1]["losses"]


@pytest.mark.multiprocess
def test_batch_not_divisible_fails_on_every_rank_before_communication() -> None:
    results = [r.unwrap() for r in run_ranks(bad_batch_job, 2)]
    for r in results:
        assert r["raised"] is not None and "6" in r["raised"] and "4 microbatches" in r["raised"]
        assert r["same_groups"]
    assert results[0]["loss"] == results[1]["loss"]


@pytest.mark.multiprocess
def test_mismatched_plan_is_refused_before_communication(tmp_path: Path) -> None:
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.skip_mlp(depth=6)
    plan = cut_plan(trace(case.model, case.args).graph, [0.5])
    path = plan.save(tmp_path / "plan.json")
    results = [r.unwrap() for r in run_ranks(mismatch_job, 2, str(path))]
    for r in results:
        assert "fingerprint" in r["raised"] and r["no_groups"]


@pytest.mark.multiprocess
def test_planning_failure_on_rank_zero_reaches_every_rank() -> None:
    results = [r.unwrap() for r in run_ranks(infeasible_job, 2, timeout=120)]
    assert [r["type"] for r in results] == ["InfeasiblePlanError"] * 2
    assert "rank 0" in results[1]["message"]


@pytest.mark.multiprocess
def test_variable_sequence_length_across_steps() -> None:
    for errors in (r.unwrap() for r in run_ranks(variable_length_job, 2, timeout=240)):
        for loss_err, out_err in errors:
            assert loss_err <= RTOL and out_err <= RTOL, errors


def test_pipeline_plans_with_measured_node_times(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4)
    loss = torch.nn.functional.mse_loss
    plain = pipeline(model, x, loss_fn=loss, microbatches=2, device_spec="cpu")
    graph = plain.traced.graph
    times = {n.name: (0.5, 1.0) for n in graph.nodes if n.name == "_0"}
    path = save_node_times(tmp_path / "t.json", times, graph=graph)
    measured = pipeline(model, x, loss_fn=loss, microbatches=2,
                        planning=PlanningOptions(device_spec="cpu", node_times=path))
    stage = measured.plan.stages[0]
    assert stage.forward_time >= 0.5 and stage.backward_time >= 1.0
    assert plain.plan.stages[0].forward_time < 0.5
    data = json.loads(path.read_text())
    data["graph"]["fingerprint"] = "0" * 64
    other = tmp_path / "o.json"
    other.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not on this model's graph"):
        pipeline(model, x, loss_fn=loss, microbatches=2, device_spec="cpu", node_times=other)


def test_load_state_dict_is_strict_by_default() -> None:
    """Issue 13 item 3: a checkpoint whose keys do not match loads nothing silently no more."""
    from modelparallel.api import LoadResult

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    pipe = pipeline(model, torch.randn(4, 4), loss_fn=torch.nn.functional.mse_loss)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    prefixed = {f"module.{k}": v for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match=r"no value for 4 tensor.*'module\.'"):
        pipe.load_state_dict(prefixed)
    with pytest.raises(ConfigError, match=r"1 key\(s\) name no tensor.*'extra'"):
        pipe.load_state_dict({**other.state_dict(), "extra": torch.zeros(1)})
    with pytest.warns(RuntimeWarning, match="no value for 4 tensor"):
        result = pipe.load_state_dict(prefixed, strict=False)
    assert isinstance(result, LoadResult)
    assert sorted(result.missing_keys) == sorted(other.state_dict())
    assert sorted(result.unexpected_keys) == sorted(prefixed)
    assert pipe.load_state_dict(other.state_dict()) == LoadResult([], [])
    x = torch.randn(4, 4)
    torch.testing.assert_close(pipe.eval_step(x), other(x))


class SeqFirst(nn.Module):
    """Takes (seq, batch, features) and a per-feature scale that is not split."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lin(x.transpose(0, 1) * scale)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_axes_non_split_inputs_and_summed_gradients() -> None:
    torch.manual_seed(0)
    model = SeqFirst()
    ref = copy.deepcopy(model)
    x, scale, y = torch.randn(3, 8, 4), torch.randn(4), torch.randn(8, 3, 2)
    pipe = pipeline(model, (x, scale), loss_fn=nn.functional.mse_loss, microbatches=4,
                    input_split_axes={"x": 1}, non_split_inputs=["scale"], average_grads=False)
    res = pipe.step((x, scale), y)
    ref_loss = nn.functional.mse_loss(ref(x, scale), y)
    ref_loss.backward()
    assert float(res.loss) == pytest.approx(ref_loss.item(), rel=RTOL)
    got, want = _grads(model), _grads(ref)
    for name in want:  # summed over 4 microbatches of a mean loss: 4x the full-batch gradient
        torch.testing.assert_close(got[name], 4 * want[name], rtol=RTOL, atol=1e-6)


def test_eval_step_and_outputs_structure() -> None:
    from modelparallel import models

    case = models.gpt2("tiny", batch_size=4, seq_len=8)
    ref = copy.deepcopy(case.model)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
    out = pipe.eval_step(case.args)
    assert type(out).__name__ == type(ref(*case.args)).__name__
    torch.testing.assert_close(out.logits, ref(*case.args).logits, rtol=RTOL, atol=1e-5)
