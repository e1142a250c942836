"""Note [batch from rank 0] (issue 13 item 2): every rank trains on pipeline rank 0's inputs and
targets, whatever the others pass; a rank whose batch differs in size or structure is named on
every rank. Also the guarded non-tensor inputs (item 1) on 2 ranks. Real gloo processes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import run_ranks

from modelparallel.runtime.batch import batch_signature


def _case() -> Any:
    from modelparallel import models

    return models.skip_mlp(batch_size=8)


def different_data_job(rank: int, world: int) -> dict[str, Any]:
    """Each rank passes its own random batch; the result must be rank 0's batch's."""
    from modelparallel.api import pipeline

    case = _case()
    ref = copy.deepcopy(case.model)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
    torch.manual_seed(100 + rank)  # per-rank data, as a per-rank data loader gives
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    res = pipe.step(x, y)
    x0 = torch.zeros_like(x)
    y0 = torch.zeros_like(y)
    torch.manual_seed(100)
    x0.copy_(torch.randn(8, 16))
    y0.copy_(torch.randn(8, 8))
    want = case.loss_fn(ref(x0), y0)
    want.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    errs = [float((p.grad - grads[n]).abs().max()) for n, p in pipe.named_parameters()]
    return {"loss": float(res.loss), "want": float(want), "grad_err": max(errs, default=0.0),
            "outputs_err": float((res.outputs - ref(x0)).abs().max())}


def size_mismatch_job(rank: int, world: int) -> str:
    from modelparallel.api import pipeline
    from modelparallel.errors import ConfigError

    case = _case()
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
    n = 8 if rank == 0 else 6
    try:
        pipe.step(torch.randn(n, 16), torch.randn(n, 8))
    except ConfigError as e:
        text = str(e)
    else:
        text = "no error"
    res = pipe.step(torch.randn(8, 16), torch.randn(8, 8))  # the pipeline is still usable
    return text + f" | then loss {float(res.loss):.3f}"


def guard_job(rank: int, world: int) -> list[str]:
    from tracer.test_traced import CHANGES, EXAMPLE, Flags

    from modelparallel.api import pipeline
    from modelparallel.errors import ConfigError

    model = Flags()
    pipe = pipeline(model, {"x": torch.randn(4, 4), **EXAMPLE},
                    loss_fn=torch.nn.functional.mse_loss, microbatches=2, trace_method="fx")
    out = []
    for change, _, _, _ in CHANGES:
        try:
            pipe.step({"x": torch.randn(4, 4), **EXAMPLE, **change}, torch.zeros(4, 4))
            out.append("no error")
        except ConfigError as e:
            out.append(str(e))
    return out


@pytest.mark.multiprocess
def test_every_rank_trains_on_rank_zeros_batch() -> None:
    for r in run_ranks(different_data_job, 2, timeout=180):
        v = r.unwrap()
        assert abs(v["loss"] - v["want"]) < 1e-5 * max(1.0, abs(v["want"])), v
        assert v["grad_err"] < 1e-5 and v["outputs_err"] < 1e-5, v


@pytest.mark.multiprocess
def test_rank_with_other_batch_size_is_named_on_every_rank() -> None:
    for r in run_ranks(size_mismatch_job, 2, timeout=180):
        text = r.unwrap()
        assert "pipeline rank(s) [1]" in text and "(6, 16)" in text and "(8, 16)" in text, text
        assert "then loss" in text


@pytest.mark.multiprocess
def test_changed_non_tensor_inputs_are_refused_on_two_ranks() -> None:
    for r in run_ranks(guard_job, 2, timeout=180):
        texts = r.unwrap()
        for text, (_, name, old, new) in zip(texts, [
                ({}, "'double'", "True", "False"), ({}, "'scale'", "2.0", "3.0"),
                ({}, "'mask'", "None", "a tensor")]):
            assert name in text and old in text and new in text, (r.rank, text)


def test_signature_names_structure_not_contents() -> None:
    a = batch_signature([torch.zeros(4, 3), 2], {"y": torch.ones(4)}, train=True)
    b = batch_signature([torch.ones(4, 3), 2], {"y": torch.zeros(4)}, train=True)
    c = batch_signature([torch.ones(5, 3), 2], {"y": torch.zeros(4)}, train=True)
    assert a == b != c


def one_rank_flag_job(rank: int, world: int) -> str:
    from tracer.test_traced import EXAMPLE, Flags

    from modelparallel.api import pipeline
    from modelparallel.errors import ConfigError

    pipe = pipeline(Flags(), {"x": torch.randn(4, 4), **EXAMPLE},
                    loss_fn=torch.nn.functional.mse_loss, microbatches=2, trace_method="fx",
                    timeout=60)
    try:
        pipe.step({"x": torch.randn(4, 4), **EXAMPLE, "double": rank == 0}, torch.zeros(4, 4))
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.mark.multiprocess
def test_flag_differing_on_one_rank_is_named_on_every_rank_promptly() -> None:
    for r in run_ranks(one_rank_flag_job, 2, timeout=120):
        text = r.unwrap()
        assert "pipeline rank(s) [1]" in text and "'double'" in text, text
        assert r.seconds < 50, r.seconds


def warnings_job(rank: int, world: int) -> list[str]:
    import warnings

    from modelparallel.api import pipeline

    case = _case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
        for _ in range(2):
            pipe.step(torch.randn(8, 16), torch.randn(8, 8))
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.multiprocess
def test_steps_raise_no_future_warning_on_any_rank() -> None:
    """Issue 13 item 12: torch's LeafSpec FutureWarning from unpickling templates is gone."""
    for r in run_ranks(warnings_job, 2, timeout=120):
        assert r.unwrap() == [], r.value


def accumulate_through_mismatch_job(rank: int, world: int, overlap: bool, when: int
                                    ) -> dict[str, Any]:
    """Note [batch overlapped]: two good steps with a refused one before good step ``when``
    (0: the very first step, whose boundary templates are new) accumulate the gradients of the
    two (tied GPT-2 weights included), as one process does."""
    from modelparallel import models
    from modelparallel.api import pipeline
    from modelparallel.errors import ConfigError

    case = models.gpt2("tiny", batch_size=4, seq_len=16)
    ref = copy.deepcopy(case.model)
    pipe = pipeline(case.model, case.args[0], loss_fn=case.loss_fn, microbatches=2,
                    timeout=60)
    pipe.executor.overlap_batch = overlap
    batches = [case.make_batch(4, 100 + i) for i in range(2)]
    losses, error = [], ""
    for j, (args, _, target) in enumerate(batches):
        if j == when:
            bad_args, _, bad_target = case.make_batch(4 if rank == 0 else 2, 7)
            cut = 8 if rank == 0 else 16  # rank 0's refused batch: a new shape key too
            try:
                pipe.step(bad_args[0][:, :cut], bad_target[:, :cut])
            except ConfigError as e:
                error = str(e)
        losses.append(float(pipe.step(args[0], target).loss))
        case.loss_fn(ref(*args), target).backward()
    want = dict(ref.named_parameters(remove_duplicate=False))
    errs = {n: float((p.grad - want[n].grad).abs().max() / want[n].grad.abs().max())
            for n, p in pipe.named_parameters()}
    pipe.close()
    return {"error": error, "losses": losses, "grad_err": max(errs.values()),
            "worst": max(errs, key=errs.get), "held": sorted(errs)}


@pytest.mark.multiprocess
@pytest.mark.parametrize(("overlap", "when"), [(True, 1), (True, 0), (False, 1)])
def test_refused_step_leaves_accumulated_gradients_as_they_were(overlap: bool, when: int
                                                                ) -> None:
    results = [r.unwrap() for r in run_ranks(accumulate_through_mismatch_job, 2, overlap, when,
                                             timeout=180)]
    for v in results:
        assert "pipeline rank(s) [1]" in v["error"], v["error"]
        assert v["grad_err"] < 1e-5, v
    assert any("transformer.wte.weight" in v["held"] for v in results)


def refused_step_state_job(rank: int, world: int, layer: str) -> dict[str, Any]:
    """Note [batch overlapped]: a refused step leaves rank 0's random state (a dropout on stage
    0 draws from it in the forward run ahead of the check) and its batch-norm statistics (no
    forward runs ahead of the check on a module with buffers) as they were."""
    from torch import nn

    from modelparallel.api import pipeline
    from modelparallel.errors import ConfigError

    torch.manual_seed(0)
    first = nn.Dropout(0.5) if layer == "dropout" else nn.BatchNorm1d(16)
    model = nn.Sequential(first, nn.Linear(16, 16), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    pipe = pipeline(model, (torch.randn(8, 16),), loss_fn=nn.functional.mse_loss,
                    microbatches=2, timeout=60, method="uniform")  # a layer on each stage
    pipe.step(torch.randn(8, 16), torch.randn(8, 8))
    n = 8 if rank == 0 else 6
    refused = torch.randn(n, 16), torch.randn(n, 8)
    held = [(f"{q.index}.{k}", b) for q in pipe.executor.programs
            for k, b in q.module.named_buffers()]
    buffers = {k: b.clone() for k, b in held}
    rng = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match="pipeline rank"):
        pipe.step(*refused)
    same_rng = bool(torch.equal(rng, torch.random.get_rng_state()))
    moved = [k for k, b in held if not torch.equal(b, buffers[k])]
    pipe.step(torch.randn(8, 16), torch.randn(8, 8))  # still usable
    pipe.close()
    return {"same_rng": same_rng, "moved": moved, "buffers": sorted(buffers)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layer", ["dropout", "batchnorm"])
def test_refused_step_leaves_random_state_and_statistics_as_they_were(layer: str) -> None:
    results = [r.unwrap() for r in run_ranks(refused_step_state_job, 2, layer, timeout=180)]
    assert all(v["same_rng"] and not v["moved"] for v in results), results
    if layer == "batchnorm":
        assert results[0]["buffers"], results  # on stage 0, the one that runs ahead
