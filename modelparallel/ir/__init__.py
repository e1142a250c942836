"""The framework-neutral graph that every stage of modelparallel reads.

A :class:`Graph` is a DAG of :class:`Node` values in topological order. Each node records what it
computes (op kind and target), where it lives in the model (module path), which values it consumes
(producer node names), what it produces (tensor metadata), which parameters and buffers it reads
(by canonical qualified name), and its forward FLOPs. Parameters are listed once in the graph under
a canonical name; names that alias the same storage (tied weights) are kept as ``aliases``.

This package imports only :mod:`modelparallel.errors` and :mod:`modelparallel._jsonfile` of
modelparallel (neither imports anything else of ours). It is the root of the one-way import chain
(``ir <- tracer, cost_model <- partitioner <- codegen <- runtime <- front ends``); see Note [error
hierarchy] in ``modelparallel/errors.py``. Its modules: :mod:`~modelparallel.ir.nodes` (dtypes, op
kinds, tensors, parameters, nodes), :mod:`~modelparallel.ir.graph` (the graph, its fingerprint and
JSON) and :mod:`~modelparallel.ir.analysis` (input-derived nodes, recomputed nodes, module groups).
Import every name from ``modelparallel.ir``.

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

from modelparallel.errors import IRFormatError, ModelParallelError
from modelparallel.ir.analysis import (
    CONSTANT_BUFFER_BYTES,
    input_derived_nodes,
    module_groups,
    recomputed_nodes,
    region_of,
)
from modelparallel.ir.graph import FORMAT_NAME, FORMAT_VERSION, Graph
from modelparallel.ir.nodes import DTYPE_BYTES, Node, OpKind, Param, TensorMeta, dtype_bytes

__all__ = [
    "CONSTANT_BUFFER_BYTES",
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
    "region_of",
]
