"""tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``): Functional, Sequential and subclass models
traced; a Functional one wrapped, trained as a 2-stage pipeline
equal to single-device training, gradients from ``optimizer.get_gradients`` (SMP's way). Runs in
a fresh process: the legacy switch must be set before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tf_keras")  # installed with `pip install --no-deps tf-keras`

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow as tf
    import tf_keras
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import modelparallel.tensorflow as smp

    def build():
        tf_keras.utils.set_random_seed(0)
        inp = tf_keras.Input((8,))
        h = tf_keras.layers.Dense(16, activation="relu", name="a")(inp)
        h = tf_keras.layers.Dense(16, activation="tanh", name="b")(h)
        return tf_keras.Model(inp, tf_keras.layers.Dense(4, name="c")(h))

    smp.init({"partitions": 2, "microbatches": 2, "pipeline": "simple"})
    assert issubclass(smp.DistributedModel, tf_keras.Model)
    ref, model = build(), smp.DistributedModel(build())
    opt, opt_ref = tf_keras.optimizers.SGD(0.1), tf_keras.optimizers.SGD(0.1)
    x, y = tf.random.stateless_normal((8, 8), (1, 2)), tf.random.stateless_normal((8, 4), (3, 4))

    @smp.step
    def get_grads(x, y):
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        return opt.get_gradients(loss, model.trainable_variables), loss

    @tf.function
    def train(x, y):
        grads, loss = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean()

    @tf.function
    def train_ref(x, y):
        with tf.GradientTape() as t:
            loss = tf.reduce_mean(tf.square(ref(x, training=True) - y))
        opt_ref.apply_gradients(zip(t.gradient(loss, ref.trainable_variables),
                                    ref.trainable_variables))
        return loss

    for _ in range(3):
        train(x, y), train_ref(x, y)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(model.get_weights(), ref.get_weights()))
    stages = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
    print("DIFF", diff, "STAGES", stages)
    assert diff < 1e-5 and stages == [0, 1], (diff, stages)
    import tempfile
    path = model.save_model(tempfile.mkdtemp() + "/model")
    loaded = tf.saved_model.load(path)  # keep the root alive while serving
    got = loaded.serve(x).numpy()
    assert abs(got - ref(x).numpy()).max() < 1e-5, "save_model"
    print("SAVED", path)

    # Sequential and subclass tf-keras models trace too, with their layer paths and variables
    from modelparallel.tracer.tf_capture import trace_keras

    seq = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu", name="fc"),
                               tf_keras.layers.Dense(2, name="out")], name="seq")
    seq.build((None, 4))

    class Sub(tf_keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.norm = tf_keras.layers.LayerNormalization(name="norm")
            self.fc = tf_keras.layers.Dense(3, name="fc")

        def call(self, x, training=False):
            return self.fc(self.norm(x)) + x[:, :3]

    sub = Sub()
    sub(tf.zeros((2, 4)))
    for m, paths in ((seq, {"fc", "out"}), (sub, {"norm", "fc"})):
        g = trace_keras(m, tf.zeros((2, 4))).graph
        assert paths <= {n.module_path for n in g}, (m.name, {n.module_path for n in g})
        assert {q.name.split(".")[0] for q in g.params} == paths, [q.name for q in g.params]
        assert any(n.target == "MatMul" and n.flops == 2 * 2 * 4 * (8 if m is seq else 3)
                   for n in g)
    print("TRACED")
""")


@pytest.mark.slow
def test_tf_keras_functional_model_pipeline_parity() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DIFF" in proc.stdout and "SAVED" in proc.stdout and "TRACED" in proc.stdout
