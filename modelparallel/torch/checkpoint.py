"""Checkpoints in SMP's layout: ``smp.save``/``smp.load`` and ``smp.save_checkpoint``/
``smp.resume_from_checkpoint``.

Note [smp checkpoints]
~~~~~~~~~~~~~~~~~~~~~~
- ``smp.save(obj, f, partial=True)`` writes ``f"{f}_{pp_rank}"`` (SMP's ``mp_rank`` suffix
  without tensor parallelism), or ``f"{f}_{pp}_{tp}_{rdp}"`` with ``shard_optimizer_state``
  (SMP's names; every replica then saves its own optimizer shard); ``partial=False`` writes
  ``f``. ``smp.load`` reads the same names.
- ``smp.save_checkpoint(path, tag, partial=True, ...)`` writes
  ``path/{tag}_partial/model_{pp}_{tp}_{rdp}.pt`` and ``optimizer_{pp}_{tp}_{rdp}.pt`` (each
  pipeline rank of replica 0; replicas hold identical copies; with sharded optimizer state every
  rank writes its ``optimizer_`` shard), ``fp16_states_{pp}_{tp}_{rdp}.pt`` (the fp16 loss
  scaler, Note [smp fp16] in ``modelparallel/torch/fp16.py``), ``user_content.pt`` and
  ``partition.json`` (the plan, SMP's saved partition decision) from rank 0; with
  ``partial=False`` the gathered model ``path/{tag}`` and ``path/user_content_{tag}`` (no
  optimizer state, as in SMP). Afterwards rank 0 writes ``path/newest`` holding the tag.
- **Atomic.** Every file is written to a temporary name in the same directory, flushed and
  fsynced, then renamed over the final name (and the directory fsynced), and ``newest`` is
  written only after every rank finished its files (a barrier). A job killed during a save
  leaves the previous checkpoint and the ``newest`` that names it intact.
- ``smp.resume_from_checkpoint(path, tag=None, partial=True)`` reads ``newest`` when no tag is
  given. A partial checkpoint fixes the partition: the saved plan is used when the model is
  partitioned at the first step (if it already was, the plans must agree), then this rank's
  model and optimizer files are loaded, deferred until partitioning like ``load_state_dict``. A
  full checkpoint holds the whole model, so it loads into any number of partitions.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from modelparallel.errors import ConfigError, UsageError
from modelparallel.torch import comm
from modelparallel.torch.state_mod import state

__all__ = ["atomic_write", "load", "resume_from_checkpoint", "save", "save_checkpoint"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> with atomic_write(target) as f:
        ...     _ = f.write(b"ok")
        >>> target.read_bytes()
        b'ok'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _suffix() -> str:
    lay = state.require()
    if state.cfg is not None and state.cfg.shard_optimizer_state:
        return f"_{_rankinfo()}"  # SMP's name with sharded optimizer state
    return f"_{lay.coords(state.rank).pp}"


def _sharded(optimizer: Any) -> bool:
    return getattr(optimizer, "_smp_zero", None) is not None


def _rankinfo() -> str:
    c = state.require().coords(state.rank)
    return f"{c.pp}_{c.tp}_{c.rdp}"


def save(obj: Any, f: str, partial: bool = True, pickle_module: Any = pickle,
         pickle_protocol: int = 2, v3: bool = False) -> None:
    """``torch.save`` in SMP's naming: ``partial=True`` writes ``f"{f}_{pp_rank}"`` (call it on
    every pipeline rank, with ``dp_rank() == 0``); the write is atomic.

    Raises:
        ConfigError: if ``f`` is not a str (SMP's rule).
    """
    if not isinstance(f, str):
        raise ConfigError(f"smp.save takes a file name (str), not {type(f).__name__}")
    target = f + _suffix() if partial else f
    with atomic_write(target) as out:
        torch.save(obj, out, pickle_module=pickle_module, pickle_protocol=pickle_protocol)


def load(f: str, map_location: Any = None, pickle_module: Any = pickle,
         pickle_load_args: dict[str, Any] | None = None, partial: bool = True) -> Any:
    """``torch.load`` in SMP's naming: ``partial=True`` reads this rank's ``f"{f}_{pp_rank}"``;
    ``partial=False`` a full file (or any plain torch checkpoint)."""
    if not isinstance(f, str):
        raise ConfigError(f"smp.load takes a file name (str), not {type(f).__name__}")
    source = f + _suffix() if partial else f
    if not os.path.exists(source):
        hint = (" (a partial save writes one file per pipeline rank, named with the '_<rank>' "
                "suffix; pass partial=False for a full file)" if partial else "")
        raise ConfigError(f"smp.load: {source!r} does not exist{hint}")
    kwargs = dict(pickle_load_args or {})
    return torch.load(source, map_location=map_location, pickle_module=pickle_module,
                      weights_only=False, **kwargs)


def save_checkpoint(path: str, tag: str, partial: bool = True, model: Any = None,
                    optimizer: Any = None, user_content: Any = None,
                    translate_if_full: bool = True,
                    num_kept_partial_checkpoints: int | None = None) -> None:
    """Save a checkpoint in SMP's layout (Note [smp checkpoints]); call it on every rank with
    the same ``tag``.

    Args:
        path: Checkpoint directory.
        tag: Name of this checkpoint (the same on every rank).
        partial: One file per pipeline rank (model and optimizer), else one full model file.
        model: The DistributedModel (default: the one wrapped).
        optimizer: The DistributedOptimizer (default: the one wrapped; partial only).
        user_content: Any picklable object, returned by ``resume_from_checkpoint``.
        translate_if_full: Accepted (no Hugging Face translation is needed: our state dicts
            keep the original names).
        num_kept_partial_checkpoints: Keep only this many newest partial checkpoints.
    """
    lay = state.require()
    model = model if model is not None else state.model
    optimizer = optimizer if optimizer is not None else state.optimizer
    root = Path(path)
    c = lay.coords(state.rank)
    if partial:
        if model is not None and not model.partitioned:
            raise UsageError("save_checkpoint(partial=True) needs a partitioned model: run one "
                             "smp.step first, or save with partial=False")
        folder = root / f"{tag}_partial"
        if c.rdp == 0:
            if model is not None:
                with atomic_write(folder / f"model_{_rankinfo()}.pt") as f:
                    torch.save(model.local_state_dict(), f)
            scaler = getattr(optimizer, "loss_scaler", None)
            if scaler is not None and hasattr(scaler, "state_dict"):
                with atomic_write(folder / f"fp16_states_{_rankinfo()}.pt") as f:
                    torch.save(scaler.state_dict(), f)
        if optimizer is not None and (c.rdp == 0 or _sharded(optimizer)):
            # sharded: every replica writes its own shard (Note [smp sharded optimizer])
            with atomic_write(folder / f"optimizer_{_rankinfo()}.pt") as f:
                torch.save(optimizer.local_state_dict(), f)
        if state.rank == 0:
            with atomic_write(folder / "user_content.pt") as f:
                torch.save(user_content, f)
            if model is not None:
                with atomic_write(folder / "partition.json") as f:
                    f.write(model.pipeline.plan.to_json().encode())
    else:
        full = model.state_dict() if model is not None else None  # collective
        if state.rank == 0:
            if full is not None:
                with atomic_write(root / tag) as f:
                    torch.save(full, f)
            with atomic_write(root / f"user_content_{tag}") as f:
                torch.save(user_content, f)
    comm.barrier()
    if state.rank == 0:
        with atomic_write(root / "newest") as f:
            f.write(tag.encode())
        if partial and num_kept_partial_checkpoints is not None:
            _prune(root, num_kept_partial_checkpoints, keep=f"{tag}_partial")
    comm.barrier()


def _prune(root: Path, keep_n: int, keep: str) -> None:
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and d.name.endswith("_partial")),
                  key=lambda d: d.stat().st_mtime)
    old = [d for d in dirs if d.name != keep][:max(0, len(dirs) - max(keep_n, 1))]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)


def resume_from_checkpoint(path: str, tag: str | None = None, partial: bool = True,
                           strict: bool = True, load_optimizer: bool = True,
                           load_sharded_optimizer_state: bool = True,
                           translate_function: Callable[..., Any] | None = None) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`; returns its ``user_content``.

    Raises:
        ConfigError: if the checkpoint (or ``newest``) is missing.
        UsageError: before a DistributedModel exists, or when a partial checkpoint's partition
            differs from the model's (already partitioned) one.
    """
    from modelparallel.plan import Plan

    state.require()
    model, optimizer = state.model, state.optimizer
    if model is None:
        raise UsageError("resume_from_checkpoint needs the DistributedModel (and optimizer): "
                         "create them first, then resume")
    root = Path(path)
    if tag is None:
        newest = root / "newest"
        if not newest.exists():
            raise ConfigError(f"no checkpoint in {str(root)!r}: {str(newest)!r} does not exist")
        tag = newest.read_text().strip()
    if not partial:
        full = root / tag
        if not full.exists():
            raise ConfigError(f"no full checkpoint {str(full)!r}")
        sd = torch.load(full, map_location="cpu", weights_only=False)
        if translate_function is not None:
            sd = translate_function(sd)
        model.load_state_dict(sd, strict=strict)
        content = root / f"user_content_{tag}"
        return torch.load(content, weights_only=False) if content.exists() else None
    folder = root / f"{tag}_partial"
    if not folder.is_dir():
        raise ConfigError(f"no partial checkpoint {str(folder)!r}")
    plan = Plan.from_json((folder / "partition.json").read_text())
    model._use_plan(plan)
    info = _rankinfo().rsplit("_", 1)[0] + "_0"  # replicas read replica 0's files
    model.load_state_dict(torch.load(folder / f"model_{info}.pt", map_location="cpu",
                                     weights_only=False), strict=strict)
    if load_optimizer and optimizer is not None:
        sharded = state.cfg is not None and state.cfg.shard_optimizer_state \
            and state.require().dp > 1
        opt_file = folder / f"optimizer_{_rankinfo() if sharded else info}.pt"
        if sharded and not opt_file.exists():
            raise ConfigError(f"{str(opt_file)!r} is missing: with shard_optimizer_state every "
                              "rank resumes its own optimizer shard; the checkpoint was saved "
                              "without them (or with another data-parallel degree)")
        if opt_file.exists():
            optimizer.load_state_dict(torch.load(opt_file, map_location="cpu",
                                                 weights_only=False))
        scaler = getattr(optimizer, "loss_scaler", None)
        fp16_file = folder / f"fp16_states_{info}.pt"
        if scaler is not None and fp16_file.exists():
            scaler.load_state_dict(torch.load(fp16_file, weights_only=False))
    return torch.load(folder / "user_content.pt", weights_only=False)
