"""smp.step's splitting and result rules (pure logic), and a one-process step."""

from __future__ import annotations

import inspect
from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from modelparallel.errors import ConfigError, UsageError
from modelparallel.torch.stepping import StepOutput, _collect, split_arguments


class _Sliced:
    def __init__(self, parts: list[int]) -> None:
        self.parts = parts

    def smp_slice(self, num_mb: int, mb: int, axis: int) -> _Sliced:
        n = len(self.parts) // num_mb
        return _Sliced(self.parts[mb * n:(mb + 1) * n])


def test_split_rules() -> None:
    Pair = namedtuple("Pair", "a b")

    def fn(model: Any, batch: Any, mask: Any, scale: float, tokens: Any = None) -> None:
        del model, batch, mask, scale, tokens

    sig = inspect.signature(fn)
    batch = {"x": torch.arange(8).reshape(4, 2), "pair": Pair(torch.arange(4), 7),
             "list": [torch.zeros(4, 3)]}
    parts = split_arguments(sig, ("M", batch, torch.ones(2, 4), 0.5),
                            {"tokens": _Sliced([1, 2, 3, 4])}, 2, {"mask": 1}, ())
    assert len(parts) == 2
    (args0, kw0), (args1, _kw1) = parts
    assert args0[0] == "M" and args0[3] == 0.5
    assert args1[1]["x"].tolist() == [[4, 5], [6, 7]]
    assert isinstance(args1[1]["pair"], Pair) and args1[1]["pair"].a.tolist() == [2, 3]
    assert args1[1]["pair"].b == 7 and args0[1]["list"][0].shape == (2, 3)
    assert args0[2].shape == (2, 2)  # split along axis 1
    assert args1[4].parts == [3, 4] and not kw0
    whole = split_arguments(sig, ("M", batch, torch.ones(3, 4), 0.5), {}, 2, {}, ["mask"])
    assert whole[1][0][2].shape == (3, 4)


def test_indivisible_batch_is_named() -> None:
    sig = inspect.signature(lambda model, data: None)
    with pytest.raises(ConfigError, match=r"'data' has size 5 .* 2 microbatches"):
        split_arguments(sig, (None, torch.zeros(5, 2)), {}, 2, {}, ())


def test_step_output_and_collect() -> None:
    so = StepOutput([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])])
    assert so.reduce_mean().tolist() == [2.0, 3.0] and so.stack().shape == (2, 2)
    assert so.concat().tolist() == [1.0, 2.0, 3.0, 4.0]
    out = _collect([{"loss": torch.tensor(1.0), "n": 3}, {"loss": torch.tensor(2.0), "n": 4}],
                   True)
    assert isinstance(out["loss"], StepOutput) and out["n"] == [3, 4]
    assert _collect([0.5, 1.5], True) == [0.5, 1.5]
    assert _collect([None, None], True) is None


def test_hf_model_output_is_kept() -> None:
    from transformers.modeling_outputs import CausalLMOutput

    outs = [CausalLMOutput(loss=torch.tensor(float(i)), logits=torch.ones(1, 2)) for i in
            range(2)]
    got = _collect(outs, True)
    assert isinstance(got, CausalLMOutput)
    assert float(got["loss"].reduce_mean()) == 0.5 and got.logits.concat().shape == (2, 2)


def test_one_process_step_matches_plain_training() -> None:
    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    smp.init({"partitions": 1, "microbatches": 2})
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 2))
        ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        ref.load_state_dict(model.state_dict())
        dm = smp.DistributedModel(model)
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1))
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # SMP scripts do this
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 1, gamma=0.5)

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.mse_loss(model(x), y)
            model.backward(loss)
            return loss, loss.item()

        x, y = torch.randn(8, 4), torch.randn(8, 2)
        for _ in range(2):
            opt.zero_grad()
            loss, items = train_step(dm, x, y)
            opt.step()
            sched.step()
            ref_opt.zero_grad()
            ref_loss = F.mse_loss(ref(x), y)
            ref_loss.backward()
            ref_opt.step()
            ref_sched.step()
            assert float(loss.reduce_mean()) == pytest.approx(float(ref_loss), abs=1e-6)
            assert len(items) == 2 and sum(items) / 2 == pytest.approx(float(ref_loss), 1e-6)
        for a, b in zip(dm.parameters(), ref.parameters()):
            assert torch.allclose(a, b, atol=1e-6)

        @smp.step
        def forgets_backward(model: Any, x: torch.Tensor) -> Any:
            return model(x)

        with pytest.raises(UsageError, match=r"without calling model\.backward"):
            forgets_backward(dm, x)
        with torch.no_grad():
            assert forgets_backward(dm, x).concat().shape == (8, 2)
        with pytest.raises(UsageError, match=r"only one smp\.DistributedModel"):
            smp.DistributedModel(torch.nn.Linear(1, 1))
    finally:
        shutdown()


def test_trace_execution_times_plans_with_measured_times() -> None:
    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    smp.init({"partitions": 1, "microbatches": 2})
    try:
        dm = smp.DistributedModel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
                                  trace_execution_times=True)

        @smp.step
        def train_step(model: Any, x: torch.Tensor) -> Any:
            loss = model(x).sum()
            model.backward(loss)
            return loss

        train_step(dm, torch.randn(4, 4))
        assert dm.pipeline.planning.node_times is None  # the options given stay as given
        assert dm.partitioned and dm.node_times_file is not None
        from modelparallel.cost_model.node_times import NodeTimesFile

        measured = NodeTimesFile.load(dm.node_times_file, dm.pipeline.traced.graph).times
        planned = {n.name: (n.forward_time, n.backward_time) for n in dm.pipeline.plan.nodes}
        assert measured and all(planned[k] == pytest.approx(v) for k, v in measured.items())
    finally:
        shutdown()
