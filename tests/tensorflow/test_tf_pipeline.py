"""Pipelined training of Keras models on logical CPU devices equals single-device Keras training
(same weights, same batches, 3 steps) under both schedules, SGD and Adam."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")

from _tf_parity import run_parity  # noqa: E402

from modelparallel.tensorflow.models import keras_cnn, keras_gpt, keras_skip  # noqa: E402


@pytest.mark.parametrize("pipeline", ["simple", "interleaved"])
@pytest.mark.parametrize("partitions", [2, 4])
def test_skip_model_parity(partitions: int, pipeline: str) -> None:
    r = run_parity(keras_skip, partitions=partitions, microbatches=4, pipeline=pipeline)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions  # the plan used every stage


@pytest.mark.slow
@pytest.mark.parametrize(("partitions", "pipeline", "optimizer"),
                         [(2, "interleaved", "adam"), (2, "simple", "sgd"),
                          (4, "interleaved", "sgd")])
def test_transformer_parity(partitions: int, pipeline: str, optimizer: str) -> None:
    r = run_parity(keras_gpt, partitions=partitions, microbatches=4, pipeline=pipeline,
                   optimizer=optimizer)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) == partitions


@pytest.mark.slow
@pytest.mark.parametrize(("partitions", "pipeline", "optimizer"),
                         [(4, "interleaved", "adam"), (2, "simple", "sgd")])
def test_cnn_parity(partitions: int, pipeline: str, optimizer: str) -> None:
    r = run_parity(keras_cnn, partitions=partitions, microbatches=2, pipeline=pipeline,
                   optimizer=optimizer)
    assert r["diff"] < 1e-5, r
    assert len(r["stages"]) >= 2
