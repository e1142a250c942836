"""A Keras model trained as a pipeline on TensorFlow's own runtime: one process, one device per
stage (GPUs, or logical CPU devices), the microbatch loop inside one ``tf.function``.

Note [op placement]
~~~~~~~~~~~~~~~~~~~
The plan assigns IR nodes to stages; the capture (Note [keras capture] in
``tracer/tf_capture.py``) says which IR node owns the ``k``-th non-placeholder op the model's call
creates. A later call of the same model, on a microbatch of the same shapes, creates the same ops
in the same order, so a device function counting ops places op ``k`` on the device of its owner's
stage; a different op type at some position, or a different count, raises :class:`TracingError`
rather than placing ops wrongly. Input-derived nodes (stage ``-1``: positions, shapes) go to stage
0. Ops outside the model's call (the loss, metrics) run on the last stage, SMP's "outside the
model runs everywhere" in one process.

Gradients are taken with ``tf.gradients``, which colocates each gradient op with its forward op, so
the backward of a stage runs on that stage's device (a plain ``GradientTape`` inside a
``tf.function`` would put every backward op on one device; :func:`tape_as_gradients` turns the
tape's ``gradient`` into ``tf.gradients`` while a step is traced).

Note [schedule dependencies]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
TensorFlow runs a graph as dataflow: stages overlap through inter-op threads with no code of
ours. The schedule (GPipe or 1F1B, SMP's ``simple``/``interleaved``) is imposed with control
dependencies: on each stage, the ops of one action (microbatch ``m``'s forward ops on that device,
or the ops created after its forward, i.e. its loss and backward, on that device) wait for a
``NoOp`` that waits for the previous action's ops. The schedule only orders work (and so bounds the
activations alive); the values, and so the gradients, are the same under every schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from modelparallel.errors import ConfigError, TracingError
from modelparallel.plan import Plan
from modelparallel.schedule import make_schedule
from modelparallel.tracer.tf_capture import TFTraced

__all__ = ["OpPlacer", "ScheduleRecorder", "stage_devices", "tape_as_gradients"]


def stage_devices(partitions: int, kind: str | None = None) -> list[str]:
    """One device name per stage: the GPUs if there are enough, else logical CPU devices.

    Raises:
        ConfigError: if fewer devices of the kind are visible than stages (configure logical CPU
            devices with ``tf.config.set_logical_device_configuration`` before TensorFlow starts).

    Example:
        >>> stage_devices(1)  # doctest: +SKIP
        ['/device:CPU:0']
    """
    kinds = [kind] if kind else ["GPU", "CPU"]
    for k in kinds:
        devs = tf.config.list_logical_devices(k)
        if len(devs) >= partitions:
            return [d.name for d in devs[:partitions]]
    raise ConfigError(
        f"{partitions} stages need {partitions} devices, but TensorFlow sees "
        f"{len(tf.config.list_logical_devices('GPU'))} GPUs and "
        f"{len(tf.config.list_logical_devices('CPU'))} CPU devices; start fewer partitions or "
        "split the CPU with tf.config.set_logical_device_configuration before TensorFlow starts")


@dataclass
class OpPlacer:
    """The device function of one model call (Note [op placement]).

    Attributes:
        traced: The capture of the model.
        stage_of: IR node name -> stage.
        devices: Device name per stage.
    """

    traced: TFTraced
    stage_of: dict[str, int]
    devices: Sequence[str]
    count: int = 0
    stages_used: list[int] = field(default_factory=list)

    def __call__(self, op: Any) -> str:
        if op.type == "Placeholder":
            return ""
        k = self.count
        self.count += 1
        owners, types = self.traced.op_owners, self.traced.op_types
        if k >= len(owners) or types[k] != op.type:
            want = types[k] if k < len(types) else "no op"
            raise TracingError(
                f"the model's call created op #{k} of type {op.type!r} where the traced call "
                f"created {want}; the model must create the same ops on every call (no Python "
                "branch on values that change between calls, same input shapes and call "
                "arguments as the first call)")
        owner = owners[k]
        stage = max(self.stage_of.get(owner, 0), 0) if owner else len(self.devices) - 1
        self.stages_used.append(stage)
        return self.devices[stage]

    def check_done(self) -> None:
        """Raise unless the call created exactly the traced ops."""
        if self.count != len(self.traced.op_owners):
            raise TracingError(
                f"the model's call created {self.count} ops where the traced call created "
                f"{len(self.traced.op_owners)}; call the model the same way on every microbatch")


def plan_stages(plan: Plan) -> dict[str, int]:
    """IR node name -> stage of ``plan``.

    Example:
        >>> plan_stages  # doctest: +SKIP
    """
    return dict(plan.assignment)


@contextlib.contextmanager
def tape_as_gradients() -> Iterator[None]:
    """While a step is traced, ``tf.GradientTape.gradient`` is ``tf.gradients`` (colocated with
    the forward ops, Note [op placement]); Keras 3 variables are read through their
    ``tf.Variable``.

    Example:
        >>> with tape_as_gradients():  # doctest: +SKIP
        ...     pass
    """
    original = tf.GradientTape.gradient

    def gradient(self: Any, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE) -> Any:
        flat = tf.nest.flatten(sources)
        tf_sources = [getattr(s, "value", s) if not isinstance(s, tf.Variable | tf.Tensor)
                      else s for s in flat]
        grads = tf.gradients(tf.nest.flatten(target), tf_sources,
                             grad_ys=(tf.nest.flatten(output_gradients)
                                      if output_gradients is not None else None),
                             unconnected_gradients=unconnected_gradients)
        return tf.nest.pack_sequence_as(sources, grads)

    tf.GradientTape.gradient = gradient  # type: ignore[method-assign]
    try:
        yield
    finally:
        tf.GradientTape.gradient = original  # type: ignore[method-assign]


@dataclass
class ScheduleRecorder:
    """The op spans of each microbatch while a step is traced, and the schedule's control
    dependencies added at the end (Note [schedule dependencies]).

    Attributes:
        schedule: ``"gpipe"``/``"simple"`` or ``"1f1b"``/``"interleaved"``.
        devices: Device name per stage.
    """

    schedule: str
    devices: Sequence[str]
    forward: list[tuple[int, int]] = field(default_factory=list)
    body: list[tuple[int, int]] = field(default_factory=list)

    @staticmethod
    def _ops() -> list[Any]:
        return tf.compat.v1.get_default_graph().get_operations()

    def start_microbatch(self) -> None:
        """Mark the start of one microbatch's body."""
        n = len(self._ops())
        self.body.append((n, n))
        self.forward.append((n, n))

    def model_call(self, start: int, end: int) -> None:
        """Record the ops of the current microbatch's model call."""
        self.forward[-1] = (start, end)

    def end_microbatch(self) -> None:
        """Mark the end of one microbatch's body."""
        self.body[-1] = (self.body[-1][0], len(self._ops()))

    def apply(self) -> None:
        """Add the control dependencies of the schedule over the recorded microbatches."""
        m, p = len(self.body), len(self.devices)
        if m < 2 or p < 2:
            return
        ops = self._ops()
        device_stage = {tf.DeviceSpec.from_string(d).to_string(): s
                        for s, d in enumerate(self.devices)}

        def stage_of(op: Any) -> int | None:
            if not op.device:
                return None
            return device_stage.get(tf.DeviceSpec.from_string(op.device).to_string())

        groups: dict[tuple[str, int, int], list[Any]] = {}
        for mb in range(m):
            f0, f1 = self.forward[mb]
            b0, b1 = self.body[mb]
            for i in range(b0, b1):
                op = ops[i]
                s = stage_of(op)
                if s is None or op.type in ("Placeholder", "Const"):
                    continue
                kind = "F" if f0 <= i < f1 else ("B" if i >= f1 else None)
                if kind is not None:
                    groups.setdefault((kind, s, mb), []).append(op)
        sched = make_schedule(self.schedule, p, m)
        for s, actions in enumerate(sched.actions):
            prev: list[Any] = []
            for act in actions:
                kind = "B" if act.kind in ("B", "I", "W") else "F"
                group = groups.get((kind, s, act.microbatch), [])
                if not group:
                    continue
                if prev:
                    with tf.device(self.devices[s]), tf.control_dependencies(prev):
                        done = tf.no_op(name=f"after_{kind}{act.microbatch}_s{s}")
                    for op in group:
                        op._add_control_input(done)
                prev = group


def split_batch(value: Any, microbatches: int, axis: int, name: str) -> list[Any]:
    """``value`` cut into ``microbatches`` equal pieces along ``axis``.

    Raises:
        ConfigError: if the size along ``axis`` is known and not divisible.

    Example:
        >>> [t.shape[0] for t in split_batch(tf.zeros((4, 2)), 2, 0, "x")]  # doctest: +SKIP
        [2, 2]
    """
    size = value.shape[axis] if value.shape.rank else None
    if size is not None and size % microbatches:
        raise ConfigError(
            f"input {name!r} has {size} samples along axis {axis}, which does not split into "
            f"{microbatches} equal microbatches; make the batch a multiple of {microbatches} "
            "(drop_remainder=True) or name it in non_split_inputs")
    if microbatches == 1:
        return [tf.identity(value, name="mp_split")]
    return list(tf.split(value, microbatches, axis=axis, name="mp_split"))


def run_placed(placer: OpPlacer, call: Callable[[], Any]) -> Any:
    """Run ``call`` (the model's call), then place the ops it created by ``placer``, before
    anything (gradients) colocates with them."""
    graph = tf.compat.v1.get_default_graph()
    start = len(graph.get_operations())
    out = call()
    for op in graph.get_operations()[start:]:
        device = placer(op)
        if device:
            op._set_device(device)
    placer.check_done()
    return out
