"""Device specifications: how fast a device computes and moves data, and how much it holds.

Built-in specs (``cpu``, ``v100``, ``a100``, ``h100``, ``h200``) carry vendor peak figures scaled
by achievable fractions (Note [achievable fractions]); ``partition-plan calibrate`` measures a real
device and writes a spec JSON that :func:`load_device_spec` reads.

Note [achievable fractions]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Vendor peaks are never reached by real kernels. A built-in spec stores the peak and two
efficiencies: ``matmul_efficiency`` for dense matrix ops and ``memory_efficiency`` for bandwidth
bound ops. The roofline uses ``peak * efficiency``. Calibrated specs store measured throughput as
the peak and set both efficiencies to 1.0.

Example:
    >>> spec = get_device_spec("h100")
    >>> spec.memory_bytes // 2**30
    80
    >>> round(spec.flops_per_second("bfloat16") / 1e12)
    693
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from modelparallel._jsonfile import check_envelope, read_json_file, write_text_atomic
from modelparallel.cost_model.op_table import OpTable, builtin_op_table, load_op_table
from modelparallel.errors import ConfigError
from modelparallel.units import GIB as _GIB
from modelparallel.units import parse_bytes

__all__ = [
    "BUILTIN_DEVICES",
    "DeviceSpec",
    "DeviceArg",
    "DevicesArg",
    "get_device_spec",
    "load_device_spec",
    "parse_bytes",
    "save_device_spec",
    "stage_devices",
]




@dataclass(frozen=True)
class DeviceSpec:
    """What the cost model needs to know about one device and its links.

    Attributes:
        name: A label (``"h100"``, ``"cpu"``, or a calibrated device's name).
        peak_flops: Peak dense FLOP/s per dtype name (``"float32"``, ``"bfloat16"``, ...).
        memory_bandwidth: Device memory bandwidth in bytes/s.
        memory_bytes: Memory capacity in bytes available to one pipeline stage.
        link_bandwidth: Point-to-point bandwidth to a neighbouring stage, bytes/s, one direction.
        link_latency: Fixed cost of one point-to-point message, seconds.
        matmul_efficiency: Fraction of ``peak_flops`` dense ops reach (Note [achievable fractions]).
        memory_efficiency: Fraction of ``memory_bandwidth`` bandwidth-bound ops reach.
        kernel_overhead: Fixed time per op launch, seconds (CPU dispatch or GPU launch latency).
        extra: Free-form facts about the spec (what was measured, versions).
        op_table: The device kind's op table, which makes the analytic cost model the default
            (Note [analytic cost model] in ``analytic.py``): a built-in table's name
            (``"h200"``) or an op-table JSON path (relative paths are read from the spec
            file's folder); ``""``: none, the roofline.
    """

    name: str
    peak_flops: Mapping[str, float]
    memory_bandwidth: float
    memory_bytes: int
    link_bandwidth: float
    link_latency: float = 10e-6
    matmul_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    kernel_overhead: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    op_table: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", {str(k): float(v) for k, v in self.peak_flops.items()})
        object.__setattr__(self, "extra", dict(self.extra))
        if not self.peak_flops or "float32" not in self.peak_flops:
            raise ConfigError(
                f"device {self.name!r}: peak_flops must give at least 'float32'; got "
                f"{sorted(self.peak_flops)}")
        for k, v in self.peak_flops.items():
            if v <= 0:
                raise ConfigError(f"device {self.name!r}: peak_flops[{k!r}] = {v} must be > 0")
        for attr in ("memory_bandwidth", "link_bandwidth", "memory_bytes"):
            if getattr(self, attr) <= 0:
                raise ConfigError(
                    f"device {self.name!r}: {attr} = {getattr(self, attr)} must be > 0")
        if self.link_latency < 0 or self.kernel_overhead < 0:
            raise ConfigError(f"device {self.name!r}: latencies must be >= 0")
        for attr in ("matmul_efficiency", "memory_efficiency"):
            v = getattr(self, attr)
            if not 0 < v <= 1:
                raise ConfigError(f"device {self.name!r}: {attr} = {v} must be in (0, 1]")
        object.__setattr__(self, "memory_bytes", int(self.memory_bytes))

    def ops(self) -> OpTable | None:
        """The op table :attr:`op_table` names (read once per path), or None.

        Raises:
            ConfigError: if it names no built-in table and no readable table file.

        Example:
            >>> get_device_spec("h200").ops() is not None, get_device_spec("v100").ops()
            (True, None)
        """
        if not self.op_table:
            return None
        return _op_table(self.op_table)

    def flops_per_second(self, dtype: str) -> float:
        """Achievable dense FLOP/s for ``dtype``; unknown dtypes fall back to float32."""
        peak = self.peak_flops.get(dtype)
        if peak is None and dtype in ("float16", "bfloat16"):
            peak = self.peak_flops.get("bfloat16" if dtype == "float16" else "float16")
        if peak is None:
            peak = self.peak_flops["float32"]
        return peak * self.matmul_efficiency

    @property
    def bytes_per_second(self) -> float:
        """Achievable memory bandwidth in bytes/s."""
        return self.memory_bandwidth * self.memory_efficiency

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to send ``nbytes`` to a neighbouring stage (latency + bytes/bandwidth);
        zero bytes cost nothing."""
        if nbytes <= 0:
            return 0.0
        return self.link_latency + nbytes / self.link_bandwidth

    def with_memory(self, memory_bytes: int) -> DeviceSpec:
        """The same device with another memory capacity."""
        return replace(self, memory_bytes=int(memory_bytes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data; :meth:`from_dict` reads it back."""
        d = asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        if not d["extra"]:
            del d["extra"]
        if not d["op_table"]:
            del d["op_table"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSpec:
        """Build a spec from :meth:`to_dict` data; memory sizes may be strings like ``"80GiB"``.

        Raises:
            ConfigError: on a missing or invalid field.
        """
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"device spec has unknown fields {unknown}; known fields: {sorted(known)}")
        d = dict(data)
        try:
            for k in ("memory_bytes",):
                if isinstance(d.get(k), str):
                    d[k] = parse_bytes(d[k])
            for k in ("memory_bandwidth", "link_bandwidth"):
                if isinstance(d.get(k), str):
                    d[k] = float(parse_bytes(d[k].removesuffix("/s")))
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"device spec is missing a field or has a wrong type: {e}") from None


def _spec(name: str, fp32: float, bf16: float, bw: float, mem_gib: float, link: float,
          latency: float, mm_eff: float, mem_eff: float, overhead: float) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        peak_flops={"float32": fp32, "bfloat16": bf16, "float16": bf16},
        memory_bandwidth=bw,
        memory_bytes=int(mem_gib * _GIB),
        link_bandwidth=link,
        link_latency=latency,
        matmul_efficiency=mm_eff,
        memory_efficiency=mem_eff,
        kernel_overhead=overhead,
    )


#: Built-in device specs. GPU peaks are dense tensor-core figures (fp32 means TF32 where the
#: hardware has it, as PyTorch uses for matmuls with ``allow_tf32``; plain-fp32 users should
#: calibrate). Links are NVLink per direction. ``cpu`` describes a small server CPU with stages
#: exchanging data through shared memory (gloo over loopback).
BUILTIN_DEVICES: Mapping[str, DeviceSpec] = {
    "cpu": _spec("cpu", 100e9, 50e9, 20e9, 16, 2e9, 50e-6, 0.6, 0.6, 5e-6),
    "v100": _spec("v100", 15.7e12, 125e12, 900e9, 32, 150e9, 10e-6, 0.7, 0.8, 5e-6),
    "a100": _spec("a100", 156e12, 312e12, 2.0e12, 80, 300e9, 8e-6, 0.75, 0.8, 5e-6),
    "h100": _spec("h100", 494.7e12, 989.4e12, 3.35e12, 80, 450e9, 8e-6, 0.7, 0.8, 4e-6),
    "h200": replace(_spec("h200", 494.7e12, 989.4e12, 4.8e12, 141, 450e9, 8e-6, 0.7, 0.8, 4e-6),
                    op_table="h200"),
}


@functools.cache
def _op_table(name: str) -> OpTable:
    if "/" not in name and not name.endswith(".json"):
        table = builtin_op_table(name)
        if table is None:
            raise ConfigError(f"no built-in op table {name!r}; give an op-table JSON path "
                              "(write one with 'partition-plan calibrate --ops FILE')")
        return table
    return load_op_table(name)


def get_device_spec(name_or_path: str | Path | DeviceSpec) -> DeviceSpec:
    """A built-in spec by name, or a spec read from a JSON file path.

    Raises:
        ConfigError: if the name is not built in and is not a readable spec file.

    Example:
        >>> get_device_spec("a100").name
        'a100'
    """
    if isinstance(name_or_path, DeviceSpec):
        return name_or_path
    key = str(name_or_path)
    if key.lower() in BUILTIN_DEVICES:
        return BUILTIN_DEVICES[key.lower()]
    if key.endswith(".json") or Path(key).is_file():
        return load_device_spec(key)
    raise ConfigError(
        f"unknown device {key!r}; use one of {sorted(BUILTIN_DEVICES)} or a spec JSON file "
        "(write one with 'partition-plan calibrate')")


#: One device for every stage, or one per stage: a built-in name, a spec file or a spec.
DeviceArg = DeviceSpec | str | Path
DevicesArg = DeviceArg | Sequence[DeviceArg]


def stage_devices(devices: DevicesArg, partitions: int, *, memory: int | str | None = None,
                  what: str = "devices") -> tuple[DeviceSpec, ...]:
    """One :class:`DeviceSpec` per stage: one device for every stage or one per stage, with
    each device's memory replaced by ``memory`` when given (Note [planning options] in
    ``modelparallel/plan_config.py``: the CLI, the Python front end and the partitioner all use this).

    Args:
        devices: A device (name, spec file, spec) or a sequence of one or ``partitions`` of
            them.
        partitions: Pipeline stages.
        memory: Memory per device in bytes or as a size (``"80GiB"``), overriding the specs'.
        what: Names the option in errors (``"--device"``, ``"device_spec"``).

    Raises:
        ConfigError: if a sequence has neither one nor ``partitions`` devices, a name is
            unknown, or ``memory`` is not a size.

    Example:
        >>> [d.name for d in stage_devices("a100", 2)]
        ['a100', 'a100']
        >>> stage_devices(["cpu", "h100"], 2, memory="1GiB")[1].memory_bytes
        1073741824
    """
    if isinstance(devices, DeviceSpec | str | Path):
        specs: tuple[DeviceSpec, ...] = (get_device_spec(devices),)
    else:
        specs = tuple(get_device_spec(d) for d in devices)
    if len(specs) not in (1, partitions):
        raise ConfigError(
            f"{what}: got {len(specs)} devices for {partitions} stages; give one device for "
            f"every stage or exactly one per stage ({partitions})")
    if memory is not None:
        size = parse_bytes(memory)
        specs = tuple(s.with_memory(size) for s in specs)
    return specs * partitions if len(specs) == 1 else specs


#: The ``format`` of device-spec files ``partition-plan calibrate`` writes (Note [file envelope]
#: in ``modelparallel/_jsonfile.py``), and the versions this release reads.
DEVICE_SPEC_FORMAT = "modelparallel.device_spec"
_DEVICE_SPEC_VERSIONS = (1,)


def save_device_spec(spec: DeviceSpec, path: str | Path) -> Path:
    """Write ``spec`` as a device-spec file (with its format and version), atomically.

    Example:
        >>> import tempfile
        >>> out = save_device_spec(get_device_spec("h100"), Path(tempfile.mkdtemp()) / "d.json")
        >>> load_device_spec(out).name
        'h100'
    """
    data = {"format": DEVICE_SPEC_FORMAT, "version": _DEVICE_SPEC_VERSIONS[-1], **spec.to_dict()}
    return write_text_atomic(path, json.dumps(data, indent=1), "device spec")


def load_device_spec(path: str | Path) -> DeviceSpec:
    """Read a device spec JSON file (as written by ``partition-plan calibrate``, or a bare
    object of :class:`DeviceSpec`'s fields written by hand).

    Raises:
        ConfigError: if the file is missing, not JSON, of another format or version, or not
            a valid spec.
    """
    data = read_json_file(path, "device spec")
    if isinstance(data, dict) and "device" in data and isinstance(data["device"], dict):
        data = data["device"]
    if not isinstance(data, dict):
        raise ConfigError(f"device spec {str(path)!r} must hold a JSON object")
    if "format" in data or "version" in data:  # Note [file envelope]
        check_envelope(data, fmt=DEVICE_SPEC_FORMAT, versions=_DEVICE_SPEC_VERSIONS,
                       what=f"device spec {str(path)!r}",
                       hint="(write one with 'partition-plan calibrate -o FILE', or give a "
                            "bare object of the spec's fields)",
                       version_hint="Calibrate the device again with this release")
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
    table = data.get("op_table")
    if isinstance(table, str) and (table.endswith(".json") or "/" in table):
        relative = Path(path).parent / table
        if not Path(table).is_absolute() and relative.is_file():
            data = {**data, "op_table": str(relative)}
    return DeviceSpec.from_dict(data)
