"""The multi-process test harness itself (``tests/_dist.py``): real processes on gloo."""

from __future__ import annotations

import os

import pytest
from _dist import _Pool

pytestmark = pytest.mark.multiprocess


def _pid(rank: int, world: int) -> tuple[int, int]:
    return rank, os.getpid()


class _FirstRendezvousFails(_Pool):
    """Gives each rank its own rendezvous file in the first call, so that no rank finds the
    others and the rendezvous times out on both, as a gloo connection that failed would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.first_pids: set[int] = set()

    def _store(self, tmp: str, rank: int) -> str:
        if rank == 0:
            self.calls += 1
        if self.calls == 1:
            self.first_pids |= {p.pid for p, _ in self._workers}
            return os.path.join(tmp, f"store{rank}")
        return super()._store(tmp, rank)


def test_a_failed_rendezvous_is_retried_on_fresh_processes() -> None:
    pool = _FirstRendezvousFails()
    try:
        results = pool.run(_pid, 2, (), timeout=60, pg_timeout=2, threads=1)
        assert [r.ok for r in results] == [True, True], [r.message for r in results]
        assert [r.value[0] for r in results] == [0, 1]
        assert pool.calls == 2
        pids = {r.value[1] for r in results}
        assert len(pids) == 2 and not pids & pool.first_pids  # the first workers were retired
        again = pool.run(_pid, 2, (), timeout=60, pg_timeout=10, threads=1)
        assert {r.value[1] for r in again} == pids  # the fresh ones stay pooled
    finally:
        pool.shutdown()
