"""SMP's functional activation checkpointing (``checkpoint``, ``checkpoint_sequential``): not
available yet, refused with :class:`UnsupportedFeatureError` rather than silently ignored."""

from __future__ import annotations

from typing import Any

from modelparallel.errors import UnsupportedFeatureError
from modelparallel.torch.creation import _CKPT

__all__ = ["checkpoint", "checkpoint_sequential"]


def checkpoint(module: Any, *args: Any, preserve_rng_state: bool = True) -> Any:
    """Refused: SMP's activation checkpointing is not available yet."""
    raise UnsupportedFeatureError(f"smp checkpoint(): {_CKPT}")


def checkpoint_sequential(sequential_module: Any, input: Any, strategy: str = "each",
                          preserve_rng_state: bool = True, pack_args_as_tuple: bool = False
                          ) -> Any:
    """Refused: SMP's activation checkpointing is not available yet."""
    raise UnsupportedFeatureError(f"smp checkpoint_sequential(): {_CKPT}")
