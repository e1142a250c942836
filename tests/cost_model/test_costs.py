"""The roofline cost model against hand-computed numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel.cost_model import (
    DeviceSpec,
    estimate_costs,
    inflight_microbatches,
    param_state_bytes,
)
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta

# A device with round numbers: 1 TFLOP/s, 100 GB/s, 1 us per op, 10 GB/s links.
DEV = DeviceSpec("toy", {"float32": 1e12}, memory_bandwidth=100e9, memory_bytes=2**30,
                 link_bandwidth=10e9, link_latency=2e-6, kernel_overhead=1e-6)


def _linear_graph(batch: int = 64, d_in: int = 1024, d_out: int = 4096) -> Graph:
    f32 = "float32"
    return Graph("lin", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((batch, d_in), f32),)),
        Node("fc", OpKind.CALL_MODULE, "fc", ("x",), (TensorMeta((batch, d_out), f32, True),),
             ("fc.weight", "fc.bias"), flops=2 * batch * d_in * d_out),
        Node("relu", OpKind.CALL_FUNCTION, "aten.relu.default", ("fc",),
             (TensorMeta((batch, d_out), f32, True),)),
        Node("v", OpKind.CALL_FUNCTION, "aten.view.default", ("relu",),
             (TensorMeta((batch * d_out,), f32, True),)),
        Node("output", OpKind.OUTPUT, "output", ("v",)),
    ), params=(Param("fc.weight", (d_out, d_in), f32), Param("fc.bias", (d_out,), f32)))


def test_linear_roofline_by_hand() -> None:
    c = estimate_costs(_linear_graph(), DEV, optimizer="sgd").nodes["fc"]
    flops = 2 * 64 * 1024 * 4096                      # 536.9 MFLOP -> 536.9 us at 1 TFLOP/s
    moved = 4 * (64 * 1024 + 4096 * 1024 + 4096 + 64 * 4096)  # in + weight + bias + out
    assert flops / 1e12 > moved / 100e9                # compute bound
    assert c.forward_time == pytest.approx(flops / 1e12 + 1e-6)
    assert c.backward_time == pytest.approx(2 * flops / 1e12 + 1e-6)
    assert c.saved_bytes == 4 * 64 * 1024              # the input, for the weight gradient
    assert c.output_bytes == c.grad_bytes == 4 * 64 * 4096


def test_elementwise_is_bandwidth_bound_and_views_are_free() -> None:
    costs = estimate_costs(_linear_graph(), DEV)
    relu = costs.nodes["relu"]
    moved = 2 * 4 * 64 * 4096                          # read + write
    assert relu.forward_time == pytest.approx(moved / 100e9 + 1e-6)
    assert relu.backward_time == pytest.approx(2 * moved / 100e9 + 1e-6)
    assert costs.nodes["v"].forward_time == 0 and costs.nodes["v"].backward_time == 0
    assert costs.nodes["x"].forward_time == 0


def test_measured_times_replace_the_roofline() -> None:
    costs = estimate_costs(_linear_graph(), DEV, measured={"fc": (1.0, 2.0)})
    assert costs.nodes["fc"].time == 3.0
    assert costs.source == "mixed"
    full = estimate_costs(_linear_graph(), DEV, measured={"fc": (1.0, 2.0), "relu": (0.1, 0.1)})
    assert full.source == "profiled"


def test_tracer_measurements_are_used() -> None:
    g = _linear_graph()
    g = g.replace(nodes=tuple(
        Node(n.name, n.op, n.target, n.inputs, n.outputs, n.params, flops=n.flops,
             backward_flops=10**9, saved_bytes=123) if n.name == "fc" else n for n in g.nodes))
    c = estimate_costs(g, DEV).nodes["fc"]
    assert c.saved_bytes == 123
    assert c.backward_time == pytest.approx(1e9 / 1e12 + 1e-6)


@pytest.mark.parametrize(("optimizer", "per_element"), [
    ("sgd", 8), ("momentum", 12), ("adam", 16), ("adamw", 16), (18, 18)])
def test_parameter_state(optimizer, per_element) -> None:
    p = Param("w", (10, 10), "float32")
    assert param_state_bytes(p, optimizer) == 100 * per_element
    assert param_state_bytes(Param("b", (10,), "float32", is_buffer=True), "adam") == 40
    assert param_state_bytes(Param("f", (10,), "float32", requires_grad=False), "adam") == 40


def test_unknown_optimizer() -> None:
    with pytest.raises(ConfigError, match="unknown optimizer"):
        param_state_bytes(Param("w", (1,), "float32"), "lion9")


def test_inflight() -> None:
    assert [inflight_microbatches("interleaved", 2, 4, s) for s in range(4)] == [2, 2, 2, 1]
    assert [inflight_microbatches("simple", 3, 4, s) for s in range(4)] == [3, 3, 3, 3]
    with pytest.raises(ConfigError):
        inflight_microbatches("1f1b", 2, 4, 4)


def test_comm_time() -> None:
    costs = estimate_costs(_linear_graph(), DEV)
    assert costs.comm_time(10e9) == pytest.approx(1 + 2e-6)
    assert costs.comm_time(0) == 0


# -- traced modules against hand-computed numbers ---------------------------------------------------

torch = pytest.importorskip("torch")


def _traced_costs(module, *inputs):
    from modelparallel.tracer import trace

    traced = trace(module, inputs)
    return traced.graph, estimate_costs(traced.graph, DEV, optimizer="adam")


def _only(graph, predicate):
    nodes = [n for n in graph.nodes if predicate(n)]
    assert len(nodes) == 1, [n.name for n in graph.nodes]
    return nodes[0]


def test_traced_linear() -> None:
    b, i, o = 32, 256, 512
    graph, costs = _traced_costs(torch.nn.Linear(i, o), torch.randn(b, i))
    node = _only(graph, lambda n: n.op not in (OpKind.PLACEHOLDER, OpKind.OUTPUT))
    assert node.flops == 2 * b * i * o
    assert node.backward_flops == 2 * b * i * o              # weight grad only: x needs none
    assert node.saved_bytes == 4 * b * i                     # the input
    c = costs.nodes[node.name]
    moved = 4 * (b * i + o * i + o + b * o)
    assert c.forward_time == pytest.approx(max(2 * b * i * o / 1e12, moved / 100e9) + 1e-6)
    assert costs.param_state_bytes["weight"] == 4 * o * i * 4  # param, grad, Adam m and v


def test_traced_second_linear_needs_both_gradients() -> None:
    b, i, o = 8, 64, 32
    graph, _ = _traced_costs(torch.nn.Sequential(torch.nn.Linear(i, i), torch.nn.Linear(i, o)),
                             torch.randn(b, i))
    second = [n for n in graph.nodes if n.flops][-1]
    assert second.flops == 2 * b * i * o
    assert second.backward_flops == 2 * 2 * b * i * o       # input grad + weight grad


def test_traced_conv2d() -> None:
    n, cin, cout, k, hw = 4, 16, 32, 3, 20
    conv = torch.nn.Conv2d(cin, cout, k, padding=1)
    graph, costs = _traced_costs(conv, torch.randn(n, cin, hw, hw))
    node = _only(graph, lambda x: x.op not in (OpKind.PLACEHOLDER, OpKind.OUTPUT))
    flops = 2 * n * cout * hw * hw * cin * k * k
    assert node.flops == flops
    assert node.outputs[0].shape == (n, cout, hw, hw)
    assert node.saved_bytes == 4 * n * cin * hw * hw
    assert costs.nodes[node.name].forward_time == pytest.approx(
        max(flops / 1e12, 4 * (n * cin * hw * hw + cout * cin * k * k + cout + n * cout * hw * hw)
            / 100e9) + 1e-6)


class _Attention(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.d = d

    def forward(self, x):
        q, k, v = self.qkv(x).split(self.d, dim=-1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.d**0.5
        return torch.matmul(scores.softmax(dim=-1), v)


def test_traced_attention() -> None:
    b, s, d = 2, 64, 32
    graph, costs = _traced_costs(_Attention(d), torch.randn(b, s, d))
    matmuls = [n for n in graph.nodes if "matmul" in n.target]
    assert [n.flops for n in matmuls] == [2 * b * s * s * d, 2 * b * s * s * d]
    qkv = _only(graph, lambda n: n.op is OpKind.CALL_MODULE)
    assert qkv.flops == 2 * b * s * d * 3 * d
    softmax = _only(graph, lambda n: "softmax" in n.target)
    assert softmax.saved_bytes == 4 * b * s * s                # softmax keeps its output
    total = sum(n.flops for n in graph.nodes)
    assert total >= 2 * b * s * d * 3 * d + 4 * b * s * s * d
    assert sum(c.forward_time for c in costs.nodes.values()) > 0


def test_backward_host_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times

    # a: big kernels (the host runs ahead); b, c: tiny kernels queued slowly.
    p = {"a": NodeProfile(1.0, 0.1, 2.0, 0.1, "A"), "b": NodeProfile(0.1, 0.5, 0.1, 1.0, "B"),
         "c": NodeProfile(0.1, 0.5, 0.1, 1.0, "B")}
    device_only = node_times(["a", "b", "c"], p)
    assert [round(b, 6) for _, b in device_only.values()] == [2.0, 0.1, 0.1]
    replay = node_times(["a", "b", "c"], p, backward_host=True)
    # Forward: host queues a at 0.1, b at 0.6, c at 1.1; the device finishes a at 1.1, b at
    # 1.2, c at 1.3. Backward in reverse: c queued at 2.1 (device waits 0.8), b at 3.1, a at
    # 3.2 (then 2.0 of kernels).
    assert [round(f, 6) for f, _ in replay.values()] == [1.1, 0.1, 0.1]
    assert [round(b, 6) for _, b in replay.values()] == [2.0, 1.0, 0.9]
    assert sum(sum(v) for v in replay.values()) == pytest.approx(5.2)


def test_sent_values_held_unless_the_op_saves_its_output() -> None:
    from modelparallel.ir import Graph, Node, OpKind, TensorMeta

    t = (TensorMeta((8, 8), "float32", True),)
    g = Graph("acts", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=t),
        Node("r", OpKind.CALL_FUNCTION, "aten.relu.default", inputs=("x",), outputs=t),
        Node("v", OpKind.CALL_FUNCTION, "aten.view.default", inputs=("r",), outputs=t),
        Node("g", OpKind.CALL_FUNCTION, "aten.gelu.default", inputs=("v",), outputs=t),
        Node("a", OpKind.CALL_FUNCTION, "aten.add.Tensor", inputs=("g", "r"), outputs=t),
        Node("output", OpKind.OUTPUT, "output", inputs=("a",))))
    c = estimate_costs(g, "h100").nodes
    assert [c[n].sent_held for n in "rvga"] == [0, 0, 256, 256]
    # the addition hands its incoming gradient to both inputs: only that gradient is transient
    assert c["a"].workspace_bytes == 256


class _SdpaAttention(torch.nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.heads, self.causal = heads, causal

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_traced_sdpa_attention(causal: bool) -> None:
    # A causal SDPA counts only the kept triangle, s (s + 1) / 2 of the s * s scores, forward and
    # backward (Note [causal attention FLOPs] in modelparallel/tracer/annotate.py).
    b, s, d, h = 2, 64, 32, 4
    graph, costs = _traced_costs(_SdpaAttention(d, h, causal), torch.randn(b, s, d))
    sdpa = _only(graph, lambda n: "scaled_dot_product_attention" in n.target)
    scores = s * (s + 1) // 2 if causal else s * s
    assert sdpa.flops == 2 * 2 * b * h * scores * (d // h)          # QK^T and PV
    assert sdpa.backward_flops == 10 * b * h * scores * (d // h)      # 2.5x forward
    cost = costs.nodes[sdpa.name]
    assert cost.forward_time >= sdpa.flops / 1e12
    assert cost.backward_time >= sdpa.backward_flops / 1e12


# -- in-context backward host times (Note [in-context backward host time]) -----------------------


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


def test_context_backward_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times

    # a: big kernels; b, c: tiny kernels whose backward the host queues slowly (1.0 in context).
    p = {"a": NodeProfile(1.0, 0.1, 2.0, 5.0, "A", 0.3),
         "b": NodeProfile(0.1, 0.5, 0.1, 5.0, "B", 1.0),
         "c": NodeProfile(0.1, 0.5, 0.1, 5.0, "B", 1.0)}
    ctx = node_times(["a", "b", "c"], p)  # default: the in-context times, since they exist
    assert ctx == node_times(["a", "b", "c"], p, backward_host="context")
    # Forward: the host has queued everything at 1.1; the device finishes a at 1.1, b at 1.2,
    # c at 1.3. Backward, reverse order, the host going on from 1.1: c queued at 2.1 (the
    # device waits), done 2.2 (adds 0.9); b queued 3.1, done 3.2 (+1.0); a queued 3.4, its
    # 2.0 of kernels done at 5.4 (+2.2).
    assert [round(f, 6) for f, _ in ctx.values()] == [1.1, 0.1, 0.1]
    assert [round(b, 6) for _, b in ctx.values()] == [2.2, 1.0, 0.9]
    assert sum(sum(v) for v in ctx.values()) == pytest.approx(5.4)
    device = node_times(["a", "b", "c"], p, backward_host="device")
    assert [round(b, 6) for _, b in device.values()] == [2.0, 0.1, 0.1]
    # with no host cost (the CPU) the replay is the plain sum of device times
    cpu = {k: NodeProfile(v.device_forward, 0.0, v.device_backward, 0.0, v.kind, 0.0)
           for k, v in p.items()}
    assert [b for _, b in node_times(["a", "b", "c"], cpu).values()] == pytest.approx(
        [2.0, 0.1, 0.1])
    with pytest.raises(ConfigError, match="backward_host"):
        node_times(["a"], p, backward_host="sometimes")  # type: ignore[arg-type]


def test_context_times_fold_skipped_nodes_into_their_neighbour() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, with_backward_context

    p = {"a": NodeProfile(1.0, 0.0, 1.0, 0.0), "c": NodeProfile(1.0, 0.0, 1.0, 0.0),
         "d": NodeProfile(1.0, 0.0, 1.0, 0.0)}
    out = with_backward_context(p, ["x", "a", "b", "c", "d"], {"x": 0.25, "a": 1.0, "b": 0.5,
                                                              "c": 2.0})
    # b (not profiled) goes to a, which the engine runs next; x has nothing before it
    assert [out[n].host_backward_context for n in "acd"] == [1.75, 2.0, 0.0]
    assert all(v.host_backward_context == 0.0 for v in
               with_backward_context(p, ["a", "c", "d"], {"a": 1.0}, host_is_device=True)
               .values())


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


# -- in-context forward host times (Note [in-context forward host time]) -------------------------


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


def test_context_forward_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times, with_forward_context

    p = {"a": NodeProfile(1.0, 0.1, 0.0, 0.0, "A", None, 0.5),
         "b": NodeProfile(0.1, 0.1, 0.0, 0.0, "B", None, 2.0)}
    # Isolated: a queued at 0.1, done 1.1; b queued 0.2, done 1.2.
    iso = node_times(["a", "b"], p, forward_host="isolated")
    assert [round(f, 6) for f, _ in iso.values()] == [1.1, 0.1]
    # In context (the default where present): a queued at 0.5, done 1.5; b queued 2.5 (the
    # device waits), done 2.6.
    ctx = node_times(["a", "b"], p)
    assert ctx == node_times(["a", "b"], p, forward_host="context")
    assert [round(f, 6) for f, _ in ctx.values()] == [1.5, 1.1]
    with pytest.raises(ConfigError, match="forward_host"):
        node_times(["a"], p, forward_host="sometimes")  # type: ignore[arg-type]
    # skipped nodes (x before a, y after b) go to the profiled node they delay, else the last
    bare = {k: NodeProfile(v.device_forward, 0.1, 0.0, 0.0, v.kind) for k, v in p.items()}
    out = with_forward_context(bare, ["x", "a", "y", "b", "z"],
                               {"x": 0.25, "a": 1.0, "y": 0.5, "b": 2.0, "z": 0.125})
    assert [out[n].host_forward_context for n in "ab"] == [1.25, 2.625]


def test_forward_context_of_a_fetch_goes_to_its_reader() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, with_forward_context

    # An exported graph fetches every parameter at its top; each stage fetches its own, so a
    # fetch's host time belongs to the node that reads it (through unprofiled nodes too).
    p = {n: NodeProfile(1.0, 0.0, 0.0, 0.0) for n in ("a", "b", "c")}
    order = ["w0", "w1", "w2", "t", "a", "b", "c"]
    context = {"w0": 0.5, "w1": 0.25, "w2": 0.125, "t": 0.0625, "a": 1.0, "b": 2.0, "c": 4.0}
    users = {"w0": ["a"], "w1": ["t"], "t": ["c", "b"], "w2": [], "a": ["b"], "b": ["c"]}
    out = with_forward_context(p, order, context, users=users)
    # w1 reaches b and c through t: the earlier, b, gets it; w2 has no reader: next in order
    assert {n: out[n].host_forward_context for n in "abc"} == {
        "a": 1.0 + 0.5 + 0.125, "b": 2.0 + 0.25 + 0.0625, "c": 4.0}
    by_order = with_forward_context(p, order, context)
    assert by_order["a"].host_forward_context == 1.0 + 0.5 + 0.25 + 0.125 + 0.0625
    total = sum(v.host_forward_context or 0.0 for v in out.values())
    assert total == pytest.approx(sum(context.values()))


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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1,
                max_size=30),
       st.floats(min_value=1e-3, max_value=1e3))
def test_robust_mean_property(values: list[float], scale: float) -> None:
    import statistics

    from modelparallel.cost_model.node_replay import HOST_OUTLIER_CAP, robust_mean

    r = robust_mean(values)
    assert min(values) - 1e-9 <= r <= statistics.fmean(values) + 1e-9
    assert r <= HOST_OUTLIER_CAP * statistics.median(values) + 1e-9
    if max(values) <= HOST_OUTLIER_CAP * statistics.median(values):
        assert r == pytest.approx(statistics.fmean(values))
    assert robust_mean([v * scale for v in values]) == pytest.approx(r * scale, abs=1e-9)


def test_host_times_of_a_kind_are_pooled_with_the_robust_mean() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, host_replay

    # five nodes of one kind, one stalled once: the stall is capped at 3x the median (1.0),
    # the slow-but-real 2.0 is kept (a median would drop it)
    ctx = [1.0, 2.0, 1.0, 1.0, 100.0]
    p = {f"n{i}": NodeProfile(0.0, 0.0, 0.0, 0.0, "K", None, c) for i, c in enumerate(ctx)}
    replay = host_replay(list(p), p)
    assert list(replay.host_forward.values()) == pytest.approx([(1 + 2 + 1 + 1 + 3) / 5] * 5)


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


def test_stage_replay_starts_host_and_device_together() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times, stage_replay

    # a: device-bound; b, c: host-bound (1.0 of queueing, 0.1 of kernels each)
    p = {"a": NodeProfile(3.0, 0.1, 0.0, 0.0, "A"), "b": NodeProfile(0.1, 1.0, 0.0, 0.0, "B"),
         "c": NodeProfile(0.1, 1.0, 0.0, 0.0, "B")}
    order = ["a", "b", "c"]
    whole = node_times(order, p)
    # one timeline: b and c are queued (1.1, 2.1) while a's kernels run to 3.1: hidden
    assert [round(f, 6) for f, _ in whole.values()] == [3.1, 0.1, 0.1]
    # the stage {b, c} alone: the host queues b at 1.0, c at 2.0; done at 2.1
    assert stage_replay(order, p, ["b", "c"]) == (pytest.approx(2.1), 0.0)
    # the whole graph as one stage is node_times' sum
    assert stage_replay(order, p, order)[0] == pytest.approx(sum(f for f, _ in whole.values()))


def test_host_replay_refuses_inconsistent_times() -> None:
    from modelparallel.cost_model import HostReplay

    with pytest.raises(ConfigError, match="names a node twice"):
        HostReplay(("a", "a"), {"a": 0.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match="not in order"):
        HostReplay(("a",), {"a": 0.0, "z": 1.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match=">= 0"):
        HostReplay(("a",), {"a": -1.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match="no forward times"):
        HostReplay(("a", "b"), {"a": 0.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        HostReplay(("a",), {"a": float("nan")}, {"a": 0.0}, {}, {})


_seconds = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(_seconds, _seconds, _seconds, _seconds), min_size=1,
                      max_size=12),
       cut=st.tuples(st.integers(0, 11), st.integers(1, 12)))
def test_a_stretch_alone_is_never_faster_than_its_share_of_the_whole(
        steps: list[tuple[float, float, float, float]], cut: tuple[int, int]) -> None:
    """Note [stage replay]: slack only hides host time, so a contiguous stretch replayed from
    an empty queue takes at least its share of the whole-graph timeline (the forward; and the
    whole, forward and backward, when the stretch ends the graph)."""
    from modelparallel.cost_model import HostReplay

    names = tuple(f"n{i}" for i in range(len(steps)))
    replay = HostReplay(names, {n: s[0] for n, s in zip(names, steps)},
                        {n: s[1] for n, s in zip(names, steps)},
                        {n: s[2] for n, s in zip(names, steps)},
                        {n: s[3] for n, s in zip(names, steps)})
    lo = min(cut[0], len(names) - 1)
    hi = max(lo + 1, min(cut[1], len(names)))
    stretch = names[lo:hi]
    whole = replay.node_times()
    alone_f, _ = replay.stage_times(stretch)
    assert alone_f >= sum(whole[n][0] for n in stretch) - 1e-9
    tail = names[lo:]
    tail_f, tail_b = replay.stage_times(tail)
    assert tail_f + tail_b >= sum(sum(whole[n]) for n in tail) - 1e-9
    # and the whole graph as one stretch is exactly the sum of its node times
    assert sum(replay.stage_times(names)) == pytest.approx(sum(sum(v) for v in whole.values()))


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(_seconds, _seconds, _seconds, _seconds), min_size=1,
                      max_size=12),
       call=st.tuples(_seconds, _seconds))
def test_a_stage_takes_at_least_its_hosts_work_with_the_call_overhead(
        steps: list[tuple[float, float, float, float]], call: tuple[float, float]) -> None:
    """Note [call overhead]: a stage's time is the larger of its replay and its host's own
    work; the overhead never makes a stage faster, and none changes nothing."""
    from dataclasses import replace

    from modelparallel.cost_model import CallOverhead, HostReplay

    names = tuple(f"n{i}" for i in range(len(steps)))
    bare = HostReplay(names, {n: s[0] for n, s in zip(names, steps)},
                      {n: s[1] for n, s in zip(names, steps)},
                      {n: s[2] for n, s in zip(names, steps)},
                      {n: s[3] for n, s in zip(names, steps)})
    with_call = replace(bare, call=CallOverhead(*call))
    f0, b0 = bare.stage_times(names)
    f1, b1 = with_call.stage_times(names)
    assert f1 >= f0 - 1e-9 and b1 >= b0 - 1e-9
    assert f1 >= sum(s[0] for s in steps) + call[0] - 1e-9
    assert f1 + b1 >= sum(s[0] + s[2] for s in steps) + sum(call) - 1e-9
    assert f1 + b1 <= f0 + b0 + sum(s[0] + s[2] for s in steps) + sum(call) + 1e-9
    assert replace(bare, call=CallOverhead()).stage_times(names) == (f0, b0)


def test_call_overhead_values() -> None:
    from modelparallel.cost_model import CallOverhead
    from modelparallel.cost_model.measure import call_overhead

    with pytest.raises(ConfigError, match=">= 0"):
        CallOverhead(-1e-6, 0.0)
    with pytest.raises(ValueError):
        CallOverhead(0.0, float("nan"))
    assert call_overhead("cpu") == CallOverhead()  # the CPU records host time as 0


def test_call_overhead_in_node_times_files(tmp_path) -> None:
    import json

    from modelparallel.cost_model import CallOverhead
    from modelparallel.cost_model.node_times import load_call_overhead, save_node_times

    with_call = save_node_times(tmp_path / "a.json", {"fc": (1e-3, 2e-3)},
                                call=CallOverhead(4e-5, 3e-4))
    assert load_call_overhead(with_call) == CallOverhead(4e-5, 3e-4)
    without = save_node_times(tmp_path / "b.json", {"fc": (1e-3, 2e-3)})
    assert load_call_overhead(without) == CallOverhead()
    data = json.loads(with_call.read_text())
    data["call_overhead"] = {"forward": "soon"}
    with_call.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"call_overhead .* is malformed"):
        load_call_overhead(with_call)


def test_the_partitioner_replays_each_stage_alone() -> None:
    """A host-bound stage after a device-bound one: the sums hide its queueing behind the
    first stage's kernels, the evaluation replays it alone (Note [stage replay])."""
    from modelparallel.cost_model import HostReplay
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.partitioner._synthetic import chain_graph
    from modelparallel.plan import PlanConfig

    graph = chain_graph(4)
    order = tuple(n.name for n in graph.nodes if n.name.startswith("fc"))
    # fc0, fc1: 3 ms of kernels, 0.1 ms of queueing; fc2, fc3: the reverse
    host = {"fc0": 1e-4, "fc1": 1e-4, "fc2": 3e-3, "fc3": 3e-3}
    device = {"fc0": 3e-3, "fc1": 3e-3, "fc2": 1e-4, "fc3": 1e-4}
    replay = HostReplay(order, host, device, {n: 0.0 for n in order}, dict(device))
    whole = replay.node_times()
    costs = estimate_costs(graph, "h100", measured=whole, replay=replay)
    summed = estimate_costs(graph, "h100", measured=whole)
    assignment = {"fc0": 0, "fc1": 0, "fc2": 1, "fc3": 1, "output": 1}
    config = PlanConfig(partitions=2)
    plan = evaluate_assignment(graph, config, "h100", assignment, costs=[costs])
    plain = evaluate_assignment(graph, config, "h100", assignment, costs=[summed])
    for s, names in enumerate((["fc0", "fc1"], ["fc2", "fc3"])):
        f, b = replay.stage_times(names)
        assert plan.stages[s].forward_time == pytest.approx(f)
        assert plan.stages[s].backward_time == pytest.approx(b)
        assert plain.stages[s].forward_time == pytest.approx(sum(whole[n][0] for n in names))
    # the second stage's queueing (6 ms) was hidden in the sums (0.2 ms of kernels)
    assert plain.stages[1].forward_time == pytest.approx(2e-4)
    assert plan.stages[1].forward_time == pytest.approx(6.1e-3)
    assert plan.pipeline.step_time > plain.pipeline.step_time


def test_a_stage_replay_counts_the_input_derived_nodes_it_recomputes() -> None:
    """Input-derived nodes are unassigned and recomputed by every stage that reads them
    (Note [inputs on every rank]): the replay of each such stage includes them."""
    from modelparallel.cost_model import HostReplay
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig

    meta = (TensorMeta((4, 8), "float32"),)
    graph = Graph("m", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=meta),
        Node("mask", OpKind.CALL_FUNCTION, "ne", ("x",), outputs=meta),
        Node("fc0", OpKind.CALL_FUNCTION, "linear", ("x",), params=("w0",), outputs=meta),
        Node("fc1", OpKind.CALL_FUNCTION, "linear", ("fc0",), params=("w1",), outputs=meta),
        Node("use", OpKind.CALL_FUNCTION, "mul", ("fc1", "mask"), outputs=meta),
        Node("output", OpKind.OUTPUT, "output", ("use",))),
        params=(Param("w0", (8, 8), "float32"), Param("w1", (8, 8), "float32")))
    order = ("x", "mask", "fc0", "fc1", "use")
    host = {"x": 0.0, "mask": 5e-3, "fc0": 1e-4, "fc1": 1e-4, "use": 1e-4}
    device = {n: 1e-4 for n in order}
    replay = HostReplay(order, host, device, {}, {})
    costs = estimate_costs(graph, "h100", measured=replay.node_times(), replay=replay)
    plan = evaluate_assignment(graph, PlanConfig(partitions=2), "h100",
                               {"fc0": 0, "fc1": 1, "use": 1, "output": 1}, costs=[costs])
    assert plan.stages[0].forward_time == pytest.approx(replay.stage_times(["fc0"])[0])
    assert plan.stages[1].forward_time == pytest.approx(
        replay.stage_times(["mask", "fc1", "use"])[0])
    assert plan.stages[1].forward_time > 5e-3  # the mask's queueing, recomputed there
