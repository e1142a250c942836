"""The benchmarks README is generated from the committed result files and stays in step with them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _summarize() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_result_file_has_a_table() -> None:
    summarize = _summarize()
    text = summarize.readme()
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        if summarize._kind(path) is not None:
            assert f"`results/{path.name}`" in text, path.name


def test_benchmarks_readme_matches_the_results() -> None:
    """Regenerate it with ``python benchmarks/summarize.py --readme`` after a new run."""
    assert (ROOT / "benchmarks" / "README.md").read_text() == _summarize().readme()
