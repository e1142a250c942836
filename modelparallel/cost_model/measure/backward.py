"""The backward's host time of each node, measured in context: inside the autograd engine
running a whole backward (:func:`backward_host_times`).

Note [in-context backward host time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Where a stage's backward is host-bound (small kernels, such as a BatchNorm's, queued by a slow
host; figures in ``docs/measurements.md``), the device time of the nodes' backwards is not the
stage's backward time.
The host's cost per node is measured where it arises, inside the autograd engine running a
whole backward (:func:`backward_host_times`):

1. *Mapping.* An fx Interpreter runs the graph's forward with autograd on. After each node it
   walks the autograd graph from the node's outputs (and inputs, which an in-place op gives a
   new function), through ``next_functions``, stopping at functions already owned: every
   function found is new, created by this node's run, and becomes the node's. A parameter's
   ``AccumulateGrad`` goes to the first node that reaches it. Every function of the backward
   thus has exactly one node; nodes whose values need no gradient have none.
2. *Timing.* A pre-hook and a hook on every owned function take a host timestamp before and
   after it runs. A node's host time is the sum, over its functions, of the function's span
   plus the gap since the previous function ended (the engine's own work between functions:
   scheduling, and summing the gradients of a value read several times, goes to the function
   that follows), less the hooks' own cost per function (a backward of a chain of 200 views,
   timed with and without the hooks). Parameters' ``.grad`` exist (zeros) during the runs, so
   the backward adds into them as from a step's second microbatch; the module's ``.grad`` are
   put back afterwards. One warm-up run, then 3-5 timed runs per node, and in
   :func:`node_times` the nodes of one kind pooled, as for the forward (both with the robust
   mean of Note [host time statistic]).
3. *Free of the device.* On CUDA the backward is queued behind a spin kernel longer than twice
   the host's queueing of the backward before (checked against it, lengthened if short, with
   a warning if the device still ran dry), so the engine never waits for the device and the
   figures are the host's work alone. On the CPU the host is the device: the profile records
   0 (as its host forward), so the replay is the plain sum of the device times.

Why hooks and not ``torch.profiler`` (mapping ``autograd::engine::evaluate_function`` events
back to forward ops by sequence number): the hooks give the mapping directly from the objects
autograd runs, without relying on sequence numbers that fx's ``call_module`` nodes (one module,
several ops) and views blur, and cost one Python call per function, which is measured and taken
off; the profiler's own per-event overhead is larger and would need the same correction.

:func:`node_times` (``backward_host="context"``, the default where the profiles carry these
times) then replays the backward: the host queues each node's backward at its in-context host
time, in reverse graph order (the engine runs functions in reverse creation order), and the
device runs its kernels (the node's isolated device backward time) when queued and free. Each
node's backward time is what it adds to the device's finishing time, so per-node figures sum to
the replayed time (the partitioner sums them per stage). A node the profiler skips (indexing
through ``getitem``) gives its host time to the profiled node before it in the graph
(:func:`with_backward_context`). If the whole-graph run fails (a training step of the whole
model that does not fit on the device), :func:`profile_nodes` warns and the backward falls back
to device time only. Known limits: the run needs the memory of one microbatch's training step
of the whole graph; inputs that require grad (a stage's received values) would have their
``AccumulateGrad`` charged to their first reader.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from modelparallel.cost_model.measure.clocks import _Spin
from modelparallel.cost_model.measure.nodes import _check_profilable
from modelparallel.cost_model.node_replay import robust_mean

__all__ = [
    "backward_host_times",
]


class _FunctionMapper(torch.fx.Interpreter):
    """Runs the graph with autograd on and gives every autograd function to the fx node whose
    run created it (Note [in-context backward host time])."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.owner: dict[Any, str] = {}  # autograd Node -> fx node name

    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        value = super().run_node(n)
        # From the outputs, and from the inputs (an in-place write on an input gives it a new
        # function), down to the functions earlier nodes created.
        roots = [t.grad_fn for t in pytree.tree_leaves((value, args, kwargs))
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        stack: list[Any] = list(roots)
        while stack:
            fn = stack.pop()
            if fn is None or fn in self.owner:
                continue
            self.owner[fn] = n.name
            stack.extend(nxt for nxt, _ in fn.next_functions)
        return value


def _backward_roots(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]


def _hooked_backward(owner: Mapping[Any, str], roots: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor], before: Callable[[], None] | None = None
                     ) -> tuple[list[tuple[float, float, str]], float, float]:
    """Run the backward with a host timestamp before and after every owned function.

    Returns ``(start, end, node)`` per function that ran, and the host's seconds at the start
    and at the end of the whole backward call.
    """
    pre: dict[int, float] = {}
    post: dict[int, float] = {}
    names: dict[int, str] = {}
    handles = []
    for i, (fn, name) in enumerate(owner.items()):
        names[i] = name

        def on_pre(_g: Any, i: int = i) -> None:
            pre[i] = time.perf_counter()

        def on_post(_gi: Any, _go: Any, i: int = i) -> None:
            post[i] = time.perf_counter()
        handles.append(fn.register_prehook(on_pre))
        handles.append(fn.register_hook(on_post))
    try:
        if before is not None:
            before()
        t0 = time.perf_counter()
        torch.autograd.backward(list(roots), list(grads))
        t1 = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    spans = [(pre[i], post[i], names[i]) for i in pre if i in post]
    return spans, t0, t1


def _charge(spans: Sequence[tuple[float, float, str]], hook_cost: float) -> dict[str, float]:
    """Host seconds per node: each function's span, plus the engine's gap since the function
    before it ended, less the hooks' own cost."""
    out: dict[str, float] = {}
    last_end: float | None = None
    for start, end, name in sorted(spans):
        gap = 0.0 if last_end is None else max(0.0, start - last_end)
        out[name] = out.get(name, 0.0) + gap + (end - start) - hook_cost
        last_end = end if last_end is None else max(last_end, end)
    return {k: max(0.0, v) for k, v in out.items()}


def _hook_cost(device: torch.device, length: int = 200, repeat: int = 7) -> float:
    """Host seconds the two hooks add to one function: a chain of ``length`` views, whose
    backward functions do almost nothing, timed with and without hooks."""
    x = torch.zeros(8, device=device, requires_grad=True)
    g = torch.ones(8, device=device)

    def chain() -> tuple[dict[Any, str], torch.Tensor]:
        with torch.enable_grad():
            y = x
            for _ in range(length):
                y = y.view(-1)
        owner: dict[Any, str] = {}
        fn = y.grad_fn
        while fn is not None and type(fn).__name__ != "AccumulateGrad":
            owner[fn] = "chain"
            fn = fn.next_functions[0][0] if fn.next_functions else None
        return owner, y

    def plain() -> float:
        _, y = chain()
        t0 = time.perf_counter()
        torch.autograd.backward([y], [g])
        return time.perf_counter() - t0

    def hooked() -> float:
        owner, y = chain()
        _, t0, t1 = _hooked_backward(owner, [y], [g])
        return t1 - t0
    plain(), hooked()
    with_hooks = statistics.median(hooked() for _ in range(repeat))
    without = statistics.median(plain() for _ in range(repeat))
    return max(0.0, (with_hooks - without) / length)


def backward_host_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                        warmup: int = 1, repeat: int = 3) -> dict[str, float]:
    """Host seconds of each node's backward inside a whole forward+backward of ``gm``.

    Runs the graph's forward with autograd on (its parameters' gradients accumulating into
    ``.grad`` buffers that exist, as from a step's second microbatch; the module's own
    ``.grad`` are put back afterwards), maps every autograd function to the fx node that
    created it, and times the backward from random gradients of every output with a host
    timestamp before and after each function (Note [in-context backward host time]). On CUDA
    the backward is queued behind a spin kernel, so the figures are the host's work alone; on
    the CPU they are the backward's run time (the host is the device).

    Args:
        gm: A traced graph module, on the device to measure, with real weights.
        flat_inputs: Its inputs for one microbatch.
        warmup: Untimed forward+backward runs first.
        repeat: Timed runs; each node gets their robust mean (Note [host time statistic]).

    Returns:
        Node name to seconds, for every node that created an autograd function the backward
        ran (nodes whose values need no gradient are absent).

    Raises:
        ConfigError: for a meta module or bad ``warmup``/``repeat``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> sorted(backward_host_times(gm, [torch.randn(4, 8)], repeat=1))
        ['_0', '_1']
    """
    device = _check_profilable(gm, flat_inputs, warmup, repeat)
    hook_cost = _hook_cost(device)
    spin = _Spin(device)
    params = [p for p in gm.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    runs: list[dict[str, float]] = []
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for i in range(max(1, warmup) + repeat):
            mapper = _FunctionMapper(gm)
            with torch.enable_grad():
                roots = _backward_roots(mapper.run(*flat_inputs))
            if not roots:
                return {}
            grads = [torch.randn_like(t) for t in roots]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spans, t0, t1 = _hooked_backward(mapper.owner, roots, grads, before=spin)
            spin.check(t1 - t0)
            del mapper, roots, grads
            if i >= max(1, warmup):
                runs.append(_charge(spans, hook_cost))
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if spin.waited > 1:
        warnings.warn(f"the device ran out of queued work in {spin.waited} of "
                      f"{max(1, warmup) + repeat} in-context backward runs; the host times "
                      "may include waiting for the device", stacklevel=2)
    names = sorted({n for r in runs for n in r})
    return {n: robust_mean(r.get(n, 0.0) for r in runs) for n in names}


def _functions(roots: Sequence[torch.Tensor]) -> dict[Any, str]:
    """Every autograd function reachable from ``roots``, for :func:`_hooked_backward`."""
    out: dict[Any, str] = {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in out:
            continue
        out[fn] = "call"
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return out
