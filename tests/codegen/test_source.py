"""Stage source code (modelparallel/codegen/source.py): Python that names the boundary values."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import pytest
import torch
from _stage_cases import Case, make_plan

from modelparallel import models
from modelparallel.codegen import build_stage, program_source, stage_source


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2() -> Case:
    return Case(lambda: models.gpt2(size="tiny", batch_size=8))


@pytest.fixture(scope="module")
def skip() -> Case:
    return Case(lambda: models.skip_mlp(batch_size=8))


@pytest.mark.parametrize("name", ["gpt2", "skip"])
def test_stage_source_is_python_naming_boundary_values(name: str,
                                                       request: pytest.FixtureRequest) -> None:
    c: Case = request.getfixturevalue(name)
    plan = make_plan(c.traced, 3, [0.3, 0.6])
    for k in range(3):
        src = stage_source(c.traced, plan, k)
        tree = ast.parse(src)
        assert src.startswith(f"# Stage {k} of 3")
        program = build_stage(c.traced, plan, k)
        forward = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
        args = [a.arg for a in forward.args.args]
        assert args == ["self"] + [program.input_names[i] for i in program.model_inputs] + [
            v.name for v in program.recv]
        for v in program.send:
            assert v.name in src
        assert program_source(program) .count("def forward") == 1
