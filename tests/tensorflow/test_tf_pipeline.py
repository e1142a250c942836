"""Pipelined training of Keras models on logical CPU devices equals single-device Keras training
(same weights, same batches, 3 steps) under both schedules, SGD and Adam, at layer granularity
(the default) and op granularity."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")

from _tf_parity import run_parity  # noqa: E402

from modelparallel.tensorflow.models import (  # noqa: E402
    KerasCase,
    keras_cnn,
    keras_gpt,
    keras_mlp,
    keras_skip,
)


@pytest.mark.parametrize("pipeline", ["simple", "interleaved"])
@pytest.mark.parametrize("partitions", [2, 4])
def test_skip_model_parity(partitions: int, pipeline: str) -> None:
    r = run_parity(keras_skip, partitions=partitions, microbatches=4, pipeline=pipeline)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions  # the plan used every stage


@pytest.mark.slow
@pytest.mark.parametrize(("partitions", "pipeline", "optimizer"),
                         [(2, "interleaved", "adam"), (2, "simple", "sgd"),
                          (4, "interleaved", "sgd"), (4, "simple", "adam")])
def test_transformer_parity(partitions: int, pipeline: str, optimizer: str) -> None:
    r = run_parity(keras_gpt, partitions=partitions, microbatches=4, pipeline=pipeline,
                   optimizer=optimizer)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions


@pytest.mark.slow
@pytest.mark.parametrize(("partitions", "pipeline", "optimizer"),
                         [(4, "interleaved", "adam"), (2, "simple", "sgd"), (4, "simple", "sgd")])
def test_cnn_parity(partitions: int, pipeline: str, optimizer: str) -> None:
    r = run_parity(keras_cnn, partitions=partitions, microbatches=2, pipeline=pipeline,
                   optimizer=optimizer)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) >= 2


@pytest.mark.parametrize(("factory", "partitions", "pipeline"),
                         [(keras_cnn, 2, "interleaved"), (keras_skip, 4, "simple")])
def test_legacy_get_gradients_parity(factory, partitions: int, pipeline: str) -> None:
    # SMP's way: optimizer.get_gradients(loss, params) inside the step, on a Keras 3 optimizer
    r = run_parity(factory, partitions=partitions, microbatches=2, pipeline=pipeline,
                   optimizer="adam", tape=False)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions


@pytest.mark.parametrize(("partitions", "pipeline"), [(4, "simple"), (2, "interleaved")])
def test_skip_model_adam_parity(partitions: int, pipeline: str) -> None:
    r = run_parity(keras_skip, partitions=partitions, microbatches=2, pipeline=pipeline,
                   optimizer="adam")
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions


@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_granularity_layer_keeps_layers_whole_and_op_cuts_them(granularity: str) -> None:
    # Note [layer granularity]: by default no Keras layer is cut; at op level (on request) the
    # plan cuts inside layers, and training is exact either way
    r = run_parity(keras_mlp, partitions=4, microbatches=2, pipeline="interleaved",
                   config={"granularity": granularity})
    assert r["diff"] < 1e-5, r
    assert r["plan"].config.granularity == granularity
    assert (r["split"] == []) == (granularity == "layer"), r["split"]


def _shared_dense(*, batch_size: int = 8, seed: int = 0) -> KerasCase:
    """A Dense layer called twice with another layer between: its two calls read one kernel."""
    import keras

    keras.utils.set_random_seed(seed)

    class SharedDense(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="shared_model")
            self.stem = keras.layers.Dense(16, activation="relu", name="stem")
            self.shared = keras.layers.Dense(16, activation="tanh", name="shared")
            self.mid = keras.layers.Dense(16, activation="relu", name="mid")
            self.head = keras.layers.Dense(10, name="head")

        def call(self, x, training=False):  # type: ignore[no-untyped-def]
            return self.head(self.shared(self.mid(self.shared(self.stem(x)))))

    model = SharedDense()
    x = tf.random.stateless_normal((batch_size, 8), seed=(seed, 1))
    model(x)
    y = tf.random.stateless_uniform((batch_size,), seed=(seed, 2), maxval=10, dtype=tf.int32)
    return KerasCase("shared-dense", model, (x,), y, keras_mlp(batch_size=2).loss_fn)


@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_ops_sharing_a_variable_share_a_stage_at_layer_granularity(granularity: str) -> None:
    r = run_parity(_shared_dense, partitions=4, microbatches=2, pipeline="simple",
                   config={"granularity": granularity})
    assert r["diff"] < 1e-5, r  # op level: the kernel read on two stages, gradients summed
    plan = r["plan"]
    readers = {n.stage for n in plan.nodes
               if any(".shared." in f".{q}" for q in r["graph"].node(n.name).params)}
    assert readers
    assert (len(readers) == 1) == (granularity == "layer"), readers
    assert len(r["stages"]) >= 2


def _two_branches(*, batch_size: int = 8, seed: int = 0) -> KerasCase:
    """Two branches from the input that meet at an add: a stage holding the first layer of each
    is two pieces."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,), name="x")
    a = keras.layers.Dense(16, activation="relu", name="a2")(
        keras.layers.Dense(16, activation="relu", name="a1")(inp))
    b = keras.layers.Dense(16, activation="relu", name="b2")(
        keras.layers.Dense(16, activation="relu", name="b1")(inp))
    out = keras.layers.Dense(4, name="head")(keras.layers.Add(name="join")([a, b]))
    model = keras.Model(inp, out, name="two")
    x = tf.random.stateless_normal((batch_size, 12), seed=(seed, 1))
    y = tf.random.stateless_normal((batch_size, 4), seed=(seed, 2))
    return KerasCase("two-branches", model, (x,), y, keras_skip(batch_size=2).loss_fn)


def test_contiguous_repairs_a_stage_of_two_pieces(monkeypatch) -> None:
    # Note [contiguous stages]: the planner (made here) puts a1 and b1 on stage 0, two pieces;
    # contiguous=True moves one of them to stage 1, re-plans pinned, and trains exactly
    import warnings

    import modelparallel.partitioner as partitioner
    from modelparallel.tensorflow._contiguous import disconnected_stages, make_contiguous

    real = partitioner.partition
    firsts: list[dict[str, int]] = []

    def disconnected_planner(graph, config, *args, **kwargs):
        if not config.pins:  # the planner's own call: force the two first layers on stage 0
            import dataclasses

            config = dataclasses.replace(config, pins={
                n.name: 0 if n.module_path.split(".")[-1] in ("a1", "b1") else 1
                for n in graph if n.op.value == "call_function" and n.module_path})
            firsts.append(dict(real(graph, config, *args, **kwargs).assignment))
        return real(graph, config, *args, **kwargs)

    monkeypatch.setattr(partitioner, "partition", disconnected_planner)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "contiguous")  # no contiguity warning: repaired
        r = run_parity(_two_branches, partitions=2, microbatches=2, pipeline="interleaved")
    assert r["diff"] < 1e-5, r
    graph = r["graph"]
    assert disconnected_stages(graph, firsts[0]) == {0: 2}
    assert disconnected_stages(graph, r["plan"].assignment) == {}
    assert r["stages"] == [0, 1]
    moved = {n for n, s in r["plan"].assignment.items() if s != firsts[0][n]}
    layers = {graph.node(n).module_path.split(".")[-1] for n in moved}
    assert layers in ({"a1"}, {"b1"}), layers  # one branch's first layer, whole
    # a pinned piece does not move, and the stage stays two pieces
    pinned = frozenset(n for n in firsts[0] if firsts[0][n] == 0)
    assert make_contiguous(graph, firsts[0], pinned) == firsts[0]
    from types import SimpleNamespace

    from modelparallel.tensorflow.model import _contiguous_plan

    with pytest.warns(UserWarning, match=r"stages \[0\] fall into \[2\] disconnected pieces"):
        _contiguous_plan(graph, SimpleNamespace(assignment=firsts[0]), lambda c: None, pinned)
