"""Cross-rank agreement before a collective that a rank may call alone (SMP's ``state_dict()``
habit: ``if rank == 0: save(model.state_dict())``).

Note [smp collectives]
~~~~~~~~~~~~~~~~~~~~~~
``state_dict()``, ``DistributedOptimizer.state_dict()`` and ``smp.save_checkpoint`` gather over
the pipeline. If only some ranks call one, a plain gather would hang, or worse match another
collective of the ranks that did not call it. So each such call first checks in through the
c10d store under its name and a per-name call count; when every rank of the pipeline has checked
in within the timeout the gather runs, else this rank raises :class:`UsageError` naming the
ranks that did not call it and fails the pipeline's communication, so the other ranks raise
:class:`PeerFailedError` at their next pipeline operation instead of hanging.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from modelparallel.errors import UsageError
from modelparallel.torch.state_mod import state

__all__ = ["collective"]

_T = TypeVar("_T")


def collective(what: str, pipe: Any, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (a gather over ``pipe``'s ranks) once every rank has called ``what``."""
    layout = state.require()
    if not state.distributed or layout.pp == 1:
        return fn()
    ranks = layout.pp_group(state.rank)
    # Calls are counted per pipeline (a new model starts again) and keyed by the model's
    # number in this job, so a call left unmatched never pairs with a later model's.
    counts = pipe.__dict__.setdefault("_smp_collectives", {})
    n = counts[what] = counts.get(what, -1) + 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"modelparallel/smp/{state.models}/{what}/{min(ranks)}/{n}"
    store.set(f"{prefix}/{state.rank}", "1")
    try:
        store.wait([f"{prefix}/{r}" for r in ranks], timedelta(seconds=state.timeout))
    except (RuntimeError, dist.DistStoreError) as e:  # timed out
        missing = [r for r in ranks if not store.check([f"{prefix}/{r}"])]
        err = UsageError(
            f"{what} is collective: every rank of the pipeline must call it, but rank(s) "
            f"{missing} did not within {state.timeout:g} s (rank {state.rank} did). Call it on "
            f"every rank, e.g. not only under 'if smp.rank() == 0' ({type(e).__name__})")
        comm = getattr(pipe, "_comm", None)
        if comm is not None:
            comm.fail(err)
        raise err from None
    return fn()
