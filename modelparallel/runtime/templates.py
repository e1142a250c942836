"""The boundary templates a sender sends before the first tensors of a new batch shape, and the
cache of them per shape key (Note [boundary metadata]).

Note [boundary metadata]
~~~~~~~~~~~~~~~~~~~~~~~~
A receiver must know the shapes and dtypes of what it receives before posting the receive. Every
rank holds the whole batch, so every rank computes the same *shape key* of the batch
(:func:`~modelparallel.runtime.microbatch.shape_key`: input shapes, dtypes, hashable non-tensor
values, train or eval). The first step with a key unseen so far is a *metadata step*: before the
tensors of its first forward message, each sender sends a template (:mod:`modelparallel.runtime.
boundary`: the value names, the structure, every tensor's shape, dtype and whether a gradient
comes back, and the non-tensor values themselves). Both sides cache the template under the key
and later steps with that key send tensors only. All microbatches of a step have the same shapes
(the batch splits evenly), so one template serves them all; the sender checks each microbatch
against it and raises :class:`CommunicationError` if a boundary value's shape or a non-tensor
value depends on the data rather than on the input shapes (not supported). The receiver checks
the value names against its own program, which catches ranks built from different plans.
Gradients have the shapes of the tensors they belong to and flow back only for floating tensors
that required grad when sent (zeros when the receiver's gradient is ``None``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from modelparallel.errors import CommunicationError
from modelparallel.runtime.comm import StageComm

__all__ = ["TemplateCache", "Templates", "recv_template", "send_template"]

_MAX_KEYS = 64


@dataclass
class Templates:
    """Boundary templates of one shape key (Note [boundary metadata]).

    Attributes:
        send: ``(this rank's stage, receiving stage)`` -> ``(value names, template)`` it sent
            on that channel (Note [message channels] in ``channels.py``).
        recv: ``(this rank's stage, sending stage)`` -> ``(value names, template)`` it
            received on that channel.
        result: ``return_outputs`` -> ``(loss dtype, output template)``.
    """

    send: dict[tuple[int, int], tuple[Any, ...]] = field(default_factory=dict)
    recv: dict[tuple[int, int], tuple[Any, ...]] = field(default_factory=dict)
    result: dict[bool, tuple[Any, Any]] = field(default_factory=dict)


class TemplateCache:
    """The :class:`Templates` of the most recent shape keys (at most 64, least recent dropped)."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[tuple[Any, ...], Templates] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> Templates:
        """The templates of ``key``, empty ones for a key not seen (or dropped) so far."""
        found = self._by_key.get(key)
        if found is not None:
            self._by_key.move_to_end(key)
            return found
        tpl = Templates()
        self._by_key[key] = tpl
        while len(self._by_key) > _MAX_KEYS:
            self._by_key.popitem(last=False)
        return tpl

    def drop(self, key: tuple[Any, ...]) -> None:
        """Forget ``key``'s templates (after a failed step: the next one starts afresh)."""
        self._by_key.pop(key, None)


def send_template(tpl: Templates, comm: StageComm | None, names: tuple[str, ...],
                  channel: tuple[int, int], dest: int, template: tuple[Any, ...], i: int,
                  tag: int = 0) -> bool:
    """On the first forward of a new shape key, send the template of ``channel`` (``(s,
    receiving stage)``) to rank ``dest`` (``comm=None``: only record it, for a receiver on this
    rank); afterwards check that microbatch ``i`` matches it (Note [boundary metadata]).
    Returns whether the template is new."""
    s = channel[0]
    sent = tpl.send.get(channel)
    if sent is None:
        if comm is not None:
            comm.send_object(dest, (names, template), tag)
        tpl.send[channel] = (names, template)
        return True
    if sent[1] != template:
        raise CommunicationError(
            f"stage {s} sends values whose shapes or non-tensor contents "
            f"differ between microbatches of one step (microbatch {i}: {template!r}; "
            f"earlier: {sent[1]!r}). Boundary values must depend on the input shapes "
            "only; keep the data-dependent computation inside one stage (pins) or use one "
            "microbatch.")
    return False


def recv_template(comm: StageComm | None, want: tuple[str, ...], source: int, s: int,
                  src: int, microbatch: int, tag: int = 0) -> tuple[Any, ...]:
    """Receive the template of the channel from stage ``src`` (on rank ``source``) to stage
    ``s`` and check its value names against ``want``, what ``s`` expects from ``src`` (Note
    [boundary metadata])."""
    assert comm is not None
    names, template = comm.recv_object(
        source, f"the boundary metadata of microbatch {microbatch}", tag)
    if tuple(names) != tuple(want):
        raise CommunicationError(
            f"stage {s} expects values {list(want)} from stage "
            f"{src}, which sends {list(names)}: the ranks were built from "
            "different plans or models. Give every rank the same plan and model.")
    return (tuple(names), template)
