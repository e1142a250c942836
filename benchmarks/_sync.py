"""Agreement between ranks through the c10d store, independent of any communicator's health.

Shared by the distributed benchmarks (see Note [multigpu failures] in ``benchmarks/multigpu.py``);
``benchmarks/`` is not a package: import it as ``from _sync import StoreSync``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from modelparallel.errors import StepTimeoutError

__all__ = ["StoreSync"]


class StoreSync:
    """Gathers and barriers through the c10d store, independent of any communicator's health
    (Note [multigpu failures] in
    ``benchmarks/multigpu.py``). Every rank must make the same calls in the same order."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float) -> None:
        self.store = store
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self._calls = 0

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order."""
        self._calls += 1
        prefix = f"mgbench/{self._calls}"
        self.store.set(f"{prefix}/{self.rank}", json.dumps(value))
        keys = [f"{prefix}/{r}" for r in range(self.world)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout))
        except RuntimeError:
            silent = [r for r in range(self.world) if not self.store.check([keys[r]])]
            raise StepTimeoutError(
                f"ranks {silent} did not reach '{what}' within {self.timeout:g} s (stuck in a "
                "communication or crashed; see their logs); raise --timeout if they are just "
                "slow") from None
        return [json.loads(self.store.get(k)) for k in keys]

    def barrier(self, what: str) -> None:
        """Wait for every rank."""
        self.gather(0, what)
