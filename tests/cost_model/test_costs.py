"""The roofline cost model against hand-computed numbers."""

from __future__ import annotations

import pytest

from modelparallel.cost_model import DeviceSpec, estimate_costs, param_state_bytes
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


def test_sent_values_held_unless_the_op_saves_its_output() -> None:
    from modelparallel.ir import Graph, Node, OpKind, TensorMeta

    t = (TensorMeta((8, 8), "float32", True),)
    g = Graph("acts", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=t),
        Node("r", OpKind.CALL_FUNCTION, "aten.relu.default", inputs=("x",), outputs=t),
        Node("v", OpKind.CALL_FUNCTION, "aten.view.default", inputs=("r",), outputs=t),
        Node("g", OpKind.CALL_FUNCTION, "aten.gelu.default", inputs=("v",), outputs=t),
        Node("a", OpKind.CALL_FUNCTION, "aten.add.Tensor", inputs=("g", "r"), outputs=t),
        Node("n", OpKind.CALL_FUNCTION, "aten.neg.default", inputs=("a",), outputs=t),
        Node("output", OpKind.OUTPUT, "output", inputs=("n",))))
    c = estimate_costs(g, "h100").nodes
    assert [c[n].sent_held for n in "rvga"] == [0, 0, 256, 256]
    # the addition hands its incoming gradient to both inputs: only that gradient is transient
    assert c["a"].workspace_bytes == 256
    # the model output's node: during the loss's backward, its float32 gradient (256) and the
    # output's own gradient (256) (Note [activation memory])
    assert c["n"].workspace_bytes == 512


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
