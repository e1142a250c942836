"""Pipeline schedules: the order in which each rank runs its stages' forwards and backwards.

Schedules are a specification that the cost model, the report and the runtime all read, so they
live in the framework-free core (no deep-learning framework is imported here). This package holds
the schedule names (ours and SMP's, :func:`normalize_schedule`), the in-flight-microbatch rule
(:func:`inflight_microbatches`, Note [in-flight microbatches]), the :class:`Action` type both
executors run, the action lists themselves (``builders.py``) and the simulator
(``simulate.py``).

A :class:`Schedule` holds one list of :class:`Action` values per rank. :func:`gpipe` (SMP
``"simple"``) runs every forward, then every backward; :func:`one_f_one_b` (SMP
``"interleaved"``) runs backward-first: ``p - s - 1`` warm-up forwards on stage ``s``, then
alternates one forward and one backward, then drains the remaining backwards;
:func:`interleaved_one_f_one_b` is Megatron's 1F1B over ``v`` virtual stages per rank;
:func:`zb_h1` is zero-bubble ZB-H1, whose backwards are split in two. :func:`simulate` plays a
schedule against per-stage compute times and a link latency to predict its timeline and bubble.

Note [schedule names]
~~~~~~~~~~~~~~~~~~~~~
Ours: ``"gpipe"``; ``"1f1b"`` (with ``virtual_stages=v > 1``: interleaved 1F1B on ``p * v``
stages); ``"zb-h1"`` (zero-bubble). SMP's ``pipeline`` values keep SMP's meaning:
``"simple"`` is GPipe and ``"interleaved"`` is 1F1B with one stage per rank (SMP's interleaving
is of forwards and backwards, not of virtual stages), so ``"interleaved"`` with
``virtual_stages > 1`` is refused (:func:`check_virtual_stages`) rather than guessed. Only
``"1f1b"`` takes virtual stages.

Note [virtual stages]
~~~~~~~~~~~~~~~~~~~~~
With ``v`` virtual stages per rank the graph is cut into ``p * v`` stages and stage ``s`` runs on
rank ``s % p``: rank ``r`` holds stages ``r, r + p, r + 2p, ...``, so the pipeline visits every
rank ``v`` times and the last stage of a round feeds rank 0 again. A :class:`Schedule` has one
action list per rank (each action names its stage); with ``v = 1`` a rank and its stage are the
same number. The planner plans ``p * v`` stages with that placement (``partitioner/``), the
runtime gives each rank its ``v`` stage programs, and the simulator charges a rank for the work
of all its stages. Interleaved 1F1B cuts the bubble to ``(p - 1) / (v m + p - 1)`` at the price
of more messages and more activations held on each rank.

Note [split backward]
~~~~~~~~~~~~~~~~~~~~~
Zero-bubble schedules split a stage's backward of a microbatch into ``I`` (the gradients of what
the stage received, sent to the previous stage: on the critical path) and ``W`` (the gradients of
the stage's parameters, which nothing else waits for and which fills idle time). A stage runs
either ``B`` or ``I`` then ``W`` for each microbatch. ``W`` needs what the forward saved, so a
microbatch's activations count as held until its ``W`` (an upper bound: ``I`` frees the part
only the input gradient needed). The simulator gives ``I`` ``1 - wgrad_fraction`` of the stage's
backward time and ``W`` the rest; the runtime computes ``I`` with ``torch.autograd.grad`` on the
received tensors and ``W`` from the gradients saved at the parameters' autograd nodes
(``modelparallel/runtime/split_backward.py``).

Note [schedule communication model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The runtime (``modelparallel/runtime/executor.py``) runs each rank's list in order. Sends are
asynchronous: a rank posts an activation (after a forward) or a gradient (after a ``B`` or
``I``) and goes on; receives block: ``F(s, i)`` waits for the activations of ``F(s - 1, i)`` and
``B``/``I(s, i)`` for the gradients of ``B``/``I(s + 1, i)``. On a link between two ranks the
receiver must take the messages in the order the sender sends them. :meth:`Schedule.validate`
checks that order on every link and deadlock freedom under exactly this model, by simulation: a
schedule passes when every rank can run its whole list with blocking receives and buffered
sends. (With rendezvous sends, where a send blocks until the peer posts the matching receive,
classic 1F1B deadlocks on two stages; our sends never block.) That is the relay pipeline's
traffic; a direct plan links any two stages ``s < t``, ``F(t, i)`` waiting for ``F(s, i)`` and
``B(s, i)`` for ``B(t, i)``: those waits follow the neighbour ones transitively, so a schedule
that validates is deadlock-free there too, and with messages told apart per pair of stages
(gloo's tags) every link is in order (Note [message channels] in
``modelparallel/runtime/channels.py``; :func:`check_channel_order` checks any set of links, with
or without tags). :func:`simulate` takes the links (``links=``, ``Plan.links``).

Note [in-flight microbatches]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
How many microbatches' activations stage ``i`` of ``p`` holds at its peak with ``m``
microbatches: GPipe runs every forward before any backward, so every stage holds all ``m``;
1F1B lets stage ``i`` run at most ``p - i`` forwards ahead of its backwards, so it holds
``min(m, p - i)``; interleaved 1F1B lets rank ``r`` run ``(v - 1) g + 2 (p - 1 - r)`` warm-up
forwards (``g`` microbatches per round), so it holds one more than that over its stages;
ZB-H1 holds a microbatch until its ``W`` and keeps every rank at most at ``p``, 1F1B's peak. For
the built-in schedules other than GPipe and plain 1F1B the per-stage count is the peak of the
built lists. :func:`inflight_microbatches` is the one statement of the rule: the cost model's
activation memory (``modelparallel/cost_model/costs.py``, the partitioner's
``Problem.inflight``), the plan's ``StageEstimate.inflight_microbatches`` and
:meth:`Schedule.validate` all read it, and the builders make lists that meet it.

Example:
    >>> s = one_f_one_b(2, 3)
    >>> print(s)
    1f1b p=2 m=3
    0: 0F0 0F1 0B0 0F2 0B1 0B2
    1: 1F0 1B0 1F1 1B1 1F2 1B2
    >>> Schedule.parse(str(s)) == s
    True
    >>> round(simulate(gpipe(4, 4), 1.0, 2.0).bubble_fraction, 4)
    0.4286
"""

from __future__ import annotations

from modelparallel.schedule._types import (
    ACTION_KINDS,
    SCHEDULE_ALIASES,
    SMP_SCHEDULES,
    Action,
    Schedule,
    check_channel_order,
    check_virtual_stages,
    normalize_schedule,
)
from modelparallel.schedule.builders import (
    gpipe,
    inflight_microbatches,
    interleaved_one_f_one_b,
    make_schedule,
    one_f_one_b,
    theoretical_bubble,
    zb_h1,
)
from modelparallel.schedule.simulate import (
    DEFAULT_WGRAD_FRACTION,
    Timeline,
    TimelineEntry,
    simulate,
)

__all__ = [
    "ACTION_KINDS",
    "DEFAULT_WGRAD_FRACTION",
    "SCHEDULE_ALIASES",
    "SMP_SCHEDULES",
    "Action",
    "Schedule",
    "Timeline",
    "TimelineEntry",
    "check_channel_order",
    "check_virtual_stages",
    "gpipe",
    "inflight_microbatches",
    "interleaved_one_f_one_b",
    "make_schedule",
    "normalize_schedule",
    "one_f_one_b",
    "simulate",
    "theoretical_bubble",
    "zb_h1",
]
