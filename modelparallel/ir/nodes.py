"""The IR's value types: dtypes, op kinds, tensor metadata, parameters and nodes, with their JSON.

:class:`~modelparallel.ir.Graph` (in :mod:`modelparallel.ir.graph`) holds these; the JSON helpers
here write and read one node, tensor or parameter of the format documented in
``docs/ir-format.md``. Import the names from :mod:`modelparallel.ir`.

Example:
    >>> Node("fc", OpKind.CALL_MODULE, "fc", outputs=(TensorMeta((8, 2), "float32"),)).output_bytes
    64
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelparallel.errors import IRFormatError

__all__ = ["DTYPE_BYTES", "Node", "OpKind", "Param", "TensorMeta", "dtype_bytes"]

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


# -- JSON of one node, tensor or parameter (docs/ir-format.md) ---------------------------------


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

