"""``smp.DistributedModel``: a Keras model whose ``call`` is traced, planned by the ILP on its first
call inside a step, and run with its ops placed on the stages (Note [op placement] in
``runtime/tf_pipeline.py``); plus ``smp.partition`` and post-partition hooks.

Subclass it and write ``call`` (SMP's way), or wrap any built Keras model:
``smp.DistributedModel(keras_model)``. It subclasses ``tf.keras.Model``, which is Keras 3, or
tf-keras when ``TF_USE_LEGACY_KERAS=1``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from modelparallel.errors import ConfigError, ModelParallelError
from modelparallel.tensorflow._contiguous import disconnected_stages as _disconnected_stages
from modelparallel.tensorflow._contiguous import make_contiguous

__all__ = ["DistributedModel", "StepRequiredError", "partition",
           "register_post_partition_hook"]


class StepRequiredError(ModelParallelError, RuntimeError):
    """An ``smp.DistributedModel`` was called outside an ``smp.step`` function."""


_HOOKS: list[Callable[[], Any]] = []
_LOCAL = threading.local()
_PARTITIONED = itertools.count()  # models partitioned in this process, in order (their tags)


def register_post_partition_hook(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` eagerly once, after the model is partitioned and before its first forward
    (e.g. to restore a checkpoint).

    Example:
        >>> @register_post_partition_hook
        ... def restore(): pass
        >>> _HOOKS.remove(restore)
    """
    _HOOKS.append(fn)
    return fn


@contextlib.contextmanager
def partition(index: int) -> Iterator[None]:
    """Place the ops created inside on stage ``index`` (manual partitioning; a pin for the ILP
    under auto-partitioning). The innermost context wins.

    Example:
        >>> with partition(0):
        ...     pass
    """
    record = getattr(_LOCAL, "record", None)
    if record is None:
        yield
        return
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    try:
        yield
    finally:
        for op in graph.get_operations()[before:]:
            record.setdefault(op.name, int(index))


def _device_spec(device: str, across_processes: bool = False) -> Any:
    """The cost model's device for the stages: an H100 for GPUs; for logical CPU devices, the
    CPU with a memcpy-fast link (they share one memory, so a boundary costs a copy); for CPUs of
    several processes, TensorFlow's gRPC hop (measured ~0.3 GB/s, ~1 ms on one host)."""
    import dataclasses

    from modelparallel.cost_model import get_device_spec

    if "GPU" in device:
        return get_device_spec("h100")
    if across_processes:
        return dataclasses.replace(get_device_spec("cpu"), name="cpu-grpc",
                                   link_bandwidth=3e8, link_latency=1e-3)
    return dataclasses.replace(get_device_spec("cpu"), name="cpu-logical",
                               link_bandwidth=1e11, link_latency=1e-6)


class DistributedModel(tf.keras.Model):  # type: ignore[misc,name-defined]
    """A Keras model partitioned into pipeline stages (SMP ``smp.DistributedModel``).

    Args:
        model: Optional: a built Keras model to wrap (its call becomes this model's call).

    Example:
        >>> import keras  # doctest: +SKIP
        >>> dm = DistributedModel(keras.Sequential([keras.layers.Dense(2)]))  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        inner = None
        if len(args) == 1 and isinstance(args[0], tf.keras.layers.Layer):
            inner, args = args[0], ()
        super().__init__(*args, **kwargs)
        self._mp_inner = inner
        object.__setattr__(self, "_mp_state", {})  # not tracked by Keras

    def call(self, *args: Any, **kwargs: Any) -> Any:
        if self._mp_inner is None:
            raise NotImplementedError("subclass smp.DistributedModel and implement call(), "
                                      "or wrap a model: smp.DistributedModel(keras_model)")
        return self._mp_inner(*args, **kwargs)

    # -- partitioning --------------------------------------------------------------------------

    @property
    def plan(self) -> Any:
        """The plan, once the first step call partitioned the model (else None)."""
        return self._mp_state.get("plan")

    def _partition(self, args: tuple[Any, ...], kwargs: dict[str, Any], m: int) -> None:
        from modelparallel.partitioner import partition as plan_graph
        from modelparallel.plan import PlanConfig
        from modelparallel.runtime.tf_cluster import current_cluster
        from modelparallel.runtime.tf_pipeline import stage_devices
        from modelparallel.tensorflow._state import config
        from modelparallel.tracer.tf_capture import trace_keras

        cfg = config()
        specs = tuple(tf.TensorSpec(a.shape, a.dtype) for a in args)
        manual: dict[str, int] = {}
        with tf.init_scope():
            _LOCAL.capturing, _LOCAL.record = True, manual
            try:
                traced = trace_keras(self, specs, call_kwargs=kwargs,
                                     name=type(self).__name__)
            finally:
                _LOCAL.capturing, _LOCAL.record = False, None
            graph = traced.graph
            p = cfg.partitions
            cluster = current_cluster()
            tag = f"weights/{next(_PARTITIONED)}"
            if cluster is not None and cluster.rank != 0:
                # A follower's replica (Note [tf cluster process model]): the driver's weights.
                self._mp_state.update(traced=traced, plan=None, devices=[], follower=True)
                for hook in list(_HOOKS):
                    hook()
                self.set_weights(cluster.recv(0, tag))
                return
            names = {n.name for n in graph}
            pins = {k: v for k, v in manual.items() if k in names}
            if not cfg.auto_partition:
                pins = {n.name: pins.get(n.name, cfg.default_partition) for n in graph
                        if n.op.value == "call_function"}
            for stage in pins.values():
                if not 0 <= stage < p:
                    raise ConfigError(f"smp.partition({stage}) is outside 0..{p - 1}")
            devices = cluster.stage_devices(p) if cluster is not None else stage_devices(p)
            kind = _device_spec(devices[0], across_processes=cluster is not None)
            options: dict[str, Any] = {"memory_weight": cfg.memory_weight}
            if cfg.memory_weight is None:
                options = {}
            plan_cfg = PlanConfig(  # Note [layer granularity] in partitioner/methods.py
                partitions=p, microbatches=m, granularity=cfg.granularity, pins=pins,
                tied="colocate" if cfg.granularity == "layer" else "replicate",
                schedule="simple" if cfg.pipeline == "simple" else "interleaved", **options)
            samples = int(specs[0].shape[0] or 1) if specs and specs[0].shape.rank else 1
            if cfg.load_partition and cfg.partition_file:
                plan = _load_partition(cfg.partition_file, graph, p)
            else:
                plan = plan_graph(graph, plan_cfg, kind, samples_per_microbatch=samples)
                if cfg.contiguous:  # Note [contiguous stages] in tensorflow/_contiguous.py
                    plan = _contiguous_plan(graph, plan, lambda c: plan_graph(
                        graph, c, kind, samples_per_microbatch=samples), frozenset(pins))
                if cfg.partition_file:
                    plan.save(cfg.partition_file)
            self._mp_state.update(traced=traced, plan=plan, devices=devices)
            for hook in list(_HOOKS):
                hook()
            if cluster is not None:
                cluster.send_to_followers(tag, self.get_weights())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(_LOCAL, "capturing", False):
            return super().__call__(*args, **kwargs)
        from modelparallel.runtime.tf_pipeline import OpPlacer, plan_stages, run_placed
        from modelparallel.tensorflow.step import current_step

        ctx = current_step()
        if ctx is None:
            raise StepRequiredError(
                f"{type(self).__name__} is an smp.DistributedModel: call it inside an "
                "@smp.step function (its body runs once per microbatch), not directly")
        args = tuple(tf.convert_to_tensor(a) if not isinstance(a, tf.Tensor) else a
                     for a in args)
        if "traced" not in self._mp_state:
            self._partition(args, kwargs, ctx.microbatches)
        if self._mp_state.get("follower"):  # traced for the outputs' structure, never run
            ctx.calls.append(None)
            return super().__call__(*args, **kwargs)
        traced, plan = self._mp_state["traced"], self._mp_state["plan"]
        ctx.devices = self._mp_state["devices"]
        placer = OpPlacer(traced, plan_stages(plan), ctx.devices)
        graph = tf.compat.v1.get_default_graph()
        start = len(graph.get_operations())
        out = run_placed(placer, lambda: super(DistributedModel, self).__call__(*args, **kwargs))
        ctx.recorder.model_call(start, len(graph.get_operations()))
        ctx.calls.append(placer)
        return out

    def _serve_specs(self) -> list[Any] | None:
        """The traced inputs' specs with any batch size (None before the first step)."""
        traced = self._mp_state.get("traced")
        if traced is None:
            return None
        return [tf.TensorSpec((None, *n.outputs[0].shape[1:]), n.outputs[0].dtype)
                for n in traced.graph.placeholders]

    def _serve_unplaced(self, *xs: Any) -> Any:
        """The whole model's inference call, unplaced (what a SavedModel serves)."""
        capturing = getattr(_LOCAL, "capturing", False)
        _LOCAL.capturing = True
        try:
            return self(*xs, training=False)
        finally:
            _LOCAL.capturing = capturing

    @property
    def _default_save_signature(self) -> Any:
        """Keras 3's SavedModel walk traces this signature; Keras's own one is specced from
        ``self.inputs``, which a subclass model lacks: give it the traced inputs'."""
        specs = self._serve_specs()
        if specs is None or not _is_keras3(self):
            return None
        return tf.function(self._serve_unplaced, input_signature=specs, autograph=False)

    def save_model(self, save_path: str = "/opt/ml/model") -> str:
        """Write the whole, unpartitioned model as a SavedModel at ``save_path`` (SMP's
        ``save_model``): the variables and a ``serve`` signature (also ``serving_default``)
        taking the traced inputs with any batch size, loadable without modelparallel by
        ``tf.saved_model.load(path).serve(x)``. Keras 3 models are written with Keras's
        ``ExportArchive`` (``tf.saved_model.save`` of a Keras 3 model traces Keras's own
        signature with unknown input shapes and fails); tf-keras models with
        ``tf.saved_model.save``.

        Raises:
            ConfigError: before the first ``smp.step`` call (the input shapes are unknown).

        Example:
            >>> model.save_model("/tmp/model")  # doctest: +SKIP
        """
        specs = self._serve_specs()
        if specs is None:
            raise ConfigError("save_model needs the model's input shapes: call it after "
                              "the first smp.step")
        serve = self._serve_unplaced
        from modelparallel.tensorflow.comm import rank

        if rank() != 0:  # the other ranks' models are replicas of rank 0's
            return save_path
        _LOCAL.capturing = True  # the export traces the plain, unplaced call
        try:
            if _is_keras3(self):
                from keras.export import ExportArchive

                archive = ExportArchive()
                archive.track(self)
                archive.add_endpoint("serve", serve, input_signature=specs)
                archive.write_out(save_path, verbose=False)
            else:
                fn = tf.function(serve, input_signature=specs, autograph=False)
                module = tf.Module()
                module.model, module.serve = self, fn
                tf.saved_model.save(module, save_path, signatures=fn.get_concrete_function())
        finally:
            _LOCAL.capturing = False
        return save_path


def _load_partition(path: str, graph: Any, partitions: int) -> Any:
    """The plan of ``partition_file`` for ``graph`` (``load_partition``), checked against the
    model's trace and the configured ``partitions``."""
    from modelparallel.plan import load_plan

    plan = load_plan(path, graph)
    if plan.config.partitions != partitions:
        raise ConfigError(f"partition_file {path!r} holds a plan of {plan.config.partitions} "
                          f"stages but partitions = {partitions}; set partitions to "
                          f"{plan.config.partitions}, or drop load_partition to plan again")
    return plan


def _contiguous_plan(graph: Any, plan: Any, replan: Callable[[Any], Any],
                     pinned: frozenset[str]) -> Any:
    """``plan`` with every stage one connected piece where a repair can make it so (Note
    [contiguous stages]), re-planned with every node pinned; a warning names what stays
    disconnected."""
    import dataclasses

    if not _disconnected_stages(graph, plan.assignment):
        return plan
    fixed = make_contiguous(graph, plan.assignment, pinned)
    if fixed != dict(plan.assignment):
        pins = {n.name: fixed[n.name] for n in graph
                if n.op.value == "call_function" and fixed.get(n.name, -1) >= 0}
        plan = replan(dataclasses.replace(plan.config, pins=pins))
    split = _disconnected_stages(graph, plan.assignment)
    if split:
        warnings.warn(
            f"contiguous=True asks for every stage to be one connected subgraph (SMP's TF "
            f"rule), but the plan's stages {sorted(split)} fall into "
            f"{[split[k] for k in sorted(split)]} disconnected pieces that no move to a "
            "neighbouring stage joins (a piece holds a smp.partition pin, or moving it would "
            "send values backwards); training is still exact. Pin the branches with "
            "smp.partition, or set contiguous=False to accept such stages silently",
            UserWarning, stacklevel=4)
    return plan


def _is_keras3(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 model (not tf-keras)."""
    try:
        import keras
    except ImportError:  # pragma: no cover - tf-keras only
        return False
    return int(keras.__version__.split(".")[0]) >= 3 and isinstance(model, keras.Model)
