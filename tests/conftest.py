"""Shared test set-up: ``tests/`` on ``sys.path`` so every test folder can import ``_dist``.

Tests mirror the package in sub-folders (``tests/partitioner/``, ``tests/runtime/``, ...) without
``__init__.py`` files; pytest imports them in ``importlib`` mode (pyproject), so two folders may hold
files of the same name.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
