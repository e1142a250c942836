"""Per-node costs on one device: forward and backward time, memory, and communication volume.

:func:`estimate_costs` turns an IR :class:`~modelparallel.ir.Graph` and a
:class:`~modelparallel.cost_model.device.DeviceSpec` into :class:`GraphCosts`, which the
partitioner reads. Times come from a roofline on each node's FLOPs and bytes moved, or from
measurements (:func:`modelparallel.cost_model.measure.profile_node_times`) when given.

Note [roofline]
~~~~~~~~~~~~~~~
A node's forward time is ``max(flops / achievable_flops(dtype), bytes / achievable_bandwidth)``
plus the device's per-op overhead, where ``bytes`` counts the tensors it reads (producers'
outputs and its parameters) and writes (its outputs). View-like ops (``view``, ``getitem``,
``permute``...) move no data and cost nothing. Backward time uses the measured backward FLOPs when
the tracer recorded them, else twice the forward FLOPs (a gradient for the input and one for the
weight), and twice the forward bytes. Nodes whose outputs need no gradient have no backward.

Note [activation memory]
~~~~~~~~~~~~~~~~~~~~~~~~
A node's ``saved_bytes`` is what the tracer measured autograd saving (each storage counted once,
at its first saver: Note [saved storages counted once] in ``modelparallel/tracer/annotate.py``),
plus, for the nodes whose values are model outputs, those values: the runtime holds the model
output of every microbatch in flight until the loss's backward has run; and what the loss saves
for its backward, counted as one float32 tensor of each grad-requiring output's size
(cross-entropy keeps its log-softmax, in float32 for half-precision logits too; a squared error
its difference). Measured on GPT-2 medium, that is the 4 x 49 MiB the model missed before
(``benchmarks/results/hybrid-h200-gpt2-medium-memory.json``). While the loss's backward runs,
its float32 gradient of that size and the output's own gradient are the output node's workspace
(the last stage's peak in training; measured with the loss run in
``benchmarks/results/cost_model_fidelity-h200.json``). Its ``workspace_bytes``
is the transient memory while it runs: forward, its outputs; backward, the gradient arriving for
its outputs plus the gradients it produces for its inputs (none for the inputs of an addition
of the output's shape, which receive the incoming gradient itself) and, before they are added
into ``.grad``, for its parameters. The largest of these over a stage's nodes sits on top of the
stage's held activations at its peak (Note [stage time and memory] in
``modelparallel/partitioner/problem.py``).

Note [sent values held]
~~~~~~~~~~~~~~~~~~~~~~~
A stage keeps every value it sends referenced until that value's gradient comes back, for each
microbatch in flight: the runtimes run the stage's backward from those tensors
(``LocalPipeline``'s ``_Slot.pairs``, the distributed executor's ``mb.roots``, whose send
buffers are released after the backward). A node's ``sent_held_bytes`` is what this costs the
stage that computes the value, per microbatch: its output bytes, or 0 when that storage is
already among the stage's saved activations because the op saves its own output for backward
(ReLU, sigmoid, tanh, exp, softmax...: :data:`OUTPUT_SAVING_OPS`), or when the node is a view
of such a value. A value relayed through a stage is its received leaf returned unchanged (Note
[relay communication] in ``modelparallel/plan.py``), already counted there as received; so a
value costs each stage it touches its bytes once: received, or computed there and sent
(Note [stage time and memory] in ``modelparallel/partitioner/problem.py``). Not recognised,
hence counted twice (an over-count): a sent value that a *consumer* on the sending stage saves
(a LayerNorm's input), and a view, sent on, of a value the stage received.

Example:
    >>> from modelparallel.ir import Graph, Node, OpKind, Param, TensorMeta
    >>> g = Graph("lin", (
    ...     Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((64, 1024), "float32"),)),
    ...     Node("fc", OpKind.CALL_MODULE, "fc", inputs=("x",), params=("fc.weight",),
    ...          outputs=(TensorMeta((64, 1024), "float32", True),), flops=2 * 64 * 1024 * 1024),
    ...     Node("output", OpKind.OUTPUT, "output", inputs=("fc",))),
    ...     params=(Param("fc.weight", (1024, 1024), "float32"),))
    >>> costs = estimate_costs(g, "h100")
    >>> costs.nodes["fc"].forward_time > 0
    True
    >>> costs.param_state_bytes["fc.weight"] == 4 * 1024 * 1024 * 4  # param, grad, 2 Adam states
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelparallel.cost_model.device import DeviceSpec, get_device_spec
from modelparallel.cost_model.replay import HostReplay
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph, Node, OpKind, Param
from modelparallel.schedule import inflight_microbatches  # re-exported here

__all__ = [
    "OPTIMIZER_STATES",
    "OUTPUT_SAVING_OPS",
    "GraphCosts",
    "NodeCost",
    "estimate_costs",
    "inflight_microbatches",
    "is_view_like",
    "held_output_bytes",
    "param_state_bytes",
]

#: Optimizer state tensors per parameter tensor (each the parameter's size).
OPTIMIZER_STATES: Mapping[str, int] = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2,
                                        "adagrad": 1, "rmsprop": 1}

#: Ops whose backward reads their own output, which autograd therefore saves (Note [sent values
#: held]): aten op names, ``torch.nn.functional`` names and ``nn.Module`` class names, lower case.
OUTPUT_SAVING_OPS = frozenset({
    "relu", "relu_", "threshold", "threshold_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp",
    "exp_", "sqrt", "rsqrt", "softmax", "_softmax", "log_softmax", "_log_softmax",
    "logsoftmax"})

#: Ops whose backward passes the incoming gradient on unchanged to inputs of the same shape.
_PASS_THROUGH_OPS = frozenset({"add", "add_", "iadd"})

_VIEW_OPS = re.compile(
    r"(^|\.|_)(view|_unsafe_view|reshape|getitem|permute|transpose|t|expand|expand_as|unsqueeze|"
    r"squeeze|flatten|unflatten|slice|select|split|split_with_sizes|chunk|unbind|narrow|alias|"
    r"detach|size|sym_size|sym_numel|sym_stride|dim|numel|contiguous_noop|_assert_tensor_metadata|"
    r"_assert_scalar|sym_constrain_range_for_size|as_strided|lift_fresh_copy|_guards_fn|"
    r"dropout_noop|identity)(\.|$)"
    # TensorFlow's ops that only relabel a buffer (no kernel on the device):
    r"|^(Reshape|Squeeze|ExpandDims|Identity|IdentityN|Snapshot|StopGradient|Shape|ShapeN|Size|"
    r"Rank|PreventGradient|EnsureShape)$"
)


def is_view_like(node: Node) -> bool:
    """Whether ``node`` moves no data (a view, a getitem, a shape query, an assertion).

    Example:
        >>> from modelparallel.ir import Node, OpKind
        >>> is_view_like(Node("v", OpKind.CALL_FUNCTION, "aten.view.default"))
        True
        >>> is_view_like(Node("m", OpKind.CALL_FUNCTION, "aten.mm.default"))
        False
    """
    if node.op in (OpKind.PLACEHOLDER, OpKind.OUTPUT, OpKind.GET_ATTR):
        return True
    if node.value_kind in ("scalar", "none"):
        return True
    target = node.target.rsplit("::", 1)[-1]
    return bool(_VIEW_OPS.search(target)) and node.flops == 0


@dataclass(frozen=True)
class NodeCost:
    """Costs of one node for one microbatch on one device.

    Attributes:
        forward_time: Forward seconds.
        backward_time: Backward seconds (0 when nothing needs a gradient).
        saved_bytes: Activation bytes held from forward until backward.
        output_bytes: Bytes of the node's value, sent forward if it crosses a stage boundary.
        grad_bytes: Bytes of the gradient of that value, sent backward if it crosses.
        workspace_bytes: Transient bytes alive while the node runs, forward or backward (Note
            [activation memory]).
        sent_held_bytes: Bytes the stage computing the value keeps per microbatch in flight
            when it sends the value on (Note [sent values held]); ``None`` means
            ``output_bytes``.
    """

    forward_time: float
    backward_time: float
    saved_bytes: int
    output_bytes: int
    grad_bytes: int
    workspace_bytes: int
    sent_held_bytes: int | None = None

    @property
    def sent_held(self) -> int:
        """:attr:`sent_held_bytes`, with ``None`` read as the output bytes."""
        return self.output_bytes if self.sent_held_bytes is None else self.sent_held_bytes

    @property
    def time(self) -> float:
        """Forward plus backward seconds."""
        return self.forward_time + self.backward_time


@dataclass(frozen=True)
class GraphCosts:
    """Costs of every node of a graph on one device, plus per-parameter memory.

    Attributes:
        device: The device the costs are for.
        nodes: Node name to :class:`NodeCost`, for every node of the graph.
        param_state_bytes: Canonical parameter name to the bytes its stage holds for it:
            the parameter, its gradient and its optimizer state (buffers: the buffer only).
        param_bytes: Canonical parameter name to the bytes of the parameter alone.
        source: ``"roofline"``, ``"profiled"``, ``"mixed"`` (some nodes measured) or
            ``"analytic"`` (from the device's op table).
        optimizer: The optimizer whose state is counted.
        notes: Free-form remarks on how the costs were made.
        replay: Measured host and device times per node, with which the partitioner's
            evaluation replays each stage alone (Note [stage replay] in
            :mod:`modelparallel.cost_model.replay`); ``None``: stage times are the sums of
            the nodes' times.
    """

    device: DeviceSpec
    nodes: Mapping[str, NodeCost]
    param_state_bytes: Mapping[str, int]
    param_bytes: Mapping[str, int]
    source: str = "roofline"
    optimizer: str = "adam"
    notes: Mapping[str, str] = field(default_factory=dict)
    replay: HostReplay | None = None

    def comm_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` across one stage boundary on this device's link."""
        return self.device.transfer_time(nbytes)

    def with_measured_times(self, measured: Mapping[str, tuple[float, float]]) -> GraphCosts:
        """These costs with forward/backward times replaced by measurements where given.

        Args:
            measured: Node name to ``(forward_seconds, backward_seconds)``.
        """
        nodes = dict(self.nodes)
        hit = 0
        for name, (fwd, bwd) in measured.items():
            if name in nodes:
                nodes[name] = replace(nodes[name], forward_time=float(fwd),
                                      backward_time=float(bwd))
                hit += 1
        source = "profiled" if hit and hit >= sum(
            1 for c in self.nodes.values() if c.time > 0) else ("mixed" if hit else self.source)
        return replace(self, nodes=nodes, source=source)


def param_state_bytes(param: Param, optimizer: str | float = "adam") -> int:
    """Bytes a stage holds for one parameter: the value, its gradient and optimizer state.

    Args:
        param: The parameter (or buffer: then only its own bytes count).
        optimizer: A name from :data:`OPTIMIZER_STATES`, or total bytes per parameter element
            (e.g. ``16`` for mixed-precision Adam: bf16 weight and grad, fp32 master and states).

    Raises:
        ConfigError: for an unknown optimizer name.

    Example:
        >>> from modelparallel.ir import Param
        >>> param_state_bytes(Param("w", (10,), "float32"), "sgd")
        80
    """
    if not param.trainable:
        return param.nbytes
    if isinstance(optimizer, int | float):
        return int(param.numel * optimizer)
    try:
        states = OPTIMIZER_STATES[optimizer.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZER_STATES)} or give "
            "bytes per parameter as a number") from None
    return param.nbytes * (2 + states)


def _compute_dtype(node: Node, graph: Graph) -> str:
    for t in node.outputs:
        if t.is_floating:
            return t.dtype
    for p in node.params:
        return graph.param(p).dtype
    return "float32"


def _bytes_moved(node: Node, graph: Graph) -> int:
    read = sum(graph.node(s).output_bytes for s in node.inputs)
    read += sum(graph.param(p).nbytes for p in node.params)
    return read + node.output_bytes


def _default_saved_bytes(node: Node, graph: Graph) -> int:
    """Activation bytes saved for backward when the tracer did not measure them."""
    if is_view_like(node) or node.grad_bytes == 0:
        return 0
    name = node.target.rsplit(".", 1)[-1].lower()
    target = node.target.lower()
    if any(k in target for k in ("add", "sub", "cat", "stack", "clone", "copy", "to")) and \
            node.flops == 0 and not node.params:
        return 0
    inputs = sum(graph.node(s).output_bytes for s in node.inputs)
    if node.params or node.flops > 0 or name in ("mul", "div"):
        return inputs
    return node.output_bytes


def _workspace_bytes(node: Node, graph: Graph, needs_grad: bool) -> int:
    """Transient bytes while ``node`` runs forward or backward (Note [activation memory])."""
    forward = node.output_bytes
    if not needs_grad:
        return forward
    inputs = [graph.node(s) for s in node.inputs]
    if _op_name(node) in _PASS_THROUGH_OPS:
        # Autograd hands the incoming gradient itself to inputs of the output's shape.
        shape = node.outputs[0].shape if node.outputs else None
        inputs = [i for i in inputs if not (i.outputs and i.outputs[0].shape == shape)]
    backward = node.grad_bytes + sum(i.grad_bytes for i in inputs)
    backward += sum(graph.param(p).nbytes for p in dict.fromkeys(node.params)
                    if graph.param(p).trainable)
    return max(forward, backward)


def _op_name(node: Node) -> str:
    """The op's short name: ``aten.relu.default`` -> ``relu``; a module: its class name."""
    if node.op is OpKind.CALL_MODULE:
        return node.module_type.lower()
    parts = [x for x in re.split(r"[.:]", node.target) if x]
    while len(parts) > 1 and parts[-1] in ("default", "Tensor", "Scalar", "int", "dim", "self",
                                            "out"):
        parts.pop()
    return parts[-1].lower() if parts else ""


def _sent_held_bytes(graph: Graph) -> dict[str, int]:
    """Per node, what its stage holds when it sends the value (Note [sent values held])."""
    out: dict[str, int] = {}
    for node in graph.nodes:
        if _op_name(node) in OUTPUT_SAVING_OPS and node.grad_bytes > 0:
            out[node.name] = 0
        elif is_view_like(node) and len(node.inputs) == 1 and node.inputs[0] in out:
            out[node.name] = min(node.output_bytes, out[node.inputs[0]])
        else:
            out[node.name] = node.output_bytes
    return out


def held_output_bytes(graph: Graph) -> dict[str, tuple[int, int]]:
    """Per node whose value is a model output: the bytes of that value, held until the loss's
    backward, and what the loss saves for it (one float32 tensor of each grad-requiring
    output's size; Note [activation memory]).

    Example:
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> g = chain_graph(2)
        >>> [(k, value > 0, loss > 0) for k, (value, loss) in held_output_bytes(g).items()]
        [('fc1', True, True)]
    """
    out: dict[str, tuple[int, int]] = {}
    for node in graph.nodes:
        if node.op is OpKind.OUTPUT:
            for name in node.inputs:
                src = graph.node(name)
                loss = sum(4 * math.prod(t.shape) for t in src.outputs
                           if t.requires_grad and t.dtype.startswith(("float", "bfloat")))
                out[name] = (src.output_bytes, loss)
    return out


def _loss_workspace(node: Node, loss_grad: Mapping[str, int]) -> int:
    """Transient bytes of the loss's backward at a model output's node: its float32 gradient
    and the output's gradient (Note [activation memory]); 0 for other nodes."""
    return loss_grad[node.name] + node.grad_bytes if loss_grad.get(node.name) else 0


def _held_outputs(graph: Graph) -> dict[str, int]:
    """Bytes of the model outputs by producing node and the loss's saved bytes for them."""
    return {k: v + loss for k, (v, loss) in held_output_bytes(graph).items()}


def estimate_costs(graph: Graph, device: DeviceSpec | str | Path, *,
                   optimizer: str | float = "adam",
                   measured: Mapping[str, tuple[float, float]] | None = None,
                   replay: HostReplay | None = None,
                   analytic: bool | None = None) -> GraphCosts:
    """Costs of every node of ``graph`` on ``device``: from the device's op table where it
    has one (Note [analytic cost model] in ``analytic.py``), else the roofline (Note
    [roofline]).

    Args:
        graph: The graph; its FLOPs and tensor metadata are per microbatch.
        device: A :class:`DeviceSpec`, a built-in name (``"h100"``) or a spec JSON path.
        optimizer: Optimizer whose state memory is counted, or bytes per parameter element.
        measured: Optional measured ``(forward, backward)`` seconds per node, which replace the
            roofline (profiling mode).
        replay: Optional host and device times per node (``profile.host_replay``), to replay
            each stage alone in the partitioner's evaluation (Note [stage replay]).
        analytic: Use the device's op table (:func:`~modelparallel.cost_model.analytic_costs`);
            default: when the device has one and neither ``measured`` nor ``replay`` is given.
            ``False``: the roofline.

    Returns:
        The costs, for every node and parameter of the graph.
    """
    spec = get_device_spec(device)
    if analytic is None:
        analytic = bool(spec.op_table) and not measured and replay is None
    if analytic:
        from modelparallel.cost_model.analytic import analytic_costs

        return analytic_costs(graph, spec, optimizer=optimizer)
    flops_rate: dict[str, float] = {}
    nodes: dict[str, NodeCost] = {}
    held = _held_outputs(graph)
    loss_grad = {k: loss for k, (_, loss) in held_output_bytes(graph).items()}
    sent = _sent_held_bytes(graph)
    for node in graph.nodes:
        if is_view_like(node):
            nodes[node.name] = NodeCost(0.0, 0.0, held.get(node.name, 0), node.output_bytes,
                                        node.grad_bytes,
                                        max(node.output_bytes, _loss_workspace(node, loss_grad)),
                                        sent[node.name])
            continue
        dtype = _compute_dtype(node, graph)
        if dtype not in flops_rate:
            flops_rate[dtype] = spec.flops_per_second(dtype)
        moved = _bytes_moved(node, graph)
        fwd = max(node.flops / flops_rate[dtype], moved / spec.bytes_per_second)
        fwd += spec.kernel_overhead
        needs_grad = node.grad_bytes > 0 or any(
            graph.param(p).trainable for p in node.params)
        if needs_grad:
            bflops = node.backward_flops if node.backward_flops is not None else 2 * node.flops
            bwd = max(bflops / flops_rate[dtype], 2 * moved / spec.bytes_per_second)
            bwd += spec.kernel_overhead
        else:
            bwd = 0.0
        saved = node.saved_bytes if node.saved_bytes is not None else _default_saved_bytes(
            node, graph)
        saved += held.get(node.name, 0)
        workspace = max(_workspace_bytes(node, graph, needs_grad),
                        _loss_workspace(node, loss_grad))
        nodes[node.name] = NodeCost(fwd, bwd, int(saved), node.output_bytes, node.grad_bytes,
                                    workspace, sent[node.name])
    costs = GraphCosts(
        device=spec,
        nodes=nodes,
        param_state_bytes={p.name: param_state_bytes(p, optimizer) for p in graph.params},
        param_bytes={p.name: p.nbytes for p in graph.params},
        optimizer=str(optimizer),
    )
    if measured:
        costs = costs.with_measured_times(measured)
    if replay is not None:
        costs = replace(costs, replay=replay)
    return costs
