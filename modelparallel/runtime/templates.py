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

from modelparallel.codegen.program import StageProgram
from modelparallel.errors import CommunicationError
from modelparallel.runtime.comm import StageComm

__all__ = ["TemplateCache", "Templates", "recv_template", "send_template"]

_MAX_KEYS = 64


@dataclass
class Templates:
    """Boundary templates of one shape key (Note [boundary metadata]).

    Attributes:
        send: This rank's stage -> ``(value names, template)`` it sent.
        recv: This rank's stage -> ``(value names, template)`` it received.
        result: ``return_outputs`` -> ``(loss dtype, output template)``.
    """

    send: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    recv: dict[int, tuple[Any, ...]] = field(default_factory=dict)
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


def send_template(tpl: Templates, comm: StageComm | None, program: StageProgram, dest: int,
                  template: tuple[Any, ...], s: int, i: int) -> None:
    """Send stage ``s``'s template to rank ``dest`` on the first forward of a new shape key;
    afterwards check that microbatch ``i`` matches it (Note [boundary metadata])."""
    names = tuple(v.name for v in program.send)
    sent = tpl.send.get(s)
    if sent is None:
        assert comm is not None
        comm.send_object(dest, (names, template))
        tpl.send[s] = (names, template)
    elif sent[1] != template:
        raise CommunicationError(
            f"stage {s} sends values whose shapes or non-tensor contents "
            f"differ between microbatches of one step (microbatch {i}: {template!r}; "
            f"earlier: {sent[1]!r}). Boundary values must depend on the input shapes "
            "only; keep the data-dependent computation inside one stage (pins) or use one "
            "microbatch.")


def recv_template(comm: StageComm | None, program: StageProgram, source: int, s: int,
                  microbatch: int) -> tuple[Any, ...]:
    """Receive stage ``s``'s template from rank ``source`` and check its value names against
    ``program`` (Note [boundary metadata])."""
    assert comm is not None
    names, template = comm.recv_object(
        source, f"the boundary metadata of microbatch {microbatch}")
    want = tuple(v.name for v in program.recv)
    if tuple(names) != want:
        raise CommunicationError(
            f"stage {s} expects values {list(want)} from stage "
            f"{s - 1}, which sends {list(names)}: the ranks were built from "
            "different plans or models. Give every rank the same plan and model.")
    return (tuple(names), template)
