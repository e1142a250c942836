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
where the device waited for it. The backward is replayed the same way, on the same timeline
(the host goes on from where it finished queueing the forward), in reverse order, with each
node's backward host time measured in context (Note [in-context backward host time]); profiles
without those times count the backward's device time only. (The host time of each node's
backward measured alone pays a whole ``autograd.grad`` call and overstated the engine's cost by
20 to 100%: replaying with it made predictions worse; ``backward_host="isolated"`` keeps it
for diagnosis.) The forward's host time per node is the one measured in context where the
profile has it (Note [in-context forward host time]), else the one measured alone. A node's
forward is timed on leaves that require grad where training's inputs do, so its host time
includes autograd's recording of the op, as in a training step (profiles recorded before this
change timed parameter-free nodes without it). Host times on a shared machine are noisy (single
calls of a view took milliseconds once in a while), so each node takes the typical host time of
the nodes of its kind (the same op on the same shapes: one per layer; Note [host time
statistic]). ``docs/gpu.md`` has the measurements: on an H100 whose host needs 10 us per op, the
sum over a stage is within about 5% of its measured time for every stage of GPT-2 medium and a
1.1B Llama and for half of those of BERT-large and ResNet-50; where the backward itself is
host-bound (ResNet-50's last stages at 32 images per microbatch, BERT-large's first ones) the
device-time backward is short by 12-43%, which the in-context backward host times close
(measured on an H100: `docs/gpu.md`).

The replay over the whole graph, before any partition is known, lets the host start a
host-bound stretch ahead, on slack from a device-bound one before it, which a pipeline stage
cut between them would not have. So these per-node times are what the solvers sum, and the
plan's stage times come from replaying each stage alone (:func:`host_replay`, Note [stage
replay] in :mod:`modelparallel.cost_model.replay`).

Note [in-context backward host time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Where a stage's backward is host-bound (ResNet-50 at 32 images per microbatch on an H100 whose
host needs ~10 us per op: ~65 us of host per node in the backward, against 2-3 us of kernels
for a BatchNorm), the device time of the nodes' backwards is not the stage's backward time.
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

Note [in-context forward host time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The forward's host time of a node measured alone (:class:`_Profiler`: a Python call of the op
on detached leaves, repeated) misses what the host spends around the op when a stage's
generated code runs it: the generated code's own statements (fetching attributes, dropping dead
values), the caching allocator's work on a heap shaped by a whole forward, autograd's
bookkeeping for the graph being built. On the H100 run of the fidelity benchmark the isolated
figures summed over ResNet-50's last stage (86 nodes) gave 3.50 ms of host against a measured
forward of 4.31 ms (the device alone: 1.83 ms), about 9 us per node short. So, as for the
backward (Note [in-context backward host time]), the host time is measured where it arises
(:func:`forward_host_times`):

1. *Stamping.* A copy of the graph module gets a call of a recorder (one ``perf_counter`` into a
   list) before every node and before the output (:func:`stamped_module`, an fx rewrite and
   recompile: the code that runs is the generated code, not an Interpreter, whose own cost per
   node would dominate). Node ``k``'s host time is the interval from its stamp to the next,
   less the recorder's own cost (the median interval of a generated function of 200 stamps
   back to back, about 0.1 us).
2. *Training's forward.* It runs with autograd recording, on the graph's real inputs and
   parameters, one or two warm-up runs, then 3-5 timed runs per node, and in
   :func:`node_times` the nodes of one kind pooled (both with the robust mean of Note [host
   time statistic]).
3. *Free of the device.* On CUDA the forward is queued behind a spin kernel longer than twice
   the host's previous forward (lengthened if short, a warning if the device still ran dry),
   so the host never waits. On the CPU the figures are run times; the profile records 0, as
   for the isolated host forward.

A node without a profile (``getitem``, ``sym_size``, a parameter's ``get_attr``) gives its time
to the first profiled node that reads it, directly or through other unprofiled nodes
(:func:`with_forward_context` with ``users``), else to the next profiled node. The reader is
what decides: an exported graph fetches all parameters at its top (one ``getattr`` chain each,
about 5-6 us on the H100's host: 1.4 ms for GPT-2 medium, 2.4 ms for BERT-large), but each
stage's generated code fetches only its own, so charging the next node in order put the whole
model's fetches on stage 0 (+12 to +17% on its predicted time). :func:`node_times` uses these
figures by default where the profiles carry them (``forward_host="auto"``), else the isolated
ones; if the stamped run fails, :func:`profile_nodes` warns and the field stays None. Known
limits: a stage's call overhead is outside every node (Note [call overhead] in
:mod:`modelparallel.cost_model.replay` counts it apart, but not the building of a stage's
received leaves); the run needs the memory of one forward with autograd of the whole
graph; a CUDA stream holds about a thousand queued kernels, and a forward or backward that
queues more behind the spin blocks the host until the spin ends, a wait the node then running
gets (the robust mean caps it: Note [host time statistic]).

Note [host time statistic]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Host times are pooled with :func:`robust_mean` (each value capped at ``HOST_OUTLIER_CAP`` = 3
times the median, then averaged), over a node's timed runs and over the nodes of one kind, not
with the median. A stage's host time is a sum over its nodes, and the expected value of a sum is
the sum of the expected values; the sum of medians is not the median of the sum. On a host whose
speed changes in stretches (the H100 machine's virtual host: 7 or 11 us per launch, in stretches
of 10 ms to seconds, ``docs/gpu.md``), each node's median picks the usual speed and drops the
slow stretches that every run of a whole stage pays a share of, so the sum of medians
under-counts the stage (2 to 6% on the H100 runs, pooling over kinds alone). The cap keeps what
the median was there for: one stall (a garbage collection, a full launch queue) in one run of
one node does not become the node's time.

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

import copy
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
import torch.utils._pytree as pytree

from modelparallel._jsonfile import read_json_file
from modelparallel.cost_model.replay import CallOverhead, HostReplay
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph

__all__ = [
    "HOST_OUTLIER_CAP",
    "NODE_TIMES_FORMAT",
    "BackwardMode",
    "ForwardMode",
    "NodeProfile",
    "backward_host_times",
    "call_overhead",
    "forward_host_times",
    "graph_users",
    "host_replay",
    "load_call_overhead",
    "load_node_profiles",
    "load_node_times",
    "node_times",
    "profile_node_times",
    "profile_nodes",
    "robust_mean",
    "save_node_times",
    "stage_replay",
    "stamped_module",
    "time_call",
    "with_backward_context",
    "with_forward_context",
]

#: ``format`` field of a node-times JSON file.
NODE_TIMES_FORMAT = "modelparallel.node_times"
_NODE_TIMES_VERSION = 2
_NODE_TIMES_READABLE = (1, 2)
_PROFILE_FIELDS = ("device_forward", "host_forward", "device_backward", "host_backward",
                   "host_backward_context", "kind", "host_forward_context")

_SKIP_TARGETS = ("getitem", "size", "sym_size", "dim", "_assert", "numel")

#: Host times above this multiple of their median are capped before averaging
#: (Note [host time statistic]).
HOST_OUTLIER_CAP = 3.0


def robust_mean(values: Iterable[float], cap: float = HOST_OUTLIER_CAP) -> float:
    """The mean of ``values`` after capping each at ``cap`` times their median: the expected
    host time, with no single stall (a collection, a queue that filled) dominating it
    (Note [host time statistic]).

    Example:
        >>> robust_mean([1.0, 1.0, 2.0, 100.0])   # 100 is capped at 3 x 1.5
        2.125
    """
    values = list(values)
    if not values:
        raise ConfigError("robust_mean needs at least one value; got none")
    limit = cap * statistics.median(values)
    return sum(min(v, limit) for v in values) / len(values)

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
        host_backward_context: Seconds the host spends on this node's backward inside a whole
            forward+backward of the graph (Note [in-context backward host time]); 0 on the
            CPU (issuing is running), None where it was not measured.
        host_forward_context: Seconds the host spends on this node's forward inside a whole
            forward of the graph's generated code (Note [in-context forward host time]); 0 on
            the CPU, None where it was not measured (then :func:`node_times` uses
            ``host_forward``, measured alone).
    """

    device_forward: float
    host_forward: float
    device_backward: float
    host_backward: float
    kind: str = ""
    host_backward_context: float | None = None
    host_forward_context: float | None = None

    def __post_init__(self) -> None:
        for name in ("device_forward", "host_forward", "device_backward", "host_backward"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"NodeProfile.{name} = {getattr(self, name)} must be >= 0")
        for name in ("host_backward_context", "host_forward_context"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"NodeProfile.{name} = {value} must be >= 0 or None")


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


#: How :func:`node_times` counts the backward: ``"device"`` (device time only), ``"context"``
#: (replayed with the in-context host times), ``"isolated"`` (replayed with the host times of
#: each node measured alone; diagnosis), ``"auto"`` (``"context"`` where the profiles carry
#: in-context host times, else ``"device"``).
BackwardMode = Literal["auto", "device", "context", "isolated"]

#: How :func:`node_times` counts the forward's host time: ``"isolated"`` (each node's host time
#: measured alone), ``"context"`` (measured inside a whole forward, Note [in-context forward
#: host time]; nodes without it use the isolated one), ``"auto"`` (``"context"`` where the
#: profiles carry in-context forward host times, else ``"isolated"``).
ForwardMode = Literal["auto", "context", "isolated"]


def node_times(order: Sequence[str], profiles: Mapping[str, NodeProfile], *,
               backward_host: bool | BackwardMode = "auto",
               forward_host: ForwardMode = "auto") -> dict[str, tuple[float, float]]:
    """Forward and backward seconds per node from device and host times (Note [host and
    device time], Note [in-context backward host time]).

    Args:
        order: Node names in execution order (the graph's order); names without a profile are
            skipped.
        profiles: What :func:`profile_nodes` measured.
        backward_host: How the backward is counted (:data:`BackwardMode`; ``False`` is
            ``"device"``, ``True`` is ``"isolated"``). ``"context"`` and ``"isolated"`` replay
            the backward in reverse order after the forward, on the same timeline: the host
            queues each node's backward (its in-context, or its isolated, host time: the
            typical of its kind) and the device runs its kernels (its device backward time)
            when queued and free; each node's backward time is what it adds to the device's
            finishing time. Default ``"auto"``: ``"context"`` where the profiles carry
            in-context host times, else ``"device"``.
        forward_host: Which host time the forward's replay uses (:data:`ForwardMode`;
            default ``"auto"``: the in-context one where the profiles carry it, Note
            [in-context forward host time]); either way typical of the node's kind.

    Returns:
        Node name to ``(forward_seconds, backward_seconds)`` for every profiled node.

    Raises:
        ConfigError: for an unknown ``backward_host`` or ``forward_host``.

    Example:
        >>> p = {"a": NodeProfile(1.0, 0.1, 2.0, 0.1), "b": NodeProfile(0.1, 1.0, 0.1, 1.0)}
        >>> [round(f, 3) for f, _ in node_times(["a", "b"], p).values()]  # a hides b's queueing
        [1.1, 0.1]
    """
    return host_replay(order, profiles, backward_host=backward_host,
                       forward_host=forward_host).node_times()


def host_replay(order: Sequence[str], profiles: Mapping[str, NodeProfile], *,
                backward_host: bool | BackwardMode = "auto",
                forward_host: ForwardMode = "auto",
                call: CallOverhead | None = None) -> HostReplay:
    """The host and device times of every profiled node, ready to replay (Note [host and
    device time]); give it to ``estimate_costs(..., replay=...)`` and the partitioner
    replays each stage alone (Note [stage replay] in :mod:`modelparallel.cost_model.replay`).

    Same arguments as :func:`node_times`: host times are typical of each kind (Note [host
    time statistic]); ``call`` is each stage's host time outside its nodes
    (:func:`call_overhead`, Note [call overhead]; default none).

    Example:
        >>> p = {"a": NodeProfile(2.0, 0.1, 0.0, 0.0), "b": NodeProfile(0.1, 1.0, 0.0, 0.0)}
        >>> host_replay(["a", "b"], p).stage_times(["b"])   # b alone: host-bound
        (1.1, 0.0)
    """
    names = tuple(n for n in order if n in profiles)
    host_f = _typical_host_forward(profiles, _forward_mode(forward_host, profiles))
    mode = _backward_mode(backward_host, profiles)
    if mode == "device":
        host_b = {n: 0.0 for n in names}
    elif mode == "isolated":
        host_b = _typical_host(profiles, "host_backward")
    else:
        host_b = _typical_host({n: replace(p, host_backward_context=p.host_backward_context or
                                           0.0) for n, p in profiles.items()},
                               "host_backward_context")
    return HostReplay(order=names, host_forward={n: host_f[n] for n in names},
                      device_forward={n: profiles[n].device_forward for n in names},
                      host_backward={n: host_b[n] for n in names},
                      device_backward={n: profiles[n].device_backward for n in names},
                      call=call or CallOverhead())


def stage_replay(order: Sequence[str], profiles: Mapping[str, NodeProfile],
                 nodes: Iterable[str], *, backward_host: bool | BackwardMode = "auto",
                 forward_host: ForwardMode = "auto") -> tuple[float, float]:
    """Forward and backward seconds of one stage's nodes replayed alone, host and device
    starting together: ``host_replay(...).stage_times(nodes)`` (Note [stage replay]).

    Example:
        >>> p = {"a": NodeProfile(2.0, 0.1, 0.0, 0.0), "b": NodeProfile(0.1, 1.0, 0.0, 0.0)}
        >>> node_times(["a", "b"], p)["b"][0]    # b's queueing hidden behind a's kernels
        0.10000000000000009
        >>> stage_replay(["a", "b"], p, ["b"])  # b alone: host-bound
        (1.1, 0.0)
    """
    return host_replay(order, profiles, backward_host=backward_host,
                       forward_host=forward_host).stage_times(nodes)


def _backward_mode(value: bool | str, profiles: Mapping[str, NodeProfile]) -> str:
    if value is True:
        return "isolated"
    if value is False:
        return "device"
    if value == "auto":
        has = any(p.host_backward_context is not None for p in profiles.values())
        return "context" if has else "device"
    if value in ("device", "context", "isolated"):
        return str(value)
    raise ConfigError(f"backward_host = {value!r} must be one of 'auto', 'device', 'context', "
                      "'isolated' (or a bool)")


def _forward_mode(value: str, profiles: Mapping[str, NodeProfile]) -> str:
    if value == "auto":
        has = any(p.host_forward_context is not None for p in profiles.values())
        return "context" if has else "isolated"
    if value in ("context", "isolated"):
        return value
    raise ConfigError(f"forward_host = {value!r} must be one of 'auto', 'context', 'isolated'")


def _typical_host_forward(profiles: Mapping[str, NodeProfile], mode: str = "isolated"
                          ) -> dict[str, float]:
    """Each node's host forward time (measured alone, or in context where measured), typical
    of its kind (:func:`_typical_host`)."""
    if mode == "isolated":
        return _typical_host(profiles, "host_forward")
    return _typical_host({n: replace(p, host_forward_context=p.host_forward
                                     if p.host_forward_context is None
                                     else p.host_forward_context)
                          for n, p in profiles.items()}, "host_forward_context")


def _typical_host(profiles: Mapping[str, NodeProfile], field: str) -> dict[str, float]:
    """Each node's ``field`` (a host time), as the robust mean over the nodes of its kind
    (Note [host time statistic])."""
    by_kind: dict[str, list[float]] = {}
    for p in profiles.values():
        if p.kind:
            by_kind.setdefault(p.kind, []).append(getattr(p, field))
    typical = {k: robust_mean(v) for k, v in by_kind.items()}
    return {n: typical[p.kind] if p.kind else getattr(p, field) for n, p in profiles.items()}


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


# -- the backward's host time in context -----------------------------------------------------------


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


class _Spin:
    """On CUDA, a spin kernel queued before the backward so that the device is busy while the
    host queues it (the host never waits for the device); a no-op elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rate = _CudaClock(device).cycles_per_second if device.type == "cuda" else None
        self.seconds = 0.0
        self.waited = 0
        self._events: tuple[Any, Any] | None = None

    def __call__(self) -> None:
        if self.rate is None or self.seconds <= 0:
            return
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record()
        torch.cuda._sleep(int(self.seconds * self.rate))
        after.record()
        self._events = (before, after)

    def check(self, host_seconds: float) -> None:
        """After a backward: if the spin ended before the host finished queueing, the host
        may have waited; the next backward gets a longer spin."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._events is None:
            self.seconds = 2.0 * host_seconds + 1e-3
            return
        spun = self._events[0].elapsed_time(self._events[1]) / 1e3
        self._events = None
        if host_seconds > 0.9 * spun:
            self.waited += 1
            self.seconds = min(2.0 * host_seconds + 1e-3, 10.0)


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


def with_backward_context(profiles: Mapping[str, NodeProfile], order: Sequence[str],
                          context: Mapping[str, float], *, host_is_device: bool = False
                          ) -> dict[str, NodeProfile]:
    """``profiles`` with ``host_backward_context`` set from :func:`backward_host_times`.

    A node with an in-context host time but no profile (one the profiler skips, like indexing
    with ``getitem``, or one it could not replay) gives its time to the nearest profiled node
    before it in ``order`` (whose backward the engine runs next), else the nearest after.
    Profiled nodes that created no function the backward ran get 0. With ``host_is_device``
    (the CPU, where issuing is running) every figure is 0, as the host forward is.

    Example:
        >>> p = {"a": NodeProfile(1.0, 0.0, 1.0, 0.0), "c": NodeProfile(1.0, 0.0, 1.0, 0.0)}
        >>> out = with_backward_context(p, ["a", "b", "c"], {"a": 1.0, "b": 0.5, "c": 2.0})
        >>> [out[n].host_backward_context for n in "ac"]
        [1.5, 2.0]
    """
    extra = _fold_into_profiled(profiles, order, context, toward="earlier")
    return {n: replace(p, host_backward_context=0.0 if host_is_device else extra[n])
            for n, p in profiles.items()}


def _fold_into_profiled(profiles: Mapping[str, NodeProfile], order: Sequence[str],
                        context: Mapping[str, float], *, toward: str,
                        users: Mapping[str, Iterable[str]] | None = None) -> dict[str, float]:
    """Per profiled node, its in-context seconds plus those of the unprofiled nodes it is the
    first profiled reader of (through ``users``), or else the nearest profiled neighbour in
    ``order`` of, looking ``toward`` "earlier" or "later" nodes first (and the other way when
    there is none)."""
    extra = {n: 0.0 for n in profiles}
    ordered = [n for n in order if n in profiles]
    position = {n: i for i, n in enumerate(order)}
    for name, seconds in context.items():
        if name in profiles:
            extra[name] += seconds
            continue
        reader = None if users is None else _first_profiled_reader(name, profiles, users,
                                                                   position)
        if reader is not None:
            extra[reader] += seconds
        elif ordered and toward == "earlier":
            at = position.get(name, len(order))
            earlier = [n for n in ordered if position[n] < at]
            extra[earlier[-1] if earlier else ordered[0]] += seconds
        elif ordered:
            at = position.get(name, -1)
            later = [n for n in ordered if position[n] > at]
            extra[later[0] if later else ordered[-1]] += seconds
    return extra


def _first_profiled_reader(name: str, profiles: Mapping[str, NodeProfile],
                           users: Mapping[str, Iterable[str]], position: Mapping[str, int]
                           ) -> str | None:
    """The earliest profiled node (by ``position``) that reads ``name``'s value, directly or
    through unprofiled nodes; None if there is none."""
    readers = set()
    seen = {name}
    frontier = [name]
    while frontier:
        for user in users.get(frontier.pop(), ()):
            if user in seen:
                continue
            seen.add(user)
            if user in profiles:
                readers.add(user)
            else:
                frontier.append(user)
    return min(readers, key=lambda n: position.get(n, len(position)), default=None)


# -- the forward's host time in context ------------------------------------------------------------

_STAMPS: list[float] = []


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


def _stamp() -> None:
    """The recorder the stamped graph calls before every node (Note [in-context forward host
    time])."""
    _STAMPS.append(time.perf_counter())


def stamped_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose generated code calls a host timestamp before every node and
    before its output; also the names of the stamped nodes, in order (node ``k`` runs between
    stamps ``k`` and ``k + 1``). It shares ``gm``'s submodules, parameters and buffers and
    takes the graph's flat inputs.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> stamped, names = stamped_module(gm)
        >>> x = torch.randn(4, 8)
        >>> names, bool(torch.equal(stamped(x), gm(x)))
        (['_0', '_1'], True)
    """
    graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()  # flat inputs, as the Interpreter takes them
    names: list[str] = []
    for node in list(graph.nodes):
        if node.op == "placeholder":
            continue
        with graph.inserting_before(node):
            graph.call_function(_stamp)
        if node.op != "output":
            names.append(node.name)
    return torch.fx.GraphModule(gm, graph), names


def _stamp_cost(length: int = 200, repeat: int = 7) -> float:
    """Host seconds one stamp adds between two nodes: the median interval of a generated
    function that calls ``length`` stamps back to back."""
    graph = torch.fx.Graph()
    for _ in range(length):
        graph.call_function(_stamp)
    graph.output(None)
    chain = torch.fx.GraphModule(torch.nn.Module(), graph)
    costs = []
    for _ in range(repeat + 1):
        _STAMPS.clear()
        chain()
        costs.append(statistics.median(b - a for a, b in itertools.pairwise(_STAMPS)))
    _STAMPS.clear()
    return statistics.median(costs[1:])


def _stamped_run(stamped: torch.fx.GraphModule, flat_inputs: Sequence[Any], spin: _Spin
                 ) -> tuple[Any, list[float], float, float]:
    """One forward of a stamped module with autograd on, queued behind ``spin``: its output,
    its stamps, and the host's clock at the call and at the return."""
    if spin.device.type == "cuda":
        torch.cuda.synchronize(spin.device)
    _STAMPS.clear()
    spin()
    t0 = time.perf_counter()
    with torch.enable_grad():
        out = stamped(*flat_inputs)
    t1 = time.perf_counter()
    stamps = list(_STAMPS)
    _STAMPS.clear()
    spin.check(t1 - t0)
    return out, stamps, t0, t1


def forward_host_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                       warmup: int = 1, repeat: int = 3) -> dict[str, float]:
    """Host seconds of each node's forward inside a whole forward of ``gm``'s generated code.

    Runs a copy of ``gm`` with a host timestamp before every node (:func:`stamped_module`),
    with autograd recording as in training (Note [in-context forward host time]): a node's
    time is the interval from its stamp to the next, less the stamp's own cost. On CUDA the
    forward is queued behind a spin kernel, so the figures are the host's work alone; on the
    CPU they are the run time (the host is the device).

    Args:
        gm: A traced graph module, on the device to measure, with real weights.
        flat_inputs: Its inputs for one microbatch.
        warmup: Untimed forwards first (at least one: it sizes the spin).
        repeat: Timed forwards; each node gets their robust mean (Note [host time
            statistic]).

    Returns:
        Node name to seconds, for every node but placeholders and the output.

    Raises:
        ConfigError: for a meta module or bad ``warmup``/``repeat``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> sorted(forward_host_times(gm, [torch.randn(4, 8)], repeat=1))
        ['_0', '_1']
    """
    device = _check_profilable(gm, flat_inputs, warmup, repeat)
    stamped, names = stamped_module(gm)
    cost = _stamp_cost()
    spin = _Spin(device)
    runs: list[list[float]] = []
    for i in range(max(1, warmup) + repeat):
        _, stamps, _, _ = _stamped_run(stamped, flat_inputs, spin)
        assert len(stamps) == len(names) + 1, (len(stamps), len(names))
        if i >= max(1, warmup):
            runs.append([max(0.0, b - a - cost) for a, b in itertools.pairwise(stamps)])
    if spin.waited > 1:
        warnings.warn(f"the device ran out of queued work in {spin.waited} of "
                      f"{max(1, warmup) + repeat} in-context forward runs; the host times "
                      "may include waiting for the device", stacklevel=2)
    return {n: robust_mean(r[k] for r in runs) for k, n in enumerate(names)}


def with_forward_context(profiles: Mapping[str, NodeProfile], order: Sequence[str],
                         context: Mapping[str, float], *, host_is_device: bool = False,
                         users: Mapping[str, Iterable[str]] | None = None
                         ) -> dict[str, NodeProfile]:
    """``profiles`` with ``host_forward_context`` set from :func:`forward_host_times`.

    A node with an in-context host time but no profile (indexing with ``getitem``, a
    parameter's ``get_attr``, a node the profiler could not replay) gives its time to the first
    profiled node in ``order`` among those that read it, directly or through other unprofiled
    nodes (``users``: node name to the names of the nodes reading its value, as
    ``torch.fx.Node.users``), else to the nearest profiled node after it in ``order`` (whose
    queueing it delays), else before (Note [in-context forward host time]). With
    ``host_is_device`` (the CPU, where issuing is running) every figure is 0.

    Example:
        >>> p = {"a": NodeProfile(1.0, 0.0, 1.0, 0.0), "c": NodeProfile(1.0, 0.0, 1.0, 0.0)}
        >>> out = with_forward_context(p, ["a", "b", "c"], {"a": 1.0, "b": 0.5, "c": 2.0})
        >>> [out[n].host_forward_context for n in "ac"]
        [1.0, 2.5]
        >>> out = with_forward_context(p, ["b", "a", "c"], {"a": 1.0, "b": 0.5, "c": 2.0},
        ...                            users={"b": ["c"]})   # b is read by c only
        >>> [out[n].host_forward_context for n in "ac"]
        [1.0, 2.5]
    """
    extra = _fold_into_profiled(profiles, order, context, toward="later", users=users)
    return {n: replace(p, host_forward_context=0.0 if host_is_device else extra[n])
            for n, p in profiles.items()}


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


def call_overhead(device: torch.device | str, *, warmup: int = 2, repeat: int = 7
                  ) -> CallOverhead:
    """Host seconds a stage pays per microbatch outside its nodes (Note [call overhead] in
    :mod:`modelparallel.cost_model.replay`), measured on a small generated module: from the
    module call to its first op's timestamp and from its last to the return, and from the
    backward call to the first function's pre-hook and from the last function's hook to the
    return; both queued behind a spin kernel on CUDA, as the in-context times are. On the
    CPU, where the host is the device and host times are recorded as 0, it is 0 too.

    Example:
        >>> call_overhead("cpu")
        CallOverhead(forward=0.0, backward=0.0)
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CallOverhead()
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(64, 64),
                                                     torch.nn.ReLU())).to(device)
    stamped, _ = stamped_module(gm)
    x = torch.randn(8, 64, device=device, requires_grad=True)  # a received leaf
    spin = _Spin(device)
    forward: list[float] = []
    backward: list[float] = []
    for i in range(max(1, warmup) + repeat):
        out, stamps, t0, t1 = _stamped_run(stamped, [x], spin)
        spans, b0, b1 = _hooked_backward(_functions([out]), [out], [torch.ones_like(out)],
                                         before=spin)
        spin.check(b1 - b0)
        if i >= max(1, warmup):
            forward.append(stamps[0] - t0 + t1 - stamps[-1])
            backward.append(min(s for s, _, _ in spans) - b0 + b1 - max(e for _, e, _ in spans))
    return CallOverhead(robust_mean(forward), robust_mean(backward))


# -- files -----------------------------------------------------------------------------------------


def save_node_times(path: str | Path, times: Mapping[str, tuple[float, float]], *,
                    graph: Graph | None = None, device: str = "",
                    metadata: Mapping[str, Any] | None = None,
                    profiles: Mapping[str, NodeProfile] | None = None,
                    call: CallOverhead | None = None) -> Path:
    """Write measured node times as JSON (read back with :func:`load_node_times`).

    Format version 2 (version 1 files are still read): ``nodes`` maps each node to
    ``[forward_seconds, backward_seconds]`` (what the partitioner uses); ``profiles``, when
    given, maps each node to the measurements they were derived from (the fields of
    :class:`NodeProfile`, ``host_backward_context`` included; read back with
    :func:`load_node_profiles`), so the times can be re-derived with another
    ``node_times(..., backward_host=...)``.

    Args:
        path: File to write.
        times: Node name to ``(forward_seconds, backward_seconds)``.
        graph: The graph the times are for; its name and fingerprint are recorded so a mismatch
            is caught when the file is used.
        device: What was measured (e.g. ``"NVIDIA H100 80GB HBM3"``).
        metadata: Anything else to record (dtype, batch, versions).
        profiles: The node profiles the times come from (optional).
        call: Each stage's host time outside its nodes (:func:`call_overhead`; optional, read
            back with :func:`load_call_overhead`).

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
    if profiles is not None:
        data["profiles"] = {k: {f: getattr(v, f) for f in _PROFILE_FIELDS}
                            for k, v in profiles.items()}
    if call is not None:
        data["call_overhead"] = {"forward": call.forward, "backward": call.backward}
    out = Path(path)
    out.write_text(json.dumps(data, indent=1))
    return out


def _read_node_times_file(path: str | Path, graph: Graph | None) -> dict[str, Any]:
    """The JSON object of a node-times file, checked: format, version, graph."""
    data = read_json_file(path, "node times")
    if not isinstance(data, dict) or data.get("format") != NODE_TIMES_FORMAT:
        raise ConfigError(f"{str(path)!r} is not a node-times file (format "
                          f"{NODE_TIMES_FORMAT!r}); write one with 'partition-plan calibrate "
                          "--model MODEL --ops-out FILE'")
    if data.get("version") not in _NODE_TIMES_READABLE:
        raise ConfigError(f"node times {str(path)!r} has version {data.get('version')!r}; this "
                          f"modelparallel reads versions {list(_NODE_TIMES_READABLE)}")
    recorded = data.get("graph")
    if graph is not None and recorded is not None and \
            recorded.get("fingerprint") != graph.fingerprint():
        raise ConfigError(
            f"node times {str(path)!r} were measured on graph {recorded.get('name')!r} "
            f"({recorded.get('num_nodes')} nodes, fingerprint {recorded.get('fingerprint')}), "
            f"not on this model's graph {graph.name!r} ({len(graph)} nodes, fingerprint "
            f"{graph.fingerprint()}); profile this model with the same inputs, dtype and "
            "microbatches ('partition-plan calibrate --model ... --ops-out')")
    return data


def load_node_profiles(path: str | Path, graph: Graph | None = None
                       ) -> dict[str, NodeProfile]:
    """Read the node profiles a node-times file (version 2) carries.

    Args:
        path: A file written by :func:`save_node_times` with ``profiles``.
        graph: When given, the file must have been measured on this graph.

    Raises:
        ConfigError: if the file is not a node-times file, is for another graph, or carries no
            profiles (version 1 files, or files written without them).

    Example:
        >>> import tempfile
        >>> p = save_node_times(tempfile.mkdtemp() + "/t.json", {"fc": (1e-3, 2e-3)},
        ...                     profiles={"fc": NodeProfile(1e-3, 0.0, 2e-3, 0.0, "fc", 0.0)})
        >>> load_node_profiles(p)["fc"].host_backward_context
        0.0
    """
    data = _read_node_times_file(path, graph)
    raw = data.get("profiles")
    if not isinstance(raw, dict):
        raise ConfigError(f"node times {str(path)!r} (version {data.get('version')}) carry no "
                          "node profiles, only the derived times; re-run 'partition-plan "
                          "calibrate --model ... --ops-out' with this modelparallel")
    out: dict[str, NodeProfile] = {}
    for name, value in raw.items():
        try:
            out[str(name)] = NodeProfile(**{f: value[f] for f in _PROFILE_FIELDS
                                            if f in value})
        except (TypeError, KeyError, ConfigError) as e:
            raise ConfigError(f"node times {str(path)!r}: profile of node {name!r} is "
                              f"malformed ({e}); expected the fields {_PROFILE_FIELDS}") from e
    return out


def load_call_overhead(path: str | Path, graph: Graph | None = None) -> CallOverhead:
    """The call overhead a node-times file carries (:func:`save_node_times` with ``call``);
    none (zeros) for files without it.

    Raises:
        ConfigError: if the file is not a node-times file, is for another graph, or its
            ``call_overhead`` is malformed.

    Example:
        >>> import tempfile
        >>> p = save_node_times(tempfile.mkdtemp() + "/t.json", {"fc": (1e-3, 2e-3)},
        ...                     call=CallOverhead(5e-5, 4e-4))
        >>> load_call_overhead(p)
        CallOverhead(forward=5e-05, backward=0.0004)
    """
    data = _read_node_times_file(path, graph)
    raw = data.get("call_overhead")
    if raw is None:
        return CallOverhead()
    try:
        return CallOverhead(float(raw["forward"]), float(raw["backward"]))
    except (TypeError, KeyError, ValueError) as e:
        raise ConfigError(f"node times {str(path)!r}: call_overhead {raw!r} is malformed "
                          f"({e}); expected {{'forward': seconds, 'backward': seconds}}"
                          ) from e


def load_node_times(path: str | Path, graph: Graph | None = None
                    ) -> dict[str, tuple[float, float]]:
    """Read a node-times JSON file written by :func:`save_node_times` (versions 1 and 2).

    Args:
        path: The file.
        graph: When given, the file must have been measured on this graph (same fingerprint).

    Raises:
        ConfigError: if the file is unreadable, not a node-times file, or for another graph.
    """
    data = _read_node_times_file(path, graph)
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
