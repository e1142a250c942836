"""The plain PyTorch front end: ``modelparallel.pipeline(model, example_inputs, loss_fn=...)``.

Run the same script on every rank (``torchrun --nproc_per_node P train.py``); each rank gets a
:class:`Pipeline` holding its own stage of the model, trains it with its own optimizer on its own
parameters, and sees the loss (and outputs) of every step::

    pipe = modelparallel.pipeline(model, example_batch, loss_fn=loss_fn, microbatches=4)
    opt = torch.optim.AdamW(pipe.parameters(), lr=3e-4)
    for inputs, targets in data:
        opt.zero_grad()
        result = pipe.step(inputs, targets)   # forward + backward of every microbatch
        opt.step()
        print(float(result.loss))

Note [pipeline setup]
~~~~~~~~~~~~~~~~~~~~~
How a pipeline is built, on every rank:

1. torch.distributed is started from torchrun's environment if needed (gloo on CPU, NCCL on
   CUDA); a single process without launcher variables runs a one-stage pipeline without it.
2. Every rank traces the model on one microbatch of the example batch (or of the first batch
   given to :meth:`Pipeline.step` when ``example_inputs`` is ``None``, like SMP, which partitions
   at the first step).
3. With a plan (a :class:`~modelparallel.plan.Plan` or a plan file), every rank checks the plan's
   fingerprint against its trace and refuses a mismatch (:class:`PlanMismatchError`) before any
   communication. Without one, rank 0 partitions the graph (the ILP of
   :mod:`modelparallel.partitioner`) and publishes the plan JSON; every rank checks its
   fingerprint.
4. The ranks agree on the outcome through the c10d store (Note [setup agreement] in
   ``modelparallel/runtime/distributed.py``), so a failure on one rank is raised on all.
5. Each rank builds its stage (:func:`modelparallel.codegen.build_stage`), makes its parameters
   real if the model was on the meta device, moves it to its device, and creates the pipeline's
   process groups.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from modelparallel.cost_model.device import DeviceSpec, stage_devices
from modelparallel.errors import ConfigError, PlanMismatchError
from modelparallel.parallel import ParallelOptions
from modelparallel.pipeline_state import LoadResult, StateDictMethods
from modelparallel.placement import Placement
from modelparallel.plan import Plan, PlanConfig, load_plan
from modelparallel.planning_options import PlanningOptions
from modelparallel.runtime.comm import StageComm
from modelparallel.runtime.data_parallel import GradientSync
from modelparallel.runtime.distributed import (
    SetupRound,
    default_device,
    init_distributed,
    pipeline_namespace,
)
from modelparallel.runtime.executor import StageExecutor
from modelparallel.runtime.microbatch import first_microbatch, resolve_split
from modelparallel.runtime.trace import trace_directory
from modelparallel.schedule import check_virtual_stages, normalize_schedule

__all__ = ["LoadResult", "Pipeline", "PlanningOptions", "StepResult", "pipeline"]

Inputs = Any  # a tensor, a tuple of positional arguments, or a dict of keyword arguments

@dataclass(frozen=True)
class StepResult:
    """What :meth:`Pipeline.step` returns on every rank.

    Attributes:
        loss: Mean loss over the microbatches, a detached 0-d tensor.
        outputs: The model's output for the whole batch (microbatches concatenated on axis 0),
            detached; ``None`` when output broadcasting is off (``return_outputs=False``).
    """

    loss: torch.Tensor
    outputs: Any = None


def pipeline(model: nn.Module, example_inputs: Inputs | None = None, *,
             loss_fn: Callable[[Any, Any], torch.Tensor],
             plan: Plan | str | Path | None = None,
             partitions: int | None = None,
             microbatches: int | None = None,
             schedule: str | None = None,
             virtual_stages: int | None = None,
             device: torch.device | str | None = None,
             planning: PlanningOptions | None = None,
             input_split_axes: Mapping[str | int, int] | None = None,
             non_split_inputs: Iterable[str | int] = (),
             average_grads: bool = True,
             return_outputs: bool = True,
             timeout: float = 300.0,
             trace_method: str = "auto",
             leaf_modules: Sequence[Any] = (),
             trace: str | os.PathLike[str] | None = None,
             data_parallel: int | None = None,
             parallel: ParallelOptions | None = None,
             **planning_kwargs: Any) -> Pipeline:
    """Split ``model`` into a pipeline over this job's ranks; return this rank's part.

    Call it on every rank with the same arguments (Note [pipeline setup]).

    Args:
        model: The model, built identically on every rank (or on the meta device: each rank then
            initialises only its own stage's parameters, with ``reset_parameters``).
        example_inputs: A batch shaped like the training batches: a tensor, a tuple of positional
            arguments or a dict of keyword arguments. ``None``: partition at the first step, from
            its batch (then :meth:`Pipeline.parameters` is available after the first step only).
        loss_fn: ``loss_fn(model_output, target) -> scalar tensor``, mean over the batch.
        plan: A plan or plan file; ``None`` plans automatically on rank 0.
        partitions: Pipeline stages; default: the plan's, else the world size divided by
            ``data_parallel``. Stages × ``data_parallel`` must equal the world size.
        microbatches: Microbatches per step; default: the plan's, else 1.
        schedule: ``"1f1b"``/``"interleaved"``, ``"gpipe"``/``"simple"`` or ``"zb-h1"``
            (zero-bubble); default: the plan's, else ``"1f1b"`` (Note [schedule names] in
            ``modelparallel/schedule/__init__.py``).
        virtual_stages: Stages per rank ``v`` (``schedule="1f1b"`` only: interleaved 1F1B
            over ``partitions * v`` stages, stage ``s`` on rank ``s % partitions``); default:
            the plan's, else 1.
        device: This rank's device; default ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.
        planning: Planning options (used when no plan is given); keyword arguments named like
            its fields (``optimize="memory"``, ``time_limit=30``...) are accepted too.
        input_split_axes: Input name (placeholder name of the traced model) or flat index to the
            axis its microbatches are cut along (default 0).
        non_split_inputs: Inputs passed whole to every microbatch.
        average_grads: Average gradients over microbatches (else sum).
        return_outputs: Broadcast the model outputs to every rank after each step (turn off for
            speed; the loss is always broadcast).
        timeout: Seconds any rank waits for another before raising.
        trace_method: ``"auto"``, ``"fx"`` or ``"export"``.
        leaf_modules: Module types or names the fx tracer keeps whole.
        data_parallel: Replicas of the pipeline (data-parallel degree, default 1): the job runs
            ``partitions × data_parallel`` processes, each replica on its own batches, each
            stage's gradients averaged over its replicas (Note [data-parallel gradient sync] in
            ``modelparallel/runtime/data_parallel.py``). The plan is made once, on rank 0, for
            one replica.
        parallel: :class:`~modelparallel.parallel.ParallelOptions` (placement strategy,
            all-reduce buckets...); ``data_parallel`` overrides its degree.
        trace: A directory: record every step's actions on every rank and have rank 0 write
            them to ``DIR/trace.json`` (Chrome trace / Perfetto JSON; ``partition-plan report
            plan.json --trace DIR/trace.json`` draws it; data-parallel replica ``k > 0`` writes
            ``DIR/replica{k}/trace.json``). Default: ``$MODELPARALLEL_TRACE``, if set
            (``modelparallel/runtime/trace.py``).
        **planning_kwargs: Fields of :class:`PlanningOptions`.

    Returns:
        This rank's :class:`Pipeline`.

    Raises:
        PlanMismatchError: if the plan was made for another model or world size (before any
            communication).
        ConfigError: for invalid options.
        PeerFailedError: if another rank failed while building the pipeline.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 1))
        >>> pipe = pipeline(model, torch.randn(8, 4), loss_fn=torch.nn.functional.mse_loss,
        ...                 microbatches=2)
        >>> result = pipe.step(torch.randn(8, 4), torch.randn(8, 1))
        >>> result.outputs.shape
        torch.Size([8, 1])
    """
    if planning is None:
        planning = PlanningOptions(**planning_kwargs)
    elif planning_kwargs:
        raise ConfigError("give planning options either as planning=PlanningOptions(...) or as "
                          f"keyword arguments, not both (got {sorted(planning_kwargs)})")
    if timeout <= 0:
        raise ConfigError(f"timeout = {timeout} must be > 0 seconds")
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    running = init_distributed(dev, timeout)
    world = dist.get_world_size() if running else 1
    rank = dist.get_rank() if running else 0
    if plan is not None:
        plan.check_world_size(world)
        if partitions is not None and partitions != plan.partitions:
            raise ConfigError(f"partitions = {partitions} but the plan has {plan.partitions} "
                              "stages; leave partitions out to use the plan's")
    par = parallel if parallel is not None else ParallelOptions()
    if data_parallel is not None:
        par = dataclasses.replace(par, data_parallel=data_parallel)
    dp = par.data_parallel
    p = plan.partitions if plan is not None else (partitions or max(1, world // dp))
    if p * dp != world:
        hint = (f"; for {world // p} data-parallel replicas pass data_parallel={world // p}"
                if world % p == 0 and world != p * dp else "")
        raise ConfigError(
            f"the pipeline has {p} stages × {dp} data-parallel replicas = {p * dp} processes "
            f"but {world} are running; start torchrun --nproc_per_node {p * dp}{hint}")
    m = microbatches if microbatches is not None else (
        plan.config.microbatches if plan is not None else 1)
    raw = schedule if schedule is not None else (
        plan.config.schedule if plan is not None else "1f1b")
    v = virtual_stages if virtual_stages is not None else (
        plan.config.virtual_stages if plan is not None else 1)
    if plan is not None and v != plan.config.virtual_stages:
        raise ConfigError(f"virtual_stages = {v} but the plan has "
                          f"{plan.config.virtual_stages} stages per rank; leave virtual_stages "
                          "out to use the plan's")
    check_virtual_stages(raw, v, ranks=p)
    sched = normalize_schedule(raw)
    if m < 1:
        raise ConfigError(f"microbatches = {m} must be >= 1")
    pipe = Pipeline(model, loss_fn=loss_fn, plan=plan, partitions=p, microbatches=m,
                    schedule=sched, virtual_stages=v, device=dev, planning=planning,
                    input_split_axes=dict(input_split_axes or {}),
                    non_split_inputs=tuple(non_split_inputs), average_grads=average_grads,
                    return_outputs=return_outputs, timeout=timeout, rank=rank,
                    distributed=running, trace_method=trace_method,
                    leaf_modules=tuple(leaf_modules), parallel=par)
    pipe.trace_dir = trace_directory(trace)
    if example_inputs is not None:
        pipe._build(example_inputs)
    return pipe


class Pipeline(StateDictMethods):
    """This rank's part of a pipeline-parallel model. Build it with :func:`pipeline`.

    Attributes:
        plan: The plan (``None`` until partitioned).
        stage: This rank's stage index (its ``pp_rank``).
        placement: The rank grid (:class:`~modelparallel.placement.Placement`): stages ×
            data-parallel replicas.
        dp_rank: This rank's replica.
        program: This rank's :class:`~modelparallel.codegen.StageProgram` (after partitioning).
        device: Where the stage runs.
    """

    def __init__(self, model: nn.Module, *, loss_fn: Callable[[Any, Any], torch.Tensor],
                 plan: Plan | None, partitions: int, microbatches: int, schedule: str,
                 virtual_stages: int,
                 device: torch.device, planning: PlanningOptions,
                 input_split_axes: dict[str | int, int], non_split_inputs: tuple[str | int, ...],
                 average_grads: bool, return_outputs: bool, timeout: float, rank: int,
                 distributed: bool, trace_method: str, leaf_modules: tuple[Any, ...],
                 parallel: ParallelOptions | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.plan = plan
        self.partitions = partitions
        self.microbatches = microbatches
        self.schedule = schedule
        self.virtual_stages = virtual_stages
        # "cuda" without an index means the current device, as in torch; set_device needs one.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.planning = planning
        self.input_split_axes = input_split_axes
        self.non_split_inputs = non_split_inputs
        self.average_grads = average_grads
        self.return_outputs = return_outputs
        self.timeout = timeout
        self.rank = rank
        self.parallel = parallel if parallel is not None else ParallelOptions()
        self.placement = Placement(pp=partitions, dp=self.parallel.data_parallel,
                                   strategy=self.parallel.placement_strategy)
        coords = self.placement.coords(rank)
        self.stage = coords.pp_rank
        self.dp_rank = coords.dp_rank
        self.dp_group: Any = None  # the stage's data-parallel process group, once built
        self.scaler: Any = None  # fp16: the PipelineGradScaler (Note [fp16 loss scaling])
        self.distributed = distributed
        self.trace_method = trace_method
        self.leaf_modules = leaf_modules
        self.program: Any = None
        self.programs: tuple[Any, ...] = ()
        self.traced: Any = None
        self._executor: StageExecutor | None = None
        #: Where step traces go (``pipeline(trace=...)``), and their recorder once built.
        self.trace_dir: Path | None = None
        self.recorder: Any = None
        self._comm: StageComm | None = None
        # Front ends may adjust the planning options from the trace when rank 0 plans
        # (modelparallel.torch: SMP's manual placements as pins, measured node times):
        # planning_for(traced, mb_args, mb_kwargs, options) -> options.
        self.planning_for: Callable[..., PlanningOptions] | None = None

    # -- building ----------------------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        """Whether the model has been split (SMP's ``model.partitioned``)."""
        return self._executor is not None

    @property
    def executor(self) -> StageExecutor:
        """This rank's :class:`~modelparallel.runtime.executor.StageExecutor` (after
        partitioning), for front ends that drive the steps themselves (``modelparallel.torch``).

        Raises:
            ConfigError: if the model is not partitioned yet.
        """
        return self._require()

    def _build(self, inputs: Inputs, *, presplit: bool = False) -> None:
        """Trace, plan and build this rank's stage (Note [pipeline setup]); ``presplit``:
        ``inputs`` is already one microbatch, as an ``(args, kwargs)`` pair (SMP's step cuts the batch
        itself)."""
        from modelparallel.codegen import build_stage, materialize
        from modelparallel.runtime.channels import executed_communication
        from modelparallel.tracer import trace

        args, kwargs = inputs if presplit else _as_call(inputs)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL object collectives use the current device
        store = dist.distributed_c10d._get_default_store() if self.distributed else None
        ranks = list(self.placement.pipeline_of(self.rank))
        namespace = pipeline_namespace(store, self.rank) if store is not None else ""
        round_ = (SetupRound(store, namespace, self.rank, list(range(self.placement.world)),
                             self.timeout)
                  if store is not None else None)
        try:
            mb_args, mb_kwargs = (args, kwargs) if presplit else first_microbatch(
                self.model, args, kwargs, self.microbatches, self.input_split_axes,
                self.non_split_inputs)
            traced = trace(self.model, mb_args, mb_kwargs, method=self.trace_method,
                           leaf_modules=self.leaf_modules)
            if self.plan is not None:
                self.plan.check_graph(traced.graph)
            plan = self._agree_on_plan(traced, round_, mb_args, mb_kwargs)
            plan.check_graph(traced.graph)
            how = executed_communication(traced, plan, self.schedule, self.microbatches,
                                         tagged=self.device.type != "cuda")
            programs = tuple(build_stage(traced, plan, s, communication=how)
                             for s in range(self.stage, plan.num_stages, plan.partitions))
            for program in programs:
                if any(t.is_meta for t in _held(program.module)):
                    materialize(program, self.device)
                program.module.to(self.device)
            program = programs[0]
            _apply_features(programs, traced.graph, plan.config)
        except BaseException as e:
            if round_ is not None:
                round_.fail(e)
            raise
        if round_ is not None:
            round_.agree()
        self.traced, self.plan, self.program = traced, plan, program
        self.programs = programs
        from modelparallel.report import empty_stages_note

        note = empty_stages_note(plan)
        if note is not None and self.rank == 0:
            warnings.warn(f"{note}.",
                          RuntimeWarning, stacklevel=3)
        if not any(p.requires_grad for q in programs for p in q.module.parameters()):
            warnings.warn(
                f"stage {self.stage} of {self.partitions} holds no trainable parameters (the "
                "plan gives it only parameter-free work, or none: the model may be too small "
                "for this many stages); do not build an optimizer over its empty parameter list",
                RuntimeWarning, stacklevel=3)
        split = resolve_split(program.input_names, self.microbatches, self.input_split_axes,
                              self.non_split_inputs)
        comm = (StageComm.create(self.stage, ranks, self.device, self.timeout, namespace,
                                 replicas=self.placement.pipelines())
                if self.placement.world > 1 else None)
        self._comm = comm
        self._executor = StageExecutor(programs, comm, loss_fn=self.loss_fn,
                                       schedule=self.schedule, split=split,
                                       average_grads=self.average_grads, device=self.device,
                                       grad_sync=self._grad_sync(programs, comm),
                                       active_microbatches=plan.config.active_microbatches,
                                       check_inputs=traced.check_inputs)
        if self.trace_dir is not None:
            from modelparallel.runtime.trace import attach_recorder

            # Replica 0 writes DIR/trace.json; data-parallel replica k, DIR/replica{k}/.
            where = self.trace_dir if self.dp_rank == 0 else (
                self.trace_dir / f"replica{self.dp_rank}")
            self.recorder = attach_recorder(
                self._executor, where,
                gather=comm.all_gather_object if comm is not None else None,
                metadata={"model": plan.model.name, "fingerprint": plan.model.fingerprint})
        if plan.config.precision == "fp16":
            from modelparallel.runtime.precision import PipelineGradScaler

            self.scaler = PipelineGradScaler()

    def _grad_sync(self, programs: tuple[Any, ...], comm: StageComm | None
                   ) -> GradientSync | None:
        """The stages' data-parallel gradient averaging (collective: creates the groups)."""
        dp = self.placement.dp
        if dp == 1 or comm is None:
            return None
        self.dp_group = comm.own_group(self.placement.dp_groups())
        tied = [q.tensor(name) for q in programs for name in q.shared_params]
        params = [t for q in programs for t in q.module.parameters()]
        return GradientSync(params, comm, self.dp_group, dp,
                            self.microbatches, bucket_cap_bytes=self.parallel.bucket_cap_bytes,
                            overlap=self.parallel.overlap_allreduce, late=tied,
                            check_uneven=self.parallel.check_uneven)

    def _agree_on_plan(self, traced: Any, round_: SetupRound | None, mb_args: tuple[Any, ...],
                       mb_kwargs: dict[str, Any]) -> Plan:
        if self.plan is not None:
            return self.plan
        if self.rank != 0:
            assert round_ is not None
            plan = Plan.from_json(round_.fetch("plan", 0))
            if plan.model.fingerprint != traced.graph.fingerprint():
                raise PlanMismatchError(
                    f"rank {self.rank} traced the model to fingerprint "
                    f"{traced.graph.fingerprint()[:12]} but rank 0 planned for "
                    f"{plan.model.fingerprint[:12]}: the ranks built different models. Build "
                    "the model identically on every rank (same code, config and seed).")
            return plan
        plan = self._make_plan(traced, mb_args, mb_kwargs)
        if round_ is not None:
            round_.publish("plan", plan.to_json(indent=None))
        return plan

    def _make_plan(self, traced: Any, mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any]
                   ) -> Plan:
        from modelparallel.partitioner import partition

        opts = self.planning
        if self.planning_for is not None:
            opts = self.planning_for(traced, mb_args, mb_kwargs, opts)
        config = PlanConfig.of(opts, partitions=self.partitions, microbatches=self.microbatches,
                               schedule=self.schedule, virtual_stages=self.virtual_stages)
        if self.placement.dp > 1:  # the plan is for one replica of dp (Note [memory features])
            config = dataclasses.replace(config, data_parallel=self.placement.dp)
        devices = self._device_specs()
        costs = None
        if opts.node_times is not None:
            from modelparallel.cost_model.node_times import NodeTimesFile, measured_costs

            measured = NodeTimesFile.load(opts.node_times, traced.graph)
            costs = measured_costs(traced.graph, devices, measured, optimizer=config.optimizer)
        return partition(traced.graph, config, devices, method=opts.method, costs=costs,
                         samples_per_microbatch=_batch_size(mb_args, mb_kwargs))

    def _device_specs(self) -> list[DeviceSpec]:
        spec = self.planning.device_spec
        if spec is None:
            spec = "h100" if self.device.type == "cuda" else "cpu"
        return list(stage_devices(spec, self.partitions, memory=self.planning.memory,
                                  what="device_spec"))

    def _ready(self, inputs: Inputs) -> StageExecutor:
        if self._executor is None:
            self._build(inputs)
        assert self._executor is not None
        return self._executor

    def _require(self) -> StageExecutor:
        if self._executor is None:
            raise ConfigError(
                "the model is not partitioned yet: pass example_inputs to pipeline(), or run "
                "one step first (partitioning happens at the first step)")
        return self._executor

    # -- running -----------------------------------------------------------------------------------

    def step(self, inputs: Inputs, targets: Any, *, return_outputs: bool | None = None
             ) -> StepResult:
        """One training step: forward and backward of every microbatch through the pipeline.

        Gradients accumulate into this rank's parameters' ``.grad`` (averaged over microbatches
        unless ``average_grads=False``); call your optimizer's ``step`` afterwards and
        ``zero_grad`` before the next step, as in plain PyTorch.

        Args:
            inputs: A batch shaped like ``example_inputs``.
            targets: The targets of the batch (split along axis 0 like the inputs).
            return_outputs: Override the pipeline's ``return_outputs`` for this step.

        Returns:
            The mean loss and the outputs, on every rank.

        Raises:
            ConfigError: if the batch does not divide into the microbatches (every rank).
            PeerFailedError: if another rank failed during the step.
            StepTimeoutError: if a wait on another rank ran out.
        """
        ex = self._ready(inputs)
        flat = self._flatten(inputs)
        if self.scaler is not None:
            ex.loss_scale = self.scaler.scale
        out = ex.train_step(flat, targets, return_outputs=self.return_outputs
                            if return_outputs is None else return_outputs)
        if self.scaler is not None:
            self.scaler.unscale(self.parameters())
        return StepResult(out.loss, out.outputs)

    def make_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any
                       ) -> torch.optim.Optimizer:
        """An optimizer over this rank's parameters: ZeRO-1 over the stage's replicas when the
        plan shards optimizer state (``shard_optimizer_state``), else a plain one.

        Collective over the stage's data-parallel group when sharded.
        """
        params = list(self.parameters())
        if self.plan is not None and self.plan.config.shard_optimizer_state \
                and self.dp_group is not None:
            from modelparallel.runtime.zero import shard_optimizer

            return shard_optimizer(params, optimizer_class, self.dp_group, **kwargs)
        return optimizer_class(params, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()``, or with fp16 the scaler's step and update (skipped on every
        rank when any rank's gradients overflowed); returns whether the step ran."""
        if self.scaler is None:
            optimizer.step()
            return True
        ran = self.scaler.step(optimizer)
        self.scaler.update()
        return bool(ran)

    def eval_step(self, inputs: Inputs) -> Any:
        """Forward only, without gradients; returns the outputs on every rank."""
        ex = self._ready(inputs)
        return ex.eval_step(self._flatten(inputs))

    def train(self, mode: bool = True) -> Pipeline:
        """Set this stage's modules to training (or evaluation) mode."""
        for program in self.programs:
            program.module.train(mode)
        self.model.train(mode)
        return self

    def eval(self) -> Pipeline:
        """Same as ``train(False)``."""
        return self.train(False)

    def _flatten(self, inputs: Inputs) -> list[Any]:
        args, kwargs = _as_call(inputs)
        # non-tensor values are checked on rank 0's batch (StageExecutor's check_inputs)
        return list(self.traced.flatten_inputs(args, kwargs, check=False))

    def close(self) -> None:
        """Release the pipeline's process groups (the pipeline is unusable afterwards)."""
        if self._comm is not None:
            self._comm.close()

    def __repr__(self) -> str:
        state = "partitioned" if self.partitioned else "not partitioned yet"
        return (f"Pipeline(stage {self.stage} of {self.partitions}, {self.microbatches} "
                f"microbatches, {self.schedule}, {self.device}, {state})")


# -- helpers -----------------------------------------------------------------------------------------


def _as_call(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


def _apply_features(programs: Sequence[Any], graph: Any, config: PlanConfig) -> None:
    """Checkpointing, offload and autocast of the plan (Note [checkpoint regions])."""
    from modelparallel.codegen.checkpointing import apply_memory_features

    for q in programs:
        apply_memory_features(q, graph, checkpointing=config.checkpointing,
                              module_depth=config.module_depth,
                              offload=config.offload_activations, precision=config.precision)


def _held(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
