"""The planning core imports no deep-learning framework (Note [planning core] in
modelparallel/__init__.py): in a process where importing torch or tensorflow fails, an IR JSON
file is planned, inspected and compared through the library and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from modelparallel.partitioner._synthetic import transformer_graph

_BLOCKER = '''
import sys


class _NoFramework:
    """Makes importing torch or tensorflow fail, as on a machine without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "tensorflow", "keras", "jax"):
            raise ImportError(f"{name} is blocked: the planning core must not import it")
        return None


sys.meta_path.insert(0, _NoFramework())
'''


def _run(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(site), str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path, env=env)


def test_core_plans_and_reports_an_ir_file_without_torch(tmp_path: Path) -> None:
    ir = tmp_path / "model.ir.json"
    ir.write_text(transformer_graph(layers=2, hidden=64, seq=16, batch=2).to_json())
    out = _run(tmp_path, f"""
        import sys
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker let torch in")
        import modelparallel
        from modelparallel import Graph, PlanConfig, load_plan, report
        from modelparallel.cli import main
        from modelparallel.cost_model import get_device_spec
        from modelparallel.partitioner import partition

        g = Graph.from_json({str(ir)!r})
        plan = partition(g, PlanConfig(partitions=2, microbatches=2, time_limit=5),
                         [get_device_spec("h100")] * 2)
        plan.save("lib.plan.json")
        report.print_summary(load_plan("lib.plan.json"))
        assert main(["build", {str(ir)!r}, "-p", "2", "-m", "2", "--time-limit", "5",
                     "-o", "cli.plan.json"]) == 0
        assert main(["inspect", "cli.plan.json", "--stage", "1"]) == 0
        from modelparallel.cost_model.node_times import save_node_times
        save_node_times("ops.json", {{g.nodes[2].name: (1e-3, 2e-3)}}, graph=g)
        assert main(["build", {str(ir)!r}, "-p", "2", "--measured", "ops.json",
                     "--time-limit", "5", "-o", "measured.plan.json"]) == 0
        assert main(["compare", {str(ir)!r}, "-p", "2", "--time-limit", "5"]) == 0
        assert "pipeline" in dir(modelparallel)
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")]
        assert not bad, bad
        print("core ok")
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("core ok"), out.stdout[-2000:]


def test_front_end_names_load_lazily() -> None:
    import modelparallel

    assert {"pipeline", "Pipeline", "PlanningOptions", "StepResult", "LoadResult"} <= set(
        modelparallel.__all__)
    assert "PlanningOptions" in dir(modelparallel)
    from modelparallel.api import PlanningOptions

    assert modelparallel.PlanningOptions is PlanningOptions
