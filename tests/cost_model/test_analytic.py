"""The analytic cost model (Note [analytic cost model]): op families, profiles, stage costs."""

from __future__ import annotations

import pytest

from modelparallel.cost_model import estimate_costs, get_device_spec
from modelparallel.cost_model.analytic import analytic_costs, analytic_profiles, op_family
from modelparallel.cost_model.op_table import Curve, Grid, OpEntry, OpTable
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
from modelparallel.partitioner._synthetic import transformer_graph


def _mlp(vocab: int = 1024) -> Graph:
    t = lambda *s: (TensorMeta(s, "bfloat16", True),)  # noqa: E731
    return Graph("mlp", (
        Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((64, 1024), "bfloat16"),)),
        Node("fc", OpKind.CALL_FUNCTION, "aten.linear.default", inputs=("x",), params=("w",),
             outputs=t(64, vocab), flops=2 * 64 * 1024 * vocab,
             backward_flops=2 * 64 * 1024 * vocab),
        Node("r", OpKind.CALL_FUNCTION, "aten.relu.default", inputs=("fc",), outputs=t(64, vocab)),
        Node("v", OpKind.CALL_FUNCTION, "aten.view.default", inputs=("r",), outputs=t(64, vocab)),
        Node("a", OpKind.CALL_FUNCTION, "aten.add.Tensor", inputs=("v", "r"), outputs=t(64, vocab)),
        Node("output", OpKind.OUTPUT, "output", inputs=("a",))),
        params=(Param("w", (vocab, 1024), "bfloat16"),))


def _table() -> OpTable:
    grid = Grid(((1.0,), (1.0,), (1.0,)), (1e-12,))
    slow = Grid(((1.0,), (1.0,), (1.0,)), (4e-12,))
    curve = Curve((1e3, 1e6), (1e-6, 1e-4))
    return OpTable("toy", {
        "matmul:bfloat16": OpEntry(grid, grid, 10e-6, 5e-6),
        "matmul_unaligned:bfloat16": OpEntry(slow, slow, 10e-6, 5e-6),
        "relu": OpEntry(curve, curve, 3e-6, 2e-6), "add": OpEntry(curve, curve, 3e-6, 2e-6),
        "view": OpEntry(Curve((1.0,), (1e-9,)), None, 1e-6, 0.5e-6)},
        call_forward=20e-6, call_backward=30e-6)


def test_families_and_sizes() -> None:
    g = _mlp()
    fc = op_family(g.node("fc"), g)
    assert fc is not None and fc.family == "matmul" and fc.dims == (64.0, 1024.0, 1024.0)
    assert fc.backward_scale == 0.5  # x needs no gradient: the weight's gradient alone
    assert op_family(_mlp(1023).node("fc"), _mlp(1023)).family == "matmul_unaligned"  # type: ignore[union-attr]
    assert op_family(g.node("v"), g).family == "view"  # type: ignore[union-attr]
    assert op_family(g.node("x"), g) is None


def test_matmul_family_follows_the_leading_dimensions_alignment() -> None:
    """Aligned (multiples of 8), even (BERT's 30522 words) and odd (GPT-2's 50257) products
    are three families; the rows M are no leading dimension (Note [analytic cost model])."""
    def family(g: Graph) -> str:
        s = op_family(g.node("fc"), g)
        assert s is not None
        return s.family
    assert family(_mlp(30528)) == "matmul"
    assert family(_mlp(30522)) == "matmul_even"
    assert family(_mlp(50257)) == "matmul_unaligned"
    g = _mlp()
    odd_rows = Graph("rows", tuple(
        n if n.name != "fc" else Node("fc", OpKind.CALL_FUNCTION, "aten.linear.default",
                                      inputs=("x",), params=("w",),
                                      outputs=(TensorMeta((63, 1024), "bfloat16", True),),
                                      flops=2 * 63 * 1024 * 1024)
        for n in g.nodes), params=g.params)
    assert family(odd_rows) == "matmul"


def test_even_products_without_their_family_read_the_unaligned_grid() -> None:
    """A table measured before ``matmul_even`` prices even products as unaligned, as before."""
    even = analytic_profiles(_mlp(30522), _table(), "h100")["fc"]
    assert even.device_forward == pytest.approx(64 * 1024 * 30522 * 4e-12)
    fast = Grid(((1.0,), (1.0,), (1.0,)), (2e-12,))
    table = _table()
    table = OpTable("toy", {**table.ops, "matmul_even:bfloat16": OpEntry(fast, fast, 1e-5, 5e-6)},
                    call_forward=table.call_forward, call_backward=table.call_backward)
    even = analytic_profiles(_mlp(30522), table, "h100")["fc"]
    assert even.device_forward == pytest.approx(64 * 1024 * 30522 * 2e-12)


def test_profiles_read_the_table() -> None:
    g = _mlp()
    p = analytic_profiles(g, _table(), "h100")
    assert p["fc"].device_forward == pytest.approx(64 * 1024 * 1024 * 1e-12)
    assert p["fc"].device_backward == pytest.approx(0.5 * 64 * 1024 * 1024 * 1e-12)
    assert p["v"].device_forward == 0 and p["v"].host_forward == 1e-6
    # r is read by v and a, both passing a gradient back: one gradient addition
    curve = Curve((1e3, 1e6), (1e-6, 1e-4))
    size = 64 * 1024 * 2
    assert p["r"].device_backward == pytest.approx(2 * curve(size))
    unaligned = analytic_profiles(_mlp(1023), _table(), "h100")["fc"]
    assert unaligned.device_forward > 3 * p["fc"].device_forward


def test_missing_family_keeps_the_roofline() -> None:
    g = _mlp()
    table = OpTable("empty", {})
    p = analytic_profiles(g, table, "h100")
    roof = estimate_costs(g, "h100", analytic=False)
    spec = get_device_spec("h100")
    assert p["fc"].device_forward == pytest.approx(roof.nodes["fc"].forward_time
                                                   - spec.kernel_overhead)


def test_costs_replay_stages_with_the_call_overhead() -> None:
    g = _mlp()
    costs = analytic_costs(g, "h100", _table())
    assert costs.source == "analytic" and costs.replay is not None
    assert costs.replay.call.forward == 20e-6
    assert set(costs.nodes) == {n.name for n in g.nodes}


def test_device_with_a_table_plans_analytically_by_default() -> None:
    g = transformer_graph(layers=2, hidden=64, seq=16, batch=2)
    assert estimate_costs(g, "h200").source == "analytic"
    assert estimate_costs(g, "h200", analytic=False).source == "roofline"
    assert estimate_costs(g, "h100").source == "roofline"
    with pytest.raises(ConfigError, match="calibrate --ops"):
        analytic_costs(g, "a100")
