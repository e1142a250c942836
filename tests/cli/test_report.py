"""``partition-plan report``: writes the page; a missing report extra is one line and status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from modelparallel import PlanConfig
from modelparallel.cli import main
from modelparallel.cost_model import get_device_spec
from modelparallel.partitioner import partition
from modelparallel.partitioner._synthetic import chain_graph


def _plan_file(tmp_path: Path) -> Path:
    plan = partition(chain_graph(6), PlanConfig(partitions=2, microbatches=2, time_limit=5),
                     [get_device_spec("h100")] * 2)
    return plan.save(tmp_path / "plan.json")


def test_report_writes_one_html_file(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(_plan_file(tmp_path)), "-o", str(out), "--depth", "1"]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script src=" not in text


def test_report_without_plotly_says_which_extra(tmp_path: Path, capsys: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("plotly", "plotly.offline"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    assert main(["report", str(_plan_file(tmp_path)), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "modelparallel[report]" in err and len(err.strip().splitlines()) == 1
