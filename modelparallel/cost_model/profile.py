"""Profiling mode: measure each node's forward and backward time on the current device.

:func:`profile_node_times` runs a traced ``torch.fx.GraphModule`` once, node by node, and times
each node alone on the values it really receives: its forward, and its forward plus backward
(gradients for the inputs that need them and for its parameters), repeated. The result feeds
:func:`modelparallel.cost_model.estimate_costs` (``measured=``), replacing the roofline for the
measured nodes. :func:`save_node_times` / :func:`load_node_times` keep the measurements in a JSON
file tied to the graph's fingerprint (``partition-plan calibrate --model ... --ops-out`` writes
one, ``partition-plan build --measured`` reads it).

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

Note [host and device time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
A stage runs eagerly: the host queues one op after another and the device runs each as soon as
it is queued and the device is free. While the device works on large kernels the host runs
ahead; a run of small ops whose queueing takes longer than their kernels leaves the device
waiting. :func:`node_times` replays the forward along the graph's order and gives each node the
time it adds to the device's finishing time: its device time where the host kept ahead, more
where the device waited for it. The backward counts device time only: it is queued by
autograd's C++ engine, with no Python per op, which keeps ahead of the device unless kernels are
tiny. (Its host time is measured too, but alone each node's backward pays a whole
``autograd.grad`` call, and the measured figures overstate the engine's cost by 20 to 100%, so
using them made predictions worse.) Host times on a shared machine are noisy (single calls of a
view took milliseconds once in a while), so each node takes the median host time of the nodes of
its kind (the same op on the same shapes: one per layer). ``docs/gpu.md`` has the measurements:
on an H100 whose host needs 10 us per op, the sum over a stage is within about 5% of its measured
time for every stage of GPT-2 medium and a 1.1B Llama and for half of those of BERT-large and
ResNet-50; where the backward itself is host-bound (ResNet-50's last stages at 32 images per
microbatch, BERT-large's first ones) the model is short by 12-43%.

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

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from modelparallel._jsonfile import read_json_file
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph

__all__ = [
    "NODE_TIMES_FORMAT",
    "NodeProfile",
    "load_node_times",
    "node_times",
    "profile_node_times",
    "profile_nodes",
    "save_node_times",
    "time_call",
]

#: ``format`` field of a node-times JSON file.
NODE_TIMES_FORMAT = "modelparallel.node_times"
_NODE_TIMES_VERSION = 1

_SKIP_TARGETS = ("getitem", "size", "sym_size", "dim", "_assert", "numel")

# -- timing one call ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeProfile:
    """Measured cost of one node for one microbatch (Note [profiling isolated nodes]).

    Attributes:
        device_forward: Seconds the device works on the forward (on the CPU: wall seconds).
        host_forward: Seconds the host spends issuing the forward (0 on the CPU, where issuing
            is running).
        device_backward: Seconds the device works on the backward, including the addition of
            parameter gradients into ``.grad`` and of the gradients of a value used by several
            nodes.
        host_backward: Seconds the host spends issuing the backward, as measured alone (kept
            for diagnosis; :func:`node_times` does not use it, Note [host and device time]).
        kind: The op and its output shapes: nodes of one kind (the same op in every layer)
            share their host times in :func:`node_times`.
    """

    device_forward: float
    host_forward: float
    device_backward: float
    host_backward: float
    kind: str = ""

    def __post_init__(self) -> None:
        for name in ("device_forward", "host_forward", "device_backward", "host_backward"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"NodeProfile.{name} = {getattr(self, name)} must be >= 0")


class _CudaClock:
    """Device and host seconds per call on one CUDA device: the calls are queued behind a spin
    kernel that outlasts their queueing, so CUDA events measure their kernels back to back and
    the host clock measures queueing alone (the host never waits for the device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cycles_per_second = self._spin_rate() if hasattr(torch.cuda, "_sleep") else None

    def _spin_rate(self) -> float | None:
        with torch.cuda.device(self.device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            rate = None
            for cycles in (50_000_000, 20_000_000, 20_000_000):  # the first wakes the clocks up
                start.record()
                torch.cuda._sleep(cycles)
                end.record()
                torch.cuda.synchronize(self.device)
                seconds = start.elapsed_time(end) / 1e3
                rate = cycles / seconds if seconds > 0 else None
            return rate

    def __call__(self, fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            fn()
            guess = time.perf_counter() - t0  # an upper bound of queueing one call
            torch.cuda.synchronize(self.device)
            for _ in range(3):
                device, host, spun = self._timed(fn, repeat, 3.0 * guess * repeat + 500e-6)
                if spun is None or host * repeat < 0.9 * spun:
                    return device, host
                guess = 2.0 * host  # the spin ended before the queueing: the device waited
            return device, host

    def _timed(self, fn: Callable[[], Any], repeat: int, spin: float
               ) -> tuple[float, float, float | None]:
        before = torch.cuda.Event(enable_timing=True)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        spun = None
        if self.cycles_per_second is not None:
            before.record()
            torch.cuda._sleep(int(spin * self.cycles_per_second))
        start.record()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        host = (time.perf_counter() - t0) / repeat
        end.record()
        torch.cuda.synchronize(self.device)
        if self.cycles_per_second is not None:
            spun = before.elapsed_time(start) / 1e3
        return start.elapsed_time(end) / 1e3 / repeat, host, spun


def _cpu_clock(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat, 0.0


Clock = Callable[[Callable[[], Any], int], tuple[float, float]]


def _clock(device: torch.device) -> Clock:
    """A function timing ``repeat`` calls of ``fn`` on ``device``: (device, host) seconds per
    call."""
    if device.type == "cuda":
        return _CudaClock(device)
    return _cpu_clock


def time_call(fn: Callable[[], Any], device: torch.device | str, *, repeat: int = 5,
              warmup: int = 2) -> tuple[float, float]:
    """Device and host seconds per call of ``fn`` (Note [profiling isolated nodes]).

    On CUDA the device figure is the time of ``fn``'s kernels back to back, as if the host kept
    up, and the host figure the time to queue them; on the CPU the first is the wall time and
    the second 0.

    Example:
        >>> dev, host = time_call(lambda: torch.ones(64, 64) @ torch.ones(64, 64), "cpu")
        >>> dev > 0 and host == 0
        True
    """
    for _ in range(warmup):
        fn()
    return _clock(torch.device(device))(fn, repeat)


# -- the run ---------------------------------------------------------------------------------------


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
            dev_f, host_f = _time_forward(fn, args, kwargs, self.clock, self.warmup, self.repeat)
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


def _kind(target: str, value: Any) -> str:
    """What makes two nodes the same for the host: the op and its outputs' shapes and dtypes."""
    shapes = [(tuple(t.shape), str(t.dtype)) for t in pytree.tree_leaves(value)
              if isinstance(t, torch.Tensor)]
    return f"{target}|{shapes}"


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
                  nodes: Iterable[str] | None = None, warmup: int = 2, repeat: int = 5
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

    Raises:
        ConfigError: if the module holds meta tensors (nothing can be measured), or for bad
            ``warmup``/``repeat``.
    """
    if any(p.is_meta for p in gm.parameters()):
        raise ConfigError("profiling needs real weights, but the model is on the meta device; "
                          "profile a materialised model or use the roofline cost model")
    if repeat < 1 or warmup < 0:
        raise ConfigError(f"repeat = {repeat} must be >= 1 and warmup = {warmup} >= 0")
    device = next((p.device for p in gm.parameters()), None) or next(
        (t.device for t in flat_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    clock = _clock(device)
    overhead = _grad_call_host(device, clock, warmup, repeat) if device.type == "cuda" else 0.0
    profiler = _Profiler(gm, None if nodes is None else set(nodes), clock, warmup, repeat,
                         overhead)
    profiler.run(*flat_inputs)
    return profiler.profiles


def node_times(order: Sequence[str], profiles: Mapping[str, NodeProfile]
               ) -> dict[str, tuple[float, float]]:
    """Forward and backward seconds per node from device and host times (Note [host and
    device time]).

    Args:
        order: Node names in execution order (the graph's order); names without a profile are
            skipped.
        profiles: What :func:`profile_nodes` measured.

    Returns:
        Node name to ``(forward_seconds, backward_seconds)`` for every profiled node.

    Example:
        >>> p = {"a": NodeProfile(1.0, 0.1, 2.0, 0.1), "b": NodeProfile(0.1, 1.0, 0.1, 1.0)}
        >>> [round(f, 3) for f, _ in node_times(["a", "b"], p).values()]  # a hides b's queueing
        [1.1, 0.1]
    """
    names = [n for n in order if n in profiles]
    host = _typical_host_forward(profiles)
    fwd = _timeline([(host[n], profiles[n].device_forward) for n in names])
    return {n: (f, profiles[n].device_backward) for n, f in zip(names, fwd)}


def _typical_host_forward(profiles: Mapping[str, NodeProfile]) -> dict[str, float]:
    """Each node's host forward time, as the median over the nodes of its kind."""
    by_kind: dict[str, list[float]] = {}
    for p in profiles.values():
        if p.kind:
            by_kind.setdefault(p.kind, []).append(p.host_forward)
    median = {k: statistics.median(v) for k, v in by_kind.items()}
    return {n: median[p.kind] if p.kind else p.host_forward for n, p in profiles.items()}


def _timeline(steps: Sequence[tuple[float, float]]) -> list[float]:
    """How much each step adds to the device's finishing time, when the host queues steps one
    after another (``host`` seconds each) and the device runs each (``device`` seconds) as soon
    as it is queued and the device is free."""
    queued = finished = 0.0
    out = []
    for host, device in steps:
        queued += host
        start = max(finished, queued)
        out.append(start + device - finished)
        finished = start + device
    return out


def profile_node_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                       nodes: Iterable[str] | None = None, warmup: int = 2, repeat: int = 5
                       ) -> dict[str, tuple[float, float]]:
    """Measure forward and backward seconds of every compute node of ``gm`` on its device.

    :func:`profile_nodes` then :func:`node_times` in the graph's order; see Note [profiling
    isolated nodes] and Note [host and device time].

    Args:
        gm: A traced graph module (``TracedModel.gm``), on the device to measure.
        flat_inputs: Its inputs for one microbatch (``TracedModel.flatten_inputs``).
        nodes: Only these node names (default: every compute node).
        warmup: Untimed calls before timing each node.
        repeat: Timed calls per node.

    Returns:
        Node name to ``(forward_seconds, backward_seconds)``.

    Raises:
        ConfigError: if the module holds meta tensors, or for bad ``warmup``/``repeat``.
    """
    profiles = profile_nodes(gm, flat_inputs, nodes=nodes, warmup=warmup, repeat=repeat)
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


# -- files -----------------------------------------------------------------------------------------


def save_node_times(path: str | Path, times: Mapping[str, tuple[float, float]], *,
                    graph: Graph | None = None, device: str = "",
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write measured node times as JSON (read back with :func:`load_node_times`).

    Args:
        path: File to write.
        times: Node name to ``(forward_seconds, backward_seconds)``.
        graph: The graph the times are for; its name and fingerprint are recorded so a mismatch
            is caught when the file is used.
        device: What was measured (e.g. ``"NVIDIA H100 80GB HBM3"``).
        metadata: Anything else to record (dtype, batch, versions).

    Example:
        >>> import tempfile
        >>> p = save_node_times(tempfile.mkdtemp() + "/t.json", {"fc": (1e-3, 2e-3)})
        >>> load_node_times(p)["fc"]
        (0.001, 0.002)
    """
    data = {
        "format": NODE_TIMES_FORMAT,
        "version": _NODE_TIMES_VERSION,
        "device": device,
        "graph": None if graph is None else {"name": graph.name,
                                             "fingerprint": graph.fingerprint(),
                                             "num_nodes": len(graph)},
        "metadata": dict(metadata or {}),
        "nodes": {k: [float(f), float(b)] for k, (f, b) in times.items()},
    }
    out = Path(path)
    out.write_text(json.dumps(data, indent=1))
    return out


def load_node_times(path: str | Path, graph: Graph | None = None
                    ) -> dict[str, tuple[float, float]]:
    """Read a node-times JSON file written by :func:`save_node_times`.

    Args:
        path: The file.
        graph: When given, the file must have been measured on this graph (same fingerprint).

    Raises:
        ConfigError: if the file is unreadable, not a node-times file, or for another graph.
    """
    data = read_json_file(path, "node times")
    if not isinstance(data, dict) or data.get("format") != NODE_TIMES_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a node-times file (format "
                          f"{NODE_TIMES_FORMAT!r}); write one with 'partition-plan calibrate "
                          "--model MODEL --ops-out FILE'")
    if data.get("version") != _NODE_TIMES_VERSION:
        raise ConfigError(f"node times {str(path)!r} has version {data.get('version')!r}; this "
                          f"modelparallel reads version {_NODE_TIMES_VERSION}")
    recorded = data.get("graph")
    if graph is not None and recorded is not None and \
            recorded.get("fingerprint") != graph.fingerprint():
        raise ConfigError(
            f"node times {str(path)!r} were measured on graph {recorded.get('name')!r} "
            f"({recorded.get('num_nodes')} nodes, fingerprint {recorded.get('fingerprint')}), "
            f"not on this model's graph {graph.name!r} ({len(graph)} nodes, fingerprint "
            f"{graph.fingerprint()}); profile this model with the same inputs, dtype and "
            "microbatches ('partition-plan calibrate --model ... --ops-out')")
    nodes = data.get("nodes")
    if not isinstance(nodes, dict):
        raise ConfigError(f"node times {str(path)!r} has no 'nodes' object")
    out: dict[str, tuple[float, float]] = {}
    for name, value in nodes.items():
        if (not isinstance(value, list | tuple) or len(value) != 2
                or not all(isinstance(v, int | float) and v >= 0 for v in value)):
            raise ConfigError(f"node times {str(path)!r}: node {name!r} must map to "
                              f"[forward_seconds, backward_seconds] >= 0, got {value!r}")
        out[str(name)] = (float(value[0]), float(value[1]))
    return out
