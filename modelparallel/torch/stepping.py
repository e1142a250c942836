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
   different argument structure fails every rank with the same :class:`ConfigError`. From the
   second step on, rank 0 does not wait for this (Note [arguments shared in the background]).
2. **Split.** The arguments are cut into ``microbatches`` pieces by SMP's rules
   (:func:`split_arguments`: tensors along axis 0 or ``input_split_axes[name]``, containers
   traversed, ``smp_slice`` objects slice themselves, ``non_split_inputs`` and non-tensors are
   passed whole). A batch that does not divide raises on every rank (same data everywhere).
3. **One body per microbatch, as a coroutine.** Each microbatch's call of the step function
   is a coroutine (a greenlet, or a worker thread: Note [smp step coroutines] in
   ``modelparallel/torch/_bodies.py``); only one runs at any time, control passing from the
   driver to a body and back, so user code never runs concurrently and its order is
   deterministic. A body starts with the step's grad mode. Every body first runs up to its
   ``model(...)`` call, which records the model's arguments and the autocast state, and stops
   (:func:`start_all`).
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
   every other rank resumes its bodies with them, one after the other (its ``model.backward``
   records only: its stage's backward ran inside the schedule; pipeline rank 0 does it while
   it waits for a gradient, Note [work after the result] in ``modelparallel/runtime/result.py``,
   the others after their last action), so ``model(...)`` returns the real outputs on every
   rank and every rank computes the same return values.
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

Note [arguments shared in the background]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Pipeline rank 0 holds the arguments it shares, and the other ranks have nothing to compute until
stage 0's first message reaches them, so the two collectives of step 1 need not delay rank 0:
once the model is partitioned and rank 0's argument shapes are the ones it last sent (the
receivers size their buffer from them), rank 0 posts the count exchange and the byte broadcast
without waiting and starts the pipeline; it waits for both when the step ends (or fails). The
other ranks wait for them as before. A rank that finds different tensor counts still receives
the broadcast (so no collective is left unmatched), then fails the pipeline's comm before
raising the :class:`ConfigError`: rank 0, already inside the pipeline, stops with a peer failure,
finds the same counts when it waits, and raises the same ``ConfigError``. (The pipeline is torn
down by it, like any failed step; on the first step, or after rank 0's shapes changed, every
rank checks before the pipeline and nothing is torn down.) This takes the argument exchange off
rank 0's part of the step; the other ranks still wait for it (figures: ``docs/measurements.md``).

Example:
    >>> so = StepOutput([torch.tensor(1.0), torch.tensor(3.0)])
    >>> float(so.reduce_mean()), float(so.reduce_sum()), so.concat().tolist()
    (2.0, 4.0, [1.0, 3.0])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from modelparallel.errors import ConfigError, UsageError
from modelparallel.torch._bodies import _Body, current_body, start_all
from modelparallel.torch.state_mod import state

__all__ = ["StepFunction", "StepOutput", "current_body", "split_arguments", "step"]


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
        args, kwargs, pending = _from_pipeline_rank0(args, kwargs)
        try:
            result = self._run(model, args, kwargs)
        except BaseException:
            if pending is not None:
                pending.finish(failed=True)
            raise
        if pending is not None:
            pending.finish(failed=False)
        return result

    def _run(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Split, run the bodies on the pipeline, collect (Note [smp step], 2-6)."""
        assert state.cfg is not None
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
                         ) -> tuple[tuple[Any, ...], dict[str, Any], _PendingShare | None]:
    """Replace the tensors among the arguments by pipeline rank 0's (Note [smp step], 1).

    Per step: every rank all-gathers ``[its tensor count, whether rank 0's shapes changed]``
    (one small tensor collective: a rank with another structure fails every rank alike), rank 0
    broadcasts its shapes only when they changed since the last step, then all of its tensors
    travel as one flat byte buffer (one broadcast). Once the model is partitioned and rank 0's
    shapes are the ones last sent, rank 0 does not wait for the two collectives (Note [arguments
    shared in the background]): it returns them as a :class:`_PendingShare` for the end of the
    step.
    """
    layout = state.require()
    group = state.groups.get("pp")
    if layout.pp == 1 or group is None:
        return args, kwargs, None
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
    background = me == 0 and comm is not None and meta == cache
    try:
        mine = torch.tensor([len(where), int(me == 0 and meta != cache)], device=device)
        every = [torch.empty_like(mine) for _ in ranks]
        gathered = dist.all_gather(every, mine, group=group, async_op=background)
        if me == 0:
            flat = _flat_bytes([leaves[i] for i in where], device)
            if background:
                assert gathered is not None
                shared = (dist.broadcast(flat, ranks[0], group=group, async_op=True)
                          if flat.numel() else None)
                return args, kwargs, _PendingShare(gathered, shared, mine, every, flat, comm,
                                                   ranks[0])
        if int(every[0][1]):
            box = [meta if me == 0 else None]
            dist.broadcast_object_list(box, ranks[0], group=group, device=device)
            cache = _META_CACHE[tuple(ranks)] = box[0]
        assert cache is not None
        sizes = [_nbytes(shape, dtype) for shape, dtype in cache]
        if me != 0:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        if flat.numel():
            dist.broadcast(flat, ranks[0], group=group)
        mismatch = _count_mismatch(every)
        if mismatch is not None:
            if comm is not None and not int(every[0][1]):  # rank 0 went on into the pipeline
                comm.fail(mismatch)
            raise mismatch
    except RuntimeError as e:
        if comm is None:
            raise
        raise _comm_failure(e, comm, ranks[0]) from None
    if me != 0:
        leaves = list(leaves)
        offset = 0
        for i, (shape, dtype), n in zip(where, cache, sizes):
            leaves[i] = flat[offset:offset + n].view(dtype).reshape(shape)
            offset += n
    new_args, new_kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(new_args), dict(new_kwargs), None


class _PendingShare:
    """Rank 0's collectives of :func:`_from_pipeline_rank0` still in flight (Note [arguments
    shared in the background]); :meth:`finish` waits for them at the end of the step."""

    def __init__(self, gathered: Any, shared: Any, mine: torch.Tensor,
                 every: list[torch.Tensor], flat: torch.Tensor, comm: Any, root: int) -> None:
        self.gathered, self.shared = gathered, shared
        self.mine, self.every, self.flat = mine, every, flat  # alive until the collectives end
        self.comm, self.root = comm, root

    def finish(self, failed: bool) -> None:
        """Wait for both collectives; raise the structure mismatch if the ranks saw one.

        Args:
            failed: The step already raised: a mismatch found here replaces that error (the
                other ranks raised the mismatch and stopped the pipeline), a communication
                error does not.
        """
        limit = timedelta(seconds=state.timeout)  # a peer that never joins: no hang
        try:
            self.gathered.wait(limit)
            if self.shared is not None:
                self.shared.wait(limit)
        except RuntimeError as e:
            if failed:
                return
            raise _comm_failure(e, self.comm, self.root) from None
        mismatch = _count_mismatch(self.every)
        if mismatch is not None:
            raise mismatch


def _flat_bytes(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' bytes, one after the other, as one uint8 tensor on ``device``."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)


def _count_mismatch(every: list[torch.Tensor]) -> ConfigError | None:
    """The error for ranks that passed different numbers of tensors, if they did."""
    counts = [int(t[0]) for t in every]
    if len(set(counts)) == 1:
        return None
    return ConfigError(
        f"the ranks of the pipeline pass different numbers of tensors to the step "
        f"function (by pipeline rank: {counts}); every rank must call it with the same "
        "argument structure (placeholder tensors on pipeline ranks > 0 are fine: their "
        "contents are replaced by pipeline rank 0's)")


def _comm_failure(e: RuntimeError, comm: Any, root: int) -> BaseException:
    """A failed collective of the arguments as the pipeline's named error, reported to all."""
    from modelparallel.runtime.failure import map_comm_error

    err = map_comm_error(e, comm.board, rank=state.rank, peer=root,
                         what="the step function's arguments", timeout=state.timeout)
    comm.fail(err)
    return err


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
