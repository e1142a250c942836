"""The IR :class:`Graph`: a model's computation as a DAG of nodes, its fingerprint and JSON.

Import it from :mod:`modelparallel.ir`; the format is documented in ``docs/ir-format.md``.

Example:
    >>> g = Graph("id", (Node("x", OpKind.PLACEHOLDER, "x"),
    ...                  Node("output", OpKind.OUTPUT, "output", ("x",))))
    >>> [n.name for n in g.placeholders], g.output.name
    (['x'], 'output')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx

from modelparallel._jsonfile import check_envelope
from modelparallel.errors import IRFormatError
from modelparallel.ir.nodes import (
    Node,
    OpKind,
    Param,
    _node_from_dict,
    _node_to_dict,
    _param_from_dict,
    _param_to_dict,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Graph"]

FORMAT_NAME = "modelparallel.ir"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Graph:
    """A model's computation as a DAG of nodes in topological order.

    Attributes:
        name: A label for people (the model's class name, say).
        nodes: Every node, producers before consumers; exactly one ``output`` node, last.
        params: Every parameter and buffer any node reads, once each, under canonical names.
        metadata: Free-form strings: which tracer path made it, framework versions, the example
            input shapes. Not part of the fingerprint.
    """

    name: str
    nodes: tuple[Node, ...]
    params: tuple[Param, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "metadata", dict(self.metadata))
        self._validate()

    # -- structure -------------------------------------------------------------------------------

    def _validate(self) -> None:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise IRFormatError(f"node name {node.name!r} appears twice; names must be unique")
            for src in node.inputs:
                if src not in seen:
                    raise IRFormatError(
                        f"node {node.name!r} consumes {src!r}, which is not an earlier node; "
                        "nodes must be listed in topological order and inputs must name nodes"
                    )
            seen.add(node.name)
        outputs = [n.name for n in self.nodes if n.op is OpKind.OUTPUT]
        if len(outputs) != 1 or self.nodes[-1].op is not OpKind.OUTPUT:
            raise IRFormatError(
                f"a graph needs exactly one output node, listed last; found {outputs}"
            )
        names = set()
        for p in self.params:
            for n in (p.name, *p.aliases):
                if n in names:
                    raise IRFormatError(f"parameter name {n!r} is listed twice")
                names.add(n)
        canon = {p.name for p in self.params}
        for node in self.nodes:
            for pname in node.params:
                if pname not in canon:
                    raise IRFormatError(
                        f"node {node.name!r} reads parameter {pname!r}, which is not a canonical "
                        "name in the graph's params (aliases must be resolved to the canonical name)"
                    )

    @cached_property
    def _index(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.nodes)}

    @cached_property
    def _param_index(self) -> dict[str, Param]:
        out: dict[str, Param] = {}
        for p in self.params:
            out[p.name] = p
            for a in p.aliases:
                out[a] = p
        return out

    @cached_property
    def _users(self) -> dict[str, tuple[str, ...]]:
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                users[src].append(n.name)
        return {k: tuple(v) for k, v in users.items()}

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.name, self.nodes, self.params, dict(self.metadata)) == (
            other.name, other.nodes, other.params, dict(other.metadata))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def node(self, name: str) -> Node:
        """The node called ``name``.

        Raises:
            KeyError: if there is none.
        """
        try:
            return self.nodes[self._index[name]]
        except KeyError:
            raise KeyError(f"the graph has no node named {name!r}") from None

    def index(self, name: str) -> int:
        """Position of node ``name`` in the topological order."""
        return self._index[name]

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (canonical name or alias)."""
        try:
            return self._param_index[name]
        except KeyError:
            raise KeyError(f"the graph has no parameter or buffer named {name!r}") from None

    def users(self, name: str) -> tuple[str, ...]:
        """Names of the nodes that consume node ``name``'s value, in topological order."""
        return self._users[name]

    @property
    def placeholders(self) -> tuple[Node, ...]:
        """The model-input nodes, in order."""
        return tuple(n for n in self.nodes if n.op is OpKind.PLACEHOLDER)

    @property
    def output(self) -> Node:
        """The single output node."""
        return self.nodes[-1]

    @property
    def num_parameters(self) -> int:
        """Elements of every trainable parameter (tied ones counted once)."""
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def total_flops(self) -> int:
        """Forward FLOPs of the whole graph."""
        return sum(n.flops for n in self.nodes)

    def tied_params(self) -> dict[str, tuple[str, ...]]:
        """Parameters read by more than one node, with the nodes that read them.

        Example:
            >>> g = Graph("t", (Node("a", OpKind.CALL_FUNCTION, "f", params=("w",)),
            ...                 Node("b", OpKind.CALL_FUNCTION, "g", ("a",), params=("w",)),
            ...                 Node("output", OpKind.OUTPUT, "output", inputs=("b",))),
            ...           params=(Param("w", (2,), "float32"),))
            >>> g.tied_params()
            {'w': ('a', 'b')}
        """
        readers: dict[str, list[str]] = {}
        for n in self.nodes:
            for p in n.params:
                readers.setdefault(p, []).append(n.name)
        return {p: tuple(ns) for p, ns in readers.items() if len(ns) > 1}

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a ``networkx.DiGraph``; node attribute ``node`` holds the :class:`Node`,
        edge attribute ``bytes`` the producer's output bytes."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, node=n)
        for n in self.nodes:
            for src in n.inputs:
                g.add_edge(src, n.name, bytes=self.node(src).output_bytes)
        return g

    # -- identity --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A stable hex digest of the graph's structure.

        It covers every node's name, op, target, inputs and parameters, and every parameter's
        name, shape and dtype. It does not cover activation shapes (so a plan made for one batch
        size fits another), FLOPs or metadata.
        """
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for n in self.nodes:
            h.update(json.dumps([n.name, n.op.value, n.target, list(n.inputs), list(n.params)],
                                separators=(",", ":")).encode())
        for p in sorted(self.params, key=lambda p: p.name):
            h.update(json.dumps([p.name, list(p.shape), p.dtype, p.is_buffer,
                                 sorted(p.aliases)], separators=(",", ":")).encode())
        return h.hexdigest()

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The graph as JSON-ready data (see ``docs/ir-format.md``)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "metadata": dict(self.metadata),
            "params": [_param_to_dict(p) for p in self.params],
            "nodes": [_node_to_dict(n) for n in self.nodes],
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = None) -> str:
        """Serialise to JSON text; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Build a graph from :meth:`to_dict` data, checking the format and version.

        Raises:
            IRFormatError: on a wrong format name, an unsupported version, a missing or mistyped
                field, or a structural error.
        """
        check_envelope(data, fmt=FORMAT_NAME, versions=(FORMAT_VERSION,), what="IR JSON",
                       error=IRFormatError, hint="(see docs/ir-format.md)",
                       version_hint="Re-export the graph with a matching version.")
        try:
            graph = cls(
                name=str(data.get("name", "graph")),
                nodes=tuple(_node_from_dict(n) for n in data["nodes"]),
                params=tuple(_param_from_dict(p) for p in data.get("params", ())),
                metadata={str(k): str(v) for k, v in dict(data.get("metadata", {})).items()},
            )
        except IRFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise IRFormatError(f"IR JSON is malformed: {type(e).__name__}: {e}") from None
        expected = data.get("fingerprint")
        if expected is not None and expected != graph.fingerprint():
            raise IRFormatError(
                f"IR JSON says fingerprint {expected[:12]}... but its content hashes to "
                f"{graph.fingerprint()[:12]}...; the file was edited or truncated. Remove the "
                "'fingerprint' field to accept the content as it is.")
        return graph

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Graph:
        """Read a graph from JSON text or from a ``.json`` file path."""
        if isinstance(text_or_path, Path) or (
                isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
            path = Path(text_or_path)
            try:
                text = path.read_text()
            except OSError as e:
                raise IRFormatError(f"cannot read IR file {str(path)!r}: {e.strerror}") from None
        else:
            text = str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IRFormatError(f"IR JSON is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Graph:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

