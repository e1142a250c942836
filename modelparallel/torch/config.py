"""SMP v1's configuration (the ``parameters`` dict of ``smp.init``), validated.

Every key of SMP v1's table (``shared/reference/smp-v1-reference.md`` §2) is accepted. Keys whose
feature modelparallel implements reach the planner and runtime; keys whose feature it does not
implement (tensor parallelism, sharded data parallelism...) are
accepted at their default and refused with a :class:`ConfigError` naming the key when set to
anything else, so a script never runs without a feature it asked for. Undocumented keys that
AWS's example scripts pass (``static_mode``, ``fast_mode``...) are accepted and ignored; any other
key is refused with the closest known names.

Note [smp config sources]
~~~~~~~~~~~~~~~~~~~~~~~~~
SMP's rule: ``smp.init(config)`` merges the ``SM_HP_MP_PARAMETERS`` environment variable (JSON,
what SageMaker sets from the estimator) *over* the script's dict, so values set at launch win.
``parameters`` may also be a path to a JSON file (the SDK loaded it; we do too). Validation runs
on every rank before any communication, so a bad value fails every rank with the same message.

Example:
    >>> cfg = parse_config({"partitions": 2, "microbatches": 4}, env={})
    >>> cfg.partitions, cfg.pipeline, cfg.memory_weight, cfg.active_microbatches
    (2, 'interleaved', 0.8, 4)
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from modelparallel.errors import ConfigError

__all__ = ["ENV_VAR", "IGNORED_KEYS", "SMPConfig", "UNSUPPORTED_KEYS", "parse_config"]

ENV_VAR = "SM_HP_MP_PARAMETERS"

#: Undocumented keys of AWS's GPT/GPT-J example scripts: accepted, ignored.
IGNORED_KEYS = ("static_mode", "fast_mode", "_match_weights", "_fp32_grad_accumulation",
                "checkpoint_attentions")

#: Keys accepted only at their default value, with why.
UNSUPPORTED_KEYS = {
    "tensor_parallel_degree": "tensor parallelism is not implemented",
    "fp16_params": "tensor-parallel fp16 parameters are not implemented",
    "prescaled_batch": "prescaled batches only apply to tensor parallelism, which is not "
                       "implemented",
    "sharded_data_parallel_degree": "sharded data parallelism is not implemented",
    "sdp_reduce_bucket_size": "sharded data parallelism is not implemented",
    "sdp_param_persistence_threshold": "sharded data parallelism is not implemented",
    "sdp_max_live_parameters": "sharded data parallelism is not implemented",
    "sdp_hierarchical_allgather": "sharded data parallelism is not implemented",
    "sdp_gradient_clipping": "sharded data parallelism is not implemented",
    "horovod": "horovod is SMP's TensorFlow option; PyTorch scripts use ddp",
    "contiguous": "stages are always contiguous in modelparallel (SMP's TensorFlow option)",
}

_ALIASES = {"pipeline_parallel_degree": "partitions"}
_PIPELINES = ("interleaved", "simple")
_OPTIMIZE = ("speed", "memory")
_PLACEMENTS = ("cluster", "spread")


@dataclass(frozen=True)
class SMPConfig:
    """A validated SMP v1 configuration (``smp.state.cfg``). Field docs: the reference's §2.

    Attributes:
        partitions: Pipeline stages (``pipeline_parallel_degree`` is an alias).
        microbatches: Microbatches per step.
        pipeline: ``"interleaved"`` (1F1B) or ``"simple"`` (GPipe).
        optimize: ``"speed"`` or ``"memory"`` (the planner's objective, memory_weight default).
        placement_strategy: ``"cluster"``, ``"spread"`` or a permutation of ``"DPT"``.
        auto_partition: Partition automatically (manual placements become pins).
        default_partition: Partition of modules outside ``smp.partition`` (manual mode);
            ``None`` when not given (then 0).
        load_partition: Load the partition decision from ``partition_file``.
        partition_file: A plan file: read when ``load_partition``, else written after
            partitioning.
        memory_weight: Memory-balance weight in [0, 1]; default 0.2 (speed) / 0.8 (memory).
        ddp: Hybrid data parallelism over replicas of the pipeline.
        ddp_port: Port for the DDP groups (needs ``ddp``; torchrun's rendezvous is used).
        ddp_dist_backend: ``"auto"`` or ``"nccl"``.
        active_microbatches: Most microbatches in flight per stage; default ``partitions + 2``.
        deterministic_server: Accepted; our schedules are always deterministic.
        activation_loading_horizon: Accepted (only meaningful with offloading).
        skip_tracing: Accepted: our trace runs on fake tensors and never needs device memory.
        offload_activations: Keep saved activations in host memory between forward and
            backward (the planner prices it, the runtime does it).
        delayed_parameter_initialization: Build the model's parameters lazily (see
            :func:`modelparallel.torch.delay_param_initialization`).
        fp16: Every stage's forward under fp16 autocast, fp32 parameters and gradients (the
            master weights), dynamic loss scaling agreed over the job (Note [smp fp16] in
            ``modelparallel/torch/fp16.py``); needs ``smp.DistributedOptimizer``.
        bf16: Every stage's forward under bf16 autocast, fp32 parameters and gradients.
        shard_optimizer_state: ZeRO-1: each stage's data-parallel replicas split its optimizer
            state (``torch.distributed.optim.ZeroRedundancyOptimizer``); partial optimizer
            checkpoints are then one file per rank, ``_{pp}_{tp}_{rdp}``.
        tensor_parallel_degree, fp16_params, prescaled_batch,
        sharded_data_parallel_degree, sdp_*, horovod, contiguous:
            Accepted at their defaults only (:data:`UNSUPPORTED_KEYS`).
        ignored: The undocumented keys given (:data:`IGNORED_KEYS`), kept for introspection.
    """

    partitions: int
    microbatches: int = 1
    pipeline: str = "interleaved"
    optimize: str = "memory"
    placement_strategy: str = "cluster"
    auto_partition: bool = True
    default_partition: int | None = None
    load_partition: bool = False
    partition_file: str | None = None
    memory_weight: float | None = None
    ddp: bool = False
    ddp_port: int | None = None
    ddp_dist_backend: str = "auto"
    active_microbatches: int | None = None
    deterministic_server: bool = False
    activation_loading_horizon: int = 4
    skip_tracing: bool = False
    delayed_parameter_initialization: bool = False
    tensor_parallel_degree: int = 1
    fp16: bool = False
    fp16_params: bool = False
    bf16: bool = False
    shard_optimizer_state: bool = False
    prescaled_batch: bool = False
    sharded_data_parallel_degree: int = 1
    sdp_reduce_bucket_size: int = 500_000_000
    sdp_param_persistence_threshold: int = 1_000_000
    sdp_max_live_parameters: int = 1_000_000_000
    sdp_hierarchical_allgather: bool = True
    sdp_gradient_clipping: float = 1.0
    offload_activations: bool = False
    horovod: bool = False
    contiguous: bool = True
    ignored: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("partitions", self.partitions)
        _positive_int("microbatches", self.microbatches)
        if self.pipeline == "_only_forward":
            raise ConfigError("pipeline = '_only_forward' is not supported; use 'interleaved' "
                              "or 'simple' and run evaluation steps under torch.no_grad()")
        _choice("pipeline", self.pipeline, _PIPELINES)
        _choice("optimize", self.optimize, _OPTIMIZE)
        ps = self.placement_strategy
        if not isinstance(ps, str) or (ps not in _PLACEMENTS and sorted(ps) != ["D", "P", "T"]):
            raise ConfigError(f"placement_strategy = {ps!r}; use 'cluster', 'spread' or a "
                              "permutation of 'DPT' such as 'DPT' or 'PDT'")
        for key in ("auto_partition", "load_partition", "ddp", "deterministic_server",
                    "skip_tracing", "delayed_parameter_initialization", "offload_activations",
                    "fp16", "bf16", "shard_optimizer_state"):
            _bool(key, getattr(self, key))
        if self.default_partition is not None:
            _int(self.default_partition, "default_partition")
            if not 0 <= self.default_partition < self.partitions:
                raise ConfigError(f"default_partition = {self.default_partition} must be >= 0 "
                                  f"and < partitions = {self.partitions}")
        elif not self.auto_partition:
            raise ConfigError("auto_partition = False needs default_partition (the partition "
                              "of modules outside any smp.partition context); add "
                              "'default_partition': 0")
        if self.partition_file is not None and not isinstance(self.partition_file, str):
            raise ConfigError(f"partition_file = {self.partition_file!r} must be a str")
        if self.load_partition and self.partition_file is None:
            raise ConfigError("load_partition = True needs partition_file (the plan file to "
                              "load)")
        if self.memory_weight is None:
            object.__setattr__(self, "memory_weight", 0.2 if self.optimize == "speed" else 0.8)
        elif (isinstance(self.memory_weight, bool)
              or not isinstance(self.memory_weight, (int, float))
              or not 0.0 <= float(self.memory_weight) <= 1.0):
            raise ConfigError(f"memory_weight = {self.memory_weight!r} must be a number in "
                              "[0, 1]")
        object.__setattr__(self, "memory_weight", float(self.memory_weight))  # type: ignore[arg-type]
        if self.ddp_port is not None:
            _int(self.ddp_port, "ddp_port")
            if not self.ddp:
                raise ConfigError("ddp_port is only valid together with ddp = True; remove it "
                                  "or set 'ddp': True")
        _choice("ddp_dist_backend", self.ddp_dist_backend, ("auto", "nccl"))
        if self.active_microbatches is None:
            object.__setattr__(self, "active_microbatches", self.partitions + 2)
        _positive_int("active_microbatches", self.active_microbatches)
        _positive_int("activation_loading_horizon", self.activation_loading_horizon)
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16 are both True; choose one")
        defaults = {f.name: f.default for f in fields(SMPConfig)}
        for key, why in UNSUPPORTED_KEYS.items():
            value = getattr(self, key)
            if value != defaults[key] or type(value) is not type(defaults[key]):
                raise ConfigError(f"{key} = {value!r} is not supported by modelparallel.torch "
                                  f"({why}); remove the key or set it to its default "
                                  f"{defaults[key]!r}")
        object.__setattr__(self, "ignored", dict(self.ignored))

    @property
    def pipeline_parallel_degree(self) -> int:
        """SMP's other name of ``partitions``."""
        return self.partitions

    @property
    def precision(self) -> str:
        """The runtime's precision: ``"fp16"``, ``"bf16"`` or ``"fp32"``."""
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"

    @property
    def schedule(self) -> str:
        """The runtime's schedule name of ``pipeline``."""
        return "1f1b" if self.pipeline == "interleaved" else "gpipe"

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (JSON-able)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ignored"}
        out.update(self.ignored)
        return out


def parse_config(config: Mapping[str, Any] | str | os.PathLike[str] | None = None, *,
                 env: Mapping[str, str] | None = None) -> SMPConfig:
    """Validate an SMP configuration, with ``SM_HP_MP_PARAMETERS`` merged over it (Note [smp
    config sources]).

    Args:
        config: The script's dict, a path to a JSON file, or ``None``.
        env: The environment to read ``SM_HP_MP_PARAMETERS`` from (default ``os.environ``).

    Raises:
        ConfigError: for an unknown key (with the closest known names), a value of the wrong
            type or range, a missing ``partitions``, or a non-default value of a key whose
            feature is not implemented.

    Example:
        >>> parse_config({"partitions": 2}, env={"SM_HP_MP_PARAMETERS": '{"microbatches": 4}'}
        ...              ).microbatches
        4
        >>> parse_config({"partitions": 2, "tensor_parallel_degree": 2}, env={})
        Traceback (most recent call last):
        ...
        modelparallel.errors.ConfigError: tensor_parallel_degree = 2 is not supported ...
    """
    merged: dict[str, Any] = {}
    merged.update(_load(config, "the config given to smp.init"))
    environ = os.environ if env is None else env
    if environ.get(ENV_VAR):
        merged.update(_load(environ[ENV_VAR], f"the {ENV_VAR} environment variable",
                            text=True))
    known = {f.name for f in fields(SMPConfig)} - {"ignored"}
    values: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in merged.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a str")
        name = _ALIASES.get(key, key)
        if name in IGNORED_KEYS:
            ignored[name] = value
        elif name in known:
            if name in values and values[name] != value:
                raise ConfigError(f"partitions and pipeline_parallel_degree are both given, "
                                  f"with different values ({values[name]} and {value}); "
                                  "give one")
            values[name] = value
        else:
            close = difflib.get_close_matches(key, sorted(known | set(_ALIASES)), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown SMP config key {key!r}{hint} (the keys: "
                              "shared/reference/smp-v1-reference.md §2, docs/smp.md)")
    if "partitions" not in values:
        raise ConfigError("the SMP config needs 'partitions' (or 'pipeline_parallel_degree'): "
                          "the number of pipeline stages, e.g. smp.init({'partitions': 2})")
    return SMPConfig(**values, ignored=ignored)


def _load(source: Any, what: str, *, text: bool = False) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, os.PathLike)):
        raw = str(source)
        if text or raw.lstrip().startswith("{"):
            body = raw
        else:
            try:
                body = Path(raw).read_text()
            except OSError as e:
                raise ConfigError(f"{what} names the file {raw!r}, which cannot be read: "
                                  f"{e.strerror}") from None
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}); give a "
                              "JSON object such as {\"partitions\": 2}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{what} must be a JSON object, not {type(data).__name__}")
        return data
    raise ConfigError(f"{what} must be a dict, a JSON file path or None, not "
                      f"{type(source).__name__}")


def _int(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} = {value!r} must be an int")


def _positive_int(key: str, value: Any) -> None:
    _int(value, key)
    if value < 1:
        raise ConfigError(f"{key} = {value} must be a positive int")


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r} must be a bool (true or false)")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}; use one of {', '.join(map(repr, choices))}")
