"""Keras reference models for the TensorFlow front end's tests, benchmarks and the CLI.

Each factory returns a :class:`KerasCase`: the model (built, seeded weights), one example batch, a
target and a mean-reduced loss, the conventions of ``modelparallel.models`` (Note [reference model
conventions] in ``modelparallel/models/__init__.py``: dropout 0, losses means over the batch, no
batch-statistics normalisation). The zero-argument ``*_factory`` forms are for the CLI
(``partition-plan build modelparallel.tensorflow.models:keras_gpt_factory -p 2``).

Example:
    >>> case = keras_mlp(batch_size=4)  # doctest: +SKIP
    >>> tuple(case.model(case.args[0]).shape)  # doctest: +SKIP
    (4, 10)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

__all__ = [
    "KerasCase",
    "KerasGPT",
    "keras_cnn",
    "keras_cnn_factory",
    "keras_gpt",
    "keras_gpt_factory",
    "keras_mlp",
    "keras_skip",
    "keras_skip_factory",
]


@dataclass(frozen=True)
class KerasCase:
    """A Keras model with an example batch, a target and a loss.

    Attributes:
        name: A label, e.g. ``"keras-gpt"``.
        model: The built Keras model.
        args: Example positional inputs: one full batch.
        target: Example target for ``loss_fn`` (same batch).
        loss_fn: ``loss_fn(target, model_output)`` -> scalar, a mean over the batch.
    """

    name: str
    model: Any
    args: tuple[Any, ...]
    target: Any
    loss_fn: Callable[[Any, Any], Any]


def _mse(y: Any, p: Any) -> Any:
    return tf.reduce_mean(tf.square(tf.cast(y, p.dtype) - p))


def _xent(y: Any, logits: Any) -> Any:
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))


def keras_mlp(*, batch_size: int = 8, width: int = 16, seed: int = 0) -> KerasCase:
    """A Sequential MLP (8 -> width -> width -> 10).

    Example:
        >>> keras_mlp(batch_size=2).args[0].shape  # doctest: +SKIP
        TensorShape([2, 8])
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((8,)),
        keras.layers.Dense(width, activation="relu", name="fc1"),
        keras.layers.Dense(width, activation="tanh", name="fc2"),
        keras.layers.Dense(10, name="head"),
    ], name="mlp")
    x = tf.random.stateless_normal((batch_size, 8), seed=(seed, 1))
    y = tf.random.stateless_uniform((batch_size,), seed=(seed, 2), maxval=10, dtype=tf.int32)
    return KerasCase("keras-mlp", model, (x,), y, _xent)


def keras_cnn(*, batch_size: int = 8, channels: int = 8, size: int = 12,
              seed: int = 0) -> KerasCase:
    """A Sequential CNN on ``size``x``size`` RGB images: two conv blocks, pooling, a classifier.

    Example:
        >>> keras_cnn(batch_size=2).args[0].shape  # doctest: +SKIP
        TensorShape([2, 12, 12, 3])
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((size, size, 3)),
        keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Conv2D(2 * channels, 3, padding="same", activation="relu", name="conv3"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(32, activation="relu", name="fc"),
        keras.layers.Dense(10, name="head"),
    ], name="cnn")
    x = tf.random.stateless_normal((batch_size, size, size, 3), seed=(seed, 1))
    y = tf.random.stateless_uniform((batch_size,), seed=(seed, 2), maxval=10, dtype=tf.int32)
    return KerasCase("keras-cnn", model, (x,), y, _xent)


def keras_skip(*, batch_size: int = 8, width: int = 16, seed: int = 0) -> KerasCase:
    """A Functional model with a skip connection over two blocks (the IR's long edge).

    Example:
        >>> len(keras_skip().model.layers) > 4  # doctest: +SKIP
        True
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12,), name="x")
    h = keras.layers.Dense(width, activation="relu", name="stem")(inp)
    a = keras.layers.Dense(width, activation="relu", name="block1")(h)
    b = keras.layers.Dense(width, activation="relu", name="block2")(a)
    s = keras.layers.Add(name="skip")([h, b])
    c = keras.layers.Dense(width, activation="tanh", name="block3")(s)
    out = keras.layers.Dense(4, name="head")(c)
    model = keras.Model(inp, out, name="skip")
    x = tf.random.stateless_normal((batch_size, 12), seed=(seed, 1))
    y = tf.random.stateless_normal((batch_size, 4), seed=(seed, 2))
    return KerasCase("keras-skip", model, (x,), y, _mse)


class _Block(keras.layers.Layer):
    """A pre-norm transformer block: causal self-attention and an MLP, both residual."""

    def __init__(self, hidden: int, heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hidden, self.heads = hidden, heads
        self.ln1 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln1")
        self.qkv = keras.layers.Dense(3 * hidden, name="qkv")
        self.proj = keras.layers.Dense(hidden, name="proj")
        self.ln2 = keras.layers.LayerNormalization(epsilon=1e-5, name="ln2")
        self.fc = keras.layers.Dense(4 * hidden, activation="gelu", name="fc")
        self.out = keras.layers.Dense(hidden, name="out")

    def call(self, x: Any) -> Any:
        b, t = tf.shape(x)[0], x.shape[1]
        d = self.hidden // self.heads
        q, k, v = tf.split(self.qkv(self.ln1(x)), 3, axis=-1)

        def heads(z: Any) -> Any:
            return tf.transpose(tf.reshape(z, (b, t, self.heads, d)), (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        att = tf.einsum("bhqd,bhkd->bhqk", q, k) / float(d) ** 0.5
        mask = tf.linalg.band_part(tf.ones((t, t)), -1, 0)
        att = tf.nn.softmax(att + (1.0 - mask) * -1e9, axis=-1)
        y = tf.reshape(tf.transpose(tf.einsum("bhqk,bhkd->bhqd", att, v), (0, 2, 1, 3)),
                       (b, t, self.hidden))
        x = x + self.proj(y)
        return x + self.out(self.fc(self.ln2(x)))


class KerasGPT(keras.Model):
    """A GPT-style decoder LM as a Keras subclass model: token and position embeddings, pre-norm
    blocks, a final norm and an untied head."""

    def __init__(self, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2,
                 seq: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wte = keras.layers.Embedding(vocab, hidden, name="wte")
        self.wpe = keras.layers.Embedding(seq, hidden, name="wpe")
        self.blocks = [_Block(hidden, heads, name=f"h{i}") for i in range(layers)]
        self.ln_f = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_f")
        self.head = keras.layers.Dense(vocab, use_bias=False, name="lm_head")

    def call(self, ids: Any) -> Any:
        x = self.wte(ids) + self.wpe(tf.range(ids.shape[1])[None, :])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def keras_gpt(*, batch_size: int = 4, vocab: int = 64, hidden: int = 32, layers: int = 2,
              heads: int = 2, seq: int = 16, seed: int = 0) -> KerasCase:
    """The Keras GPT (:class:`KerasGPT`) with a batch of token ids and next-token targets.

    Example:
        >>> keras_gpt(batch_size=2).args[0].shape  # doctest: +SKIP
        TensorShape([2, 16])
    """
    keras.utils.set_random_seed(seed)
    model = KerasGPT(vocab, hidden, layers, heads, seq, name="gpt")
    ids = tf.random.stateless_uniform((batch_size, seq), seed=(seed, 1), maxval=vocab,
                                      dtype=tf.int32)
    model(ids)
    target = tf.roll(ids, -1, axis=1)
    return KerasCase("keras-gpt", model, (ids,), target, _xent)


def keras_gpt_factory() -> KerasCase:
    """:func:`keras_gpt` with its defaults, for the CLI."""
    return keras_gpt()


def keras_cnn_factory() -> KerasCase:
    """:func:`keras_cnn` with its defaults, for the CLI."""
    return keras_cnn()


def keras_skip_factory() -> KerasCase:
    """:func:`keras_skip` with its defaults, for the CLI."""
    return keras_skip()
