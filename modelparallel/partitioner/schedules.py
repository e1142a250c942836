"""Every schedule planned for the same graph: which one a user should pick.

:func:`compare_schedules` plans the graph once per schedule (GPipe, 1F1B, interleaved 1F1B
with ``v`` virtual stages, ZB-H1) with the same options, devices and cost model, so the plans'
estimated step times (:func:`modelparallel.partitioner.evaluate.step_time`) compare the
schedules on equal terms; ``partition-plan compare`` prints them beside the planners.

Example:
    >>> from modelparallel.partitioner._synthetic import transformer_graph
    >>> from modelparallel.plan import PlanConfig
    >>> plans = compare_schedules(transformer_graph(4), PlanConfig(2, microbatches=4), "h100")
    >>> list(plans)
    ['gpipe', '1f1b', '1f1b v=2', 'zb-h1']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from modelparallel.cost_model import GraphCosts
from modelparallel.errors import ConfigError, InfeasiblePlanError
from modelparallel.ir import Graph
from modelparallel.partitioner.problem import DevicesArg
from modelparallel.partitioner.solve import partition
from modelparallel.plan import Plan, PlanConfig

__all__ = ["SCHEDULE_CHOICES", "compare_schedules", "schedule_label"]

#: The ``(schedule, virtual stages)`` pairs :func:`compare_schedules` plans by default.
SCHEDULE_CHOICES: tuple[tuple[str, int], ...] = (("gpipe", 1), ("1f1b", 1), ("1f1b", 2),
                                                 ("zb-h1", 1))


def schedule_label(schedule: str, virtual_stages: int) -> str:
    """``"1f1b v=2"`` for interleaved 1F1B, else the schedule's name."""
    return f"{schedule} v={virtual_stages}" if virtual_stages > 1 else schedule


def compare_schedules(graph: Graph, config: PlanConfig, devices: DevicesArg, *,
                      choices: Sequence[tuple[str, int]] = SCHEDULE_CHOICES,
                      method: str = "dp", costs: Sequence[GraphCosts] | None = None,
                      samples_per_microbatch: int = 1) -> dict[str, Plan]:
    """Plan ``graph`` for each ``(schedule, virtual stages)`` of ``choices`` (and
    ``config``'s own) with ``config``'s other options; key: :func:`schedule_label`.

    ``method`` defaults to the exact contiguous DP, which is fast and optimal over contiguous
    splits, so every schedule is planned equally well. A choice that cannot run (virtual stages
    on one rank, microbatches that do not divide into interleaved rounds) or that does not fit
    in memory is left out.

    Raises:
        ConfigError: for an unknown method or schedule name.
    """
    wanted = list(dict.fromkeys([*choices, (config.schedule, config.virtual_stages)]))
    out: dict[str, Plan] = {}
    for schedule, v in wanted:
        if v > 1 and config.partitions < 2:
            continue
        try:
            same = v == config.virtual_stages  # pins name stages, which v renumbers
            cfg = dataclasses.replace(config, schedule=schedule, virtual_stages=v,
                                      pins=config.pins if same else {})
            out[schedule_label(cfg.schedule, v)] = partition(
                graph, cfg, devices, method=method, costs=costs,
                samples_per_microbatch=samples_per_microbatch)
        except InfeasiblePlanError:
            continue
        except ConfigError as e:
            if "rounds" in str(e):
                continue
            raise
    return out
