"""The op table (Note [op table]): curves, grids, the file envelope, the shipped tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelparallel.cost_model import get_device_spec, load_device_spec
from modelparallel.cost_model.op_table import (
    Curve,
    Grid,
    OpEntry,
    OpTable,
    builtin_op_table,
    load_op_table,
)
from modelparallel.errors import ConfigError


def _table() -> OpTable:
    c = Curve((1e3, 1e6), (1e-6, 1e-4))
    g = Grid(((1.0, 8.0), (1.0,), (1.0, 2.0)), (1.0, 2.0, 3.0, 4.0))
    return OpTable("toy", {"relu": OpEntry(c, c, 2e-6, 1e-6), "matmul:bfloat16": OpEntry(g, g)},
                   module_call=1e-6, call_forward=3e-6, metadata={"quick": True})


@given(st.floats(1.0, 1e9))
def test_curve_is_monotone_and_proportional_beyond_its_range(x: float) -> None:
    c = Curve((1e3, 1e5, 1e6), (1e-6, 2e-6, 1e-5))
    assert c(x) <= c(x * 1.5) + 1e-18
    assert c(2e6) == pytest.approx(2e-5)


@given(st.floats(0.5, 20.0), st.floats(0.5, 3.0))
def test_grid_stays_within_its_values(a: float, c: float) -> None:
    g = Grid(((1.0, 8.0), (1.0,), (1.0, 2.0)), (1.0, 2.0, 3.0, 4.0))
    assert 1.0 - 1e-9 <= g(a, 1.0, c) <= 4.0 + 1e-9
    assert g(1.0, 1.0, 1.0) == pytest.approx(1.0) and g(8.0, 5.0, 2.0) == pytest.approx(4.0)


def test_bad_curves_and_grids_are_refused() -> None:
    with pytest.raises(ConfigError, match="increasing"):
        Curve((2.0, 1.0), (1.0, 1.0))
    with pytest.raises(ConfigError, match="values for axes"):
        Grid(((1.0, 2.0), (1.0,), (1.0,)), (1.0,))
    with pytest.raises(ConfigError, match="> 0"):
        Curve((1.0,), (0.0,))


def test_table_round_trips_through_its_file(tmp_path: Path) -> None:
    t = _table()
    back = load_op_table(t.save(tmp_path / "ops.json"))
    assert back == t
    assert back.get("matmul", "float16") is back.ops["matmul:bfloat16"]
    assert back.get("matmul", "float32") is None


def test_wrong_format_or_version_names_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "ops.json"
    p.write_text(json.dumps({"format": "modelparallel.op_table", "version": 99, "ops": {}}))
    with pytest.raises(ConfigError, match="version 99"):
        load_op_table(p)
    p.write_text(json.dumps({"format": "x"}))
    with pytest.raises(ConfigError, match="calibrate --ops"):
        load_op_table(p)


def test_h200_ships_a_measured_table() -> None:
    table = builtin_op_table("h200")
    assert table is not None and "H200" in table.device
    assert not table.metadata.get("derived")
    assert get_device_spec("h200").ops() is table
    for family in ("matmul:bfloat16", "attention_causal:bfloat16", "conv_k3:bfloat16",
                   "layer_norm", "batch_norm", "add", "view"):
        assert family in table.ops


def test_spec_file_names_its_table_relative_to_itself(tmp_path: Path) -> None:
    _table().save(tmp_path / "ops.json")
    spec = get_device_spec("h100").to_dict() | {"op_table": "ops.json", "name": "mine"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loaded = load_device_spec(tmp_path / "spec.json")
    table = loaded.ops()
    assert table is not None and table.device == "toy"
    assert "op_table" not in get_device_spec("a100").to_dict()


def test_unknown_builtin_table_is_an_error() -> None:
    spec = get_device_spec("a100")
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no built-in op table"):
        replace(spec, op_table="nosuch").ops()
