"""``smp.DistributedModel``: the user's module, partitioned at the first step onto our pipeline.

The wrapper holds the user's module (``model.module``); its parameters are the user's own
objects, and each rank's stage refers to the same objects (Note [stage parameters] in
``modelparallel/codegen/build.py``), so an optimizer built from ``model.parameters()`` before the
first step updates exactly this rank's stage: parameters of other stages never get a gradient
and torch optimizers skip them. ``model(...)`` and ``model.backward(...)`` are only legal inside
an ``smp.step`` function (Note [smp step] in ``modelparallel/torch/stepping.py``), except with
one partition, where they run the module directly like SMP.

Example:
    >>> import modelparallel.torch as smp
    >>> smp.init({"partitions": 1, "microbatches": 2})
    >>> model = smp.DistributedModel(torch.nn.Linear(4, 1))
    >>> @smp.step
    ... def train_step(model, x, y):
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     model.backward(loss)
    ...     return loss
    >>> loss = train_step(model, torch.randn(8, 4), torch.randn(8, 1))
    Partition assignments:
      (all): 0
    >>> len(loss.outputs), model.partitioned
    (2, True)
    >>> smp.state_mod.shutdown()
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from modelparallel.errors import ConfigError, UnsupportedFeatureError, UsageError
from modelparallel.torch._bodies import _Body, current_body
from modelparallel.torch.state_mod import state

__all__ = ["DistributedModel", "PARTIAL_MARKER"]

#: Key that marks a partial (one rank's) state dict, as in SMP.
PARTIAL_MARKER = "_smp_is_partial"


class _Handle:
    """Removes a registered hook."""

    def __init__(self, hooks: list[Any], hook: Any) -> None:
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


class DistributedModel(nn.Module):
    """SMP's ``DistributedModel``: wrap the model once, after ``smp.init``, and use the wrapper.

    Args:
        module: The user's model (built the same way on every rank).
        trace_device: ``"gpu"`` or ``"cpu"``; accepted (our trace runs on fake tensors, so no
            device memory is used either way).
        trace_execution_times: Plan with measured node times instead of the roofline.
        overlapping_allreduce, backward_passes_per_step, bucket_cap_mb, broadcast_buffers,
        gradient_as_bucket_view, find_unused_parameters: DDP options, stored for hybrid data
            parallelism.
        average_grads_across_microbatches: Gradients are the mean over microbatches (else the
            sum).
        trace_memory_usage: Accepted (the cost model estimates memory per node).

    Raises:
        UsageError: before ``smp.init``, or when a second model is wrapped without
            ``smp.reset()``.
    """

    def __init__(self, module: nn.Module, trace_device: str = "gpu",
                 trace_execution_times: bool = False, overlapping_allreduce: bool = True,
                 backward_passes_per_step: int = 1,
                 average_grads_across_microbatches: bool = True, bucket_cap_mb: int = 25,
                 trace_memory_usage: bool = False, broadcast_buffers: bool = True,
                 gradient_as_bucket_view: bool = False,
                 find_unused_parameters: bool = False) -> None:
        state.require()
        if state.model is not None:
            raise UsageError("only one smp.DistributedModel per script; call smp.reset() "
                             "before wrapping another model")
        if not isinstance(module, nn.Module):
            raise ConfigError(f"DistributedModel wraps an nn.Module, not "
                              f"{type(module).__name__}")
        if trace_device not in ("gpu", "cpu"):
            raise ConfigError(f"trace_device = {trace_device!r}; use 'gpu' or 'cpu'")
        if trace_execution_times and trace_device == "cpu":
            raise ConfigError("trace_execution_times = True needs trace_device = 'gpu' "
                              "(SMP's rule: times measured on the CPU mislead the planner)")
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ConfigError(f"backward_passes_per_step = {backward_passes_per_step!r} must "
                              "be a positive int")
        super().__init__()
        self.module = module
        self.trace_device = trace_device
        self.trace_execution_times = trace_execution_times
        #: With ``trace_execution_times``: the node-times file rank 0 measured and planned with
        #: (``modelparallel.cost_model.node_times.NodeTimesFile``), after the first step.
        self.node_times_file: str | None = None
        self.average_grads_across_microbatches = average_grads_across_microbatches
        self.ddp_options = {"overlapping_allreduce": overlapping_allreduce,
                            "backward_passes_per_step": backward_passes_per_step,
                            "bucket_cap_mb": bucket_cap_mb,
                            "broadcast_buffers": broadcast_buffers,
                            "gradient_as_bucket_view": gradient_as_bucket_view,
                            "find_unused_parameters": find_unused_parameters}
        self.trace_memory_usage = trace_memory_usage
        self._pipe: Any = None
        self._bodies: list[_Body] = []
        self._post_partition_hooks: list[Callable[..., Any]] = []
        self._post_step_hooks: list[Callable[..., Any]] = []
        self._deferred: list[tuple[dict[str, Any], bool]] = []
        self._resume_plan: Any = None
        state.model = self
        state.models += 1

    # -- SMP's properties ---------------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        """False until the first step partitions the model."""
        return self._pipe is not None and self._pipe.partitioned

    def get_module(self) -> nn.Module:
        """The wrapped user module."""
        return self.module

    @property
    def pipeline(self) -> Any:
        """The underlying :class:`modelparallel.api.Pipeline` (after partitioning)."""
        if not self.partitioned:
            raise UsageError("the model is not partitioned yet: run one smp.step first")
        return self._pipe

    # -- calling ------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        body = current_body()
        if body is not None:
            return body.model_call(args, kwargs)
        if state.require().pp == 1 and not state.cfg.ddp:  # type: ignore[union-attr]
            return self.module(*args, **kwargs)  # SMP allows this with one partition
        raise UsageError("the DistributedModel was called outside an smp.step function; call "
                         "model(...) inside a function decorated with @smp.step (only "
                         "partitions = 1 allows calls outside)")

    def backward(self, tensors: Any, grad_tensors: Any = None) -> None:
        """Back-propagate ``tensors`` (a loss, or tensors with ``grad_tensors``) through the
        pipeline; replaces ``loss.backward()`` inside ``smp.step``."""
        body = current_body()
        if body is not None:
            body.backward(tensors, grad_tensors)
            return
        if state.require().pp == 1 and not state.cfg.ddp:  # type: ignore[union-attr]
            torch.autograd.backward(tensors, grad_tensors)
            return
        raise UsageError("model.backward was called outside an smp.step function; call it "
                         "inside the function decorated with @smp.step, after model(...)")

    # -- the step (Note [smp step]) ----------------------------------------------------------------

    def _run_bodies(self, bodies: list[_Body], *, train: bool) -> None:
        if not self.partitioned:
            self._partition(bodies[0])
        pipe = self._pipe
        self._bodies = bodies
        if train and state.cfg is not None and state.cfg.fp16:  # Note [smp fp16]
            scaler = getattr(state.optimizer, "loss_scaler", None)
            if scaler is None:
                raise UsageError("fp16 = True needs smp.DistributedOptimizer(optimizer): it "
                                 "unscales the gradients and skips steps that overflowed; "
                                 "wrap the optimizer before the first step")
            pipe.executor.loss_scale = scaler.loss_scale
        flat = [pipe.traced.flatten_inputs(*_inputs(b)) for b in bodies]
        errors: list[BaseException] = []
        pipe.executor.run_microbatches(
            flat, [b.index for b in bodies], train=train, return_outputs=True, merge=False,
            context=lambda i: _autocast(bodies[i].autocast, pipe.device), shared=True,
            on_result=functools.partial(_resumers, bodies, errors))
        if errors:  # the first body's error, once every body has stopped (as resume_all)
            raise errors[0]
        for b in bodies:
            assert b.where == "done", b.where  # a second model call raised in the body
        self._bodies = []
        for hook in list(self._post_step_hooks):
            hook(self, state.optimizer)

    def _loss(self, output: Any, index: int) -> torch.Tensor:
        """The executor's loss on the last stage: resume the body with the real output and take
        what it gives ``model.backward`` (Note [smp step], 4)."""
        body = next(b for b in self._bodies if b.index == index)
        body.resume(output)
        if body.backward_call is None:
            raise UsageError(
                f"microbatch {index} of the smp.step returned without calling "
                "model.backward(...) while gradients are enabled; call model.backward(loss) in "
                "the step function, or run evaluation steps under torch.no_grad()")
        assert body.backward_call is not None
        tensors, grads = body.backward_call
        terms = []
        for t, g in zip(tensors, grads):
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"model.backward got a {type(t).__name__}; give it tensors")
            if not t.requires_grad:
                continue
            if g is None:
                if t.numel() != 1:
                    raise ConfigError(
                        f"model.backward got a tensor of shape {tuple(t.shape)} without "
                        "grad_tensors; give a scalar loss or grad_tensors")
                terms.append(t.sum())
            else:
                terms.append((t * g.detach().to(t.device)).sum())
        if not terms:
            return torch.zeros((), device=self._pipe.device)
        total = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        if self.average_grads_across_microbatches:
            assert state.cfg is not None
            total = total / state.cfg.microbatches
        return total

    def _partition(self, first: _Body) -> None:
        import modelparallel
        from modelparallel.torch.creation import checkpoint_paths

        cfg = state.cfg
        assert cfg is not None and first.model_inputs is not None
        active = _active(cfg.pipeline, cfg.partitions, cfg.microbatches,
                         int(cfg.active_microbatches or 1))
        plan = self._resume_plan
        if plan is None and cfg.load_partition and cfg.partition_file:
            from modelparallel.plan import load_plan

            plan = load_plan(cfg.partition_file)
        if plan is not None:  # the config's memory features, on a given partition
            import dataclasses

            plan = dataclasses.replace(plan, config=dataclasses.replace(
                plan.config, precision=cfg.precision,
                shard_optimizer_state=cfg.shard_optimizer_state))
        from modelparallel.parallel import ParallelOptions

        layout = state.require()
        # ddp: replicas of the pipeline, gradients averaged over each stage's replicas
        # (modelparallel.runtime.data_parallel) with DistributedModel's DDP options.
        parallel = ParallelOptions(
            data_parallel=layout.dp, placement_strategy=cfg.placement_strategy,
            bucket_cap_mb=float(self.ddp_options["bucket_cap_mb"]),
            overlap_allreduce=bool(self.ddp_options["overlapping_allreduce"]))
        pipe = modelparallel.pipeline(
            self.module, None, loss_fn=self._loss, plan=plan, partitions=cfg.partitions,
            microbatches=cfg.microbatches, schedule=cfg.schedule, device=state.device,
            average_grads=False, timeout=state.timeout, optimize=cfg.optimize,
            memory_weight=cfg.memory_weight, parallel=parallel, active_microbatches=active,
            checkpointing=checkpoint_paths(self.module) or "none",
            offload_activations=cfg.offload_activations, precision=cfg.precision,
            shard_optimizer_state=cfg.shard_optimizer_state)
        pipe.planning_for = self._planning_for
        before = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        state.tracing = True
        try:
            pipe._build(first.model_inputs, presplit=True)
        finally:
            state.tracing = False
        now = dict(self.module.named_parameters(remove_duplicate=False))
        # Materialised (meta) parameters are new objects (Note [delayed parameters]).
        renamed = {i: now[n] for i, n in before.items() if n in now and id(now[n]) != i}
        self._pipe = pipe
        if cfg.partition_file and not cfg.load_partition and state.rank == 0 and pipe.plan:
            pipe.plan.save(cfg.partition_file)
        if state.rank == 0:
            print(_assignments(pipe.plan), flush=True)
        for sd, strict in self._deferred:
            self._load_now(sd, strict)
        self._deferred.clear()
        if state.optimizer is not None and hasattr(state.optimizer, "_after_partition"):
            state.optimizer._after_partition(renamed)
        for hook in list(self._post_partition_hooks):
            hook(self, state.optimizer)

    def _planning_for(self, traced: Any, mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any],
                      options: Any) -> Any:
        """Rank 0's planning options from the trace: placements as pins (Note [smp
        placement]) and, with ``trace_execution_times``, measured node times."""
        import dataclasses

        from modelparallel.torch.placement import placement_pins

        assert state.cfg is not None
        pins = placement_pins(self.module, traced.graph, state.cfg)
        options = dataclasses.replace(options, pins={**options.pins, **pins})
        if self.trace_execution_times:
            self.node_times_file = _measure(traced, mb_args, mb_kwargs)
            options = dataclasses.replace(options, node_times=self.node_times_file)
        return options

    def _use_plan(self, plan: Any) -> None:
        """Partition with ``plan`` (a resumed partial checkpoint's, Note [smp checkpoints])."""
        if self.partitioned:
            if dict(plan.assignment) != dict(self._pipe.plan.assignment):
                raise UsageError(
                    "the partial checkpoint was saved with another partition than this "
                    "model's, which is already partitioned; resume before the first step, or "
                    "resume from a full checkpoint (partial=False)")
            return
        self._resume_plan = plan

    # -- local objects ------------------------------------------------------------------------------

    def _stage(self) -> nn.Module:
        return self._pipe.program.module if self.partitioned else self.module

    def local_parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (all of them before partitioning)."""
        for _, p in self.local_named_parameters():
            yield p

    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters with their names in the user's module."""
        mine = {id(p) for p in self._stage().parameters()}
        for name, p in self.module.named_parameters():
            if id(p) in mine:
                yield name, p

    def local_buffers(self) -> Iterator[torch.Tensor]:
        """This rank's buffers."""
        for _, b in self.local_named_buffers():
            yield b

    def local_named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's buffers with their names in the user's module."""
        mine = {id(b) for b in self._stage().buffers()}
        for name, b in self.module.named_buffers():
            if id(b) in mine:
                yield name, b

    def local_modules(self) -> Iterator[nn.Module]:
        """The user's submodules this rank runs."""
        for _, m in self.local_named_modules():
            yield m

    def local_named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The user's submodules this rank runs, with their names."""
        mine = {id(m) for m in self._stage().modules()}
        for name, m in self.module.named_modules():
            if id(m) in mine:
                yield name, m

    # -- state --------------------------------------------------------------------------------------

    def local_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """This rank's parameters and buffers, with the marker key ``_smp_is_partial``."""
        if not self.partitioned:
            out: dict[str, Any] = dict(self.module.state_dict())
        else:
            out = dict(self._pipe.local_state_dict())
        out[PARTIAL_MARKER] = True
        return out

    def state_dict(self, *args: Any, gather_to_rank0: bool = False,  # type: ignore[override]
                   **kwargs: Any) -> dict[str, Any]:
        """The full model's state dict, gathered over the pipeline: a collective, call it on
        every rank (with ``gather_to_rank0``, ranks other than 0 get ``{}``)."""
        if not self.partitioned:
            return dict(self.module.state_dict())
        from modelparallel.torch._agree import collective

        full = collective("state_dict()", self._pipe, self._pipe.state_dict)
        if gather_to_rank0 and state.rank != 0:
            return {}
        return dict(full)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        same_partition_load: bool = False) -> Any:  # type: ignore[override]
        """Load a full or partial state dict; before partitioning the load is deferred until
        the first step has partitioned the model."""
        sd = dict(state_dict)
        partial = bool(sd.pop(PARTIAL_MARKER, False))
        if not self.partitioned:
            if not partial:
                return self.module.load_state_dict(sd, strict=strict)
            self._deferred.append((sd, strict))
            return None
        return self._load_now(sd, strict)

    def _load_now(self, sd: dict[str, Any], strict: bool) -> Any:
        return self._pipe.load_state_dict(sd, strict=strict)

    # -- hooks and modes ----------------------------------------------------------------------------

    def register_post_partition_hook(self, hook: Callable[..., Any]) -> _Handle:
        """Run ``hook(model, optimizer)`` once after partitioning, before the first forward."""
        self._post_partition_hooks.append(hook)
        return _Handle(self._post_partition_hooks, hook)

    def register_post_step_hook(self, hook: Callable[..., Any]) -> _Handle:
        """Run ``hook(model, optimizer)`` after every step."""
        self._post_step_hooks.append(hook)
        return _Handle(self._post_step_hooks, hook)

    def join(self, divide_by_initial_world_size: bool = True, enable: bool = True,
             throw_on_early_termination: bool = False) -> contextlib.AbstractContextManager[Any]:
        """DDP's uneven-inputs context. Replicas must run the same number of steps: a replica
        whose batches differ or run out raises
        :class:`~modelparallel.errors.UnevenDataError` on every replica (the runtime checks
        each step), which is DDP's ``throw_on_early_termination=True``; so that, or
        ``enable=False``, or one replica, gives a context that changes nothing.

        Raises:
            UnsupportedFeatureError: for DDP's default of shadowing the finished replicas'
                steps (``throw_on_early_termination=False`` with several replicas).
        """
        if not enable or throw_on_early_termination or state.require().dp == 1:
            return contextlib.nullcontext()
        raise UnsupportedFeatureError(
            "model.join() with uneven inputs (DDP shadowing the steps of replicas that ran out "
            "of data) is not supported yet by modelparallel.torch; give every replica the same "
            "number of batches (DistributedSampler with drop_last=True) and use "
            "model.join(throw_on_early_termination=True), or no join: uneven data then raises "
            "UnevenDataError on every replica")

    def register_comm_hook(self, state: Any, hook: Callable[..., Any]) -> None:
        """DDP communication hooks: not supported yet.

        Raises:
            UnsupportedFeatureError: always (the runtime all-reduces gradient buckets itself,
                ``modelparallel/runtime/data_parallel.py``).
        """
        raise UnsupportedFeatureError(
            "model.register_comm_hook is not supported yet by modelparallel.torch: gradients "
            "are averaged over the data-parallel replicas by the runtime's own bucketed "
            "all-reduce (DistributedModel's bucket_cap_mb and overlapping_allreduce tune it); "
            "remove the hook, or average or compress gradients after the step yourself")

    _register_comm_hook = register_comm_hook

    def train(self, mode: bool = True) -> DistributedModel:
        super().train(mode)
        if self._pipe is not None and self._pipe.partitioned:
            self._pipe.train(mode)
        return self

    def to(self, *args: Any, **kwargs: Any) -> DistributedModel:  # type: ignore[override]
        """Ignored, like SMP: each stage is moved to its device at partitioning."""
        return self

    def cuda(self, device: Any = None) -> DistributedModel:  # type: ignore[override]
        """Ignored, like SMP (see :meth:`to`)."""
        return self

    def cpu(self) -> DistributedModel:  # type: ignore[override]
        """Gather every parameter and buffer to the CPU copy of the user's module (collective);
        the model is then for saving or inspection, not for further pipelined steps."""
        full = self.state_dict()
        self.module.cpu()
        with torch.no_grad():
            for name, t in list(self.module.state_dict(keep_vars=True).items()):
                if name in full and isinstance(t, torch.Tensor):
                    t.copy_(full[name])
        return self

    def _close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()


def _measure(traced: Any, mb_args: tuple[Any, ...], mb_kwargs: dict[str, Any]) -> str:
    """Time every node on this rank's device (the existing profiling mode); a node-times file."""
    import tempfile

    import torch.utils._pytree as pytree

    from modelparallel.cost_model.measure import call_overhead, profile_node_times
    from modelparallel.cost_model.node_times import NodeTimesFile

    dev = state.device
    gm = traced.gm.to(dev)
    flat = pytree.tree_map_only(torch.Tensor, lambda t: t.to(dev),
                                list(traced.flatten_inputs(mb_args, mb_kwargs)))
    profiles: dict[str, Any] = {}
    times = profile_node_times(gm, flat, profiles_out=profiles)
    call = call_overhead(dev)
    gm.to("cpu")  # each stage moves its own part at build
    fd, path = tempfile.mkstemp(prefix="smp-node-times-", suffix=".json")
    os.close(fd)
    NodeTimesFile(times=times, profiles=profiles or None, call=call, device=str(dev)).save(path)
    return path


def _inputs(body: _Body) -> tuple[tuple[Any, ...], dict[str, Any]]:
    assert body.model_inputs is not None
    return body.model_inputs


def _resumers(bodies: list[_Body], errors: list[BaseException], result: Any
              ) -> list[Callable[[], None]]:
    """The executor's work once the step's result is here: resume each body still stopped at
    its model call with its microbatch's output, in order, one piece of work per body (Note
    [work after the result] in ``modelparallel/runtime/result.py``). A body's error goes to
    ``errors`` (raised when the step has ended, after every body stopped)."""
    def resume(body: _Body, output: Any) -> None:
        try:
            body.resume(output)
        except BaseException as e:  # the user's error: raised by the caller after the step
            errors.append(e)

    return [functools.partial(resume, b, out) for b, out in zip(bodies, result.outputs)
            if b.where == "model"]


def _active(pipeline: str, p: int, m: int, active: int) -> int | None:
    """The runtime's ``active_microbatches`` for SMP's (Note [active microbatches] in
    ``modelparallel/runtime/waves.py``): ``None`` when the schedule never holds more than
    ``active`` microbatches in flight (GPipe holds all ``m``, 1F1B at most ``p``), else
    ``active`` (the step then runs in waves of that many)."""
    inflight = m if pipeline == "simple" else min(m, p)
    return None if inflight <= active else active


def _autocast(dtypes: dict[str, torch.dtype], device: torch.device
              ) -> contextlib.AbstractContextManager[Any]:
    dtype = dtypes.get(device.type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _assignments(plan: Any) -> str:
    """SMP's ``Partition assignments:`` block: top-level modules and their stages."""
    stages: dict[str, set[int]] = {}
    for node in plan.nodes:
        if node.stage < 0 or node.op == "output":
            continue
        top = node.module_path.split(".")[0] if node.module_path else "(root)"
        stages.setdefault(top, set()).add(node.stage)
    if len(stages) <= 1 and plan.partitions == 1:
        return "Partition assignments:\n  (all): 0"
    lines = ["Partition assignments:"]
    for name, s in stages.items():
        lines.append(f"  {name}: {', '.join(map(str, sorted(s)))}")
    return "\n".join(lines)
