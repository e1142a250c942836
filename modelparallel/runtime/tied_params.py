"""Parameters several stages hold (tied weights): which ranks share each, and the step-end sum
of their gradients.

A parameter tied across stages (GPT-2's embedding and LM head) has a copy on every stage that
uses it, and with virtual stages a rank may hold several copies. After a step's backwards, each
copy's accumulated gradient is replaced by the sum over all copies, within the rank and then over
the ranks that share it, so every copy takes the same optimizer step as the one tensor of the
single-device model (:class:`~modelparallel.runtime.executor.StageExecutor` calls
:meth:`TiedParameters.stash_grads` before a step and :meth:`TiedParameters.reduce_grads` after).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modelparallel.codegen.program import StageProgram, add_step_grads
from modelparallel.runtime.comm import StageComm

__all__ = ["TiedParameters"]


class TiedParameters:
    """The tied parameters of one rank's stage programs.

    Building it is collective over the pipeline when ``comm`` is given: the ranks agree on every
    set of ranks that share parameters and create a subgroup for each.

    Attributes:
        programs: This rank's stage programs.
        comm: The pipeline's communicator (``None`` in one process).
        groups: ``(ranks, parameter names)`` per set of ranks sharing parameters, sorted.
    """

    def __init__(self, programs: Sequence[StageProgram], comm: StageComm | None,
                 rank_of: Callable[[int], int]) -> None:
        self.programs = tuple(programs)
        self.comm = comm
        self._rank_of = rank_of
        self.groups: list[tuple[tuple[int, ...], list[str]]] = self._agree()

    def _agree(self) -> list[tuple[tuple[int, ...], list[str]]]:
        """Collective: agree on every set of ranks sharing parameters and create subgroups.

        A parameter held by several stages of this rank (virtual stages) is summed here first
        when the stages hold separate copies of it."""
        held: dict[str, set[int]] = {}
        for prog in self.programs:
            for name, stages in prog.shared_params.items():
                held.setdefault(name, set()).update(stages)
        mine: dict[tuple[int, ...], list[str]] = {}
        for name, holders in sorted(held.items()):
            key = tuple(sorted({self._rank_of(st) for st in holders}))
            if len(key) > 1 or len(self.tensors(name)) > 1:
                mine.setdefault(key, []).append(name)
        if self.comm is None:
            return sorted(mine.items())
        sets: set[tuple[int, ...]] = set()
        for theirs in self.comm.all_gather_object(sorted(k for k in mine if len(k) > 1),
                                                  "the tied-parameter stages"):
            sets.update(tuple(x) for x in theirs)
        self.comm.make_subgroups(sorted(sets))
        return sorted(mine.items())

    def tensors(self, name: str) -> list[torch.Tensor]:
        """The distinct tensors this rank's stages hold for parameter ``name``."""
        found: list[torch.Tensor] = []
        for prog in self.programs:
            if name in prog.shared_params:
                t = prog.tensor(name)
                if all(t is not other for other in found):
                    found.append(t)
        return found

    def stash_grads(self) -> dict[str, list[torch.Tensor | None]]:
        stash: dict[str, list[torch.Tensor | None]] = {}
        for _, names in self.groups:
            for name in names:
                copies = self.tensors(name)
                stash[name] = [t.grad for t in copies]
                for t in copies:
                    t.grad = None
        return stash

    def restore_grads(self, stash: dict[str, list[torch.Tensor | None]]) -> None:
        """Put back the gradients :meth:`stash_grads` took (a step that raised before any
        backward, and left the pipeline usable)."""
        for name, grads in stash.items():
            for t, g in zip(self.tensors(name), grads):
                t.grad = g

    def reduce_grads(self, stash: dict[str, list[torch.Tensor | None]]) -> None:
        for ranks, names in self.groups:
            copies = [self.tensors(n) for n in names]
            grads = [torch.stack([t.grad if t.grad is not None else torch.zeros_like(t)
                                  for t in cs]).sum(0) for cs in copies]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if len(ranks) > 1 and self.comm is not None:
                self.comm.all_reduce_sum(flat, ranks, f"the gradients of tied parameters {names}")
            offset = 0
            for name, cs, g in zip(names, copies, grads):
                total = flat[offset:offset + g.numel()].view_as(g)
                offset += g.numel()
                add_step_grads(cs, [total] * len(cs), stash.get(name, [None] * len(cs)))
