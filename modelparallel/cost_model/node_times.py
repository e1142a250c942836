"""The node-times file: measured node times, profiles and call overhead, tied to a graph's
fingerprint, as one value, :class:`NodeTimesFile` (``load`` / ``save``).

``partition-plan calibrate --model ... --ops-out`` writes one (measuring with
:mod:`modelparallel.cost_model.measure`); ``partition-plan build --measured`` and
``pipeline(..., planning=PlanningOptions(node_times=...))`` read it. Reading needs no torch.
The format check is the common one (Note [file envelope] in ``modelparallel/_jsonfile.py``).

Example:
    >>> import tempfile
    >>> f = NodeTimesFile(times={"fc": (1e-3, 2e-3)}, device="cpu")
    >>> p = f.save(tempfile.mkdtemp() + "/t.json")
    >>> NodeTimesFile.load(p).times["fc"]
    (0.001, 0.002)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelparallel._jsonfile import check_envelope, read_json_file, write_text_atomic
from modelparallel.cost_model.costs import GraphCosts, estimate_costs
from modelparallel.cost_model.device import DeviceSpec
from modelparallel.cost_model.node_replay import NodeProfile, host_replay
from modelparallel.cost_model.replay import CallOverhead
from modelparallel.errors import ConfigError
from modelparallel.ir import Graph

__all__ = [
    "NODE_TIMES_FORMAT",
    "NodeTimesFile",
    "load_call_overhead",
    "load_node_profiles",
    "load_node_times",
    "measured_costs",
    "save_node_times",
]

#: ``format`` field of a node-times JSON file.
NODE_TIMES_FORMAT = "modelparallel.node_times"
_NODE_TIMES_VERSION = 2
_NODE_TIMES_READABLE = (1, 2)
_PROFILE_FIELDS = ("device_forward", "host_forward", "device_backward", "host_backward",
                   "host_backward_context", "kind", "host_forward_context")


@dataclass(frozen=True)
class NodeTimesFile:
    """The content of a node-times file (format version 2; version 1 files are still read).

    Attributes:
        times: Node name to ``(forward_seconds, backward_seconds)`` (what the partitioner uses).
        profiles: The measurements the times were derived from (:class:`NodeProfile` per node),
            so they can be re-derived with another ``node_times(..., backward_host=...)``; None
            for files without them (version 1).
        call: Each stage's host time outside its nodes (Note [call overhead]); None if not
            recorded (read as zeros by :attr:`call_overhead`).
        device: What was measured (e.g. ``"NVIDIA H100 80GB HBM3"``).
        graph: The recorded graph (``name``, ``fingerprint``, ``num_nodes``), or None.
        metadata: Anything else recorded (dtype, microbatches, example shapes, versions).
        version: The file's format version.
    """

    times: Mapping[str, tuple[float, float]]
    profiles: Mapping[str, NodeProfile] | None = None
    call: CallOverhead | None = None
    device: str = ""
    graph: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = _NODE_TIMES_VERSION

    def __post_init__(self) -> None:
        if self.version not in _NODE_TIMES_READABLE:
            raise ConfigError(f"NodeTimesFile.version = {self.version} must be one of "
                              f"{list(_NODE_TIMES_READABLE)}")

    @property
    def call_overhead(self) -> CallOverhead:
        """The recorded call overhead, zeros where none was recorded."""
        return self.call or CallOverhead()

    @staticmethod
    def graph_record(graph: Graph) -> dict[str, Any]:
        """What a file records of the graph it was measured on."""
        return {"name": graph.name, "fingerprint": graph.fingerprint(), "num_nodes": len(graph)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; always written as the current version."""
        data: dict[str, Any] = {
            "format": NODE_TIMES_FORMAT,
            "version": _NODE_TIMES_VERSION,
            "device": self.device,
            "graph": None if self.graph is None else dict(self.graph),
            "metadata": dict(self.metadata),
            "nodes": {k: [float(f), float(b)] for k, (f, b) in self.times.items()},
        }
        if self.profiles is not None:
            data["profiles"] = {k: {f: getattr(v, f) for f in _PROFILE_FIELDS}
                                for k, v in self.profiles.items()}
        if self.call is not None:
            data["call_overhead"] = {"forward": self.call.forward,
                                     "backward": self.call.backward}
        return data

    def save(self, path: str | Path) -> Path:
        """Write the file as JSON; returns its path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1), "node times")

    @classmethod
    def load(cls, path: str | Path, graph: Graph | None = None) -> NodeTimesFile:
        """Read and check a node-times file.

        Args:
            path: The file.
            graph: When given, the file must have been measured on this graph (same
                fingerprint).

        Raises:
            ConfigError: if the file is unreadable, not a node-times file, of an unreadable
                version, for another graph, or has malformed entries.
        """
        where = f"node times {str(path)!r}"
        data = check_envelope(
            read_json_file(path, "node times"), fmt=NODE_TIMES_FORMAT,
            versions=_NODE_TIMES_READABLE, what=where,
            hint="(not a node-times file); write one with 'partition-plan calibrate --model "
                 "MODEL --ops-out FILE'")
        recorded = data.get("graph")
        if graph is not None and isinstance(recorded, Mapping) and \
                recorded.get("fingerprint") != graph.fingerprint():
            raise ConfigError(
                f"{where} were measured on graph {recorded.get('name')!r} "
                f"({recorded.get('num_nodes')} nodes, fingerprint {recorded.get('fingerprint')}), "
                f"not on this model's graph {graph.name!r} ({len(graph)} nodes, fingerprint "
                f"{graph.fingerprint()}); profile this model with the same inputs, dtype and "
                "microbatches ('partition-plan calibrate --model ... --ops-out')")
        metadata = data.get("metadata") or {}
        return cls(times=_times(data.get("nodes"), where),
                   profiles=_profiles(data.get("profiles"), where),
                   call=_call(data.get("call_overhead"), where),
                   device=str(data.get("device") or ""),
                   graph=dict(recorded) if isinstance(recorded, Mapping) else None,
                   metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
                   version=int(data["version"]))


def _times(nodes: Any, where: str) -> dict[str, tuple[float, float]]:
    if not isinstance(nodes, dict):
        raise ConfigError(f"{where} has no 'nodes' object")
    out: dict[str, tuple[float, float]] = {}
    for name, value in nodes.items():
        if (not isinstance(value, list | tuple) or len(value) != 2
                or not all(isinstance(v, int | float) and v >= 0 for v in value)):
            raise ConfigError(f"{where}: node {name!r} must map to "
                              f"[forward_seconds, backward_seconds] >= 0, got {value!r}")
        out[str(name)] = (float(value[0]), float(value[1]))
    return out


def _profiles(raw: Any, where: str) -> dict[str, NodeProfile] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'profiles' must be an object of node profiles")
    out: dict[str, NodeProfile] = {}
    for name, value in raw.items():
        try:
            out[str(name)] = NodeProfile(**{f: value[f] for f in _PROFILE_FIELDS
                                            if f in value})
        except (TypeError, KeyError, ConfigError) as e:
            raise ConfigError(f"{where}: profile of node {name!r} is malformed ({e}); "
                              f"expected the fields {_PROFILE_FIELDS}") from e
    return out


def _call(raw: Any, where: str) -> CallOverhead | None:
    if raw is None:
        return None
    try:
        return CallOverhead(float(raw["forward"]), float(raw["backward"]))
    except (TypeError, KeyError, ValueError) as e:
        raise ConfigError(f"{where}: call_overhead {raw!r} is malformed ({e}); expected "
                          "{'forward': seconds, 'backward': seconds}") from e


# The functions below are the file's earlier interface, kept for callers; each is one use of
# NodeTimesFile.


def save_node_times(path: str | Path, times: Mapping[str, tuple[float, float]], *,
                    graph: Graph | None = None, device: str = "",
                    metadata: Mapping[str, Any] | None = None,
                    profiles: Mapping[str, NodeProfile] | None = None,
                    call: CallOverhead | None = None) -> Path:
    """Write measured node times as JSON: :meth:`NodeTimesFile.save`.

    Args:
        path: File to write.
        times: Node name to ``(forward_seconds, backward_seconds)``.
        graph: The graph the times are for; its name and fingerprint are recorded so a mismatch
            is caught when the file is used.
        device: What was measured (e.g. ``"NVIDIA H100 80GB HBM3"``).
        metadata: Anything else to record (dtype, batch, versions).
        profiles: The node profiles the times come from (optional).
        call: Each stage's host time outside its nodes (``call_overhead``; optional, read
            back with :func:`load_call_overhead`).

    Example:
        >>> import tempfile
        >>> p = save_node_times(tempfile.mkdtemp() + "/t.json", {"fc": (1e-3, 2e-3)})
        >>> load_node_times(p)["fc"]
        (0.001, 0.002)
    """
    return NodeTimesFile(
        times=dict(times), profiles=None if profiles is None else dict(profiles), call=call,
        device=device, graph=None if graph is None else NodeTimesFile.graph_record(graph),
        metadata=dict(metadata or {})).save(path)


def load_node_times(path: str | Path, graph: Graph | None = None
                    ) -> dict[str, tuple[float, float]]:
    """The node times of a node-times file (``NodeTimesFile.load(path, graph).times``).

    Raises:
        ConfigError: if the file is unreadable, not a node-times file, or for another graph.
    """
    return dict(NodeTimesFile.load(path, graph).times)


def load_node_profiles(path: str | Path, graph: Graph | None = None
                       ) -> dict[str, NodeProfile]:
    """The node profiles a node-times file (version 2) carries.

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
    f = NodeTimesFile.load(path, graph)
    if f.profiles is None:
        raise ConfigError(f"node times {str(path)!r} (version {f.version}) carry no node "
                          "profiles, only the derived times; re-run 'partition-plan calibrate "
                          "--model ... --ops-out' with this modelparallel")
    return dict(f.profiles)


def load_call_overhead(path: str | Path, graph: Graph | None = None) -> CallOverhead:
    """The call overhead a node-times file carries; none (zeros) for files without it.

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
    return NodeTimesFile.load(path, graph).call_overhead


def measured_costs(graph: Graph, devices: Sequence[DeviceSpec], measured: NodeTimesFile, *,
                   optimizer: str | float = "adam") -> list[GraphCosts]:
    """Per-stage costs of ``graph`` with ``measured``'s node times in place of the roofline, and
    each stage replayed alone where the file carries node profiles (Notes [stage replay] and
    [call overhead] in ``modelparallel/cost_model/replay.py``); the roofline keeps the nodes the
    file has no time for. Used by ``partition-plan build --measured/--profile`` and by
    ``PlanningOptions(node_times=...)``.

    Example:
        >>> from modelparallel.cost_model import get_device_spec
        >>> from modelparallel.partitioner._synthetic import chain_graph
        >>> g = chain_graph(3)
        >>> f = NodeTimesFile(times={g.nodes[1].name: (1.0, 2.0)})
        >>> c = measured_costs(g, [get_device_spec("cpu")], f)[0].nodes[g.nodes[1].name]
        >>> (c.forward_time, c.backward_time)
        (1.0, 2.0)
    """
    profiles = measured.profiles
    replay = (host_replay([n.name for n in graph.nodes], profiles, call=measured.call_overhead)
              if profiles else None)
    return [estimate_costs(graph, d, optimizer=optimizer, measured=dict(measured.times),
                           replay=replay) for d in devices]
