"""TracedModel's input contract: non-tensor inputs guarded (Note [guarded inputs]), dimensions
export specialised refused with a ConfigError, and batch-1 examples kept dynamic (Note
[dynamic export]) -- issue 13 items 1 and 4."""

from __future__ import annotations

import pytest
import torch

from modelparallel.api import pipeline
from modelparallel.errors import ConfigError
from modelparallel.tracer import trace


class Flags(torch.nn.Module):
    """A model whose result depends on a flag, an optional mask and a keyword-only scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, double: bool = False, mask: torch.Tensor | None = None,
                *, scale: float = 2.0) -> torch.Tensor:
        y = self.lin(x) * scale
        if double:
            y = y * 2
        if mask is not None:
            y = y * mask
        return y


class Reshaper(torch.nn.Module):
    """Reshapes with the batch size read from the input (export specialises it at size 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return self.lin(x).view(b, t, 2, 3).reshape(b, t * 6)


EXAMPLE = {"double": True, "mask": None, "scale": 2.0}
CHANGES = [({"double": False}, "'double'", "True", "False"),
           ({"scale": 3.0}, "'scale'", "2.0", "3.0"),
           ({"mask": torch.ones(4, 4)}, "'mask'", "None", "a tensor of shape (4, 4)")]


@pytest.mark.parametrize("method", ["fx", "export", "auto"])
def test_changed_non_tensor_inputs_are_refused(method: str) -> None:
    x = torch.randn(4, 4)
    traced = trace(Flags(), (), {"x": x, **EXAMPLE}, method=method)
    assert traced.flatten_inputs((), {"x": torch.randn(4, 4), **EXAMPLE})
    for change, name, old, new in CHANGES:
        with pytest.raises(ConfigError) as info:
            traced.flatten_inputs((), {"x": x, **EXAMPLE, **change})
        text = str(info.value)
        assert name in text and old in text and new in text, text


def test_tensor_where_example_had_one_is_required() -> None:
    traced = trace(Flags(), (), {"x": torch.randn(2, 4), "mask": torch.ones(2, 4)})
    with pytest.raises(ConfigError, match="'mask' was a tensor"):
        traced.flatten_inputs((), {"x": torch.randn(2, 4), "mask": None})


def test_pipeline_refuses_changed_flag_in_one_process() -> None:
    model = Flags()
    pipe = pipeline(model, {"x": torch.randn(4, 4), **EXAMPLE},
                    loss_fn=torch.nn.functional.mse_loss, microbatches=2)
    x = torch.randn(4, 4)
    same = pipe.eval_step({"x": x, **EXAMPLE})
    torch.testing.assert_close(same, model(x, **EXAMPLE))
    for change, name, _, _ in CHANGES:
        with pytest.raises(ConfigError, match=name):
            pipe.step({"x": x, **EXAMPLE, **change}, torch.zeros(4, 4))


def test_batch_one_export_keeps_the_batch_dimension() -> None:
    model = Reshaper()
    traced = trace(model, (torch.randn(1, 5, 4),), method="export")
    assert traced.static_dims["x"][0] is None, traced.static_dims
    for batch in (1, 3):
        x = torch.randn(batch, 5, 4)
        torch.testing.assert_close(traced.gm(x)[0], model(x))
    traced.check_shapes([torch.randn(3, 7, 4)])


def test_specialised_dimension_is_named_before_running() -> None:
    traced = trace(Reshaper(), (torch.randn(2, 5, 4),), method="export")
    with pytest.raises(ConfigError, match=r"'x' has size 5 in dimension 2.*fixed .* to 4"):
        traced.check_shapes([torch.randn(2, 5, 5)])
    assert any("static dimensions" in n and "x[2]=4" in n for n in traced.notes), traced.notes


def test_pipeline_traced_on_microbatch_one_runs_larger_batches() -> None:
    from modelparallel import models

    case = models.gpt2("tiny", batch_size=2, seq_len=16)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
    assert pipe.traced.method == "export"
    args, _, target = case.make_batch(8, 1)
    loss = pipe.step(args, target).loss
    torch.testing.assert_close(loss, case.loss_fn(case.model(*args), target).detach())
