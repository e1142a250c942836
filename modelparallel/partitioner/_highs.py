"""HiGHS options shared by the ILP (``ilp.py``, through PuLP) and the bound model (``bounds.py``,
raw highspy), and the silencing of its banner.

Both formulations run with the same option names (HiGHS's own, which ``pulp.HiGHS`` passes
through unchanged), so a change of threads, tolerances or search effort reaches both.

Example:
    >>> opts = highs_options(time_limit=2.0, gap_rel=1e-4)
    >>> opts["threads"], opts["output_flag"], opts["mip_rel_gap"]
    (1, False, 0.0001)
    >>> highs_options(time_limit=2.0, gap_rel=1e-4, cutoff=0.5)["objective_bound"]
    0.5
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["BOUND_GAP_REL", "PROOF_OPTIONS", "SEARCH_OPTIONS", "THREADS", "apply_options",
           "highs_options", "silence_banner"]

#: Threads per solve: plans are solved side by side (one per rank in the multi-GPU benchmark),
#: and the search of our models does not scale with threads.
THREADS = 1

#: Relative MIP gap of the bound model (``bounds.py``): its dual bound is what counts.
BOUND_GAP_REL = 1e-5

#: HiGHS options for our models: we always pass a good incumbent (the DP's split), so little
#: effort on primal heuristics and no root restarts; the time goes to the dual bound, which is
#: what proves plans optimal (measured on the reference models at p = 8).
SEARCH_OPTIONS: dict[str, Any] = {"mip_allow_restart": False, "mip_heuristic_effort": 0.01}

#: With a cutoff the solve is a proof (nothing better than the cutoff exists): no primal
#: heuristics at all. Branch and bound still finds better assignments where they exist. It cut
#: the time to a proof by 30% (Llama at p = 8: 15.8 s to 11.2 s, before Note [exact reduction]).
#: Branching goes by pseudo-costs alone (``mip_pscost_minreliable = 0``, no strong branching):
#: strong branching was 73% of the LP iterations of GPT-2 medium's 0.9% proof at p = 8, whose
#: search ran 15% faster without it (8.7 s to 7.4 s on one thread; the proofs of the other
#: reference models at p = 8 up to 20% faster: ``docs/measurements.md``, "Branching in the
#: proofs").
PROOF_OPTIONS: dict[str, Any] = {
    "mip_allow_restart": False, "mip_heuristic_effort": 0.0, "mip_pscost_minreliable": 0,
    "mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False,
    "mip_heuristic_run_root_reduced_cost": False, "mip_heuristic_run_feasibility_jump": False}

_BANNER_SHOWN = False
_BANNER_LOCK = threading.Lock()  # solves run on several threads (Note [proof in pieces])


def highs_options(*, time_limit: float, gap_rel: float, cutoff: float | None = None
                  ) -> dict[str, Any]:
    """Every HiGHS option of one solve, by HiGHS's names.

    Args:
        time_limit: Seconds for the solver.
        gap_rel: Relative MIP gap at which it may stop.
        cutoff: Search only below this objective (:data:`PROOF_OPTIONS` and
            ``objective_bound``); ``None``: :data:`SEARCH_OPTIONS`.
    """
    opts: dict[str, Any] = {"output_flag": False, "threads": THREADS,
                            "time_limit": float(time_limit), "mip_rel_gap": gap_rel}
    if cutoff is None:
        opts.update(SEARCH_OPTIONS)
    else:
        opts.update(PROOF_OPTIONS, objective_bound=float(cutoff))
    return opts


def apply_options(h: Any, options: dict[str, Any]) -> None:
    """Set ``options`` on a ``highspy.Highs``."""
    for key, value in options.items():
        h.setOptionValue(key, value)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 (HiGHS prints its banner from C++ on first use)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def silence_banner() -> None:
    """Make the first ``highspy.Highs`` of the process with stdout silenced (once)."""
    global _BANNER_SHOWN
    with _BANNER_LOCK:  # two threads swapping file descriptor 1 could leave it silenced
        if not _BANNER_SHOWN:
            import highspy

            with _quiet_stdout():
                h = highspy.Highs()
                h.setOptionValue("output_flag", False)
            _BANNER_SHOWN = True
