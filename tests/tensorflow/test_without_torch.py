"""A TensorFlow user never needs PyTorch: in a process where ``import torch`` fails, an SMP
script traces, plans and trains a Keras model as a 2-stage pipeline (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # `import torch` (and torch.*) raises ImportError from here on
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import modelparallel.tensorflow as smp
    from modelparallel.tensorflow.models import keras_mlp

    smp.init({"partitions": 2, "microbatches": 2, "pipeline": "interleaved"})
    case = keras_mlp(batch_size=8)
    model, opt = smp.DistributedModel(case.model), keras.optimizers.Adam(1e-2)

    @smp.step
    def get_grads(x, y):
        with tf.GradientTape() as t:
            loss = case.loss_fn(y, model(x, training=True))
        return t.gradient(loss, model.trainable_variables), loss

    @tf.function
    def train(x, y):
        grads, loss = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean()

    losses = [float(train(case.args[0], case.target)) for _ in range(3)]
    assert losses[-1] < losses[0], losses
    stages = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
    assert stages == [0, 1], stages
    assert sys.modules["torch"] is None and not [m for m in sys.modules if m.startswith("torch.")]
    print("TRAINED", losses)
""")


def test_smp_tensorflow_trains_in_a_process_without_torch() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SM_HP_MP_PARAMETERS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRAINED" in proc.stdout
