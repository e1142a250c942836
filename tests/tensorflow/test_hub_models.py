"""keras_hub models built from configs (GPT-2 and BERT backbones, nothing downloaded) trained as
pipelines equal to single-device Keras training; skipped without keras_hub
(`pip install --no-deps keras-hub`)."""

from __future__ import annotations

import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras_hub")

from _tf_parity import run_parity  # noqa: E402

from modelparallel.tensorflow.hub_models import keras_hub_bert, keras_hub_gpt2  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize(("factory", "partitions", "pipeline", "optimizer"),
                         [(keras_hub_gpt2, 2, "interleaved", "adam"),
                          (keras_hub_bert, 2, "simple", "sgd")])
def test_keras_hub_model_parity(factory, partitions: int, pipeline: str, optimizer: str) -> None:
    r = run_parity(factory, partitions=partitions, microbatches=2, pipeline=pipeline,
                   optimizer=optimizer)
    assert r["diff"] < 1e-5, r
    assert r["stages"] == list(range(partitions))
