"""Which fx nodes profiling times, and how one is called alone: node selection for
:mod:`.isolated`, :mod:`.forward` and :mod:`.backward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError

__all__ = [
    "graph_users",
]


_SKIP_TARGETS = ("getitem", "size", "sym_size", "dim", "_assert", "numel")


def _node_callable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))  # type: ignore[no-any-return]
    if node.op == "call_method":
        name = str(node.target)
        return lambda self_, *args, **kwargs: getattr(self_, name)(*args, **kwargs)
    return node.target  # type: ignore[return-value]


def _params_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.Tensor]:
    if node.op == "call_module":
        return [p for p in gm.get_submodule(str(node.target)).parameters() if p.requires_grad]
    return []


def _timeable(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return not any(s in name for s in _SKIP_TARGETS)


def _has_float(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_floating_point()
               for t in pytree.tree_leaves(value))


def _kind(target: str, value: Any) -> str:
    """What makes two nodes the same for the host: the op and its outputs' shapes and dtypes."""
    shapes = [(tuple(t.shape), str(t.dtype)) for t in pytree.tree_leaves(value)
              if isinstance(t, torch.Tensor)]
    return f"{target}|{shapes}"


def graph_users(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """Node name to the names of the nodes that read its value, for
    :func:`with_forward_context`.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> graph_users(gm)["_0"]
        ['_1']
    """
    return {n.name: [u.name for u in n.users] for n in gm.graph.nodes}


def _check_profilable(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], warmup: int,
                      repeat: int) -> torch.device:
    """The device ``gm`` runs on, after checking it can be profiled."""
    if any(p.is_meta for p in gm.parameters()):
        raise ConfigError("profiling needs real weights, but the model is on the meta device; "
                          "profile a materialised model or use the roofline cost model")
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat = {repeat} must be >= 1 and warmup = {warmup} >= 0")
    return next((p.device for p in gm.parameters()), None) or next(
        (t.device for t in flat_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
