"""In-context backward host times (Note [in-context backward host time],
modelparallel/cost_model/measure/backward.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class _GradMix(torch.nn.Module):
    """An input-only node (no gradient), a module with parameters, a parameter-free op that
    needs a gradient, and a value read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x * 2.0
        h = torch.tanh(self.fc(scaled))
        return self.norm(h) + h


def test_every_backward_function_belongs_to_exactly_one_node() -> None:
    from modelparallel.cost_model.measure.backward import _backward_roots, _FunctionMapper

    gm = torch.fx.symbolic_trace(_GradMix())
    mapper = _FunctionMapper(gm)
    with torch.enable_grad():
        roots = _backward_roots(mapper.run(torch.randn(4, 16)))
    reachable, stack = set(), [t.grad_fn for t in roots]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in reachable:
            reachable.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    # a dict: each function has one owner; and the owned functions are exactly the backward's
    assert set(mapper.owner) == reachable
    by_node: dict[str, list[str]] = {}
    for fn, name in mapper.owner.items():
        by_node.setdefault(name, []).append(type(fn).__name__)
    assert "mul" not in by_node and "x" not in by_node            # no gradient flows there
    assert sorted(by_node["fc"]).count("AccumulateGrad") == 2     # weight and bias, once each
    assert set(by_node) == {"fc", "tanh", "norm", "add"}


def test_cpu_backward_host_times_end_to_end() -> None:
    from modelparallel.cost_model.measure import (
        backward_host_times,
        profile_node_times,
        profile_nodes,
    )
    from modelparallel.cost_model.node_replay import node_times

    gm = torch.fx.symbolic_trace(_GradMix())
    x = torch.randn(8, 16)
    host = backward_host_times(gm, [x], warmup=1, repeat=2)
    assert set(host) == {"fc", "tanh", "norm", "add"}             # the nodes that need grad
    # Each is a span minus the hooks' own (measured, noisy) cost: never negative, not all zero.
    assert all(v >= 0 for v in host.values()) and sum(host.values()) > 0
    assert all(p.grad is None for p in gm.parameters())           # .grad put back
    profiles = profile_nodes(gm, [x], warmup=1, repeat=2)
    assert all(p.host_backward_context == 0.0 for p in profiles.values())  # CPU: host is device
    order = [n.name for n in gm.graph.nodes]
    replay = node_times(order, profiles)
    assert [b for _, b in replay.values()] == pytest.approx(
        [profiles[n].device_backward for n in replay])
    out: dict = {}
    times = profile_node_times(gm, [x], warmup=1, repeat=2, profiles_out=out)
    assert set(out) == set(times) and times["mul"][1] == 0.0
