"""``keras_hub`` models built from configs (random weights, nothing downloaded) for the TensorFlow
front end's tests, benchmarks and the CLI.

Hugging Face ``transformers`` 5 ships no TensorFlow models (its ``TF*`` classes and
``modeling_tf_*`` files are gone), so the library models for Keras come from ``keras_hub``:
its GPT-2 and BERT backbones, each wrapped in a Functional model that takes token ids (the
padding mask all ones, the segment ids zeros) and adds an untied head. Dropout is 0 (Note
[reference model conventions] in ``modelparallel/models/__init__.py``). Install ``keras_hub``
with ``pip install --no-deps keras-hub``: its ``tensorflow-text`` dependency pulls the full
``tensorflow`` wheel over ``tensorflow-cpu``, and building a backbone from a config needs none
of its other dependencies but those Keras and ``transformers`` bring.

Example:
    >>> case = keras_hub_gpt2(batch_size=2)  # doctest: +SKIP
    >>> tuple(case.model(case.args[0]).shape)  # doctest: +SKIP
    (2, 16, 64)
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from modelparallel.errors import MissingDependencyError
from modelparallel.tensorflow.models import KerasCase, _xent

__all__ = ["keras_hub_bert", "keras_hub_bert_factory", "keras_hub_gpt2",
           "keras_hub_gpt2_factory"]


def _keras_hub() -> Any:
    try:
        import keras_hub
    except ImportError as exc:
        raise MissingDependencyError(
            "the keras_hub reference models need keras_hub, which is not installed; install "
            "it with `pip install --no-deps keras-hub` (with its dependencies it replaces "
            "tensorflow-cpu by the full tensorflow wheel)") from exc
    return keras_hub


def _ids(batch_size: int, seq: int, vocab: int, seed: int, k: int) -> Any:
    return tf.random.stateless_uniform((batch_size, seq), seed=(seed, k), maxval=vocab,
                                       dtype=tf.int32)


def keras_hub_gpt2(*, batch_size: int = 8, vocab: int = 64, hidden: int = 32, layers: int = 2,
                   heads: int = 2, seq: int = 16, seed: int = 0) -> KerasCase:
    """``keras_hub.models.GPT2Backbone`` from a config with an untied LM head: token ids in,
    next-token logits out.

    Args:
        batch_size: Samples in the example batch.
        vocab: Vocabulary size.
        hidden: Hidden width (the MLP is ``2 * hidden``).
        layers: Transformer decoder layers.
        heads: Attention heads.
        seq: Sequence length (also the backbone's maximum).
        seed: Seeds the weights and the batch.

    Returns:
        The case: Functional model, token ids, the ids shifted by one as targets, cross-entropy.

    Example:
        >>> keras_hub_gpt2(batch_size=2).args[0].shape  # doctest: +SKIP
        TensorShape([2, 16])
    """
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.GPT2Backbone(
        vocabulary_size=vocab, num_layers=layers, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=2 * hidden, dropout=0.0, max_sequence_length=seq, name="gpt2")
    ids = keras.Input((seq,), dtype="int32", name="token_ids")
    h = backbone({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids)})
    model = keras.Model(ids, keras.layers.Dense(vocab, use_bias=False, name="lm_head")(h),
                        name="hub_gpt2")
    x = _ids(batch_size, seq, vocab, seed, 1)
    return KerasCase("keras-hub-gpt2", model, (x,), tf.roll(x, -1, axis=1), _xent)


def keras_hub_bert(*, batch_size: int = 8, vocab: int = 64, hidden: int = 32, layers: int = 2,
                   heads: int = 2, seq: int = 16, classes: int = 4, seed: int = 0) -> KerasCase:
    """``keras_hub.models.BertBackbone`` from a config with a classifier on its pooled output:
    token ids in, class logits out.

    Args:
        batch_size: Samples in the example batch.
        vocab: Vocabulary size.
        hidden: Hidden width (the MLP is ``2 * hidden``).
        layers: Transformer encoder layers.
        heads: Attention heads.
        seq: Sequence length (also the backbone's maximum).
        classes: Classes of the classifier.
        seed: Seeds the weights and the batch.

    Returns:
        The case: Functional model, token ids, class labels, cross-entropy.

    Example:
        >>> keras_hub_bert(batch_size=2).target.shape  # doctest: +SKIP
        TensorShape([2])
    """
    hub = _keras_hub()
    keras.utils.set_random_seed(seed)
    backbone = hub.models.BertBackbone(
        vocabulary_size=vocab, num_layers=layers, num_heads=heads, hidden_dim=hidden,
        intermediate_dim=2 * hidden, dropout=0.0, max_sequence_length=seq, name="bert")
    ids = keras.Input((seq,), dtype="int32", name="token_ids")
    out = backbone({"token_ids": ids, "padding_mask": keras.ops.ones_like(ids),
                    "segment_ids": keras.ops.zeros_like(ids)})
    logits = keras.layers.Dense(classes, name="classifier")(out["pooled_output"])
    model = keras.Model(ids, logits, name="hub_bert")
    y = tf.random.stateless_uniform((batch_size,), seed=(seed, 2), maxval=classes,
                                    dtype=tf.int32)
    return KerasCase("keras-hub-bert", model, (_ids(batch_size, seq, vocab, seed, 1),), y, _xent)


def keras_hub_gpt2_factory() -> KerasCase:
    """:func:`keras_hub_gpt2` with its defaults, for the CLI."""
    return keras_hub_gpt2()


def keras_hub_bert_factory() -> KerasCase:
    """:func:`keras_hub_bert` with its defaults, for the CLI."""
    return keras_hub_bert()
