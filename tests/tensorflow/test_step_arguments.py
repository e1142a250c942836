"""``@smp.step``'s arguments (SMP v1): ``tf.function``'s own (``input_signature``),
``non_split_inputs`` passed whole to every microbatch, ``input_split_axes`` splitting along
another axis; ``StepOutput.concat`` along an axis."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")

import modelparallel.tensorflow as smp  # noqa: E402
from modelparallel.tensorflow.models import keras_mlp  # noqa: E402


def test_step_arguments_split_and_pass_whole_as_smp_does() -> None:
    smp.init({"partitions": 2, "microbatches": 4, "pipeline": "interleaved"})
    ref, case = keras_mlp(batch_size=8), keras_mlp(batch_size=8)  # the same weights
    model = smp.DistributedModel(case.model)
    x = case.args[0]
    scale = tf.constant([1.0, 2.0, 3.0])
    seen: list[tuple[list[int], list[int]]] = []

    @smp.step(non_split_inputs=["scale"], input_split_axes={"xt": 1},
              input_signature=[tf.TensorSpec((8, 8), tf.float32),
                               tf.TensorSpec((3,), tf.float32)])
    def predict(xt, scale):
        seen.append((xt.shape.as_list(), scale.shape.as_list()))
        pred = model(tf.transpose(xt), training=False)  # the microbatch, batch first again
        return pred * tf.reduce_sum(scale), tf.transpose(pred)

    pred, pred_t = predict(tf.transpose(x), scale)
    assert seen == [([8, 2], [3])] * 4  # split along axis 1 into 4; scale whole every time
    want = ref.model(x, training=False).numpy()
    assert len(pred.outputs) == 4 and pred.concat().shape == (8, 10)
    assert abs(pred.concat().numpy() - 6.0 * want).max() < 1e-5
    assert abs(pred_t.concat(axis=1).numpy() - want.T).max() < 1e-5
    assert abs(pred_t.merge(axis=1).numpy() - want.T).max() < 1e-5
    with pytest.raises((TypeError, ValueError)):  # the signature is tf.function's
        predict(tf.transpose(x), tf.constant([1.0, 2.0]))
