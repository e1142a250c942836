"""The per-rank pipeline executor: this rank's :class:`~modelparallel.codegen.StageProgram` (or its
``v`` programs with virtual stages) under a schedule.

Each rank runs its action list (:mod:`modelparallel.schedule`); with virtual stages (Note
[virtual stages] in ``modelparallel/schedule/__init__.py``) rank ``r`` of ``p`` holds the programs
of stages ``r, r + p, ...`` and each action names the stage it runs. A forward of
microbatch ``i`` runs the stage (``program.run``) on the stage's local model inputs of the
microbatch and the values received from earlier stages (Note [stage calling convention] in
``modelparallel/codegen/program.py``), sends the stage's outputs to the stages that read them
(the next one under a relay plan, each reading stage under a direct plan: Note [message
channels] in ``channels.py``), and keeps what backward needs. A hook given as ``on_action`` is called around every receive wait, forward, backward,
send and gradient sync (Note [action hook] in ``modelparallel/runtime/hooks.py``). The last stage rebuilds the model output with ``out_spec`` and computes
``loss_fn(output, target)``. A backward receives the gradients of the values the stage sent, from every stage it sent
them to (or starts from the loss on the last stage, scaled by ``1/m`` when gradients are
averaged over microbatches), runs autograd, which sums the gradients of a value sent to several
stages, and sends the gradients of the values it received back to the stages they came from; a split
backward (``I`` then ``W``, Note [split backward]) computes and sends those gradients first and
the parameters' gradients at the later ``W`` (``modelparallel/runtime/split_backward.py``). Parameter
gradients accumulate over the microbatches; afterwards the gradients of tied parameters held by
several stages are summed among those stages. The mean loss (and, unless turned off, the merged
outputs) are broadcast from the last stage, so every rank returns them.
The boundary templates sent on a new batch shape live in ``templates.py`` (Note [boundary
metadata]), the tied-parameter gradient sum in ``tied_params.py`` and the waves of
``active_microbatches`` in ``waves.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree

from modelparallel.codegen.program import StageProgram, check_loss
from modelparallel.errors import ConfigError
from modelparallel.runtime.batch import BatchShare
from modelparallel.runtime.channels import (
    ChannelRecv,
    Router,
    channel_pairs,
    check_untagged_links,
)
from modelparallel.runtime.comm import PendingRecv, Send, StageComm
from modelparallel.runtime.data_parallel import GradientSync
from modelparallel.runtime.hooks import ActionHook, StageEvent
from modelparallel.runtime.microbatch import SplitSpec, shape_key, split_inputs, split_target
from modelparallel.runtime.result import ResultWork, StepOutput, StepResult, result_point
from modelparallel.runtime.split_backward import (
    backward_input,
    backward_weight,
)
from modelparallel.runtime.step_state import (
    MicrobatchState,
    Rebuild,
    StepState,
    StepStats,
    get_rng,
    samples_in,
    set_rng,
    to_device,
)
from modelparallel.runtime.templates import TemplateCache
from modelparallel.runtime.tied_params import TiedParameters
from modelparallel.runtime.waves import check_programs, waves
from modelparallel.schedule import Action, Schedule, make_schedule

__all__ = ["LOOKAHEAD", "StageExecutor", "StepOutput", "StepStats"]

# Note [receives ahead]
# ~~~~~~~~~~~~~~~~~~~~~
# Gloo's point-to-point messages are a rendezvous (``gloo/transport/tcp/pair.cc``): a send whose
# receive is already posted on the peer goes out at once from the sending thread; otherwise the
# sender only announces it, and the data leaves when the receiver's "ready" notice reaches the
# sender's I/O thread, a round trip after the receive is posted. So on gloo a rank posts the
# receives of its next ``LOOKAHEAD`` actions (not only the next one) before each action
# computes: a message sent while the receiver is still busy two actions earlier then travels
# at send time. Receives are posted strictly in action order, stopping at the first one that
# cannot be created yet (a backward's, before its forward ran; a forward's on a metadata step,
# Note [boundary metadata]), because gloo matches the messages between two ranks in posting
# order and with virtual stages activations and gradients share a link. A posted receive holds
# a buffer of its message's size: at most ``LOOKAHEAD`` of them, beyond what the schedule holds.
# NCCL posts each action's receive with the previous action's sends (``comm.py``).

#: Actions ahead whose receives a gloo rank posts (Note [receives ahead]).
LOOKAHEAD = 4

_T = TypeVar("_T")


class StageExecutor:
    """Runs one stage of a pipeline on this rank.

    Creating one is collective (it creates process subgroups for tied parameters) when ``comm``
    is given; with ``comm=None`` the stage must be the only one (a one-stage pipeline).

    Args:
        program: This rank's stage, or with virtual stages this rank's ``v`` stages ``r, r + p,
            ...`` in order (Note [virtual stages]).
        comm: Its communication (``None`` for a single stage); its stages are the ``p`` ranks.
        loss_fn: ``loss_fn(model_output, target) -> scalar tensor``, mean-reduced over the
            microbatch; run on the last stage.
        schedule: ``"gpipe"``/``"simple"``, ``"1f1b"``/``"interleaved"`` (with several programs:
            interleaved 1F1B) or ``"zb-h1"``.
        split: How the flat inputs split into microbatches.
        average_grads: Average parameter gradients over microbatches (SMP's
            ``average_grads_across_microbatches``); otherwise sum them.
        device: Where the stage runs.
        on_action: Called with ``(StageEvent, "start" | "end")`` around every receive wait,
            forward, backward, send and gradient sync of this rank (Note [action hook] in
            ``modelparallel/runtime/hooks.py``); ``None``: nothing is called.
        grad_sync: Averages the gradients over the stage's data-parallel replicas after each
            training step (Note [data-parallel gradient sync] in
            ``modelparallel/runtime/data_parallel.py``); ``None``: no replicas.
        active_microbatches: Most microbatches in flight per stage: the step runs its schedule
            in waves of at most this many microbatches (Note [active microbatches]);
            ``None``: one wave.
        check_inputs: Called with microbatch 0's flat inputs before a step runs, on every
            rank after the batch is shared (the front end refuses shapes the traced graph
            cannot run, ``TracedModel.check_shapes``).
        lookahead: Receives posted this many actions ahead (Note [receives ahead]); 1 posts
            each with its action (``benchmarks/bubble.py`` measures what it saves).
        early_result: Start sharing the step's result after the last forward rather than the
            last action (Note [early result]).

    Every step trains on pipeline rank 0's inputs and targets (Note [batch from rank 0] in
    ``modelparallel/runtime/batch.py``).

    Example:
        >>> import torch
        >>> from modelparallel.codegen import build_stage
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.runtime.microbatch import resolve_split
        >>> from modelparallel.tracer import trace
        >>> traced = trace(torch.nn.Linear(4, 1), (torch.randn(2, 4),))
        >>> program = build_stage(traced, partition(traced.graph, PlanConfig(1), "cpu"), 0)
        >>> ex = StageExecutor(program, None, loss_fn=torch.nn.functional.mse_loss,
        ...                    schedule="1f1b", split=resolve_split(program.input_names, 2))
        >>> ex.train_step([torch.randn(4, 4)], torch.randn(4, 1)).outputs.shape
        torch.Size([4, 1])
    """

    def __init__(self, program: StageProgram | Sequence[StageProgram], comm: StageComm | None,
                 *, loss_fn: Callable[[Any, Any], torch.Tensor], schedule: str, split: SplitSpec,
                 average_grads: bool = True, device: torch.device | str = "cpu",
                 on_action: ActionHook | None = None,
                 grad_sync: GradientSync | None = None,
                 active_microbatches: int | None = None,
                 check_inputs: Callable[[Sequence[Any]], None] | None = None,
                 lookahead: int = LOOKAHEAD, early_result: bool = True) -> None:
        programs = (program,) if isinstance(program, StageProgram) else tuple(program)
        self.programs = check_programs(programs)
        self.program = programs[0]
        self.virtual_stages = len(programs)
        self.num_ranks = self.program.num_stages // self.virtual_stages
        self._by_stage = {p.index: p for p in programs}
        #: Stages whose module holds buffers (batch-norm statistics a forward may move).
        self._buffered = {p.index for p in programs if next(p.module.buffers(), None) is not None}
        if comm is None and self.num_ranks != 1:
            raise ConfigError(f"stage {self.program.index} of {self.program.num_stages} needs "
                              "a StageComm")
        self.comm = comm
        self.loss_fn = loss_fn
        self.schedule_name = schedule
        self.split = split
        self.average_grads = average_grads
        self.device = torch.device(device)
        self._router = Router(self.program.num_stages, self.num_ranks, comm, self.device)
        self.stats = StepStats()
        self.on_action = on_action
        #: Called with the step's :class:`StepOutput` and whether it trained, after each step
        #: that succeeded, on every rank, so it may run collectives over the pipeline (the step
        #: trace's gathering, ``modelparallel/runtime/trace.py``); ``None``: nothing.
        self.after_step: Callable[[StepOutput, bool], None] | None = None
        self.grad_sync = grad_sync
        self.active_microbatches = active_microbatches
        if lookahead < 1:
            raise ConfigError(f"lookahead = {lookahead} must be at least 1 (1: each receive "
                              "posted with its action)")
        self.lookahead, self.early_result = lookahead, early_result
        #: Do the ``on_result`` work of :meth:`run_microbatches` at ``result_point`` (Note
        #: [work after the result] in ``result.py``); ``False``: after the last action (the
        #: runtime benchmark's comparison).
        self.early_work = True
        #: Share rank 0's batch in the shadow of the first forward (Note [batch overlapped] in
        #: ``batch.py``; gloo only); ``False``: before the step (the bubble benchmark's
        #: comparison).
        self.overlap_batch = True
        self.loss_scale = 1.0  # the fp16 loss scale (Note [fp16 loss scaling] in precision.py)
        self._train_steps = 0
        self._templates = TemplateCache()
        self._schedules: dict[tuple[int, bool], Schedule] = {}
        self._points: dict[tuple[int, bool], int | None] = {}  # result_point per schedule
        make_schedule(schedule, self.num_ranks, split.num_microbatches,
                      self.virtual_stages).validate()
        self._params = {p.index: [t for t in p.module.parameters() if t.requires_grad]
                        for p in programs}
        self._tied = TiedParameters(self.programs, self.comm, self._rank)
        self.check_inputs = check_inputs
        self._batch_readers = self._readers()

    # -- public ----------------------------------------------------------------------------------

    @property
    def is_first(self) -> bool:
        """Whether this rank runs stage 0."""
        return self.program.index == 0

    @property
    def is_last(self) -> bool:
        """Whether this rank runs the last stage."""
        return self.programs[-1].is_last

    def _rank(self, stage: int) -> int:
        """The pipeline rank (the comm's stage index) that runs ``stage``."""
        return stage % self.num_ranks

    def train_step(self, flat_inputs: Sequence[Any], target: Any, *,
                   return_outputs: bool = True) -> StepOutput:
        """Run forward and backward of every microbatch; gradients end in ``.grad``.

        Raises:
            ConfigError: if the batch does not split into the microbatches (on every rank,
                before any communication).
            PeerFailedError: if another rank failed during the step.
            StepTimeoutError: if a wait on a neighbour ran out.
        """
        return self._step(flat_inputs, target, train=True, return_outputs=return_outputs)

    def eval_step(self, flat_inputs: Sequence[Any], *, return_outputs: bool = True) -> Any:
        """Run forward only (no gradients); return the merged outputs on every rank."""
        return self._step(flat_inputs, None, train=False, return_outputs=return_outputs).outputs

    def run_microbatches(self, microbatches: Sequence[Sequence[Any]], targets: Sequence[Any],
                         *, train: bool, return_outputs: bool = True, merge: bool = True,
                         context: Callable[[int], contextlib.AbstractContextManager[Any]]
                         | None = None, shared: bool = False,
                         on_result: ResultWork | None = None) -> StepOutput:
        """Run one step on inputs already cut into microbatches (SMP's ``smp.step`` cuts the
        step function's arguments itself, Note [smp step] in ``modelparallel/torch/stepping.py``).

        Args:
            microbatches: Per microbatch, the flat model inputs (as :meth:`train_step` takes
                for the whole batch); every rank must pass the same shapes.
            targets: Per microbatch, what ``loss_fn`` gets as its second argument.
            train: Forward and backward (else forward only, no gradients).
            return_outputs: Broadcast the outputs from the last stage to every rank.
            merge: Merge the outputs over microbatches (else ``outputs`` is the list of the
                per-microbatch outputs, broadcast stacked: one tensor per output leaf).
            context: ``context(i)`` is entered around the forward of microbatch ``i`` on this
                stage (an autocast context, say).
            shared: The caller already gave every rank pipeline rank 0's inputs (SMP does), so
                they are not shared again (Note [batch from rank 0]).
            on_result: Work that needs the step's result on this rank, done as soon as the
                result is in where that costs nothing (Note [work after the result] in
                ``result.py``), else at the end of the step.

        Raises:
            ConfigError: if the number of microbatches is not the executor's.
        """
        m = self.split.num_microbatches
        if len(microbatches) != m or len(targets) != m:
            raise ConfigError(f"{len(microbatches)} microbatches given; this executor runs {m}")
        n = len(microbatches[0]) if m else 0
        if any(len(mb) != n for mb in microbatches):
            raise ConfigError("every microbatch must have the same number of flat inputs "
                              f"(got {[len(mb) for mb in microbatches]})")
        share = None
        rebuild: Rebuild | None = None
        if not shared:
            share = self._start_share([v for mb in microbatches for v in mb], list(targets),
                                      train=train, per=n, copies=m)

            def rebuild(flat: list[Any], joined: Any) -> tuple[list[list[Any]], list[Any]]:
                return ([flat[j * n:(j + 1) * n] for j in range(m)],
                        list(joined) if train else [None] * m)
        with self._checked_first(share):
            if self.check_inputs is not None:
                self.check_inputs(microbatches[0])
        key = (*shape_key(microbatches[0], "train" if train else "eval"), ("mb", m))
        return self._run_step(list(microbatches), list(targets) if train else [None] * m,
                              key, train=train, return_outputs=return_outputs, merge=merge,
                              context=context, on_result=on_result, share=share,
                              rebuild=rebuild)

    # -- the step ----------------------------------------------------------------------------------

    def _step(self, flat_inputs: Sequence[Any], target: Any, *, train: bool,
              return_outputs: bool) -> StepOutput:
        m = self.split.num_microbatches
        if self.comm is not None:
            self.comm.check_usable()
        # Rank 0's batch on every rank (Note [batch from rank 0]), overlapped with the first
        # forward (Note [batch overlapped] in batch.py); every rank splits its own batch, of
        # the same structure once checked, so a batch that does not divide into the
        # microbatches raises ConfigError on every rank, before any point-to-point message.
        share = self._start_share(list(flat_inputs), target, train=train,
                                  per=len(flat_inputs), copies=1)

        def rebuild(flat: list[Any], joined: Any) -> tuple[list[list[Any]], list[Any]]:
            return (split_inputs(flat, self.split),
                    split_target(joined, m) if train else [None] * m)
        with self._checked_first(share):
            microbatches, targets = rebuild(list(flat_inputs), target)
            if self.check_inputs is not None:
                self.check_inputs(microbatches[0])
        key = shape_key(flat_inputs, "train" if train else "eval")
        return self._run_step(microbatches, targets, key, train=train,
                              return_outputs=return_outputs, share=share, rebuild=rebuild)

    def _start_share(self, flat: list[Any], target: Any, *, train: bool, per: int, copies: int
                     ) -> BatchShare:
        """Start sharing rank 0's batch (Note [batch from rank 0]); ``flat`` is ``copies``
        lists of ``per`` flat inputs, one after the other."""
        shared, needed = self._batch_readers
        names = [*self.split.names, *[""] * max(0, per - len(self.split.names))][:per]
        return self._guard_share(BatchShare, self.comm, flat, target, train=train,
                                 input_names=names * copies,
                                 shared_inputs=[j * per + i for j in range(copies)
                                                for i in shared],
                                 target_needed=needed, overlap=self.overlap_batch)

    def _guard_share(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(...)`` of the batch sharing: a ConfigError leaves the pipeline usable (every
        rank raised it before any message), anything else fails it."""
        try:
            return self._hooked("batch_wait", self.program.index, None, fn, *args, **kwargs)
        except ConfigError:
            raise
        except BaseException as e:
            if self.comm is not None:
                self.comm.fail(e)
            raise

    @contextlib.contextmanager
    def _checked_first(self, share: BatchShare | None) -> Iterator[None]:
        """A ConfigError raised inside (a batch this rank cannot split, a changed guarded
        input) is raised after the batch check: if the ranks' batches differ, every rank
        raises the check's error instead, so no rank is left waiting."""
        try:
            yield
        except ConfigError:
            if share is not None:  # every rank raises here or in check(): complete the share
                for part in (share.check, share.finish, share.close):
                    self._guard_share(part)
            raise

    def _run_step(self, microbatches: Sequence[Sequence[Any]], targets: list[Any],
                  key: tuple[Any, ...], *, train: bool, return_outputs: bool, merge: bool = True,
                  context: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
                  on_result: ResultWork | None = None, share: BatchShare | None = None,
                  rebuild: Rebuild | None = None) -> StepOutput:
        m = self.split.num_microbatches
        if not self.is_last:
            targets = [None] * m
        if self.comm is not None:
            self.comm.check_usable()
        tpl = self._templates.get(key)
        step = StepState(actions=self._actions(train), local={}, targets=[],
                         tpl=tpl, train=train, context=context, share=share, rebuild=rebuild,
                         result=StepResult(self.comm, is_last=self.is_last, microbatches=m,
                                           train=train, return_outputs=return_outputs,
                                           merge=merge, templates=tpl.result,
                                           device=self.device, on_result=on_result))
        if share is None or not share.receives:  # else rank 0's, at the first wait
            self._set_batch(step, microbatches, targets)
        start = time.perf_counter()
        self.stats = StepStats()
        stash: dict[str, list[torch.Tensor | None]] = {}
        try:
            with torch.enable_grad() if train else torch.no_grad():
                sync = self.grad_sync if train else None
                if sync is not None:
                    self._train_steps += 1
                    sync.check_batch(key, samples_in(microbatches), self._train_steps)
                    sync.begin_step()
                stash = self._tied.stash_grads() if train else {}
                self._run(step)
                if share is not None:
                    self._guard_share(share.close)
                if self.comm is not None:
                    self.comm.drain_sends()
                if train:
                    self._hooked("grad_sync", self.program.index, None,
                                 self._tied.reduce_grads, stash)
                if sync is not None:
                    self._hooked("grad_sync", self.program.index, None, sync.finish)
                result = self._hooked("result_wait", self.program.index, None,
                                      step.result.finish)
        except BaseException as e:
            if share is not None and share.mismatch and isinstance(e, ConfigError):
                # Raised on every rank before any message (Note [batch overlapped]): the
                # pipeline stays usable, the gradients, boundary templates and random state
                # as they were.
                self._tied.restore_grads(stash)
                if step.rng is not None:
                    set_rng(step.rng, self.device)
                raise
            self._templates.drop(key)
            if self.comm is not None:
                self.comm.fail(e)
            raise
        self.stats.step_seconds = time.perf_counter() - start
        if self.after_step is not None:
            self.after_step(result, train)
        return result

    def _run(self, step: StepState) -> None:
        """Run this stage's actions (Note [schedule communication model] in ``modelparallel/schedule/__init__.py``).

        The receives of the next actions are posted before an action computes (gloo: up to
        ``lookahead`` actions ahead, Note [receives ahead]), or action k + 1's together with
        action k's sends (NCCL, see ``comm.py``); an action's sends are posted right after its
        compute. After its last forward the rank starts the exchange of the step's result
        (Note [early result] in ``result.py``); work that needs the result may run before the
        receives of action ``point`` (Note [work after the result], ibid.).
        """
        point = self._result_point(step.train) if self.early_work else None
        grouped = self.comm is not None and self.comm.grouped
        ahead = 1 if grouped else self.lookahead
        last_forward = max((k for k, a in enumerate(step.actions) if a.kind == "F"),
                           default=-1)
        # Note [batch overlapped]: the batch check precedes every message of the step; rank 0
        # computes its first forward (its own inputs, nothing received) before it.
        defer = self._defer_check(step)
        if step.share is not None and not defer:
            self._guard_share(step.share.check)
        for k, a in enumerate(step.actions):
            if not (defer and k == 0):
                if step.next_recv <= k:
                    self._post(step, k, allow_meta=True)  # reads new boundary metadata first
                if not grouped:
                    self._post(step, k + ahead, allow_meta=False)
            recvs = step.posted.pop(k)
            i, s = a.microbatch, a.stage
            if k == point:
                self._hooked("result_wait", s, None, step.result.work_now)
            received = (self._hooked("recv_wait", s, i, self._wait, step, recvs)
                        if recvs else [])
            if not step.local:  # this rank computes on rank 0's batch, received by now
                self._take_batch(step)
            t0 = time.perf_counter()
            if a.kind == "F":
                sends = self._hooked("forward", s, i, self._forward, step, s, i, received)
            elif a.kind == "B":
                sends = self._hooked("backward", s, i, self._backward, step, s, i, received)
            elif a.kind == "I":
                sends = self._hooked("backward", s, i, self._backward_input, step, s, i,
                                     received)
            else:
                sends = self._hooked("weight_backward", s, i, self._backward_weight, step, s,
                                     i)
            dt = time.perf_counter() - t0
            self.stats.compute_seconds += dt
            self.stats.actions.append((str(a), dt))
            if defer and k == 0:
                assert step.share is not None
                self._guard_share(step.share.check)
            nxt = k + 1 if grouped else -1
            if sends and self.on_action is not None:
                self._hooked("send", s, i, self._post, step, nxt, allow_meta=False,
                             sends=sends, label=str(a))
            else:
                self._post(step, nxt, allow_meta=False, sends=sends, label=str(a))
            if k == last_forward and self.early_result:
                step.result.start()
        assert not step.train or not step.microbatches, "every microbatch ran its backward"
        assert not step.mailbox, "every message within the rank was taken"

    def _defer_check(self, step: StepState) -> bool:
        """Whether this rank runs its first action before the batch check (Note [batch
        overlapped]): a first-stage forward on a rank the batch is checked asynchronously for,
        of a shape key whose boundary templates that stage has sent (so its forward sends no
        metadata), on a module without buffers; its (empty) receives are created here,
        without communication, and the random state kept for a refused step."""
        share, first = step.share, step.actions[0] if step.actions else None
        if (share is None or share.checked or not share.overlap or first is None
                or first.kind != "F" or not self._by_stage[first.stage].is_first
                or first.stage in self._buffered
                or not any(c[0] == first.stage for c in step.tpl.send)):
            return False
        step.rng = get_rng(self.device)
        self._make_recv(step, 0, False)
        step.next_recv = 1
        return True

    def _set_batch(self, step: StepState, microbatches: Sequence[Sequence[Any]],
                   targets: Sequence[Any]) -> None:
        """The step's per-stage model inputs and (last stage) targets, on the device."""
        m = self.split.num_microbatches
        step.local = {p.index: [[to_device(mb[i], self.device) for i in p.model_inputs]
                                for mb in microbatches] for p in self.programs}
        step.targets = ([to_device(t, self.device) for t in targets] if self.is_last and step.train
                        else [None] * m)

    def _take_batch(self, step: StepState) -> None:
        """Rank 0's inputs and targets, received during the step's first wait, in place of
        this rank's own (Note [batch overlapped])."""
        assert step.share is not None and step.rebuild is not None
        flat, target = self._guard_share(step.share.finish)
        self._set_batch(step, *step.rebuild(flat, target))

    def _wait(self, step: StepState, recvs: list[ChannelRecv]) -> list[list[torch.Tensor]]:
        """The tensors of an action's messages, one list per channel, in order."""
        out = []
        for r in recvs:
            if r.pending is None:
                out.append(step.mailbox.take(r.key))
            else:
                assert self.comm is not None
                out.append(self.comm.wait(r.pending))
        return out

    def _hooked(self, kind: str, stage: int, microbatch: int | None, fn: Callable[..., _T],
                *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)``, bracketed by the ``on_action`` hook if there is one."""
        hook = self.on_action
        if hook is None:
            return fn(*args, **kwargs)
        event = StageEvent(kind, stage, microbatch)
        hook(event, "start")
        try:
            return fn(*args, **kwargs)
        finally:
            hook(event, "end")

    def _post(self, step: StepState, k: int, *, allow_meta: bool,
              sends: Sequence[Send] = (), label: str = "") -> None:
        """Issue ``sends`` plus the receives of the actions up to k not posted yet, in action
        order, as far as they can be created now (Note [receives ahead])."""
        recvs: list[PendingRecv] = []
        last = min(k, len(step.actions) - 1)
        while step.next_recv <= last and self._make_recv(
                step, step.next_recv, allow_meta and step.next_recv == k):
            recvs.extend(r.pending for r in step.posted[step.next_recv]
                         if r.pending is not None)
            step.next_recv += 1
        if self.comm is not None and (sends or recvs):
            self.comm.issue(sends, recvs, label=label)

    def _make_recv(self, step: StepState, k: int, allow_meta: bool) -> bool:
        """Create action k's receives in ``step.posted`` (one per channel it reads, Note
        [message channels]). False if what it receives is not known yet (metadata not read,
        or forward not run)."""
        a = step.actions[k]
        s, prog, i = a.stage, self._by_stage[a.stage], a.microbatch
        if a.kind == "W" or (a.kind == "F" and prog.is_first) or (a.kind != "F" and prog.is_last):
            step.posted[k] = []
            return True
        if a.kind == "F":
            recvs = self._router.forward_receives(step.tpl, prog, i, allow_meta)
            if recvs is None:
                return False
            step.posted[k] = recvs
            return True
        mb = step.microbatches.get((s, i))
        if mb is None:
            return False
        step.posted[k] = self._router.gradient_receives(s, i, mb.roots)
        return True

    def _forward(self, step: StepState, s: int, i: int, received: list[list[torch.Tensor]]
                 ) -> list[Send]:
        p = self._by_stage[s]
        values, leaves = self._router.unpack(step.tpl, p, received, step.train)
        with step.context(i) if step.context is not None else contextlib.nullcontext():
            out = p.run(step.local[s][i], values, grad_leaves=any(m for _, m in leaves))
        if not p.is_last:
            sends, roots = self._router.forward_sends(step.tpl, step.mailbox, p, i, out.sends)
            step.microbatches[(s, i)] = MicrobatchState(roots, leaves, None)
            return sends
        output = out.model_output
        loss = check_loss(self.loss_fn(output, step.targets[i])) if step.train else None
        step.result.record(i, pytree.tree_map(
            lambda v: v.detach() if isinstance(v, torch.Tensor) else v, output)
            if step.result.return_outputs else None,
            loss.detach() if loss is not None else None)
        if loss is not None:
            step.microbatches[(s, i)] = MicrobatchState([], leaves, loss)
        return []

    def _scaled_loss(self, loss: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / self.split.num_microbatches if self.average_grads else 1.0
        scale *= self.loss_scale
        return loss * scale if scale != 1.0 else loss

    def _release(self, s: int, i: int) -> None:
        if self.comm is not None:
            # The next stage sent these gradients, so it holds our activations of microbatch i:
            # that send is complete, and its buffers can go.
            self.comm.release(f"{s}F{i}")

    def _backward(self, step: StepState, s: int, i: int, grads: list[list[torch.Tensor]]
                  ) -> list[Send]:
        mb = step.microbatches.pop((s, i))
        roots = [t for _, rs in mb.roots for t in rs]
        if mb.loss is not None:
            if mb.loss.requires_grad:
                self._scaled_loss(mb.loss).backward()
        elif roots:
            # a tensor sent to several stages is a root once per stage: autograd sums
            torch.autograd.backward(roots, [g for gs in grads for g in gs])
            self._release(s, i)
        return self._router.send_back(step.mailbox, s, i, mb.received,
                                      [b.grad for _, leaves in mb.received for b in leaves])

    def _backward_input(self, step: StepState, s: int, i: int, grads: list[list[torch.Tensor]]
                        ) -> list[Send]:
        """``I`` of a split backward: the received values' gradients, sent back now; the
        parameters' part is kept for ``W`` (Note [split backward])."""
        mb = step.microbatches[(s, i)]
        roots = [t for _, rs in mb.roots for t in rs]
        root_grads: list[torch.Tensor | None]
        if mb.loss is not None:
            roots = [self._scaled_loss(mb.loss)] if mb.loss.requires_grad else []
            root_grads = [None] * len(roots)
        else:
            root_grads = [g for gs in grads for g in gs]
        leaves = [b for _, bs in mb.received for b in bs]
        got, mb.pending = backward_input(roots, root_grads, leaves, self._params[s])
        if mb.loss is None and roots:
            self._release(s, i)
        mb.roots = []
        return self._router.send_back(step.mailbox, s, i, mb.received, list(got))

    def _backward_weight(self, step: StepState, s: int, i: int) -> list[Send]:
        """``W`` of a split backward: the parameters' gradients of microbatch ``i``."""
        mb = step.microbatches.pop((s, i))
        if mb.pending is not None:
            backward_weight(mb.pending)
        return []

    def _readers(self) -> tuple[tuple[int, ...], bool]:
        """Collective: the flat inputs a rank other than 0 reads, and whether the loss is
        computed off rank 0 (Note [batch from rank 0])."""
        if self.comm is None or self.num_ranks < 2:
            return (), False
        mine = sorted({i for p in self.programs for i in p.model_inputs})
        reads = self.comm.all_gather_object((mine, sorted(channel_pairs(self.programs))),
                                            "the model inputs and channels of each stage")
        shared = sorted({int(i) for theirs, _ in reads[1:] for i in theirs})
        if self.comm.grouped and self.virtual_stages > 1:
            # NCCL has no tags: all channels between two ranks share one order (Note [message
            # channels]); every rank checks every channel, so all raise alike.
            check_untagged_links(self._actions_schedule(),
                                 {(int(a), int(b)) for _, theirs in reads for a, b in theirs})
        return tuple(shared), True

    # -- helpers ---------------------------------------------------------------------------------

    def _actions_schedule(self) -> Schedule:
        self._actions(True)
        return self._schedules[(self.split.num_microbatches, True)]

    def _result_point(self, train: bool) -> int | None:
        key = (self.split.num_microbatches, train)
        if key not in self._points:
            self._actions(train)
            self._points[key] = result_point(self._schedules[key], self.program.index)
        return self._points[key]

    def _actions(self, train: bool) -> tuple[Action, ...]:
        p, v, m = self.num_ranks, self.virtual_stages, self.split.num_microbatches
        key = (m, train)
        if key not in self._schedules:
            sched = waves(self.schedule_name, p, m, v, self.active_microbatches)
            if not train:  # the training order's forwards: same link order, no deadlock
                sched = Schedule("forward", p * v, m, tuple(
                    tuple(a for a in lst if a.kind == "F") for lst in sched.actions), v)
            self._schedules[key] = sched
        return self._schedules[key].actions[self.program.index]
