"""Whose batch a pipeline step trains on: pipeline rank 0's (SMP's rule).

Note [batch from rank 0]
~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of a pipeline calls ``step(inputs, targets)``, but only one batch can be trained on.
The rule, SMP's: **the inputs and the targets of a step come from pipeline rank 0 (stage 0); the
contents other ranks pass are ignored.** So per-rank data loaders (each rank reading another
shard, a different seed) cannot mix batches: without the rule stage 0 would compute on its own
inputs and the last stage take the loss against its own targets.

What the other ranks pass must still have the same *structure* as rank 0's batch: the same
input and target leaves, tensor shapes and dtypes, and non-tensor values. Each step every rank
hashes its batch's structure (:func:`batch_signature`) and the ranks all-gather the 8-byte
digests; if one differs, every rank raises the same :class:`~modelparallel.errors.ConfigError`
naming the ranks whose batch differs from rank 0's and how (their signatures are gathered only
then), before any other communication of the step, so the pipeline stays usable. Then rank 0
broadcasts the tensors another stage reads: the model inputs that a stage other than 0 reads
directly (each stage's ``program.model_inputs``, gathered once when the executor is created)
and, in training, the target tensors when the last stage is not stage 0. Other ranks receive
into fresh buffers; the caller's tensors are never written.

Example:
    >>> import torch
    >>> batch_signature([torch.zeros(4, 3), True], torch.zeros(4), train=True)[:2]
    ('train', (('t', (4, 3), 'torch.float32'), ('v', 'True')))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError
from modelparallel.runtime.comm import StageComm

__all__ = ["batch_signature", "share_batch"]


def batch_signature(flat_inputs: Sequence[Any], target: Any, *, train: bool
                    ) -> tuple[Any, ...]:
    """The structure of a batch that every rank must agree on (Note [batch from rank 0]):
    per input leaf its shape and dtype, or its value; the target's tree and leaves alike."""
    leaves, spec = pytree.tree_flatten(target) if train else ([], None)
    return ("train" if train else "eval", tuple(_leaf(v) for v in flat_inputs),
            str(spec), tuple(_leaf(v) for v in leaves))


def share_batch(comm: StageComm | None, flat_inputs: Sequence[Any], target: Any, *,
                train: bool, input_names: Sequence[str], shared_inputs: Sequence[int],
                target_needed: bool) -> tuple[list[Any], Any]:
    """Rank 0's batch on every rank (collective over the pipeline; Note [batch from rank 0]).

    Args:
        comm: The pipeline's communication (``None``: one stage, the batch is returned as is).
        flat_inputs: This rank's flat model inputs.
        target: This rank's target (ignored when not ``train``).
        train: Whether this is a training step (targets matter).
        input_names: Names of the flat inputs, for messages.
        shared_inputs: Flat indices of the inputs a stage other than 0 reads.
        target_needed: Whether a stage other than 0 computes the loss (targets are broadcast).

    Returns:
        ``(flat_inputs, target)``: rank 0's tensors where another stage reads them, this rank's
        own elsewhere (equal in structure, checked).

    Raises:
        ConfigError: on every rank, if a rank's batch differs from rank 0's in structure.
    """
    flat = list(flat_inputs)
    if comm is None or comm.num_stages < 2:
        return flat, target
    signature = batch_signature(flat, target, train=train)
    digest = int.from_bytes(hashlib.sha1(repr(signature).encode()).digest()[:8], "little",
                            signed=True)
    digests = comm.all_gather_int(digest, "the batch structure of every rank")
    if any(d != digests[0] for d in digests):
        theirs = comm.all_gather_object(signature, "the batch structures")
        raise ConfigError(_mismatch(theirs, digests, list(input_names)))
    for i in sorted(set(shared_inputs)):
        if isinstance(flat[i], torch.Tensor):
            flat[i] = _broadcast(comm, flat[i], f"input {_name(input_names, i)} of the batch")
    if train and target_needed:
        leaves, spec = pytree.tree_flatten(target)
        leaves = [_broadcast(comm, v, "the targets of the batch")
                  if isinstance(v, torch.Tensor) else v for v in leaves]
        target = pytree.tree_unflatten(leaves, spec)
    return flat, target


def _broadcast(comm: StageComm, tensor: torch.Tensor, what: str) -> torch.Tensor:
    if comm.stage == 0:
        buf = tensor.detach().to(comm.device).contiguous()
    else:
        buf = torch.empty(tensor.shape, dtype=tensor.dtype, device=comm.device)
    comm.broadcast([buf], 0, what)
    return buf if comm.stage != 0 else tensor


def _leaf(value: Any) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape), str(value.dtype))
    return ("v", repr(value)[:200])


def _name(names: Sequence[str], i: int) -> str:
    return repr(names[i]) if i < len(names) else f"#{i}"


def _mismatch(signatures: Sequence[tuple[Any, ...]], digests: Sequence[int],
              names: list[str]) -> str:
    ref = signatures[0]
    lines = []
    for rank, (sig, d) in enumerate(zip(signatures, digests)):
        if d == digests[0]:
            continue
        lines.append(f"rank {rank}: {_difference(ref, sig, names)}")
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    return (f"the batch of pipeline rank(s) {bad} differs in structure from pipeline rank 0's "
            "(" + "; ".join(lines) + "). Every rank of a pipeline trains on rank 0's inputs and "
            "targets (Note [batch from rank 0] in modelparallel/runtime/batch.py), so the "
            "others need not read real data, but their batch must have the same shapes, dtypes "
            "and non-tensor values; give every rank batches of the same size (drop_last=True "
            "in the data loader).")


def _describe(leaf: tuple[Any, ...]) -> str:
    if leaf[0] == "t":
        return f"shape {leaf[1]} {leaf[2]}"
    return f"value {leaf[1]}"


def _difference(ref: tuple[Any, ...], sig: tuple[Any, ...], names: list[str]) -> str:
    if ref[0] != sig[0]:
        return f"runs a {sig[0]} step while rank 0 runs a {ref[0]} step"
    if len(ref[1]) != len(sig[1]):
        return f"has {len(sig[1])} input leaves, rank 0 has {len(ref[1])}"
    for i, (a, b) in enumerate(zip(ref[1], sig[1])):
        if a != b:
            return f"input {_name(names, i)} has {_describe(b)}, rank 0's has {_describe(a)}"
    if ref[2] != sig[2] or len(ref[3]) != len(sig[3]):
        return f"the target is structured as {sig[2]}, rank 0's as {ref[2]}"
    for i, (a, b) in enumerate(zip(ref[3], sig[3])):
        if a != b:
            return f"target leaf #{i} has {_describe(b)}, rank 0's has {_describe(a)}"
    return "differs"
