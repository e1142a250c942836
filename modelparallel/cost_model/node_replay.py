"""From measured node profiles to node and stage times, without torch: the host/device replay
arithmetic of profiling mode (the measuring itself is :mod:`modelparallel.cost_model.measure`).

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
backward measured alone pays a whole ``autograd.grad`` call and overstated the engine's cost
(``docs/measurements.md``): replaying with it made predictions worse;
``backward_host="isolated"`` keeps it for diagnosis.) The forward's host time per node is the one measured in context where the
profile has it (Note [in-context forward host time]), else the one measured alone. A node's
forward is timed on leaves that require grad where training's inputs do, so its host time
includes autograd's recording of the op, as in a training step (profiles recorded before this
change timed parameter-free nodes without it). Host times on a shared machine are noisy (single
calls of a view took milliseconds once in a while), so each node takes the typical host time of
the nodes of its kind (the same op on the same shapes: one per layer; Note [host time
statistic]). How close the replayed sum over a stage comes to the stage's measured time, and how
much a device-time-only backward misses where the backward itself is host-bound, is measured in
``docs/gpu.md`` (Cost-model fidelity on an H100) and summarised in ``docs/measurements.md``.

The replay over the whole graph, before any partition is known, lets the host start a
host-bound stretch ahead, on slack from a device-bound one before it, which a pipeline stage
cut between them would not have. So these per-node times are what the solvers sum, and the
plan's stage times come from replaying each stage alone (:func:`host_replay`, Note [stage
replay] in :mod:`modelparallel.cost_model.replay`).


Note [host time statistic]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Host times are pooled with :func:`robust_mean` (each value capped at ``HOST_OUTLIER_CAP`` = 3
times the median, then averaged), over a node's timed runs and over the nodes of one kind, not
with the median. A stage's host time is a sum over its nodes, and the expected value of a sum is
the sum of the expected values; the sum of medians is not the median of the sum. On a host whose
speed changes in stretches (the H100 machine's virtual host, ``docs/gpu.md``), each node's
median picks the usual speed and drops the slow stretches that every run of a whole stage pays
a share of, so the sum of medians under-counts the stage (by how much:
``docs/measurements.md``). The cap keeps what
the median was there for: one stall (a garbage collection, a full launch queue) in one run of
one node does not become the node's time.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from modelparallel.cost_model.replay import CallOverhead, HostReplay
from modelparallel.errors import ConfigError

__all__ = [
    "BackwardMode",
    "ForwardMode",
    "HOST_OUTLIER_CAP",
    "NodeProfile",
    "host_replay",
    "node_times",
    "robust_mean",
    "stage_replay",
    "with_backward_context",
    "with_forward_context",
]


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
