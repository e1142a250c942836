"""The message channels between the stages of a pipeline: their tags, the mailbox of the ones
inside a rank, and the order check NCCL needs.

Note [message channels]
~~~~~~~~~~~~~~~~~~~~~~~
A *channel* is one direction between two stages: the activations stage ``s`` sends to a stage
``t > s`` (``StageProgram.dests`` of ``s``, ``sources`` of ``t``: Note [stage calling
convention] in ``modelparallel/codegen/program.py``), or the gradients ``t`` sends back to
``s``. Each step carries one message per channel and microbatch (after the boundary template on
a metadata step, Note [boundary metadata] in ``templates.py``). Under a relay plan the channels
join neighbours (Note [relay communication] in ``modelparallel/plan.py``); under a direct plan
any two stages (Note [direct communication]), so a forward may receive from several stages and
send to several, and a backward likewise with the gradients.

Every message carries its channel's tag (:func:`channel_tag`). Gloo matches sends and receives
per peer and tag, in posting order, so on each channel the receiver takes the messages in the
order the sender sends them, whatever other channels join the same two ranks (virtual stages put
several on one pair). That order is the microbatch order of the two stages' forwards (or
backwards), and :meth:`~modelparallel.schedule.Schedule.validate` checks, through the link
orders of neighbouring stages, that every stage runs its forwards in one microbatch order and
its backwards in one order: so every channel is ordered, neighbour or not. NCCL ignores tags
and runs the operations between two ranks in issue order; there all channels between two ranks
share one order, which :func:`~modelparallel.schedule.check_channel_order` checks for the
pipeline's channels (with one stage per rank each pair of ranks has one channel per direction,
so only virtual stages can fail it).

Deadlock freedom: an action waits only for messages of actions that come before it in the
schedule's neighbour dependencies: ``F(t, i)`` for ``F(s, i)``, ``s < t``, which ``F(t - 1, i)``
follows through ``F(s + 1, i) ... F(t - 1, i)``; ``B(s, i)`` for ``B(t, i)``, ``t > s``,
likewise. The schedule validator shows that the ranks can play their lists under those
dependencies with blocking receives and buffered sends (Note [schedule communication model] in
``modelparallel/schedule/__init__.py``); the order it finds satisfies every wait of a direct
pipeline too, so a schedule that validates never deadlocks under either rule.

NCCL with virtual stages is where a direct plan can fail that check (any pair of stages whose
rank distance differs from their stage distance mod ``p`` usually does): there
:func:`executed_communication` says to relay, with a
:class:`~modelparallel.errors.RelayedSendWarning`, and the front end builds the stages so
(``build_stage(..., communication="relay")``); the executor refuses such a pipeline otherwise.

A channel between two stages of one rank (virtual stages ``s`` and ``s + k p`` under a direct
plan) does not go through the comm: the sender leaves copies of its tensors in the step's
:class:`Mailbox`, which the receiver takes them from (the sender's action runs first on that
rank, by the argument above).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelparallel.codegen.program import StageProgram
from modelparallel.codegen.split import split_stages
from modelparallel.errors import ConfigError, RelayedSendWarning
from modelparallel.plan import Plan
from modelparallel.runtime.boundary import allocate, pack, slots, unpack
from modelparallel.runtime.comm import PendingRecv, Send, StageComm
from modelparallel.runtime.templates import Templates, recv_template, send_template
from modelparallel.schedule import Schedule, check_channel_order, make_schedule
from modelparallel.tracer.traced import TracedModel

__all__ = ["ChannelRecv", "Mailbox", "Router", "channel_pairs", "channel_tag",
           "check_untagged_links", "executed_communication"]

#: A mailbox key: ``(sending stage, receiving stage, 1 for gradients else 0, microbatch)``.
MailKey = tuple[int, int, int, int]


def channel_tag(src: int, dst: int, num_stages: int, gradients: bool) -> int:
    """The tag of the messages stage ``src`` sends stage ``dst`` (Note [message channels]);
    tag 0 is left to the messages outside the channels (the batch, the result).

    Example:
        >>> channel_tag(0, 1, 4, False), channel_tag(1, 0, 4, True), channel_tag(0, 2, 4, False)
        (3, 10, 5)
    """
    return 1 + 2 * (src * num_stages + dst) + int(gradients)


def channel_pairs(programs: Sequence[StageProgram]) -> set[tuple[int, int]]:
    """The ``(sending stage, receiving stage)`` pairs of activations that ``programs``
    exchange (gradients go the other way).

    Example:
        >>> import torch
        >>> from modelparallel.codegen import build_stages
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> traced = trace(m, (torch.randn(2, 4),))
        >>> stages = build_stages(traced, partition(traced.graph, PlanConfig(2), "cpu"))
        >>> channel_pairs(stages) <= {(0, 1)}
        True
    """
    out: set[tuple[int, int]] = set()
    for p in programs:
        out.update((p.index, dst) for dst, _ in p.dests)
        out.update((src, p.index) for src, _ in p.sources)
    return out


def executed_communication(traced: TracedModel, plan: Plan, schedule: str, microbatches: int,
                           *, tagged: bool) -> str:
    """How a pipeline runs ``plan``: its own ``communication``, unless the plan is direct and
    its channels cannot be ordered on untagged links (NCCL with virtual stages, Note [message
    channels]); then ``"relay"``, with a :class:`~modelparallel.errors.RelayedSendWarning`.

    Example:
        >>> import torch
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> traced = trace(torch.nn.Linear(4, 1), (torch.randn(2, 4),))
        >>> plan = partition(traced.graph, PlanConfig(1), "cpu")
        >>> executed_communication(traced, plan, "1f1b", 2, tagged=False)
        'direct'
    """
    cfg = plan.config
    if cfg.communication != "direct" or tagged or cfg.virtual_stages == 1:
        return cfg.communication
    splits = split_stages(traced, plan)
    pairs = {(sp.index, dst) for sp in splits for dst, _ in sp.dests}
    try:
        check_channel_order(make_schedule(schedule, plan.partitions, microbatches,
                                          cfg.virtual_stages), pairs)
    except ConfigError as e:
        warnings.warn(RelayedSendWarning(
            f"the plan was made for direct sends, but with {cfg.virtual_stages} virtual stages "
            f"per rank NCCL cannot keep its messages in order ({e}); values read two or more "
            "stages later are relayed through the stages in between, which take more time "
            "and memory than the plan estimates. Plan with communication='relay' for "
            "matching estimates, or with virtual_stages=1."), stacklevel=2)
        return "relay"
    return "direct"


@dataclass
class ChannelRecv:
    """The receive of one channel's message for one action.

    Attributes:
        stage: The stage it comes from.
        pending: Its posted receive; ``None`` when it comes from the same rank (the mailbox).
        key: Its mailbox key.
    """

    stage: int
    pending: PendingRecv | None
    key: MailKey


@dataclass
class Mailbox:
    """The messages between stages of one rank during a step (Note [message channels])."""

    _box: dict[MailKey, list[torch.Tensor]] = field(default_factory=dict)

    def put(self, key: MailKey, tensors: Sequence[torch.Tensor]) -> None:
        """Leave copies of ``tensors`` (detached, as a receive buffer holds them)."""
        assert key not in self._box, key
        self._box[key] = [t.detach().clone() for t in tensors]

    def take(self, key: MailKey) -> list[torch.Tensor]:
        """The tensors left under ``key``; the sender ran before the receiver on this rank."""
        return self._box.pop(key)

    def __len__(self) -> int:
        return len(self._box)


class Router:
    """Where the messages of a pipeline's stages go: ranks, tags, and the mailbox for the
    channels inside a rank (Note [message channels]).

    Example:
        >>> r = Router(num_stages=4, num_ranks=2)
        >>> r.rank(3), r.local(1, 3), r.route(Mailbox(), 0, 1, False, 0, [torch.ones(1)])[:1]
        (1, True, (1,))
    """

    def __init__(self, num_stages: int, num_ranks: int, comm: StageComm | None = None,
                 device: torch.device | None = None) -> None:
        self.num_stages = num_stages
        self.num_ranks = num_ranks
        self.comm = comm
        self.device = device or torch.device("cpu")
        self._of = " of stage {}" if num_stages > num_ranks else ""

    def rank(self, stage: int) -> int:
        """The pipeline rank that runs ``stage`` (Note [virtual stages])."""
        return stage % self.num_ranks

    def local(self, a: int, b: int) -> bool:
        """Whether stages ``a`` and ``b`` run on one rank."""
        return self.rank(a) == self.rank(b)

    def tag(self, src: int, dst: int, gradients: bool) -> int:
        """The tag of channel ``src -> dst`` (:func:`channel_tag`)."""
        return channel_tag(src, dst, self.num_stages, gradients)

    def recv(self, src: int, dst: int, gradients: bool, i: int,
             buffers: list[torch.Tensor] | None, what: str) -> ChannelRecv:
        """The receive of channel ``src -> dst``'s message for microbatch ``i``; pass
        ``buffers=None`` when the two stages share a rank (the mailbox)."""
        assert (buffers is None) == self.local(src, dst)
        pending = (PendingRecv(self.rank(src), buffers, what, self.tag(src, dst, gradients))
                   if buffers is not None else None)
        return ChannelRecv(src, pending, (src, dst, int(gradients), i))

    def route(self, mailbox: Mailbox, src: int, dst: int, gradients: bool, i: int,
              tensors: Sequence[torch.Tensor]) -> Send | None:
        """Send ``tensors`` on channel ``src -> dst``: the send to post, or ``None`` when they
        were left in ``mailbox`` for a stage of this rank."""
        if self.local(src, dst):
            mailbox.put((src, dst, int(gradients), i), tensors)
            return None
        return (self.rank(dst), list(tensors), self.tag(src, dst, gradients))


    def forward_receives(self, tpl: Templates, program: StageProgram, i: int,
                         allow_meta: bool) -> list[ChannelRecv] | None:
        """The receives of ``program``'s forward of microbatch ``i``, one per stage it reads
        from; reads the templates not known yet if ``allow_meta`` (Note [boundary metadata]),
        else returns ``None`` (also while a stage of this rank has not sent its template)."""
        s = program.index
        for src, names in program.sources:
            if (s, src) in tpl.recv:
                continue
            if self.local(src, s) or not allow_meta:
                return None
            tpl.recv[(s, src)] = recv_template(self.comm, names, self.rank(src), s, src, i,
                                               self.tag(src, s, False))
        of = self._of.format(s)
        return [self.recv(src, s, False, i, None if self.local(src, s) else
                          allocate(tpl.recv[(s, src)][1], self.device),
                          f"the activations{of} of microbatch {i}"
                          + (f" from stage {src}" if src != s - 1 else ""))
                for src, _ in program.sources]

    def gradient_receives(self, s: int, i: int, roots: list[tuple[int, list[torch.Tensor]]]
                          ) -> list[ChannelRecv]:
        """The receives of stage ``s``'s backward of microbatch ``i``: from every stage it
        sent tensors a gradient comes back for (``roots``, per stage)."""
        of = self._of.format(s)
        return [self.recv(dst, s, True, i, None if self.local(dst, s) else
                          [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in ts],
                          f"the gradients{of} of microbatch {i}"
                          + (f" from stage {dst}" if dst != s + 1 else ""))
                for dst, ts in roots if ts]

    def unpack(self, tpl: Templates, program: StageProgram, received: list[list[torch.Tensor]],
               train: bool) -> tuple[list[Any], list[tuple[int, list[torch.Tensor]]]]:
        """The received values in ``recv`` order, and per source stage the received leaves a
        gradient goes back for (made to require grad when training)."""
        values: list[Any] = []
        leaves: list[tuple[int, list[torch.Tensor]]] = []
        for (src, _), bufs in zip(program.sources, received, strict=True):
            template = tpl.recv[(program.index, src)][1]
            mine = []
            for buf, slot in zip(bufs, slots(template)):
                if train and slot.requires_grad:
                    buf.requires_grad_(True)
                    mine.append(buf)
            leaves.append((src, mine))
            values.extend(unpack(template, bufs))
        return values, leaves

    def forward_sends(self, tpl: Templates, mailbox: Mailbox, program: StageProgram, i: int,
                      values: Sequence[Any]
                      ) -> tuple[list[Send], list[tuple[int, list[torch.Tensor]]]]:
        """Send a forward's ``values`` (``StageOutputs.sends``) to every stage that reads them
        (their templates first on a metadata step); the sends to post, and per receiving stage
        the sent tensors a gradient comes back for."""
        s = program.index
        sends: list[Send] = []
        roots: list[tuple[int, list[torch.Tensor]]] = []
        for dst, names in program.dests:
            template, tensors = pack([values[j] for j in program.send_indices(dst)])
            local = self.local(s, dst)
            send_template(tpl, None if local else self.comm, names, (s, dst), self.rank(dst),
                          template, i, self.tag(s, dst, False))
            if local:
                tpl.recv[(dst, s)] = (names, template)
            sent = self.route(mailbox, s, dst, False, i, tensors)
            sends.extend([sent] if sent is not None else [])
            roots.append((dst, [t for t, sl in zip(tensors, slots(template))
                                if sl.requires_grad]))
        return sends, roots

    def send_back(self, mailbox: Mailbox, s: int, i: int,
                  received: list[tuple[int, list[torch.Tensor]]],
                  grads: Sequence[torch.Tensor | None]) -> list[Send]:
        """Send the gradients ``grads`` (flat, ``None``: zeros) of stage ``s``'s received
        leaves (per source stage, ``received``) back to their stages."""
        sends: list[Send] = []
        pos = 0
        for src, leaves in received:
            back = [g if g is not None else torch.zeros_like(b)
                    for g, b in zip(grads[pos:pos + len(leaves)], leaves)]
            pos += len(leaves)
            sent = self.route(mailbox, s, src, True, i, back) if leaves else None
            sends.extend([sent] if sent is not None else [])
        return sends


def check_untagged_links(schedule: Schedule, pairs: set[tuple[int, int]]) -> None:
    """Refuse a pipeline whose channels ``pairs`` cannot be ordered on links without tags
    (NCCL, Note [message channels]), naming the fix.

    Raises:
        ConfigError: if :func:`~modelparallel.schedule.check_channel_order` fails.
    """
    try:
        check_channel_order(schedule, pairs)
    except ConfigError as e:
        raise ConfigError(f"{e}. On NCCL, with virtual stages, this plan's direct sends cannot "
                          "be ordered on every link; plan with communication='relay'") from None
