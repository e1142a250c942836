"""One rank of an SMP TensorFlow script across processes (Note [tf cluster process model]):
run as ``python tests/_tf_cluster_run.py '<json>'`` on every rank with the launcher's
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, or with a ``TF_CONFIG``. Trains 3 steps and prints one
``RESULT {...}`` line; rank 0 also trains the same model on one device and reports the largest
weight difference, and every rank's replica weights are compared with rank 0's."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(2)

import keras  # noqa: E402

import modelparallel.tensorflow as smp  # noqa: E402
from modelparallel.tensorflow import models  # noqa: E402


def _opt(name: str):
    return keras.optimizers.SGD(0.1) if name == "sgd" else keras.optimizers.Adam(1e-3)


def main(spec: dict) -> dict:
    t0 = time.perf_counter()
    smp.init({"partitions": spec["partitions"], "microbatches": spec["microbatches"],
              "pipeline": spec["pipeline"], **spec.get("config", {})})
    factory = getattr(models, spec["model"])
    case = factory(batch_size=8)
    model = smp.DistributedModel(case.model)
    opt = _opt(spec["optimizer"])
    x, y = case.args[0], case.target

    @smp.step
    def get_grads(x, y):
        with tf.GradientTape() as t:
            pred = model(x, training=True)
            loss = case.loss_fn(y, pred)
        return t.gradient(loss, model.trainable_variables), loss, pred

    @tf.function
    def train(x, y):
        grads, loss, pred = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean(), pred.merge()

    losses, times = [], []
    for _ in range(spec.get("steps", 3)):
        t = time.perf_counter()
        loss, pred = train(x, y)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
        assert pred.shape[0] == x.shape[0]
    out = {"rank": smp.rank(), "size": smp.size(), "losses": losses, "step_s": times,
           "setup_s": time.perf_counter() - t0 - sum(times)}
    # the helpers: a send and a broadcast from rank 0, an allgather of every replica's weights
    if smp.rank() == 0:
        for k in range(1, smp.size()):
            smp.send({"hello": k}, k)
        smp.broadcast(["to", "all"], smp.WORLD)
    else:
        out["got"] = smp.recv_from(0)
        out["broadcast"] = smp.recv_from(0)
    replicas = smp.allgather(model.get_weights())
    out["replica_diff"] = max(float(np.max(np.abs(a - b))) for r in replicas
                              for a, b in zip(r, replicas[0], strict=True))
    if smp.rank() == 0:
        ref = factory(batch_size=8)
        opt_ref = _opt(spec["optimizer"])

        @tf.function
        def train_ref(x, y):
            with tf.GradientTape() as t:
                loss = ref.loss_fn(y, ref.model(x, training=True))
            grads = t.gradient(loss, ref.model.trainable_variables)
            opt_ref.apply_gradients(zip(grads, ref.model.trainable_variables))
            return loss

        out["ref_losses"] = [float(train_ref(x, y)) for _ in losses]
        out["diff"] = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(model.get_weights(), ref.model.get_weights(),
                                          strict=True))
        out["devices"] = list(model._mp_state["devices"])
        out["stages"] = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
    smp.barrier()
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT", json.dumps(result), flush=True)
