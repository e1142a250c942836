"""In-context forward host times (Note [in-context forward host time],
modelparallel/cost_model/measure/forward.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


class _SplitMix(torch.nn.Module):
    """A node with a tuple output read through ``getitem`` (a node the profiler skips), a
    parameter read with ``get_attr``, and a parameter-free op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.fc(x), 2, dim=-1)
        return torch.relu(a) * self.scale + b


def test_stamped_module_keeps_outputs_and_times_every_node() -> None:
    from modelparallel.cost_model.measure import forward_host_times, stamped_module

    gm = torch.fx.symbolic_trace(_SplitMix())
    x = torch.randn(4, 16)
    stamped, names = stamped_module(gm)
    assert torch.equal(stamped(x), gm(x))
    assert names == [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert stamped.fc is gm.fc                                 # shares the weights
    stamp_calls = [n for n in stamped.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "__name__", "") == "_stamp"]
    assert len(stamp_calls) == len(names) + 1                  # one per node, one before output
    host = forward_host_times(gm, [x], warmup=1, repeat=2)
    assert list(host) == names and all(v >= 0 for v in host.values())
    assert gm.fc.weight.grad is None                           # nothing ran backward


def test_cpu_forward_host_times_end_to_end() -> None:
    from modelparallel.cost_model.measure import forward_host_times, profile_nodes
    from modelparallel.cost_model.node_replay import node_times

    gm = torch.fx.symbolic_trace(_GradMix())
    x = torch.randn(8, 16)
    host = forward_host_times(gm, [x], warmup=1, repeat=3)
    assert set(host) == {"mul", "fc", "tanh", "norm", "add"}
    assert all(v > 0 for v in host.values())                   # the CPU: the run time
    profiles = profile_nodes(gm, [x], warmup=1, repeat=2)
    # the host is the device on the CPU: recorded as 0, as the isolated host forward
    assert all(p.host_forward_context == 0.0 for p in profiles.values())
    order = [n.name for n in gm.graph.nodes]
    assert [f for f, _ in node_times(order, profiles).values()] == pytest.approx(
        [profiles[n].device_forward for n in node_times(order, profiles)])


def test_forward_host_times_fall_back_when_the_stamped_run_fails(tmp_path) -> None:
    import json

    from modelparallel.cost_model.measure import profile_nodes
    from modelparallel.cost_model.node_replay import node_times
    from modelparallel.cost_model.node_times import load_node_profiles, save_node_times

    class InPlaceOnWeight(torch.nn.Module):
        """Scales its own weight in place: fine without autograd (the isolated profiler runs
        the graph so), refused with autograd on (an in-place write on a leaf that requires
        grad), so the in-context runs fail."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc.weight.mul_(1.0)
            return torch.relu(self.fc(x))

    gm = torch.fx.symbolic_trace(InPlaceOnWeight())
    with pytest.warns(UserWarning, match="in-context forward host times not measured"):
        profiles = profile_nodes(gm, [torch.randn(4, 8)], warmup=1, repeat=2,
                                 backward_context=False)
    assert profiles and all(p.host_forward_context is None for p in profiles.values())
    order = [n.name for n in gm.graph.nodes]
    assert node_times(order, profiles) == node_times(order, profiles, forward_host="isolated")
    # the file keeps the missing figure as missing; old files (without the field) read as None
    path = save_node_times(tmp_path / "t.json", node_times(order, profiles), profiles=profiles)
    assert all(p.host_forward_context is None for p in load_node_profiles(path).values())
    data = json.loads(path.read_text())
    for v in data["profiles"].values():
        v["host_forward_context"], v["host_backward_context"] = 1e-6, None
    path.write_text(json.dumps(data))
    assert all(p.host_forward_context == 1e-6 for p in load_node_profiles(path).values())
    for v in data["profiles"].values():
        del v["host_forward_context"]                          # a file from before the field
    path.write_text(json.dumps(data))
    assert all(p.host_forward_context is None for p in load_node_profiles(path).values())


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
