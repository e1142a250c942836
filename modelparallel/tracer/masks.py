"""Attention masks built from shapes alone: replace a causal one by ``is_causal=True``.

Note [causal masks]
~~~~~~~~~~~~~~~~~~~
Hugging Face models decide at run time whether SDPA can take ``is_causal=True`` instead of an
explicit mask (``transformers.masking_utils._ignore_causal_mask_sdpa``). They refuse the
shortcut while being traced or exported, because an exported graph might later be used for
decoding with a KV cache (``q_len == 1``, ``kv_len > 1``), where ``is_causal`` would be wrong
(pytorch#108108). So the traced graph materialises the causal mask as an explicit bool tensor
(``arange``, ``diff``, ``cumsum``, ``index``, ``le``, ``and``, ``expand``), and SDPA then runs a
masked kernel over the whole ``L x L`` square instead of the causal flash kernel, which skips the
upper half (slower training: ``docs/measurements.md``).

Our graphs are training graphs: the tracer sets ``use_cache=False`` (Note [tracer paths] in
``tracing.py``; the pass is skipped when the caller asks for a cache), so a self-attention's
queries and keys always have the same length, and a mask that is exactly the lower triangle is
what ``is_causal=True`` computes. :func:`simplify_attention_masks` makes that
rewrite only when it can show the mask does not depend on data:

1. **Shape-only.** The mask's ancestors, up to reads of tensor *metadata* (``aten.sym_size``,
   ``.size()``, ``.dim()``, ``.shape``, ``.dtype``, ``.device``, our ``input_device``), contain no
   placeholder (a model input's values), no parameter, no meta buffer (no values), no module
   call and no random op, and no node of that subgraph is mutated in place by a node outside it.
   So its value is a function of input shapes (and real constant buffers) only.
2. **Evaluated.** That subgraph runs on the CPU at the example's shapes: inputs are fake tensors
   of the example's shapes (the model may be on the meta device), metadata reads of intermediate
   tensors come from a fake-tensor run of their producers, the mask's own ops run for real on
   the CPU, and device reads answer ``cpu``. The mask is classified: **causal** when it is exactly
   ``tril(ones(L, L))`` over its last two dimensions (``L > 1``) in every batch/head slice it
   broadcasts over; **none** when it masks nothing; else **other**. A bool mask allows where it
   is True; a float mask must hold only ``0`` (allowed) and ``-inf`` or its dtype's lowest value
   (masked), else it is other.
3. **Checked at a second length.** The evaluation is repeated with the input dimensions equal to
   the mask's length ``L`` doubled (for torch.export graphs only those that stayed symbolic):
   all of them at once, else each alone (a feature dimension may merely equal ``L``), until a
   run gives a mask of length ``2 L``. Both classes must agree. A graph with no such dimension
   (a static export) is valid at the example's shapes only, so one check is complete; if no run
   succeeds, the first check decides and a note says so.
4. **Windows.** A sliding-window or chunked mask wider than both lengths looks causal at both.
   So nothing is rewritten when a Hugging Face config of the model has ``sliding_window`` set
   (and ``use_sliding_window`` not False), ``attention_chunk_size`` set, or ``layer_types``
   other than ``"full_attention"``; a note says why. A hand-written band mask of width ``W >=
   2 L`` is not detected (see the docstring's limits).

A causal mask becomes ``is_causal=True`` and ``attn_mask`` is dropped; a mask that masks nothing
is dropped; the mask's subgraph is then dead and erased. The cost model follows: a causal SDPA
node counts only the FLOPs of the unmasked triangle (Note [causal attention FLOPs] in
``annotate.py``), and no mask is saved for backward any more.

Step 1 (recognising SDPA calls, metadata reads and a mask's shape-only region) lives in
:mod:`~modelparallel.tracer.mask_region`; evaluating, classifying and rewriting live here.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from modelparallel.errors import ConfigError
from modelparallel.tracer.mask_region import (
    _bind,
    _is_meta_read,
    _is_sdpa,
    _metadata_inputs,
    _mutates,
    _reads_device,
    _region,
)

__all__ = ["MaskSimplification", "simplify_attention_masks"]

_MAX_SINGLE_TRIES = 8


@dataclass(frozen=True)
class MaskSimplification:
    """What :func:`simplify_attention_masks` did to one graph.

    Attributes:
        causal: SDPA calls whose materialised causal mask became ``is_causal=True``.
        dropped: SDPA calls whose mask masked nothing and was removed.
        kept: Why the masks of the other SDPA calls with a mask were kept: reason -> calls.
        windowed: The Hugging Face config setting that disabled the pass (sliding window or
            chunked attention), or ``None``.
        single_length: SDPA calls rewritten after a check at the example's length only (the
            second length could not be evaluated).
        erased: Graph nodes erased (the masks' dead subgraphs).
    """

    causal: int = 0
    dropped: int = 0
    kept: Mapping[str, int] = field(default_factory=dict)
    windowed: str | None = None
    single_length: int = 0
    erased: int = 0

    def __post_init__(self) -> None:
        counts = (self.causal, self.dropped, self.single_length, self.erased,
                  *self.kept.values())
        if any(not isinstance(c, int) or c < 0 for c in counts):
            raise ConfigError(f"MaskSimplification counts must be integers >= 0, got {self}")
        object.__setattr__(self, "kept", dict(self.kept))

    @property
    def notes(self) -> list[str]:
        """One line per thing done or refused, for ``TracedModel.notes``."""
        # No square brackets: the CLI prints notes through rich, which reads them as markup.
        where = "(see the causal-masks note in modelparallel/tracer/masks.py)"
        out: list[str] = []
        if self.windowed is not None:
            out.append(f"attention: masks left as traced because {self.windowed} (a window "
                       f"can look causal at the example's length) {where}")
        if self.causal:
            out.append(f"attention: {self.causal} materialised causal mask(s) replaced by "
                       f"is_causal=True {where}")
        if self.dropped:
            out.append(f"attention: {self.dropped} all-true mask(s) dropped {where}")
        if self.single_length:
            out.append(f"attention: {self.single_length} of those checked at the example's "
                       "sequence length only (the graph did not evaluate at another length)")
        for reason, n in sorted(self.kept.items()):
            out.append(f"attention: {n} mask(s) kept: {reason}")
        return out


# -- evaluating a mask ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    """Shape and dtype of a tensor input."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _ancestors(nodes: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _call(node: torch.fx.Node, gm: torch.fx.GraphModule, args: tuple[Any, ...],
          kwargs: dict[str, Any], fake: FakeTensorMode) -> Any:
    if node.op == "call_function":
        assert callable(node.target)
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    assert node.op == "call_module", node.op
    mod = gm.get_submodule(str(node.target))
    with fake:
        state = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
                 for k, v in (*mod.named_parameters(), *mod.named_buffers())}
    return torch.func.functional_call(mod, state, args, kwargs)


def _evaluate(gm: torch.fx.GraphModule, mask: torch.fx.Node, region: set[torch.fx.Node],
              shapes: Sequence[Any]) -> Any:
    """The mask's value, on the CPU, for inputs of the given shapes (Note [causal masks], 2).

    ``shapes`` holds, per placeholder, a :class:`_TensorSpec` or the Python value.
    """
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # a failing op is our answer, not the user's problem
    try:
        return _run_region(gm, mask, region, shapes)
    finally:
        logger.setLevel(level)


def _run_region(gm: torch.fx.GraphModule, mask: torch.fx.Node, region: set[torch.fx.Node],
                shapes: Sequence[Any]) -> Any:
    frontier_inputs = [a for n in region if not _reads_device(n) for a in _metadata_inputs(n)]
    needed = region | _ancestors(frontier_inputs)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(shapes)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spec = next(placeholders)
            if node in needed:
                if isinstance(spec, _TensorSpec):
                    with fake:
                        env[node] = torch.empty(spec.shape, dtype=spec.dtype)
                else:
                    env[node] = spec
            continue
        if node not in needed:
            continue
        if node.op == "get_attr":
            value = operator.attrgetter(str(node.target))(gm)
            if isinstance(value, torch.Tensor):
                if node in region:
                    value = value.detach().cpu().clone()
                else:
                    with fake:
                        value = torch.empty_strided(value.shape, value.stride(),
                                                    dtype=value.dtype)
            env[node] = value
            continue
        if _reads_device(node):
            env[node] = torch.device("cpu")
            continue
        args = torch.fx.node.map_arg(node.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
        if _is_meta_read(node):
            env[node] = _call(node, gm, tuple(args), dict(kwargs), fake)
        elif node in region:
            args, kwargs = torch.utils._pytree.tree_map_only(
                FakeTensor, lambda t: torch.zeros(t.shape, dtype=t.dtype), (args, kwargs))
            with torch.no_grad():
                env[node] = _call(node, gm, tuple(args), dict(kwargs), fake)
        else:
            with fake, torch.no_grad():
                env[node] = _call(node, gm, tuple(args), dict(kwargs), fake)
    return env[mask]


def _classify(mask: Any) -> str:
    """``"causal"``, ``"none"`` or ``"other"`` (Note [causal masks], 2)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
        return "other"
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        masked = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
        allowed = mask == 0
        if not bool((allowed | masked).all()):
            return "other"
    else:
        return "other"
    if bool(allowed.all()):
        return "none"
    if allowed.dim() < 2:
        return "other"
    rows, cols = allowed.shape[-2:]
    if rows != cols or rows < 2:
        return "other"
    tril = torch.ones(rows, cols, dtype=torch.bool).tril()
    return "causal" if bool((allowed == tril).all()) else "other"


def _example_specs(flat_inputs: Sequence[Any]) -> list[Any]:
    return [_TensorSpec(tuple(int(s) for s in x.shape), x.dtype)
            if isinstance(x, torch.Tensor) else x for x in flat_inputs]


def _symbolic_dims(node: torch.fx.Node) -> set[int] | None:
    """Dimensions of a placeholder that torch.export kept symbolic; None for fx graphs."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return {i for i, s in enumerate(val.shape) if not isinstance(s, int) and not _is_int(s)}


def _is_int(s: Any) -> bool:
    try:
        int(str(s))
    except ValueError:
        return False
    return True


def _longer(gm: torch.fx.GraphModule, specs: Sequence[Any], length: int
            ) -> Iterator[list[Any]]:
    """Input specs for the second check (Note [causal masks], 3): first with every candidate
    dimension (equal to ``length``; for torch.export graphs, symbolic) doubled, then with each
    candidate alone doubled (a feature dimension may merely equal the sequence length)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates: list[tuple[int, int]] = []
    for k, (node, spec) in enumerate(zip(placeholders, specs)):
        if isinstance(spec, _TensorSpec):
            dims = _symbolic_dims(node)
            candidates += [(k, i) for i, s in enumerate(spec.shape)
                           if s == length and (dims is None or i in dims)]

    def doubled(chosen: Sequence[tuple[int, int]]) -> list[Any]:
        out = list(specs)
        for k, i in chosen:
            spec = out[k]
            out[k] = _TensorSpec((*spec.shape[:i], 2 * spec.shape[i], *spec.shape[i + 1:]),
                                 spec.dtype)
        return out

    if candidates:
        yield doubled(candidates)
    if len(candidates) > 1:
        for one in candidates[:_MAX_SINGLE_TRIES]:
            yield doubled([one])


# -- Hugging Face windows ------------------------------------------------------------------------


def _window_setting(model: nn.Module | None) -> str | None:
    """The config setting that makes masks windowed (Note [causal masks], 4), or None."""
    if model is None:
        return None
    seen: set[int] = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        seen.add(id(cfg))
        name = type(cfg).__name__
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) is not False:
            return f"{name}.sliding_window={window}"
        chunk = getattr(cfg, "attention_chunk_size", None)
        if chunk is not None:
            return f"{name}.attention_chunk_size={chunk}"
        layers = getattr(cfg, "layer_types", None)
        if isinstance(layers, list | tuple) and any(t != "full_attention" for t in layers):
            other = sorted({str(t) for t in layers if t != "full_attention"})
            return f"{name}.layer_types has {', '.join(other)}"
    return None


# -- the pass ------------------------------------------------------------------------------------


@dataclass
class _Verdict:
    kind: str  # "causal", "none" or "kept"
    reason: str = ""
    single_length: bool = False
    region: set[torch.fx.Node] = field(default_factory=set)


def _judge(gm: torch.fx.GraphModule, mask: torch.fx.Node, params: frozenset[str],
           specs: Sequence[Any]) -> _Verdict:
    region, refusal = _region(mask, gm, params)
    if refusal is not None:
        return _Verdict("kept", f"not shape-only: {refusal}")
    try:
        value = _evaluate(gm, mask, region, specs)
    except Exception as e:
        return _Verdict("kept", f"could not be evaluated ({type(e).__name__})")
    kind = _classify(value)
    if kind == "other":
        return _Verdict("kept", "neither causal nor all-true")
    length = int(value.shape[-1])
    tried = False
    for longer in _longer(gm, specs, length):
        tried = True
        try:
            again = _evaluate(gm, mask, region, longer)
        except Exception:
            continue
        if not isinstance(again, torch.Tensor) or int(again.shape[-1]) != 2 * length:
            continue  # that input dimension is not the mask's length
        second = _classify(again)
        if second != kind:
            return _Verdict("kept", f"{kind} at the example's length but {second} at twice it")
        return _Verdict(kind, region=region)
    # No candidate dimension: a static graph, valid at the example's shapes only.
    return _Verdict(kind, single_length=tried, region=region)


def _rewrite(node: torch.fx.Node, causal: bool) -> None:
    bound = _bind(node)
    rest = {k: v for k, v in bound.items()
            if k not in ("query", "key", "value", "attn_mask", "is_causal")}
    if causal:
        rest["is_causal"] = True
    node.args = (bound["query"], bound["key"], bound["value"])
    node.kwargs = rest


def _erase_dead(gm: torch.fx.GraphModule, candidates: set[torch.fx.Node]) -> int:
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node in candidates and node.op != "placeholder" and not node.users \
                and not _mutates(node, gm):
            gm.graph.erase_node(node)
            erased += 1
    return erased


def simplify_attention_masks(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                             model: nn.Module | None = None) -> MaskSimplification:
    """Replace SDPA masks built from shapes alone: causal ones by ``is_causal=True``, all-true
    ones by nothing (Note [causal masks]).

    Rewrites ``gm`` in place (and recompiles it) when anything changed.

    Args:
        gm: A flat graph module (one placeholder per flat input), from torch.fx or torch.export.
        flat_inputs: The example's flat inputs (real or meta tensors, Python values); only
            their shapes and dtypes are used.
        model: The traced model, whose Hugging Face configs are checked for windowed attention.

    Returns:
        What was done, with notes for ``TracedModel.notes``.

    Raises:
        ConfigError: if ``flat_inputs`` does not hold one value per placeholder of ``gm``.

    Note:
        Only functional SDPA calls are seen (not ``nn.MultiheadAttention`` modules); masks that
        depend on input values (padding) are kept; a hand-written band mask at least twice as
        wide as the example is long would be taken for a causal one.

    Example:
        >>> import torch.nn.functional as F
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, x):
        ...         n = x.size(-2)
        ...         mask = x.new_ones(n, n, dtype=torch.bool).tril()
        ...         return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
        >>> gm = torch.fx.symbolic_trace(Attn())
        >>> x = torch.randn(2, 3, 8, 4)
        >>> expected = gm(x)
        >>> done = simplify_attention_masks(gm, [x])
        >>> done.causal, done.erased
        (1, 3)
        >>> sdpa = next(n for n in gm.graph.nodes if "scaled_dot" in str(n.target))
        >>> sdpa.kwargs
        {'is_causal': True}
        >>> torch.allclose(gm(x), expected, atol=1e-6)
        True
    """
    sdpas = [n for n in gm.graph.nodes if _is_sdpa(n)
             and isinstance(_bind(n).get("attn_mask"), torch.fx.Node)]
    if not sdpas:
        return MaskSimplification()
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(flat_inputs) != n_inputs:
        raise ConfigError(
            f"simplify_attention_masks got {len(flat_inputs)} flat inputs for a graph with "
            f"{n_inputs} placeholders; pass one example value per placeholder, in order")
    window = _window_setting(model)
    if window is not None:
        return MaskSimplification(windowed=window)
    params = frozenset(name for name, _ in gm.named_parameters(remove_duplicate=False))
    specs = _example_specs(flat_inputs)
    verdicts: dict[torch.fx.Node, _Verdict] = {}
    counts = {"causal": 0, "none": 0}
    kept: dict[str, int] = {}
    single = 0
    dead: set[torch.fx.Node] = set()
    for node in sdpas:
        bound = _bind(node)
        mask = bound["attn_mask"]
        if bound.get("is_causal") is True:
            kept["is_causal=True is given as well"] = kept.get(
                "is_causal=True is given as well", 0) + 1
            continue
        if mask not in verdicts:
            verdicts[mask] = _judge(gm, mask, params, specs)
        verdict = verdicts[mask]
        if verdict.kind == "kept":
            kept[verdict.reason] = kept.get(verdict.reason, 0) + 1
            continue
        _rewrite(node, causal=verdict.kind == "causal")
        counts[verdict.kind] += 1
        single += verdict.single_length
        dead |= verdict.region
    erased = 0
    if counts["causal"] or counts["none"]:
        erased = _erase_dead(gm, dead)
        gm.graph.lint()
        gm.recompile()
    return MaskSimplification(causal=counts["causal"], dropped=counts["none"], kept=kept,
                              single_length=single, erased=erased)
