"""What the memory features do to the partitioning problem's per-node costs.

Note [memory features]
~~~~~~~~~~~~~~~~~~~~~~
Each feature of :class:`~modelparallel.plan.PartitionOptions` rewrites the per-node arrays of
the :class:`~modelparallel.partitioner.problem.Problem` before any method runs, so the ILP, the
DP, the baselines, the bounds and the evaluation all price it the same way (Note [stage time
and memory] in ``problem.py``):

- *Activation checkpointing* works on *regions*: each transformer block (the module path up to
  its last numeric component, ``transformer.h.3``), else each module at ``module_depth``, or the
  module paths given. A checkpointed region keeps only its inputs for backward and runs its
  forward again in backward: its nodes' saved bytes become 0 except the region's first node,
  which keeps the bytes of the values the region reads from outside; each node's backward time
  gains its forward time; and recomputing one microbatch's region holds the region's saved bytes
  again for a moment, a workspace of each of its nodes. (The runtime checkpoints exactly these
  regions: Note [checkpoint regions] in ``modelparallel/codegen/checkpointing.py``.) With
  ``checkpointing="auto"`` :func:`modelparallel.partitioner.partition` checkpoints the fewest
  regions, those that free the most bytes per second of recomputation first, that make the plan
  fit in memory (a search over how many, each tried with the chosen method), and records them in
  the plan's config.
- *Activation offload*: saved bytes live in host memory between forward and backward: a node's
  saved bytes become a workspace (its microbatch on the device while it is copied out and back,
  twice its saved bytes), and its forward and backward each pay the copy at the device's
  ``extra["host_bandwidth"]`` (default 25 GB/s, PCIe 4 x16; none on a CPU device).
- *Mixed precision* (``bf16``/``fp16``): activation, communication and gradient-of-activation
  bytes halve (autocast computes in half precision; parameters, their gradients and the
  optimizer state stay fp32: master weights); compute time scales by the device's fp32 / half
  peak ratio, but by no less than 1/2 (memory-bound ops only halve their bytes).
- ``active_microbatches``: in-flight microbatches per stage are capped at it (the runtime runs
  the schedule in waves of that many, Note [active microbatches] in
  ``modelparallel/runtime/waves.py``).
- ``shard_optimizer_state`` with ``data_parallel = d``: a trainable parameter's optimizer state
  divides by ``d`` (value and gradient stay whole: ZeRO-1).

Example:
    >>> region_of("transformer.h.3.attn.c_attn", "all", None)
    'transformer.h.3'
    >>> region_of("encoder.layer.1.output", ("encoder.layer.1",), None)
    'encoder.layer.1'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from modelparallel.errors import InfeasiblePlanError
from modelparallel.ir import Graph, region_of
from modelparallel.plan import Plan, PlanConfig

__all__ = ["FeatureArrays", "apply_features", "auto_checkpoint", "candidate_regions",
           "checkpoint_region", "region_of"]

_HOST_BANDWIDTH = 25e9


def candidate_regions(graph: Graph, names: Sequence[str], mode: str | tuple[str, ...],
                      depth: int | None) -> dict[str, list[int]]:
    """Region path to the indices (into ``names``) of its nodes, in order."""
    paths = {nd.name: nd.module_path for nd in graph.nodes}
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        r = region_of(paths.get(name, "") or "", mode, depth)
        if r is not None:
            out.setdefault(r, []).append(i)
    return out


@dataclass
class FeatureArrays:
    """The per-node arrays a feature rewrites (in place), indexed like ``Problem.names``."""

    fwd: np.ndarray
    bwd: np.ndarray
    saved: np.ndarray
    workspace: np.ndarray
    out_bytes: np.ndarray
    sent: np.ndarray
    grad_bytes: np.ndarray


def apply_features(config: PlanConfig, graph: Graph, names: Sequence[str],
                   edge_src: np.ndarray, edge_dst: np.ndarray, arrays: FeatureArrays,
                   devices: Sequence[object]) -> list[str]:
    """Rewrite ``arrays`` for the config's checkpointing, offload and precision (Note [memory
    features]); return notes for the solver report."""
    notes: list[str] = []
    a = arrays
    if config.precision != "fp32":
        half = "bfloat16" if config.precision == "bf16" else "float16"
        for arr in (a.saved, a.workspace, a.out_bytes, a.sent, a.grad_bytes):
            arr *= 0.5
        for s, d in enumerate(devices):
            peaks = getattr(d, "peak_flops", {})
            ratio = float(peaks.get("float32", 1.0)) / float(peaks.get(half, peaks.get(
                "float32", 1.0)))
            factor = min(1.0, max(0.5, ratio))
            a.fwd[:, s] *= factor
            a.bwd[:, s] *= factor
        notes.append(f"{config.precision}: activation and communication bytes halved")
    ck = config.checkpointing
    if ck != "none" and ck != "auto":
        regions = candidate_regions(graph, names, ck, config.module_depth)
        if not regions:
            notes.append(f"checkpointing = {ck!r} matched no region of the graph")
        for members in regions.values():
            checkpoint_region(members, edge_src, edge_dst, a)
        if regions:
            notes.append(f"activation checkpointing of {len(regions)} regions")
    if config.offload_activations:
        for s, d in enumerate(devices):
            if getattr(d, "name", "") == "cpu":
                continue
            bw = float(getattr(d, "extra", {}).get("host_bandwidth", _HOST_BANDWIDTH))
            a.fwd[:, s] += a.saved / bw
            a.bwd[:, s] += a.saved / bw
        np.maximum(a.workspace, 2 * a.saved, out=a.workspace)
        a.saved[:] = 0
        notes.append("activation offload: saved activations in host memory")
    return notes


def checkpoint_region(members: Sequence[int], edge_src: np.ndarray, edge_dst: np.ndarray,
                      a: FeatureArrays) -> None:
    """Price one checkpointed region (Note [memory features])."""
    inside = np.zeros(len(a.saved), dtype=bool)
    inside[list(members)] = True
    reads = inside[edge_dst] & ~inside[edge_src]
    input_bytes = float(a.out_bytes[np.unique(edge_src[reads])].sum()) if reads.any() else 0.0
    total = float(a.saved[inside].sum())
    a.bwd[inside] += a.fwd[inside]
    a.saved[inside] = 0.0
    a.saved[members[0]] = input_bytes
    a.workspace[inside] = np.maximum(a.workspace[inside], total)


def auto_checkpoint(graph: Graph, config: PlanConfig, solve: Callable[[PlanConfig], Plan],
                    names: Sequence[str], arrays: FeatureArrays, edge_src: np.ndarray,
                    edge_dst: np.ndarray) -> Plan:
    """``checkpointing="auto"``: the plan with the fewest checkpointed regions that fits
    (Note [memory features]).

    Regions are ranked by the bytes checkpointing frees per second of recomputation; the
    search finds the shortest prefix of that ranking that ``solve`` plans without an
    :class:`InfeasiblePlanError` (no checkpointing first, then a binary search).

    Raises:
        InfeasiblePlanError: if even every region checkpointed does not fit.
    """
    base = replace(config, checkpointing="none")
    try:
        return solve(base)
    except InfeasiblePlanError as e:
        first = e
    regions = candidate_regions(graph, names, "auto", config.module_depth)
    ranked = sorted(regions, key=lambda r: -_freed_per_second(regions[r], arrays, edge_src,
                                                               edge_dst))
    if not ranked:
        raise first
    lo, hi, best = 1, len(ranked), None
    while lo <= hi:
        k = (lo + hi) // 2
        try:
            best = solve(replace(config, checkpointing=tuple(sorted(ranked[:k]))))
            hi = k - 1
        except InfeasiblePlanError:
            lo = k + 1
    if best is None:
        raise InfeasiblePlanError(
            f"{first} Checkpointing all {len(ranked)} regions (checkpointing='auto') does not "
            "make it fit either; add stages, devices with more memory, or lower precision",
            min_memory_bytes=first.min_memory_bytes) from None
    return best


def _freed_per_second(members: Sequence[int], a: FeatureArrays, edge_src: np.ndarray,
                      edge_dst: np.ndarray) -> float:
    trial = FeatureArrays(*(x.copy() for x in (a.fwd, a.bwd, a.saved, a.workspace, a.out_bytes,
                                                a.sent, a.grad_bytes)))
    checkpoint_region(members, edge_src, edge_dst, trial)
    freed = float(a.saved.sum() - trial.saved.sum())
    return freed / max(float(a.fwd[list(members)].sum()), 1e-12)
