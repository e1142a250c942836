"""Multi-process test helpers: real processes on gloo, never a mocked process group.

:func:`run_ranks` runs ``fn(rank, world_size, *args)`` on ``world_size`` processes joined in one
gloo process group (a fresh ``FileStore`` rendezvous per call) and returns each rank's
:class:`RankResult`. Processes are kept in a pool and reused between calls (spawning one and
importing torch costs seconds); a process that died (killed on purpose by a test, say) is
replaced. A rendezvous that failed (gloo could not connect its ranks: the harness's failure, not
the code under test's, since ``fn`` never ran) is retried once on fresh processes. ``fn`` must be
importable by name (a module-level function of a test module or of this module).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

__all__ = ["RankResult", "run_ranks", "shutdown_pool"]


@dataclass
class RankResult:
    """What one rank's ``fn`` did.

    Attributes:
        rank: The rank.
        ok: Whether ``fn`` returned.
        value: What it returned (when ``ok``).
        error_type: The exception's class name (when not ``ok``); ``"died"`` if the process
            exited, ``"hung"`` if it did not answer in time.
        message: The exception's message.
        peer: The exception's ``peer`` attribute (PeerFailedError), if any.
        traceback: The formatted traceback.
        seconds: Wall seconds from the start of the call to the answer.
    """

    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    message: str = ""
    peer: int | None = None
    traceback: str = ""
    seconds: float = 0.0

    def unwrap(self) -> Any:
        """The value, or an AssertionError with the rank's traceback."""
        if not self.ok:
            raise AssertionError(f"rank {self.rank} raised {self.error_type}: {self.message}\n"
                                 f"{self.traceback}")
        return self.value


def _worker(conn: Any, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, rank, world, init_file, args, timeout = job
        joined = False
        try:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=timeout))
            joined = True
            try:
                answer: tuple[Any, ...] = ("ok", fn(rank, world, *args))
            finally:
                dist.destroy_process_group()
        except BaseException as e:  # report everything to the parent
            answer = ("err", type(e).__name__, str(e), getattr(e, "peer", None),
                      traceback.format_exc(), not joined)
        try:
            conn.send(answer)
        except Exception as e:  # an unpicklable result
            conn.send(("err", "PicklingError", str(e), None, "", False))
        if not joined:  # a failed rendezvous can leave gloo state behind: the pool starts afresh
            return


class _Pool:
    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._workers: list[tuple[Any, Any]] = []

    def _ensure(self, n: int, threads: int) -> None:
        alive = [(p, c) for p, c in self._workers if p.is_alive()]
        for p, c in self._workers:
            if not p.is_alive():
                c.close()
        self._workers = alive
        while len(self._workers) < n:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker, args=(child, threads), daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))

    def run(self, fn: Callable[..., Any], world: int, args: tuple[Any, ...], timeout: float,
            pg_timeout: float, threads: int) -> list[RankResult]:
        results, rendezvous_failed = self._run_once(fn, world, args, timeout, pg_timeout, threads)
        if rendezvous_failed:  # fn never ran on some rank: once more, on fresh processes
            results, _ = self._run_once(fn, world, args, timeout, pg_timeout, threads)
        return results

    def _store(self, tmp: str, rank: int) -> str:
        """The rendezvous file of ``rank`` for one call (the same for every rank)."""
        return os.path.join(tmp, "store")

    def _retire(self, n: int) -> None:
        """Stop the first ``n`` workers (they may be exiting already) and drop them."""
        for _proc, conn in self._workers[:n]:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        for proc, conn in self._workers[:n]:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self._workers = self._workers[n:]

    def _run_once(self, fn: Callable[..., Any], world: int, args: tuple[Any, ...],
                  timeout: float, pg_timeout: float,
                  threads: int) -> tuple[list[RankResult], bool]:
        self._ensure(world, threads)
        workers = self._workers[:world]
        tmp = tempfile.mkdtemp(prefix="mp_test_")
        start = time.monotonic()
        for rank, (_, conn) in enumerate(workers):
            conn.send((fn, rank, world, self._store(tmp, rank), args, pg_timeout))
        results: list[RankResult | None] = [None] * world
        rendezvous_failed = False
        deadline = start + timeout
        while any(r is None for r in results):
            for rank, (proc, conn) in enumerate(workers):
                if results[rank] is not None:
                    continue
                if conn.poll(0.05):
                    try:
                        answer = conn.recv()
                    except (EOFError, OSError):
                        proc.join(5)
                        answer = ("err", "died", f"exit code {proc.exitcode}", None, "", False)
                    elapsed = time.monotonic() - start
                    if answer[0] == "ok":
                        results[rank] = RankResult(rank, True, answer[1], seconds=elapsed)
                    else:
                        rendezvous_failed |= answer[5]
                        results[rank] = RankResult(rank, False, None, answer[1], answer[2],
                                                   answer[3], answer[4], elapsed)
                elif not proc.is_alive():
                    results[rank] = RankResult(rank, False, None, "died",
                                               f"exit code {proc.exitcode}",
                                               seconds=time.monotonic() - start)
            if time.monotonic() > deadline:
                for rank, (proc, _) in enumerate(workers):
                    if results[rank] is None:
                        proc.kill()
                        proc.join(5)
                        results[rank] = RankResult(rank, False, None, "hung",
                                                   f"no answer within {timeout} s",
                                                   seconds=time.monotonic() - start)
        if rendezvous_failed:  # a rank that failed to join exits: wait for it before reuse
            self._retire(world)
        return [r for r in results if r is not None], rendezvous_failed

    def shutdown(self) -> None:
        self._retire(len(self._workers))


_POOL: _Pool | None = None


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              pg_timeout: float = 60.0, threads: int = 1) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` pooled processes joined by gloo.

    Args:
        fn: A module-level function.
        world_size: Processes.
        *args: Picklable arguments.
        timeout: Seconds to wait for every answer; ranks still running are killed and reported
            as ``"hung"``.
        pg_timeout: Timeout of the default process group.
        threads: ``torch.set_num_threads`` of new processes.
    """
    global _POOL
    if _POOL is None:
        _POOL = _Pool()
        atexit.register(shutdown_pool)
    return _POOL.run(fn, world_size, args, timeout, pg_timeout, threads)


def shutdown_pool() -> None:
    """Stop the pooled processes."""
    global _POOL
    if _POOL is not None:
        _POOL.shutdown()
        _POOL = None


# -- plans with a chosen placement ---------------------------------------------------------------


def cut_assignment(graph: Any, fractions: list[float]) -> dict[str, int]:
    """A contiguous placement of the graph's assignable nodes (topological order) cut at the
    given fractions (cuts land on arbitrary ops, often inside blocks)."""
    from modelparallel.ir import input_derived_nodes

    derived = input_derived_nodes(graph)
    names = [n.name for n in graph.nodes if n.name not in derived]
    cuts = [int(f * len(names)) for f in fractions]
    out = {name: sum(i >= c for c in cuts) for i, name in enumerate(names)}
    out[graph.output.name] = len(fractions)
    return out


def cut_plan(graph: Any, fractions: list[float], *, microbatches: int = 1,
             schedule: str = "1f1b", communication: str = "direct") -> Any:
    """A plan placing ``graph`` by :func:`cut_assignment`, with the partitioner's estimates."""
    from modelparallel.partitioner import evaluate_assignment
    from modelparallel.plan import PlanConfig

    config = PlanConfig(partitions=len(fractions) + 1, microbatches=microbatches,
                        schedule=schedule, communication=communication)
    return evaluate_assignment(graph, config, "cpu", cut_assignment(graph, fractions))
