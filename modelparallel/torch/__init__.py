"""SMP v1's PyTorch API on modelparallel's planner and runtime: ``import modelparallel.torch as smp``.

A script written for SageMaker's ``smdistributed.modelparallel.torch`` runs with its import
changed (docs/smp.md): ``smp.init()``, ``@smp.step``, ``smp.DistributedModel``,
``model.backward(loss)``, ``loss.reduce_mean()``, ``smp.DistributedOptimizer``, the rank and group
queries, object communication, manual placement and ``smp.save``/``smp.load``. It is a thin layer:
the model is traced, planned by the ILP and run by :func:`modelparallel.pipeline`'s executor
(Note [smp step] in ``modelparallel/torch/stepping.py``). Launch with ``torchrun``.

Example:
    >>> import modelparallel.torch as smp
    >>> smp.init({"partitions": 1})
    >>> smp.rank(), smp.pp_size(), smp.CommGroup.WORLD is smp.WORLD
    (0, 1, True)
    >>> smp.state_mod.shutdown()
"""

from __future__ import annotations

from modelparallel._version import __version__
from modelparallel.torch import amp, nn, optimizers, patches, state_mod
from modelparallel.torch.checkpoint import load, resume_from_checkpoint, save, save_checkpoint
from modelparallel.torch.comm import (
    DP_GROUP,
    MP_GROUP,
    PP_GROUP,
    RDP_GROUP,
    TP_GROUP,
    WORLD,
    CommGroup,
    RankType,
    allgather,
    barrier,
    broadcast,
    dp_barrier,
    mp_barrier,
    pp_barrier,
    rdp_barrier,
    recv_from,
    send,
    tp_barrier,
)
from modelparallel.torch.config import SMPConfig
from modelparallel.torch.creation import (
    delay_param_initialization,
    model_creation,
    set_activation_checkpointing,
    set_tensor_parallelism,
    tensor_parallelism,
    tp_register,
    tp_register_with_module,
)
from modelparallel.torch.model import DistributedModel
from modelparallel.torch.optimizer import DistributedOptimizer
from modelparallel.torch.placement import partition, set_partition
from modelparallel.torch.state_mod import (
    dp_rank,
    dp_size,
    get_dp_group,
    get_dp_process_group,
    get_mp_group,
    get_mp_process_group,
    get_pp_group,
    get_pp_process_group,
    get_rdp_group,
    get_rdp_process_group,
    get_tp_group,
    get_tp_process_group,
    get_world_process_group,
    init,
    is_initialized,
    is_tracing,
    local_rank,
    local_size,
    mp_rank,
    mp_size,
    pp_rank,
    pp_size,
    rank,
    rdp_rank,
    rdp_size,
    reset,
    size,
    state,
    tp_rank,
    tp_size,
)
from modelparallel.torch.stepping import StepOutput, step

__all__ = [
    "DP_GROUP",
    "MP_GROUP",
    "PP_GROUP",
    "RDP_GROUP",
    "TP_GROUP",
    "WORLD",
    "CommGroup",
    "DistributedModel",
    "DistributedOptimizer",
    "RankType",
    "SMPConfig",
    "StepOutput",
    "__version__",
    "allgather",
    "amp",
    "barrier",
    "broadcast",
    "delay_param_initialization",
    "dp_barrier",
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
    "load",
    "local_rank",
    "local_size",
    "model_creation",
    "mp_barrier",
    "mp_rank",
    "mp_size",
    "nn",
    "optimizers",
    "partition",
    "patches",
    "pp_barrier",
    "pp_rank",
    "pp_size",
    "rank",
    "rdp_barrier",
    "rdp_rank",
    "rdp_size",
    "recv_from",
    "reset",
    "resume_from_checkpoint",
    "save",
    "save_checkpoint",
    "send",
    "set_activation_checkpointing",
    "set_partition",
    "set_tensor_parallelism",
    "size",
    "state",
    "state_mod",
    "step",
    "tensor_parallelism",
    "tp_barrier",
    "tp_rank",
    "tp_register",
    "tp_register_with_module",
    "tp_size",
]
