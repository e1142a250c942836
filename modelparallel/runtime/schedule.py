"""Compatibility alias: schedules moved to the framework-free core, :mod:`modelparallel.schedule`.

Import from :mod:`modelparallel.schedule`; this module only re-exports it for code written
against the old path.
"""

from modelparallel.schedule import *  # noqa: F403
from modelparallel.schedule import __all__  # noqa: F401
