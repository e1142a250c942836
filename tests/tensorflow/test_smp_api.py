"""SMP v1's TensorFlow API: init, ranks and helpers, StepOutput, manual placement, post-partition
hooks, checkpoints, and the named errors of bad use (no hang)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import modelparallel.tensorflow as smp  # noqa: E402
from modelparallel.errors import ConfigError  # noqa: E402
from modelparallel.tensorflow.models import keras_mlp, keras_skip  # noqa: E402


def test_init_merges_sm_hp_mp_parameters_and_validates(monkeypatch) -> None:
    monkeypatch.setenv("SM_HP_MP_PARAMETERS", json.dumps({"microbatches": 4}))
    cfg = smp.init({"partitions": 2, "microbatches": 2, "pipeline": "simple"})
    assert (cfg.partitions, cfg.microbatches, cfg.pipeline) == (2, 4, "simple")
    monkeypatch.delenv("SM_HP_MP_PARAMETERS")
    with pytest.raises(ConfigError, match="not supported yet"):
        smp.init({"partitions": 2, "horovod": True})
    with pytest.raises(ConfigError, match="unknown"):
        smp.init({"partitions": 2, "partitons": 3})
    with pytest.raises(ConfigError, match="pipeline"):
        smp.init({"partitions": 2, "pipeline": "zigzag"})
    assert smp.init({"partitions": 2}).granularity == "layer"
    assert smp.init({"partitions": 2, "granularity": "op"}).granularity == "op"
    with pytest.raises(ConfigError, match="granularity 'module' must be 'layer'"):
        smp.init({"partitions": 2, "granularity": "module"})


def test_init_validates_placement_xla_and_partition_file_keys() -> None:
    assert smp.init({"partitions": 2, "placement_strategy": "spread"}).placement_strategy == (
        "spread")
    with pytest.raises(ConfigError, match="placement_strategy 'DPT' must be 'cluster' or"):
        smp.init({"partitions": 2, "placement_strategy": "DPT"})
    with pytest.raises(ConfigError, match="xla: true is not supported yet"):
        smp.init({"partitions": 2, "xla": True})
    assert smp.init({"partitions": 2, "xla": False}).partitions == 2
    with pytest.raises(ConfigError, match="load_partition = True needs partition_file"):
        smp.init({"partitions": 2, "load_partition": True})
    with pytest.raises(ConfigError, match="partition_file = 3 must be a str"):
        smp.init({"partitions": 2, "partition_file": 3})


def test_partition_file_is_written_then_loaded_instead_of_planning(tmp_path: Path) -> None:
    from modelparallel.errors import PlanMismatchError

    path = str(tmp_path / "plan.json")
    _, model, get_grads, _ = _model_and_step(partition_file=path)
    case = keras_skip(batch_size=8)
    get_grads(case.args[0], case.target)
    written = {n.name: n.stage for n in model.plan.nodes}
    assert Path(path).is_file() and {s for s in written.values() if s >= 0} == {0, 1}
    import modelparallel.partitioner as partitioner

    keras.backend.clear_session()  # the layer names of a fresh process: the same fingerprint

    def no_planning(*a, **k):
        raise AssertionError("load_partition planned the model")
    real, partitioner.partition = partitioner.partition, no_planning
    try:
        _, again, get_grads, _ = _model_and_step(partition_file=path, load_partition=True)
        get_grads(case.args[0], case.target)
    finally:
        partitioner.partition = real
    assert {n.name: n.stage for n in again.plan.nodes} == written
    smp.init({"partitions": 2, "microbatches": 2, "partition_file": path,
              "load_partition": True})
    other = smp.DistributedModel(keras_mlp(batch_size=8).model)

    @smp.step
    def forward(x):
        return other(x)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        forward(keras_mlp(batch_size=8).args[0])


def test_ranks_and_one_process_helpers() -> None:
    assert (smp.rank(), smp.size(), smp.mp_rank(), smp.pp_size(), smp.dp_size()) == (0, 1, 0, 1, 1)
    smp.send({"a": 1}, 0)
    assert smp.recv_from(0) == {"a": 1}
    with pytest.raises(ConfigError, match="nothing was sent"):
        smp.recv_from(0)
    with pytest.raises(ConfigError, match="does not exist"):
        smp.send(1, 1)
    assert smp.allgather(5) == [5]
    smp.barrier()
    smp.broadcast("x", smp.MP_GROUP)


def test_step_output_reductions() -> None:
    out = smp.StepOutput([tf.constant([[1.0], [2.0]]), tf.constant([[3.0], [4.0]])])
    assert out.merge().shape == (4, 1) and out.stack().shape == (2, 2, 1)
    assert float(tf.reduce_sum(out.reduce_sum())) == 10.0
    assert float(tf.reduce_sum(out.accumulate())) == 5.0
    sparse = smp.StepOutput([tf.IndexedSlices(tf.ones((1, 2)), tf.constant([0]), [3, 2])] * 2)
    acc = sparse.accumulate()
    assert isinstance(acc, tf.IndexedSlices) and acc.indices.shape == (2,)


def _model_and_step(partitions: int = 2, microbatches: int = 2, **cfg):
    smp.init({"partitions": partitions, "microbatches": microbatches, **cfg})
    case = keras_skip(batch_size=8)
    model = smp.DistributedModel(case.model)
    get_grads, train = _step_fns(model, case, keras.optimizers.SGD(0.1))
    return case, model, get_grads, train


def _step_fns(model, case, opt):
    """SMP's pattern: an ``smp.step`` returning gradients and loss, an outer ``tf.function``
    applying the accumulated gradients."""

    @smp.step
    def get_grads(x, y):
        pred = model(x, training=True)
        loss = case.loss_fn(y, pred)
        return tf.gradients(loss, model.trainable_variables), loss

    @tf.function
    def train(x, y):
        grads, loss = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean()

    return get_grads, train


def test_model_outside_a_step_is_a_named_error() -> None:
    case, model, _, _ = _model_and_step()
    with pytest.raises(smp.StepRequiredError, match=r"inside an @smp\.step"):
        model(case.args[0])


def test_batch_not_divisible_by_microbatches() -> None:
    case, _, get_grads, _ = _model_and_step(microbatches=3)
    with pytest.raises(ConfigError, match="does not split into 3"):
        get_grads(case.args[0], case.target)


def test_manual_partition_pins_and_post_partition_hook(tmp_path: Path) -> None:
    class Manual(smp.DistributedModel):
        def __init__(self) -> None:
            super().__init__()
            self.a = keras.layers.Dense(8, name="a")
            self.b = keras.layers.Dense(8, name="b")
            self.c = keras.layers.Dense(1, name="c")

        def call(self, x, training=False):
            h = self.a(x)  # the default partition
            with smp.partition(0), smp.partition(1):  # the innermost context wins
                h = self.b(h)
            with smp.partition(1):
                return self.c(h)

    smp.init({"partitions": 2, "microbatches": 2, "auto_partition": False,
              "default_partition": 0})
    model = Manual()
    seen = []

    @smp.register_post_partition_hook
    def hook() -> None:
        seen.append(model.plan is not None)

    @smp.step
    def get_loss(x):
        return tf.reduce_mean(model(x))

    try:
        loss = get_loss(tf.ones((4, 3)))
    finally:
        from modelparallel.tensorflow.model import _HOOKS
        _HOOKS.remove(hook)
    assert seen == [True] and len(loss.outputs) == 2
    g = model._mp_state["traced"].graph
    stage = {n.name: n.stage for n in model.plan.nodes}
    by_layer = {n.module_path: stage[n.name] for n in g if n.module_path in ("a", "b", "c")}
    assert by_layer == {"a": 0, "b": 1, "c": 1}
    ckpt = tf.train.Checkpoint(model=model)
    manager = smp.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    before = [w.copy() for w in model.get_weights()]
    manager.save()
    for v in model.trainable_variables:
        v.assign(tf.zeros_like(v))
    manager.restore()
    assert all((a == b).all() for a, b in zip(before, model.get_weights(), strict=True))


def test_outputs_and_python_values() -> None:
    smp.init({"partitions": 2, "microbatches": 4, "pipeline": "interleaved"})
    case = keras_mlp(batch_size=8)
    model = smp.DistributedModel(case.model)

    @smp.step
    def evaluate(x, y):
        pred = model(x, training=False)
        return pred, case.loss_fn(y, pred), 1.5

    pred, loss, const = evaluate(case.args[0], case.target)
    assert pred.merge().shape == (8, 10) and len(loss.outputs) == 4
    assert const == [1.5] * 4



@pytest.mark.parametrize("factory", ["skip", "gpt"])
def test_save_model_writes_the_whole_model_and_it_predicts_the_same(factory: str,
                                                                   tmp_path: Path) -> None:
    from modelparallel.tensorflow.models import keras_gpt

    smp.init({"partitions": 2, "microbatches": 2})
    case = (keras_skip if factory == "skip" else keras_gpt)(batch_size=8)
    model = smp.DistributedModel(case.model)
    with pytest.raises(ConfigError, match=r"after the first smp\.step"):
        model.save_model(str(tmp_path / "early"))

    @smp.step
    def predict(x):
        return model(x, training=False)

    x = case.args[0]
    pred = predict(x).merge().numpy()
    path = model.save_model(str(tmp_path / "model"))
    loaded = tf.saved_model.load(path)
    for batch in (x, x[:3]):  # any batch size
        got = loaded.serve(batch).numpy()
        want = pred[: batch.shape[0]]
        assert got.shape == want.shape and abs(got - want).max() < 1e-5
    assert "serving_default" in loaded.signatures


def test_contiguous_checks_that_every_stage_is_one_connected_piece() -> None:
    import warnings

    from modelparallel.tensorflow.model import _disconnected_stages
    from modelparallel.tracer.tf_capture import trace_keras

    case = keras_skip(batch_size=4)
    graph = trace_keras(case.model, case.args[0]).graph
    layer = {n.name: n.module_path.split(".")[0] for n in graph}
    # stem and block2 meet only through the skip's add (stage 1), block1 and the add only
    # through block2 (stage 0): both stages are two pieces
    split = {n.name: 0 if layer[n.name] in ("stem", "block2") else 1 for n in graph}
    assert _disconnected_stages(graph, split) == {0: 2, 1: 2}
    cut = {n.name: 0 if layer[n.name] in ("stem", "block1") else 1 for n in graph}
    assert _disconnected_stages(graph, cut) == {}
    full, model, get_grads, _ = _model_and_step()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_grads(full.args[0], full.target)
    assert not [w for w in seen if "contiguous" in str(w.message)]  # the plan's are connected
    assert _disconnected_stages(model._mp_state["traced"].graph, model.plan.assignment) == {}


def _train(model, case, opt, steps: int) -> None:
    _, train = _step_fns(model, case, opt)
    for _ in range(steps):
        train(case.args[0], case.target)


def test_checkpoint_restores_onto_a_new_plan(tmp_path: Path) -> None:
    # 2 steps on 2 stages, saved (weights and Adam's moments); a differently initialised model on
    # 4 stages restores it in a post-partition hook and takes the 3rd step: equal to 3 steps of
    # plain Keras
    ref = keras_skip(batch_size=8)
    ref_opt = keras.optimizers.Adam(1e-2)
    for _ in range(3):
        with tf.GradientTape() as t:
            loss = ref.loss_fn(ref.target, ref.model(ref.args[0], training=True))
        ref_opt.apply_gradients(zip(t.gradient(loss, ref.model.trainable_variables),
                                    ref.model.trainable_variables))

    smp.init({"partitions": 2, "microbatches": 2})
    first = keras_skip(batch_size=8)
    model_a, opt_a = smp.DistributedModel(first.model), keras.optimizers.Adam(1e-2)
    _train(model_a, first, opt_a, 2)
    manager = smp.CheckpointManager(tf.train.Checkpoint(model=model_a, optimizer=opt_a),
                                    str(tmp_path))
    manager.save()

    smp.init({"partitions": 4, "microbatches": 2, "pipeline": "simple"})
    second = keras_skip(batch_size=8, seed=7)  # other initial weights (and batch: unused)
    model_b, opt_b = smp.DistributedModel(second.model), keras.optimizers.Adam(1e-2)
    restore = smp.CheckpointManager(tf.train.Checkpoint(model=model_b, optimizer=opt_b),
                                    str(tmp_path))

    @smp.register_post_partition_hook
    def load() -> None:
        opt_b.build(model_b.trainable_variables)
        restore.restore().assert_existing_objects_matched()

    try:
        _train(model_b, first, opt_b, 1)  # the same batch
    finally:
        from modelparallel.tensorflow.model import _HOOKS
        _HOOKS.remove(load)
    assert model_b.plan.partitions == 4 and model_a.plan.partitions == 2
    diff = max(float(abs(a - b).max())
               for a, b in zip(model_b.get_weights(), ref.model.get_weights(), strict=True))
    assert diff < 1e-5, diff


def test_python_branch_inside_a_distributed_model_is_a_tracing_error() -> None:
    from modelparallel.errors import TracingError

    class Branchy(smp.DistributedModel):
        def __init__(self) -> None:
            super().__init__()
            self.fc = keras.layers.Dense(2)

        def call(self, x, training=False):
            y = self.fc(x)
            if tf.reduce_sum(y) > 0:  # a Python branch on a tensor's value
                return y
            return -y

    smp.init({"partitions": 2, "microbatches": 2})
    model = Branchy()

    @smp.step
    def predict(x):
        return model(x)

    with pytest.raises(TracingError, match=r"tf\.cond"):
        predict(tf.ones((4, 3)))


@pytest.mark.parametrize("pinned", [False, True])
def test_partition_pins_a_layer_under_auto_partitioning(pinned: bool) -> None:
    # auto_partition (the default) with smp.partition(0) around `c`: the ILP plans the rest
    # around the pin (a and b before it on stage 0, d on stage 1); without it, c goes to stage 1
    class Chain(smp.DistributedModel):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (keras.layers.Dense(32, name=n) for n in "abcd")

        def call(self, x, training=False):
            h = self.b(self.a(x))
            with smp.partition(0) if pinned else contextlib.nullcontext():
                h = self.c(h)
            return self.d(h)

    smp.init({"partitions": 2, "microbatches": 2})
    model = Chain()

    @smp.step
    def get_loss(x):
        return tf.reduce_mean(model(x))

    get_loss(tf.ones((4, 32)))
    g = model._mp_state["traced"].graph
    stage = {n.name: n.stage for n in model.plan.nodes}
    by_layer: dict[str, set[int]] = {}
    for n in g:
        if n.module_path in tuple("abcd"):
            by_layer.setdefault(n.module_path, set()).add(stage[n.name])
    want_c = 0 if pinned else 1
    assert by_layer == {"a": {0}, "b": {0}, "c": {want_c}, "d": {1}}, by_layer
    assert model.plan.config.pins if pinned else not model.plan.config.pins


def test_checkpoint_save_that_dies_midway_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # atomic saves: a checkpoint's files are written before the state file names it, so a save
    # that dies after writing them (and before recording them) leaves the previous one current
    v = tf.Variable([1.0, 2.0])
    ckpt = tf.train.Checkpoint(v=v)
    manager = smp.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
    good = manager.save()
    v.assign([5.0, 6.0])
    real = ckpt._write

    def dies(prefix, options=None):
        options.experimental_write_callbacks = None  # the files, not the state update
        real(prefix, options=options)
        raise OSError("killed while saving")

    ckpt._write = dies
    with pytest.raises(OSError, match="killed"):
        manager.save()
    assert len(list(tmp_path.glob("ckpt-2.*"))) >= 1  # the dead save's files are there
    v.assign([0.0, 0.0])
    fresh = smp.CheckpointManager(tf.train.Checkpoint(v=v), str(tmp_path))  # a restarted job
    assert fresh.latest_checkpoint == good
    fresh.restore().assert_consumed()
    assert v.numpy().tolist() == [1.0, 2.0]
