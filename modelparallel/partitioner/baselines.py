"""Baseline partitioners, evaluated with the same cost model as the ILP.

- ``"uniform"``: equal numbers of layers per stage (torchgpipe / DeepSpeed ``uniform``);
- ``"param_balanced"``: a contiguous split over layers minimising the largest stage's trainable
  parameter count (DeepSpeed's default ``partition_method="parameters"``).

Note [layers]
~~~~~~~~~~~~~
Layers are the repeated module units at their natural depth: the outermost modules whose
qualified name ends in an integer index (``transformer.h.3``, ``encoder.block.0``,
``layer2.1``), i.e. the children of ``nn.ModuleList`` / ``nn.Sequential`` containers, in the
order the graph first uses them. Without any, the model's top-level modules are the layers
(and without those, single nodes). Both baselines are contiguous splits of the topological
order: a stage starts at the first node of its first layer. For ``param_balanced`` the nodes
before the first layer (embeddings) and after the last (head) are items of their own, as in a
DeepSpeed ``PipelineModule`` layer list; for ``uniform`` they join the first / last layer.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.partitioner.problem import build_problem
    >>> from modelparallel.plan import PlanConfig
    >>> prob = build_problem(transformer_graph(4), PlanConfig(partitions=2), "h100")
    >>> [name for name, _ in find_layers(prob)]
    ['transformer.h.0', 'transformer.h.1', 'transformer.h.2', 'transformer.h.3']
"""

from __future__ import annotations

import itertools

import numpy as np

from modelparallel.partitioner.problem import Problem

__all__ = ["find_layers", "param_balanced_split", "uniform_split"]


def _indexed_prefix(path: str) -> str | None:
    parts = path.split(".") if path else []
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: k + 1])
    return None


def find_layers(prob: Problem) -> list[tuple[str, list[int]]]:
    """The layers of Note [layers]: name and assigned node indices, in order of first use."""
    graph = prob.graph
    keys: dict[int, str] = {}
    for i, name in enumerate(prob.names):
        key = _indexed_prefix(graph.node(name).module_path)
        if key is not None:
            keys[i] = key
    if len(set(keys.values())) < 2:
        keys = {}
        for i, name in enumerate(prob.names):
            path = graph.node(name).module_path
            if path:
                keys[i] = path.split(".")[0]
        if len(set(keys.values())) < 2:
            keys = {i: f"@{name}" for i, name in enumerate(prob.names)
                    if i != prob.output}
    layers: dict[str, list[int]] = {}
    for i in sorted(keys):
        layers.setdefault(keys[i], []).append(i)
    return list(layers.items())


def _cuts_for(starts: list[int], parts: list[int], n: int) -> list[int]:
    """Cut positions (stage ends) when stage ``s`` starts at item ``parts[s]``."""
    out = []
    for s in range(1, len(parts)):
        k = parts[s]
        out.append(starts[k] if k < len(starts) else n)
    for s in range(1, len(out)):
        out[s] = max(out[s], out[s - 1])
    return out


def uniform_split(prob: Problem) -> tuple[list[int], str]:
    """Cut positions giving every stage an equal number of layers, and a note."""
    layers = find_layers(prob)
    if not layers:
        return [0] * (prob.p - 1), "uniform: no layers; everything on the last stage"
    starts = [min(ix) for _, ix in layers]
    big_l, p = len(layers), prob.p
    parts = [(s * big_l) // p for s in range(p)]
    starts[0] = 0
    sizes = np.diff([*parts, big_l]).tolist()
    note = f"uniform: {big_l} layers (first {layers[0][0]!r}), {sizes} per stage"
    return _cuts_for(starts, parts, prob.n), note


def param_balanced_split(prob: Problem) -> tuple[list[int], str]:
    """Cut positions minimising the largest stage's parameter count over layer items."""
    layers = find_layers(prob)
    if not layers:
        return [0] * (prob.p - 1), "param_balanced: no layers; everything on the last stage"
    starts = [min(ix) for _, ix in layers]
    bounds = [0, *starts[1:], prob.n]
    if starts[0] > 0:
        bounds = [0, *starts, prob.n]  # the prologue is an item of its own
    last_layer_end = max(max(ix) for _, ix in layers) + 1
    if last_layer_end < prob.n - 1:
        bounds = [*bounds[:-1], last_layer_end, prob.n]  # and so is the epilogue
    readers: list[set[int]] = [set() for _ in range(prob.n)]
    for qi, q in enumerate(prob.params):
        if q.trainable:
            for r in q.readers:
                readers[r].add(qi)
    weights = []
    for a, b in itertools.pairwise(bounds):
        held: set[int] = set().union(*readers[a:b]) if b > a else set()
        weights.append(sum(prob.params[q].numel for q in held))
    parts = _balanced_parts(weights, prob.p)
    ends = [*parts[1:], len(weights)]
    counts = [int(sum(weights[a:b])) for a, b in zip(parts, ends)]
    note = (f"param_balanced: {len(weights)} items (layers, prologue, epilogue); parameters "
            f"per stage {counts}")
    return _cuts_for(bounds[:-1], parts, prob.n), note


def _balanced_parts(weights: list[int], p: int) -> list[int]:
    """First item of each of ``p`` contiguous parts minimising the largest part's weight; among
    those, the split with the smallest sum of squared part weights (no needlessly empty parts).
    """
    k = len(weights)
    prefix = np.concatenate([[0], np.cumsum(np.asarray(weights, dtype=float))])
    j = np.arange(k + 1)[:, None]
    i = np.arange(k + 1)[None, :]
    seg = np.where(i <= j, prefix[j] - prefix[np.minimum(i, j)], np.inf)  # weight of [i, j)

    def run(cost: np.ndarray, combine: str, limit: float) -> tuple[np.ndarray, list[np.ndarray]]:
        f = np.where(seg[:, 0] <= limit, cost[:, 0], np.inf)
        choices = []
        for _ in range(1, p):
            ok = seg <= limit
            cand = np.maximum(f[None, :], cost) if combine == "max" else f[None, :] + cost
            cand = np.where(ok, cand, np.inf)
            arg = np.argmin(cand, axis=1)
            f = cand[np.arange(k + 1), arg]
            choices.append(arg)
        return f, choices

    f, _ = run(seg, "max", np.inf)
    bottleneck = float(f[k]) * (1 + 1e-12)
    _, choices = run(np.where(np.isfinite(seg), seg**2, np.inf), "sum", bottleneck)
    starts = [k]
    for arg in reversed(choices):
        starts.append(int(arg[starts[-1]]))
    return [0, *starts[::-1][:-1]] if p > 1 else [0]
