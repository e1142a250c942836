"""The errors modelparallel raises on purpose.

Note [error hierarchy]
~~~~~~~~~~~~~~~~~~~~~~
Every deliberate error derives from one base, :class:`ModelParallelError`, and also from the
built-in it refines (``ValueError`` for bad input, ``RuntimeError`` for failures while running,
``TimeoutError`` for waits that ran out), so callers may catch either. A message states the rule
that was broken, the values involved, and the fix.

This module imports nothing of modelparallel, so every module (the IR, the root of the one-way
import chain, included) can import its errors from here.

Example:
    >>> try:
    ...     raise InfeasiblePlanError("model needs 90 GiB per device; capacity is 80 GiB")
    ... except ValueError as e:
    ...     print(type(e).__name__)
    InfeasiblePlanError
"""

from __future__ import annotations

__all__ = [
    "RelayedSendWarning",
    "CommunicationError",
    "ConfigError",
    "IRFormatError",
    "InfeasiblePlanError",
    "MissingDependencyError",
    "ModelParallelError",
    "PeerFailedError",
    "PlanGapWarning",
    "PlanFormatError",
    "PlanMismatchError",
    "SolverError",
    "StepTimeoutError",
    "TracingError",
    "UnsupportedFeatureError",
    "UsageError",
]


class ModelParallelError(Exception):
    """Base class of every error modelparallel raises on purpose.

    Subclasses also derive from the matching built-in (``ValueError``, ``RuntimeError``, ...), so
    existing ``except ValueError`` code keeps working. Messages state the rule that was broken,
    the values involved, and the fix.
    """


class IRFormatError(ModelParallelError, ValueError):
    """An IR graph or its JSON breaks a structural rule (unknown producer, cycle, bad field...)."""


class ConfigError(ModelParallelError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class TracingError(ModelParallelError, RuntimeError):
    """The model could not be traced into a graph by any tracer path."""


class InfeasiblePlanError(ModelParallelError, ValueError):
    """No assignment of the model to the stages fits the constraints (memory, pins).

    Attributes:
        min_memory_bytes: The smallest per-device memory that would make the plan feasible, when
            it could be computed.
    """

    def __init__(self, message: str, *, min_memory_bytes: int | None = None) -> None:
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes


class MissingDependencyError(ModelParallelError, ImportError):
    """An optional library a feature needs is not installed; the message names the extra."""


class SolverError(ModelParallelError, RuntimeError):
    """The ILP solver failed or is unavailable."""


class PlanFormatError(ModelParallelError, ValueError):
    """A plan file is malformed, of an unsupported version, or inconsistent."""


class PlanMismatchError(ModelParallelError, ValueError):
    """A plan was made for a different model (fingerprint) or world size than the one given."""


class CommunicationError(ModelParallelError, RuntimeError):
    """A point-to-point or collective operation between pipeline ranks failed."""


class PeerFailedError(CommunicationError):
    """Another rank of the pipeline failed or exited; the message names it.

    Attributes:
        peer: Global rank of the failed process, when known.
    """

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class StepTimeoutError(ModelParallelError, TimeoutError):
    """A pipeline step waited on another rank for longer than the configured timeout."""


class UsageError(ModelParallelError, RuntimeError):
    """An API was called where it is not allowed (SMP's ``model(...)`` outside ``smp.step``,
    ``state_dict()`` on only some ranks, a call before ``smp.init()``...)."""


class UnsupportedFeatureError(ModelParallelError, NotImplementedError):
    """A feature of the reference API that modelparallel does not implement (yet); the message
    names it and what to do instead."""


class UnevenDataError(CommunicationError):
    """Data-parallel replicas of a pipeline got batches of different shapes, or one ran fewer
    steps than the others (it ran out of data)."""


class RelayedSendWarning(UserWarning):
    """A plan made for direct sends (``communication="direct"``) runs relayed: its values read
    two or more stages later go through the stages in between (Note [relay communication]),
    because the pipeline cannot order its direct messages (NCCL with virtual stages, Note
    [message channels] in ``modelparallel/runtime/channels.py``). Training is unchanged, but
    those stages' time and memory exceed the plan's estimates. Plan with
    ``communication="relay"`` for estimates that match."""


class PlanGapWarning(UserWarning):
    """A plan was returned whose objective is far (more than 10%) above its proven lower bound:
    it may be poor, or the bound weak. The message gives the gap and what to try (a longer
    ``time_limit``, ``tied='replicate'``, fewer pins...)."""
