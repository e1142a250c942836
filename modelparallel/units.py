"""Units, in one place: reading sizes (``"80GiB"``) and writing bytes, seconds and counts.

Used by the device specs, the planning options (CLI and API) and the reports.

Example:
    >>> parse_bytes("1.5GiB")
    1610612736
    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
    >>> format_seconds(0.0123)
    '12.3 ms'
    >>> format_count(2.5e9)
    '2.5B'
"""

from __future__ import annotations

import re

from modelparallel.errors import ConfigError

__all__ = ["GIB", "format_bytes", "format_count", "format_seconds", "parse_bytes"]

#: Bytes in a gibibyte.
GIB = 2**30

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """Parse a size such as ``"80GiB"``, ``"16 GB"``, ``"512MiB"`` or ``1024`` into bytes.

    Raises:
        ConfigError: if the text is not a size.

    Example:
        >>> parse_bytes("1.5GiB")
        1610612736
    """
    if isinstance(text, int | float):
        if text <= 0:
            raise ConfigError(f"size {text} must be > 0")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read size {text!r}; write a number with an optional unit, e.g. '80GiB', "
            "'16GB', '512MiB'")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"size {text!r} must be > 0")
    return value


def format_bytes(n: float) -> str:
    """Bytes in binary units with three significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_seconds(t: float) -> str:
    """Seconds in s, ms or µs, three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(t) >= scale or unit == "µs":
            v = t / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """A count with a K, M or B suffix (one decimal), e.g. FLOPs or parameters."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
