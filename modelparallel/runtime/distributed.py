"""Joining torch.distributed and agreeing on a pipeline's setup without process-group traffic.

:func:`init_distributed` starts ``torch.distributed`` from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``...) when it is not started yet: gloo for CPU, NCCL for CUDA, with
a timeout. :class:`SetupRound` lets the ranks of a pipeline exchange their setup outcome (traced,
plan checked, plan made) through the c10d store, so a rank that refuses a plan makes every rank
raise promptly instead of leaving the others blocked in a collective (Note [setup agreement]).

Note [setup agreement]
~~~~~~~~~~~~~~~~~~~~~~
Building a pipeline has local steps that can fail on one rank only (tracing, the plan's
fingerprint check, planning on rank 0) and then collective steps (creating process groups). If a
rank that failed simply raised, the others would wait in the collective until its timeout. So
after the local steps every rank writes its outcome (``ok`` or its error) to the store under the
pipeline's key prefix and waits, with the pipeline's timeout, for every rank's outcome; if any
rank failed, every rank raises (the same error class when it is one of ours, with the failing
rank named). A plan made on rank 0 travels the same way. No process group is used until every
rank said ``ok``. The key prefix counts pipelines per rank in the store
(``modelparallel/rank<r>/pipelines``), so it is the same on all ranks as long as they build their
pipelines in the same order, which collective setup requires anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from modelparallel import errors
from modelparallel.errors import ConfigError, ModelParallelError, PeerFailedError, StepTimeoutError

__all__ = ["SetupRound", "default_device", "init_distributed", "pipeline_namespace"]


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout: float) -> bool:
    """Start torch.distributed from torchrun's environment if it is not running yet.

    Returns:
        Whether torch.distributed is running afterwards (``False``: a single process without
        launcher variables, which needs no process group).

    Raises:
        ConfigError: if the launcher variables are incomplete.
        StepTimeoutError: if the other processes did not join within ``timeout`` seconds.
    """
    if dist.is_initialized():
        return True
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if env["WORLD_SIZE"] is None and env["RANK"] is None:
        return False
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise ConfigError(
            f"torch.distributed is not initialised and the launcher variables {missing} are "
            "missing; start the script with torchrun (e.g. 'torchrun --nproc_per_node 4 "
            "train.py') or call torch.distributed.init_process_group first")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        # We started it, so we stop it: a process group left to the interpreter's teardown
        # can abort the process at exit after an error ("terminate called without an active
        # exception"); the pipelines' own groups close first (registered later, run first).
        atexit.register(_destroy_default_group)
    except (RuntimeError, ValueError) as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise StepTimeoutError(
                f"not every one of the {env['WORLD_SIZE']} processes joined within {timeout:g} "
                f"s ({e}); check that all were started with the same MASTER_ADDR/PORT") from None
        raise
    return True


def _destroy_default_group() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def pipeline_namespace(store: dist.Store, rank: int) -> str:
    """The key prefix of the next pipeline this rank builds (Note [setup agreement])."""
    return f"modelparallel/pipeline{store.add(f'modelparallel/rank{rank}/pipelines', 1)}"


class SetupRound:
    """Setup outcomes of one pipeline, exchanged through the store (Note [setup agreement]).

    Args:
        store: The job's store.
        namespace: The pipeline's key prefix (:func:`pipeline_namespace`).
        rank: This process's global rank.
        ranks: Global ranks of the pipeline.
        timeout: Seconds to wait for the other ranks.
    """

    def __init__(self, store: dist.Store, namespace: str, rank: int, ranks: list[int],
                 timeout: float) -> None:
        self._store = dist.PrefixStore(f"{namespace}/setup/", store)
        self.rank = rank
        self.ranks = list(ranks)
        self.timeout = timeout

    def publish(self, key: str, value: str) -> None:
        """Make ``value`` available to every rank under ``key``."""
        self._store.set(key, value)

    def fetch(self, key: str, owner: int) -> str:
        """Wait for ``key`` (written by rank ``owner``) or for ``owner``'s failure report.

        Raises:
            The owner's error (same class when it is one of ours), or StepTimeoutError.
        """
        self._wait_any([key, f"status{owner}"], owner)
        if self._store.check([key]):
            return self._store.get(key).decode()
        status = json.loads(self._store.get(f"status{owner}").decode())
        raise _rebuild(status, owner)

    def fail(self, error: BaseException) -> None:
        """Report this rank's setup error (best effort)."""
        with contextlib.suppress(RuntimeError, ValueError):
            self._store.set(f"status{self.rank}", json.dumps(
                {"ok": False, "type": type(error).__name__, "message": str(error)}))

    def agree(self) -> None:
        """Report success and wait for every rank's outcome.

        Raises:
            The first failing rank's error (same class when it is one of ours) or
            StepTimeoutError naming the ranks that never answered.
        """
        self._store.set(f"status{self.rank}", json.dumps({"ok": True}))
        keys = [f"status{r}" for r in self.ranks]
        try:
            self._store.wait(keys, timedelta(seconds=self.timeout))
        except RuntimeError:
            silent = [r for r in self.ranks if not self._store.check([f"status{r}"])]
            raise StepTimeoutError(
                f"ranks {silent} did not finish building the pipeline within "
                f"{self.timeout:g} s; they are stuck or were started with other arguments "
                "(check their logs)") from None
        for r in self.ranks:
            status = json.loads(self._store.get(f"status{r}").decode())
            if not status["ok"]:
                raise _rebuild(status, r)

    def _wait_any(self, keys: list[str], owner: int) -> None:
        import time

        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while not any(self._store.check([k]) for k in keys):
            if time.monotonic() > deadline:
                raise StepTimeoutError(
                    f"rank {owner} did not publish {keys[0]!r} within {self.timeout:g} s while "
                    "building the pipeline (planning too slow, or the rank is stuck); raise the "
                    "timeout or give a plan file")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _rebuild(status: dict[str, Any], rank: int) -> ModelParallelError:
    """Another rank's setup error as ours: the same class when it is one of ours."""
    name, message = str(status.get("type", "")), str(status.get("message", ""))
    cls = getattr(errors, name, None)
    text = f"rank {rank} failed while building the pipeline: {name}: {message}"
    if isinstance(cls, type) and issubclass(cls, ModelParallelError) and cls is not PeerFailedError:
        return cls(text)
    return PeerFailedError(text, peer=rank)
