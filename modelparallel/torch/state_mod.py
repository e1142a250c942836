"""The process-wide state of ``modelparallel.torch`` (SMP's ``state_mod.state``), ``smp.init``
and the rank queries.

``smp.state.cfg`` is the validated :class:`~modelparallel.torch.config.SMPConfig` (HF Trainer and
AWS's scripts read ``smp.state.cfg.fp16`` and the like). ``init`` validates the config on every
rank before any communication, joins torch.distributed from torchrun's environment (gloo on CPU,
NCCL on CUDA), checks the world size against the degrees, and creates the process groups of
every kind (pipeline, data-parallel, model-parallel, tensor-parallel, reduced data-parallel) on
every rank, in one order. A second ``init`` with the same config does nothing (HF calls it at
import time and scripts call it again).

Example:
    >>> type(state).__name__, callable(init)
    ('State', True)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.errors import ConfigError, UnsupportedFeatureError, UsageError
from modelparallel.runtime.distributed import init_distributed
from modelparallel.torch.config import SMPConfig, parse_config
from modelparallel.torch.ranks import Layout

__all__ = [
    "State",
    "dp_rank",
    "dp_size",
    "get_dp_group",
    "get_dp_process_group",
    "get_mp_group",
    "get_mp_process_group",
    "get_pp_group",
    "get_pp_process_group",
    "get_rdp_group",
    "get_rdp_process_group",
    "get_tp_group",
    "get_tp_process_group",
    "get_world_process_group",
    "init",
    "is_initialized",
    "is_tracing",
    "local_rank",
    "local_size",
    "mp_rank",
    "mp_size",
    "pp_rank",
    "pp_size",
    "rank",
    "rdp_rank",
    "rdp_size",
    "reset",
    "shutdown",
    "size",
    "state",
    "tp_rank",
    "tp_size",
]

#: Seconds a rank waits for another (setup, steps, object communication).
DEFAULT_TIMEOUT = float(os.environ.get("MODELPARALLEL_TIMEOUT", "300"))


@dataclass
class State:
    """What ``smp.init`` set up (``smp.state``).

    Attributes:
        cfg: The configuration (``None`` before ``init``).
        initialized: Whether ``init`` ran.
        layout: The rank layout.
        rank: This process's global rank.
        local_rank: Its rank on this node.
        local_size: Processes on this node.
        device: Its device (``cuda:<local_rank>`` with CUDA, else CPU).
        distributed: Whether torch.distributed runs (``False``: one process, no launcher).
        groups: Process groups of this rank by kind (``"pp"``, ``"dp"``, ``"mp"``, ``"tp"``,
            ``"rdp"``), ``None`` without torch.distributed.
        model: The :class:`~modelparallel.torch.model.DistributedModel` (one per script).
        optimizer: The :class:`~modelparallel.torch.optimizer.DistributedOptimizer`, if any.
        tracing: True while the model is traced (``smp.is_tracing()``).
        timeout: Seconds any wait on another rank may take.
        models: DistributedModels created so far in this process (the same on every rank).
    """

    cfg: SMPConfig | None = None
    initialized: bool = False
    layout: Layout | None = None
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    groups: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    optimizer: Any = None
    tracing: bool = False
    timeout: float = DEFAULT_TIMEOUT
    models: int = 0

    def require(self) -> Layout:
        """The layout; raises :class:`UsageError` before ``init``."""
        if not self.initialized or self.layout is None:
            raise UsageError("modelparallel.torch is not initialised: call smp.init() (or "
                             "smp.init(config)) first, on every rank")
        return self.layout


state = State()


def init(config: Any = None) -> None:
    """Initialise ``modelparallel.torch`` (SMP's ``smp.init``); call it on every rank first.

    Args:
        config: The SMP configuration: a dict, a JSON file path, or ``None``; values in the
            ``SM_HP_MP_PARAMETERS`` environment variable override it (Note [smp config
            sources] in ``modelparallel/torch/config.py``).

    Raises:
        ConfigError: for a bad config (every rank, before any communication), or a world size
            that the degrees do not divide.
        UnsupportedFeatureError: for more than one data-parallel replica while hybrid
            parallelism is not available.

    Example:
        >>> import modelparallel.torch as smp
        >>> smp.init({"partitions": 1})   # one process without torchrun
        >>> smp.size(), smp.pp_rank(), smp.state.cfg.microbatches
        (1, 0, 1)
        >>> smp.state_mod.shutdown()
    """
    cfg = parse_config(config)
    if state.initialized:
        if cfg == state.cfg:
            return
        if state.model is not None:
            raise UsageError("smp.init was called again with a different config after a "
                             "DistributedModel was created; call init once, before the model")
        _destroy_groups()
    device = _device()
    running = init_distributed(device, state.timeout)
    world = dist.get_world_size() if running else 1
    grank = dist.get_rank() if running else 0
    if not running and cfg.partitions > 1:
        raise ConfigError(f"partitions = {cfg.partitions} needs {cfg.partitions} processes; "
                          f"start the script with torchrun --nproc_per_node {cfg.partitions}")
    layout = Layout(world, cfg.partitions, cfg.tensor_parallel_degree, cfg.placement_strategy)
    if layout.dp > 1:
        if not cfg.ddp:
            raise ConfigError(
                f"{world} processes with partitions = {cfg.partitions} make {layout.dp} "
                "data-parallel replicas, which needs 'ddp': True; set it, or start "
                f"{cfg.partitions} processes")
        if not _hybrid_available():
            raise UnsupportedFeatureError(
                f"{layout.dp} data-parallel replicas of the pipeline (ddp with {world} "
                f"processes, partitions = {cfg.partitions}) are not supported yet; start "
                f"{cfg.partitions} processes (ddp with one replica works)")
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1" if not running else str(world)))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local_size > torch.cuda.device_count():
        raise ConfigError(f"The number of node-local processes {local_size} cannot be larger "
                          f"than the device count {torch.cuda.device_count()}; start at most "
                          "one process per GPU")
    state.cfg, state.layout, state.rank, state.device = cfg, layout, grank, device
    state.local_rank, state.local_size, state.distributed = local, local_size, running
    state.groups = _create_groups(layout, grank) if running else {}
    state.initialized = True


def reset() -> None:
    """Forget the model and optimizer so a second model can be wrapped (SMP's ``smp.reset``);
    the configuration and process groups stay."""
    if state.model is not None:
        state.model._close()
    state.model = None
    state.optimizer = None


def shutdown() -> None:
    """Undo ``init`` entirely (tests; the process groups of ``init`` are destroyed, a
    torch.distributed started by the user or torchrun stays)."""
    reset()
    _destroy_groups()
    state.cfg, state.layout, state.initialized = None, None, False
    state.timeout, state.models = DEFAULT_TIMEOUT, 0
    from modelparallel.torch.stepping import _META_CACHE

    _META_CACHE.clear()


def is_initialized() -> bool:
    """Whether ``smp.init`` ran in this process."""
    return state.initialized


def is_tracing() -> bool:
    """True while the model is being traced (the first step's partitioning)."""
    return state.tracing


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _hybrid_available() -> bool:
    import inspect

    from modelparallel import api

    return "data_parallel" in inspect.signature(api.pipeline).parameters


def _create_groups(layout: Layout, rank: int) -> dict[str, Any]:
    """Every group of every kind, created on every rank in one order; this rank's by kind."""
    made: dict[tuple[int, ...], Any] = {}
    mine: dict[str, Any] = {}
    timeout = timedelta(seconds=state.timeout)
    for kind in ("pp", "dp", "mp", "tp", "rdp"):
        for ranks in layout.groups(kind):
            key = tuple(sorted(ranks))
            if key not in made:
                made[key] = (dist.group.WORLD if len(key) == layout.world
                             else dist.new_group(list(key), timeout=timeout))
            if rank in ranks:
                mine[kind] = made[key]
    return mine


def _destroy_groups() -> None:
    for g in {id(g): g for g in state.groups.values()}.values():
        if g is not None and g is not dist.group.WORLD:
            try:
                dist.destroy_process_group(g)
            except (RuntimeError, ValueError, AssertionError) as e:  # already gone
                warnings.warn(f"could not destroy an smp process group: {e}", RuntimeWarning,
                              stacklevel=2)
    state.groups = {}


# -- rank queries (valid after init) ----------------------------------------------------------------


def rank() -> int:
    """This process's global rank."""
    state.require()
    return state.rank


def size() -> int:
    """Number of processes."""
    return state.require().world


def local_rank() -> int:
    """Rank on this node (pin the GPU with ``torch.cuda.set_device(smp.local_rank())``)."""
    state.require()
    return state.local_rank


def local_size() -> int:
    """Processes on this node."""
    state.require()
    return state.local_size


def pp_rank() -> int:
    """Pipeline stage of this rank."""
    return state.require().coords(state.rank).pp


def pp_size() -> int:
    """Pipeline degree (``partitions``)."""
    return state.require().pp


def tp_rank() -> int:
    """Tensor-parallel rank (always 0: no tensor parallelism)."""
    return state.require().coords(state.rank).tp


def tp_size() -> int:
    """Tensor-parallel degree."""
    return state.require().tp


def rdp_rank() -> int:
    """Reduced data-parallel rank."""
    return state.require().coords(state.rank).rdp


def rdp_size() -> int:
    """Reduced data-parallel degree."""
    return state.require().rdp


def dp_rank() -> int:
    """Data-parallel rank (shard data by it)."""
    return state.require().dp_rank(state.rank)


def dp_size() -> int:
    """Data-parallel degree."""
    return state.require().dp


def mp_rank() -> int:
    """Model-parallel rank (equals ``pp_rank`` without tensor parallelism)."""
    return state.require().mp_rank(state.rank)


def mp_size() -> int:
    """Model-parallel degree."""
    lay = state.require()
    return lay.pp * lay.tp


def get_pp_group() -> list[int]:
    """Global ranks of this rank's pipeline, by pipeline rank."""
    return state.require().pp_group(state.rank)


def get_dp_group() -> list[int]:
    """Global ranks holding this rank's stage, by dp rank."""
    return state.require().dp_group(state.rank)


def get_mp_group() -> list[int]:
    """Global ranks holding this rank's model replica, by mp rank."""
    return state.require().mp_group(state.rank)


def get_tp_group() -> list[int]:
    """Global ranks of this rank's tensor-parallel group."""
    return state.require().tp_group(state.rank)


def get_rdp_group() -> list[int]:
    """Global ranks of this rank's reduced data-parallel group."""
    return state.require().rdp_group(state.rank)


def _group(kind: str) -> Any:
    state.require()
    return state.groups.get(kind)


def get_world_process_group() -> Any:
    """torch's world process group (``None`` in a single process without torch.distributed)."""
    state.require()
    return dist.group.WORLD if state.distributed else None


def get_pp_process_group() -> Any:
    """The torch ProcessGroup of this rank's pipeline."""
    return _group("pp")


def get_dp_process_group() -> Any:
    """The torch ProcessGroup of this rank's data-parallel group."""
    return _group("dp")


def get_mp_process_group() -> Any:
    """The torch ProcessGroup of this rank's model-parallel group."""
    return _group("mp")


def get_tp_process_group() -> Any:
    """The torch ProcessGroup of this rank's tensor-parallel group."""
    return _group("tp")


def get_rdp_process_group() -> Any:
    """The torch ProcessGroup of this rank's reduced data-parallel group."""
    return _group("rdp")
