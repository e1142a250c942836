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
  ``extra["host_bandwidth"]`` (default 25 GB/s, PCIe 4 x16; on CPU devices nothing changes,
  as the runtime leaves host tensors where they are). What the
  runtime's hooks do not see stays: the model outputs held for the loss and what the loss saves
  (Note [activation memory] in ``modelparallel/cost_model/costs.py``); parameters stay on the
  device too (their bytes are already counted as parameters).
- *Mixed precision* (``bf16``/``fp16``, Note [autocast bytes]): parameters, their gradients and
  the optimizer state stay fp32 (master weights); activation, communication and
  gradient-of-activation bytes follow the dtype autocast gives each node; every microbatch in
  flight keeps a half-precision copy of each weight a matmul-class op reads (autocast casts it
  once per forward and the op saves the copy for backward); compute time scales by the
  device's fp32 / half peak ratio, but by no less than 1/2 (memory-bound ops only halve their
  bytes).
- ``active_microbatches``: in-flight microbatches per stage are capped at it (the runtime runs
  the schedule in waves of that many, Note [active microbatches] in
  ``modelparallel/runtime/waves.py``).
- ``shard_optimizer_state`` with ``data_parallel = d``: a trainable parameter's optimizer state
  divides by ``d`` (value and gradient stay whole: ZeRO-1).

Note [autocast bytes]
~~~~~~~~~~~~~~~~~~~~~
Under ``torch.autocast`` a node's output is half precision when it is a matmul-class op
(:data:`LOWER_OPS`: linear, addmm, bmm, convolutions, attention), float32 when it is on the
device's float32 list (:func:`fp32_ops`: softmax, layer norm, ``pow``, losses... on CUDA; only
losses and a few reductions on the CPU), and otherwise the widest of its floating inputs
(parameters aside), so a residual stream that starts from an fp32 embedding stays fp32 and a
GELU written with ``pow`` runs in fp32 on CUDA. A node's saved bytes scale by 1/2 when it is a
matmul-class op (it saves the half-precision casts of its inputs), stay when it is on the
float32 list (it saves float32 casts) or a dropout (a boolean mask), and otherwise scale by the
mean of its floating inputs' factors (1/2 for a half one: an elementwise op saves its inputs);
output, sent, gradient and workspace bytes follow the output's dtype. Each trainable parameter a
matmul-class op reads adds half its bytes to the saved bytes of its first such reader (the cast
copy, one per microbatch in flight). The values the loss reads and the loss's float32 copy are
left as they are. Without the cast copies the model under-predicts bf16 stages badly (figures:
``docs/measurements.md``).

Example:
    >>> region_of("transformer.h.3.attn.c_attn", "all", None)
    'transformer.h.3'
    >>> region_of("encoder.layer.1.output", ("encoder.layer.1",), None)
    'encoder.layer.1'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from modelparallel.cost_model.costs import held_output_bytes
from modelparallel.errors import InfeasiblePlanError
from modelparallel.ir import Graph, Node, OpKind, region_of
from modelparallel.plan import Plan, PlanConfig

__all__ = ["LOWER_OPS", "FeatureArrays", "apply_features", "auto_checkpoint", "autocast_half",
           "candidate_regions", "checkpoint_region", "fp32_ops", "region_of"]

_HOST_BANDWIDTH = 25e9

#: Ops autocast runs in half precision (Note [autocast bytes]); module types lower-cased.
LOWER_OPS = frozenset({
    "addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "einsum", "prelu",
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "conv_tbc", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "conv1d_module", "multiheadattention"})

_FP32_LOSSES = frozenset({
    "mse_loss", "nll_loss", "nll_loss2d", "cross_entropy", "cross_entropy_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "l1_loss", "smooth_l1_loss",
    "huber_loss", "kl_div", "poisson_nll_loss", "cosine_embedding_loss", "margin_ranking_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "multilabel_margin_loss",
    "hinge_embedding_loss", "ctc_loss", "prod", "cdist"})

_FP32_CUDA = _FP32_LOSSES | frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm",
    "layernorm", "group_norm", "native_group_norm", "groupnorm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "dist", "pdist", "renorm", "logsumexp", "softmax",
    "_softmax", "log_softmax", "_log_softmax", "sum", "cumsum", "cumprod", "norm",
    "linalg_vector_norm", "rms_norm", "_fused_rms_norm"})

_DROPOUT = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout"})


def fp32_ops(device_name: str) -> frozenset[str]:
    """The ops autocast runs in float32 on a device (Note [autocast bytes]).

    Example:
        >>> "layer_norm" in fp32_ops("h100"), "layer_norm" in fp32_ops("cpu")
        (True, False)
    """
    return _FP32_LOSSES if device_name == "cpu" else _FP32_CUDA


def _op(node: Node) -> str:
    if node.op is OpKind.CALL_MODULE:
        return (node.module_type or "").lower()
    parts = [x for x in node.target.replace(":", ".").split(".") if x]
    if len(parts) >= 2 and parts[0] in ("aten", "prims"):
        return parts[1].lower()  # aten.<op>.<overload>
    return parts[-1].lower() if parts else ""


def autocast_half(graph: Graph, device_name: str) -> dict[str, bool]:
    """Per node, whether its output is half precision under autocast (Note [autocast bytes]).

    Example:
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> autocast_half(chain_graph(2), "h100")["fc0"]
        True
    """
    fp32 = fp32_ops(device_name)
    half: dict[str, bool] = {}
    for nd in graph.nodes:
        op = _op(nd)
        if not _floating(nd) or nd.op in (OpKind.PLACEHOLDER, OpKind.OUTPUT):
            half[nd.name] = False
        elif op in LOWER_OPS or (nd.op is OpKind.CALL_MODULE and op.startswith("conv")):
            half[nd.name] = True
        elif op in fp32:
            half[nd.name] = False
        else:
            ins = [half[i] for i in nd.inputs if i in half and _floating(graph.node(i))]
            half[nd.name] = bool(ins) and all(ins)
    return half


def _floating(nd: Node) -> bool:
    return bool(nd.outputs) and nd.outputs[0].dtype.startswith(("float", "bfloat"))


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
    held: np.ndarray | None = None
    """Bytes of ``saved`` referenced outside autograd's saved tensors (model outputs held for
    the loss, the loss's own): kept by checkpointing and offload; ``None``: none known."""


def apply_features(config: PlanConfig, graph: Graph, names: Sequence[str],
                   edge_src: np.ndarray, edge_dst: np.ndarray, arrays: FeatureArrays,
                   devices: Sequence[object]) -> list[str]:
    """Rewrite ``arrays`` for the config's checkpointing, offload and precision (Note [memory
    features]); return notes for the solver report."""
    notes: list[str] = []
    a = arrays
    index = {name: i for i, name in enumerate(names)}
    held = np.zeros(len(names))
    loss = np.zeros(len(names))
    for name, (value, saved_by_loss) in held_output_bytes(graph).items():
        if name in index:
            held[index[name]] = value
            loss[index[name]] = saved_by_loss
    if config.precision != "fp32":
        half = "bfloat16" if config.precision == "bf16" else "float16"
        _autocast_bytes(graph, names, index, a, held, loss, getattr(devices[0], "name", ""))
        for s, d in enumerate(devices):
            peaks = getattr(d, "peak_flops", {})
            ratio = float(peaks.get("float32", 1.0)) / float(peaks.get(half, peaks.get(
                "float32", 1.0)))
            factor = min(1.0, max(0.5, ratio))
            a.fwd[:, s] *= factor
            a.bwd[:, s] *= factor
        notes.append(f"{config.precision}: activation and communication bytes in autocast's "
                     "dtypes, a half-precision weight copy per microbatch in flight")
    a.held = held + loss
    ck = config.checkpointing
    if ck != "none" and ck != "auto":
        regions = candidate_regions(graph, names, ck, config.module_depth)
        if not regions:
            notes.append(f"checkpointing = {ck!r} matched no region of the graph")
        unmatched = [e for e in ck if e not in regions] if isinstance(ck, tuple) else []
        if unmatched:
            warnings.warn(
                f"checkpointing regions {unmatched} hold no op of the traced graph (a path that "
                "names no module, or a module with no ops), so nothing is recomputed for them; "
                "give module paths as model.named_modules() spells them", UserWarning,
                stacklevel=3)
        for members in regions.values():
            checkpoint_region(members, edge_src, edge_dst, a)
        if regions:
            notes.append(f"activation checkpointing of {len(regions)} regions")
    if config.offload_activations and all(getattr(d, "name", "") == "cpu" for d in devices):
        notes.append("activation offload: no effect on a CPU device (host memory is its memory)")
    elif config.offload_activations:
        for s, d in enumerate(devices):
            if getattr(d, "name", "") == "cpu":
                continue
            bw = float(getattr(d, "extra", {}).get("host_bandwidth", _HOST_BANDWIDTH))
            a.fwd[:, s] += a.saved / bw
            a.bwd[:, s] += a.saved / bw
        np.maximum(a.workspace, 2 * a.saved, out=a.workspace)
        a.saved[:] = a.held
        notes.append("activation offload: saved activations in host memory")
    return notes


def _autocast_bytes(graph: Graph, names: Sequence[str], index: dict[str, int],
                    a: FeatureArrays, held: np.ndarray, loss: np.ndarray, device: str) -> None:
    """Rewrite the byte arrays for autocast (Note [autocast bytes]); ``held`` is rescaled."""
    half = autocast_half(graph, device)
    fp32 = fp32_ops(device)
    cast: set[str] = set()
    for i, name in enumerate(names):
        nd = graph.node(name)
        op = _op(nd)
        out_scale = 0.5 if half[name] else 1.0
        lower = op in LOWER_OPS or (nd.op is OpKind.CALL_MODULE and op.startswith("conv"))
        own = a.saved[i] - held[i] - loss[i]
        if op in fp32 or op in _DROPOUT:
            save_scale = 1.0
        elif lower:
            save_scale = 0.5
        else:  # elementwise and the like save their inputs, each in its own dtype
            ins = [0.5 if half[x] else 1.0 for x in nd.inputs if _floating(graph.node(x))]
            save_scale = sum(ins) / len(ins) if ins else out_scale
        copies = 0.0
        if lower:
            for q in dict.fromkeys(nd.params):
                p = graph.param(q)
                if p.trainable and q not in cast:
                    cast.add(q)
                    copies += p.nbytes / 2
        held[i] *= out_scale
        a.saved[i] = max(own, 0.0) * save_scale + copies + held[i] + loss[i]
        for arr in (a.workspace, a.out_bytes, a.sent, a.grad_bytes):
            arr[i] *= out_scale


def checkpoint_region(members: Sequence[int], edge_src: np.ndarray, edge_dst: np.ndarray,
                      a: FeatureArrays) -> None:
    """Price one checkpointed region (Note [memory features])."""
    inside = np.zeros(len(a.saved), dtype=bool)
    inside[list(members)] = True
    reads = inside[edge_dst] & ~inside[edge_src]
    input_bytes = float(a.out_bytes[np.unique(edge_src[reads])].sum()) if reads.any() else 0.0
    total = float(a.saved[inside].sum())
    a.bwd[inside] += a.fwd[inside]
    a.saved[inside] = 0.0 if a.held is None else a.held[inside]
    a.saved[members[0]] += input_bytes
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
    trial = FeatureArrays(a.fwd.copy(), a.bwd.copy(), a.saved.copy(), a.workspace.copy(),
                          a.out_bytes.copy(), a.sent.copy(), a.grad_bytes.copy(),
                          None if a.held is None else a.held.copy())
    checkpoint_region(members, edge_src, edge_dst, trial)
    freed = float(a.saved.sum() - trial.saved.sum())
    return freed / max(float(a.fwd[list(members)].sum()), 1e-12)
