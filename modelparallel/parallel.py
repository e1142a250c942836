"""How a pipeline runs beyond its plan: data-parallel replicas and the memory features.

:class:`ParallelOptions` is what :func:`modelparallel.pipeline` takes as ``parallel=`` (the
common ones also as keyword arguments: ``data_parallel=N``). It imports no framework, so the
planner and the CLI can read it.

Example:
    >>> opts = ParallelOptions(data_parallel=2, placement_strategy="spread")
    >>> opts.data_parallel, opts.bucket_cap_bytes
    (2, 26214400)
"""

from __future__ import annotations

from dataclasses import dataclass

from modelparallel.errors import ConfigError
from modelparallel.placement import normalize_strategy

__all__ = ["ParallelOptions"]


@dataclass(frozen=True)
class ParallelOptions:
    """Data parallelism across pipeline replicas (Note [data-parallel gradient sync] in
    ``modelparallel/runtime/data_parallel.py``).

    Attributes:
        data_parallel: Replicas of the pipeline (the data-parallel degree); the job runs
            ``partitions × data_parallel`` processes. Each replica trains on its own batches;
            each stage's gradients are averaged over its replicas after every step.
        placement_strategy: How ranks map to (replica, stage): ``"cluster"`` (a replica's
            stages on consecutive ranks), ``"spread"`` (a stage's replicas on consecutive
            ranks) or a ``"DPT"`` permutation (Note [placement order] in
            ``modelparallel/placement.py``).
        bucket_cap_mb: Largest gradient all-reduce bucket, in MiB (DDP's ``bucket_cap_mb``).
        overlap_allreduce: Start a bucket's all-reduce during backward, as soon as its
            gradients are final (else all at the end of the step).
        check_uneven: All-reduce a fingerprint of each batch over the replicas at the start of
            each step, so replicas given different batch shapes, or one that ran out of batches,
            raise :class:`~modelparallel.errors.UnevenDataError` instead of hanging.
    """

    data_parallel: int = 1
    placement_strategy: str = "cluster"
    bucket_cap_mb: float = 25.0
    overlap_allreduce: bool = True
    check_uneven: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data_parallel, bool) or not isinstance(self.data_parallel, int) \
                or self.data_parallel < 1:
            raise ConfigError(f"data_parallel = {self.data_parallel!r} must be an int >= 1")
        normalize_strategy(self.placement_strategy)
        if not self.bucket_cap_mb > 0:
            raise ConfigError(f"bucket_cap_mb = {self.bucket_cap_mb} must be > 0")

    @property
    def bucket_cap_bytes(self) -> int:
        """``bucket_cap_mb`` in bytes."""
        return int(self.bucket_cap_mb * 2**20)
