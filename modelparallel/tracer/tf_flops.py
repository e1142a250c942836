"""FLOPs of one TensorFlow graph op (a forward op, or a gradient op such as
``Conv2DBackpropFilter``), for the roofline cost model.

TensorFlow's own per-op flops statistics miss ``Einsum``, ``BatchMatMulV2`` and ``Softmax`` (issue
15), so every op is counted here from its input and output shapes: a multiply-add counts 2, an
elementwise op one FLOP per output element, data movement (reshape, transpose, gather...) none.

This module imports no TensorFlow: it reads op types, shapes and attributes handed to it.

Example:
    >>> op_flops("MatMul", [(8, 16), (16, 4)], [(8, 4)])
    1024
    >>> op_flops("Einsum", [(2, 3, 4), (4, 5)], [(2, 3, 5)], equation="abc,cd->abd")
    240
    >>> op_flops("Reshape", [(8, 4), (2,)], [(32,)])
    0
    >>> op_flops("Conv2DBackpropFilter", [(1, 8, 8, 3), (4,), (1, 8, 8, 16)], [(3, 3, 3, 16)])
    55296
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MOVEMENT_OPS", "op_flops"]

Shape = Sequence[int]

#: Ops that only move or relabel data: no FLOPs.
MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "ConcatV2", "Concat", "Pack", "Unpack", "Split", "SplitV", "Slice",
    "StridedSlice", "GatherV2", "Gather", "ResourceGather", "Squeeze", "ExpandDims", "Tile",
    "Shape", "ShapeN", "Size", "Rank", "Fill", "ZerosLike", "OnesLike", "BroadcastTo", "Cast",
    "Identity", "IdentityN", "StopGradient", "Range", "OneHot", "Pad", "PadV2", "MirrorPad",
    "BroadcastArgs", "Bitcast", "CheckNumerics", "PreventGradient", "ScatterNd", "TensorScatterUpdate",
    "GatherNd", "Where", "SelectV2", "Select", "ReverseV2", "DepthToSpace", "SpaceToDepth",
})

_PER_ELEMENT = {
    "Softmax": 5, "LogSoftmax": 5, "Erf": 8, "Tanh": 4, "Sigmoid": 4, "Gelu": 8, "Exp": 2,
    "Log": 2, "Rsqrt": 2, "Sqrt": 2, "Pow": 4, "SquaredDifference": 2, "Selu": 3, "Elu": 3,
    "Softplus": 4, "SoftmaxCrossEntropyWithLogits": 6, "SparseSoftmaxCrossEntropyWithLogits": 6,
}

_REDUCTIONS = frozenset({"Sum", "Mean", "Max", "Min", "Prod", "ArgMax", "ArgMin", "All", "Any",
                         "EuclideanNorm"})


def _numel(shape: Shape) -> int:
    return math.prod(int(s) for s in shape)


def _einsum_flops(equation: str, inputs: Sequence[Shape]) -> int:
    lhs, _, _ = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), inputs, strict=False):
        letters = [c for c in term if c.isalpha()]
        if "..." in term:  # ellipsis: the leading dims; count them as one batch letter each
            extra = len(shape) - len(letters)
            letters = [f"_{i}" for i in range(extra)] + letters
        for letter, size in zip(letters, shape, strict=False):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    total = math.prod(sizes.values()) if sizes else 0
    return 2 * total if len(inputs) > 1 else total


def op_flops(op_type: str, inputs: Sequence[Shape], outputs: Sequence[Shape], *,
             equation: str = "", transpose_a: bool = False, adj_x: bool = False) -> int:
    """Forward FLOPs of one op of type ``op_type`` with these input and output shapes.

    Args:
        op_type: The TensorFlow op type (``op.type``), e.g. ``"MatMul"``.
        inputs: Shapes of the op's inputs (unknown sizes given as 1).
        outputs: Shapes of its outputs.
        equation: The ``equation`` attribute of an ``Einsum``.
        transpose_a: The ``transpose_a`` attribute of a ``MatMul``.
        adj_x: The ``adj_x`` attribute of a ``BatchMatMul*``.

    Returns:
        FLOPs, a multiply-add counting 2.

    Example:
        >>> op_flops("BatchMatMulV2", [(2, 8, 16), (2, 16, 4)], [(2, 8, 4)])
        2048
        >>> op_flops("Relu", [(8, 4)], [(8, 4)])
        32
    """
    out = _numel(outputs[0]) if outputs else 0
    if op_type in MOVEMENT_OPS:
        return 0
    if op_type == "MatMul" and inputs:
        a = inputs[0]
        k = int(a[0] if transpose_a else a[-1]) if len(a) == 2 else 1
        return 2 * out * k
    if op_type.startswith("BatchMatMul") and inputs:
        a = inputs[0]
        k = int(a[-2] if adj_x else a[-1]) if a else 1
        return 2 * out * k
    if op_type == "Einsum" and equation:
        return _einsum_flops(equation, inputs)
    if op_type in ("Conv2D", "Conv1D", "Conv3D", "DepthwiseConv2dNative") and len(inputs) > 1:
        kernel = inputs[1]
        if op_type == "DepthwiseConv2dNative":
            return 2 * out * _numel(kernel[:-2])
        return 2 * out * _numel(kernel[:-1])
    if op_type.startswith(("Conv2DBackprop", "Conv3DBackprop", "DepthwiseConv2dNativeBackprop")):
        # gradient of a convolution (Note [keras capture]): as many multiply-adds as its forward,
        # one per (gradient element, kernel element of one output channel)
        if len(inputs) < 3:
            return out
        kernel = outputs[0] if "Filter" in op_type else inputs[1]
        per = kernel[:-2] if op_type.startswith("Depthwise") else kernel[:-1]
        return 2 * _numel(inputs[2]) * _numel(per)
    if op_type in ("MaxPool", "AvgPool", "MaxPoolV2", "AvgPool3D", "MaxPool3D") and inputs:
        return _numel(inputs[0])
    if op_type in _REDUCTIONS and inputs:
        return _numel(inputs[0])
    if op_type in ("FusedBatchNormV3", "FusedBatchNorm"):
        return 4 * out
    return _PER_ELEMENT.get(op_type, 1) * out
