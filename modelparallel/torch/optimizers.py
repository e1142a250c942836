"""SMP's ``smp.optimizers``: Apex-style fused optimizers, not implemented (constructing one
raises :class:`UnsupportedFeatureError` naming a torch replacement).

Example:
    >>> FusedLamb([])
    Traceback (most recent call last):
    ...
    modelparallel.errors.UnsupportedFeatureError: smp.optimizers.FusedLamb is not supported ...
"""

from __future__ import annotations

from typing import Any

from modelparallel.errors import UnsupportedFeatureError

__all__ = ["FusedLAMB", "FusedLamb", "FusedNovoGrad"]


class _Fused:
    _instead = "torch.optim.AdamW"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedFeatureError(
            f"smp.optimizers.{type(self).__name__} is not supported yet by modelparallel.torch "
            f"(SMP's fused CUDA optimizer); use {self._instead} wrapped in "
            "smp.DistributedOptimizer")


class FusedLamb(_Fused):
    """Not implemented (SMP's fused LAMB)."""


class FusedLAMB(FusedLamb):
    """SMP's other spelling of :class:`FusedLamb`; not implemented."""


class FusedNovoGrad(_Fused):
    """Not implemented (SMP's fused NovoGrad)."""

    _instead = "torch.optim.AdamW (or torch.optim.SGD)"
