"""``@smp.step`` (a ``tf.function`` whose body runs once per microbatch) and ``StepOutput``.

The step's ``tf.function`` cuts every tensor argument into ``microbatches`` pieces (axis 0, or
``input_split_axes[name]``; ``non_split_inputs`` pass whole), runs the body on each, with
``tf.GradientTape.gradient`` as colocated ``tf.gradients`` (Note [op placement] in
``runtime/tf_pipeline.py``), orders the stages' work by the schedule (Note [schedule
dependencies]) and returns every tensor the body returned as a :class:`StepOutput` of its
per-microbatch values; non-tensor values come back as Python lists.

Note [sparse gradients]
~~~~~~~~~~~~~~~~~~~~~~~
Embedding gradients are ``IndexedSlices``, and Keras 3 optimizers update them row by row: Adam
adds each row's squared value to its second moment, so *how the rows are listed* changes the
update. To give the optimizer the full batch's ``IndexedSlices``, ``accumulate`` concatenates the
microbatches' rows when the gathered indices depend on the step's inputs (token ids: the full
batch lists every token once, in batch order) and sums the values of one row list when they do not
(positions from ``tf.range``: the full batch lists each position once); the step decides which by
walking the indices' producers back to the microbatch split.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from modelparallel.errors import ConfigError
from modelparallel.tensorflow._state import config

__all__ = ["StepOutput", "current_step", "step"]


class StepOutput:
    """The per-microbatch values of one tensor a step returned.

    Example:
        >>> out = StepOutput([tf.constant(1.0), tf.constant(3.0)])  # doctest: +SKIP
        >>> float(out.reduce_mean())  # doctest: +SKIP
        2.0
    """

    def __init__(self, outputs: Sequence[Any], *, shared_indices: bool = False) -> None:
        self.outputs = list(outputs)
        #: For ``IndexedSlices`` gradients: every microbatch gathered the same rows (positions
        #: from ``tf.range``), not rows picked by the batch (token ids). Note [sparse gradients].
        self.shared_indices = shared_indices

    @staticmethod
    def _dense(v: Any) -> Any:
        return tf.convert_to_tensor(v) if isinstance(v, tf.IndexedSlices) else v

    def _sparse_sum(self, scale: float) -> Any:
        vals = self.outputs
        if self.shared_indices:
            return tf.IndexedSlices(tf.add_n([v.values for v in vals]) * scale, vals[0].indices,
                                    vals[0].dense_shape)
        return tf.IndexedSlices(tf.concat([v.values for v in vals], 0) * scale,
                                tf.concat([v.indices for v in vals], 0), vals[0].dense_shape)

    def reduce_sum(self) -> Any:
        """The sum over microbatches."""
        if len(self.outputs) == 1:
            return self._dense(self.outputs[0])
        return tf.add_n([self._dense(v) for v in self.outputs])

    def reduce_mean(self) -> Any:
        """The mean over microbatches (the usual loss reduction)."""
        if len(self.outputs) == 1:
            return self._dense(self.outputs[0])
        return self.reduce_sum() / len(self.outputs)

    def accumulate(self, method: str = "variable", var: Any = None) -> Any:
        """The mean over microbatches, for gradients (every ``method`` gives the same value);
        None when the gradient is None. Embedding gradients (``IndexedSlices`` on every
        microbatch) stay sparse, the rows of every microbatch together, so an optimizer with
        sparse updates (Adam's lazy rows) sees what single-device training gives it."""
        if any(v is None for v in self.outputs):
            return None
        if var is None and len(self.outputs) == 1:
            return self.outputs[0]
        if var is None and all(isinstance(v, tf.IndexedSlices) for v in self.outputs):
            return self._sparse_sum(1.0 / len(self.outputs))
        total = self.reduce_mean()
        if var is not None:
            var.assign(total)
            return var
        return total

    def concat(self, axis: int = 0) -> Any:
        """The microbatches concatenated along ``axis`` (the batch)."""
        return tf.concat(self.outputs, axis=axis)

    def merge(self, axis: int = 0) -> Any:
        """Like :meth:`concat`: the whole batch's values (predictions)."""
        return self.concat(axis)

    def stack(self, axis: int = 0) -> Any:
        """The microbatches stacked along a new ``axis``."""
        return tf.stack(self.outputs, axis=axis)

    def __repr__(self) -> str:
        return f"StepOutput({len(self.outputs)} microbatches)"


@dataclass
class StepContext:
    """What a model call inside a step needs: the microbatch count and the recorder."""

    microbatches: int
    recorder: Any = None
    devices: Sequence[str] = ()
    calls: list[Any] = field(default_factory=list)


_LOCAL = threading.local()
_STEPS = itertools.count()  # steps decorated in this process, in order (their message tags)


def current_step() -> StepContext | None:
    """The step being traced in this thread, if any.

    Example:
        >>> current_step() is None
        True
    """
    return getattr(_LOCAL, "step", None)


def _split_args(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                m: int, non_split: Sequence[str], axes: dict[str, int]
                ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    from modelparallel.runtime.tf_pipeline import split_batch

    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        bound = None
    names = list(bound.arguments) if bound is not None else [f"arg{i}" for i in range(len(args))]
    per: list[tuple[list[Any], dict[str, Any]]] = [([], {}) for _ in range(m)]

    def cut(value: Any, name: str) -> list[Any]:
        if name in non_split:
            return [value] * m
        axis = axes.get(name, 0)

        def leaf(v: Any) -> Any:
            return split_batch(v, m, axis, name) if isinstance(v, tf.Tensor) else [v] * m
        pieces = [leaf(v) for v in tf.nest.flatten(value)]
        return [tf.nest.pack_sequence_as(value, [p[i] for p in pieces]) for i in range(m)]

    for i, value in enumerate(args):
        for mb, piece in enumerate(cut(value, names[i] if i < len(names) else f"arg{i}")):
            per[mb][0].append(piece)
    for key, value in kwargs.items():
        for mb, piece in enumerate(cut(value, key)):
            per[mb][1][key] = piece
    return [(tuple(a), k) for a, k in per]


def _depends_on_split(t: Any) -> bool:
    """Whether tensor ``t`` is computed from a microbatch split of the step's inputs."""
    seen: set[str] = set()
    stack = [t.op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type in ("Split", "SplitV", "Identity") and "mp_split" in op.name:
            return True
        stack.extend(i.op for i in op.inputs)
    return False


def step(fn: Callable[..., Any] | None = None, *, non_split_inputs: Sequence[str] | None = None,
         input_split_axes: dict[str, int] | None = None, **tf_function_kwargs: Any) -> Any:
    """Decorate the body of one training (or evaluation) step (SMP ``@smp.step``).

    Args:
        fn: The body: the model's forward (and the gradients), run once per microbatch.
        non_split_inputs: Argument names passed whole to every microbatch.
        input_split_axes: Argument name -> the axis to split it along (default 0).
        **tf_function_kwargs: ``tf.function``'s arguments (``input_signature``...).

    Returns:
        A callable returning the body's structure with each tensor a :class:`StepOutput`.

    Example:
        >>> @step  # doctest: +SKIP
        ... def get_grads(x, y): ...
    """
    if fn is None:
        return functools.partial(step, non_split_inputs=non_split_inputs,
                                 input_split_axes=input_split_axes, **tf_function_kwargs)
    non_split = list(non_split_inputs or ())
    axes = dict(input_split_axes or {})
    structure: list[Any] = []
    shared: list[bool] = []
    python: list[list[Any] | None] = []  # a non-tensor leaf's values, one per microbatch

    def run(*args: Any, **kwargs: Any) -> Any:
        from modelparallel.runtime.tf_pipeline import ScheduleRecorder, tape_as_gradients

        cfg = config()
        m = cfg.microbatches
        ctx = StepContext(m)
        ctx.recorder = ScheduleRecorder("simple" if cfg.pipeline == "simple" else "1f1b", [])
        _LOCAL.step = ctx
        outs: list[Any] = []
        try:
            with tape_as_gradients():
                for mb_args, mb_kwargs in _split_args(fn, args, kwargs, m, non_split, axes):
                    ctx.recorder.start_microbatch()
                    if ctx.devices:
                        with tf.device(ctx.devices[-1]):
                            outs.append(fn(*mb_args, **mb_kwargs))
                    else:
                        outs.append(fn(*mb_args, **mb_kwargs))
                    ctx.recorder.end_microbatch()
            if not ctx.calls:
                raise ConfigError("an smp.step body must call the smp.DistributedModel and "
                                  "return something that depends on its output")
            ctx.recorder.devices = ctx.devices
            ctx.recorder.apply()
        finally:
            _LOCAL.step = None
        flat = [tf.nest.flatten(o, expand_composites=False) for o in outs]
        structure[:] = [outs[0]]
        leaves = [[f[i] for f in flat] for i in range(len(flat[0]))]
        shared[:] = [isinstance(leaf[0], tf.IndexedSlices) and not _depends_on_split(
            leaf[0].indices) for leaf in leaves]
        python[:] = [None if any(isinstance(v, tf.Tensor | tf.IndexedSlices | tf.Variable)
                                 or v is None for v in leaf) else list(leaf) for leaf in leaves]
        return [tuple(leaf) if python[i] is None else None for i, leaf in enumerate(leaves)]

    traced_fn = tf.function(run, autograph=False, **tf_function_kwargs)
    tag = f"step/{next(_STEPS)}/{getattr(fn, '__qualname__', 'step')}"

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        from modelparallel.runtime.tf_cluster import current_cluster

        cluster = current_cluster()
        if cluster is not None and cluster.rank != 0:
            leaves = _follower_outputs(cluster, tag, traced_fn, args, kwargs)
        else:
            leaves = traced_fn(*args, **kwargs)
            if cluster is not None:
                _send_outputs(cluster, tag, leaves)
        packed: list[Any] = []
        for i, per_mb in enumerate(leaves):
            if python[i] is not None:
                packed.append(list(python[i] or ()))
                continue
            vals = list(per_mb)
            if any(isinstance(v, tf.Tensor | tf.IndexedSlices) for v in vals):
                packed.append(StepOutput(vals, shared_indices=shared[i]))
            elif all(v is None for v in vals):
                packed.append(None)
            else:
                packed.append(vals)
        return tf.nest.pack_sequence_as(structure[0], packed)

    return call


# -- across processes (Note [tf cluster process model] in runtime/tf_cluster.py) ----------------


def _send_outputs(cluster: Any, tag: str, leaves: Any) -> None:
    """The driver's send of one step's outputs to every follower: now when the step ran eagerly,
    else as a ``py_function`` of the enclosing graph (run, like every stateful op of a
    ``tf.function``, in program order)."""
    flat = [t for t in tf.nest.flatten(leaves, expand_composites=True) if t is not None]
    if not flat:
        return
    if all(hasattr(t, "numpy") for t in flat) and tf.executing_eagerly():
        cluster.send_to_followers(tag, [t.numpy() for t in flat])
        return

    def send(*tensors: Any) -> Any:
        cluster.send_to_followers(tag, [t.numpy() for t in tensors])
        return tf.constant(0)

    tf.py_function(send, flat, Tout=tf.int32, name="mp_send_step_outputs")


def _follower_outputs(cluster: Any, tag: str, traced_fn: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    """A follower's step: the body traced (never run) for the outputs' structure, the values
    the driver sent."""
    from modelparallel.errors import CommunicationError

    struct = traced_fn.get_concrete_function(*args, **kwargs).structured_outputs
    flat = tf.nest.flatten(struct, expand_composites=True)
    where = [i for i, t in enumerate(flat) if t is not None]
    if not where:
        return struct

    def receive() -> list[Any]:
        arrays = cluster.recv(0, tag)
        if len(arrays) != len(where):
            raise CommunicationError(
                f"rank {cluster.rank} expected {len(where)} tensors of {tag!r} from rank 0 and "
                f"got {len(arrays)}; every rank must run the same script")
        return [tf.constant(a) for a in arrays]

    if tf.executing_eagerly():
        values = receive()
    else:
        values = tf.py_function(receive, [], Tout=[flat[i].dtype for i in where],
                                name="mp_recv_step_outputs")
        for v, i in zip(values, where, strict=True):
            v.set_shape(flat[i].shape)
    out = list(flat)
    for v, i in zip(values, where, strict=True):
        out[i] = v
    return tf.nest.pack_sequence_as(struct, out, expand_composites=True)
