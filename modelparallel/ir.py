"""The framework-neutral graph that every stage of modelparallel reads.

A :class:`Graph` is a DAG of :class:`Node` values in topological order. Each node records what it
computes (op kind and target), where it lives in the model (module path), which values it consumes
(producer node names), what it produces (tensor metadata), which parameters and buffers it reads
(by canonical qualified name), and its forward FLOPs. Parameters are listed once in the graph under
a canonical name; names that alias the same storage (tied weights) are kept as ``aliases``.

This module imports only :mod:`modelparallel.errors` and :mod:`modelparallel._jsonfile` of
modelparallel (neither imports anything else of ours). It is the root of the one-way import chain
(``ir <- tracer, cost_model <- partitioner <- codegen <- runtime <- front ends``); see Note [error
hierarchy] in ``modelparallel/errors.py``.

The JSON format written by :meth:`Graph.to_json` is documented in ``docs/ir-format.md``; other tools
can write it and have the graph planned without its model.

Example:
    >>> g = Graph(
    ...     name="mlp",
    ...     nodes=(
    ...         Node("x", OpKind.PLACEHOLDER, "x", outputs=(TensorMeta((8, 4), "float32"),)),
    ...         Node("fc", OpKind.CALL_MODULE, "fc", module_path="fc", inputs=("x",),
    ...              outputs=(TensorMeta((8, 2), "float32", requires_grad=True),),
    ...              params=("fc.weight",), flops=2 * 8 * 4 * 2),
    ...         Node("output", OpKind.OUTPUT, "output", inputs=("fc",)),
    ...     ),
    ...     params=(Param("fc.weight", (2, 4), "float32"),),
    ... )
    >>> Graph.from_json(g.to_json()) == g
    True
    >>> len(g.fingerprint())
    64
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx

from modelparallel._jsonfile import check_envelope
from modelparallel.errors import IRFormatError, ModelParallelError

__all__ = [
    "DTYPE_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Graph",
    "IRFormatError",
    "ModelParallelError",
    "Node",
    "OpKind",
    "Param",
    "TensorMeta",
    "dtype_bytes",
    "input_derived_nodes",
    "recomputed_nodes",
    "module_groups",
]

FORMAT_NAME = "modelparallel.ir"
FORMAT_VERSION = 1


#: Bytes per element for the dtype names the IR uses (torch's names without the ``torch.`` prefix).
DTYPE_BYTES: Mapping[str, float] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex64": 8, "complex128": 16,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}

_FLOAT_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
     "complex64", "complex128"}
)


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype``.

    Raises:
        IRFormatError: if the dtype name is unknown.

    Example:
        >>> dtype_bytes("bfloat16")
        2
    """
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise IRFormatError(
            f"unknown dtype {dtype!r}; the IR accepts {sorted(DTYPE_BYTES)} "
            "(torch dtype names without the 'torch.' prefix)"
        ) from None


class OpKind(str, enum.Enum):
    """What a node does; the values follow torch.fx's ``Node.op`` names."""

    PLACEHOLDER = "placeholder"  #: a model input
    GET_ATTR = "get_attr"  #: reads a constant attribute of the model (not a parameter use)
    CALL_FUNCTION = "call_function"  #: a free function or operator (e.g. ``aten.mm``)
    CALL_METHOD = "call_method"  #: a method on a value (e.g. ``Tensor.view``)
    CALL_MODULE = "call_module"  #: a whole leaf module
    OUTPUT = "output"  #: the model's output; exactly one, last


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor a node produces.

    Attributes:
        shape: Sizes per dimension, for the example batch the graph was traced with.
        dtype: Element type, a key of :data:`DTYPE_BYTES` (e.g. ``"float32"``).
        requires_grad: Whether a gradient flows back through this tensor in training. Only such
            tensors send a gradient back when they cross a stage boundary.
    """

    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise IRFormatError(f"tensor shape {self.shape} has a negative size; sizes are >= 0")
        dtype_bytes(self.dtype)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return int(self.numel * dtype_bytes(self.dtype))

    @property
    def is_floating(self) -> bool:
        """Whether the dtype is floating point (or complex)."""
        return self.dtype in _FLOAT_DTYPES


@dataclass(frozen=True)
class Param:
    """A parameter or buffer of the model, listed once under its canonical name.

    Attributes:
        name: Canonical qualified name (the first name ``named_parameters`` gives it).
        shape: Sizes per dimension.
        dtype: Element type, a key of :data:`DTYPE_BYTES`.
        is_buffer: True for a buffer (no gradient, no optimizer state).
        requires_grad: Whether the optimizer trains it.
        aliases: Other qualified names of the same storage: tied weights, such as GPT-2's
            ``lm_head.weight`` aliasing ``transformer.wte.weight``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    is_buffer: bool = False
    requires_grad: bool = True
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        if not self.name:
            raise IRFormatError("a parameter needs a non-empty qualified name")
        dtype_bytes(self.dtype)
        if self.is_buffer and self.requires_grad:
            object.__setattr__(self, "requires_grad", False)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the parameter's data."""
        return int(self.numel * dtype_bytes(self.dtype))

    @property
    def trainable(self) -> bool:
        """Whether it has a gradient and optimizer state."""
        return self.requires_grad and not self.is_buffer


@dataclass(frozen=True)
class Node:
    """One operation of the graph.

    Attributes:
        name: Unique name within the graph (for torch graphs, the torch.fx node name).
        op: What kind of operation it is.
        target: What it calls: an op name (``"aten.mm.default"``), a module path for
            ``call_module``, a method name for ``call_method``, or the input name for a placeholder.
        inputs: Names of the nodes whose values this node consumes, in first-use order, without
            repeats. Parameters are not nodes: they are listed in ``params``.
        outputs: Metadata of every tensor the node produces (tensor leaves of its value, in
            order). Empty for nodes that produce no tensor (a shape, ``None``...).
        params: Canonical names of the parameters and buffers the node reads.
        module_path: Qualified name of the innermost ``nn.Module`` the op ran in (``""`` for the
            root). Used to group nodes by module.
        module_type: Class name of that module (e.g. ``"GPT2Attention"``), for display.
        flops: Forward floating-point operations for the traced example batch (a multiply-add
            counts 2).
        backward_flops: Backward FLOPs, when the tracer measured them; ``None`` lets the cost
            model estimate them from ``flops``.
        saved_bytes: Activation bytes the node saves for backward (parameters excluded), when the
            tracer measured them; ``None`` lets the cost model estimate.
        is_random: Whether the op draws random numbers (dropout), which forbids recomputing it.
        value_kind: ``"tensor"``, ``"tensors"`` (a tuple/list of tensors), ``"scalar"`` (a
            Python number, shape or dtype), or ``"none"``.
    """

    name: str
    op: OpKind
    target: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[TensorMeta, ...] = ()
    params: tuple[str, ...] = ()
    module_path: str = ""
    module_type: str = ""
    flops: int = 0
    backward_flops: int | None = None
    saved_bytes: int | None = None
    is_random: bool = False
    value_kind: str = "tensor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", OpKind(self.op))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "params", tuple(self.params))
        if not self.name:
            raise IRFormatError("a node needs a non-empty name")
        if len(set(self.inputs)) != len(self.inputs):
            raise IRFormatError(f"node {self.name!r} lists an input twice: {self.inputs}")
        if self.flops < 0 or (self.backward_flops is not None and self.backward_flops < 0):
            raise IRFormatError(f"node {self.name!r} has negative FLOPs")
        if self.saved_bytes is not None and self.saved_bytes < 0:
            raise IRFormatError(f"node {self.name!r} has negative saved_bytes")
        if self.value_kind not in ("tensor", "tensors", "scalar", "none"):
            raise IRFormatError(
                f"node {self.name!r} has value_kind {self.value_kind!r}; "
                "use 'tensor', 'tensors', 'scalar' or 'none'"
            )

    @property
    def output_bytes(self) -> int:
        """Bytes of every tensor the node produces."""
        return sum(t.nbytes for t in self.outputs)

    @property
    def grad_bytes(self) -> int:
        """Bytes of the gradients that flow back into this node's outputs in training."""
        return sum(t.nbytes for t in self.outputs if t.requires_grad and t.is_floating)


@dataclass(frozen=True, eq=False)
class Graph:
    """A model's computation as a DAG of nodes in topological order.

    Attributes:
        name: A label for people (the model's class name, say).
        nodes: Every node, producers before consumers; exactly one ``output`` node, last.
        params: Every parameter and buffer any node reads, once each, under canonical names.
        metadata: Free-form strings: which tracer path made it, framework versions, the example
            input shapes. Not part of the fingerprint.
    """

    name: str
    nodes: tuple[Node, ...]
    params: tuple[Param, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "metadata", dict(self.metadata))
        self._validate()

    # -- structure -------------------------------------------------------------------------------

    def _validate(self) -> None:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise IRFormatError(f"node name {node.name!r} appears twice; names must be unique")
            for src in node.inputs:
                if src not in seen:
                    raise IRFormatError(
                        f"node {node.name!r} consumes {src!r}, which is not an earlier node; "
                        "nodes must be listed in topological order and inputs must name nodes"
                    )
            seen.add(node.name)
        outputs = [n.name for n in self.nodes if n.op is OpKind.OUTPUT]
        if len(outputs) != 1 or self.nodes[-1].op is not OpKind.OUTPUT:
            raise IRFormatError(
                f"a graph needs exactly one output node, listed last; found {outputs}"
            )
        names = set()
        for p in self.params:
            for n in (p.name, *p.aliases):
                if n in names:
                    raise IRFormatError(f"parameter name {n!r} is listed twice")
                names.add(n)
        canon = {p.name for p in self.params}
        for node in self.nodes:
            for pname in node.params:
                if pname not in canon:
                    raise IRFormatError(
                        f"node {node.name!r} reads parameter {pname!r}, which is not a canonical "
                        "name in the graph's params (aliases must be resolved to the canonical name)"
                    )

    @cached_property
    def _index(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    @cached_property
    def _param_index(self) -> dict[str, Param]:
        out: dict[str, Param] = {}
        for p in self.params:
            out[p.name] = p
            for a in p.aliases:
                out[a] = p
        return out

    @cached_property
    def _users(self) -> dict[str, tuple[str, ...]]:
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                users[src].append(n.name)
        return {k: tuple(v) for k, v in users.items()}

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.name, self.nodes, self.params, dict(self.metadata)) == (
            other.name, other.nodes, other.params, dict(other.metadata))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def node(self, name: str) -> Node:
        """The node called ``name``.

        Raises:
            KeyError: if there is none.
        """
        try:
            return self.nodes[self._index[name]]
        except KeyError:
            raise KeyError(f"the graph has no node named {name!r}") from None

    def index(self, name: str) -> int:
        """Position of node ``name`` in the topological order."""
        return self._index[name]

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (canonical name or alias)."""
        try:
            return self._param_index[name]
        except KeyError:
            raise KeyError(f"the graph has no parameter or buffer named {name!r}") from None

    def users(self, name: str) -> tuple[str, ...]:
        """Names of the nodes that consume node ``name``'s value, in topological order."""
        return self._users[name]

    @property
    def placeholders(self) -> tuple[Node, ...]:
        """The model-input nodes, in order."""
        return tuple(n for n in self.nodes if n.op is OpKind.PLACEHOLDER)

    @property
    def output(self) -> Node:
        """The single output node."""
        return self.nodes[-1]

    @property
    def num_parameters(self) -> int:
        """Elements of every trainable parameter (tied ones counted once)."""
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def total_flops(self) -> int:
        """Forward FLOPs of the whole graph."""
        return sum(n.flops for n in self.nodes)

    def tied_params(self) -> dict[str, tuple[str, ...]]:
        """Parameters read by more than one node, with the nodes that read them.

        Example:
            >>> g = Graph("t", (Node("a", OpKind.CALL_FUNCTION, "f", params=("w",)),
            ...                 Node("b", OpKind.CALL_FUNCTION, "g", ("a",), params=("w",)),
            ...                 Node("output", OpKind.OUTPUT, "output", inputs=("b",))),
            ...           params=(Param("w", (2,), "float32"),))
            >>> g.tied_params()
            {'w': ('a', 'b')}
        """
        readers: dict[str, list[str]] = {}
        for n in self.nodes:
            for p in n.params:
                readers.setdefault(p, []).append(n.name)
        return {p: tuple(ns) for p, ns in readers.items() if len(ns) > 1}

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph``; node attribute ``node`` holds the :class:`Node`,
        edge attribute ``bytes`` the producer's output bytes."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, node=n)
        for n in self.nodes:
            for src in n.inputs:
                g.add_edge(src, n.name, bytes=self.node(src).output_bytes)
        return g

    # -- identity --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A stable hex digest of the graph's structure.

        It covers every node's name, op, target, inputs and parameters, and every parameter's
        name, shape and dtype. It does not cover activation shapes (so a plan made for one batch
        size fits another), FLOPs or metadata.
        """
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for n in self.nodes:
            h.update(json.dumps([n.name, n.op.value, n.target, list(n.inputs), list(n.params)],
                                separators=(",", ":")).encode())
        for p in sorted(self.params, key=lambda p: p.name):
            h.update(json.dumps([p.name, list(p.shape), p.dtype, p.is_buffer,
                                 sorted(p.aliases)], separators=(",", ":")).encode())
        return h.hexdigest()

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The graph as JSON-ready data (see ``docs/ir-format.md``)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "metadata": dict(self.metadata),
            "params": [_param_to_dict(p) for p in self.params],
            "nodes": [_node_to_dict(n) for n in self.nodes],
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = None) -> str:
        """Serialise to JSON text; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Build a graph from :meth:`to_dict` data, checking the format and version.

        Raises:
            IRFormatError: on a wrong format name, an unsupported version, a missing or mistyped
                field, or a structural error.
        """
        check_envelope(data, fmt=FORMAT_NAME, versions=(FORMAT_VERSION,), what="IR JSON",
                       error=IRFormatError, hint="(see docs/ir-format.md)",
                       version_hint="Re-export the graph with a matching version.")
        try:
            graph = cls(
                name=str(data.get("name", "graph")),
                nodes=tuple(_node_from_dict(n) for n in data["nodes"]),
                params=tuple(_param_from_dict(p) for p in data.get("params", ())),
                metadata={str(k): str(v) for k, v in dict(data.get("metadata", {})).items()},
            )
        except IRFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise IRFormatError(f"IR JSON is malformed: {type(e).__name__}: {e}") from None
        expected = data.get("fingerprint")
        if expected is not None and expected != graph.fingerprint():
            raise IRFormatError(
                f"IR JSON says fingerprint {expected[:12]}... but its content hashes to "
                f"{graph.fingerprint()[:12]}...; the file was edited or truncated. Remove the "
                "'fingerprint' field to accept the content as it is.")
        return graph

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Graph:
        """Read a graph from JSON text or from a ``.json`` file path."""
        if isinstance(text_or_path, Path) or (
                isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
            path = Path(text_or_path)
            try:
                text = path.read_text()
            except OSError as e:
                raise IRFormatError(f"cannot read IR file {str(path)!r}: {e.strerror}") from None
        else:
            text = str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IRFormatError(f"IR JSON is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Graph:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _node_to_dict(n: Node) -> dict[str, Any]:
    d: dict[str, Any] = {"name": n.name, "op": n.op.value, "target": n.target}
    if n.module_path:
        d["module_path"] = n.module_path
    if n.module_type:
        d["module_type"] = n.module_type
    if n.inputs:
        d["inputs"] = list(n.inputs)
    if n.outputs:
        d["outputs"] = [_tensor_to_dict(t) for t in n.outputs]
    if n.params:
        d["params"] = list(n.params)
    if n.flops:
        d["flops"] = n.flops
    if n.backward_flops is not None:
        d["backward_flops"] = n.backward_flops
    if n.saved_bytes is not None:
        d["saved_bytes"] = n.saved_bytes
    if n.is_random:
        d["is_random"] = True
    if n.value_kind != "tensor":
        d["value_kind"] = n.value_kind
    return d


def _node_from_dict(d: Mapping[str, Any]) -> Node:
    return Node(
        name=str(d["name"]),
        op=OpKind(d["op"]),
        target=str(d.get("target", d["name"])),
        module_path=str(d.get("module_path", "")),
        module_type=str(d.get("module_type", "")),
        inputs=tuple(str(s) for s in d.get("inputs", ())),
        outputs=tuple(_tensor_from_dict(t) for t in d.get("outputs", ())),
        params=tuple(str(p) for p in d.get("params", ())),
        flops=int(d.get("flops", 0)),
        backward_flops=None if d.get("backward_flops") is None else int(d["backward_flops"]),
        saved_bytes=None if d.get("saved_bytes") is None else int(d["saved_bytes"]),
        is_random=bool(d.get("is_random", False)),
        value_kind=str(d.get("value_kind", "tensor")),
    )


def _tensor_to_dict(t: TensorMeta) -> dict[str, Any]:
    d: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype}
    if t.requires_grad:
        d["requires_grad"] = True
    return d


def _tensor_from_dict(d: Mapping[str, Any]) -> TensorMeta:
    return TensorMeta(tuple(d["shape"]), str(d["dtype"]), bool(d.get("requires_grad", False)))


def _param_to_dict(p: Param) -> dict[str, Any]:
    d: dict[str, Any] = {"name": p.name, "shape": list(p.shape), "dtype": p.dtype}
    if p.is_buffer:
        d["is_buffer"] = True
    if not p.requires_grad and not p.is_buffer:
        d["requires_grad"] = False
    if p.aliases:
        d["aliases"] = list(p.aliases)
    return d


def _param_from_dict(d: Mapping[str, Any]) -> Param:
    return Param(
        name=str(d["name"]),
        shape=tuple(d["shape"]),
        dtype=str(d["dtype"]),
        is_buffer=bool(d.get("is_buffer", False)),
        requires_grad=bool(d.get("requires_grad", not d.get("is_buffer", False))),
        aliases=tuple(str(a) for a in d.get("aliases", ())),
    )


# -- graph analyses used by several stages ------------------------------------------------------


def input_derived_nodes(graph: Graph) -> frozenset[str]:
    """Nodes computed from model inputs alone, which every stage can recompute instead of receiving.

    A node is input-derived when it is a placeholder, or when it reads no parameter or buffer, is
    not random, is not the output, and every input is input-derived. Examples: attention masks
    and position ids built from ``input_ids``, and shapes read off the inputs. Every rank of a
    pipeline holds the whole input batch (see Note [inputs on every rank] in
    ``modelparallel/partitioner/problem.py``), so such values cost no communication: the
    partitioner leaves them out and codegen copies them into every stage that uses them.

    Example:
        >>> g = Graph("m", (Node("ids", OpKind.PLACEHOLDER, "ids"),
        ...                 Node("mask", OpKind.CALL_FUNCTION, "ne", ("ids",)),
        ...                 Node("emb", OpKind.CALL_FUNCTION, "emb", ("ids",), params=("w",)),
        ...                 Node("output", OpKind.OUTPUT, "output", ("emb", "mask"))),
        ...           params=(Param("w", (10, 4), "float32"),))
        >>> sorted(input_derived_nodes(g))
        ['ids', 'mask']
    """
    derived: set[str] = set()
    for n in graph.nodes:
        if n.op is OpKind.PLACEHOLDER or (n.op is not OpKind.OUTPUT and not n.params and not n.is_random
              and n.op is not OpKind.GET_ATTR and all(s in derived for s in n.inputs)):
            derived.add(n.name)
    return frozenset(derived)


def recomputed_nodes(graph: Graph, members: Iterable[str],
                     derived: Container[str] | None = None) -> tuple[str, ...]:
    """The input-derived nodes a stage computing ``members`` recomputes instead of receiving.

    Note [recomputed nodes]
    ~~~~~~~~~~~~~~~~~~~~~~~
    A stage recomputes every input-derived node (:func:`input_derived_nodes`) its own nodes read,
    directly or through other input-derived nodes, and reads the placeholders among them from
    the batch every rank holds (Note [inputs on every rank] in
    ``modelparallel/partitioner/problem.py``). This function is the one statement of that walk:
    the cost model's stage replay (``modelparallel/partitioner/evaluate.py``) charges a stage
    with the nodes it returns and codegen (``modelparallel/codegen/split.py``) copies exactly
    those nodes into the stage's module, so the two always agree.

    Args:
        graph: The graph.
        members: The nodes the stage computes (its assigned nodes; input-derived names among
            them are walked through like any other).
        derived: The input-derived nodes, when the caller has them (default:
            ``input_derived_nodes(graph)``).

    Returns:
        The input-derived nodes read, placeholders included, in topological order; members
        themselves are left out.

    Example:
        >>> g = Graph("m", (Node("ids", OpKind.PLACEHOLDER, "ids"),
        ...                 Node("mask", OpKind.CALL_FUNCTION, "ne", ("ids",)),
        ...                 Node("emb", OpKind.CALL_FUNCTION, "emb", ("mask",), params=("w",)),
        ...                 Node("output", OpKind.OUTPUT, "output", ("emb",))),
        ...           params=(Param("w", (10, 4), "float32"),))
        >>> recomputed_nodes(g, ["emb"])
        ('ids', 'mask')
    """
    if derived is None:
        derived = input_derived_nodes(graph)
    own = set(members)
    out: set[str] = set()
    stack = [u for n in own for u in graph.node(n).inputs if u in derived and u not in own]
    while stack:
        name = stack.pop()
        if name in out:
            continue
        out.add(name)
        stack.extend(u for u in graph.node(name).inputs
                     if u in derived and u not in own and u not in out)
    return tuple(sorted(out, key=graph.index))


def module_groups(graph: Graph, depth: int, nodes: Iterable[str] | None = None) -> dict[str, str]:
    """Group nodes by their module path cut to ``depth`` levels, keeping the quotient acyclic.

    Each node maps to a group name: its module path truncated to ``depth`` dotted components
    (``"transformer.h.3"`` at depth 3 for ``"transformer.h.3.attn.c_attn"``). Nodes outside any
    module at that depth (or of depth 0) are singletons. Consecutive nodes of one module that are
    interleaved with other work can make the quotient graph cyclic (a module called twice, or a
    parent op between two child calls); such groups are split along the topological order until
    the quotient is a DAG. The result therefore always contracts to a valid pipeline unit graph.

    Args:
        graph: The op-level graph.
        depth: How many leading module-path components to keep; 0 makes every node its own group.
        nodes: Restrict grouping to these nodes (others are left out of the result).

    Returns:
        Node name to group name. Group names are stable: the module path, with ``#k`` appended to
        the k-th piece of a split module and ``@node`` for singletons.

    Example:
        >>> g = Graph("m", (Node("x", OpKind.PLACEHOLDER, "x"),
        ...                 Node("a", OpKind.CALL_FUNCTION, "f", ("x",), module_path="blk.0.fc"),
        ...                 Node("b", OpKind.CALL_FUNCTION, "g", ("a",), module_path="blk.0.act"),
        ...                 Node("c", OpKind.CALL_FUNCTION, "h", ("b",), module_path="blk.1"),
        ...                 Node("output", OpKind.OUTPUT, "output", ("c",))))
        >>> module_groups(g, 2)["a"] == module_groups(g, 2)["b"]
        True
    """
    selected = [n for n in graph.nodes if nodes is None or n.name in set(nodes)]
    keys: dict[str, str] = {}
    for n in selected:
        parts = n.module_path.split(".") if n.module_path else []
        if depth <= 0 or len(parts) < depth or n.op in (OpKind.PLACEHOLDER, OpKind.OUTPUT):
            keys[n.name] = f"@{n.name}"
        else:
            keys[n.name] = ".".join(parts[:depth])
    # Split each group into maximal runs that are contiguous in topological order among the
    # selected nodes: a contiguous run of a topological order can never create a cycle with its
    # complement order-wise, so the quotient of runs is acyclic. Then merge runs back where the
    # merge keeps the quotient acyclic (the common case: one module, one run).
    runs: dict[str, list[list[str]]] = {}
    prev_key: str | None = None
    for n in selected:
        k = keys[n.name]
        if k != prev_key or k not in runs:
            runs.setdefault(k, []).append([])
        runs[k][-1].append(n.name)
        prev_key = k
    groups: dict[str, str] = {}
    for k, pieces in runs.items():
        if len(pieces) == 1:
            for name in pieces[0]:
                groups[name] = k
        else:
            for i, piece in enumerate(pieces):
                for name in piece:
                    groups[name] = f"{k}#{i}"
    return _merge_split_runs(graph, groups, selected)


def _merge_split_runs(graph: Graph, groups: dict[str, str], selected: list[Node]) -> dict[str, str]:
    """Merge ``module#k`` pieces back into one group when that keeps the quotient acyclic."""
    split_bases = sorted({g.split("#", 1)[0] for g in groups.values() if "#" in g})
    if not split_bases:
        return groups
    sel = {n.name for n in selected}
    for base in split_bases:
        trial = {n: (base if g.split("#", 1)[0] == base and "#" in g else g)
                 for n, g in groups.items()}
        q = nx.DiGraph()
        q.add_nodes_from(set(trial.values()))
        for n in selected:
            for src in n.inputs:
                if src in sel and trial[src] != trial[n.name]:
                    q.add_edge(trial[src], trial[n.name])
        if nx.is_directed_acyclic_graph(q):
            groups = trial
    return groups
