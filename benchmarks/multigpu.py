"""Multi-GPU benchmark: our ILP plan against the baselines and torch.distributed.pipelining.

    # p GPUs, one process per GPU (NCCL); the script sets the three NVLS variables itself,
    # but set them in the launcher too, so nothing started before Python sees them on:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node 8 benchmarks/multigpu.py --size full \\
        --out benchmarks/results/multigpu-nvidia-h200-x8.json
    # CPU smoke test with gloo (timings mean nothing):
    torchrun --nproc_per_node 2 benchmarks/multigpu.py --size tiny --steps 2
    # one GPU (dry run): p = 1
    torchrun --nproc_per_node 1 benchmarks/multigpu.py --size small

Every rank builds a GPT-style decoder (:func:`modelparallel.models.gpt_decoder`, about 1.5B
parameters per GPU at ``--size full``) on the meta device, in bfloat16, and traces it; no rank
ever allocates the whole model. For every (plan method in ``--methods``) x (schedule in
``--schedules``) x (m = f * p for f in ``--m-factors``), the ranks plan (the ILP plans are solved
in parallel, one per rank, and shared through the c10d store), each rank materialises only its
own stage (:func:`modelparallel.codegen.materialize`), and then:

1. a *check step*: one forward/backward of the same batch through our pipeline and through
   ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``/``Schedule1F1B``,
   with the very same stage ``GraphModule`` from our codegen, so the same split), from the same
   weights, without an optimizer step: their losses and per-rank gradient norms must agree
   (a correctness check of the comparison itself);
2. our pipeline: ``--warmup`` then ``--steps`` timed training steps (pipeline, then AdamW);
3. ``torch.distributed.pipelining``: the same.

Note [multigpu measurement]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
- **Step time.** Before every timed step the ranks meet at a barrier (through the c10d store,
  so it never depends on a communicator's health) after draining their GPU; each rank then times
  the pipeline step to a ``cuda.synchronize`` and, separately, the optimizer step
  (``opt.step(); opt.zero_grad()``, synchronised). A step's pipeline time is the largest over
  the ranks; the figures are medians over the timed steps. Throughput = tokens per step
  (``m * microbatch size * sequence length``) / median(pipeline + optimizer time).
- **Bubble.** Each forward and each backward action is bracketed by CUDA events on the compute
  stream (our executor's ``on_action`` hook; torch's ``forward_one_chunk``/
  ``backward_one_chunk``), so a rank's *busy* time is the device time between the start and
  the end of its actions (a gap inside an action, e.g. the host queueing kernels slower than the
  GPU runs them, counts as busy). Measured bubble = ``1 - mean over ranks of busy / step
  time``, the median over the timed steps, next to the theory ``(p - 1) / (m + p - 1)`` (equal
  stages, free communication), the plan's own estimate (``PipelineEstimate.bubble_fraction``:
  the idle fraction of the bottleneck stage) and the schedule simulated with the measured
  per-stage forward and backward times (:func:`modelparallel.schedule.simulate`, no
  communication). On the CPU the wall clock replaces the events.
- **Predicted step time**: the plan's ``PipelineEstimate.step_time`` (the roofline of the
  device spec; no optimizer step), against the measured pipeline time.
- **Memory**: ``torch.cuda.max_memory_allocated`` of each rank, reset before our timed steps and
  again before torch's, so each peak covers that runtime's training steps (weights, gradients,
  AdamW state, activations, communication buffers) and nothing of the other's; against the
  plan's ``MemoryEstimate.peak`` of that stage. Not measured on the CPU.
- **Optimizer**: ``torch.optim.AdamW`` (``fused=True`` on CUDA) keeps ``exp_avg`` and
  ``exp_avg_sq`` in the parameter's dtype, so with bfloat16 weights there is no float32 master
  copy: weight 2 + gradient 2 + two states 4 = 8 bytes per parameter, which is what
  ``PlanConfig(optimizer="adamw")`` counts (``param_state_bytes``: ``nbytes * (2 + 2)``).

Note [multigpu failures]
~~~~~~~~~~~~~~~~~~~~~~~~
A configuration that fails (an out-of-memory error, say) is recorded with each rank's error and
the benchmark goes on. The ranks agree on every phase's outcome through the c10d store (a
TCPStore: no NCCL), with ``--timeout``. A step that fails on one rank tears its pipeline process
groups down (Note [failure propagation] in ``modelparallel/runtime/failure.py``); the others'
NCCL operations then end at the process groups' timeout (``--timeout``), through NCCL's watchdog.
Its default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) kills the process on such a timeout, so
unless the variable is set, this script sets it to ``2`` (abort the communicator, keep the
process) before starting NCCL. After any failure every rank tears down both process groups and
makes new ones. Configurations whose predicted peak exceeds ``--memory-guard`` times the
smallest GPU's memory are skipped (recorded as such). Rank 0 rewrites the JSON after every
configuration, with the one in progress marked ``running``, so a run that dies keeps what it
measured and says where it died; ``--update`` merges a later run (a subset of the
configurations) into an existing file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# Leave NVLink multicast (NVLS) off, before torch or NCCL is loaded (see docs/multigpu.md).
NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_ENV)
# torchrun's agent sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (kill the process on an NCCL error or
# timeout); 2 aborts the communicator and keeps the process (Note [multigpu failures]).
os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = os.environ.get(
    "MGBENCH_NCCL_ASYNC_ERROR_HANDLING", "2")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import versions  # noqa: E402
from torch import nn  # noqa: E402

from modelparallel import models  # noqa: E402
from modelparallel.codegen import (  # noqa: E402
    StageProgram,
    build_stage,
    held_tensors,
    materialize,
    replace_tensors,
)
from modelparallel.cost_model import DeviceSpec, get_device_spec  # noqa: E402
from modelparallel.errors import StepTimeoutError  # noqa: E402
from modelparallel.partitioner import partition  # noqa: E402
from modelparallel.plan import Plan, PlanConfig  # noqa: E402
from modelparallel.runtime.comm import StageComm  # noqa: E402
from modelparallel.runtime.distributed import default_device, init_distributed  # noqa: E402
from modelparallel.runtime.executor import StageExecutor  # noqa: E402
from modelparallel.runtime.hooks import StageEvent  # noqa: E402
from modelparallel.runtime.microbatch import resolve_split  # noqa: E402
from modelparallel.schedule import (  # noqa: E402
    make_schedule,
    simulate,
    theoretical_bubble,
)
from modelparallel.tracer import trace  # noqa: E402

METHODS = ("ilp", "param_balanced", "uniform")
SCHEDULES = ("gpipe", "1f1b")
OPTIMIZER = "adamw"
_GiB = 2**30


# -- sizes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A model size of the benchmark.

    Attributes:
        name: ``full``, ``small`` or ``tiny``.
        make: ``make(p) -> ModelCase`` on the meta device, batch of one microbatch.
        microbatch_size: Samples per microbatch.
        warmup: Default untimed steps per configuration and runtime.
        steps: Default timed steps.
        time_limit: Default ILP seconds per plan.
    """

    name: str
    make: Callable[[int], models.ModelCase]
    microbatch_size: int
    warmup: int
    steps: int
    time_limit: float


SIZES = {
    # ~1.5B parameters per GPU (4096 wide from p = 4 on), 2048 tokens per sample.
    "full": Size("full", lambda p: models.gpt_decoder(1.5e9, p, seq_len=2048, batch_size=1),
                 1, 1, 4, 20.0),
    # ~300M per GPU, 1024 wide, 1024 tokens: the one-GPU dry run.
    "small": Size("small", lambda p: models.gpt_decoder(3e8, p, hidden=1024, seq_len=1024,
                                                        batch_size=2), 2, 2, 5, 10.0),
    # ~1M parameters, for the CPU: 4 layers (2 per stage from p = 2), 32 tokens.
    "tiny": Size("tiny", lambda p: models.gpt_decoder(
        hidden=128, layers=max(4, 2 * p), heads=4, vocab_size=512, seq_len=32, batch_size=2,
        gpus=p), 2, 1, 3, 5.0),
}


@dataclass(frozen=True)
class Config:
    """One measured configuration.

    Attributes:
        method: Plan method.
        schedule: ``"gpipe"`` or ``"1f1b"``.
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


# -- agreement through the store -----------------------------------------------------------------------


class StoreSync:
    """Gathers and barriers through the c10d store, independent of any communicator's health
    (Note [multigpu failures]). Every rank must make the same calls in the same order."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float) -> None:
        self.store = store
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self._calls = 0

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order."""
        self._calls += 1
        prefix = f"mgbench/{self._calls}"
        self.store.set(f"{prefix}/{self.rank}", json.dumps(value))
        keys = [f"{prefix}/{r}" for r in range(self.world)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout))
        except RuntimeError:
            silent = [r for r in range(self.world) if not self.store.check([keys[r]])]
            raise StepTimeoutError(
                f"ranks {silent} did not reach '{what}' within {self.timeout:g} s (stuck in a "
                "communication or crashed; see their logs); raise --timeout if they are just "
                "slow") from None
        return [json.loads(self.store.get(k)) for k in keys]

    def barrier(self, what: str) -> None:
        """Wait for every rank."""
        self.gather(0, what)


# -- timing of actions -------------------------------------------------------------------------------


class Busy:
    """Spans of forward and backward actions: CUDA events on the current stream, or the wall
    clock on the CPU (Note [multigpu measurement])."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        """A token for :meth:`stop`."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, kind: str, token: Any) -> None:
        """Close the span of an action of ``kind`` (``"F"`` or ``"B"``)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((kind, token, ev))
        else:
            self.spans.append((kind, token, time.perf_counter()))

    def take(self) -> dict[str, list[float]]:
        """Seconds of every span since the last call, by kind (after a synchronisation)."""
        out: dict[str, list[float]] = {"F": [], "B": []}
        for kind, a, b in self.spans:
            out[kind].append(a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        self.spans = []
        return out


class TimedExecutor(StageExecutor):
    """Our executor with every forward and backward action bracketed by :class:`Busy`, through
    its public ``on_action`` hook (Note [action hook] in ``modelparallel/runtime/hooks.py``)."""

    busy: Busy
    fail_at: int | None = None  # --inject-failure: raise in the forward of this microbatch

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._token: Any = None
        super().__init__(*args, on_action=self._bracket, **kwargs)

    def _bracket(self, event: StageEvent, phase: str) -> None:
        if event.kind not in ("forward", "backward"):
            return
        if phase == "start":
            self._token = self.busy.start()
            if event.kind == "forward" and event.microbatch == self.fail_at:
                self.busy.stop("F", self._token)
                raise RuntimeError(
                    f"injected failure (--inject-failure) in forward {event.microbatch}")
        else:
            self.busy.stop("F" if event.kind == "forward" else "B", self._token)


class TorchStageModule(nn.Module):
    """A stage of our codegen in the calling convention of ``torch.distributed.pipelining``:
    the first stage takes its model inputs as positional arguments (as ``schedule.step(x)``
    gives them); a later stage takes the received activations as positional arguments and any
    model inputs it reads (input-derived values it recomputes) as keyword arguments ``in<i>``
    (``PipelineSchedule.step`` passes keyword arguments, split into microbatches, to every
    stage). It returns a tensor or a tuple of tensors (the model output on the last stage). The
    stage is called through ``StageProgram.run`` (Note [stage calling convention] in
    ``modelparallel/codegen/program.py``), like our executors do."""

    def __init__(self, program: StageProgram) -> None:
        super().__init__()
        self.module = program.module  # registers the parameters
        self.program = program
        self.inputs = [f"in{i}" for i in program.model_inputs]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.program.is_first:
            out = self.program.run(args, ())
        else:
            out = self.program.run([kwargs[n] for n in self.inputs], args,
                                   grad_leaves=torch.is_grad_enabled())
        if self.program.is_last:
            return out.model_output
        return out.sends[0] if len(out.sends) == 1 else out.sends


def torch_unsupported(program: StageProgram) -> str:
    """Why torch.distributed.pipelining cannot run this stage ('' if it can)."""
    for b in (*program.recv, *program.send):
        if b.kind != "tensor":
            return (f"boundary value {b.name!r} is a {b.kind}; torch.distributed.pipelining "
                    "passes single tensors only")
    return ""


def _timed_stage_class() -> type:
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):  # type: ignore[misc]
        """torch's stage with every forward and backward chunk bracketed by :class:`Busy`."""

        busy: Busy

        def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            token = self.busy.start()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                self.busy.stop("F", token)

        def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
            token = self.busy.start()
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                self.busy.stop("B", token)

    return TimedStage


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
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        assert self.program is not None
        env = self.env
        stage = _timed_stage_class()(TorchStageModule(self.program), env.rank, env.world,
                                     env.device, group=env.torch_group)
        stage.busy = Busy(env.device)
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
                             "busy_s": sum(spans["F"]) + sum(spans["B"]),
                             "fwd_s": statistics.median(spans["F"]) if spans["F"] else 0.0,
                             "bwd_s": statistics.median(spans["B"]) if spans["B"] else 0.0})
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
        "plan": plan_summary(plan), "bubble_theory": theoretical_bubble(p, m)}
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
    bwd = [statistics.median(s["bwd_s"] for s in r["steps"]) for r in per_rank]
    sim = simulate(make_schedule(cfg.schedule, p, cfg.m), fwd, bwd)
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


# -- report --------------------------------------------------------------------------------------------


def ratios(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of the ILP plan over each baseline, and ours over torch, per (schedule, m)."""
    ok = {(r["method"], r["schedule"], r["m"]): r for r in records if r.get("status") == "ok"}
    out: dict[str, Any] = {"ilp_over": {}, "ours_over_torch": {}}
    for (method, schedule, m), r in sorted(ok.items()):
        key = f"{schedule}/m={m}"
        if method == "ilp":
            for base in ("param_balanced", "uniform"):
                b = ok.get((base, schedule, m))
                if b is not None:
                    out["ilp_over"].setdefault(base, {})[key] = (
                        r["ours"]["tokens_per_s"] / b["ours"]["tokens_per_s"])
        if "ours_over_torch_tokens_per_s" in r:
            out["ours_over_torch"].setdefault(method, {})[key] = r["ours_over_torch_tokens_per_s"]
    return out


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / _GiB:.1f}"


def table_rows(records: Sequence[dict[str, Any]]) -> Iterator[list[str]]:
    """One row per configuration for the printed tables."""
    for r in records:
        head = [r["method"], r["schedule"], str(r["m"])]
        if r.get("status") != "ok":
            why = r.get("reason") or "; ".join(e for e in r.get("errors", []) if e)
            yield [*head, r.get("status", "?"), why[:60], *[""] * 8]
            continue
        o, t = r["ours"], r.get("torch", {})
        mem_m = [x for x in o["peak_bytes_measured"] if x is not None]
        yield [*head, "ok", f"{o['tokens_per_s']:,.0f}",
               f"{t['tokens_per_s']:,.0f}" if "tokens_per_s" in t else
               ("skipped" if "skipped" in t else "error"),
               f"{r['ours_over_torch_tokens_per_s']:.3f}"
               if "ours_over_torch_tokens_per_s" in r else "-",
               f"{o['bubble_measured']:.3f}", f"{r['bubble_theory']:.3f}",
               f"{1e3 * o['predicted_step_s']:.0f}", f"{1e3 * o['pipeline_step_s']:.0f}",
               f"{100 * o['step_error']:+.0f}%",
               f"{_gib(max(o['peak_bytes_predicted']))} / {_gib(max(mem_m) if mem_m else None)}"]


HEADER = ["method", "schedule", "m", "status", "tokens/s ours", "tokens/s torch", "ours/torch",
          "bubble", "theory", "pred ms", "meas ms", "err", "peak GiB pred/meas"]


def print_report(result: dict[str, Any]) -> None:
    """The rich table, the ratios and a markdown copy of the table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=(f"{result['model']['name']} on {result['gpus']} x {result['device']} "
                     f"({result['backend']}), {result['dtype']}, microbatch "
                     f"{result['microbatch_size']} x {result['model']['seq_len']} tokens"))
    for col in HEADER:
        t.add_column(col, justify="right")
    rows = list(table_rows(result["configs"]))
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print_json(json.dumps(result["summary"]))
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- main ----------------------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    if args.device == "auto":
        device = default_device()
    elif args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if not init_distributed(device, args.timeout):  # not under torchrun: one process
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=args.timeout))
    if device.type == "cpu":
        torch.set_num_threads(1)  # one intra-op thread per rank, as benchmarks/runtime.py
    return device, dist.get_rank(), dist.get_world_size()


def _kind(device: torch.device, world: int) -> str:
    if device.type != "cuda":
        return f"cpu-x{world}"
    name = torch.cuda.get_device_name(device).upper()
    chip = "h200" if "H200" in name else "h100" if "H100" in name else "gpu"
    return f"nvidia-{chip}" + (f"-x{world}" if world > 1 or chip == "h100" else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help="comma-separated subset of gpipe,1f1b")
    parser.add_argument("--m-factors", default="1,2,4", help="m = factor * p, comma-separated")
    parser.add_argument("--torch-methods", default=",".join(METHODS),
                        help="plan methods also run under torch.distributed.pipelining")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch.distributed.pipelining")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (size's default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before")
    parser.add_argument("--time-limit", type=float, default=None, help="ILP seconds per plan")
    parser.add_argument("--microbatch-size", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--device-spec", default=None,
                        help="device spec for planning (built-in name or JSON); default: the "
                             "GPU's built-in spec with its real memory")
    parser.add_argument("--memory-guard", type=float, default=0.95,
                        help="skip configurations predicted above this fraction of the "
                             "smallest GPU's memory (0: never)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds after which the remaining configurations are not "
                             "started (recorded as not run)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds any rank waits for another")
    parser.add_argument("--kind", default=None, help="machine kind for the record")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/multigpu-<kind>.json)")
    parser.add_argument("--update", action="store_true",
                        help="merge into an existing --out file: its configurations not run "
                             "now are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--inject-failure", default="", metavar="METHOD/SCHEDULE/M:RANK",
                        help="(tests) make that rank fail in the last forward of the first "
                             "timed step of our pipeline in that configuration")
    a = parser.parse_args(argv)
    size = SIZES[a.size]
    a.methods = [x for x in a.methods.split(",") if x]
    a.schedules = [x for x in a.schedules.split(",") if x]
    a.torch_methods = [x for x in a.torch_methods.split(",") if x]
    a.m_factors = [int(x) for x in a.m_factors.split(",") if x]
    for name, got, allowed in (("--methods", a.methods, METHODS),
                               ("--schedules", a.schedules, SCHEDULES),
                               ("--torch-methods", a.torch_methods, METHODS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    if not a.m_factors or min(a.m_factors) < 1:
        parser.error("--m-factors must be positive integers")
    a.steps = size.steps if a.steps is None else a.steps
    a.warmup = size.warmup if a.warmup is None else a.warmup
    a.time_limit = size.time_limit if a.time_limit is None else a.time_limit
    a.microbatch_size = size.microbatch_size if a.microbatch_size is None else a.microbatch_size
    if a.steps < 1 or a.warmup < 0 or a.microbatch_size < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --microbatch-size >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device, rank, world = _start(args)

    def log(msg: str) -> None:
        print(f"[rank {rank} {time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr,
              flush=True)

    store = dist.distributed_c10d._get_default_store()
    sync = StoreSync(store, rank, world, args.timeout)
    dtype = getattr(torch, args.dtype)
    case = SIZES[args.size].make(world)
    model = case.model.to(dtype)
    mb_args, _, _ = case.make_batch(args.microbatch_size, 0)
    traced = trace(model, mb_args)
    loss_fn = case.loss_fn
    if rank == 0:
        log(f"{case.name}: {case.num_parameters / 1e9:.2f}B parameters "
            f"({case.num_parameters / world / 1e9:.2f}B per rank), {len(traced.graph)} nodes; "
            f"{world} ranks on {device.type}")
    capacity = None
    if device.type == "cuda":
        capacity = min(sync.gather(torch.cuda.mem_get_info(device)[1], "capacity"))
    spec = device_spec(args, device, capacity)
    env = Env(rank, world, device, sync, args, case, traced, loss_fn)
    todo = configs(args.methods, args.schedules, args.m_factors, world)
    plans = make_plans(env, todo, spec, log if rank == 0 else lambda _: None)

    kind = args.kind or _kind(device, world)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"multigpu-{kind}.json"
    blocks = [m for m in model.modules() if isinstance(m, models.DecoderBlock)]
    result: dict[str, Any] = {
        "benchmark": "multigpu", "kind": kind,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": world if device.type == "cuda" else 0, "ranks": world,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "size": args.size, "dtype": args.dtype,
        "model": {"name": case.name, "parameters": case.num_parameters,
                  "parameters_per_rank": case.num_parameters / world,
                  "hidden": model.tok.embedding_dim, "layers": len(blocks),
                  "heads": blocks[0].heads if blocks else 0,
                  "vocab": model.tok.num_embeddings, "seq_len": int(mb_args[0].shape[1]),
                  "graph_nodes": len(traced.graph)},
        "microbatch_size": args.microbatch_size,
        "optimizer": {"name": "torch.optim.AdamW", "fused": device.type == "cuda",
                      "states": "exp_avg and exp_avg_sq in the parameter dtype",
                      "bytes_per_parameter": 4 * torch.empty((), dtype=dtype).element_size(),
                      "plan_optimizer": OPTIMIZER},
        "timing": {"warmup": args.warmup, "steps": args.steps, "statistic": "median",
                   "time_limit": args.time_limit},
        "device_spec": spec.to_dict(), "capacity_bytes": capacity,
        "env": {k: os.environ.get(k) for k in (*NVLS_ENV, "TORCH_NCCL_ASYNC_ERROR_HANDLING")},
        "versions": versions("transformers"), "command": sys.argv,
        "configs": [], "summary": {},
    }
    earlier: list[dict[str, Any]] = []
    if args.update and out_path.exists() and rank == 0:
        old = json.loads(out_path.read_text())
        if (old.get("size"), old.get("ranks"), old.get("device")) == (
                args.size, world, result["device"]):
            keys = {c.key for c in todo}
            earlier = [c for c in old.get("configs", [])
                       if f"{c['method']}/{c['schedule']}/{c['m']}" not in keys]
        else:
            log(f"--update: {out_path} is for another size, rank count or device; replacing it")

    def write(records: list[dict[str, Any]]) -> None:
        if rank != 0:
            return
        result["configs"] = earlier + records
        result["summary"] = ratios(result["configs"])
        result["elapsed_s"] = time.perf_counter() - started
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    records: list[dict[str, Any]] = []
    for cfg in todo:
        over = sync.gather(time.perf_counter() - started > args.budget, "budget")[0]
        plan = plans[cfg.key]
        base = {"method": cfg.method, "schedule": cfg.schedule, "m": cfg.m}
        if over:
            records.append({**base, "status": "not run",
                            "reason": f"--budget {args.budget:g} s used up"})
            continue
        if isinstance(plan, str):
            records.append({**base, "status": "failed", "phase": "planning", "errors": [plan]})
            continue
        write([*records, {**base, "status": "running"}])
        t0 = time.perf_counter()
        record = run_config(env, cfg, plan, capacity, log if rank == 0 else lambda _: None)
        record["elapsed_s"] = time.perf_counter() - t0
        records.append(record)
        if rank == 0:
            log(f"{cfg.key}: {record['status']} in {record['elapsed_s']:.1f} s"
                + (f", {record['ours']['tokens_per_s']:,.0f} tokens/s"
                   if record["status"] == "ok" else ""))
        write(records)
    env.drop_groups()
    if rank == 0:
        write(records)
        print_report(result)
        log(f"wrote {out_path}")
    sync.barrier("end")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
