"""Data parallelism across pipeline replicas: each stage's gradients averaged over its replicas.

A hybrid job runs ``dp`` copies of the pipeline (:class:`~modelparallel.placement.Placement`);
the ranks holding the same stage form its data-parallel group. :class:`GradientSync` averages
their gradients after each training step, the way ``torch.nn.parallel.DistributedDataParallel``
does for a whole model.

Note [data-parallel gradient sync]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- *Buckets.* The stage's trainable parameters, in reverse registration order (roughly the order
  backward produces their gradients), are cut into buckets of at most ``bucket_cap_bytes`` of one
  dtype and device, as DDP's reducer does.
- *Overlap.* A ``register_post_accumulate_grad_hook`` on each parameter counts its gradient
  accumulations in the step; a parameter is ready after the step's last microbatch backward has
  reached it (``microbatches`` accumulations per program). When every parameter of a bucket is
  ready, the bucket's gradients are flattened and an asynchronous ``all_reduce`` (SUM) is issued
  on the stage's group, so it runs (gloo: on its own thread; NCCL: on its stream) while backward
  goes on with the earlier layers. DDP's own reducer cannot be driven here: it expects one
  forward and one backward per ``forward`` call of a wrapped module, while a pipeline stage runs
  ``m`` interleaved forwards and backwards of several programs per step.
- *End of step.* :meth:`GradientSync.finish` issues the buckets still waiting (parameters whose
  gradient was written without the hook, such as the deferred weight gradients of a split
  backward, Note [split backward], or tied parameters, which are summed over their stages first,
  Note [tied parameters] in ``modelparallel/partitioner/problem.py``), waits for every
  bucket, divides by the group size and writes the average back into ``.grad``. The executor calls it after the tied-parameter sum, so
  a tied weight's gradient is summed over stages and averaged over replicas (the order does not
  matter: both are linear). A parameter whose ``.grad`` is ``None`` (read by no operation) stays
  ``None``; the traced graph is the same on every replica, so it is ``None`` on all of them.
- *Uneven data.* At the start of each step the group all-reduces a small fingerprint of the
  batch (its size and a hash of its shape key, :func:`~modelparallel.runtime.microbatch.
  shape_key`): replicas given batches of different shapes raise :class:`UnevenDataError` on
  every rank before any pipeline traffic. A replica that ran out of batches (SMP's classic hang:
  one rank with a batch fewer) leaves its peers waiting in that all-reduce: when it closes its
  pipeline (:meth:`Pipeline.close <modelparallel.api.Pipeline.close>`) or exits, or at the
  latest after the pipeline's timeout, they raise :class:`UnevenDataError`.

Averaging over the replicas, with each replica averaging over its microbatches, makes a step on
``dp`` replicas of batch ``b`` equal to one step on the concatenated batch of ``dp·b`` (for a
loss that is a mean over samples): the parity test checks it on 2 × 2 gloo ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from modelparallel.errors import PeerFailedError, UnevenDataError
from modelparallel.runtime.comm import StageComm
from modelparallel.runtime.failure import map_comm_error

__all__ = ["DEFAULT_BUCKET_BYTES", "GradientSync"]

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size (``bucket_cap_mb=25``)."""


@dataclass
class _Bucket:
    params: list[torch.Tensor]
    ready: int = 0
    flat: torch.Tensor | None = None
    work: Any = None
    had_grad: list[bool] = field(default_factory=list)


class GradientSync:
    """Averages one rank's stage gradients over its data-parallel group
    (Note [data-parallel gradient sync]).

    Args:
        params: This rank's trainable parameters (of all its programs).
        comm: The pipeline's comm (its failure board maps errors; it tears the group down on
            a failure).
        group: The stage's data-parallel process group (``None``: a group of one, nothing to
            do).
        size: Ranks in the group.
        microbatches: Gradient accumulations per parameter in a step (the step's
            microbatches).
        bucket_cap_bytes: Largest bucket.
        overlap: Issue a bucket's all-reduce as soon as it is ready (else all at the end).
        late: Parameters whose gradients are not final when the hooks fire (tied parameters
            summed over stages after backward): reduced at :meth:`finish` only.
        check_uneven: Make :meth:`check_batch` compare the replicas' batches (else it does
            nothing).

    Example:
        >>> sync = GradientSync([torch.nn.Parameter(torch.ones(2))], None, None, 1, 2)
        >>> sync.size, len(sync.buckets)
        (1, 1)
    """

    def __init__(self, params: Sequence[torch.Tensor], comm: StageComm | None, group: Any,
                 size: int, microbatches: int, *, bucket_cap_bytes: int = DEFAULT_BUCKET_BYTES,
                 overlap: bool = True, late: Iterable[torch.Tensor] = (),
                 check_uneven: bool = True) -> None:
        self.comm = comm
        self.group = group
        self.size = size
        self.microbatches = microbatches
        self.overlap = overlap
        self.check_uneven = check_uneven
        late_ids = {id(t) for t in late}
        unique: dict[int, torch.Tensor] = {}
        for p in params:
            if p.requires_grad:
                unique.setdefault(id(p), p)
        ordered = list(reversed(list(unique.values())))
        self.buckets = (_cut([p for p in ordered if id(p) not in late_ids], bucket_cap_bytes)
                        + _cut([p for p in ordered if id(p) in late_ids], bucket_cap_bytes))
        self._bucket_of: dict[int, _Bucket] = {id(p): b for b in self.buckets for p in b.params}
        self._late = late_ids
        self._counts: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._active = False
        if size > 1 and overlap:
            for p in ordered:
                if id(p) not in late_ids:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # -- the step ----------------------------------------------------------------------------------

    def check_batch(self, key: tuple[Any, ...], samples: int, step: int) -> None:
        """Collective over the group: refuse replicas whose batches differ (uneven data).

        Raises:
            UnevenDataError: if the replicas' batches differ in shape, or a replica did not
                start this step (it ran out of batches, exited or closed its pipeline).
        """
        if self.size < 2 or not self.check_uneven:
            return
        digest = int.from_bytes(hashlib.sha1(repr(key).encode()).digest()[:7], "big")
        t = torch.tensor([digest, -digest, samples, -samples], dtype=torch.int64)
        t = t.to(self._device())
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as e:
            mapped = self._map(e, f"the start of step {step}")
            left = ("exited", "left the pipeline")  # killed, or closed / ended a step early
            if isinstance(mapped, PeerFailedError) and not any(w in str(mapped) for w in left):
                raise mapped from None
            raise UnevenDataError(
                f"rank {dist.get_rank()} waited for its data-parallel peers to start training "
                f"step {step}, and one did not ({mapped}). Replicas must run the same number "
                "of steps: give every data-parallel rank the same number of batches (shard "
                "the data evenly, drop the remainder).") from None
        values = t.tolist()
        if values[0] != -values[1] or values[2] != -values[3]:
            raise UnevenDataError(
                f"the data-parallel replicas got different batches at step {step}: sizes "
                f"between {-values[3]} and {values[2]} samples (this rank: {samples}), or "
                "other shapes. Give every replica batches of the same shapes (drop the "
                "remainder).")

    def begin_step(self) -> None:
        """Reset the per-step state (before the step's first backward)."""
        self._counts.clear()
        for b in self.buckets:
            b.ready, b.flat, b.work, b.had_grad = 0, None, None, []
        self._active = True

    def finish(self) -> None:
        """Reduce what is left, wait for every bucket and write the averages into ``.grad``."""
        if not self._active:
            return
        self._active = False
        if self.size < 2:
            return
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            try:
                if b.work is not None:
                    b.work.wait()
            except RuntimeError as e:
                raise self._map(e, "the data-parallel gradient all-reduce") from None
            assert b.flat is not None
            b.flat.div_(self.size)
            offset = 0
            for p, had in zip(b.params, b.had_grad):
                n = p.numel()
                if had:
                    assert p.grad is not None
                    p.grad.copy_(b.flat[offset:offset + n].view_as(p))
                offset += n
            b.flat, b.work = None, None

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the pipeline is closed)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- internals ---------------------------------------------------------------------------------

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        k = id(p)
        self._counts[k] = self._counts.get(k, 0) + 1
        if self._counts[k] != self.microbatches:
            return
        b = self._bucket_of[k]
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        b.had_grad = [p.grad is not None for p in b.params]
        b.flat = torch.cat([p.grad.detach().reshape(-1) if p.grad is not None
                            else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                            for p in b.params])
        try:
            b.work = dist.all_reduce(b.flat, op=dist.ReduceOp.SUM, group=self.group,
                                     async_op=True)
        except RuntimeError as e:
            raise self._map(e, "the data-parallel gradient all-reduce") from None

    def _map(self, error: RuntimeError, what: str) -> Exception:
        board = self.comm.board if self.comm is not None else None
        rank = dist.get_rank()
        timeout = self.comm.timeout if self.comm is not None else 0.0
        return map_comm_error(error, board, rank=rank, peer=-1, what=what, timeout=timeout)

    def _device(self) -> torch.device:
        if self.comm is not None and self.comm.backend == "nccl":
            return self.comm.device
        return torch.device("cpu")


def _cut(params: list[torch.Tensor], cap: int) -> list[_Bucket]:
    buckets: list[_Bucket] = []
    current: list[torch.Tensor] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if current and (size + nbytes > cap or p.dtype != current[0].dtype
                        or p.device != current[0].device):
            buckets.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(_Bucket(current))
    return buckets
