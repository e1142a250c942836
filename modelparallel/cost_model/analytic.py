"""The analytic cost model: each node's device and host times from an op table (Note [op
table] in ``op_table.py``), with no profiling of the model and no torch.

Note [analytic cost model]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Planning offline (a laptop, a CI job, a cluster one does not have yet) cannot profile the model
on its GPU, and the roofline (Note [roofline] in ``costs.py``) misses where real kernels do not
reach their peak: small or misaligned matrix products, attention, batch norm, the launch floor
of small kernels, and the host's time to queue the ops of a host-bound stage. The analytic model
gives every node a :class:`~modelparallel.cost_model.node_replay.NodeProfile` built from the
device kind's op table, measured once per device kind on synthetic ops (``partition-plan
calibrate --ops``), and then goes the way of profiling mode: per-node times from the host/device
replay over the graph, each stage replayed alone with the call overhead (Notes [host and device
time] in ``node_replay.py``, [stage replay] and [call overhead] in ``replay.py``).

Each node is mapped to an op family and a size (:func:`op_family`):

- **matmul** (``linear``, ``addmm``, ``mm``, ``bmm``, ``matmul``, ``nn.Linear``): M (rows of
  the output), N (its last dimension), K (the reduced one: the input's last dimension); family
  by the alignment of the leading dimensions N and K (the forward's and both backward
  products' row-major operands have no other): ``matmul`` when both are multiples of 8,
  ``matmul_even`` when both are even (BERT's 30522-word vocabulary), ``matmul_unaligned``
  when one is odd (GPT-2's 50257 words). cuBLAS picks its kernels by the operands' byte
  alignment, and the three classes run at very different rates, so they are calibrated apart
  (figures: ``docs/measurements.md``). Work ``M*N*K``.
- **convolution** (``convolution``, ``conv2d``, ``nn.Conv2d``): the implicit GEMM's M =
  batch*Hout*Wout, N = Cout, K = Cin/groups*kh*kw; ``conv_k1``, ``conv_k3`` or ``conv_k7`` by
  kernel size. Work ``M*N*K``.
- **attention** (``scaled_dot_product_attention`` and its kernels): batch*heads, key length and
  head dim; ``attention_mask`` when a mask is passed (a fourth input), ``attention_causal`` when
  the traced FLOPs are those of a causal mask, else ``attention``. Work ``BH*Sq*Skv*D``.
- **bandwidth-bound ops**, one family per op (``layer_norm``, ``batch_norm``, ``relu``,
  ``gelu``, ``mul``, ``add``, ``to`` (a dtype conversion), ``cat``, ``embedding``,
  ``max_pool``...): the bytes of the largest tensor the op reads or writes; unknown ops use
  ``copy``'s curve (backward: twice it).
- **views** move no data, except: a slice's backward (``slice``: zeros and a copy), an
  expand's (``expand``: a sum), a split's (``split``: a concatenation), and a reshape of an
  expanded value, which copies (``copy``). They, and shape queries, still cost host time
  (``view``, ``scalar``).

Forward device time is the family's forward at that size (a grid: seconds per unit of work
times the work); the backward likewise, scaled where fewer inputs need a gradient than in the
calibration (a matmul whose input needs none computes only the weight's gradient: the traced
backward FLOPs over twice the forward's; a binary op with one such input: half); a value read by
``k`` nodes that pass a gradient back pays ``k - 1`` additions of its gradient (``add``'s
forward), as autograd sums them. Host times are the family's (plus ``module_call`` for an
``nn.Module`` node). A node whose family the table lacks keeps the roofline, with the spec's
per-op overhead as its host time. What this gets right and wrong is measured in
``docs/measurements.md`` (from ``benchmarks/cost_model_fidelity.py``'s ``analytic`` column):
device times per family come within a few percent of profiling on an H200; host times are the
weaker half (the backward host time of families the calibration cannot chain over-counts,
Note [op calibration] in ``measure/ops.py``).

Example:
    >>> from modelparallel.cost_model.op_table import Curve, Grid, OpEntry, OpTable
    >>> from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
    >>> g = Graph("lin", (
    ...     Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((64, 1024), "float32"),)),
    ...     Node("fc", OpKind.CALL_FUNCTION, "aten.linear.default", inputs=("x",),
    ...          params=("w",), outputs=(TensorMeta((64, 1024), "float32", True),),
    ...          flops=2 * 64 * 1024 * 1024),
    ...     Node("output", OpKind.OUTPUT, "output", inputs=("fc",))),
    ...     params=(Param("w", (1024, 1024), "float32"),))
    >>> grid = Grid(((1.0,), (1.0,), (1.0,)), (1e-13,))   # 0.1 ps per multiply-add
    >>> table = OpTable("toy", {"matmul:float32": OpEntry(grid, grid, 5e-6, 3e-6)})
    >>> p = analytic_profiles(g, table, "cpu")["fc"]
    >>> round(p.device_forward * 1e6, 2), p.host_forward
    (6.71, 5e-06)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from modelparallel.cost_model.costs import GraphCosts, estimate_costs, is_view_like
from modelparallel.cost_model.device import DeviceSpec, get_device_spec
from modelparallel.cost_model.node_replay import NodeProfile, host_replay, node_times
from modelparallel.cost_model.op_table import Curve, Grid, OpEntry, OpTable
from modelparallel.cost_model.replay import CallOverhead
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph, Node, OpKind

__all__ = [
    "OpSize",
    "analytic_costs",
    "analytic_profiles",
    "bandwidth_families",
    "op_family",
]

_MATMUL = frozenset({"linear", "addmm", "mm", "bmm", "matmul", "baddbmm"})
_CONV = frozenset({"convolution", "conv2d", "conv1d", "_convolution", "cudnn_convolution"})
_ATTENTION = frozenset({"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                        "_scaled_dot_product_efficient_attention",
                        "_scaled_dot_product_cudnn_attention"})

#: Op short names (aten, ``torch.nn.functional``, ``operator`` and lower-cased module class
#: names) to their bandwidth-bound family in the op table.
_BANDWIDTH: Mapping[str, str] = {
    **{k: "layer_norm" for k in ("layer_norm", "native_layer_norm", "layernorm")},
    **{k: "batch_norm" for k in ("batch_norm", "_native_batch_norm_legit",
                                 "native_batch_norm", "cudnn_batch_norm", "batchnorm2d",
                                 "batchnorm1d", "_batch_norm_impl_index")},
    **{k: "group_norm" for k in ("group_norm", "native_group_norm", "groupnorm")},
    **{k: "relu" for k in ("relu", "relu_", "threshold", "relu6", "hardtanh", "leaky_relu")},
    **{k: "gelu" for k in ("gelu", "gelu_")},
    **{k: "silu" for k in ("silu", "silu_")},
    **{k: "tanh" for k in ("tanh", "tanh_")},
    **{k: "sigmoid" for k in ("sigmoid", "sigmoid_")},
    **{k: "neg" for k in ("neg", "abs", "sign")},
    **{k: "rsqrt" for k in ("rsqrt", "sqrt", "reciprocal")},
    **{k: "exp" for k in ("exp", "log", "erf", "sin", "cos")},
    **{k: "pow" for k in ("pow",)},
    **{k: "add" for k in ("add", "add_", "iadd", "sub", "sub_", "rsub")},
    **{k: "mul" for k in ("mul", "mul_", "imul", "div", "div_", "truediv", "where",
                          "masked_fill")},
    **{k: "to" for k in ("to", "_to_copy", "type_as", "float", "half", "bfloat16")},
    **{k: "mean" for k in ("mean", "sum", "amax", "var", "std")},
    **{k: "softmax" for k in ("softmax", "_softmax", "log_softmax", "_log_softmax")},
    **{k: "cat" for k in ("cat", "stack", "concat")},
    **{k: "embedding" for k in ("embedding",)},
    **{k: "max_pool" for k in ("max_pool2d", "max_pool2d_with_indices", "maxpool2d")},
    **{k: "avg_pool" for k in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "avg_pool2d",
                               "adaptiveavgpool2d", "avgpool2d")},
    **{k: "dropout" for k in ("dropout", "native_dropout", "dropout_")},
    **{k: "copy" for k in ("clone", "contiguous", "copy", "copy_")},
}

#: Bandwidth-bound families whose calibration passes a gradient to two inputs (a node passing
#: it to one pays half the backward).
_BINARY = frozenset({"add", "mul"})
_SLICES = frozenset({"slice", "select", "narrow"})
_SPLITS = frozenset({"split", "split_with_sizes", "chunk", "unbind"})
_NON_CONTIGUOUS = frozenset({"expand", "expand_as"})


def bandwidth_families() -> tuple[str, ...]:
    """Every bandwidth-bound family an op table may hold (the calibration measures these).

    Example:
        >>> "layer_norm" in bandwidth_families()
        True
    """
    return tuple(sorted({*_BANDWIDTH.values(), "slice", "expand", "split"}))


@dataclass(frozen=True)
class OpSize:
    """How an op table reads one node (Note [analytic cost model]).

    Attributes:
        family: The op family (``"matmul"``, ``"conv_k3"``, ``"layer_norm"``...), ``"view"``
            (no device work) or ``"scalar"`` (a shape query, a Python value).
        dtype: The compute dtype (grids are keyed by it).
        dims: A grid's three coordinates (empty for curves).
        work: A grid's units of work (its value is seconds per unit).
        size: A curve's size: bytes of the largest tensor read or written.
        backward_scale: Fraction of the calibrated backward this node does.
    """

    family: str
    dtype: str = "float32"
    dims: tuple[float, float, float] | tuple[()] = ()
    work: float = 0.0
    size: float = 0.0
    backward_scale: float = 1.0


def _short_name(node: Node) -> str:
    if node.op is OpKind.CALL_MODULE:
        return node.module_type.lower()
    parts = [x for x in re.split(r"[.:]", node.target) if x]
    while len(parts) > 1 and parts[-1] in ("default", "Tensor", "Scalar", "int", "dim", "self",
                                            "out", "Tensor_Scalar", "Tensor_Tensor", "dtype",
                                            "dtype_layout", "device", "using_ints", "input",
                                            "memory_format"):
        parts.pop()
    return parts[-1].lower() if parts else ""


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _first_shape(graph: Graph, node: Node, i: int) -> tuple[int, ...] | None:
    if i >= len(node.inputs):
        return None
    src = graph.node(node.inputs[i])
    return tuple(src.outputs[0].shape) if src.outputs else None


def _compute_dtype(node: Node, graph: Graph) -> str:
    for t in node.outputs:
        if t.is_floating:
            return t.dtype
    for p in node.params:
        return graph.param(p).dtype
    return "float32"


def _needs_grad(node: Node, graph: Graph) -> bool:
    return node.grad_bytes > 0 or any(graph.param(p).trainable for p in node.params)


def _grad_inputs(node: Node, graph: Graph) -> int:
    return (sum(1 for s in node.inputs if graph.node(s).grad_bytes > 0)
            + sum(1 for p in node.params if graph.param(p).trainable))


def _largest_bytes(node: Node, graph: Graph) -> int:
    sizes = [node.output_bytes, *(graph.node(s).output_bytes for s in node.inputs),
             *(graph.param(p).nbytes for p in node.params)]
    return max(sizes) if sizes else 0


def _weight_shape(node: Node, graph: Graph) -> tuple[int, ...] | None:
    shapes = [tuple(graph.param(p).shape) for p in node.params]
    big = [s for s in shapes if len(s) >= 2]
    return max(big, key=_numel) if big else None


def _backward_share(node: Node) -> float:
    """Fraction of a full backward (input and weight gradients) the traced FLOPs say the node
    does: the weight's gradient alone is half."""
    if node.flops > 0 and node.backward_flops is not None:
        return min(1.0, max(0.0, node.backward_flops / (2.0 * node.flops)))
    return 1.0


def _matmul_alignment(n: int, k: int) -> str:
    """The matmul family of an ``(M, K) x (K, N)`` product by the alignment of its leading
    dimensions ``N`` and ``K`` (Note [analytic cost model]); ``M`` is no leading dimension of
    the forward's or either backward product's row-major operands."""
    if n % 8 == 0 and k % 8 == 0:
        return "matmul"
    return "matmul_even" if n % 2 == 0 and k % 2 == 0 else "matmul_unaligned"


def _matmul_size(node: Node, graph: Graph, dtype: str) -> OpSize | None:
    if not node.outputs or not node.outputs[0].shape:
        return None
    out = tuple(node.outputs[0].shape)
    n = out[-1]
    m = _numel(out) // max(n, 1)
    weight = _weight_shape(node, graph)
    k = 0
    if weight is not None and len(weight) == 2:
        k = weight[1] if weight[0] == n else weight[0]
    else:
        a = _first_shape(graph, node, 1 if _short_name(node) in ("addmm", "baddbmm") and
                         len(node.inputs) >= 3 else 0)
        if a:
            k = a[-1]
    if k <= 0 and node.flops > 0:
        k = max(1, round(node.flops / (2 * m * n)))
    if min(m, n, k) <= 0:
        return None
    family = _matmul_alignment(n, k)
    return OpSize(family, dtype, (float(m), float(n), float(k)), float(m) * n * k,
                  backward_scale=_backward_share(node))


def _conv_size(node: Node, graph: Graph, dtype: str) -> OpSize | None:
    weight = _weight_shape(node, graph)
    if weight is None or len(weight) < 3 or not node.outputs:
        return None
    out = tuple(node.outputs[0].shape)
    if len(out) < 3:
        return None
    kernel = _numel(weight[2:])
    m = out[0] * _numel(out[2:])
    n, k = out[1], weight[1] * kernel
    side = round(kernel ** (1 / len(weight[2:])))
    family = "conv_k1" if side <= 1 else "conv_k3" if side <= 4 else "conv_k7"
    return OpSize(family, dtype, (float(m), float(n), float(k)), float(m) * n * k,
                  backward_scale=_backward_share(node))


def _attention_size(node: Node, graph: Graph, dtype: str) -> OpSize | None:
    q, kv = _first_shape(graph, node, 0), _first_shape(graph, node, 1)
    if not q or not kv or len(q) < 3:
        return None
    sq, d, skv = q[-2], q[-1], kv[-2]
    bh = _numel(q) // max(sq * d, 1)
    work = float(bh) * sq * skv * d
    if len(node.inputs) >= 4:
        family = "attention_mask"
    elif node.flops > 0 and node.flops < 0.75 * 4 * work:
        family = "attention_causal"
    else:
        family = "attention"
    return OpSize(family, dtype, (float(bh), float(skv), float(d)), work)


def op_family(node: Node, graph: Graph) -> OpSize | None:
    """How the op table reads ``node``: its family and size (Note [analytic cost model]);
    None for nodes with no cost at all (placeholders, outputs, attributes).

    Example:
        >>> from modelparallel.ir import Graph, Node, OpKind, TensorMeta
        >>> g = Graph("g", (
        ...     Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((8, 1024), "bfloat16"),)),
        ...     Node("r", OpKind.CALL_FUNCTION, "aten.relu.default", inputs=("x",),
        ...          outputs=(TensorMeta((8, 1024), "bfloat16"),)),
        ...     Node("output", OpKind.OUTPUT, "output", inputs=("r",))))
        >>> op_family(g.node("r"), g)
        OpSize(family='relu', dtype='bfloat16', dims=(), work=0.0, size=16384.0, backward_scale=1.0)
    """
    if node.op in (OpKind.PLACEHOLDER, OpKind.OUTPUT, OpKind.GET_ATTR):
        return None
    name = _short_name(node)
    dtype = _compute_dtype(node, graph)
    if node.value_kind in ("scalar", "none"):
        return OpSize("scalar", dtype)
    if name in _MATMUL:
        return _matmul_size(node, graph, dtype) or OpSize("copy", dtype,
                                                          size=_largest_bytes(node, graph))
    if name in _CONV:
        return _conv_size(node, graph, dtype) or OpSize("copy", dtype,
                                                        size=_largest_bytes(node, graph))
    if name in _ATTENTION:
        return _attention_size(node, graph, dtype) or OpSize(
            "copy", dtype, size=_largest_bytes(node, graph))
    size = float(_largest_bytes(node, graph))
    if name == "dropout" and not node.is_random:
        return OpSize("view", dtype)  # p = 0 or eval: returns its input
    if name == "to" and node.inputs and node.outputs:
        src = graph.node(node.inputs[0])
        if src.outputs and src.outputs[0].dtype == node.outputs[0].dtype:
            return OpSize("view", dtype)  # no conversion: returns its input
    if name in _BANDWIDTH:
        family = _BANDWIDTH[name]
        if family == "embedding":  # read by what it gathers (its table: Note [op calibration])
            size = float(node.output_bytes)
        scale = 1.0
        if family in _BINARY:
            scale = min(2, max(1, _grad_inputs(node, graph))) / 2
        return OpSize(family, dtype, size=size, backward_scale=scale)
    if node.flops == 0:
        if name in _SLICES:
            return OpSize("slice", dtype, size=size)
        if name in _SPLITS:
            return OpSize("split", dtype, size=size)
        if name in _NON_CONTIGUOUS:
            return OpSize("expand", dtype, size=size)
        if name in ("reshape", "flatten") and node.inputs and _short_name(
                graph.node(node.inputs[0])) in _NON_CONTIGUOUS:
            return OpSize("copy", dtype, size=size, backward_scale=0.0)
        if is_view_like(node) or name == "getitem":
            return OpSize("view", dtype)
    return OpSize("copy", dtype, size=size, backward_scale=2.0)


def _device(model: Curve | Grid, s: OpSize) -> float:
    if isinstance(model, Grid):
        if not s.dims:
            return 0.0
        d0, d1, d2 = s.dims  # type: ignore[misc]
        return model(d0, d1, d2) * s.work
    return model(s.size)


def _users(graph: Graph) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for node in graph.nodes:
        for s in dict.fromkeys(node.inputs):
            users.setdefault(s, []).append(node.name)
    return users


def _entry(table: OpTable, s: OpSize) -> OpEntry | None:
    if s.dims:
        entry = table.get(s.family, s.dtype)
        if entry is None and s.family == "matmul_even":  # a table measured before the family
            entry = table.get("matmul_unaligned", s.dtype)
        return entry
    return table.get(s.family)


def analytic_profiles(graph: Graph, table: OpTable, spec: DeviceSpec | str,
                      ) -> dict[str, NodeProfile]:
    """A :class:`NodeProfile` for every costed node of ``graph`` from ``table`` (Note [analytic
    cost model]); nodes the table cannot read keep ``spec``'s roofline, with its per-op
    overhead as their host time.

    Args:
        graph: The graph (shapes and FLOPs per microbatch).
        table: The device kind's op table.
        spec: The device (for the roofline fallback).
    """
    spec = get_device_spec(spec)
    roof = estimate_costs(graph, spec, analytic=False)
    users = _users(graph)
    view = table.get("view")
    add = table.get("add")
    out: dict[str, NodeProfile] = {}
    for node in graph.nodes:
        s = op_family(node, graph)
        if s is None:
            continue
        grad = _needs_grad(node, graph)
        module = table.module_call if node.op is OpKind.CALL_MODULE else 0.0
        if s.family in ("view", "scalar"):
            entry = table.get(s.family) or view
            hf = entry.host_forward if entry else 0.0
            hb = entry.host_backward if entry and grad and s.family == "view" else 0.0
            df = db = 0.0
        else:
            entry = _entry(table, s)
            if entry is None:
                c = roof.nodes[node.name]
                over = spec.kernel_overhead
                df, db = max(0.0, c.forward_time - over), max(0.0, c.backward_time - over)
                hf, hb = over, over if c.backward_time > 0 else 0.0
            else:
                df = _device(entry.forward, s)
                db = (_device(entry.backward, s) * s.backward_scale
                      if grad and entry.backward is not None else 0.0)
                hf = entry.host_forward
                hb = entry.host_backward if grad else 0.0
            if s.family in ("slice", "split", "expand"):
                df = 0.0  # a view forward; only its backward moves data
        if grad and add is not None and node.value_kind == "tensor" and node.grad_bytes > 0:
            readers = [u for u in users.get(node.name, ())
                       if graph.node(u).grad_bytes > 0 or any(
                           graph.param(p).trainable for p in graph.node(u).params)]
            if len(readers) > 1:
                db += (len(readers) - 1) * _device(
                    add.forward, OpSize("add", size=float(node.output_bytes)))
        if not grad:
            db = hb = 0.0
        out[node.name] = NodeProfile(df, hf + module, db, hb, kind="",
                                     host_backward_context=hb,
                                     host_forward_context=hf + module)
    return out


def analytic_costs(graph: Graph, device: DeviceSpec | str, table: OpTable | None = None, *,
                   optimizer: str | float = "adam") -> GraphCosts:
    """Costs of every node of ``graph`` on ``device`` from its op table (Note [analytic cost
    model]): node times from the host/device replay, and each stage replayed alone by the
    partitioner's evaluation.

    Args:
        graph: The graph.
        device: A spec or built-in name; its op table is used unless ``table`` is given.
        table: The op table.
        optimizer: As for :func:`~modelparallel.cost_model.estimate_costs`.

    Raises:
        ConfigError: if neither ``table`` nor the device has an op table.
    """
    spec = get_device_spec(device)
    table = table or spec.ops()
    if table is None:
        raise ConfigError(f"device {spec.name!r} has no op table; measure one with "
                          "'partition-plan calibrate --ops OPS.json' on that device kind and "
                          "give it as the spec's 'op_table'")
    profiles = analytic_profiles(graph, table, spec)
    order = [n.name for n in graph.nodes]
    times = node_times(order, profiles)
    replay = host_replay(order, profiles,
                         call=CallOverhead(table.call_forward, table.call_backward))
    costs = estimate_costs(graph, spec, optimizer=optimizer, measured=times, replay=replay)
    return replace(costs, source="analytic",
                   notes={**costs.notes, "op_table": table.device or "op table"})

