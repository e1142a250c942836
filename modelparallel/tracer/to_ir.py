"""Build the IR :class:`~modelparallel.ir.Graph` from a flat graph module and its annotations.

Note [canonical parameter names]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A tensor's canonical name is the first name ``model.named_parameters(remove_duplicate=False)``
gives it (then ``named_buffers``, for buffers). Other names of the same tensor object (tied
weights: GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are its aliases, kept in
``Param.aliases`` and mapped to the canonical name in ``TracedModel.param_names``. Tensor
constants created during tracing are buffers named by their graph attribute
(``_tensor_constant0``, ``lifted_tensor_0``). ``get_attr`` nodes of parameters, buffers and
constants are not IR nodes: each IR node lists the canonical names it reads in ``params``, and a
``call_module`` node lists every parameter and buffer of its module (recursively).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modelparallel.ir import Graph, Node, OpKind, Param
from modelparallel.tracer.annotate import NodeInfo

__all__ = ["ParamTable", "build_ir", "is_random_node", "target_name"]


class ParamTable:
    """Canonical names of a model's parameters and buffers (Note [canonical parameter names]).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> ParamTable(lin).names["weight"]
        'weight'
    """

    def __init__(self, model: nn.Module) -> None:
        self.by_id: dict[int, str] = {}
        self.names: dict[str, str] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.buffers: set[str] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            self._add(name, p, buffer=False)
        for name, b in model.named_buffers(remove_duplicate=False):
            self._add(name, b, buffer=True)

    def _add(self, name: str, t: torch.Tensor, *, buffer: bool) -> None:
        canon = self.by_id.setdefault(id(t), name)
        self.names[name] = canon
        if canon == name:
            self.tensors[name] = t
            if buffer:
                self.buffers.add(name)

    def canonical(self, target: str, value: torch.Tensor) -> str:
        """Canonical name of the tensor ``value`` reached through attribute ``target``; a
        tensor the model does not own (a traced constant) is registered under ``target``."""
        if target in self.names:
            return self.names[target]
        if id(value) in self.by_id:
            canon = self.by_id[id(value)]
            self.names[target] = canon
            return canon
        self.by_id[id(value)] = target
        self.names[target] = target
        self.tensors[target] = value
        self.buffers.add(target)
        return target

    def aliases(self, canon: str) -> tuple[str, ...]:
        """The other names of ``canon``, in model order."""
        return tuple(n for n, c in self.names.items() if c == canon and n != canon)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def target_name(node: torch.fx.Node) -> str:
    """The IR ``target`` string of a graph node (``"aten.mm.default"``, ``"_operator.add"``).

    Example:
        >>> g = torch.fx.symbolic_trace(nn.ReLU())
        >>> [target_name(n) for n in g.graph.nodes]
        ['input', 'torch.nn.functional.relu', 'output']
    """
    t = node.target
    if node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(t)
        try:
            return torch.fx.node._get_qualified_name(t)  # type: ignore[arg-type]
        except Exception:
            return getattr(t, "__qualname__", None) or repr(t)
    return str(t)


_RANDOM = re.compile(
    r"rand\w*|bernoulli_?|normal_?|uniform_?|multinomial|poisson|exponential_|geometric_|"
    r"cauchy_|log_normal_|\w*dropout\w*")


def _dropout_active(node: torch.fx.Node) -> bool:
    args, kwargs = node.args, node.kwargs
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    train = args[2] if len(args) > 2 else kwargs.get("train", kwargs.get("training", True))
    if isinstance(p, int | float) and p == 0:
        return False
    return train is not False


def is_random_node(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether the node draws random numbers (an active dropout, a ``rand*`` op...).

    Dropout with probability 0, or with training off, is not random.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Dropout(0.1))
        >>> [is_random_node(n, gm) for n in gm.graph.nodes]
        [False, True, False]
    """
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            return mod.p > 0
        return False
    if node.op not in ("call_function", "call_method"):
        return False
    parts = target_name(node).split(".")
    hits = [p for p in parts if _RANDOM.fullmatch(p)]
    if not hits:
        return False
    if any("dropout" in h for h in hits):
        return _dropout_active(node)
    return True


def _module_of(node: torch.fx.Node, root_type: str) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", (root_type if node.op not in ("placeholder", "output") else "")
    path, mtype = list(stack.values())[-1]
    if str(path).startswith("_empty_nn_module_stack"):
        return "", root_type
    if not isinstance(mtype, str):
        mtype = getattr(mtype, "__name__", str(mtype))
    return str(path), mtype.rsplit(".", 1)[-1]


def build_ir(gm: torch.fx.GraphModule, model: nn.Module, infos: Mapping[str, NodeInfo],
             *, method: str, metadata: Mapping[str, str] | None = None
             ) -> tuple[Graph, dict[str, str]]:
    """The IR graph of ``gm`` (Note [canonical parameter names]).

    Args:
        gm: The flat graph module (one IR node per node, except tensor ``get_attr`` nodes).
        model: The user's model (for canonical parameter names).
        infos: Per-node shapes and annotations from :func:`~.annotate.propagate`.
        method: ``"fx"`` or ``"export"``, recorded in the metadata.
        metadata: Extra metadata strings.

    Returns:
        The graph, and every parameter/buffer name (aliases included) to its canonical name.
    """
    table = ParamTable(model)
    root_type = type(model).__name__
    folded: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _resolve(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                folded[node.name] = table.canonical(str(node.target), value)
    used: dict[str, None] = {}
    nodes: list[Node] = []
    for node in gm.graph.nodes:
        if node.name in folded:
            continue
        inputs: list[str] = []
        params: dict[str, None] = {}
        for src in node.all_input_nodes:
            if src.name in folded:
                params[folded[src.name]] = None
            elif src.name not in inputs:
                inputs.append(src.name)
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            prefix = str(node.target)
            for n, t in (*mod.named_parameters(prefix=prefix, remove_duplicate=False),
                         *mod.named_buffers(prefix=prefix, remove_duplicate=False)):
                params[table.canonical(n, t)] = None
        used.update(params)
        info = infos[node.name]
        path, mtype = _module_of(node, root_type)
        nodes.append(Node(
            name=node.name,
            op=OpKind(node.op),
            target=target_name(node),
            inputs=tuple(inputs),
            outputs=info.outputs,
            params=tuple(params),
            module_path=path,
            module_type=mtype,
            flops=info.flops,
            backward_flops=info.backward_flops,
            saved_bytes=info.saved_bytes,
            is_random=is_random_node(node, gm),
            value_kind=info.value_kind if node.op != "output" else "none",
        ))
    params_ir = []
    for canon in used:
        t = table.tensors[canon]
        params_ir.append(Param(
            name=canon, shape=tuple(t.shape), dtype=_dtype(t),
            is_buffer=canon in table.buffers or not isinstance(t, nn.Parameter),
            requires_grad=bool(t.requires_grad), aliases=table.aliases(canon)))
    meta = {"tracer": method, "torch": torch.__version__, "model": root_type,
            "python": sys.version.split()[0]}
    meta.update(metadata or {})
    graph = Graph(name=root_type, nodes=tuple(nodes), params=tuple(params_ir), metadata=meta)
    return graph, dict(table.names)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
