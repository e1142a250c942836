"""A small MLP with a long skip connection: the quickest model for pipeline tests."""

from __future__ import annotations

import torch
from torch import nn

from modelparallel.models.case import (
    Batch,
    ModelCase,
    _build,
    _case,
    _check_positive,
    _gen,
    mse_loss,
)

__all__ = ["SkipMLP", "skip_mlp"]

class SkipMLP(nn.Module):
    """An MLP whose early activation is added back near the end.

    ``h0 = act(embed(x))``, then ``depth`` residual-free hidden layers, then
    ``head(act(proj(h)) + h0)``: split in 3-4 stages, ``h0`` jumps over the middle stages.
    """

    def __init__(self, in_features: int, hidden: int, depth: int, out_features: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.embed(x))
        h = h0
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(torch.tanh(self.proj(h)) + h0)


def skip_mlp(*, in_features: int = 16, hidden: int = 32, depth: int = 6, out_features: int = 8,
             batch_size: int = 8, seed: int = 0, device: str | torch.device = "cpu"
             ) -> ModelCase:
    """:class:`SkipMLP` regressing random targets with a mean squared error.

    Args:
        in_features: Input width.
        hidden: Hidden width.
        depth: Hidden layers between the skip's ends.
        out_features: Output width.
        batch_size: Samples per batch.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_positive(in_features=in_features, hidden=hidden, depth=depth,
                    out_features=out_features, batch_size=batch_size)
    model = _build(lambda: SkipMLP(in_features, hidden, depth, out_features), seed, device)

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        return ((torch.randn(b, in_features, generator=g),), {},
                torch.randn(b, out_features, generator=g))
    return _case("skip-mlp", model, make, batch_size, seed, mse_loss, device)
