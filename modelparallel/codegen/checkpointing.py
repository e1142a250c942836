"""Activation checkpointing, activation offload and autocast applied to a built stage.

Note [checkpoint regions]
~~~~~~~~~~~~~~~~~~~~~~~~~
A stage module is one flat ``torch.fx`` graph: the model's submodules are gone, so
``torch.utils.checkpoint`` cannot wrap them. Instead each run of consecutive nodes of one
checkpointed region (the regions of Note [memory features] in
``modelparallel/partitioner/memory_features.py``, found from each node's ``module_path``) is
moved into a small graph module of its own, called from the stage graph through
``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state preserved, so recomputed dropout
draws the forward's masks). Parameters stay in the stage graph's ``get_attr`` nodes and enter a
region as arguments, so the stage's parameters and their names are untouched. A region keeps
only its inputs for backward and runs its forward again during backward, as the cost model
charges; the gradients are the same (the parity tests check 1e-5).

Offload wraps the stage forward in saved-tensor hooks that copy each saved activation to host
memory (pinned on CUDA) and back for its backward, as ``torch.autograd.graph.save_on_cpu`` does,
except that the stage's parameters and buffers, and tensors already on the host, stay where they
are (``save_on_cpu`` would copy every weight out and back for every microbatch: on the H200 that
made GPT-2 medium's offloaded step several times slower, and each unpacked weight a transient
copy on the device). Mixed precision in ``torch.autocast`` (bf16 or fp16) with fp32 parameters (master
weights). The wrappers replace the stage module's ``forward`` on the instance, so the stage's
parameters and their names are untouched.

Example:
    >>> import torch
    >>> from modelparallel.codegen import build_stage
    >>> from modelparallel.partitioner import partition
    >>> from modelparallel.plan import PlanConfig
    >>> from modelparallel.tracer import trace
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> traced = trace(model, (torch.randn(2, 4),))
    >>> program = build_stage(traced, partition(traced.graph, PlanConfig(1), "cpu"), 0)
    >>> apply_memory_features(program, traced.graph, checkpointing=("0",))
    1
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from modelparallel.codegen.program import StageProgram
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph, region_of

__all__ = ["apply_memory_features"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def apply_memory_features(program: StageProgram, graph: Graph, *,
                          checkpointing: str | tuple[str, ...] = "none",
                          module_depth: int | None = None, offload: bool = False,
                          precision: str = "fp32", preserve_rng_state: bool = True) -> int:
    """Make ``program``'s forward checkpoint its regions, offload and autocast as asked
    (Note [checkpoint regions]).

    Args:
        program: A built stage.
        graph: The traced model's IR graph (for the nodes' module paths).
        checkpointing: ``"none"``, ``"all"`` or module paths (``"auto"`` is resolved by the
            planner into paths).
        module_depth: Region depth for models without numbered blocks.
        offload: Keep saved activations in host memory.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        preserve_rng_state: Replay the forward's RNG state in recomputation.

    Returns:
        How many checkpointed regions the stage has.

    Raises:
        ConfigError: for ``checkpointing="auto"`` (plan first) or an unknown precision.
    """
    if checkpointing == "auto":
        raise ConfigError("checkpointing='auto' must be resolved by the planner first (the "
                          "plan's config lists the regions it chose)")
    if precision not in ("fp32", *_DTYPES):
        raise ConfigError(f"precision = {precision!r}; use 'fp32', 'bf16' or 'fp16'")
    gm = program.module
    regions = 0
    if checkpointing != "none":
        regions = _split_regions(gm, graph, checkpointing, module_depth, preserve_rng_state)
    if not offload and precision == "fp32":
        return regions
    inner: Callable[..., Any] = gm.forward
    device_type = _device_type(gm)

    def forward(*args: Any) -> Any:
        with contextlib.ExitStack() as stack:
            if precision in _DTYPES:
                stack.enter_context(torch.autocast(device_type, dtype=_DTYPES[precision]))
            if offload and torch.is_grad_enabled():
                stack.enter_context(_offload_hooks(gm, pin=device_type == "cuda"))
            return inner(*args)

    gm.forward = forward  # type: ignore[method-assign]
    return regions


def _split_regions(gm: torch.fx.GraphModule, graph: Graph, mode: str | tuple[str, ...],
                   depth: int | None, preserve_rng_state: bool) -> int:
    """Move each run of one region's nodes into a checkpointed call (Note [checkpoint
    regions]); return the number of runs."""
    paths = {nd.name: nd.module_path or "" for nd in graph.nodes}
    runs: list[list[torch.fx.Node]] = []
    last: str | None = None
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        r = region_of(paths.get(node.name, ""), mode, depth)
        if r is not None and r == last:
            runs[-1].append(node)
        elif r is not None:
            runs.append([node])
        last = r
    for k, run in enumerate(runs):
        _outline(gm, run, k, preserve_rng_state)
    if runs:
        gm.graph.lint()
        gm.recompile()
    return len(runs)


def _outline(gm: torch.fx.GraphModule, run: list[torch.fx.Node], k: int,
             preserve_rng_state: bool) -> None:
    inside = set(run)
    inputs = list(dict.fromkeys(i for n in run for i in n.all_input_nodes if i not in inside))
    outputs = [n for n in run if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {i: sub.placeholder(f"in_{j}")
                                               for j, i in enumerate(inputs)}
    for n in run:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    module = torch.fx.GraphModule(gm, sub)

    def region(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return module(*args)
        return checkpoint(module, *args, use_reentrant=False,
                          preserve_rng_state=preserve_rng_state)

    region.__name__ = region.__qualname__ = f"checkpointed_region_{k}"
    with gm.graph.inserting_after(run[-1]):
        call = gm.graph.call_function(region, tuple(inputs))
    prev = call
    for j, o in enumerate(outputs):
        with gm.graph.inserting_after(prev):
            item = gm.graph.call_function(operator.getitem, (call, j))
        o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
        prev = item
    for n in reversed(run):
        gm.graph.erase_node(n)


def _offload_hooks(gm: torch.nn.Module, *, pin: bool) -> Any:
    """Saved-tensor hooks keeping activations in host memory, parameters in place (Note
    [checkpoint regions])."""
    held = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}

    def pack(t: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
        if t.device.type == "cpu" or t.is_sparse or t.untyped_storage().data_ptr() in held:
            return None, t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        return t.device, host

    def unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
        device, t = packed
        return t if device is None else t.to(device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _device_type(gm: torch.nn.Module) -> str:
    for t in [*gm.parameters(), *gm.buffers()]:
        return t.device.type
    return "cpu"
