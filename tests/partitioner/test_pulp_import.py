"""Importing the partitioner inside a function keeps nothing of that function alive (Note [pulp
import frames]): a model passed to the first ``pipeline()`` of a process is freed with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import gc, weakref

    class Model:  # stands for the user's model, referenced by the importing frame
        pass

    def plan(model):
        from modelparallel.partitioner import partition  # the process's first import of PuLP
        return partition

    model = Model()
    ref = weakref.ref(model)
    plan(model)
    del model
    gc.collect()
    print("alive" if ref() is not None else "freed")
""")


def test_first_import_inside_a_function_pins_no_frame() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == "freed"
