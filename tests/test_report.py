"""Issue 13 item 11: a plan with empty stages says so in its summary, and ``pipeline()`` warns."""

from __future__ import annotations

import io
import warnings

import pytest
from _dist import cut_plan, run_ranks
from rich.console import Console

from modelparallel.report import empty_stages_note, print_summary


def _graph() -> object:
    from modelparallel import models
    from modelparallel.tracer import trace

    case = models.skip_mlp(batch_size=8)
    return trace(case.model, case.args).graph


def test_summary_names_the_empty_stages() -> None:
    plan = cut_plan(_graph(), [0.0, 0.0, 0.5])
    out = io.StringIO()
    print_summary(plan, Console(file=out, width=200))
    text = out.getvalue()
    assert "stages 0-1 are empty" in text and "use fewer partitions (2)" in text, text
    assert empty_stages_note(cut_plan(_graph(), [0.5])) is None


def empty_stage_job(rank: int, world: int) -> list[str]:
    from modelparallel import models
    from modelparallel.api import pipeline

    case = models.skip_mlp(batch_size=8)
    plan = cut_plan(_graph(), [0.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline(case.model, case.args, loss_fn=case.loss_fn, plan=plan)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.multiprocess
def test_pipeline_warns_about_empty_stages() -> None:
    texts = run_ranks(empty_stage_job, 2, timeout=120)[0].unwrap()
    assert any("stage 0 is empty" in t for t in texts), texts
