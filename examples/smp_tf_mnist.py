"""An SMP v1 TensorFlow 2 MNIST training script, written the way AWS's ``tf2.py`` example is,
running on modelparallel with only the import changed.

    python examples/smp_tf_mnist.py --steps 20

What differs from a SageMaker script: the import line (``smdistributed.modelparallel.tensorflow``
-> ``modelparallel.tensorflow``), the launcher (one plain process drives every stage: GPUs, or
logical CPU devices on a machine without them, ``--cpu-devices``), and the data: synthetic
MNIST-shaped images (each class a fixed random 28x28 pattern plus noise), so nothing is
downloaded and the accuracy rises within a few steps. Everything else is SMP's API: ``smp.init``,
a ``smp.DistributedModel`` subclass, an ``@smp.step`` returning gradients from
``optimizer.get_gradients``, the loss and the predictions, an outer ``tf.function`` doing
``accumulate()``, ``apply_gradients``, ``reduce_mean()`` and ``merge()``, and
``smp.CheckpointManager``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

import modelparallel.tensorflow as smp  # was: import smdistributed.modelparallel.tensorflow as smp)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--partitions", type=int, default=2)
parser.add_argument("--microbatches", type=int, default=4)
parser.add_argument("--pipeline", default="interleaved", choices=("interleaved", "simple"))
parser.add_argument("--cpu-devices", type=int, default=4,
                    help="logical CPU devices to make when there is no GPU")
parser.add_argument("--checkpoint-dir", default=None)
args = parser.parse_args()

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)
if not tf.config.list_physical_devices("GPU"):
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration() for _ in range(args.cpu_devices)])

# SageMaker passes this dict as SM_HP_MP_PARAMETERS; smp.init merges it over the script's.
smp.init({"partitions": args.partitions, "microbatches": args.microbatches,
          "pipeline": args.pipeline})

# Synthetic MNIST: 10 fixed patterns plus noise.
tf.random.set_seed(1234)
patterns = tf.random.uniform((10, 28, 28, 1), seed=7)
labels = tf.random.uniform((args.batch_size * args.steps,), maxval=10, dtype=tf.int64, seed=8)
images = tf.gather(patterns, labels) + 0.3 * tf.random.normal((labels.shape[0], 28, 28, 1))
train_ds = (tf.data.Dataset.from_tensor_slices((images, labels))
            .shuffle(1000, seed=smp.dp_rank()).batch(args.batch_size, drop_remainder=True))


class MyModel(smp.DistributedModel):
    def __init__(self):
        super().__init__()
        self.conv1 = tf.keras.layers.Conv2D(8, 3, activation="relu")
        self.pool = tf.keras.layers.MaxPooling2D(2)
        self.flatten = tf.keras.layers.Flatten()
        self.d1 = tf.keras.layers.Dense(64, activation="relu")
        self.d2 = tf.keras.layers.Dense(10)

    def call(self, x, training=None):
        x = self.pool(self.conv1(x))
        return self.d2(self.d1(self.flatten(x)))


model = MyModel()
loss_object = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
optimizer = tf.keras.optimizers.Adam(1e-3)
train_accuracy = tf.keras.metrics.SparseCategoricalAccuracy(name="train_accuracy")


@smp.step
def get_grads(images, labels):
    predictions = model(images, training=True)
    loss = loss_object(labels, predictions)
    grads = optimizer.get_gradients(loss, model.trainable_variables)
    return grads, loss, predictions


@tf.function
def train_step(images, labels):
    gradients, loss, predictions = get_grads(images, labels)
    gradients = [g.accumulate() for g in gradients]
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    train_accuracy(labels, predictions.merge())
    return loss.reduce_mean()


checkpoint_dir = args.checkpoint_dir or tempfile.mkdtemp(prefix="smp_tf_mnist_")
checkpoint = tf.train.Checkpoint(optimizer=optimizer, model=model)
ckpt_manager = smp.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=1)

for batch, (images_b, labels_b) in enumerate(train_ds):
    loss = train_step(images_b, labels_b)
    if batch % 5 == 0 or batch == args.steps - 1:
        print(f"step {batch}: loss {float(loss):.4f} accuracy "
              f"{float(train_accuracy.result()):.3f}")
stages = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
print(f"stages used: {stages} of {args.partitions}")
ckpt_manager.save()
print(f"saved checkpoint {ckpt_manager.latest_checkpoint}")
