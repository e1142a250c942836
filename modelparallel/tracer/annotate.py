"""Run a traced graph node by node on fake tensors: shapes, FLOPs and saved activations.

Note [fake annotation]
~~~~~~~~~~~~~~~~~~~~~~
Every node of the flat graph module runs once under ``FakeTensorMode`` (tensors carry shape,
dtype and device but no data, so nothing is computed or allocated, and meta-device models work),
inside one ``FlopCounterMode`` (a multiply-add counts 2). Each node runs in isolation: its tensor
inputs are fresh autograd leaves (``detach`` keeps the storage, ``requires_grad`` is kept) and
parameters are the model's own tensors, so

- its **forward FLOPs** are what the counter sees while it runs;
- its **saved bytes** are the bytes of the distinct storages autograd saves for backward while it
  runs (``saved_tensors_hooks``), leaving out parameters and buffers, and leaving out storages an
  earlier node already saves (Note [saved storages counted once]);
- its **backward FLOPs** are what the counter sees while ``torch.autograd.grad`` takes the
  gradients of its grad-requiring outputs (all-ones upstream gradients) with respect to its
  grad-requiring inputs and parameters;
- its outputs' ``requires_grad`` is exactly autograd's: true for floating tensors that depend on
  a trainable parameter or on an input that requires grad.

A node whose annotation fails (it is retried on non-leaf views of its inputs, then, for in-place
ops, on clones) is run
again without autograd for its shapes, and gets 0 FLOPs and ``None`` for the measured fields,
with a note. If even that fails, the caller may rerun the whole propagation on the real example
batch (``real=True``; impossible for a meta model) or give up.

Note [fused attention on meta]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``scaled_dot_product_attention`` picks its kernel by device: on CUDA and CPU a fused kernel
(flash or memory-efficient attention) saves the query, key, value, mask, output and one float32
log-sum-exp per query row; on the meta device it falls back to the math path, which saves the
whole attention matrix (``batch * heads * L * L``), several times what training on any real
device keeps (an example: ``docs/measurements.md``). Models traced on
meta, as large models are, are planned for real devices, so there the node's saved bytes are
the fused kernels' instead; FLOPs are the same either way.

Note [causal attention FLOPs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch's FLOP formulas for SDPA (``sdpa_flop_count``) ignore ``is_causal``: they count the whole
``Lq x Lk`` score matrix. The fused kernels that run causal attention on GPUs and CPUs (flash,
memory-efficient, CPU flash) skip the blocks above the diagonal, so they do about half that work
(what that saves a GPT-2 step: ``docs/measurements.md``). A node with ``is_causal=True``
therefore counts its forward and backward FLOPs times the fraction of the score matrix the causal
mask keeps, ``sum_i min(i + 1, Lk) / (Lq * Lk)`` (``(L + 1) / 2L`` when ``Lq == Lk == L``;
``is_causal`` aligns the triangle to the top left). Block granularity (a diagonal block is
computed whole) is left out: 128-wide blocks at ``L = 1024`` do 12% more than the exact half.
Explicit masks, causal or not, are counted in full, as the kernels compute them in full. The
tracer turns materialised causal masks into ``is_causal=True`` (Note [causal masks] in
``masks.py``).

Note [saved storages counted once]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
One tensor is often saved by several nodes: a ReLU saves its output and the convolution after it
saves the same tensor as its input; Llama's RMSNorm saves its float32 input in ``pow`` and in
``mul``. Memory holds it once, so a storage counts only at the **first** node (in graph order) that
saves it; later savers count 0 for it. A stage then sums each storage once when all its savers
are on it. When a later saver sits on a later stage, the value reaches that stage across the
boundary, where the cost model counts it as a received value (Note [stage time and memory] in
``modelparallel/partitioner/problem.py``), so nothing is lost. Counted storages stay referenced
until the propagation ends, so a freed one cannot be mistaken for a new one at the same address.
(Counting per node overestimated the activations of measured stages: ``docs/measurements.md``.)

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
    >>> infos, notes = propagate(gm, [torch.randn(3, 4)], annotate=True)
    >>> infos["linear"].flops, infos["linear"].saved_bytes
    (48, 48)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from modelparallel.ir import TensorMeta

__all__ = ["NodeInfo", "PropagationError", "propagate", "tensor_meta"]


@dataclass(frozen=True)
class NodeInfo:
    """What running one node on fake tensors told us.

    Attributes:
        value_kind: ``"tensor"``, ``"tensors"``, ``"scalar"`` or ``"none"`` (see ``ir.Node``).
        outputs: Metadata of the tensor leaves of the node's value.
        flops: Forward FLOPs (0 when not measured).
        backward_flops: Backward FLOPs, ``None`` when not measured.
        saved_bytes: Activation bytes saved for backward, ``None`` when not measured.
    """

    value_kind: str
    outputs: tuple[TensorMeta, ...]
    flops: int = 0
    backward_flops: int | None = None
    saved_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.value_kind not in ("tensor", "tensors", "scalar", "none"):
            raise ValueError(f"bad value_kind {self.value_kind!r}")


class PropagationError(RuntimeError):
    """A node could not run even without autograd (internal; the tracer reports it)."""

    def __init__(self, node: str, cause: BaseException) -> None:
        super().__init__(f"node {node!r}: {type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


def _flash_cpu_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _flash_cpu_backward_flop(grad_out_shape: Any, query_shape: Any, key_shape: Any,
                             value_shape: Any, *args: Any, out_shape: Any = None,
                             **kwargs: Any) -> int:
    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas torch's counter lacks (the CPU flash-attention kernels of SDPA)."""
    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _flash_cpu_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            _flash_cpu_backward_flop
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    """IR metadata of a (real, meta or fake) tensor.

    Example:
        >>> tensor_meta(torch.zeros(2, 3))
        TensorMeta(shape=(2, 3), dtype='float32', requires_grad=False)
    """
    return TensorMeta(tuple(int(s) for s in t.shape), _dtype_name(t.dtype),
                      bool(t.requires_grad and (t.is_floating_point() or t.is_complex())))


def _describe(value: Any) -> tuple[str, tuple[TensorMeta, ...]]:
    if isinstance(value, torch.Tensor):
        return "tensor", (tensor_meta(value),)
    if value is None:
        return "none", ()
    if isinstance(value, list | tuple | dict):
        tensors = [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
        if tensors:
            return "tensors", tuple(tensor_meta(t) for t in tensors)
    return "scalar", ()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh autograd leaf over the same storage."""
    out = t.detach()
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def _view_leaf(t: torch.Tensor) -> torch.Tensor:
    """A non-leaf view of a fresh leaf: same storage, but not an autograd leaf (the FLOP
    counter's module tracker refuses leaves in ``autograd.grad`` for ``call_module`` nodes)."""
    out = _leaf(t)
    return out.view_as(out) if out.requires_grad else out


def _cloned_leaf(t: torch.Tensor) -> torch.Tensor:
    """A non-leaf copy, so in-place ops on it are allowed under autograd."""
    return _leaf(t).clone()


def _is_attention(node: torch.fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return "scaled_dot_product_attention" in name


def _causal_fraction(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """The share of SDPA's score matrix that ``is_causal=True`` keeps; 1.0 if not causal (Note
    [causal attention FLOPs])."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    values = {**dict(zip(names, args)), **kwargs}
    q, k = values.get("query"), values.get("key")
    if values.get("is_causal") is not True or not isinstance(q, torch.Tensor) \
            or not isinstance(k, torch.Tensor) or q.dim() < 2 or k.dim() < 2:
        return 1.0
    lq, lk = int(q.shape[-2]), int(k.shape[-2])
    if lq == 0 or lk == 0:
        return 1.0
    full = min(lq, lk)                     # rows 0..full-1 keep i + 1 keys, the rest keep lk
    kept = full * (full + 1) // 2 + (lq - full) * lk
    return kept / (lq * lk)


def _on_meta(args: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta"
               for t in pytree.tree_leaves(args))


def _fused_attention_saves(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
                           ) -> tuple[list[Any], int]:
    """What a fused SDPA kernel saves (Note [fused attention on meta]): the tensors to keep,
    and the bytes of its log-sum-exp rows."""
    names = ("query", "key", "value", "attn_mask")
    values = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
    keep = [values[k] for k in names if isinstance(values.get(k), torch.Tensor)]
    keep += [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    q = values.get("query")
    lse = 0
    if isinstance(q, torch.Tensor) and q.dim() >= 2:
        lse = 4 * math.prod(int(d) for d in q.shape[:-1])  # one float32 per query row
    return keep, lse


class _Runner:
    """Runs the nodes of one graph module in order (Note [fake annotation])."""

    def __init__(self, gm: torch.fx.GraphModule, *, annotate: bool,
                 fake_mode: FakeTensorMode | None) -> None:
        self.gm = gm
        self.annotate = annotate
        self.fake_mode = fake_mode
        self.env: dict[str, Any] = {}
        self.notes: list[str] = []
        self.counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
        # Parameters, buffers and constants as fake leaves, created once so that their storages
        # identify them in the saved tensors (and so that autograd sees them as leaves).
        self.attrs: dict[str, Any] = {}
        for name, t in (*gm.named_parameters(remove_duplicate=False),
                        *gm.named_buffers(remove_duplicate=False)):
            self.attrs[name] = self._as_fake(t)
        self.param_storages: set[StorageWeakRef] = {
            StorageWeakRef(t.untyped_storage()) for t in self.attrs.values()}
        # Storages some node already saves (Note [saved storages counted once]), kept alive.
        self.saved_seen: dict[StorageWeakRef, Any] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def _as_fake(self, t: torch.Tensor) -> torch.Tensor:
        if self.fake_mode is None:
            return t
        fake = self.fake_mode.from_tensor(t)
        if t.requires_grad and not fake.requires_grad:
            fake.requires_grad_(True)
        return fake

    def _attr(self, target: str) -> Any:
        if target in self.attrs:
            return self.attrs[target]
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _module_state(self, target: str) -> dict[str, torch.Tensor]:
        """The (fake) parameters and buffers of submodule ``target``, by local name."""
        if target not in self._states:
            mod = self.gm.get_submodule(target)
            self._states[target] = {
                local: self.attrs[f"{target}.{local}"]
                for local, _ in (*mod.named_parameters(remove_duplicate=False),
                                 *mod.named_buffers(remove_duplicate=False))}
        return self._states[target]

    def _args(self, node: torch.fx.Node, make_leaf: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
        grads: list[torch.Tensor] = []

        def load(n: torch.fx.Node) -> Any:
            value = self.env[n.name]
            if n.op == "get_attr":
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    grads.append(value)
                return value

            def fresh(t: torch.Tensor) -> torch.Tensor:
                leaf = make_leaf(t)
                if leaf.requires_grad:
                    grads.append(leaf)
                return leaf
            return pytree.tree_map_only(torch.Tensor, fresh, value)

        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        if node.op == "call_module":
            grads += [p for p in self._module_state(str(node.target)).values()
                      if p.requires_grad]
        return tuple(args), dict(kwargs), grads

    def _call(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if node.op == "call_function":
            assert callable(node.target)
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            target = str(node.target)
            return torch.func.functional_call(self.gm.get_submodule(target),
                                              self._module_state(target), args, kwargs)
        raise AssertionError(node.op)

    def _measured(self, node: torch.fx.Node, make_leaf: Callable[[torch.Tensor], torch.Tensor]
                  ) -> tuple[Any, int, int, dict[StorageWeakRef, Any], int]:
        args, kwargs, grad_inputs = self._args(node, make_leaf)
        saved: list[Any] = []

        def pack(t: Any) -> Any:
            saved.append(t)
            return t

        before = self.counter.get_total_flops()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self._call(node, args, kwargs)
        flops = self.counter.get_total_flops() - before
        extra = 0
        causal = 1.0
        if _is_attention(node):
            causal = _causal_fraction(args, kwargs)
            flops = round(flops * causal)
            if _on_meta(args):
                saved, extra = _fused_attention_saves(args, kwargs, out)
        storages: dict[StorageWeakRef, Any] = {}
        for t in saved:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref not in self.param_storages and ref not in self.saved_seen:
                    storages.setdefault(ref, st)
        outs = [t for t in pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None]
        backward = 0
        if outs and grad_inputs:
            before = self.counter.get_total_flops()
            torch.autograd.grad(outs, grad_inputs, [torch.ones_like(t) for t in outs],
                                allow_unused=True)
            backward = round((self.counter.get_total_flops() - before) * causal)
        return out, flops, backward, storages, extra

    def run_node(self, node: torch.fx.Node) -> NodeInfo:
        if node.op == "placeholder":
            raise AssertionError("placeholders are loaded by run()")
        if node.op == "get_attr":
            value = self._attr(str(node.target))
            self.env[node.name] = value
            kind, outs = _describe(value)
            return NodeInfo(kind, outs)
        if node.op == "output":
            return NodeInfo("none", ())
        errors: list[str] = []
        if self.annotate:
            for make_leaf in (_leaf, _view_leaf, _cloned_leaf):
                try:
                    out, flops, bwd, storages, extra = self._measured(node, make_leaf)
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                  if str(e) else type(e).__name__)
                    continue
                self.saved_seen.update(storages)
                saved = extra + sum(int(st.nbytes()) for st in storages.values())
                return self._store(node, out, flops, bwd, saved)
        try:
            args, kwargs, grads = self._args(node, _leaf)
            with torch.no_grad():
                out = self._call(node, args, kwargs)
        except Exception as e:
            raise PropagationError(node.name, e) from e
        if self.annotate:
            self.notes.append(f"node {node.name!r} ({node.target}) could not be annotated "
                              f"({'; '.join(errors)}); FLOPs 0, saved bytes unknown")
        # Without autograd, outputs of a node reading grad-requiring values are marked so.
        return self._store(node, out, 0, None, None, force_grad=bool(grads))

    def _store(self, node: torch.fx.Node, out: Any, flops: int, bwd: int | None,
               saved: int | None, force_grad: bool | None = None) -> NodeInfo:
        def leaf(t: torch.Tensor) -> torch.Tensor:
            if force_grad is None:
                return _leaf(t)
            fresh = t.detach()
            if force_grad and (fresh.is_floating_point() or fresh.is_complex()):
                fresh.requires_grad_(True)
            return fresh
        out = pytree.tree_map_only(torch.Tensor, leaf, out)
        self.env[node.name] = out
        kind, metas = _describe(out)
        return NodeInfo(kind, metas, int(flops), None if bwd is None else int(bwd),
                        None if saved is None else int(saved))

    def run(self, flat_inputs: Sequence[Any]) -> dict[str, NodeInfo]:
        infos: dict[str, NodeInfo] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == len(flat_inputs)
        for node, value in zip(placeholders, flat_inputs):
            if isinstance(value, torch.Tensor):
                value = _leaf(self._as_fake(value))
            self.env[node.name] = value
            kind, metas = _describe(value)
            infos[node.name] = NodeInfo(kind, metas, 0,
                                        0 if self.annotate else None,
                                        0 if self.annotate else None)
        with self.counter:
            for node in self.gm.graph.nodes:
                if node.op != "placeholder":
                    infos[node.name] = self.run_node(node)
        return infos


@contextlib.contextmanager
def _maybe_fake(real: bool) -> Iterator[FakeTensorMode | None]:
    if real:
        yield None
        return
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def propagate(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *, annotate: bool,
              real: bool = False) -> tuple[dict[str, NodeInfo], list[str]]:
    """Run ``gm`` node by node and describe every node (Note [fake annotation]).

    Args:
        gm: A flat graph module (one placeholder per flat input).
        flat_inputs: The example's flat input leaves (real or meta tensors, Python values).
        annotate: Measure FLOPs, backward FLOPs and saved bytes; otherwise only shapes.
        real: Run on the real example tensors instead of fake ones (slow; a fallback). Buffers
            the run updates in place (BatchNorm statistics) are restored afterwards.

    Returns:
        Node name to :class:`NodeInfo` for every node, and notes.

    Raises:
        PropagationError: if a node cannot run at all.
    """
    # A real run may update buffers in place (BatchNorm statistics): restore them afterwards.
    saved = {n: b.detach().clone() for n, b in gm.named_buffers()} if real else {}
    try:
        with _maybe_fake(real) as mode:
            runner = _Runner(gm, annotate=annotate, fake_mode=mode)
            infos = runner.run(flat_inputs)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                gm.get_buffer(name).copy_(value)
    return infos, runner.notes
