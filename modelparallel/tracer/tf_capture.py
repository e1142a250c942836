"""Trace a Keras model (Keras 3 or tf-keras) op by op into the IR.

Note [keras capture]
~~~~~~~~~~~~~~~~~~~~
The model is called once on one microbatch inside ``tf.function(autograph=False)``; the concrete
function's graph holds every op with its shapes and dtypes. While tracing, each layer's ``call``
is wrapped: the ops created during a call that no inner layer claimed belong to that layer, whose
path in the layer tree (``block_0.attn.query``) becomes the node's ``module_path`` (TensorFlow's
name scopes do not give it: after an eager build they read ``model_1/h0_1/ln1_1/...``).
``graph.captures`` maps each resource placeholder to the variable it reads.

IR nodes are the ops that compute: ``Const``, resource placeholders, ``ReadVariableOp``,
``Identity``, ``NoOp`` and ``StopGradient`` are dropped (a node reading a variable lists it in
``params``; ``Identity`` is looked through), and ops that depend on constants only (a causal
mask) are folded away. Every op the model call created, in creation order, gets an *owner*: the IR
node it belongs to (dropped ops go with their first consumer). The runtime places op ``k`` of a
later call of the same model on the stage of the owner of op ``k`` (Note [op placement] in
``runtime/tf_pipeline.py``); placeholders are not counted, since TensorFlow creates a capture
placeholder only on a variable's first read in a graph.

Backward FLOPs are counted, not guessed: after the call, the traced function also takes
``tf.gradients`` of its floating outputs' sum with respect to the trainable variables, and each
gradient op (TensorFlow names it ``gradients/<forward op>_grad/...``) adds its FLOPs
(:func:`~modelparallel.tracer.tf_flops.op_flops`) to its forward op's node as
``backward_flops``: a ``MatMul``'s two matmuls, a ``Relu``'s one mask. Those ops are not part of
the call's span and never become nodes; where a gradient is not defined, ``backward_flops`` stays
``None`` and the cost model estimates it from ``flops``. (``tf.gradients`` also builds the first
layer's gradient with respect to the input, which execution prunes: a slight overcount there.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from modelparallel.errors import TracingError
from modelparallel.ir import DTYPE_BYTES, Graph, Node, OpKind, Param, TensorMeta
from modelparallel.tracer.tf_flops import op_flops

__all__ = ["TFTraced", "is_keras_model", "layer_paths", "trace_keras"]

_DROPPED = frozenset({"Const", "Placeholder", "ReadVariableOp", "Identity", "NoOp",
                      "StopGradient", "VarHandleOp"})
_TF_DTYPES = {"half": "float16", "double": "float64", "float": "float32"}


def is_keras_model(obj: object) -> bool:
    """Whether ``obj`` is a Keras 3 or tf-keras layer/model, judged without importing either.

    Example:
        >>> is_keras_model(object())
        False
    """
    return any(c.__module__.split(".")[0] in ("keras", "tf_keras")
               for c in type(obj).__mro__)


@dataclass
class TFTraced:
    """A Keras model traced into the IR, with what the TensorFlow runtime needs to run it.

    Attributes:
        graph: The IR graph.
        model: The Keras model.
        variables: Canonical parameter name -> the variable (a Keras variable or ``tf.Variable``).
        op_owners: For the ``k``-th non-placeholder op the model's call creates, the IR node it
            belongs to (``None``: no IR node needs it, e.g. an unused constant).
        op_types: The type of each of those ops, to check a later call creates the same ops.
        input_names: The placeholder node names, in the order of the flattened inputs.
        training: The ``training`` flag the model was traced with.
    """

    graph: Graph
    model: Any
    variables: dict[str, Any]
    op_owners: tuple[str | None, ...]
    op_types: tuple[str, ...]
    input_names: tuple[str, ...]
    training: bool = True
    notes: list[str] = field(default_factory=list)


def _children(layer: Any) -> list[Any]:
    flat = getattr(layer, "_flatten_layers", None)
    if flat is None:
        return []
    return [c for c in flat(include_self=False, recursive=False)]


def layer_paths(model: Any) -> dict[int, str]:
    """``id(layer)`` -> the layer's dotted path below ``model`` (the model itself is ``""``).

    Example:
        >>> import keras  # doctest: +SKIP
        >>> m = keras.Sequential([keras.layers.Dense(2, name="fc")])  # doctest: +SKIP
        >>> sorted(layer_paths(m).values())  # doctest: +SKIP
        ['', 'fc']
    """
    paths: dict[int, str] = {id(model): ""}
    stack = [(model, "")]
    while stack:
        layer, prefix = stack.pop()
        for child in _children(layer):
            if id(child) in paths:
                continue
            path = f"{prefix}.{child.name}" if prefix else str(child.name)
            paths[id(child)] = path
            stack.append((child, path))
    return paths


def _layers(model: Any) -> list[Any]:
    seen: dict[int, Any] = {id(model): model}
    stack = [model]
    while stack:
        for child in _children(stack.pop()):
            if id(child) not in seen:
                seen[id(child)] = child
                stack.append(child)
    return list(seen.values())


@contextlib.contextmanager
def _attributing(model: Any, claims: dict[str, tuple[str, str]]) -> Iterator[None]:
    """Wrap every layer's ``call`` so that the ops it creates are claimed by its path."""
    paths = layer_paths(model)
    patched: list[Any] = []
    for layer in _layers(model):
        if layer is model:
            continue
        path, original = paths[id(layer)], layer.call

        def wrapper(*args: Any, __path: str = path, __call: Any = original,
                    __type: str = type(layer).__name__, **kwargs: Any) -> Any:
            graph = tf.compat.v1.get_default_graph()
            before = len(graph.get_operations())
            out = __call(*args, **kwargs)
            for op in graph.get_operations()[before:]:
                claims.setdefault(op.name, (__path, __type))
            return out

        object.__setattr__(layer, "call", wrapper)
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            with contextlib.suppress(KeyError, AttributeError):
                object.__delattr__(layer, "call")


def _unwrap(var: Any) -> Any:
    """The ``tf.Variable`` behind a Keras 3 variable (itself for tf-keras)."""
    inner = getattr(var, "value", None)
    return inner if isinstance(inner, tf.Variable) else var


def _var_name(var: Any, root: str) -> str:
    path = str(getattr(var, "path", None) or var.name).split(":")[0]
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == root:
        parts = parts[1:]
    return ".".join(parts)


def _dtype(dt: tf.DType) -> str | None:
    name = _TF_DTYPES.get(dt.name, dt.name)
    return name if name in DTYPE_BYTES else None


def _shape(t: tf.Tensor) -> tuple[int, ...]:
    if t.shape.rank is None:
        return ()
    return tuple(int(s) if s is not None else 1 for s in t.shape.as_list())


def _flat_specs(inputs: Any) -> tuple[list[Any], list[str]]:
    if isinstance(inputs, Mapping):
        return list(inputs.values()), [str(k) for k in inputs]
    if isinstance(inputs, tuple | list):
        return list(inputs), [f"arg{i}" for i in range(len(inputs))]
    return [inputs], ["arg0"]


def trace_keras(model: Any, inputs: Any, *, training: bool = True,
                name: str | None = None, call_kwargs: Mapping[str, Any] | None = None) -> TFTraced:
    """Trace ``model`` called on ``inputs`` (one microbatch) into the IR (Note [keras capture]).

    Args:
        model: A built or unbuilt Keras model (Sequential, Functional or a subclass).
        inputs: A tensor, a tuple/list of tensors (positional inputs) or a dict (one input
            structure, passed as the model's single argument).
        training: The ``training`` flag of the traced call (dropout on or off).
        call_kwargs: Other (non-tensor) keyword arguments of the call; they replace
            ``training`` when given.
        name: The graph's name (default: the model's class name).

    Returns:
        The IR graph and the op-to-node map the TensorFlow runtime places ops by.

    Raises:
        TracingError: if the call cannot be traced into one graph (a Python branch on a tensor's
            value, say).

    Example:
        >>> import keras  # doctest: +SKIP
        >>> m = keras.Sequential([keras.layers.Dense(4, name="fc")])  # doctest: +SKIP
        >>> traced = trace_keras(m, tf.zeros((2, 3)))  # doctest: +SKIP
        >>> [n.target for n in traced.graph][:2]  # doctest: +SKIP
        ['arg0', 'MatMul']
    """
    values, names = _flat_specs(inputs)
    specs = [v if isinstance(v, tf.TensorSpec) else tf.TensorSpec(v.shape, v.dtype)
             for v in values]
    mapping = isinstance(inputs, Mapping)
    keys = list(inputs) if mapping else []
    kwargs = dict(call_kwargs) if call_kwargs is not None else {"training": training}

    span: list[int] = []

    def call(*flat: Any) -> Any:
        graph = tf.compat.v1.get_default_graph()
        span[:] = [len(graph.get_operations())]
        if mapping:
            out = model(dict(zip(keys, flat, strict=True)), **kwargs)
        else:
            out = model(*flat, **kwargs)
        span.append(len(graph.get_operations()))
        _add_gradients(model, out)
        span.append(len(graph.get_operations()))
        return out

    if not getattr(model, "built", True) or not model.variables:
        with tf.init_scope():  # build eagerly, so variables exist outside the traced graph
            call(*[tf.zeros([d or 1 for d in s.shape.as_list()], s.dtype) for s in specs])
    claims: dict[str, tuple[str, str]] = {}
    fn = tf.function(call, autograph=False)
    try:
        with _attributing(model, claims):
            concrete = fn.get_concrete_function(*specs)
    except (tf.errors.OperatorNotAllowedInGraphError, TypeError, ValueError) as e:
        raise TracingError(
            f"tracing {type(model).__name__} into one TensorFlow graph failed: {e}. A Python "
            "`if`/`for` on a tensor's value inside `call` cannot be partitioned; use tf.cond / "
            "tf.where or make the branch depend on Python values only") from e
    return _to_ir(model, concrete, claims, names, training, name or type(model).__name__,
                  (span[0], span[1]), span[2])


def _add_gradients(model: Any, out: Any) -> None:
    """The gradients of ``out``'s floating leaves' sum with respect to ``model``'s trainable
    variables, built into the traced graph for their FLOPs (Note [keras capture]); nothing when
    some gradient is not defined."""
    leaves = [t for t in tf.nest.flatten(out, expand_composites=True)
              if isinstance(t, tf.Tensor) and t.dtype.is_floating]
    variables = [_unwrap(v) for v in getattr(model, "trainable_variables", [])]
    if not leaves or not variables or tf.executing_eagerly():  # an eager build: no graph
        return
    with contextlib.suppress(LookupError, TypeError, ValueError):
        tf.gradients([tf.reduce_sum(t) for t in leaves], variables,
                     unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _backward_flops(ops: Sequence[Any], kept: set[str]) -> dict[str, int]:
    """Forward op name -> the FLOPs of its gradient ops (``gradients*/<name>_grad/...``)."""
    found: dict[str, int] = {}
    for op in ops:
        head, sep, _ = op.name.partition("/")
        if not sep or not head.startswith("gradients") or "_grad/" not in op.name:
            continue
        fwd = op.name[len(head) + 1:].rpartition("_grad/")[0]
        if fwd not in kept:
            continue
        found[fwd] = found.get(fwd, 0) + _flops(op)
    return found


def _flops(op: Any) -> int:
    """:func:`op_flops` of graph op ``op``, from its shapes and attributes."""
    attrs: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        attrs["equation"] = op.get_attr("equation").decode()
    for attr in ("transpose_a", "adj_x"):
        with contextlib.suppress(ValueError):
            attrs[attr] = bool(op.get_attr(attr))
    return op_flops(op.type, [_shape(t) for t in op.inputs], [_shape(t) for t in op.outputs],
                    **attrs)


def _variables_by_handle(model: Any) -> tuple[dict[int, Any], dict[int, str]]:
    root = str(getattr(model, "name", ""))
    by_id: dict[int, Any] = {}
    names: dict[int, str] = {}
    used: set[str] = set()
    for var in model.variables:
        tfvar = _unwrap(var)
        key = id(tfvar.handle)
        if key in by_id:
            continue
        name = _var_name(var, root)
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        by_id[key], names[key] = var, name
    return by_id, names


def _to_ir(model: Any, concrete: Any, claims: Mapping[str, tuple[str, str]],
           input_names: Sequence[str], training: bool, name: str, span: tuple[int, int],
           grads_end: int) -> TFTraced:
    graph = concrete.graph
    by_id, var_names = _variables_by_handle(model)
    resource_var: dict[str, str] = {}  # internal placeholder tensor name -> param name
    variables: dict[str, Any] = {}
    for external, internal in graph.captures:
        key = id(external)
        if key in by_id:
            resource_var[internal.name] = var_names[key]
            variables[var_names[key]] = by_id[key]
    every = graph.get_operations()
    grad_ops = every[span[1]:grads_end]
    ops = every[:span[1]] + every[grads_end:]  # the forward graph (Note [keras capture])
    n_inputs = len(input_names)
    input_ops = {t.op.name: input_names[i] for i, t in enumerate(graph.inputs[:n_inputs])}

    # Which ops depend on a model input or a variable (the others fold away as constants).
    live: set[str] = set()
    trainable_dep: set[str] = set()
    for op in ops:
        if op.name in input_ops:
            live.add(op.name)
        elif op.type == "Placeholder":
            pname = resource_var.get(op.outputs[0].name)
            if pname is not None:
                live.add(op.name)
                if bool(getattr(variables[pname], "trainable", False)):
                    trainable_dep.add(op.name)
        elif any(t.op.name in live for t in op.inputs) or (
                not op.inputs and op.type not in _DROPPED and op.outputs == []):
            live.add(op.name)
        if any(t.op.name in trainable_dep for t in op.inputs):
            trainable_dep.add(op.name)
    kept = [op for op in ops if op.name in live and op.type not in _DROPPED
            and op.name not in input_ops]
    kept_names = {op.name for op in kept}
    backward = _backward_flops(grad_ops, kept_names) if grad_ops else {}

    def sources(t: tf.Tensor, seen: set[str]) -> tuple[list[str], list[str]]:
        """Kept producers and variables behind tensor ``t``, looking through dropped ops."""
        op = t.op
        if op.name in seen:
            return [], []
        seen.add(op.name)
        if op.name in input_ops:
            return [input_ops[op.name]], []
        if op.name in kept_names:
            return [op.name], []
        if op.type == "Placeholder":
            pname = resource_var.get(t.name)
            return ([], [pname]) if pname else ([], [])
        prods: list[str] = []
        params: list[str] = []
        for inp in op.inputs:
            p, q = sources(inp, seen)
            prods += p
            params += q
        return prods, params

    nodes: list[Node] = []
    for i, inp in enumerate(graph.inputs[:n_inputs]):
        meta = TensorMeta(_shape(inp), _dtype(inp.dtype) or "float32")
        nodes.append(Node(input_names[i], OpKind.PLACEHOLDER, input_names[i], outputs=(meta,)))
    for op in kept:
        prods, params = [], []
        for inp in op.inputs:
            p, q = sources(inp, set())
            prods += p
            params += q
        metas = []
        for out in op.outputs:
            dt = _dtype(out.dtype)
            if dt is not None:
                metas.append(TensorMeta(_shape(out), dt, requires_grad=(
                    op.name in trainable_dep and dt.startswith(("float", "bfloat", "complex")))))
        path, mtype = claims.get(op.name, ("", type(model).__name__))
        flops = _flops(op)
        nodes.append(Node(
            op.name, OpKind.CALL_FUNCTION, op.type, inputs=tuple(dict.fromkeys(prods)),
            outputs=tuple(metas), params=tuple(dict.fromkeys(params)), module_path=path,
            module_type=mtype, flops=flops, backward_flops=(
                backward.get(op.name, 0) if grad_ops else None), is_random="Random" in op.type or "Dropout" in path,
            value_kind=("tensor" if len(metas) == 1 else "tensors" if metas else "none")))
    out_nodes: list[str] = []
    for t in tf.nest.flatten(concrete.structured_outputs, expand_composites=True):
        if isinstance(t, tf.Tensor):
            out_nodes += sources(t, set())[0]
    nodes.append(Node("output", OpKind.OUTPUT, "output", inputs=tuple(dict.fromkeys(out_nodes))))
    table = tuple(
        Param(pname, tuple(int(s) for s in var.shape), _dtype(tf.as_dtype(var.dtype)) or "float32",
              is_buffer=not bool(getattr(var, "trainable", False)),
              requires_grad=bool(getattr(var, "trainable", False)))
        for pname, var in variables.items())
    ir = Graph(name=name, nodes=tuple(nodes), params=table,
               metadata={"framework": "tensorflow", "tensorflow": tf.__version__,
                         "tracer": "keras-capture"})
    owners, types = _op_owners(ops, kept_names, span)
    return TFTraced(ir, model, variables, owners, types, tuple(input_names), training)


def _op_owners(ops: Sequence[Any], kept: set[str], span: tuple[int, int]
               ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    """The owner of each non-placeholder op of the call (Note [keras capture])."""
    owner: dict[str, str | None] = {n: n for n in kept}
    consumers: dict[str, list[str]] = {}
    for op in ops:
        for t in op.inputs:
            consumers.setdefault(t.op.name, []).append(op.name)
    for op in reversed(ops):
        if op.name in owner:
            continue
        found = next((owner[c] for c in consumers.get(op.name, ()) if owner.get(c)), None)
        owner[op.name] = found
    for op in ops:  # no consumer with an owner: go with the producer
        if owner.get(op.name) is None:
            owner[op.name] = next((owner[t.op.name] for t in op.inputs if owner.get(t.op.name)),
                                  None)
    counted = [op for op in ops[span[0]:span[1]] if op.type != "Placeholder"]
    return tuple(owner.get(op.name) for op in counted), tuple(op.type for op in counted)
