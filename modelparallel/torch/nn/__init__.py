"""SMP's ``smp.nn``: the tensor-parallel modules (not implemented: constructing one raises
:class:`UnsupportedFeatureError`) and ``FusedLayerNorm`` (a ``torch.nn.LayerNorm``, which is what
scripts need it for: building and ``isinstance`` checks when grouping weight decay).

Example:
    >>> isinstance(FusedLayerNorm(4), torch.nn.LayerNorm)
    True
"""

from __future__ import annotations

from typing import Any

import torch

from modelparallel.errors import UnsupportedFeatureError

__all__ = [
    "DistributedAttentionLayer",
    "DistributedEmbedding",
    "DistributedLinear",
    "DistributedTransformer",
    "DistributedTransformerLMHead",
    "DistributedTransformerLayer",
    "DistributedTransformerOutputLayer",
    "FlashAttentionLayer",
    "FusedLayerNorm",
]


class FusedLayerNorm(torch.nn.LayerNorm):
    """Apex's/SMP's fused layer norm, as ``torch.nn.LayerNorm`` (same numbers)."""


class _TensorParallelModule(torch.nn.Module):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedFeatureError(
            f"smp.nn.{type(self).__name__} is a tensor-parallel module, and tensor parallelism "
            "is not implemented in modelparallel.torch; use the plain torch/transformers module "
            "(pipeline parallelism splits the model across ranks)")


class DistributedLinear(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedEmbedding(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedTransformerLMHead(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedTransformer(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedTransformerLayer(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedAttentionLayer(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class DistributedTransformerOutputLayer(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""


class FlashAttentionLayer(_TensorParallelModule):
    """Not implemented (tensor parallelism)."""
