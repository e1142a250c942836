"""Profiling mode: measure each node's forward and backward time on the current device.

:func:`profile_node_times` runs a traced ``torch.fx.GraphModule`` once to capture every node's
real inputs, then times each node alone: its forward, and its forward plus backward (gradients for
its floating inputs and its parameters), repeated and averaged. The result feeds
:func:`modelparallel.cost_model.estimate_costs` (``measured=``), replacing the roofline for the
measured nodes.

Note [profiling isolated nodes]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each node is timed alone, in a loop of ``repeat`` calls with one synchronisation at the end, so
on a GPU the figure is the node's throughput time: its kernels when the GPU is the bottleneck, its
launch cost when the CPU is. A stage's time is then the sum over its nodes. Backward time is the
time of forward+backward minus the forward time. Nodes reading only non-float values, views and
shape queries are not timed (the roofline gives them zero).

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
    >>> times = profile_node_times(gm, [torch.randn(4, 8)], repeat=2, warmup=1)
    >>> sorted(times)
    ['_0', '_1']
    >>> all(f >= 0 and b >= 0 for f, b in times.values())
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx

from modelparallel.errors import ConfigError

__all__ = ["profile_node_times"]

_SKIP_TARGETS = ("getitem", "size", "sym_size", "dim", "_assert", "numel")


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """A function timing ``repeat`` calls of ``fn`` on ``device``, returning seconds per call."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], Any], repeat: int) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3 / repeat
        return cuda_time

    def cpu_time(fn: Callable[[], Any], repeat: int) -> float:
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat
    return cpu_time


def _capture(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any]) -> dict[torch.fx.Node, Any]:
    """Every node's value for one run of ``gm`` (no autograd recording)."""
    env: dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            env[n] = value
            return value

    with torch.no_grad():
        _Recorder(gm).run(*flat_inputs)
    return env


def _leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


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


def profile_node_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                       nodes: Iterable[str] | None = None, warmup: int = 2, repeat: int = 5
                       ) -> dict[str, tuple[float, float]]:
    """Measure forward and backward seconds of every compute node of ``gm`` on its device.

    ``gm`` and ``flat_inputs`` must already be on the device to measure (the parameters real, not
    meta). See Note [profiling isolated nodes].

    Args:
        gm: A traced graph module (``TracedModel.gm``).
        flat_inputs: Its inputs for one microbatch (``TracedModel.flatten_inputs``).
        nodes: Only these node names (default: every compute node).
        warmup: Untimed calls before timing each node.
        repeat: Timed calls per node.

    Returns:
        Node name to ``(forward_seconds, backward_seconds)``.

    Raises:
        ConfigError: if the module holds meta tensors (nothing can be measured).
    """
    if any(p.is_meta for p in gm.parameters()):
        raise ConfigError("profiling needs real weights, but the model is on the meta device; "
                          "profile a materialised model or use the roofline cost model")
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat = {repeat} must be >= 1 and warmup = {warmup} >= 0")
    device = next((p.device for p in gm.parameters()), None) or next(
        (t.device for t in flat_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    timer = _timer(device)
    env = _capture(gm, flat_inputs)
    wanted = None if nodes is None else set(nodes)
    out: dict[str, tuple[float, float]] = {}
    for node in gm.graph.nodes:
        if not _timeable(node) or (wanted is not None and node.name not in wanted):
            continue
        fn = _node_callable(gm, node)
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        try:
            fwd = _time_forward(fn, args, kwargs, timer, warmup, repeat)
            bwd = _time_backward(fn, args, kwargs, _params_of(gm, node), timer, warmup, repeat)
        except RuntimeError:
            # In-place ops on captured values and ops that refuse detached leaves cannot be
            # replayed alone; the roofline keeps their estimate.
            continue
        out[node.name] = (fwd, max(0.0, bwd - fwd) if bwd > 0 else 0.0)
    return out


def _time_forward(fn: Callable[..., Any], args: Any, kwargs: Any,
                  timer: Callable[[Callable[[], Any], int], float], warmup: int,
                  repeat: int) -> float:
    def run() -> Any:
        return fn(*args, **kwargs)
    for _ in range(warmup):
        run()
    return timer(run, repeat)


def _time_backward(fn: Callable[..., Any], args: Any, kwargs: Any, params: list[torch.Tensor],
                   timer: Callable[[Callable[[], Any], int], float], warmup: int,
                   repeat: int) -> float:
    """Seconds of forward+backward, or 0 when nothing of the node needs a gradient."""
    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.detach().requires_grad_(True)
        return x
    gargs, gkwargs = torch.utils._pytree.tree_map(leaf, (args, kwargs))
    inputs = [t for t in _leaves((gargs, gkwargs)) if t.requires_grad] + params
    if not inputs:
        return 0.0
    with torch.enable_grad():
        probe = [t for t in _leaves(fn(*gargs, **gkwargs)) if t.requires_grad]
    if not probe:
        return 0.0
    grads = [torch.ones_like(t) for t in probe]

    def run() -> None:
        with torch.enable_grad():
            outs = [t for t in _leaves(fn(*gargs, **gkwargs)) if t.requires_grad]
            torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    for _ in range(warmup):
        run()
    return timer(run, repeat)
