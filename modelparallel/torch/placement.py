"""Manual placement: ``with smp.partition(i):`` and ``smp.set_partition(module, i)``.

Note [smp placement]
~~~~~~~~~~~~~~~~~~~~
SMP could either partition automatically or follow the user's placements. Here placements are
*pins* of the planner (Note on pins in ``modelparallel/partitioner/problem.py``): every node the
trace attributes to a placed module (its ``module_path`` starts with the module's path, the
innermost placed module winning) is pinned to that partition.

- ``auto_partition: False``: every node of a submodule is pinned: to its innermost placed
  module's partition, else to ``default_partition``. Operations written in the root module's own
  ``forward`` (``torch.relu(x)`` between two layers) follow the root's placement if the root was
  placed, else they are left to the planner, which puts them between their producers and
  consumers (SMP ran them on the root's partition, sending values back and forth; a pipeline
  cannot).
- ``auto_partition: True``: only the placed modules' nodes are pinned; the ILP places the rest
  around them (SMP ignored placements in this mode).

Placements are recorded by module object (``smp.partition`` hooks ``nn.Module.__init__`` while
the context is open: the innermost open context wins, like SMP), so they survive wrapping.
A pipeline only sends values forward: placements whose data flow goes from a later partition
back to an earlier one are refused by the planner with an ``InfeasiblePlanError`` naming the
node (SMP's execution server allowed that; our schedules do not).

Example:
    >>> with partition(1):
    ...     layer = nn.Linear(2, 2)
    >>> placement_of(layer)
    1
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from modelparallel.errors import ConfigError

__all__ = ["partition", "placement_of", "placement_pins", "set_partition"]

_placed: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_stack = threading.local()
_patch_lock = threading.Lock()
_orig_init: Any = None
_depth = 0


def _check_index(index: int) -> None:
    from modelparallel.torch.state_mod import state

    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"partition index {index!r} must be an int >= 0")
    if state.cfg is not None and index >= state.cfg.partitions:
        raise ConfigError(f"partition index {index} must be < partitions = "
                          f"{state.cfg.partitions}")


@contextlib.contextmanager
def partition(index: int) -> Iterator[None]:
    """Modules constructed inside go to partition ``index`` (innermost context wins)."""
    global _orig_init, _depth
    _check_index(index)
    stack = getattr(_stack, "items", None)
    if stack is None:
        stack = _stack.items = []
    with _patch_lock:
        if _depth == 0:
            _orig_init = nn.Module.__init__
            orig = _orig_init

            def init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
                orig(self, *args, **kwargs)
                current = getattr(_stack, "items", None)
                if current:
                    _placed[self] = current[-1]

            nn.Module.__init__ = init  # type: ignore[method-assign]
        _depth += 1
    stack.append(index)
    try:
        yield
    finally:
        stack.pop()
        with _patch_lock:
            _depth -= 1
            if _depth == 0:
                nn.Module.__init__ = _orig_init  # type: ignore[method-assign]


def set_partition(module: nn.Module, index: int) -> None:
    """Put an existing module on partition ``index`` (SMP's ``smp.set_partition``)."""
    _check_index(index)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"set_partition takes an nn.Module, not {type(module).__name__}")
    _placed[module] = index


def placement_of(module: nn.Module) -> int | None:
    """The partition a module was placed on, or ``None``."""
    return _placed.get(module)


def placement_pins(root: nn.Module, graph: Any, cfg: Any) -> Mapping[str, int]:
    """Node-name pins for the traced ``graph`` of ``root`` (Note [smp placement])."""
    from modelparallel.ir import input_derived_nodes

    by_path: dict[str, int] = {}
    for name, module in root.named_modules():
        if module in _placed:
            by_path[name] = _placed[module]
    if cfg.auto_partition and not by_path:
        return {}
    default = cfg.default_partition if cfg.default_partition is not None else 0
    derived = input_derived_nodes(graph)
    nodes = [n for n in graph.nodes if n.name not in derived]
    last = nodes[-1].name if nodes else None
    pins: dict[str, int] = {}
    for node in nodes:
        if node.name == last:
            continue  # the output node is always on the last stage
        path = node.module_path or ""
        stage = None
        best = -1
        for placed, index in by_path.items():
            if (placed == "" or path == placed or path.startswith(placed + ".")) \
                    and len(placed) > best:
                stage, best = index, len(placed)
        if stage is None and not cfg.auto_partition and path:
            stage = default
        if stage is not None:
            pins[node.name] = stage
    return pins
