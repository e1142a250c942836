"""``partition-plan``: build a partition plan offline, inspect it, compare planners, show stage code.

Commands:

- ``build MODEL ... -o plan.json``: trace, cost and partition a model; write the plan.
- ``inspect plan.json [--stage K] [--node NAME]``: per-stage table, estimated timeline and
  bottleneck; a stage's nodes; why a node sits where it does.
- ``compare MODEL ...``: the ILP beside every baseline on the same graph and cost model.
- ``report plan.json -o report.html [--trace trace.json]``: one self-contained HTML page: the
  estimated timeline of both schedules, memory per stage, the graph coloured by stage, the tables;
  with a measured trace (``pipeline(..., trace=DIR)``) the measured timeline under the estimate.
- ``codegen plan.json --stage K``: the generated code of one stage.
- ``calibrate -o spec.json``: measure this machine's device into a spec ``build --device`` reads;
  with ``--ops ops.json`` also the op table of the analytic cost model, which the spec names;
  with ``--model MODEL --ops-out ops.json`` also the time of every node of that model on it.
- ``build MODEL --measured ops.json`` (or ``--profile``): plan with measured node times instead of
  the roofline (profiling mode; Note [profiling isolated nodes] in ``cost_model/measure/isolated.py``).

``MODEL`` is ``pkg.module:factory``, ``path/to/file.py:factory``, or an IR JSON file. A factory
returns an ``nn.Module`` (give ``--input-shape``/``--input``), a
:class:`modelparallel.models.ModelCase`, or a ``(module, example_inputs)`` pair.

Errors in what the user gave (a bad flag, a missing file, an infeasible plan) print one line to
stderr and exit with status 2, without a traceback; ``--debug`` shows the traceback.

Example:
    >>> main(["build", "no_such_module:factory", "--partitions", "2", "-o", "x.json"])
    2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from modelparallel.cli._commands import (
    _cmd_build,
    _cmd_calibrate,
    _cmd_codegen,
    _cmd_compare,
    _cmd_inspect,
)
from modelparallel.cli._options import _add_model_args, _add_plan_args, _add_split_args
from modelparallel.cli._report import _add_report_parser
from modelparallel.errors import ModelParallelError

__all__ = ["main"]

_PROG = "partition-plan"


class _UsageError(ModelParallelError, ValueError):
    """A command-line argument is wrong."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> _Parser:
    parser = _Parser(prog=_PROG, description="Plan, inspect and compare pipeline partitions.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="trace, cost and partition a model; write a plan")
    _add_model_args(b)
    _add_plan_args(b)
    b.add_argument("-o", "--output", required=True, help="plan file to write")
    b.add_argument("--measured", default=None, metavar="OPS.json",
                   help="node times measured by 'calibrate --model MODEL --ops-out OPS.json' "
                        "(same model, inputs, dtype, microbatches) replace the roofline")
    b.add_argument("--profile", action="store_true",
                   help="time every node on this machine first and plan with those times")
    b.add_argument("--profile-device", default=None, metavar="DEVICE",
                   help="device for --profile (default: cuda if present, else cpu)")
    b.set_defaults(func=_cmd_build)

    i = sub.add_parser("inspect", help="show a plan")
    i.add_argument("plan", help="plan JSON file")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--stage", type=int, default=None, help="list the nodes of stage K")
    g.add_argument("--node", default=None, help="explain where node NAME went and why")
    g.add_argument("--json", action="store_true", help="print the plan JSON")
    i.set_defaults(func=_cmd_inspect)

    c = sub.add_parser("compare", help="the ILP beside every baseline, in one table")
    _add_model_args(c)
    _add_plan_args(c)
    c.add_argument("-o", "--output", default=None, help="also write every plan to this JSON")
    c.set_defaults(func=_cmd_compare)

    _add_report_parser(sub)

    k = sub.add_parser("codegen", help="print the generated code of one stage")
    k.add_argument("plan", help="plan JSON file")
    k.add_argument("--stage", type=int, required=True)
    k.add_argument("--model", default=None, help="MODEL, if not the one recorded in the plan")
    k.add_argument("--input-shape", action="append", default=[])
    k.add_argument("--input", action="append", default=[])
    _add_split_args(k)
    k.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto")
    k.add_argument("--dtype", default=None, help="the dtype the plan was built with (--dtype)")
    k.set_defaults(func=_cmd_codegen)

    cal = sub.add_parser("calibrate", help="measure this machine's device into a spec JSON")
    cal.add_argument("-o", "--output", required=True, help="spec JSON to write")
    cal.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    cal.add_argument("--name", default=None, help="name to record in the spec")
    cal.add_argument("--quick", action="store_true", help="fewer, smaller measurements")
    cal.add_argument("--ops", default=None, metavar="FILE",
                     help="also measure the op table of the analytic cost model (per-op-kind "
                          "device and host times) into FILE; the spec names it, so 'build "
                          "--device SPEC' plans with it")
    cal.add_argument("--model", default=None, metavar="MODEL",
                     help="also time every node of this model on the device (with --ops-out)")
    cal.add_argument("--ops-out", default=None, metavar="FILE",
                     help="node-times JSON to write for --model ('build --measured' reads it)")
    cal.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                     help="a positional example input of the full batch (as for build)")
    cal.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                     help="a keyword example input (as for build)")
    _add_split_args(cal)
    cal.add_argument("--microbatches", "-m", type=int, default=1,
                     help="microbatches the batch is split into; nodes are timed on one")
    cal.add_argument("--dtype", default=None, help="cast the model first (e.g. bfloat16)")
    cal.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto")
    cal.add_argument("--warmup", type=int, default=2, help="untimed calls per node")
    cal.add_argument("--repeat", type=int, default=5, help="timed calls per node")
    cal.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``partition-plan`` with ``argv``; return the exit status.

    User errors print one line, ``partition-plan: error: ...``, and return 2.
    """
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _build_parser().parse_args(argv)
        # Tables keep their columns when written to a file or pipe instead of wrapping at 80.
        width = None if sys.stdout.isatty() else 160
        return int(args.func(args, Console(highlight=False, width=width),
                             Console(stderr=True, highlight=False)))
    except ModelParallelError as e:
        if debug:
            raise
        _one_line(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _one_line("interrupted")
        return 130
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except Exception as e:
        if debug:
            raise
        _one_line(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                  "traceback, and please report it)")
        return 1


def _one_line(message: str) -> None:
    text = " ".join(str(message).split())
    print(f"{_PROG}: {text}", file=sys.stderr)
