"""modelparallel.units: sizes read and written, and the common file envelope (_jsonfile)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelparallel._jsonfile import check_envelope
from modelparallel.errors import ConfigError, IRFormatError, PlanFormatError
from modelparallel.units import format_bytes, format_count, format_seconds, parse_bytes


@given(st.integers(min_value=1, max_value=2**50))
def test_format_bytes_reads_back_within_its_rounding(n: int) -> None:
    back = parse_bytes(format_bytes(n).replace(" ", ""))
    assert abs(back - n) <= max(1, 0.005 * n)


def test_formats() -> None:
    assert format_seconds(2.5e-6) == "2.5 µs" and format_seconds(1.5) == "1.5 s"
    assert format_count(1234) == "1.2K" and format_count(12) == "12"
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_bytes("many")


@pytest.mark.parametrize("error", [ConfigError, IRFormatError, PlanFormatError])
def test_envelope_raises_the_file_kind_error(error: type[Exception]) -> None:
    ok = {"format": "f", "version": 2}
    assert check_envelope(ok, fmt="f", versions=(1, 2), what="x", error=error) is ok  # type: ignore[arg-type]
    with pytest.raises(error, match="has version 3; this modelparallel reads version 1 or 2"):
        check_envelope({"format": "f", "version": 3}, fmt="f", versions=(1, 2), what="x",
                       error=error)  # type: ignore[arg-type]
    with pytest.raises(error, match="must be a JSON object"):
        check_envelope([], fmt="f", versions=(1,), what="x", error=error)  # type: ignore[arg-type]
