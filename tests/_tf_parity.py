"""One pipelined SMP-style training run against plain single-device Keras training."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

import modelparallel.tensorflow as smp


def _opt(name: str) -> Any:
    return keras.optimizers.SGD(0.1) if name == "sgd" else keras.optimizers.Adam(1e-3)


def split_layers(model: Any) -> list[str]:
    """The Keras layers without sublayers whose ops the plan of ``model`` put on several
    stages."""
    graph = model._mp_state["traced"].graph
    stages: dict[str, set[int]] = {}
    for n in model.plan.nodes:
        path = graph.node(n.name).module_path
        if path and n.stage >= 0:
            stages.setdefault(path, set()).add(n.stage)
    leaves = [p for p in stages if not any(q.startswith(p + ".") for q in stages)]
    return sorted(p for p in leaves if len(stages[p]) > 1)


def run_parity(factory: Any, *, partitions: int, microbatches: int, pipeline: str,
               optimizer: str = "sgd", steps: int = 3, tape: bool = True,
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``factory``'s model ``steps`` steps both ways; the largest weight difference, the
    losses, the stages the plan used and the layers it cut (:func:`split_layers`). Gradients
    from a ``tf.GradientTape`` in the step, or (``tape=False``) from the optimizer's legacy
    ``get_gradients``; ``config`` adds to the ``smp.init`` dict."""
    smp.init({"partitions": partitions, "microbatches": microbatches, "pipeline": pipeline,
              **(config or {})})
    ref, case = factory(batch_size=8), factory(batch_size=8)
    model = smp.DistributedModel(case.model)
    opt, opt_ref = _opt(optimizer), _opt(optimizer)
    x, y = case.args[0], case.target

    @smp.step
    def get_grads(x: Any, y: Any) -> Any:
        if not tape:  # SMP's way
            pred = model(x, training=True)
            loss = case.loss_fn(y, pred)
            return opt.get_gradients(loss, model.trainable_variables), loss, pred
        with tf.GradientTape() as t:
            pred = model(x, training=True)
            loss = case.loss_fn(y, pred)
        return t.gradient(loss, model.trainable_variables), loss, pred

    @tf.function
    def train(x: Any, y: Any) -> Any:
        grads, loss, pred = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean(), pred.merge()

    @tf.function
    def train_ref(x: Any, y: Any) -> Any:
        with tf.GradientTape() as t:
            loss = ref.loss_fn(y, ref.model(x, training=True))
        grads = t.gradient(loss, ref.model.trainable_variables)
        opt_ref.apply_gradients(zip(grads, ref.model.trainable_variables))
        return loss

    losses = []
    for _ in range(steps):
        loss, pred = train(x, y)
        losses.append((float(loss), float(train_ref(x, y))))
        assert pred.shape[0] == x.shape[0]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(model.get_weights(), ref.model.get_weights(), strict=True))
    stages = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
    return {"diff": diff, "losses": losses, "stages": stages, "split": split_layers(model),
            "plan": model.plan, "graph": model._mp_state["traced"].graph}
