"""Loading a Keras MODEL for the CLI: the factory's model traced with TensorFlow on one microbatch
of its example batch (Note [keras capture] in ``modelparallel/tracer/tf_capture.py``). Nothing
here imports torch; TensorFlow is imported only once a Keras model is seen."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from modelparallel.errors import ConfigError

__all__ = ["is_keras_result", "load_keras"]


def _is_keras(obj: object) -> bool:
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras") for c in type(obj).__mro__)


def is_keras_result(result: object) -> bool:
    """Whether a MODEL factory's result holds a Keras model (bare, in a case, or in a pair).

    Example:
        >>> is_keras_result((object(), None))
        False
    """
    if _is_keras(result):
        return True
    if _is_keras(getattr(result, "model", None)):
        return True
    return isinstance(result, tuple) and len(result) == 2 and _is_keras(result[0])


def _unpack(result: Any) -> tuple[Any, tuple[Any, ...] | None]:
    if _is_keras(result):
        return result, None
    if hasattr(result, "model") and hasattr(result, "args"):
        return result.model, tuple(result.args)
    if isinstance(result, tuple) and len(result) == 2:
        inputs = result[1]
        return result[0], tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    raise ConfigError(
        f"the MODEL factory returned {type(result).__name__}; return a Keras model, a KerasCase "
        "or a (model, example_inputs) pair")


def _tensor(text: str) -> Any:
    import tensorflow as tf

    from modelparallel.cli._load import _parse_shape

    shape, dtype = _parse_shape(text)
    try:
        dt = tf.as_dtype(dtype)
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r} in an input spec; use e.g. float32, int32"
                          ) from None
    if dt.is_floating:
        return tf.random.stateless_normal(shape, seed=(0, 0), dtype=dt)
    return tf.zeros(shape, dtype=dt)


def load_keras(spec: str, result: Any, *, input_shapes: Sequence[str], microbatches: int,
               console: Any, dtype: str | None = None) -> Any:
    """Trace the Keras model of ``result`` on one microbatch of its example batch.

    Raises:
        ConfigError: if the example batch is unknown or does not split into ``microbatches``.
    """
    import tensorflow as tf

    from modelparallel.cli._load import _Loaded
    from modelparallel.tracer.tf_capture import trace_keras

    if dtype is not None:
        raise ConfigError("--dtype is not supported for Keras models yet; build the model in "
                          "the dtype you want (keras.mixed_precision) instead")
    model, args = _unpack(result)
    if input_shapes:
        args = tuple(_tensor(s) for s in input_shapes)
    if not args:
        raise ConfigError(
            f"MODEL {spec!r} returned a bare Keras model, so the example batch is unknown; give "
            "--input-shape 8,28,28,1 (one per positional input)")
    tensors = [tf.convert_to_tensor(a) for a in args]
    batch = int(tensors[0].shape[0]) if tensors[0].shape.rank else 1
    if microbatches < 1 or batch % microbatches:
        raise ConfigError(f"the example batch of {batch} samples does not split into "
                          f"{microbatches} equal microbatches; pick a divisor")
    micro = [t[: batch // microbatches] for t in tensors]
    shapes = {f"arg{i}": [int(s) for s in t.shape] for i, t in enumerate(micro)}
    start = time.perf_counter()
    with console.status(f"tracing {type(model).__name__} (keras)"):
        traced = trace_keras(model, tuple(micro))
    console.print(f"[dim]traced {type(model).__name__} with TensorFlow "
                  f"{tf.__version__}: {len(traced.graph)} nodes in "
                  f"{time.perf_counter() - start:.1f} s[/dim]")
    return _Loaded(traced.graph, None, shapes, batch // microbatches)
