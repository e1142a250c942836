"""modelparallel.tensorflow: SMP v1's TensorFlow API (``import modelparallel.tensorflow as smp``).

Keras models are traced op by op (:mod:`modelparallel.tracer.tf_capture`) into the IR the PyTorch
front end plans, planned by the same ILP, and trained as a pipeline on TensorFlow's own runtime
(:mod:`modelparallel.runtime.tf_pipeline`), one process driving every local device (Note [tf
process model] in ``_state.py``).

- :func:`init`, :func:`rank` and the other rank functions (``_state.py``, ``comm.py``);
- :class:`DistributedModel`, :func:`partition`, :func:`register_post_partition_hook`
  (``model.py``);
- :func:`step`, :class:`StepOutput` (``step.py``);
- :class:`CheckpointManager`, :func:`barrier`, :func:`broadcast`, :func:`send`,
  :func:`recv_from`, :func:`allgather` (``comm.py``).

Example:
    >>> import modelparallel.tensorflow as smp
    >>> smp.init({"partitions": 1, "microbatches": 2}).microbatches
    2
"""

from modelparallel.tensorflow._state import TFConfig, init, is_initialized
from modelparallel.tensorflow.comm import (
    DP_GROUP,
    MP_GROUP,
    PP_GROUP,
    WORLD,
    CheckpointManager,
    CommGroup,
    RankType,
    allgather,
    barrier,
    broadcast,
    dp_barrier,
    dp_rank,
    dp_size,
    local_rank,
    local_size,
    mp_barrier,
    mp_rank,
    mp_size,
    pp_rank,
    pp_size,
    rank,
    recv_from,
    send,
    size,
)
from modelparallel.tensorflow.model import (
    DistributedModel,
    StepRequiredError,
    partition,
    register_post_partition_hook,
)
from modelparallel.tensorflow.step import StepOutput, step

__all__ = [
    "DP_GROUP",
    "MP_GROUP",
    "PP_GROUP",
    "WORLD",
    "CheckpointManager",
    "CommGroup",
    "DistributedModel",
    "RankType",
    "StepOutput",
    "StepRequiredError",
    "TFConfig",
    "allgather",
    "barrier",
    "broadcast",
    "dp_barrier",
    "dp_rank",
    "dp_size",
    "init",
    "is_initialized",
    "local_rank",
    "local_size",
    "mp_barrier",
    "mp_rank",
    "mp_size",
    "partition",
    "pp_rank",
    "pp_size",
    "rank",
    "recv_from",
    "register_post_partition_hook",
    "send",
    "size",
    "step",
]
