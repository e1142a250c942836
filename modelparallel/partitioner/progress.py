"""Progress events the partitioner reports while it works (the CLI shows them with rich).

Example:
    >>> ev = ProgressEvent("ilp", "new incumbent", incumbent=1.08, bound=1.02, gap=0.055,
    ...                    elapsed=1.5)
    >>> ev.describe()
    'ilp: new incumbent (objective 1.0800, bound 1.0200, gap 5.50%, 1.5 s)'
"""

from __future__ import annotations

from dataclasses import dataclass

from modelparallel.errors import ConfigError

__all__ = ["PHASES", "ProgressEvent"]

#: The phases of :func:`modelparallel.partitioner.partition`, in the order they run.
PHASES = ("coarsen", "dp", "ilp", "refine", "bound")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    Attributes:
        phase: ``"coarsen"``, ``"dp"``, ``"ilp"``, ``"refine"`` or ``"bound"``.
        message: What happened, for people.
        incumbent: Objective of the best assignment known in this phase (Note [objective] for
            ``dp``/``refine``/``bound``; the ILP's own normalised objective for ``ilp``).
        bound: A proven lower bound on that phase's problem, when known.
        gap: ``(incumbent - bound) / incumbent``, when known.
        elapsed: Seconds since ``partition`` started (since the solve for solver callbacks).
    """

    phase: str
    message: str
    incumbent: float | None = None
    bound: float | None = None
    gap: float | None = None
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"progress phase {self.phase!r} is not one of {PHASES}")
        if self.elapsed < 0:
            raise ConfigError(f"elapsed = {self.elapsed} must be >= 0")

    def describe(self) -> str:
        """A one-line description."""
        parts = []
        if self.incumbent is not None:
            parts.append(f"objective {self.incumbent:.4f}")
        if self.bound is not None:
            parts.append(f"bound {self.bound:.4f}")
        if self.gap is not None:
            parts.append(f"gap {100 * self.gap:.2f}%")
        parts.append(f"{self.elapsed:.1f} s")
        return f"{self.phase}: {self.message} ({', '.join(parts)})"
