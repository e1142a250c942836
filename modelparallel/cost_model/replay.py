"""Host and device timelines: a stage's time when the host queues ops slower than they run.

Pure Python (no torch): the partitioner replays stages with it, and
:func:`modelparallel.cost_model.node_replay.host_replay` builds a :class:`HostReplay` from
measured node profiles.

Note [stage replay]
~~~~~~~~~~~~~~~~~~~
A stage runs eagerly: its host queues one op after another and its device runs each as soon as
it is queued and free (Note [host and device time] in ``node_replay.py``). Per-node times that add
up (``node_times``) come from one timeline over the whole graph, in which the host can enter a
host-bound stretch ahead of the device, on slack gained in a device-bound stretch before it.
A pipeline stage has no such slack: its process starts each forward and each backward from
its own queue. So where profiles are known, the partitioner's evaluation (``evaluate`` in
``modelparallel/partitioner/evaluate.py``) replays every stage alone, host and device
starting together: the forward over the stage's nodes in graph order, then the backward in
reverse order on the same timeline (the host goes on from where it finished queueing the
forward), with the input-derived nodes the stage recomputes (Note [inputs on every rank] in
``modelparallel/partitioner/problem.py``). The solvers (ILP, DP) still optimise the per-node
sums, which must be additive for them; the plan's stage times, objective and step time are the
replayed ones. A contiguous stretch replayed from an empty queue takes at least as long as its
share of the whole-graph timeline (slack only ever hides host time), so the replay mostly adds
to the sums and the ILP's bound stays below the plan's objective; a backward that starts with
slack left by its own forward can come out slightly below its sum, and the reported gap is then
approximate. What the replay changed in the fidelity benchmark's stage errors is in
``docs/measurements.md`` (from ``docs/gpu.md``).

Note [call overhead]
~~~~~~~~~~~~~~~~~~~~
Per microbatch a stage also pays host time outside every node: calling its module (to the first
op, and back from the last) and calling autograd's backward (the engine's start, before the
first backward function, and its hand-back after the last): a noticeable share of a host-bound
stage (``docs/measurements.md``). The per-node in-context times cannot see it (it lies between their timestamps). ``profile.call_overhead`` measures it on
a small module (the fixed part: the engine's traversal of a large graph adds a little more) and
:class:`HostReplay` carries it (:class:`CallOverhead`). In a pipeline's steady state the host
queues the next microbatch while the device still runs this one, so the overhead costs time only
where the host is the bottleneck: a stage's time is the larger of its replay and its host's own
work (the nodes' host times plus the overhead), per phase, the backward taking what the forward
left of the host total.

Example:
    >>> r = HostReplay(order=("a", "b"), host_forward={"a": 0.1, "b": 1.0},
    ...                device_forward={"a": 2.0, "b": 0.1}, host_backward={},
    ...                device_backward={})
    >>> r.stage_times(["a", "b"])   # b's queueing hidden behind a's kernel
    (2.2, 0.0)
    >>> r.stage_times(["b"])        # b alone: host-bound
    (1.1, 0.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from modelparallel.errors import ConfigError

__all__ = ["CallOverhead", "HostReplay", "device_timeline"]


def device_timeline(steps: Sequence[tuple[float, float]]) -> list[float]:
    """How much each step adds to the device's finishing time, when the host queues steps
    one after another (``host`` seconds each) and the device runs each (``device`` seconds)
    as soon as it is queued and the device is free.

    Args:
        steps: ``(host_seconds, device_seconds)`` per step, in queueing order.

    Example:
        >>> device_timeline([(1.0, 0.5), (0.5, 2.0), (1.0, 0.5)])  # the last one hidden
        [1.5, 2.0, 0.5]
    """
    queued = finished = 0.0
    out = []
    for host, device in steps:
        queued += host
        start = max(finished, queued)
        out.append(start + device - finished)
        finished = start + device
    return out


@dataclass(frozen=True)
class CallOverhead:
    """Host seconds a stage pays once per microbatch outside every node (Note [call
    overhead]).

    Attributes:
        forward: Calling the stage's module: from the call to its first op, and from its last
            op to the return.
        backward: Calling autograd's backward: from the call to the first backward function,
            and from the last one to the return (the engine's start and its hand-back).
    """

    forward: float = 0.0
    backward: float = 0.0

    def __post_init__(self) -> None:
        if not (self.forward >= 0 and self.backward >= 0):
            raise ConfigError(f"CallOverhead must be seconds >= 0, got forward={self.forward}, "
                              f"backward={self.backward}")


@dataclass(frozen=True)
class HostReplay:
    """Host and device seconds per node for one microbatch, to replay a stage alone (Note
    [stage replay]).

    Attributes:
        order: Every replayed node, in the graph's execution order.
        host_forward: Node to the host's seconds to queue its forward.
        device_forward: Node to the device's seconds on its forward.
        host_backward: Node to the host's seconds to queue its backward (missing: 0).
        device_backward: Node to the device's seconds on its backward (missing: 0).
        call: What each stage pays per microbatch outside its nodes (Note [call overhead]).
    """

    order: tuple[str, ...]
    host_forward: Mapping[str, float]
    device_forward: Mapping[str, float]
    host_backward: Mapping[str, float]
    device_backward: Mapping[str, float]
    call: CallOverhead = CallOverhead()

    def __post_init__(self) -> None:
        known = set(self.order)
        if len(known) != len(self.order):
            raise ConfigError("HostReplay.order names a node twice; give each node once, in "
                              "execution order")
        for field in ("host_forward", "device_forward", "host_backward", "device_backward"):
            values = getattr(self, field)
            stray = sorted(set(values) - known)[:3]
            if stray:
                raise ConfigError(f"HostReplay.{field} has nodes not in order: {stray}; add "
                                  "them to order or drop them")
            bad = [(n, v) for n, v in values.items() if not v >= 0][:3]
            if bad:
                raise ConfigError(f"HostReplay.{field} must be seconds >= 0, got {bad}")
        missing = sorted(known - set(self.host_forward) - set(self.device_forward))[:3]
        if missing:
            raise ConfigError(f"HostReplay nodes {missing} have no forward times; give "
                              "host_forward and device_forward for every node of order")

    def __contains__(self, name: object) -> bool:
        return name in self.host_forward or name in self.device_forward

    def node_times(self, nodes: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
        """What each of ``nodes`` (default: all) adds to the device's finishing time, forward
        and backward, on one timeline over them: the forward in :attr:`order`, then the
        backward in reverse (Note [host and device time] in ``node_replay.py``). Names not in
        :attr:`order` are ignored.

        Example:
            >>> r = HostReplay(("a", "b"), {"a": 0.1, "b": 1.0}, {"a": 2.0, "b": 0.1}, {}, {})
            >>> {n: round(f, 3) for n, (f, b) in r.node_times().items()}
            {'a': 2.1, 'b': 0.1}
        """
        wanted = set(self.order if nodes is None else nodes)
        names = [n for n in self.order if n in wanted]
        hf, df = self.host_forward, self.device_forward
        hb, db = self.host_backward, self.device_backward
        steps = [(hf.get(n, 0.0), df.get(n, 0.0)) for n in names]
        back = [n for n in reversed(names) if hb.get(n, 0.0) > 0 or db.get(n, 0.0) > 0]
        times = device_timeline(steps + [(hb.get(n, 0.0), db.get(n, 0.0)) for n in back])
        backward = dict(zip(back, times[len(steps):]))
        return {n: (f, backward.get(n, 0.0)) for n, f in zip(names, times)}

    def stage_times(self, nodes: Iterable[str]) -> tuple[float, float]:
        """Forward and backward seconds of ``nodes`` replayed alone, host and device starting
        together, and never less than the host's own work with the stage's call overhead
        (Note [call overhead]); names not in :attr:`order` are ignored (count them apart).

        Example:
            >>> r = HostReplay(("a",), {"a": 1.0}, {"a": 0.5}, {"a": 0.2}, {"a": 2.0})
            >>> r.stage_times({"a", "unknown"})
            (1.5, 2.0)
            >>> from dataclasses import replace
            >>> replace(r, call=CallOverhead(0.25, 0.5)).stage_times(["a"])  # hidden
            (1.5, 2.0)
            >>> replace(r, call=CallOverhead(0.75, 3.0)).stage_times(["a"])  # host-bound
            (1.75, 3.2)
        """
        times = self.node_times(nodes)
        forward = sum(f for f, _ in times.values())
        backward = sum(b for _, b in times.values())
        host_f = sum(self.host_forward.get(n, 0.0) for n in times) + self.call.forward
        host_b = sum(self.host_backward.get(n, 0.0) for n in times) + self.call.backward
        forward_out = max(forward, host_f)
        return forward_out, max(backward, host_f + host_b - forward_out)
