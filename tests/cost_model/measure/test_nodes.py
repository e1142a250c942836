"""Node selection for profiling (modelparallel/cost_model/measure/nodes.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_graph_users_of_a_traced_module() -> None:
    from modelparallel.cost_model.measure import graph_users

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * self.w

    gm = torch.fx.symbolic_trace(Scale())
    users = graph_users(gm)
    assert users["w"] == ["mul"] and users["x"] == ["relu"] and users["relu"] == ["mul"]
