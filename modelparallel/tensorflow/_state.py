"""``smp.init``: the configuration (a dict, ``SM_HP_MP_PARAMETERS`` merged over it), the process's
ranks, and the state a step and the model share while a step is traced.

Note [tf process model]
~~~~~~~~~~~~~~~~~~~~~~~
One process drives every local device: stage ``k`` runs on the ``k``-th GPU (logical CPU devices
where there are none), and the pipeline is one TensorFlow graph (Note [op placement] in
``runtime/tf_pipeline.py``). That process is the whole model-parallel group, so ``size()``,
``mp_size()``, ``pp_size()`` and ``dp_size()`` are 1 and every rank is 0, and the step's outputs
are in that process. Across processes (``TF_CONFIG``, or the launcher's ``RANK``/``WORLD_SIZE``),
:func:`init` starts this process's TensorFlow server and rank 0 drives the cluster (Note [tf
cluster process model] in ``runtime/tf_cluster.py``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelparallel.errors import ConfigError

__all__ = ["TFConfig", "config", "init", "is_initialized"]

_KEYS = {"partitions", "pipeline_parallel_degree", "microbatches", "pipeline", "optimize",
         "auto_partition", "default_partition", "contiguous", "horovod", "memory_weight",
         "placement_strategy", "xla", "load_partition", "partition_file", "ddp",
         "granularity"}


@dataclass(frozen=True)
class TFConfig:
    """The SMP v1 TensorFlow configuration.

    Attributes:
        partitions: Pipeline stages.
        microbatches: Microbatches per step.
        pipeline: ``"interleaved"`` (1F1B) or ``"simple"`` (GPipe).
        optimize: ``"speed"`` or ``"memory"`` (selects ``memory_weight``'s default).
        memory_weight: The planner's weight of memory balance, in [0, 1].
        auto_partition: Plan with the ILP; if False, ops go to ``default_partition`` unless an
            ``smp.partition`` context places them.
        default_partition: Stage of ops outside any ``smp.partition`` context (manual mode).
        contiguous: Each stage a connected run of the graph (SMP's TF option).
        granularity: ``"layer"`` (SMP's rule: the ops of one Keras layer, and the ops reading
            one variable, share a stage) or ``"op"`` (single ops, on request: a layer may be
            cut, and a variable read on several stages is read across devices). Note [layer
            granularity] in ``partitioner/methods.py``.
        placement_strategy: ``"cluster"`` or ``"spread"`` (SMP's TF values). With one model
            replica (data parallelism is not supported yet here) both place the stages alike.
        load_partition: Read the plan from ``partition_file`` instead of planning (it must
            have been made for this model: its graph fingerprint is checked).
        partition_file: A plan file: read when ``load_partition``, else written by the
            driving process after planning.
    """

    partitions: int = 1
    microbatches: int = 1
    pipeline: str = "interleaved"
    optimize: str = "memory"
    memory_weight: float | None = None
    auto_partition: bool = True
    default_partition: int = 0
    contiguous: bool = True
    granularity: str = "layer"
    placement_strategy: str = "cluster"
    load_partition: bool = False
    partition_file: str | None = None

    def __post_init__(self) -> None:
        if self.placement_strategy not in ("cluster", "spread"):
            raise ConfigError(f"placement_strategy {self.placement_strategy!r} must be "
                              "'cluster' or 'spread' (SMP's TensorFlow values)")
        if not isinstance(self.load_partition, bool):
            raise ConfigError(f"load_partition = {self.load_partition!r} must be a bool")
        if self.partition_file is not None and not isinstance(self.partition_file, str):
            raise ConfigError(f"partition_file = {self.partition_file!r} must be a str")
        if self.load_partition and self.partition_file is None:
            raise ConfigError("load_partition = True needs partition_file (the plan file to "
                              "read); set partition_file, or drop load_partition to plan")
        if self.partitions < 1 or self.microbatches < 1:
            raise ConfigError(f"partitions ({self.partitions}) and microbatches "
                              f"({self.microbatches}) must be >= 1")
        if self.pipeline not in ("interleaved", "simple"):
            raise ConfigError(f"pipeline {self.pipeline!r} must be 'interleaved' or 'simple'")
        if self.optimize not in ("speed", "memory"):
            raise ConfigError(f"optimize {self.optimize!r} must be 'speed' or 'memory'")
        if self.granularity not in ("layer", "op"):
            raise ConfigError(f"granularity {self.granularity!r} must be 'layer' (the ops of "
                              "one Keras layer together, the default) or 'op'")
        if self.memory_weight is not None and not 0 <= self.memory_weight <= 1:
            raise ConfigError(f"memory_weight {self.memory_weight} must be in [0, 1]")
        if not 0 <= self.default_partition < self.partitions:
            raise ConfigError(f"default_partition {self.default_partition} must be in "
                              f"0..{self.partitions - 1}")


_LOCK = threading.Lock()
_CONFIG: TFConfig | None = None


def init(config: Mapping[str, Any] | str | None = None) -> TFConfig:
    """Read the configuration: ``config`` (a dict or a JSON file path), with the estimator's
    ``SM_HP_MP_PARAMETERS`` merged over it.

    Raises:
        ConfigError: for an unknown key, a bad value, or ``horovod: true`` (not supported yet).

    Example:
        >>> init({"partitions": 2, "microbatches": 4}).microbatches
        4
    """
    global _CONFIG
    cfg: dict[str, Any] = {}
    if isinstance(config, str):
        with open(config) as f:
            cfg.update(json.load(f))
    elif config is not None:
        cfg.update(config)
    env = os.environ.get("SM_HP_MP_PARAMETERS")
    if env:
        cfg.update(json.loads(env))
    unknown = set(cfg) - _KEYS
    if unknown:
        raise ConfigError(f"unknown SMP configuration keys {sorted(unknown)}; known: "
                          f"{sorted(_KEYS)}")
    if cfg.get("horovod") or cfg.get("ddp"):
        raise ConfigError("horovod/ddp (data parallelism) is not supported yet by "
                          "modelparallel.tensorflow; run one model replica")
    if cfg.get("xla"):
        raise ConfigError("xla: true is not supported yet by modelparallel.tensorflow (the "
                          "pipeline's ops are placed per stage, which XLA clustering would "
                          "undo); drop the key or set it to false")
    if "pipeline_parallel_degree" in cfg:
        cfg.setdefault("partitions", cfg["pipeline_parallel_degree"])
    fields = {k: cfg[k] for k in ("partitions", "microbatches", "pipeline", "optimize",
                                  "memory_weight", "auto_partition", "default_partition",
                                  "contiguous", "granularity", "placement_strategy",
                                  "load_partition", "partition_file") if k in cfg}
    with _LOCK:
        _CONFIG = TFConfig(**fields)
    _add_get_gradients()
    from modelparallel.runtime.tf_cluster import cluster_from_env, start_cluster

    cluster = cluster_from_env()
    if cluster is not None:
        start_cluster(cluster)
    return _CONFIG


def _add_get_gradients() -> None:
    """Give Keras 3 (and tf-keras) optimizers the legacy ``get_gradients(loss, params)`` SMP
    scripts call inside ``smp.step`` (``tf.gradients``, colocated with the forward ops: Note [op
    placement]); tf-keras is patched only when the script imported it."""
    import sys

    import tensorflow as tf

    def get_gradients(self: Any, loss: Any, params: Any) -> list[Any]:
        """The gradients of ``loss`` for ``params`` (the legacy Keras optimizer method)."""
        tf_params = [getattr(p, "value", p) if not isinstance(p, tf.Variable) else p
                     for p in params]
        return list(tf.gradients(loss, tf_params))

    bases = []
    for name, path in (("keras", "optimizers.Optimizer"), ("tf_keras", "optimizers.Optimizer")):
        module: Any = sys.modules.get(name)
        if module is None and name == "keras":
            try:
                import keras

                module = keras
            except ImportError:  # pragma: no cover - tf-keras only
                continue
        if module is None:
            continue
        base: Any = module
        for part in path.split("."):
            base = getattr(base, part, None)
        if base is not None:
            bases.append(base)
    for base in bases:
        if not hasattr(base, "get_gradients"):
            base.get_gradients = get_gradients


def is_initialized() -> bool:
    """Whether :func:`init` ran.

    Example:
        >>> isinstance(is_initialized(), bool)
        True
    """
    return _CONFIG is not None


def config() -> TFConfig:
    """The configuration of :func:`init`.

    Raises:
        ConfigError: if :func:`init` has not run.

    Example:
        >>> init({"partitions": 1}).partitions == config().partitions
        True
    """
    if _CONFIG is None:
        raise ConfigError("call smp.init() (with a config dict or SM_HP_MP_PARAMETERS) before "
                          "using modelparallel.tensorflow")
    return _CONFIG
