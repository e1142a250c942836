"""PuLP, imported once, without the import frames it would keep alive.

Note [pulp import frames]
~~~~~~~~~~~~~~~~~~~~~~~~~
PuLP's solver modules catch the failure to load an absent commercial
solver's library at class-definition time and keep the exception as a class attribute
(``COPT_DLL.err``, ``CPLEX_DLL.err``). Its traceback holds every frame of the import, so the first
``import pulp`` made inside a function (``Pipeline._make_plan`` imports the partitioner lazily)
pins that function's frame, its ``self`` and the user's model for the life of the process: a
second pipeline in the same process then measures the first one's parameters and optimizer state
as its own (seen as +5.4 GiB in ``benchmarks/hybrid.py``'s GPU memory table). Dropping those
tracebacks keeps the exceptions' messages, which is all PuLP reads of them.
"""

from __future__ import annotations

import sys

import pulp

__all__ = ["pulp"]


def _drop_import_tracebacks() -> None:
    for name, module in list(sys.modules.items()):
        if not name.startswith("pulp.") or module is None:
            continue
        for value in list(vars(module).values()):
            err = getattr(value, "err", None) if isinstance(value, type) else None
            if isinstance(err, BaseException):
                err.__traceback__ = None


_drop_import_tracebacks()
