"""The tracer front door: :func:`trace` turns a model and an example batch into a TracedModel.

Note [tracer paths]
~~~~~~~~~~~~~~~~~~~
``method="fx"`` traces at module level with torch.fx (:mod:`.fx_path`); ``"export"`` traces at op
level with non-strict ``torch.export`` (:mod:`.export_path`); ``"auto"`` tries fx first and falls
back to export when fx fails (Hugging Face models always do: ``co_varnames is too small``, proxy
item assignment) or when the fx graph cannot run on fake tensors. The path used is
``TracedModel.method`` and the reasons are in ``TracedModel.notes``. When every path fails the
tracer raises :class:`~modelparallel.errors.TracingError` naming the module and source line each
tracer failed at, both error messages, and what to try.

Hugging Face models are traced with every ``config.use_cache`` set to False (and restored), so the
graph returns no KV cache; a ``use_cache`` the caller passes explicitly is respected.

Before annotation, attention masks computed from input shapes alone are simplified: a causal one
becomes SDPA's ``is_causal=True``, an all-true one is dropped (Note [causal masks] in
``masks.py``; ``simplify_masks=False`` turns this off). It is skipped when the caller passes
``use_cache=True``: a graph with a KV cache may later run with fewer queries than keys.

A model on the meta device is traced with meta copies of the example tensors, so no weight or
activation memory is allocated; the flat inputs the caller passes later are real tensors. Model
code that branches on the device type (Hugging Face's GPT-2 adds a ``contiguous`` off CPU) can
give a slightly different op graph on meta than on CPU, hence another fingerprint: trace on the
device kind the plan is for, or consistently on meta.
"""

from __future__ import annotations

import contextlib
import json
import linecache
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from modelparallel.errors import ConfigError, TracingError
from modelparallel.tracer.annotate import PropagationError, propagate
from modelparallel.tracer.export_path import trace_export
from modelparallel.tracer.fx_path import LeafSpec, RawTrace, trace_fx
from modelparallel.tracer.masks import simplify_attention_masks
from modelparallel.tracer.normalize import build_graph_module, make_device_neutral, model_device
from modelparallel.tracer.to_ir import build_ir
from modelparallel.tracer.traced import TracedModel

__all__ = ["METHODS", "trace"]

#: The tracing methods :func:`trace` accepts.
METHODS = ("auto", "fx", "export")

_TORCH_DIR = os.path.dirname(torch.__file__)
_TRACER_DIR = os.path.dirname(__file__)


def trace(model: nn.Module, args: Any = (), kwargs: Mapping[str, Any] | None = None, *,
          method: str = "auto", leaf_modules: Sequence[LeafSpec] = (), dynamic: bool = True,
          annotate: bool = True, simplify_masks: bool = True) -> TracedModel:
    """Trace ``model`` on an example batch into a flat graph module and its IR graph.

    Args:
        model: The model, on CPU or on the meta device (then nothing is allocated).
        args: Example positional inputs (a tuple; a single tensor is accepted).
        kwargs: Example keyword inputs.
        method: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"`` (Note [tracer paths]).
        leaf_modules: For fx: module types or qualified names to record as single
            ``call_module`` nodes instead of tracing through them.
        dynamic: For export: keep batch and sequence dimensions symbolic (Note [dynamic
            export] in ``export_path.py``). fx graphs are always shape-generic.
        annotate: Measure forward/backward FLOPs and saved activation bytes per node on fake
            tensors (Note [fake annotation] in ``annotate.py``).
        simplify_masks: Replace attention masks computed from input shapes alone: a causal one
            by SDPA's ``is_causal=True`` (the fast kernel), an all-true one by none (Note
            [causal masks] in ``masks.py``). ``False`` keeps the graph as traced.

    Returns:
        The traced model (see :class:`TracedModel` for the contract).

    Raises:
        ConfigError: for a bad ``method``, ``leaf_modules`` entry or model.
        TracingError: when no tracer path can trace the model.

    Example:
        >>> traced = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
        ...                (torch.randn(2, 4),))
        >>> traced.method, [n.op.value for n in traced.graph.nodes]
        ('fx', ['placeholder', 'call_module', 'call_module', 'output'])
        >>> traced.graph.nodes[1].flops
        128
    """
    _check(model, method, leaf_modules)
    targs: tuple[Any, ...] = (args,) if not isinstance(args, tuple | list) else tuple(args)
    tkwargs: dict[str, Any] = dict(kwargs or {})
    leaves, in_spec = pytree.tree_flatten((targs, tkwargs))
    device = model_device(model, leaves)
    if device.type == "meta":
        targs, tkwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"),
                                              (targs, tkwargs))
        leaves = pytree.tree_leaves((targs, tkwargs))
    paths = ["fx", "export"] if method == "auto" else [method]
    failures: dict[str, BaseException] = {}
    notes: list[str] = []
    if simplify_masks and tkwargs.get("use_cache"):
        simplify_masks = False
        notes.append("attention: masks left as traced because use_cache=True was passed (a "
                      "KV-cache graph may run with fewer queries than keys)")
    with _no_kv_cache(model, tkwargs, notes), _quiet_torch_logs():
        for path in paths:
            try:
                traced = _trace_with(path, model, targs, tkwargs, leaves, in_spec, device,
                                     leaf_modules=leaf_modules, dynamic=dynamic,
                                     annotate=annotate, simplify_masks=simplify_masks)
            except Exception as e:
                failures[path] = e
                continue
            for failed, err in failures.items():
                notes.append(f"torch.{failed} failed ({_short(err)}); used torch.{path}")
            traced.notes = (*notes, *traced.notes)
            return traced
    raise _tracing_error(model, failures, method)


def _check(model: nn.Module, method: str, leaf_modules: Sequence[LeafSpec]) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ConfigError(f"unknown tracing method {method!r}; use one of {list(METHODS)}")
    names = {n for n, _ in model.named_modules()}
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            if leaf not in names or leaf == "":
                raise ConfigError(
                    f"leaf_modules names {leaf!r}, which is not a submodule of "
                    f"{type(model).__name__}; give qualified names from "
                    "model.named_modules() (e.g. 'encoder.layer.0') or module types")
        elif not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
            raise ConfigError(
                f"leaf_modules entry {leaf!r} is neither an nn.Module subclass nor a "
                "qualified module name")


#: torch loggers that print a failing fake-tensor or export run at length (the tracer reports
#: failures itself, as one TracingError, or falls back to the other path).
_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                  "torch._export", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


#: Words of torch errors that mean the example inputs do not fit the model's shapes.
_SHAPE_WORDS = ("shapes cannot be multiplied", "same reduction dim", "size mismatch",
                "must match the size of tensor", "the size of tensor a", "expected input",
                "is invalid for input of size", "mat1 and mat2")


def _shape_mismatch(failures: Mapping[str, BaseException]) -> bool:
    def text(e: BaseException) -> str:
        parts: list[str] = []
        seen: set[int] = set()
        chain: BaseException | None = e
        while chain is not None and id(chain) not in seen:
            seen.add(id(chain))
            parts.append(str(chain))
            cause = getattr(chain, "cause", None)
            if isinstance(cause, BaseException):
                parts.append(str(cause))
            chain = chain.__cause__ or chain.__context__
        return " ".join(parts).lower()
    return bool(failures) and all(any(w in text(e) for w in _SHAPE_WORDS)
                                  for e in failures.values())


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module, kwargs: Mapping[str, Any], notes: list[str]
                 ) -> Iterator[None]:
    """Set ``use_cache=False`` on every Hugging Face config of the model, then restore."""
    saved: list[tuple[Any, Any]] = []
    if "use_cache" not in kwargs:
        seen: set[int] = set()
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and id(cfg) not in seen and hasattr(cfg, "use_cache"):
                seen.add(id(cfg))
                saved.append((cfg, cfg.use_cache))
        for cfg, _ in saved:
            cfg.use_cache = False
        if any(old for _, old in saved):
            notes.append("set config.use_cache=False while tracing (no KV-cache outputs)")
    try:
        yield
    finally:
        for cfg, old in saved:
            cfg.use_cache = old


def _trace_with(path: str, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                leaves: list[Any], in_spec: pytree.TreeSpec, device: torch.device, *,
                leaf_modules: Sequence[LeafSpec], dynamic: bool, annotate: bool,
                simplify_masks: bool) -> TracedModel:
    t0 = time.perf_counter()
    raw: RawTrace
    if path == "fx":
        raw = trace_fx(model, args, kwargs, leaf_modules)
    else:
        raw = trace_export(model, args, kwargs, dynamic=dynamic)
        raw.notes += make_device_neutral(raw.graph, device, leaves)
        if leaf_modules:
            raw.notes.append("leaf_modules apply to torch.fx only; torch.export traced every "
                             "module down to ATen ops")
    gm, gm_notes = build_graph_module(raw.holder, raw.graph, model,
                                      class_name=f"Traced{type(model).__name__}")
    notes = [*raw.notes, *gm_notes]
    if simplify_masks:
        notes += simplify_attention_masks(gm, leaves, model=model).notes
    t1 = time.perf_counter()
    try:
        infos, prop_notes = propagate(gm, leaves, annotate=annotate)
    except PropagationError as e:
        if device.type == "meta":
            raise
        notes.append(f"fake-tensor propagation failed at node {e.node!r} "
                     f"({_short(e.cause)}); annotated by running the example batch for real")
        infos, prop_notes = propagate(gm, leaves, annotate=annotate, real=True)
    t2 = time.perf_counter()
    metadata = {
        "input_shapes": json.dumps({n.name: list(leaf.shape) for n, leaf in zip(
            (n for n in gm.graph.nodes if n.op == "placeholder"), leaves)
            if isinstance(leaf, torch.Tensor)}),
        "dynamic": str(raw.dynamic).lower(),
        "annotated": str(annotate).lower(),
    }
    if type(model).__module__.startswith("transformers"):
        import transformers
        metadata["transformers"] = transformers.__version__
    graph, param_names = build_ir(gm, model, infos, method=path, metadata=metadata)
    t3 = time.perf_counter()
    n_out = len(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])
    assert n_out == raw.out_spec.num_leaves, (n_out, raw.out_spec)
    input_names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    constants = tuple((i, leaf) for i, leaf in enumerate(leaves)
                      if not isinstance(leaf, torch.Tensor) and not hasattr(leaf, "smp_slice"))
    if constants:
        notes.append("non-tensor inputs built into the graph (later steps must pass the same "
                     "values, Note [guarded inputs]): " + ", ".join(
                         f"{input_names[i]}={v!r}" for i, v in constants))
    static = _static_dims(raw, gm, leaves) if path == "export" else {}
    fixed = [f"{name}[{d}]={size}" for name, dims in static.items()
             for d, size in enumerate(dims) if size is not None]
    if fixed and raw.dynamic:
        notes.append("static dimensions (other sizes are refused): " + ", ".join(fixed))
    return TracedModel(
        graph=graph, gm=gm, method=path, in_spec=in_spec, out_spec=raw.out_spec,
        input_names=input_names, param_names=param_names, notes=tuple([*notes, *prop_notes]),
        dynamic=raw.dynamic,
        timings={"trace": t1 - t0, "annotate": t2 - t1, "ir": t3 - t2, "total": t3 - t0},
        constants=constants, static_dims=static)


def _static_dims(raw: RawTrace, gm: torch.fx.GraphModule, leaves: Sequence[Any]
                 ) -> dict[str, tuple[int | None, ...]]:
    """Per tensor placeholder of an exported graph, its size in every dimension export
    specialised (``None`` where it stayed symbolic; every one is static without dynamic
    shapes)."""
    out: dict[str, tuple[int | None, ...]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, leaf in zip(placeholders, leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        val = raw.graph.find_nodes(op="placeholder", target=node.target)
        meta = val[0].meta.get("val") if val else None
        dims: list[int | None] = []
        for d, size in enumerate(leaf.shape):
            sym = meta.shape[d] if isinstance(meta, torch.Tensor) and d < meta.dim() else size
            dims.append(None if raw.dynamic and _symbolic(sym) else int(size))
        out[node.name] = tuple(dims)
    return out


def _symbolic(size: Any) -> bool:
    if not isinstance(size, torch.SymInt):
        return False
    try:
        int(str(size))
    except ValueError:
        return True
    return False


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0].strip() if lines else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _internal(filename: str) -> bool:
    return (filename.startswith(_TORCH_DIR) or filename.startswith(_TRACER_DIR)
            or filename.startswith("<"))


def _failure_site(err: BaseException, model: nn.Module) -> tuple[str | None, str | None]:
    """(module 'path' (Class), source location) where ``err`` was raised inside ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    module: str | None = None
    where: str | None = None
    seen: set[int] = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                module = f"{names[id(owner)]!r} ({type(owner).__name__})"
            filename = frame.f_code.co_filename
            if not _internal(filename):
                code = linecache.getline(filename, tb.tb_lineno).strip()
                where = (f"{os.path.basename(filename)}:{tb.tb_lineno} in "
                         f"{frame.f_code.co_name}: `{code}`")
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    return module, where


def _tracing_error(model: nn.Module, failures: Mapping[str, BaseException], method: str
                   ) -> TracingError:
    lines = [f"could not trace {type(model).__name__} with "
             f"{' or '.join('torch.' + p for p in failures)}."]
    leaf_hint: str | None = None
    for path, err in failures.items():
        module, where = _failure_site(err, model)
        site = ""
        if module:
            site += f" in module {module}"
            name = module.split("'")[1]
            if name:
                leaf_hint = name
        if where:
            site += f" at {where}"
        lines.append(f"- torch.{path} failed{site}:\n    {_short(err)}")
    lines.append("What to try:")
    if _shape_mismatch(failures):
        lines.append("- the example inputs do not fit the model: a shape mismatch"
                     + (f" in module {leaf_hint!r}" if leaf_hint else "") + ". Check the "
                     "example batch (for partition-plan: --input-shape / --input) against the "
                     "sizes the model expects, e.g. the input width of its first layer.")
        return TracingError("\n".join(lines))
    if leaf_hint:
        lines.append(f"- mark that module a leaf: trace(..., leaf_modules=[{leaf_hint!r}]) "
                     "(or its class); torch.fx then records it as one call_module node without "
                     "tracing inside it;")
    else:
        lines.append("- mark the failing submodule a leaf with leaf_modules=[...] (torch.fx);")
    lines.append("- pass values that decide Python branches as concrete Python values (bool, "
                 "int) instead of tensors, or write the branch with torch.where / torch.cond;")
    if method == "auto":
        lines.append('- try one tracer alone for its full error: method="fx" or '
                     'method="export".')
    else:
        lines.append('- try method="auto", which tries torch.fx then torch.export.')
    return TracingError("\n".join(lines))
