"""The op table: per-op-kind device and host times of one device kind, measured once by
``partition-plan calibrate --ops`` (:mod:`modelparallel.cost_model.measure.ops`) and read by the
analytic cost model (:mod:`modelparallel.cost_model.analytic`) with no torch.

Note [op table]
~~~~~~~~~~~~~~~
An op table holds, for each op family (``matmul``, ``conv_k3``, ``attention_causal``,
``layer_norm``, ``relu``, ...; the families and how an IR node maps to one are in Note [analytic
cost model] in ``analytic.py``), what one call costs on the device kind it was measured on:

- **device time**, forward and backward, as a function of the op's size. Compute-bound families
  store a :class:`Grid`: seconds per unit of work (matmul and convolution: ``M*N*K`` of the
  product or implicit GEMM; attention: ``batch*heads*Sq*Skv*D``) on three log-spaced axes
  (matmul: M, N, K; convolution: M = batch*Hout*Wout, N = Cout, K = Cin*kh*kw; attention:
  batch*heads, sequence, head dim), read by trilinear interpolation of its logarithm and clamped
  at the edges. Bandwidth-bound families store a :class:`Curve`: seconds against the bytes of
  the op's largest tensor, piecewise linear in log-log (so a small op costs its launch floor and
  a large one its achieved bandwidth), extrapolated in proportion beyond the largest size.
- **host time**, forward and backward: seconds the host spends queueing one call in a training
  step (the op called with autograd recording; the backward per node of a chain of them), as
  profiling mode's in-context host times measure them (Notes [in-context forward host time],
  [in-context backward host time]); plus, per table, the extra host time of calling an
  ``nn.Module`` rather than the op (``module_call``) and each stage's call overhead (Note [call
  overhead] in ``replay.py``).

The file is a versioned envelope (Note [file envelope] in ``modelparallel/_jsonfile.py``),
``format: modelparallel.op_table``. The tables for the built-in device kinds ship with the
package (``modelparallel/cost_model/data/<name>-ops.json``; :func:`builtin_op_table`).

Example:
    >>> c = Curve((1e3, 1e6), (1e-5, 1e-4))
    >>> round(c(1e3), 6), round(c(2e6), 6)   # the floor below, in proportion above
    (1e-05, 0.0002)
    >>> g = Grid(((1.0, 4.0), (1.0,), (1.0,)), (2.0, 8.0))
    >>> round(g(2.0, 1.0, 1.0), 6)            # geometric mean halfway in log space
    4.0
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from modelparallel._jsonfile import check_envelope, read_json_file, write_text_atomic
from modelparallel.errors import ConfigError

__all__ = [
    "OP_TABLE_FORMAT",
    "Curve",
    "Grid",
    "OpEntry",
    "OpTable",
    "builtin_op_table",
    "load_op_table",
]

#: ``format`` field of an op-table JSON file.
OP_TABLE_FORMAT = "modelparallel.op_table"
_OP_TABLE_VERSION = 1


def _positive(values: Sequence[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or not all(v > 0 and math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite numbers > 0, got {list(out)[:4]}")
    return out


@dataclass(frozen=True)
class Curve:
    """Seconds as a function of a size (bytes), piecewise linear in log-log (Note [op table]).

    Attributes:
        sizes: Increasing sizes the op was measured at.
        seconds: Seconds per call at each size.
    """

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        sizes = _positive(self.sizes, "Curve.sizes")
        seconds = _positive(self.seconds, "Curve.seconds")
        if len(sizes) != len(seconds) or any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ConfigError("Curve needs one time per size and strictly increasing sizes; "
                              f"got {len(sizes)} sizes, {len(seconds)} times")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "seconds", seconds)

    def __call__(self, size: float) -> float:
        """Seconds at ``size``: the first time below the first size, in proportion beyond the
        last, log-log interpolation between."""
        xs, ys = self.sizes, self.seconds
        if size <= xs[0]:
            return ys[0]
        if size >= xs[-1]:
            return ys[-1] * size / xs[-1]
        i = bisect.bisect_right(xs, size)
        t = (math.log(size) - math.log(xs[i - 1])) / (math.log(xs[i]) - math.log(xs[i - 1]))
        return math.exp((1 - t) * math.log(ys[i - 1]) + t * math.log(ys[i]))

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}


@dataclass(frozen=True)
class Grid:
    """A positive value on three log-spaced axes, read by trilinear interpolation of its
    logarithm, clamped at the edges (Note [op table]).

    Attributes:
        axes: Three increasing sequences of positive coordinates.
        values: ``len(axes[0]) * len(axes[1]) * len(axes[2])`` values, the last axis fastest.
    """

    axes: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.axes) != 3:
            raise ConfigError(f"Grid needs three axes, got {len(self.axes)}")
        axes = tuple(_positive(a, "Grid axis") for a in self.axes)
        for a in axes:
            if any(y <= x for x, y in itertools.pairwise(a)):
                raise ConfigError(f"Grid axes must increase strictly, got {list(a)}")
        values = _positive(self.values, "Grid.values")
        if len(values) != len(axes[0]) * len(axes[1]) * len(axes[2]):
            raise ConfigError(f"Grid has {len(values)} values for axes of "
                              f"{[len(a) for a in axes]} points")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "values", values)

    def _at(self, i: int, j: int, k: int) -> float:
        n1, n2 = len(self.axes[1]), len(self.axes[2])
        return math.log(self.values[(i * n1 + j) * n2 + k])

    @staticmethod
    def _bracket(axis: tuple[float, ...], x: float) -> tuple[int, int, float]:
        if len(axis) == 1 or x <= axis[0]:
            return 0, 0, 0.0
        if x >= axis[-1]:
            return len(axis) - 1, len(axis) - 1, 0.0
        i = bisect.bisect_right(axis, x)
        t = (math.log(x) - math.log(axis[i - 1])) / (math.log(axis[i]) - math.log(axis[i - 1]))
        return i - 1, i, t

    def __call__(self, a: float, b: float, c: float) -> float:
        (i0, i1, ti), (j0, j1, tj), (k0, k1, tk) = (
            self._bracket(ax, x) for ax, x in zip(self.axes, (a, b, c)))
        total = 0.0
        for i, wi in ((i0, 1 - ti), (i1, ti)):
            for j, wj in ((j0, 1 - tj), (j1, tj)):
                for k, wk in ((k0, 1 - tk), (k1, tk)):
                    w = wi * wj * wk
                    if w:
                        total += w * self._at(i, j, k)
        return math.exp(total)

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [list(a) for a in self.axes], "values": list(self.values)}


def _device_model(data: Any, what: str) -> Curve | Grid | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be an object with sizes/seconds or axes/values")
    if "axes" in data:
        return Grid(tuple(tuple(a) for a in data["axes"]), tuple(data["values"]))  # type: ignore[arg-type]
    return Curve(tuple(data["sizes"]), tuple(data["seconds"]))


@dataclass(frozen=True)
class OpEntry:
    """What one call of an op family costs (Note [op table]).

    Attributes:
        forward: Device seconds of the forward: a :class:`Curve` over bytes, or a
            :class:`Grid` of seconds per unit of work.
        backward: The same for the backward (all float inputs needing gradients); None: the
            family has no backward.
        host_forward: Host seconds to queue the forward with autograd recording.
        host_backward: Host seconds autograd's engine spends on its backward, per node.
    """

    forward: Curve | Grid
    backward: Curve | Grid | None = None
    host_forward: float = 0.0
    host_backward: float = 0.0

    def __post_init__(self) -> None:
        if not (self.host_forward >= 0 and self.host_backward >= 0):
            raise ConfigError(f"OpEntry host times must be seconds >= 0, got "
                              f"{self.host_forward}, {self.host_backward}")
        if self.backward is not None and type(self.backward) is not type(self.forward):
            raise ConfigError("OpEntry forward and backward must both be curves or both grids")

    def to_dict(self) -> dict[str, Any]:
        return {"forward": self.forward.to_dict(),
                "backward": None if self.backward is None else self.backward.to_dict(),
                "host_forward": self.host_forward, "host_backward": self.host_backward}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], what: str) -> OpEntry:
        try:
            forward = _device_model(data["forward"], f"{what}.forward")
            assert forward is not None
            return cls(forward, _device_model(data.get("backward"), f"{what}.backward"),
                       float(data.get("host_forward", 0.0)), float(data.get("host_backward", 0.0)))
        except (KeyError, TypeError, AssertionError) as e:
            raise ConfigError(f"{what} is not a valid op entry ({type(e).__name__}: {e}); "
                              "write the table with 'partition-plan calibrate --ops'") from None


@dataclass(frozen=True)
class OpTable:
    """Per-op-family costs of one device kind (Note [op table]).

    Attributes:
        device: What was measured (e.g. ``"NVIDIA H200"``).
        ops: Family name to its :class:`OpEntry`; compute-bound families are keyed
            ``family:dtype`` (``matmul:bfloat16``), bandwidth-bound ones by family alone.
        module_call: Extra host seconds of calling an ``nn.Module`` rather than its op.
        call_forward: Host seconds each stage pays per microbatch calling its module (Note
            [call overhead] in ``replay.py``).
        call_backward: The same for calling autograd's backward.
        metadata: How it was measured (torch version, dtype, date, grid sizes).
    """

    device: str
    ops: Mapping[str, OpEntry]
    module_call: float = 0.0
    call_forward: float = 0.0
    call_backward: float = 0.0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", dict(self.ops))
        object.__setattr__(self, "metadata", dict(self.metadata))
        for attr in ("module_call", "call_forward", "call_backward"):
            if not getattr(self, attr) >= 0:
                raise ConfigError(f"OpTable.{attr} = {getattr(self, attr)} must be >= 0")

    def get(self, family: str, dtype: str | None = None) -> OpEntry | None:
        """The entry of ``family`` (for ``dtype``, if it is keyed by dtype; float16 and
        bfloat16 stand in for each other), or None."""
        if dtype is None:
            return self.ops.get(family)
        for d in (dtype, {"float16": "bfloat16", "bfloat16": "float16"}.get(dtype, "")):
            entry = self.ops.get(f"{family}:{d}")
            if entry is not None:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON file's content (:func:`load_op_table` reads it)."""
        return {"format": OP_TABLE_FORMAT, "version": _OP_TABLE_VERSION, "device": self.device,
                "module_call": self.module_call, "call_forward": self.call_forward,
                "call_backward": self.call_backward, "metadata": dict(self.metadata),
                "ops": {k: v.to_dict() for k, v in sorted(self.ops.items())}}

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON; returns the path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1), "op table")

    @classmethod
    def from_dict(cls, data: Any, what: str = "op table") -> OpTable:
        """Read :meth:`to_dict` data.

        Raises:
            ConfigError: on a wrong format, version or entry.
        """
        d = check_envelope(data, fmt=OP_TABLE_FORMAT, versions=(_OP_TABLE_VERSION,), what=what,
                           hint="(write one with 'partition-plan calibrate --ops FILE')")
        ops = d.get("ops")
        if not isinstance(ops, Mapping):
            raise ConfigError(f"{what} has no 'ops' object")
        return cls(device=str(d.get("device", "")),
                   ops={k: OpEntry.from_dict(v, f"{what} op {k!r}") for k, v in ops.items()},
                   module_call=float(d.get("module_call", 0.0)),
                   call_forward=float(d.get("call_forward", 0.0)),
                   call_backward=float(d.get("call_backward", 0.0)),
                   metadata=d.get("metadata") or {})


def load_op_table(path: str | Path) -> OpTable:
    """Read an op-table JSON file (as ``partition-plan calibrate --ops`` writes it).

    Raises:
        ConfigError: if the file is missing, not JSON, or not a valid table.
    """
    return OpTable.from_dict(read_json_file(path, "op table"), f"op table {str(path)!r}")


@cache
def builtin_op_table(name: str) -> OpTable | None:
    """The op table shipped for built-in device kind ``name`` (package data), or None.

    Example:
        >>> builtin_op_table("v100") is None
        True
    """
    res = resources.files("modelparallel.cost_model").joinpath("data", f"{name}-ops.json")
    if not res.is_file():
        return None
    return OpTable.from_dict(json.loads(res.read_text()), f"built-in op table {name!r}")
