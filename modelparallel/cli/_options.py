"""The CLI's planning flags, built from and checked against :class:`~modelparallel.plan.PlanConfig`
(Note [planning options] in ``modelparallel/plan_config.py``)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from modelparallel.cost_model.device import DeviceSpec, stage_devices
from modelparallel.errors import ConfigError
from modelparallel.plan import (
    GRANULARITIES,
    OPTIMIZE_CHOICES,
    SCHEDULE_ALIASES,
    SOLVERS,
    TIED_CHOICES,
    PlanConfig,
)
from modelparallel.plan_config import CHECKPOINTING_CHOICES, COMMUNICATION_CHOICES, PRECISIONS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="pkg.module:factory, path/to/file.py:factory, or an IR JSON file")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="a positional example input of the FULL batch, e.g. 8,3,224,224 or "
                        "8x512:int64 (repeat for more inputs)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="a keyword example input, e.g. input_ids=8x512:int64 (repeatable)")
    _add_split_args(p)
    p.add_argument("--trace-method", choices=("auto", "fx", "export"), default="auto",
                   help="tracer path (default: fx, falling back to torch.export)")
    p.add_argument("--framework", choices=("auto", "torch", "tensorflow"), default="auto",
                   help="what MODEL's factory builds (default: detected; a Keras model is "
                        "traced with TensorFlow)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="cast the model's floating weights and inputs first (e.g. bfloat16)")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    """How the example batch is cut into the microbatch that is traced: the rules of
    ``pipeline(input_split_axes=, non_split_inputs=)`` (``runtime/microbatch.py``)."""
    p.add_argument("--split-axis", action="append", default=[], metavar="NAME=AXIS",
                   help="split input NAME (argument name or flat index) along AXIS instead "
                        "of 0, e.g. attention_mask=1 (repeatable; as input_split_axes)")
    p.add_argument("--non-split", action="append", default=[], metavar="NAME",
                   help="pass input NAME whole to every microbatch (repeatable; as "
                        "non_split_inputs)")


#: PlanConfig fields whose flag is not ``--field-name`` (tests/cli/test_options.py checks
#: that every field has its flag; Note [planning options] in ``modelparallel/plan_config.py``).
FLAG_OF = {"pins": "--pin"}


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    d = {f.name: f.default for f in fields(PlanConfig)}
    p.add_argument("--partitions", "-p", type=int, required=True,
                   help="pipeline ranks (stages, unless --virtual-stages > 1)")
    p.add_argument("--microbatches", "-m", type=int, default=d["microbatches"],
                   help="microbatches per step")
    p.add_argument("--schedule", default=d["schedule"], choices=tuple(SCHEDULE_ALIASES),
                   help="gpipe (SMP 'simple'), 1f1b (SMP 'interleaved'; with --virtual-stages > 1 "
                        "interleaved 1F1B) or zb-h1 (zero-bubble)")
    p.add_argument("--virtual-stages", "-v", type=int, default=d["virtual_stages"], metavar="V",
                   help="stages per rank: plan partitions x V stages, stage s on rank s mod "
                        "partitions (interleaved 1F1B; --schedule 1f1b only)")
    p.add_argument("--device", action="append", default=[], metavar="NAME|SPEC.json",
                   help="device for every stage, or repeat once per stage "
                        "(cpu, v100, a100, h100, h200, or a calibrated spec JSON; default h100)")
    p.add_argument("--memory", metavar="SIZE", help="memory per device, e.g. 80GiB (overrides "
                                                    "the device spec)")
    p.add_argument("--optimize", choices=OPTIMIZE_CHOICES, default=d["optimize"])
    p.add_argument("--memory-weight", type=float, default=d["memory_weight"], metavar="W",
                   help="weight of memory balance in [0, 1] (default 0.2 speed / 0.8 memory)")
    p.add_argument("--optimizer", default=d["optimizer"],
                   help="optimizer whose state is counted: sgd, momentum, adam, adamw, or bytes "
                        "per parameter")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None,
                   help=f"planning units (default {d['granularity']}; for a Keras model "
                        f"{_KERAS_DEFAULTS['granularity']}, SMP's TF rule)")
    p.add_argument("--module-depth", type=int, default=d["module_depth"],
                   help="module depth of the units with --granularity module")
    p.add_argument("--tied", choices=TIED_CHOICES, default=None,
                   help="tied parameters on several stages: replicate with gradient sync, or "
                        f"keep their readers on one stage (default {d['tied']}; for a Keras "
                        f"model {_KERAS_DEFAULTS['tied']})")
    p.add_argument(FLAG_OF["pins"], dest="pins", action="append", default=[],
                   metavar="NAME=STAGE",
                   help="pin a node or module path to a stage (repeatable)")
    p.add_argument("--solver", choices=SOLVERS, default=d["solver"])
    p.add_argument("--time-limit", type=float, default=d["time_limit"], metavar="S",
                   help=f"seconds the ILP may take (default {d['time_limit']:g})")
    p.add_argument("--checkpointing", default=d["checkpointing"], metavar="MODE|PATHS",
                   help=f"activation checkpointing: {', '.join(CHECKPOINTING_CHOICES)}, or "
                        "comma-separated module paths")
    p.add_argument("--offload-activations", action="store_true",
                   help="saved activations in host memory between forward and backward")
    p.add_argument("--precision", choices=PRECISIONS, default=d["precision"])
    p.add_argument("--active-microbatches", type=int, default=d["active_microbatches"],
                   metavar="N", help="most microbatches in flight per stage")
    p.add_argument("--data-parallel", type=int, default=d["data_parallel"], metavar="DP",
                   help="replicas of the pipeline (divides optimizer state with "
                        "--shard-optimizer-state)")
    p.add_argument("--shard-optimizer-state", action="store_true",
                   help="ZeRO-1 over the data-parallel replicas")
    p.add_argument("--communication", choices=COMMUNICATION_CHOICES,
                   default=d["communication"],
                   help="a value read several stages later: sent straight to each stage that "
                        "reads it (direct) or passed on by every stage in between (relay)")


def _config_from_args(a: argparse.Namespace) -> PlanConfig:
    """The PlanConfig of the flags: every field read from the flag of its name."""
    pins: dict[str, int] = {}
    for item in a.pins:
        key, sep, stage = item.rpartition("=")
        if not sep or not key or not stage.lstrip("-").isdigit():
            raise ConfigError(f"--pin {item!r} must look like NAME=STAGE, e.g. "
                              "transformer.h.0=0")
        pins[key] = int(stage)
    optimizer: str | float = a.optimizer
    with contextlib.suppress(ValueError):
        optimizer = float(a.optimizer)
    defaults = {f.name: f.default for f in fields(PlanConfig)}
    values = {f.name: getattr(a, f.name) for f in fields(PlanConfig)}
    values = {k: defaults[k] if v is None and k in _KERAS_DEFAULTS else v
              for k, v in values.items()}
    ck = a.checkpointing
    if isinstance(ck, str) and ck not in CHECKPOINTING_CHOICES:
        ck = tuple(x.strip() for x in ck.split(",") if x.strip())
    return PlanConfig(**{**values, "pins": pins, "optimizer": optimizer, "checkpointing": ck})


#: The planning defaults of a Keras model (what ``smp.DistributedModel`` plans: Note [layer
#: granularity] in ``modelparallel/partitioner/methods.py``), where the flag is not given.
_KERAS_DEFAULTS = {"granularity": "layer", "tied": "colocate"}


def _framework_defaults(a: argparse.Namespace, config: PlanConfig, graph: Any) -> PlanConfig:
    """``config`` with the Keras defaults for the flags not given, when ``graph`` came from
    TensorFlow: as ``smp`` plans, ``tied`` follows the granularity (``colocate`` at layer
    level, ``replicate`` at op level)."""
    import dataclasses

    if graph.metadata.get("framework") != "tensorflow":
        return config
    granularity = a.granularity or _KERAS_DEFAULTS["granularity"]
    tied = a.tied or ("colocate" if granularity == "layer" else "replicate")
    return dataclasses.replace(config, granularity=granularity, tied=tied)


def _devices_from_args(a: argparse.Namespace) -> list[DeviceSpec]:
    return list(stage_devices(a.device or ["h100"], a.partitions, memory=a.memory,
                              what="--device (give it once for every stage or once per stage)"))


def _progress_printer(status: Any, console: Any = None) -> Callable[[Any], None]:
    """Solver progress: the status line on a terminal; off one (a pipe, a CI log), where a
    status line shows nothing, a plain line at most every 2 seconds."""
    import time

    plain = console is not None and not console.is_terminal
    last = [0.0]

    def show(event: Any) -> None:
        parts = [f"{getattr(event, 'phase', '')}: {getattr(event, 'message', '')}"]
        inc, bound, gap = (getattr(event, k, None) for k in ("incumbent", "bound", "gap"))
        if inc is not None:
            parts.append(f"incumbent {inc:.4f}")
        if bound is not None:
            parts.append(f"bound {bound:.4f}")
        if gap is not None:
            parts.append(f"gap {100 * gap:.2f}%")
        if not plain:
            status.update(" | ".join(parts))
        elif time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            console.print(" | ".join(parts), markup=False, highlight=False, soft_wrap=True)
    return show
