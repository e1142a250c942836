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

Note [batch overlapped]
~~~~~~~~~~~~~~~~~~~~~~~
Sharing the batch costs an all-gather and a broadcast per step, on the critical path of the
first forward when done before the step (a millisecond on gloo, a few percent of a short step;
docs/schedules.md). :class:`BatchShare` splits it so a step overlaps it with its first forward
(gloo; NCCL runs collectives in order with the point-to-point operations, so there every part
blocks at creation):

* every rank starts the all-gather of the digests when the step starts;
* rank 0 computes its first forward (stage 0 reads only its own inputs, receives nothing)
  before :meth:`BatchShare.check`, once the shape key's boundary templates are known (the
  first step of a shape key sends them from that forward: it checks first) and where stage
  0's module holds no buffers (a batch-norm's statistics would move); every other rank
  checks before anything else. The check
  precedes every point-to-point message of the step on every rank, so a mismatch still raises
  on every rank with the pipeline usable (the executor restores the stashed tied-parameter
  gradients and rank 0's random state, keeps its boundary templates and does not fail the
  pipeline: a refused step leaves every rank as it was);
* the check starts the broadcasts; a rank that receives part of the batch takes it after its
  first receive wait (rank 0 broadcasts before it sends its first activations);
* a ConfigError a rank raises before its step (a batch that does not split into the
  microbatches, a changed guarded input) completes the share first, so if the batches differ
  every rank raises the mismatch instead and none is left waiting.

``StageExecutor.overlap_batch = False`` shares the whole batch before the step instead.

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

__all__ = ["BatchShare", "batch_signature", "share_batch"]


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
    share = BatchShare(comm, flat_inputs, target, train=train, input_names=input_names,
                       shared_inputs=shared_inputs, target_needed=target_needed,
                       overlap=False)
    out = share.finish()
    share.close()
    return out


class BatchShare:
    """Sharing rank 0's batch, in two parts that a step may overlap with its first forward
    (Note [batch overlapped]); created at the start of the step on every rank.

    Creating one starts the all-gather of the batch digests. :meth:`check` waits for them (and
    raises the :class:`~modelparallel.errors.ConfigError` of Note [batch from rank 0] on every
    rank) and starts the broadcasts; no point-to-point message of the step may be posted
    before it. :meth:`finish` waits for what this rank receives and returns ``(flat_inputs,
    target)``; :meth:`close`, at the end of the step, for what it sent.

    Args:
        comm, flat_inputs, target, train, input_names, shared_inputs, target_needed: As for
            :func:`share_batch`.
        overlap: Run the collectives asynchronously (gloo only: NCCL orders collectives with
            the point-to-point operations, so there every part blocks, in order).

    Example:
        >>> import torch
        >>> share = BatchShare(None, [torch.ones(2)], torch.zeros(2), train=True,
        ...                    input_names=["x"], shared_inputs=[], target_needed=False)
        >>> share.check(); flat, target = share.finish(); share.close()
        >>> float(flat[0].sum()), float(target.sum())
        (2.0, 0.0)
    """

    def __init__(self, comm: StageComm | None, flat_inputs: Sequence[Any], target: Any, *,
                 train: bool, input_names: Sequence[str], shared_inputs: Sequence[int],
                 target_needed: bool, overlap: bool = True) -> None:
        self.comm = comm if comm is not None and comm.num_stages > 1 else None
        self.flat = list(flat_inputs)
        self.target = target
        self.train = train
        self.names = list(input_names)
        self.shared = sorted(set(shared_inputs))
        self.target_needed = target_needed
        self.overlap = overlap and self.comm is not None and not self.comm.grouped
        self.checked = self.comm is None
        #: :meth:`check` raised the mismatch error: on every rank, before any point-to-point
        #: message, so the pipeline stays usable.
        self.mismatch = False
        self._works: list[Any] = []
        self._keep: list[torch.Tensor] = []  # rank 0's broadcast buffers until close()
        self._received: list[tuple[int, torch.Tensor]] = []  # (flat index or -1 - leaf, buffer)
        self._digests: Any = None
        leaves = pytree.tree_leaves(target) if train and target_needed else []
        #: Whether this rank takes part of rank 0's batch in place of its own (its tensors
        #: that another stage reads); known at creation, so a step builds its inputs once.
        self.receives = (self.comm is not None and self.comm.stage != 0 and any(
            isinstance(v, torch.Tensor) for v in [*(self.flat[i] for i in self.shared), *leaves]))
        if self.comm is None:
            return
        self._signature = batch_signature(self.flat, target, train=train)
        digest = int.from_bytes(hashlib.sha1(repr(self._signature).encode()).digest()[:8],
                                "little", signed=True)
        self._digests = self.comm.all_gather_int_start(digest, async_op=self.overlap)

    def check(self) -> None:
        """Wait for every rank's batch digest; raise on every rank if one differs; start the
        broadcasts. Idempotent."""
        if self.checked:
            return
        assert self.comm is not None
        comm = self.comm
        digests = comm.all_gather_int_finish(self._digests, "the batch structure of every rank")
        self.checked = True
        if any(d != digests[0] for d in digests):
            theirs = comm.all_gather_object(self._signature, "the batch structures")
            self.mismatch = True
            raise ConfigError(_mismatch(theirs, digests, self.names))
        todo = [(i, self.flat[i]) for i in self.shared if isinstance(self.flat[i], torch.Tensor)]
        if self.train and self.target_needed:
            leaves, self._spec = pytree.tree_flatten(self.target)
            todo += [(-1 - j, v) for j, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        for key, tensor in todo:
            if comm.stage == 0:
                buf = tensor.detach().to(comm.device).contiguous()
            else:
                buf = torch.empty(tensor.shape, dtype=tensor.dtype, device=comm.device)
                self._received.append((key, buf))
            what = (f"input {_name(self.names, key)} of the batch" if key >= 0
                    else "the targets of the batch")
            if self.overlap:
                self._works += comm.broadcast_async([buf], 0)
            else:
                comm.broadcast([buf], 0, what)
            if comm.stage == 0:
                self._keep.append(buf)

    def finish(self) -> tuple[list[Any], Any]:
        """:meth:`check`, then the batch as this rank trains on it (rank 0's tensors where
        another stage reads them)."""
        self.check()
        if self.comm is None or not self._received:
            return self.flat, self.target
        if self.overlap:
            self.comm.wait_works(self._works, "rank 0's batch")
            self._works = []
        leaves = (list(pytree.tree_flatten(self.target)[0])
                  if self.train and self.target_needed else [])
        for key, buf in self._received:
            if key >= 0:
                self.flat[key] = buf
            else:
                leaves[-1 - key] = buf
        if leaves:
            self.target = pytree.tree_unflatten(leaves, self._spec)
        self._received = []
        return self.flat, self.target

    def close(self) -> None:
        """Wait for the broadcasts this rank started (rank 0's sends)."""
        if self.comm is not None and self._works:
            self.comm.wait_works(self._works, "rank 0's batch")
        self._works = []
        self._keep = []


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
