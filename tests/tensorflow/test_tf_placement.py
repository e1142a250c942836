"""What a pipelined step's graph holds (Note [op placement], Note [schedule dependencies] in
runtime/tf_pipeline.py): the model's ops on their stage's device, each gradient op on the device of
its forward op, and on every stage the microbatches' forward and backward ordered by control
dependencies exactly as the schedule (GPipe or 1F1B) lists them."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

tf = pytest.importorskip("tensorflow")

import modelparallel.tensorflow as smp  # noqa: E402
from modelparallel.schedule import make_schedule  # noqa: E402
from modelparallel.tensorflow.models import keras_skip  # noqa: E402


def _step_graph(partitions: int, microbatches: int, pipeline: str) -> tuple[Any, Any]:
    """The node defs of the ``smp.step``'s function (the one holding the schedule's no-ops) of a
    skip model's training step, and the model."""
    smp.init({"partitions": partitions, "microbatches": microbatches, "pipeline": pipeline})
    case = keras_skip(batch_size=2 * microbatches)
    model = smp.DistributedModel(case.model)

    @smp.step
    def get_grads(x: Any, y: Any) -> Any:
        with tf.GradientTape() as t:
            loss = case.loss_fn(y, model(x, training=True))
        return t.gradient(loss, model.trainable_variables), loss

    @tf.function
    def outer(x: Any, y: Any) -> Any:
        grads, loss = get_grads(x, y)
        return [g.accumulate() for g in grads], loss.reduce_mean()

    graph_def = outer.get_concrete_function(case.args[0], case.target).graph.as_graph_def()
    step_fns = [f for f in graph_def.library.function
                if any(n.name.startswith("after_") for n in f.node_def)]
    assert len(step_fns) == 1, [f.signature.name for f in graph_def.library.function]
    return list(step_fns[0].node_def), model


def _canon(device: str) -> str:
    return tf.DeviceSpec.from_string(device).to_string() if device else ""


@pytest.mark.parametrize("pipeline", ["simple", "interleaved"])
def test_ops_on_their_stage_devices_and_the_schedule_as_control_dependencies(
        pipeline: str) -> None:
    p, m = 2, 3
    nodes, model = _step_graph(p, m, pipeline)
    devices = [_canon(d) for d in model._mp_state["devices"]]
    assert len(set(devices)) == p
    by_name = {n.name: n for n in nodes}

    # placement: every stage's device runs forward and gradient ops; each gradient op of a
    # forward op (TensorFlow names it gradients*/<forward op>_grad/...) sits on that op's device
    for d in devices:
        here = [n.name for n in nodes if _canon(n.device) == d]
        assert any(name.startswith("distributed_model") for name in here), d
        assert any(name.startswith("gradients") for name in here), d
    checked = 0
    for n in nodes:
        g = re.match(r"gradients(?:_\d+)?/(.+)_grad/", n.name)
        if g and g.group(1) in by_name and by_name[g.group(1)].device:
            assert _canon(n.device) == _canon(by_name[g.group(1)].device), n.name
            checked += 1
    assert checked > 10

    # schedule: the no-op before action X of stage s is after_X_s<s>; it waits on the previous
    # action's ops, which wait on that action's own no-op (none for the stage's first action)
    waits_on = {n.name: [i[1:] for i in n.input if i.startswith("^after_")] for n in nodes}
    sched = make_schedule("gpipe" if pipeline == "simple" else "1f1b", p, m)
    for s in range(p):
        actions = [f"{'B' if a.kind in ('B', 'I', 'W') else 'F'}{a.microbatch}"
                   for a in sched.actions[s]]
        want = {(cur, prev) for prev, cur in itertools.pairwise(actions)}
        got = set()
        for n in nodes:
            label = re.fullmatch(rf"after_([FB]\d+)_s{s}", n.name)
            if not label:
                continue
            assert _canon(n.device) == devices[s]
            before = {w for i in n.input if i.startswith("^")
                      for w in waits_on.get(i[1:], [])}
            assert len(before) <= 1, (n.name, before)
            prev = (re.fullmatch(r"after_([FB]\d+)_s\d+", before.pop()).group(1)  # type: ignore[union-attr]
                    if before else actions[0])
            got.add((label.group(1), prev))
        assert got == want, (s, pipeline, sorted(got), sorted(want))
