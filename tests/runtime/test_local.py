"""The single-process pipeline (modelparallel/runtime/local.py): stages on their own devices,
microbatch checks, the action order of the schedules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _stage_cases import Case, make_plan, rel_err

from modelparallel import models
from modelparallel.codegen import build_stages
from modelparallel.errors import ConfigError
from modelparallel.runtime.local import LocalPipeline, action_order


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def skip() -> Case:
    return Case(lambda: models.skip_mlp(batch_size=8))


def test_batch_must_divide_into_microbatches(skip: Case) -> None:
    stages = build_stages(skip.traced, make_plan(skip.traced, 2, [0.5]))
    pipe = LocalPipeline(stages, microbatches=3, loss_fn=skip.case.loss_fn)
    with pytest.raises(ConfigError, match="microbatches"):
        pipe.train_step(skip.flat, skip.case.target)


def _devices(p: int) -> list[str]:
    if torch.cuda.is_available():
        return ["cpu" if k % 2 else "cuda:0" for k in range(p)]
    return ["cpu"] * p


def test_stages_on_their_own_devices() -> None:
    """Stage k on devices[k]; a tied weight on two devices becomes two copies whose gradients
    are summed. Without CUDA every stage is on the CPU (the placement code still runs)."""
    c = Case(lambda: models.gpt2(size="tiny", batch_size=4))
    stages = build_stages(c.traced, make_plan(c.traced, 3, [0.3, 0.7]))
    devices = _devices(3)
    pipe = LocalPipeline(stages, microbatches=2, loss_fn=c.case.loss_fn, devices=devices)
    for s, dev in zip(stages, devices):
        assert {t.device for t in s.module.parameters()} == {torch.device(dev)}
    loss, _ = pipe.train_step(c.flat, c.case.target)
    ref_loss = c.case.loss_fn(c.reference(*c.case.args, **c.case.kwargs), c.case.target)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    ref = dict(c.reference.named_parameters())
    for name, p in pipe.named_parameters():
        assert rel_err(p.grad.cpu(), ref[name].grad) <= 1e-4, name
    name = next(q.name for q in c.traced.graph.params if q.aliases)
    assert torch.equal(stages[0].tensor(name).grad.cpu(), stages[2].tensor(name).grad.cpu())


def test_rotary_tables_are_recomputed_on_every_stage() -> None:
    """Llama's rotary cosines and sines come from the constant ``inv_freq`` buffer (Note
    [constant buffers] in modelparallel/ir/analysis.py): no stage sends them, every stage
    that recomputes them holds its own copy of the buffer, and the pipelined gradients are one backward's."""
    c = Case(lambda: models.llama(size="tiny", batch_size=4))
    plan = make_plan(c.traced, 3, [0.3, 0.7])
    buffer = next(q.name for q in c.traced.graph.params if q.name.endswith("inv_freq"))
    readers = [n.name for n in c.traced.graph.nodes if buffer in n.params]
    assert readers and all(plan.assignment[n] == -1 for n in readers)
    stages = build_stages(c.traced, plan)
    holders = [s.index for s in stages if buffer in dict(s.module.named_buffers())]
    assert holders == [s.index for s in stages if set(readers) & set(s.recomputed)]
    assert len(holders) >= 2
    sent = {v.name for s in stages for v in s.send}
    assert not sent & {n.name for n in c.traced.graph.nodes if plan.assignment[n.name] == -1}
    pipe = LocalPipeline(stages, microbatches=2, loss_fn=c.case.loss_fn)
    loss, _ = pipe.train_step(c.flat, c.case.target)
    ref_loss = c.case.loss_fn(c.reference(*c.case.args, **c.case.kwargs), c.case.target)
    ref_loss.backward()
    assert rel_err(loss, ref_loss.detach()) <= 1e-5
    ref = dict(c.reference.named_parameters())
    for name, p in pipe.named_parameters():
        assert rel_err(p.grad, ref[name].grad) <= 1e-5, name


def test_action_order_respects_dependencies() -> None:
    for schedule in ("gpipe", "1f1b"):
        order = action_order(schedule, 3, 5)
        seen: set[tuple[str, int, int]] = set()
        for a in order:
            kind, s, i = a.kind, a.stage, a.microbatch
            if kind == "F" and s > 0:
                assert ("F", s - 1, i) in seen
            if kind == "B":
                assert ("F", s, i) in seen and (s == 2 or ("B", s + 1, i) in seen)
            seen.add((kind, s, i))
        assert len(seen) == 30


@pytest.mark.parametrize(("model", "communication"),
                         [("gpt2", "direct"), ("skip", "direct"), ("skip", "relay")])
def test_new_schedules_in_one_process(model: str, communication: str) -> None:
    """ZB-H1 (split backward) and an interleaved 1F1B schedule (two virtual stages per rank,
    four stages) in one process give the gradients of one backward."""
    from modelparallel.schedule import make_schedule

    c = Case(lambda: models.gpt2(size="tiny", batch_size=4) if model == "gpt2"
             else models.skip_mlp(batch_size=4))
    stages = build_stages(c.traced, make_plan(c.traced, 4, [0.25, 0.5, 0.75], communication))
    if model == "skip":
        far = any(dst > s.index + 1 for s in stages for dst, _ in s.dests)
        assert far == (communication == "direct")
    ref_loss = c.case.loss_fn(c.reference(*c.case.args, **c.case.kwargs), c.case.target)
    ref_loss.backward()
    ref = dict(c.reference.named_parameters())
    for schedule, split in (("zb-h1", True), ("zb-h1", None),
                            (make_schedule("1f1b", 2, 2, virtual_stages=2), None)):
        pipe = LocalPipeline(stages, microbatches=2, loss_fn=c.case.loss_fn, schedule=schedule,
                             split_backward=split)
        for p in pipe.parameters():
            p.grad = None
        loss, _ = pipe.train_step(c.flat, c.case.target)
        assert rel_err(loss, ref_loss.detach()) <= 1e-5
        for name, p in pipe.named_parameters():
            assert rel_err(p.grad, ref[name].grad) <= 1e-5, (schedule, split, name)


def test_zero_bubble_on_one_device_runs_one_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """On one device ZB-H1's I runs the whole backward and W nothing (Note [one backward in one
    process]); split_backward=True takes the two-pass path, and both give the same gradients."""
    import modelparallel.runtime.local as local

    c = Case(lambda: models.skip_mlp(batch_size=8))
    stages = build_stages(c.traced, make_plan(c.traced, 4, [0.1, 0.45, 0.8], "direct"))
    grads = {}
    calls = []
    real = local.backward_input
    monkeypatch.setattr(local, "backward_input", lambda *a: calls.append(1) or real(*a))
    for split in (None, True):
        calls.clear()
        pipe = LocalPipeline(stages, microbatches=4, loss_fn=c.case.loss_fn, schedule="zb-h1",
                             split_backward=split)
        assert pipe.split_backward is bool(split)
        for p in pipe.parameters():
            p.grad = None
        pipe.train_step(c.flat, c.case.target)
        assert len(calls) == (16 if split else 0)
        grads[split] = {n: p.grad.clone() for n, p in pipe.named_parameters()}
    for name, g in grads[None].items():
        assert rel_err(g, grads[True][name]) <= 1e-6, name


@pytest.mark.parametrize("communication", ["direct", "relay"])
def test_skip_training_steps_match_one_device(communication: str) -> None:
    """Three SGD steps of the skip MLP on four stages (its skip value read two and three
    stages later) leave the parameters of three single-device steps."""
    c = Case(lambda: models.skip_mlp(batch_size=8))
    stages = build_stages(c.traced, make_plan(c.traced, 4, [0.1, 0.45, 0.8], communication))
    pipe = LocalPipeline(stages, microbatches=4, loss_fn=c.case.loss_fn, schedule="1f1b")
    ours = torch.optim.SGD(list(pipe.parameters()), lr=0.1)
    ref_opt = torch.optim.SGD(c.reference.parameters(), lr=0.1)
    for _ in range(3):
        ours.zero_grad()
        ref_opt.zero_grad()
        loss, _ = pipe.train_step(c.flat, c.case.target)
        ref_loss = c.case.loss_fn(c.reference(*c.case.args, **c.case.kwargs), c.case.target)
        ref_loss.backward()
        assert rel_err(loss, ref_loss.detach()) <= 1e-5
        ours.step()
        ref_opt.step()
    ref = dict(c.reference.named_parameters())
    for name, p in pipe.named_parameters():
        assert rel_err(p.detach(), ref[name].detach()) <= 1e-5, name
