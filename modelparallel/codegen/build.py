"""Build one ``torch.fx.GraphModule`` per pipeline stage from a traced model and a plan.

Note [stage parameters]
~~~~~~~~~~~~~~~~~~~~~~~
A stage module holds only the parameters and buffers its own nodes read, under their original
qualified names: the tensors of its ``get_attr`` nodes and the submodules of its ``call_module``
nodes. Nothing is copied: the stage refers to the very tensors and submodule objects of the
traced module, which are the user model's own (TracedModel contract), so building a stage
allocates no parameter memory, and a model built on the meta device gives meta stages until
:func:`modelparallel.codegen.materialize` makes this stage's tensors real. The parameters of
other stages are never touched.

Parameter reads (``get_attr``) are retargeted to the canonical name (``traced.param_names``), so
a tied weight read as ``lm_head.weight`` appears as ``transformer.wte.weight``. When a leaf
submodule holds a tied weight under an alias, the canonical name is registered too (in the
stage's own container modules, never inside a user submodule). So every canonical name of a
tensor the stage holds resolves with ``module.get_parameter`` / ``get_buffer``; that is what
``StageProgram.shared_params`` keys and ``StageProgram.param_names`` values are.

A tied parameter read on several stages is held by each of them (the same tensor object when the
stages are built in one process from one traced model; a copy on each rank in a distributed run).
Its gradients must be summed among the holders after backward: ``StageProgram.shared_params``
lists them (trainable parameters only), derived from which stage's nodes read which parameter.
With ``PlanConfig(tied="colocate")`` the partitioner keeps all readers on one stage, and the list
is empty.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.node import map_arg

from modelparallel.codegen.program import BoundaryValue, StageProgram
from modelparallel.codegen.split import StageSplit, split_stages
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph
from modelparallel.plan import Plan
from modelparallel.tracer.traced import TracedModel

__all__ = ["build_stage", "build_stages"]


def build_stage(traced: TracedModel, plan: Plan, stage: int, *,
                communication: str | None = None) -> StageProgram:
    """The program of one pipeline stage (Note [stage calling convention]).

    The plan's fingerprint is checked first, so a plan made for another model is refused before
    anything is built. Only this stage's parameters are referenced (Note [stage parameters]).

    Args:
        traced: The traced model (``modelparallel.tracer.trace``).
        plan: A plan made for ``traced.graph``.
        stage: Which stage to build, ``0 .. plan.num_stages - 1``.
        communication: ``"direct"`` or ``"relay"``: how values read two or more stages later
            travel (Note [direct communication] in ``modelparallel/plan.py``); ``None``: as the
            plan says.

    Returns:
        The stage's :class:`StageProgram`.

    Raises:
        PlanMismatchError: if the plan was made for another model.
        PlanFormatError: if the plan's placement is invalid for this graph.
        ConfigError: if ``stage`` is out of range.

    Example:
        >>> import torch
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> traced = trace(model, (torch.randn(3, 4),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> last = build_stage(traced, plan, 1)
        >>> last.is_last, last.num_model_outputs
        (True, 1)
    """
    plan.check_graph(traced.graph)
    if not isinstance(stage, int) or not 0 <= stage < plan.num_stages:
        raise ConfigError(f"stage = {stage!r}; the plan has stages 0..{plan.num_stages - 1}")
    splits = split_stages(traced, plan, communication=communication)
    return _build(traced, splits, stage)


def build_stages(traced: TracedModel, plan: Plan, *,
                 communication: str | None = None) -> tuple[StageProgram, ...]:
    """The programs of every stage of ``plan``, for running them all in one process
    (``communication`` as for :func:`build_stage`).

    Example:
        >>> import torch
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> traced = trace(model, (torch.randn(3, 4),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> [s.send for s in build_stages(traced, plan)][0] == build_stage(traced, plan, 1).recv
        True
    """
    plan.check_graph(traced.graph)
    splits = split_stages(traced, plan, communication=communication)
    return tuple(_build(traced, splits, k) for k in range(plan.num_stages))


# -- one stage ------------------------------------------------------------------------------------


def _build(traced: TracedModel, splits: tuple[StageSplit, ...], k: int) -> StageProgram:
    split = splits[k]
    graph = traced.graph
    module = _stage_module(traced, split)
    _register_canonical_names(module, traced)
    param_names = _held_names(module, traced)
    held = set(param_names.values())
    aliases: dict[str, list[str]] = {}
    for name, canonical in traced.param_names.items():
        if canonical in held and name != canonical:
            aliases.setdefault(canonical, []).append(name)
    out_node = next(n for n in traced.gm.graph.nodes if n.op == "output")
    return StageProgram(
        index=k,
        num_stages=split.num_stages,
        module=module,
        model_inputs=split.model_inputs,
        recv=tuple(_boundary(graph, v) for v in split.recv),
        send=tuple(_boundary(graph, v) for v in split.send),
        num_model_outputs=len(_flat_outputs(out_node)) if split.is_last else 0,
        out_spec=traced.out_spec if split.is_last else None,
        shared_params=_shared_params(graph, splits, split),
        input_names=tuple(traced.input_names),
        param_names=param_names,
        param_aliases={c: tuple(a) for c, a in aliases.items()},
        stage_nodes=tuple(n for n in split.own if graph.node(n).op.value != "output"),
        recomputed=split.recomputed,
        mutated_inputs=_mutated_inputs(module, set(split.recv)),
        sources=split.sources,
        dests=split.dests,
    )


_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem})


def _mutated_inputs(module: torch.fx.GraphModule, received: set[str]) -> tuple[str, ...]:
    """Received values that the stage's code writes in place (directly, not through a view).

    Runtimes clone those before the stage runs: a received tensor is an autograd leaf that
    requires grad, and autograd refuses in-place writes on it (Note [local boundaries] in
    ``modelparallel/runtime/local.py``).
    """
    out = []
    for node in module.graph.nodes:
        if node.op == "placeholder" and node.name in received and any(
                _writes_first_arg(module, user) and user.args and user.args[0] is node
                for user in node.users):
            out.append(node.name)
    return tuple(out)


def _writes_first_arg(module: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` modifies its first argument in place, as far as the graph tells."""
    if node.kwargs.get("inplace") is True:
        return True
    target = node.target
    if node.op == "call_module":
        assert isinstance(target, str)
        return getattr(module.get_submodule(target), "inplace", False) is True
    if node.op == "call_method":
        assert isinstance(target, str)
        return target.endswith("_") and not target.endswith("__")
    if node.op != "call_function":
        return False
    if target in _INPLACE_OPERATORS:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        args = schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _boundary(graph: Graph, name: str) -> BoundaryValue:
    node = graph.node(name)
    return BoundaryValue(name=name, kind=node.value_kind, metas=node.outputs)


def _flat_outputs(out_node: torch.fx.Node) -> list[torch.fx.node.Argument]:
    arg = out_node.args[0]
    return list(arg) if isinstance(arg, (tuple, list)) else [arg]


def _stage_module(traced: TracedModel, split: StageSplit) -> torch.fx.GraphModule:
    """Copy the stage's nodes into a new graph with the stage calling convention."""
    gm = traced.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i in split.model_inputs:
        old = nodes[traced.input_names[i]]
        env[old] = _placeholder(graph, old)
    for name in split.recv:
        env[nodes[name]] = _placeholder(graph, nodes[name])
    computed = split.computed
    attr_objects: dict[str, object] = {}
    for old in gm.graph.nodes:
        if old.name not in computed or old.op in ("placeholder", "output"):
            continue
        new = graph.node_copy(old, lambda a: env[a])
        if old.op == "get_attr":
            assert isinstance(old.target, str)
            canonical = traced.param_names.get(old.target, old.target)
            new.target = canonical
            attr_objects[canonical] = operator.attrgetter(old.target)(gm)
        env[old] = new
    outputs: list[torch.fx.node.Argument] = [env[nodes[name]] for name in split.send]
    if split.is_last:
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        outputs.extend(map_arg(a, lambda n: env[n]) for a in _flat_outputs(out_node))
    graph.output(tuple(outputs))
    root = _stage_root(gm, graph, attr_objects)
    module = torch.fx.GraphModule(root, graph, class_name=f"Stage{split.index}")
    _keep_non_persistent(module, gm, graph)
    return module


def _placeholder(graph: torch.fx.Graph, old: torch.fx.Node) -> torch.fx.Node:
    new = graph.placeholder(old.name)
    new.meta = dict(old.meta)
    assert new.name == old.name, (new.name, old.name)
    return new


def _stage_root(gm: torch.fx.GraphModule, graph: torch.fx.Graph,
                attr_objects: dict[str, object]) -> torch.nn.Module:
    """A container holding exactly the objects the stage graph reads, at their targets.

    ``GraphModule`` copies from it only what the graph's ``get_attr`` and ``call_module`` nodes
    name; it never writes into a user submodule (it stops at a submodule already installed).
    """
    root = torch.nn.Module()
    created: set[int] = {id(root)}
    installs: dict[str, object] = dict(attr_objects)
    for node in graph.nodes:
        if node.op == "call_module":
            assert isinstance(node.target, str)
            installs[node.target] = gm.get_submodule(node.target)
    for target in sorted(installs, key=lambda t: t.count(".")):
        _install(root, target, installs[target], created)
    return root


def _install(root: torch.nn.Module, target: str, obj: object, created: set[int]) -> None:
    """Put ``obj`` at ``target`` under ``root``, creating plain container modules on the way and
    never writing into a module the user owns (one not in ``created``)."""
    *prefix, field = target.split(".")
    holder = root
    for item in prefix:
        nxt = getattr(holder, item, None)
        if nxt is None:
            nxt = torch.nn.Module()
            holder.add_module(item, nxt)
            created.add(id(nxt))
        assert isinstance(nxt, torch.nn.Module)
        if id(nxt) not in created:
            # A user submodule is installed on the path: the target is a qualified name of the
            # user's model, so it is reachable inside that submodule already.
            return
        holder = nxt
    if isinstance(obj, torch.nn.Parameter):
        holder.register_parameter(field, obj)
    elif isinstance(obj, torch.Tensor):
        holder.register_buffer(field, obj)
    elif isinstance(obj, torch.nn.Module):
        holder.add_module(field, obj)
    else:
        setattr(holder, field, obj)


def _keep_non_persistent(module: torch.fx.GraphModule, gm: torch.fx.GraphModule,
                         graph: torch.fx.Graph) -> None:
    """Buffers that were non-persistent in the traced module stay so in the stage (GraphModule
    registers copied tensors as persistent buffers)."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        assert isinstance(node.target, str)
        owner_path, _, field = node.target.rpartition(".")
        try:
            src_owner = gm.get_submodule(owner_path)
            dst_owner = module.get_submodule(owner_path)
        except AttributeError:
            continue
        if field in src_owner._non_persistent_buffers_set and field in dst_owner._buffers:
            dst_owner._non_persistent_buffers_set.add(field)


def _register_canonical_names(module: torch.fx.GraphModule, traced: TracedModel) -> None:
    """Make every held tensor reachable under its canonical name (Note [stage parameters])."""
    held = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False))
    names = {name for name, _ in held}
    created = {id(m) for m in _container_modules(module)}
    for name, tensor in held:
        canonical = traced.param_names.get(name, name)
        if canonical in names:
            continue
        try:
            existing = operator.attrgetter(canonical)(module)
        except AttributeError:
            existing = None
        if existing is None:
            _install(module, canonical, tensor, created)
            names.add(canonical)


def _container_modules(module: torch.fx.GraphModule) -> list[torch.nn.Module]:
    """The container modules codegen created, that is every module of the stage except the
    user submodules of ``call_module`` nodes and their descendants."""
    user: set[int] = set()
    for node in module.graph.nodes:
        if node.op == "call_module":
            assert isinstance(node.target, str)
            user.update(id(m) for m in module.get_submodule(node.target).modules())
    return [m for m in module.modules() if id(m) not in user]


def _held_names(module: torch.fx.GraphModule, traced: TracedModel) -> dict[str, str]:
    held = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False))
    return {name: traced.param_names.get(name, name) for name, _ in held}


def _shared_params(graph: Graph, splits: tuple[StageSplit, ...],
                   split: StageSplit) -> dict[str, tuple[int, ...]]:
    """Trainable parameters this stage reads that other stages read too, with all readers."""
    out: dict[str, tuple[int, ...]] = {}
    for name in sorted(split.params):
        if not graph.param(name).trainable:
            continue
        holders = tuple(s.index for s in splits if name in s.params)
        if len(holders) > 1:
            out[name] = holders
    return out
