"""The split backward of ZB schedules (Note [split backward]): ``I`` then ``W`` give the same
gradients as one backward, on graphs where weight paths leave the input path, skip it, or hang
off the outputs directly."""

from __future__ import annotations

import pytest
import torch

from modelparallel.runtime.split_backward import backward_input, backward_weight


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d = (torch.nn.Linear(4, 4) for _ in range(3))
        self.c = torch.nn.Parameter(torch.randn(4))
        self.ln = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.a(x))
        h2 = self.b(h) + h * 2 + self.d(self.c.expand(3, 4))  # a branch without x
        h0 = self.a(x)  # a weight used twice; an output that is also used further on
        return (self.ln(h2) + self.c, h2.sum(1), self.a.weight.sum() * x.sum(), h0,
                torch.tanh(h0) * 3)


@pytest.mark.parametrize("with_input", [True, False])
def test_input_then_weight_equals_one_backward(with_input: bool) -> None:
    torch.manual_seed(0)
    m = _Branchy()
    x = torch.randn(3, 4, requires_grad=with_input)
    ys = m(x)
    gs = [torch.randn_like(y) for y in ys]
    inputs = [x] if with_input else []
    want = torch.autograd.grad(list(ys), [*m.parameters(), *inputs], gs)
    ys = m(x)
    got, pending = backward_input(list(ys), gs, inputs, list(m.parameters()))
    assert all(p.grad is None for p in m.parameters()), "I computes no weight gradient"
    if with_input:
        assert torch.allclose(got[0], want[-1], atol=1e-6)
    backward_weight(pending)
    for p, w in zip(m.parameters(), want):
        assert p.grad is not None and torch.allclose(p.grad, w, atol=1e-5)


def test_loss_root_and_accumulation() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3, requires_grad=True)
    lin.weight.grad = torch.ones_like(lin.weight)
    loss = lin(x).pow(2).mean()
    want = torch.autograd.grad(loss, lin.weight, retain_graph=True)[0] + 1
    (gx,), pending = backward_input([loss], [None], [x], list(lin.parameters()))
    backward_weight(pending)
    assert torch.allclose(lin.weight.grad, want, atol=1e-6) and gx is not None
