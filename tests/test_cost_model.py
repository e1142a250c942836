"""The roofline cost model against hand-computed numbers."""

from __future__ import annotations

import pytest

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
