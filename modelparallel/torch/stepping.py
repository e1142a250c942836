"""``@smp.step``: the step function, run once per microbatch and pipelined, and ``StepOutput``.

Note [smp step]
~~~~~~~~~~~~~~~
SMP's step function holds one forward (``model(...)``) and backward (``model.backward(loss)``)
of a microbatch, plus whatever user code surrounds them, and returns what the user wants back.
We run it on our pipeline (``modelparallel.api.Pipeline`` and its
:class:`~modelparallel.runtime.executor.StageExecutor`; no second runtime) like this, on every rank
of the pipeline:

1. **Inputs from pipeline rank 0.** The tensors among the step function's arguments are
   broadcast from pipeline rank 0 (SMP's rule, which AWS's scripts rely on: other ranks feed
   placeholder tensors); every rank first exchanges how many tensors it passes, so a rank with a
   different argument structure fails every rank with the same :class:`ConfigError`.
2. **Split.** The arguments are cut into ``microbatches`` pieces by SMP's rules
   (:func:`split_arguments`: tensors along axis 0 or ``input_split_axes[name]``, containers
   traversed, ``smp_slice`` objects slice themselves, ``non_split_inputs`` and non-tensors are
   passed whole). A batch that does not divide raises on every rank (same data everywhere).
3. **One body per microbatch, as a coroutine.** Each microbatch's call of the step function runs
   on its own thread (worker threads are kept from step to step, :class:`_Worker`), but only
   one thread runs at any time: control passes from the driver to a body and back
   (:class:`_Body`), so user code never runs concurrently and its order is deterministic. The
   thread starts with the step's grad mode and device. Every body first runs up to its
   ``model(...)`` call, which records the model's arguments and the autocast state, and stops.
   The bodies start as a chain (:func:`start_all`): each, when it stops, starts the next, and
   only the last wakes the driver, so a step costs few thread hand-overs (they are most of what
   an SMP step adds to a plain pipeline step, ``benchmarks/_smp_bench.py``).
4. **The pipeline.** The model is partitioned at the first step (from microbatch 0's model
   arguments). The recorded model arguments of every microbatch are the pipeline's inputs;
   the executor runs the schedule (1F1B for ``"interleaved"``, GPipe for ``"simple"``), entering
   each microbatch's autocast state around that microbatch's forward on every stage. On the
   last stage, the executor's loss function of microbatch ``i`` *resumes body i* with the real
   model output: the user's code computes the loss and calls ``model.backward(loss)``, which
   records ``(tensors, grad_tensors)`` and returns; when the body has returned, the executor
   back-propagates the surrogate ``sum(t * g)`` (``t`` itself for a scalar loss), scaled by
   ``1/microbatches`` when ``average_grads_across_microbatches``. So the loss computation is
   interleaved with the schedule, as in SMP, and gradients end as the sum (or mean) over
   microbatches. (Code after ``model.backward`` in the body thus runs before that
   microbatch's backward; SMP's gradients are not final inside a step either: clip and step
   after it.)
5. **Outputs everywhere.** The executor broadcasts the per-microbatch outputs from the last stage;
   every other rank resumes its bodies with them, chained like the start
   (:func:`resume_all`; its ``model.backward`` records only: its stage's backward ran inside
   the schedule), so ``model(...)`` returns the real outputs on every rank and every rank
   computes the same return values.
6. **Results.** Every tensor in the bodies' return values becomes a :class:`StepOutput` of its
   per-microbatch values (detached unless ``detach_outputs=False``); other leaves come back as
   per-microbatch lists; containers (tuples, dicts, Hugging Face ``ModelOutput``) are kept.

``active_microbatches`` caps the microbatches in flight: when the schedule would hold more (GPipe
holds all of them; 1F1B at most ``partitions``), the runtime runs the step in waves of that many
(Note [active microbatches] in ``modelparallel/runtime/waves.py``); otherwise it changes
nothing.

Under ``torch.no_grad()`` the step is forward-only on every stage. A grad-enabled step must
call ``model.backward`` (else a :class:`UsageError` on the last stage, which reaches every rank
as a peer failure).

Example:
    >>> so = StepOutput([torch.tensor(1.0), torch.tensor(3.0)])
    >>> float(so.reduce_mean()), float(so.reduce_sum()), so.concat().tolist()
    (2.0, 4.0, [1.0, 3.0])
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError, UsageError
from modelparallel.torch.state_mod import state

__all__ = ["StepFunction", "StepOutput", "current_body", "split_arguments", "step"]

_local = threading.local()


class StepOutput:
    """One returned tensor's values over the microbatches of a step (SMP's ``StepOutput``).

    Attributes:
        outputs: The per-microbatch tensors, in microbatch order.
    """

    def __init__(self, outputs: Sequence[torch.Tensor]) -> None:
        self.outputs = list(outputs)

    def reduce_mean(self) -> torch.Tensor:
        """The element-wise mean over microbatches (the usual loss reduction)."""
        return torch.stack(self.outputs).mean(dim=0)

    def reduce_sum(self) -> torch.Tensor:
        """The element-wise sum over microbatches."""
        return torch.stack(self.outputs).sum(dim=0)

    def concat(self) -> torch.Tensor:
        """The microbatches concatenated along the batch axis (0-d values stacked)."""
        if self.outputs and self.outputs[0].dim() == 0:
            return torch.stack(self.outputs)
        return torch.cat(self.outputs, dim=0)

    def stack(self) -> torch.Tensor:
        """The microbatches stacked along a new axis 0."""
        return torch.stack(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    def __repr__(self) -> str:
        return f"StepOutput({len(self.outputs)} microbatches)"


class _Abort(BaseException):
    """Unwinds a body whose step failed elsewhere."""


_ABORT = object()


class _Body:
    """One microbatch's call of the step function, as a coroutine on a thread (Note [smp
    step]). The driver calls :func:`start_all`/:meth:`resume`/:func:`resume_all`; the body side
    calls :meth:`model_call`/:meth:`backward` (through ``DistributedModel``)."""

    def __init__(self, index: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], grad: bool, device: torch.device) -> None:
        self.index = index
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.grad, self.device = grad, device
        self.model_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.autocast: dict[str, torch.dtype] = {}
        self.backward_call: tuple[list[torch.Tensor], list[Any]] | None = None
        self.result: Any = None
        self.where = "new"  # new, model, done
        self._to_body: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._to_driver: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._worker: _Worker | None = None
        #: Run on the body's thread right after its next message to the driver: hands control
        #: straight to the next body of a chain (:func:`start_all`, :func:`resume_all`).
        self._then: Callable[[], None] | None = None

    # -- driver side --------------------------------------------------------------------------------

    def resume(self, value: Any = None) -> str:
        """Hand ``value`` to the yielded body and run it until it yields again."""
        assert self.where == "model", self.where
        self._to_body.put(value)
        return self._wait()

    def abort(self) -> None:
        """Unwind a body that is waiting (after a failure)."""
        if self.where == "model":
            self._to_body.put(_ABORT)
            self._to_driver.get()
            self.where = "done"
            self._release()

    def _wait(self) -> str:
        kind, value = self._to_driver.get()
        if kind == "error":
            self.where = "done"
            self._release()
            raise value
        self.where = kind
        if kind == "done":
            self.result = value
            self._release()
        return kind

    def _release(self) -> None:
        if self._worker is not None:
            self._worker.give_back()
            self._worker = None

    def _main(self) -> None:
        _local.body = self
        torch.set_grad_enabled(self.grad)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            value = self.fn(*self.args, **self.kwargs)
        except _Abort:
            message: tuple[str, Any] = ("aborted", None)
        except BaseException as e:  # handed to the driver, which raises it
            message = ("error", e)
        else:
            message = ("done", value)
        _local.body = None
        self.args, self.kwargs = (), {}
        self._send(message)

    def _send(self, message: tuple[str, Any]) -> None:
        then, self._then = self._then, None
        self._to_driver.put(message)
        if then is not None:
            then()

    # -- body side ----------------------------------------------------------------------------------

    def model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``model(*args, **kwargs)`` inside the step: yields, returns the model's output."""
        if self.model_inputs is not None:
            raise UsageError(
                f"the model was called twice in microbatch {self.index} of one smp.step; call "
                "it once per step function (put both calls in the model's forward)")
        self.model_inputs = (args, kwargs)
        self.autocast = {dev: torch.get_autocast_dtype(dev) for dev in ("cpu", "cuda")
                         if torch.is_autocast_enabled(dev)}
        self._send(("model", None))
        reply = self._to_body.get()
        if reply is _ABORT:
            raise _Abort()
        return reply

    def backward(self, tensors: Any, grad_tensors: Any) -> None:
        """``model.backward(tensors, grad_tensors)`` inside the step: records what to
        back-propagate and returns; the executor back-propagates it when the body has returned
        (on the last stage, inside the schedule; elsewhere the stage's backward already ran)."""
        if self.model_inputs is None:
            raise UsageError("model.backward was called before the model in an smp.step "
                             "function; call model(...) first")
        if self.backward_call is not None:
            raise UsageError(f"model.backward was called twice in microbatch {self.index}; "
                             "call it once per step function (sum the losses first)")
        ts = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        if grad_tensors is None:
            gs: list[Any] = [None] * len(ts)
        else:
            gs = list(grad_tensors) if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
        if len(gs) != len(ts):
            raise ConfigError(f"model.backward got {len(ts)} tensors and {len(gs)} "
                              "grad_tensors; give one gradient per tensor")
        self.backward_call = (ts, gs)


def start_all(bodies: Sequence[_Body]) -> list[str]:
    """Run every body up to its first stop, one after the other, as a chain: each body starts
    the next itself, and the driver wakes once, for the last (Note [smp step], 3). Returns
    where each stopped; raises the first body's error after all have stopped."""
    for b in bodies:
        b._worker = _Worker.take()
    for b, nxt in itertools.pairwise(bodies):
        worker = nxt._worker
        assert worker is not None
        b._then = functools.partial(worker.run, nxt._main)
    assert bodies[0]._worker is not None
    bodies[0]._worker.run(bodies[0]._main)
    return _drain(bodies)


def resume_all(bodies: Sequence[_Body], values: Sequence[Any]) -> list[str]:
    """Resume every body with its value, as a chain like :func:`start_all`."""
    if not bodies:
        return []
    for b, nxt, v in zip(bodies, bodies[1:], values[1:]):
        b._then = functools.partial(nxt._to_body.put, v)
    for b in bodies:
        assert b.where == "model", b.where
    bodies[0]._to_body.put(values[0])
    return _drain(bodies)


def _drain(bodies: Sequence[_Body]) -> list[str]:
    error: BaseException | None = None
    where = []
    for b in bodies:  # in order: body k's message was sent before body k+1 ran
        try:
            where.append(b._wait())
        except BaseException as e:  # the first one is raised once every body stopped
            where.append("done")
            error = error or e
    if error is not None:
        raise error
    return where


class _Worker:
    """A thread that runs microbatch bodies, kept between steps (Note [smp step], 3): starting
    a thread per microbatch per step, and each new thread's first torch call, cost more than the
    hand-overs themselves. Only the driver thread takes and gives back workers."""

    _idle: ClassVar[list[_Worker]] = []

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # torch.set_num_threads is per thread for OpenMP: the worker uses the driver's count.
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="smp-step-microbatch")
        self._thread.start()

    @classmethod
    def take(cls) -> _Worker:
        """An idle worker, or a new one."""
        return cls._idle.pop() if cls._idle else cls()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on this worker's thread."""
        self._jobs.put(job)

    def give_back(self) -> None:
        """Return this worker to the idle ones (its job has handed over its last message)."""
        _Worker._idle.append(self)

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            self._jobs.get()()


# A forked child has none of its parent's threads.
os.register_at_fork(after_in_child=_Worker._idle.clear)


def current_body() -> _Body | None:
    """The microbatch body running on this thread, or ``None`` outside ``smp.step``."""
    return getattr(_local, "body", None)


class StepFunction:
    """A function decorated with ``@smp.step``; calling it runs one pipelined step."""

    def __init__(self, fn: Callable[..., Any], non_split_inputs: Iterable[str] | None,
                 input_split_axes: Mapping[str, int] | None, detach_outputs: bool,
                 **fw_kwargs: Any) -> None:
        self.fn = fn
        self.non_split_inputs = frozenset(non_split_inputs or ())
        self.input_split_axes = dict(input_split_axes or {})
        self.detach_outputs = detach_outputs
        self.fw_kwargs = fw_kwargs
        self.signature = inspect.signature(fn)
        names = set(self.signature.parameters)
        for key in (*self.non_split_inputs, *self.input_split_axes):
            if key not in names:
                raise ConfigError(f"smp.step option names argument {key!r}, but "
                                  f"{fn.__name__} takes {sorted(names)}")
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state.require()
        if current_body() is not None:
            raise UsageError("an smp.step function was called inside another one")
        model = state.model
        if model is None:
            raise UsageError("smp.step needs a DistributedModel: wrap the model with "
                             "smp.DistributedModel(model) before calling the step function")
        assert state.cfg is not None
        args, kwargs = _from_pipeline_rank0(args, kwargs)
        m = state.cfg.microbatches
        pieces = split_arguments(self.signature, args, kwargs, m, self.input_split_axes,
                                 self.non_split_inputs)
        grad = torch.is_grad_enabled()
        bodies = [_Body(i, self.fn, a, k, grad, state.device) for i, (a, k) in enumerate(pieces)]
        try:
            where = start_all(bodies)
            if all(w == "done" for w in where):
                pass  # no model call: nothing to pipeline
            elif any(w != "model" for w in where):
                raise UsageError("every microbatch of an smp.step must call the model once "
                                 f"(microbatches stopped at {where}); make the call "
                                 "independent of the data")
            else:
                model._run_bodies(bodies, train=grad)
        finally:
            for b in bodies:
                b.abort()
        return _collect([b.result for b in bodies], self.detach_outputs)


def step(fn: Callable[..., Any] | None = None, *, non_split_inputs: Iterable[str] | None = None,
         input_split_axes: Mapping[str, int] | None = None, detach_outputs: bool = True,
         **fw_kwargs: Any) -> Any:
    """Decorate a step function (``@smp.step`` or ``@smp.step(non_split_inputs=[...])``).

    Args:
        fn: The function: one forward (``model(...)``) and, for training, one
            ``model.backward(loss)``.
        non_split_inputs: Argument names passed whole to every microbatch.
        input_split_axes: Argument name to the axis its tensors are split along (default 0).
        detach_outputs: Detach the returned tensors (default, like SMP).
        **fw_kwargs: Accepted for SMP compatibility (SMP's TensorFlow ``tf.function`` options).

    Returns:
        A :class:`StepFunction` (Note [smp step]).

    Example:
        >>> @step(non_split_inputs=["scale"])
        ... def train_step(model, x, scale):
        ...     return model(x) * scale
        >>> train_step.non_split_inputs
        frozenset({'scale'})
    """
    def wrap(f: Callable[..., Any]) -> StepFunction:
        return StepFunction(f, non_split_inputs, input_split_axes, detach_outputs, **fw_kwargs)

    return wrap(fn) if fn is not None else wrap


# -- splitting ---------------------------------------------------------------------------------------


def split_arguments(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any],
                    m: int, axes: Mapping[str, int], whole: Iterable[str]
                    ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Cut a step function's arguments into ``m`` microbatches by SMP's rules.

    Raises:
        ConfigError: if a split tensor's size does not divide by ``m`` (naming the argument).

    Example:
        >>> sig = inspect.signature(lambda model, x, n: None)
        >>> parts = split_arguments(sig, ("M", torch.arange(4), 3), {}, 2, {}, ())
        >>> [(a[0], a[1].tolist(), a[2]) for a, _ in parts]
        [('M', [0, 1], 3), ('M', [2, 3], 3)]
    """
    bound = signature.bind(*args, **kwargs)
    whole = frozenset(whole)
    columns: dict[str, list[Any]] = {}
    for name, value in bound.arguments.items():
        if name in whole or m == 1:
            columns[name] = [value] * m
        else:
            columns[name] = _split(value, m, int(axes.get(name, 0)), name)
    out = []
    for j in range(m):
        part = inspect.BoundArguments(signature, {n: c[j] for n, c in columns.items()})  # type: ignore[arg-type]
        out.append((tuple(part.args), dict(part.kwargs)))
    return out


def _split(value: Any, m: int, axis: int, name: str) -> list[Any]:
    if hasattr(value, "smp_slice") and callable(value.smp_slice):
        return [value.smp_slice(m, j, axis) for j in range(m)]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [value] * m
        if axis >= value.dim():
            raise ConfigError(f"argument {name!r} has {value.dim()} dimensions and cannot be "
                              f"split along axis {axis}; fix input_split_axes or list it in "
                              "non_split_inputs")
        size = value.shape[axis]
        if size % m:
            raise ConfigError(
                f"argument {name!r} has size {size} along axis {axis}, which does not divide "
                f"into {m} microbatches; every batch must be a multiple of microbatches = {m} "
                "(drop_last=True on the DataLoader), or list the argument in non_split_inputs")
        return list(value.chunk(m, dim=axis))
    if isinstance(value, (list, tuple)):
        cols = [_split(v, m, axis, f"{name}[{i}]") for i, v in enumerate(value)]
        rows = [[c[j] for c in cols] for j in range(m)]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return [type(value)(*r) for r in rows]
        return [type(value)(r) for r in rows]
    if isinstance(value, Mapping):
        cols_d = {k: _split(v, m, axis, f"{name}[{k!r}]") for k, v in value.items()}
        rows_d = [{k: c[j] for k, c in cols_d.items()} for j in range(m)]
        try:
            return [type(value)(r) for r in rows_d]  # type: ignore[call-arg]
        except TypeError:
            return rows_d
    if isinstance(value, (set, frozenset)):
        items = list(value)
        cols_s = [_split(v, m, axis, f"{name} item") for v in items]
        return [type(value)(c[j] for c in cols_s) for j in range(m)]
    return [value] * m


# -- inputs from pipeline rank 0 --------------------------------------------------------------------


def _from_pipeline_rank0(args: tuple[Any, ...], kwargs: dict[str, Any]
                         ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace the tensors among the arguments by pipeline rank 0's (Note [smp step], 1).

    Per step: every rank all-gathers ``[its tensor count, whether rank 0's shapes changed]``
    (one small tensor collective: a rank with another structure fails every rank alike), rank 0
    broadcasts its shapes only when they changed since the last step, then all of its tensors
    travel as one flat byte buffer (one broadcast).
    """
    layout = state.require()
    group = state.groups.get("pp")
    if layout.pp == 1 or group is None:
        return args, kwargs
    leaves, spec = pytree.tree_flatten((args, kwargs))
    where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    ranks = layout.pp_group(state.rank)
    me = ranks.index(state.rank)
    meta = tuple((tuple(leaves[i].shape), leaves[i].dtype) for i in where)
    model = state.model
    comm = model._pipe._comm if model is not None and model.partitioned else None
    nccl = dist.get_backend(group) == "nccl"
    device = state.device if nccl else torch.device("cpu")
    cache = _META_CACHE.get(tuple(ranks))
    try:
        mine = torch.tensor([len(where), int(me == 0 and meta != cache)], device=device)
        every = [torch.empty_like(mine) for _ in ranks]
        dist.all_gather(every, mine, group=group)
        counts = [int(t[0]) for t in every]
        if len(set(counts)) != 1:
            raise ConfigError(
                f"the ranks of the pipeline pass different numbers of tensors to the step "
                f"function (by pipeline rank: {counts}); every rank must call it with the same "
                "argument structure (placeholder tensors on pipeline ranks > 0 are fine: their "
                "contents are replaced by pipeline rank 0's)")
        if int(every[0][1]):
            box = [meta if me == 0 else None]
            dist.broadcast_object_list(box, ranks[0], group=group, device=device)
            cache = _META_CACHE[tuple(ranks)] = box[0]
        assert cache is not None
        sizes = [_nbytes(shape, dtype) for shape, dtype in cache]
        if me == 0:
            parts = [leaves[i].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                     for i in where]
            flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8,
                                                              device=device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        if flat.numel():
            dist.broadcast(flat, ranks[0], group=group)
    except RuntimeError as e:
        if comm is None:
            raise
        from modelparallel.runtime.failure import map_comm_error

        err = map_comm_error(e, comm.board, rank=state.rank, peer=ranks[0],
                             what="the step function's arguments", timeout=state.timeout)
        comm.fail(err)
        raise err from None
    if me != 0:
        leaves = list(leaves)
        offset = 0
        for i, (shape, dtype), n in zip(where, cache, sizes):
            leaves[i] = flat[offset:offset + n].view(dtype).reshape(shape)
            offset += n
    new_args, new_kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(new_args), dict(new_kwargs)


#: Rank 0's argument shapes last sent, per pipeline (the rank lists).
_META_CACHE: dict[tuple[int, ...], Any] = {}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


# -- results ------------------------------------------------------------------------------------------


def _collect(results: list[Any], detach: bool) -> Any:
    """Per-microbatch return values to one structure of StepOutputs and lists."""
    if all(r is None for r in results):
        return None
    flats = [pytree.tree_flatten(r) for r in results]
    spec = flats[0][1]
    if any(f[1] != spec for f in flats[1:]):
        return list(results)  # structures differ between microbatches: plain list
    leaves: list[Any] = []
    for k, first in enumerate(flats[0][0]):
        values = [f[0][k] for f in flats]
        if isinstance(first, torch.Tensor):
            leaves.append(StepOutput([v.detach() if detach else v for v in values]))
        else:
            leaves.append(values)
    return pytree.tree_unflatten(leaves, spec)
