"""One configuration of the multi-GPU benchmark (``benchmarks/multigpu.py``) on every rank:
planning, our pipeline and torch's on the same stage, and the per-configuration record.

See Note [multigpu measurement] and Note [multigpu failures] in ``benchmarks/multigpu.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from _sync import StoreSync
from _timing import Busy, TimedExecutor
from _torch_pp import TorchStageModule, timed_stage_class, torch_unsupported
from torch import nn

from modelparallel import models
from modelparallel.codegen import (
    StageProgram,
    build_stage,
    held_tensors,
    materialize,
    replace_tensors,
)
from modelparallel.cost_model import DeviceSpec, get_device_spec
from modelparallel.partitioner import partition
from modelparallel.plan import Plan, PlanConfig
from modelparallel.runtime.comm import StageComm
from modelparallel.runtime.microbatch import resolve_split
from modelparallel.schedule import make_schedule, simulate, theoretical_bubble

__all__ = ["OPTIMIZER", "Config", "Env", "Run", "configs", "device_spec", "make_plans",
           "plan_summary", "run_config", "summarize"]

OPTIMIZER = "adamw"
_GiB = 2**30


@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        method: Plan method.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"zb-h1"``.
        m: Microbatches per step.
    """

    method: str
    schedule: str
    m: int

    @property
    def key(self) -> str:
        """``method/schedule/m``."""
        return f"{self.method}/{self.schedule}/{self.m}"


def configs(methods: Sequence[str], schedules: Sequence[str], factors: Sequence[int],
            p: int) -> list[Config]:
    """Every configuration, grouped so the methods of one (schedule, m) run back to back."""
    return [Config(method, s, f * p) for s in schedules for f in factors for method in methods]


# -- one rank's state ----------------------------------------------------------------------------------


@dataclass
class Env:
    """What every phase of a configuration needs on this rank.

    Attributes:
        rank: This rank (= its stage).
        world: Number of ranks (= stages).
        device: This rank's device.
        sync: Store agreement.
        args: The command line.
        case: The model case (meta device).
        traced: The traced model.
        loss_fn: The loss.
        comm: Our pipeline's communication (``None`` for one stage or after a failure).
        torch_group: The process group of torch.distributed.pipelining.
    """

    rank: int
    world: int
    device: torch.device
    sync: StoreSync
    args: argparse.Namespace
    case: models.ModelCase
    traced: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    comm: StageComm | None = None
    torch_group: Any = None

    @property
    def cuda(self) -> bool:
        """Whether the ranks run on CUDA."""
        return self.device.type == "cuda"

    def groups(self) -> None:
        """Create the process groups that do not exist (collective)."""
        backend = "nccl" if self.cuda else "gloo"
        if self.comm is None and self.world > 1:
            self.comm = StageComm.create(self.rank, list(range(self.world)), self.device,
                                         self.args.timeout)
        if self.torch_group is None:
            self.torch_group = dist.new_group(list(range(self.world)), backend=backend,
                                              timeout=timedelta(seconds=self.args.timeout))
            # A first collective over every rank, so NCCL makes the group's communicator
            # before torch's batched point-to-point operations use it.
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.torch_group)

    def drop_groups(self) -> None:
        """Tear both process groups down (after a failure, on every rank)."""
        if self.comm is not None:
            self.comm.teardown("benchmark configuration failed")
            self.comm = None
        if self.torch_group is not None:
            if self.cuda and hasattr(self.torch_group, "abort"):
                with contextlib.suppress(RuntimeError):
                    self.torch_group.abort()
            with contextlib.suppress(RuntimeError, ValueError, AssertionError):
                dist.destroy_process_group(self.torch_group)
            self.torch_group = None

    def synchronize(self) -> None:
        """Wait for this rank's device."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(
        t, nn.Parameter) else meta


def _release(program: StageProgram | None) -> None:
    """Put the stage's tensors back on the meta device, in the model too (they are the model's
    own: Note [stage parameters] in ``modelparallel/codegen/build.py``), so the next
    configuration's stage starts from nothing."""
    if program is not None:
        replace_tensors(program.module, {id(t): _meta_like(t)
                                         for t in held_tensors(program.module)
                                         if not t.is_meta})


def _free(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.synchronize(env.device)
        torch.cuda.empty_cache()


def _grad_norm(params: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().float().pow(2).sum())
    return math.sqrt(total)


def _zero(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


# -- one configuration ---------------------------------------------------------------------------------


class Run:
    """One configuration on this rank: our pipeline and torch's on the same stage."""

    def __init__(self, env: Env, cfg: Config, plan: Plan) -> None:
        self.env = env
        self.cfg = cfg
        self.plan = plan
        self.program: StageProgram | None = None
        self.executor: TimedExecutor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []
        batch = env.args.microbatch_size * cfg.m
        args, _, target = env.case.make_batch(batch, 1000 + cfg.m)
        self.inputs = [t.to(env.device) for t in env.traced.flatten_inputs(args, {})]
        self.target = target.to(env.device)

    # -- setup ---------------------------------------------------------------------------------------

    def build(self) -> None:
        """Materialise this rank's stage and make our executor and optimizer (collective)."""
        env = self.env
        torch.manual_seed(env.args.seed + env.rank)
        self.program = build_stage(env.traced, self.plan, env.rank)
        materialize(self.program, env.device)
        self.params = [p for p in self.program.module.parameters() if p.requires_grad]
        split = resolve_split(self.program.input_names, self.cfg.m)
        self.executor = TimedExecutor(self.program, env.comm, loss_fn=env.loss_fn,
                                      schedule=self.cfg.schedule, split=split,
                                      device=env.device)
        self.executor.busy = Busy(env.device)
        if self.params:
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-5,
                                               fused=True if env.cuda else None)

    def close(self) -> None:
        """Free everything of this configuration."""
        self.executor = None
        self.optimizer = None
        _zero(self.params)
        self.params = []
        _release(self.program)
        self.program = None
        _free(self.env)

    # -- our pipeline --------------------------------------------------------------------------------

    def ours_check(self) -> dict[str, Any]:
        """One step without the optimizer: the loss and this rank's gradient norm."""
        assert self.executor is not None
        out = self.executor.train_step(self.inputs, self.target, return_outputs=False)
        self.env.synchronize()
        self.executor.busy.take()
        norm = _grad_norm(self.params)
        _zero(self.params)
        return {"loss": float(out.loss), "grad_norm": norm}

    def ours_steps(self) -> dict[str, Any]:
        """Warm-up and timed training steps of our pipeline."""
        ex = self.executor
        assert ex is not None
        if self.env.args.inject_failure == f"{self.cfg.key}:{self.env.rank}":
            ex.fail_at = self.cfg.m - 1
        step = lambda: ex.train_step(self.inputs, self.target, return_outputs=False)  # noqa: E731
        return self._timed(step, ex.busy, "ours")

    # -- torch.distributed.pipelining ----------------------------------------------------------------

    def torch_schedule(self) -> tuple[Any, Any]:
        """A fresh ``PipelineStage`` and schedule on this rank's stage module."""
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleavedZeroBubble,
        )

        assert self.program is not None
        env = self.env
        stage = timed_stage_class()(TorchStageModule(self.program), env.rank, env.world,
                                     env.device, group=env.torch_group)
        stage.busy = Busy(env.device)
        if self.cfg.schedule == "zb-h1":  # torch's zero bubble, one stage per rank
            return stage, ScheduleInterleavedZeroBubble([stage], self.cfg.m, loss_fn=env.loss_fn)
        cls = ScheduleGPipe if self.cfg.schedule == "gpipe" else Schedule1F1B
        return stage, cls(stage, self.cfg.m, loss_fn=env.loss_fn)

    def torch_step(self, sched: Any) -> float | None:
        """One pipeline step of torch's schedule; the mean loss on the last stage."""
        import inspect

        program = self.program
        assert program is not None
        local = [self.inputs[i] for i in program.model_inputs]
        args = tuple(local) if program.is_first else ()
        kwargs: dict[str, Any] = {} if program.is_first else {
            f"in{i}": self.inputs[i] for i in program.model_inputs}
        if "return_outputs" in inspect.signature(sched.step).parameters:
            kwargs["return_outputs"] = False  # as ours: do not keep and merge the outputs
        if program.is_last:
            losses: list[torch.Tensor] = []
            sched.step(*args, target=self.target, losses=losses, **kwargs)
            return float(torch.stack([x.detach().float() for x in losses]).mean())
        sched.step(*args, **kwargs)
        return None

    def torch_check(self) -> dict[str, Any]:
        """torch's step from the same weights and batch as :meth:`ours_check`."""
        _, sched = self.torch_schedule()  # the schedule holds the stage
        try:
            loss = self.torch_step(sched)
            self.env.synchronize()
            norm = _grad_norm(self.params)
        finally:
            _zero(self.params)
            sched = None
            _free(self.env)
        return {"loss": loss, "grad_norm": norm}

    def torch_steps(self) -> dict[str, Any]:
        """Warm-up and timed training steps of torch's pipeline."""
        stage, sched = self.torch_schedule()
        try:
            return self._timed(lambda: self.torch_step(sched), stage.busy, "torch")
        finally:
            stage = sched = None
            _zero(self.params)
            _free(self.env)

    # -- timing --------------------------------------------------------------------------------------

    def _timed(self, step: Callable[[], Any], busy: Busy, what: str) -> dict[str, Any]:
        env = self.env
        if env.cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        rows = []
        for k in range(env.args.warmup + env.args.steps):
            env.synchronize()
            env.sync.barrier(f"{self.cfg.key} {what} step {k}")
            t0 = time.perf_counter()
            step()
            env.synchronize()
            t1 = time.perf_counter()
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            env.synchronize()
            t2 = time.perf_counter()
            spans = busy.take()
            if k >= env.args.warmup:
                rows.append({"pipeline_s": t1 - t0, "optimizer_s": t2 - t1,
                             "busy_s": sum(spans["F"]) + sum(spans["B"]) + sum(spans["W"]),
                             "fwd_s": statistics.median(spans["F"]) if spans["F"] else 0.0,
                             "bwd_s": statistics.median(spans["B"]) if spans["B"] else 0.0,
                             "wgt_s": statistics.median(spans["W"]) if spans["W"] else 0.0})
        peak = int(torch.cuda.max_memory_allocated(env.device)) if env.cuda else None
        return {"steps": rows, "peak_bytes": peak}


# -- planning ------------------------------------------------------------------------------------------


def device_spec(args: argparse.Namespace, device: torch.device, capacity: int | None
                ) -> DeviceSpec:
    """The spec the plans are made for: ``--device-spec``, else the built-in spec of the GPU
    (``h200``/``h100``; ``h100`` for others) or ``cpu``; with the GPU's real memory."""
    if args.device_spec:
        spec = get_device_spec(args.device_spec)
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device).upper()
        spec = get_device_spec("h200" if "H200" in name else "h100")
    else:
        spec = get_device_spec("cpu")
    return spec.with_memory(capacity) if capacity else spec


def make_plans(env: Env, todo: Sequence[Config], spec: DeviceSpec,
               log: Callable[[str], None]) -> dict[str, Plan | str]:
    """Plan every configuration; rank ``i % world`` solves the ``i``-th; every rank gets all
    (a plan, or the error text)."""
    graph = env.traced.graph
    store = env.sync.store
    mine: dict[str, str] = {}
    for i, cfg in enumerate(todo):
        if i % env.world != env.rank:
            continue
        t0 = time.perf_counter()
        try:
            config = PlanConfig(partitions=env.world, microbatches=cfg.m, schedule=cfg.schedule,
                                optimizer=OPTIMIZER, time_limit=env.args.time_limit)
            plan = partition(graph, config, spec, method=cfg.method,
                             samples_per_microbatch=env.args.microbatch_size)
            mine[cfg.key] = json.dumps({"plan": plan.to_json(indent=None)})
            log(f"planned {cfg.key} in {time.perf_counter() - t0:.1f} s "
                f"({plan.solver.status}, predicted step {1e3 * plan.pipeline.step_time:.1f} ms)")
        except Exception as e:  # recorded; the configuration is then reported as failed
            mine[cfg.key] = json.dumps({"error": _error(e)})
    for key, value in mine.items():
        store.set(f"mgbench/plan/{key}", value)
    env.sync.barrier("planning")
    out: dict[str, Plan | str] = {}
    for cfg in todo:
        data = json.loads(store.get(f"mgbench/plan/{cfg.key}"))
        if "error" in data:
            out[cfg.key] = data["error"]
            continue
        plan = Plan.from_json(data["plan"])
        plan.check_graph(graph)
        out[cfg.key] = plan
    return out


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What the plan predicts."""
    return {
        "solver": plan.solver.method, "status": plan.solver.status,
        "solve_s": plan.solver.solve_time, "gap": plan.solver.gap,
        "predicted_step_s": plan.pipeline.step_time,
        "predicted_bubble": plan.pipeline.bubble_fraction,
        "bottleneck_stage": plan.pipeline.bottleneck_stage,
        "stage_parameters": [s.num_parameters for s in plan.stages],
        "stage_time_s": [s.total_time for s in plan.stages],
        "predicted_peak_bytes": [s.memory.peak for s in plan.stages],
        "predicted_memory": [{"parameters": s.memory.parameters,
                              "gradients": s.memory.gradients,
                              "optimizer": s.memory.optimizer,
                              "activations": s.memory.activations,
                              "workspace": s.memory.workspace} for s in plan.stages],
    }


# -- running a configuration on every rank ---------------------------------------------------------------


def _phase(env: Env, what: str, fn: Callable[[], Any]) -> tuple[list[Any], list[str]]:
    """Run ``fn`` on every rank; every rank gets every rank's result and every error ('' if
    none): the phase failed if any error is non-empty."""
    try:
        value, error = fn(), ""
    except Exception as e:  # recorded and agreed on; see Note [multigpu failures]
        if env.args.verbose:
            traceback.print_exc()
        value, error = None, _error(e)
    answers = env.sync.gather({"value": value, "error": error}, what)
    return [a["value"] for a in answers], [a["error"] for a in answers]


def run_config(env: Env, cfg: Config, plan: Plan, capacity: int | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Measure one configuration on every rank; the record (complete on rank 0)."""
    p, m = env.world, cfg.m
    tokens = m * env.args.microbatch_size * env.case.args[0].shape[1]
    record: dict[str, Any] = {
        "method": cfg.method, "schedule": cfg.schedule, "m": m, "tokens_per_step": tokens,
        "plan": plan_summary(plan), "bubble_theory": theoretical_bubble(p, m, cfg.schedule)}
    peak = max(s.memory.peak for s in plan.stages)
    if capacity and env.args.memory_guard > 0 and peak > env.args.memory_guard * capacity:
        record.update(status="skipped", reason=(
            f"predicted peak {peak / _GiB:.1f} GiB > --memory-guard {env.args.memory_guard} x "
            f"{capacity / _GiB:.1f} GiB"))
        return record
    run = Run(env, cfg, plan)
    try:
        def build() -> None:
            env.groups()
            run.build()

        _, errors = _phase(env, f"{cfg.key} build", build)
        if any(errors):
            record.update(status="failed", phase="build", errors=errors)
            return record
        checks, errors = _phase(env, f"{cfg.key} check", run.ours_check)
        if any(errors):
            record.update(status="failed", phase="ours check step", errors=errors)
            return record
        why = torch_unsupported(run.program) if run.program is not None else ""
        skip = "--no-torch" if env.args.no_torch else why
        whys = env.sync.gather(skip, f"{cfg.key} torch support")
        torch_skip = next((w for w in whys if w), "")
        torch_checks: list[Any] = []
        torch_errors: list[str] = []
        if not torch_skip and cfg.method in env.args.torch_methods:
            torch_checks, torch_errors = _phase(env, f"{cfg.key} torch check", run.torch_check)
        elif not torch_skip:
            torch_skip = f"--torch-methods {','.join(env.args.torch_methods)}"
        ours, errors = _phase(env, f"{cfg.key} ours", run.ours_steps)
        if any(errors):
            record.update(status="failed", phase="ours timed steps", errors=errors)
            return record
        record["status"] = "ok"
        record["ours"] = summarize(ours, plan, cfg, tokens)
        record["check"] = {"loss_ours": checks[-1]["loss"],
                           "grad_norm_ours": [c["grad_norm"] for c in checks]}
        if torch_skip:
            record["torch"] = {"skipped": torch_skip}
        elif any(torch_errors):
            record["torch"] = {"error": torch_errors, "phase": "check step"}
        else:
            record["check"].update(
                loss_torch=torch_checks[-1]["loss"],
                grad_norm_torch=[c["grad_norm"] for c in torch_checks])
            c = record["check"]
            c["loss_abs_diff"] = abs(c["loss_ours"] - c["loss_torch"])
            c["grad_norm_max_rel_diff"] = max(
                abs(a - b) / max(abs(a), 1e-30)
                for a, b in zip(c["grad_norm_ours"], c["grad_norm_torch"]))
            theirs, errors = _phase(env, f"{cfg.key} torch", run.torch_steps)
            record["torch"] = (summarize(theirs, plan, cfg, tokens) if not any(errors)
                               else {"error": errors, "phase": "timed steps"})
            if not any(errors):
                record["ours_over_torch_tokens_per_s"] = (
                    record["ours"]["tokens_per_s"] / record["torch"]["tokens_per_s"])
        return record
    finally:
        run.close()
        if record.get("status") != "ok" or "error" in record.get("torch", {}):
            env.drop_groups()  # every rank: the failure is agreed on
        env.sync.barrier(f"{cfg.key} done")


def summarize(per_rank: list[dict[str, Any]], plan: Plan, cfg: Config, tokens: int
              ) -> dict[str, Any]:
    """Step time, throughput, bubble and memory of one runtime over every rank."""
    p = len(per_rank)
    n = len(per_rank[0]["steps"])
    pipe = [max(r["steps"][k]["pipeline_s"] for r in per_rank) for k in range(n)]
    opt = [max(r["steps"][k]["optimizer_s"] for r in per_rank) for k in range(n)]
    bubbles = [1.0 - statistics.mean(r["steps"][k]["busy_s"] / pipe[k] for r in per_rank)
               for k in range(n)]
    fwd = [statistics.median(s["fwd_s"] for s in r["steps"]) for r in per_rank]
    bwd_i = [statistics.median(s["bwd_s"] for s in r["steps"]) for r in per_rank]
    wgt = [statistics.median(s.get("wgt_s", 0.0) for s in r["steps"]) for r in per_rank]
    bwd = [b + w for b, w in zip(bwd_i, wgt)]  # a split backward: I then W
    sim = simulate(make_schedule(cfg.schedule, p, cfg.m), fwd, bwd,
                   wgrad_fraction=[w / b if b > 0 else 0.0 for w, b in zip(wgt, bwd)])
    step = statistics.median(pipe)
    train = statistics.median(a + b for a, b in zip(pipe, opt))
    measured = [r["peak_bytes"] for r in per_rank]
    predicted = [s.memory.peak for s in plan.stages]
    return {
        "pipeline_step_s": step, "optimizer_s": statistics.median(opt), "train_step_s": train,
        "pipeline_step_times_s": pipe, "tokens_per_s": tokens / train,
        "bubble_measured": statistics.median(bubbles),
        "busy_fraction": [statistics.median(r["steps"][k]["busy_s"] / pipe[k]
                                            for k in range(n)) for r in per_rank],
        "stage_fwd_s": fwd, "stage_bwd_s": bwd,
        "bubble_simulated": sim.bubble_fraction, "step_simulated_s": sim.makespan,
        "predicted_step_s": plan.pipeline.step_time,
        "step_error": (plan.pipeline.step_time - step) / step,
        "peak_bytes_measured": measured, "peak_bytes_predicted": predicted,
        "memory_error": [None if mm is None else (pp - mm) / mm
                         for pp, mm in zip(predicted, measured)],
    }
