"""The CLI's planning flags (modelparallel/cli/_options.py) follow PlanConfig's fields (Note
[planning options] in modelparallel/plan_config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from modelparallel.cli import _build_parser
from modelparallel.cli._options import FLAG_OF
from modelparallel.plan import PlanConfig


def _flags(command: str) -> dict[str, str]:
    """Option string to argparse dest, for one subcommand."""
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    cmd = sub.choices[command]  # type: ignore[index]
    return {o: a.dest for a in cmd._actions for o in a.option_strings}


@pytest.mark.parametrize("command", ["build", "compare"])
def test_every_plan_config_field_has_its_flag(command: str) -> None:
    flags = _flags(command)
    for f in dataclasses.fields(PlanConfig):
        flag = FLAG_OF.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in flags, f"PlanConfig.{f.name} has no {flag} flag on '{command}'"
        assert flags[flag] == f.name, (flag, flags[flag])
