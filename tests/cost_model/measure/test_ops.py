"""Measuring an op table (Note [op calibration]) on the CPU, and the CLI that writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelparallel.cli import main
from modelparallel.cost_model import load_device_spec
from modelparallel.cost_model.analytic import bandwidth_families
from modelparallel.cost_model.measure.ops import calibrate_ops, compute_families
from modelparallel.errors import ConfigError


def test_quick_cpu_table_holds_every_family() -> None:
    table = calibrate_ops("cpu", quick=True)
    keys = set(table.ops)
    assert {f"{f}:float32" for f in compute_families()} <= keys
    assert set(bandwidth_families()) <= keys
    assert table.ops["layer_norm"].forward(1e5) > 0
    assert table.metadata["quick"] is True


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown op families"):
        calibrate_ops("cpu", quick=True, families=["nosuch"])


@pytest.mark.slow
def test_calibrate_ops_writes_a_table_the_spec_names(tmp_path: Path) -> None:
    spec, ops = tmp_path / "spec.json", tmp_path / "ops.json"
    assert main(["calibrate", "-o", str(spec), "--quick", "--device", "cpu",
                 "--ops", str(ops)]) == 0
    assert json.loads(spec.read_text())["op_table"] == "ops.json"
    table = load_device_spec(spec).ops()
    assert table is not None and table.device == "cpu"
