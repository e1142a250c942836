"""Keras models traced op by op into the IR (Note [keras capture]) and planned by the core."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from modelparallel.errors import TracingError  # noqa: E402
from modelparallel.ir import Graph, OpKind  # noqa: E402
from modelparallel.partitioner import partition  # noqa: E402
from modelparallel.plan import PlanConfig  # noqa: E402
from modelparallel.tensorflow.models import (  # noqa: E402
    keras_cnn,
    keras_gpt,
    keras_mlp,
    keras_skip,
)
from modelparallel.tracer.tf_capture import layer_paths, trace_keras  # noqa: E402


def test_sequential_mlp_ops_params_and_layers() -> None:
    case = keras_mlp(batch_size=4)
    traced = trace_keras(case.model, case.args[0])
    g = traced.graph
    assert [n.target for n in g][:4] == ["arg0", "MatMul", "BiasAdd", "Relu"]
    mm = g.nodes[1]
    assert mm.module_path == "fc1" and mm.params == ("fc1.kernel",)
    assert mm.flops == 2 * 4 * 8 * 16
    assert mm.outputs[0].shape == (4, 16) and mm.outputs[0].requires_grad
    assert mm.outputs[0].dtype == "float32"
    # backward FLOPs counted from the gradient ops (Note [keras capture]): a MatMul's two
    # matmuls, a Relu's one mask per element
    assert mm.backward_flops == 2 * mm.flops
    relu = g.nodes[3]
    assert relu.backward_flops == relu.flops == 4 * 16
    assert {p.name for p in g.params} == {f"{layer}.{w}" for layer in ("fc1", "fc2", "head")
                                          for w in ("kernel", "bias")}
    assert g.output.inputs == (g.nodes[-2].name,)
    assert Graph.from_json(g.to_json()) == g
    # every counted op of the call has an owner that is an IR node
    assert set(traced.op_owners) <= {n.name for n in g}


def test_subclass_transformer_drops_constants_and_folds_the_mask() -> None:
    case = keras_gpt(batch_size=2)
    traced = trace_keras(case.model, case.args[0][:2])
    g = traced.graph
    kinds = {n.target for n in g}
    assert not kinds & {"Const", "ReadVariableOp", "Identity", "NoOp"}
    assert "MatrixBandPart" not in kinds  # the causal mask depends on constants only
    paths = {n.module_path for n in g}
    assert {"h0.qkv", "h0.ln1", "h1.fc", "wte", "lm_head"} <= paths
    einsums = [n for n in g if n.target == "Einsum"]
    assert len(einsums) == 4 and all(n.flops > 0 for n in einsums)
    assert sum(n.flops for n in g) > 0
    wte = [n for n in g if "wte.embeddings" in n.params]
    assert wte and wte[0].module_path == "wte"


def test_functional_skip_and_cnn_trace() -> None:
    skip = trace_keras(keras_skip().model, keras_skip().args[0])
    add = next(n for n in skip.graph if n.module_path == "skip")
    assert len(add.inputs) == 2  # the long edge from the stem
    cnn = trace_keras(keras_cnn().model, keras_cnn().args[0])
    conv = [n for n in cnn.graph if n.target == "Conv2D"]
    assert len(conv) == 3 and conv[0].module_path == "conv1"
    assert all(n.backward_flops == 2 * n.flops for n in conv)  # filter and input gradients
    assert layer_paths(keras_cnn().model)


@pytest.mark.parametrize("granularity", ["op", "module", "layer"])
def test_keras_graph_plans_with_the_same_ilp(granularity: str) -> None:
    case = keras_gpt(batch_size=4)
    g = trace_keras(case.model, case.args[0][:2]).graph
    plan = partition(g, PlanConfig(partitions=2, microbatches=2, granularity=granularity),
                     "cpu")
    stages = {n.stage for n in plan.nodes if g.node(n.name).op is OpKind.CALL_FUNCTION}
    assert stages == {-1, 0, 1}  # -1: input-derived (positions, shapes), on every stage
    by_layer: dict[str, set[int]] = {}
    for n in plan.nodes:
        node = g.node(n.name)
        if node.op is OpKind.CALL_FUNCTION and node.module_path and n.stage >= 0:
            by_layer.setdefault(node.module_path, set()).add(n.stage)
    if granularity == "module":  # ops of one layer stay together
        assert all(len(s) == 1 for s in by_layer.values())
    if granularity == "layer":  # Note [layer granularity]: every layer without sublayers whole
        leaves = [p for p in by_layer if not any(q.startswith(p + ".") for q in by_layer)]
        assert leaves and all(len(by_layer[p]) == 1 for p in leaves)


def test_python_branch_on_a_tensor_value_is_a_tracing_error() -> None:
    class Branchy(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc = keras.layers.Dense(2)

        def call(self, x):  # type: ignore[no-untyped-def]
            y = self.fc(x)
            if tf.reduce_sum(y) > 0:  # a Python branch on a tensor's value
                return y
            return -y

    model = Branchy()
    model(tf.ones((2, 3)))
    with pytest.raises(TracingError, match=r"tf\.cond"):
        trace_keras(model, tf.ones((2, 3)))
