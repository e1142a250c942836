"""The README's commands and code stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    setup = README.split("## Set up and run", 1)[1].split("## Usage", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "partition-plan build" in main_job and "partition-plan inspect" in main_job
    assert "torchrun --nproc_per_node 4" in main_job
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert tests.strip() in ci, "CI must run the README's test command verbatim"


def test_readme_python_example_runs(tmp_path: Path) -> None:
    (code,) = _blocks("python")
    # Same code, a tiny model and two steps, in one process (a one-stage pipeline).
    code = code.replace('gpt2("small", batch_size=8, seq_len=64)',
                        'gpt2("tiny", batch_size=8, seq_len=16)')
    code = code.replace("microbatches=4", "microbatches=2").replace("range(100)", "range(2)")
    script = tmp_path / "readme_example.py"
    script.write_text(code + "\nassert set(full) >= {k for k, _ in case.model.named_parameters()}"
                             "\nprint('ok', float(result.loss))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok")
