"""Profiling mode, isolated nodes: each node of a traced ``torch.fx.GraphModule`` timed alone on
the values it really receives, forward and backward (:func:`profile_nodes`,
:func:`profile_node_times`).

Note [profiling isolated nodes]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each node is timed alone on the values it really receives (:func:`profile_nodes`), forward and
forward+backward, ``repeat`` calls after ``warmup``, and two figures are kept per pass
(:class:`NodeProfile`):

- **device time**: on CUDA the timed calls are queued behind a GPU spin kernel
  (``torch.cuda._sleep``) that outlasts their queueing, so CUDA events around them measure the
  kernels back to back, free of the host's cost; the spin's length is checked against the
  host's queueing and the measurement repeated with a longer one if the device had to wait. On
  the CPU the wall clock is the device time.
- **host time**: on CUDA, the host's seconds to queue a call, measured while the spin keeps the
  device busy (the host never waits). For the backward, the fixed cost of a
  ``torch.autograd.grad`` call (measured once on a trivial graph) is taken off, since a
  stage's backward pays it once, not per node. Zero on the CPU, where queueing is running.

What is timed matches a training step:

- **Which inputs need gradients.** Only inputs computed from a trainable parameter get a
  gradient, as in training (model inputs, masks and position ids get none); the set is
  propagated through the graph while it runs.
- **Steady-state gradient accumulation.** With two or more microbatches a parameter's gradient
  is added into ``.grad`` after the first microbatch; the backward includes that add (into a
  scratch buffer: the model's ``.grad`` is never touched). A value read by ``k`` nodes gets
  ``k - 1`` gradient additions, as autograd sums its gradients.
- The backward figures are those of forward+backward minus the forward's. Nodes that cannot be
  replayed alone (in-place writes on captured values) are left out, so the roofline keeps them.

The graph runs once, under ``torch.no_grad``, with every value freed after its last use, so the
profile needs about the memory of one inference pass plus one node's backward.


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

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from modelparallel.cost_model.measure.backward import backward_host_times
from modelparallel.cost_model.measure.clocks import Clock, _clock
from modelparallel.cost_model.measure.forward import forward_host_times
from modelparallel.cost_model.measure.nodes import (
    _check_profilable,
    _has_float,
    _kind,
    _node_callable,
    _params_of,
    _timeable,
    graph_users,
)
from modelparallel.cost_model.node_replay import (
    NodeProfile,
    node_times,
    with_backward_context,
    with_forward_context,
)

__all__ = [
    "profile_node_times",
    "profile_nodes",
]


class _Profiler(torch.fx.Interpreter):
    """Runs the graph once (no autograd), timing each wanted node on its real inputs."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str] | None, clock: Clock,
                 warmup: int, repeat: int, grad_call_host: float) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = wanted
        self.clock = clock
        self.warmup = warmup
        self.repeat = repeat
        self.grad_call_host = grad_call_host
        self.needs_grad: set[str] = set()
        self.profiles: dict[str, NodeProfile] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        with torch.no_grad():
            value = super().run_node(n)
        if self._requires_grad(n, value):
            self.needs_grad.add(n.name)
        if _timeable(n) and (self.wanted is None or n.name in self.wanted):
            self._profile(n, value)
        return value

    def _requires_grad(self, n: torch.fx.Node, value: Any) -> bool:
        """Whether autograd would make ``n``'s value require grad in training."""
        if not _has_float(value):
            return False
        if n.op == "get_attr":
            return isinstance(value, torch.Tensor) and value.requires_grad
        if n.op == "call_module" and _params_of(self.module, n):  # type: ignore[arg-type]
            return True
        return any(i.name in self.needs_grad for i in n.all_input_nodes)

    def _profile(self, n: torch.fx.Node, value: Any) -> None:
        fn = _node_callable(self.module, n)  # type: ignore[arg-type]
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            # The forward as training runs it: on leaves that require grad where a gradient
            # flows, so its host time includes autograd's recording (Note [host and device
            # time]).
            gargs, gkwargs, _, _ = _grad_leaves(args, kwargs, self._grad_args(n), [])
            with torch.enable_grad():
                dev_f, host_f = _time_forward(fn, gargs, gkwargs, self.clock, self.warmup,
                                              self.repeat)
            dev_b, host_b = _time_backward(fn, args, kwargs, self._grad_args(n),
                                           _params_of(self.module, n),  # type: ignore[arg-type]
                                           self.clock, self.warmup, self.repeat)
            if dev_b > 0:
                dev_b, host_b = max(0.0, dev_b - dev_f), max(0.0, host_b - host_f -
                                                             self.grad_call_host)
            acc_dev, acc_host = self._accumulation(n, value)
        except Exception:
            # In-place ops on captured values, ops that refuse detached leaves, or a node too
            # big to replay next to the captured values: the roofline keeps their estimate.
            return
        self.profiles[n.name] = NodeProfile(dev_f, host_f, dev_b + acc_dev, host_b + acc_host,
                                            kind=_kind(str(n.target), value))

    def _accumulation(self, n: torch.fx.Node, value: Any) -> tuple[float, float]:
        """Adding up the gradients of a value several nodes read (autograd sums them)."""
        readers = len(n.users)
        if n.name not in self.needs_grad or readers < 2 or not isinstance(value, torch.Tensor):
            return 0.0, 0.0
        a, b = torch.zeros_like(value), torch.ones_like(value)
        dev, host = self.clock(lambda: a.add_(b), self.repeat)
        return (readers - 1) * dev, (readers - 1) * host

    def _grad_args(self, n: torch.fx.Node) -> tuple[Any, Any]:
        """``(args, kwargs)`` of ``n`` with a flag per value: does it need a gradient."""
        flag = lambda a: a.name in self.needs_grad  # noqa: E731
        return (torch.fx.node.map_arg(n.args, flag), torch.fx.node.map_arg(n.kwargs, flag))


def _grad_call_host(device: torch.device, clock: Clock, warmup: int, repeat: int) -> float:
    """Host seconds of one ``torch.autograd.grad`` call beyond its nodes' own work: subtracted
    from each node's backward host time, since a whole backward pays it once."""
    x = torch.zeros(16, device=device, requires_grad=True)
    g = torch.ones(16, device=device)

    def fwd() -> Any:
        return x.view(-1)

    def both() -> Any:
        with torch.enable_grad():
            return torch.autograd.grad(x.view(-1), x, g)
    for _ in range(warmup):
        both()
    return max(0.0, clock(both, repeat)[1] - clock(fwd, repeat)[1])


def profile_nodes(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                  nodes: Iterable[str] | None = None, warmup: int = 2, repeat: int = 5,
                  backward_context: bool = True, forward_context: bool = True
                  ) -> dict[str, NodeProfile]:
    """Device and host time of every compute node of ``gm``, forward and backward.

    ``gm`` and ``flat_inputs`` must already be on the device to measure (the parameters real, not
    meta). See Note [profiling isolated nodes]; :func:`node_times` turns the result into node
    times.

    Args:
        gm: A traced graph module (``TracedModel.gm``).
        flat_inputs: Its inputs for one microbatch (``TracedModel.flatten_inputs``).
        nodes: Only these node names (default: every compute node).
        warmup: Untimed calls before timing each node.
        repeat: Timed calls per node.
        backward_context: Also measure each node's backward host time inside a whole
            forward+backward (:func:`backward_host_times`, Note [in-context backward host
            time]) into ``host_backward_context``. If that measurement fails (a graph whose
            training step does not fit on the device, an op autograd refuses), a warning says
            why and the field stays None, so :func:`node_times` counts the backward's device
            time only, as before.
        forward_context: Also measure each node's forward host time inside a whole forward of
            the graph's generated code (:func:`forward_host_times`, Note [in-context forward
            host time]) into ``host_forward_context``. On failure a warning says why and the
            field stays None, so :func:`node_times` uses the forward host times measured
            alone.

    Raises:
        ConfigError: if the module holds meta tensors (nothing can be measured), or for bad
            ``warmup``/``repeat``.
    """
    profiles = _profile_isolated(gm, flat_inputs, nodes, warmup, repeat)
    device = _check_profilable(gm, flat_inputs, warmup, repeat)
    order = [n.name for n in gm.graph.nodes]
    if forward_context:
        try:
            fwd = forward_host_times(gm, flat_inputs, warmup=min(warmup, 2),
                                     repeat=max(3, min(repeat, 5)))
        except Exception as e:  # never lose the isolated profile to the extra measurement
            warnings.warn(f"in-context forward host times not measured ({type(e).__name__}: "
                          f"{e}); the forward uses the host times measured alone",
                          stacklevel=2)
        else:
            profiles = with_forward_context(profiles, order, fwd,
                                            host_is_device=device.type != "cuda",
                                            users=graph_users(gm))
    if not backward_context:
        return profiles
    try:
        context = backward_host_times(gm, flat_inputs, warmup=min(warmup, 2),
                                      repeat=max(3, min(repeat, 5)))
    except Exception as e:  # never lose the isolated profile to the extra measurement
        warnings.warn(f"in-context backward host times not measured ({type(e).__name__}: "
                      f"{e}); the backward counts device time only", stacklevel=2)
        return profiles
    return with_backward_context(profiles, order, context,
                                 host_is_device=device.type != "cuda")


def _profile_isolated(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any],
                      nodes: Iterable[str] | None, warmup: int, repeat: int
                      ) -> dict[str, NodeProfile]:
    """Every wanted node timed alone (Note [profiling isolated nodes])."""
    device = _check_profilable(gm, flat_inputs, warmup, repeat)
    clock = _clock(device)
    overhead = _grad_call_host(device, clock, warmup, repeat) if device.type == "cuda" else 0.0
    profiler = _Profiler(gm, None if nodes is None else set(nodes), clock, warmup, repeat,
                         overhead)
    profiler.run(*flat_inputs)
    return profiler.profiles



def profile_node_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                       nodes: Iterable[str] | None = None, warmup: int = 2, repeat: int = 5,
                       profiles_out: dict[str, NodeProfile] | None = None
                       ) -> dict[str, tuple[float, float]]:
    """Measure forward and backward seconds of every compute node of ``gm`` on its device.

    :func:`profile_nodes` then :func:`node_times` in the graph's order; see Note [profiling
    isolated nodes], Note [host and device time] and Note [in-context backward host time].

    Args:
        gm: A traced graph module (``TracedModel.gm``), on the device to measure.
        flat_inputs: Its inputs for one microbatch (``TracedModel.flatten_inputs``).
        nodes: Only these node names (default: every compute node).
        warmup: Untimed calls before timing each node.
        repeat: Timed calls per node.
        profiles_out: If given, filled with the measured :class:`NodeProfile` of every node
            (for :func:`save_node_times`'s ``profiles``).

    Returns:
        Node name to ``(forward_seconds, backward_seconds)``.

    Raises:
        ConfigError: if the module holds meta tensors, or for bad ``warmup``/``repeat``.
    """
    profiles = profile_nodes(gm, flat_inputs, nodes=nodes, warmup=warmup, repeat=repeat)
    if profiles_out is not None:
        profiles_out.update(profiles)
    return node_times([n.name for n in gm.graph.nodes], profiles)


def _time_forward(fn: Callable[..., Any], args: Any, kwargs: Any, clock: Clock, warmup: int,
                  repeat: int) -> tuple[float, float]:
    def run() -> Any:
        return fn(*args, **kwargs)
    for _ in range(warmup):
        run()
    return clock(run, repeat)


def _time_backward(fn: Callable[..., Any], args: Any, kwargs: Any, flags: tuple[Any, Any],
                   params: list[torch.Tensor], clock: Clock, warmup: int,
                   repeat: int) -> tuple[float, float]:
    """Device and host seconds of forward+backward, or zeros when nothing of the node needs a
    gradient.

    ``flags`` mirrors ``(args, kwargs)``: True where the value needs a gradient. Parameter
    gradients are added into scratch buffers (steady-state accumulation).
    """
    gargs, gkwargs, leaves, accumulate = _grad_leaves(args, kwargs, flags, params)
    inputs = leaves + accumulate
    if not inputs:
        return 0.0, 0.0
    with torch.enable_grad():
        probe = [t for t in pytree.tree_leaves(fn(*gargs, **gkwargs))
                 if isinstance(t, torch.Tensor) and t.requires_grad]
    if not probe:
        return 0.0, 0.0
    grads = [torch.randn_like(t) for t in probe]
    scratch = [torch.zeros_like(p) for p in accumulate]
    n_leaves = len(leaves)

    def run() -> None:
        with torch.enable_grad():
            outs = [t for t in pytree.tree_leaves(fn(*gargs, **gkwargs))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            got = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        for buf, g in zip(scratch, got[n_leaves:]):
            if g is not None:
                buf.add_(g)
    for _ in range(warmup):
        run()
    return clock(run, repeat)


def _grad_leaves(args: Any, kwargs: Any, flags: tuple[Any, Any], params: list[torch.Tensor]
                 ) -> tuple[Any, dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:
    """``(args, kwargs)`` with detached leaves that require grad where ``flags`` says a
    gradient flows (and for parameters); also those leaves, and the parameters (given and
    found among the arguments) whose gradients accumulate."""
    leaves: list[torch.Tensor] = []
    accumulate: list[torch.Tensor] = list(params)

    def leaf(x: Any, needs: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and needs:
            out = x.detach().requires_grad_(True)
            (accumulate if isinstance(x, torch.nn.Parameter) else leaves).append(out)
            return out
        return x

    def convert(value: Any, flag: Any) -> Any:
        # A flag covers a whole node value (a tensor, or a tuple of tensors for getitem users).
        if isinstance(flag, bool):
            return pytree.tree_map(lambda x: leaf(x, flag), value)
        if isinstance(value, list | tuple) and isinstance(flag, list | tuple) and \
                len(value) == len(flag):
            return type(value)(convert(v, f) for v, f in zip(value, flag))
        if isinstance(value, dict) and isinstance(flag, dict):
            return {k: convert(v, flag.get(k, False)) for k, v in value.items()}
        return value

    gargs = convert(tuple(args), tuple(flags[0]))
    gkwargs = convert(dict(kwargs), dict(flags[1]))
    return gargs, gkwargs, leaves, accumulate
