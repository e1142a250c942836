"""Every shell command in README.md and docs/*.md runs as written (issue 13 item 9).

Each command of a ```bash block (a `partition-plan` command or a `python -c` one-liner) is
either run here, in a temporary directory (slow ones with a smaller model: ``gpt2_medium``/
``gpt2_small`` become ``gpt2_tiny`` at batch 8, sequence 16), or listed in ``NOT_RUN`` with the
reason (a GPU, 8 processes, the setup commands CI runs itself). A new command in the docs fails
:func:`test_every_doc_command_is_classified` until it is one or the other, so a command cannot go
stale unnoticed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Commands not run here, by prefix, and why.
NOT_RUN = {
    "python3 -m venv": "setup: CI runs the README's setup commands itself",
    "pip install": "setup", ". .venv/bin/activate": "setup", "export ": "environment only",
    "python3 -m pip install": "setup (offline wheels of the GPU machine)",
    "ruff check": "CI runs it", "mypy": "CI runs it", "python -m pytest": "CI runs it",
    "torchrun --nproc_per_node 4 examples/train_gpt.py": "4 training processes (the main job)",
    "MODELPARALLEL_TRACE=trace torchrun --nproc_per_node 8": "8 processes of a user's train.py",
    "partition-plan report gpt2m.plan.json --trace": "needs the 8-process trace above",
    "python3 -m torch.distributed.run": "GPU benchmarks (docs/multigpu.md)",
    "torchrun --nproc_per_node 2 benchmarks/multigpu.py": "tests/test_multigpu_bench.py runs it",
    "python benchmarks/": "GPU benchmarks (docs/gpu.md)",
    "...": "an elided command line",
    "partition-plan calibrate -o h100.json --model": "GPU measurement (docs/gpu.md)",
    "partition-plan build pkg.module:factory": "a placeholder MODEL",
    "partition-plan build MODEL": "a placeholder MODEL",
    "torchrun --nproc_per_node 2 examples/smp_mnist.py": "tests/torch/test_examples.py runs it",
}

_SMALL = [("gpt2_medium", "gpt2_tiny"), ("gpt2_small", "gpt2_tiny")]


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if not line or line.startswith("#"):
                    continue
                for cmd in line.split(" && "):
                    out.append((doc.name, " ".join(cmd.split())))
    return out


def _skipped(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def _runnable() -> list[str]:
    return [cmd for _, cmd in _commands() if _skipped(cmd) is None]


def test_every_doc_command_is_classified() -> None:
    unknown = [cmd for cmd in _runnable() if not cmd.startswith(("partition-plan ", "python -c "))]
    assert not unknown, f"run these in this test or list them in NOT_RUN: {unknown}"


def _small(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    for big, tiny in _SMALL:
        argv = [a.replace(big, tiny) for a in argv]
    if argv[1] in ("build", "compare") and "gpt2_tiny" in argv[2]:
        argv = [a for i, a in enumerate(argv)
                if not (argv[i - 1] == "--input-shape" or a == "--input-shape")]
        argv += ["--input-shape", "8x16:int64", "--time-limit", "5"]
    if argv[1] == "calibrate":
        argv.append("--quick")
    if argv[1] == "inspect" and "--node" in argv:
        argv[argv.index("--node") + 1] = "*first*"
    return argv


@pytest.mark.slow
def test_doc_commands_run(tmp_path: Path) -> None:
    """The runnable commands, in order (later ones read earlier ones' files)."""
    failures = []
    for cmd in _runnable():
        if cmd.startswith("python -c "):  # a one-line Python example
            exe = [sys.executable, *shlex.split(cmd)[1:]]
            proc = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                failures.append(f"{cmd}\n  -> {proc.stderr.strip().splitlines()[-1:]}")
            continue
        argv = _small(cmd)
        if "*first*" in argv:  # a node of the tiny model's plan instead of gpt2-medium's
            import json

            plan = json.loads((tmp_path / argv[2]).read_text())
            argv[argv.index("*first*")] = plan["nodes"][1]["name"]
        exe = [sys.executable, "-m", "modelparallel.cli", *argv[1:]]
        proc = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failures.append(f"{cmd}\n  -> {proc.stderr.strip().splitlines()[-1:]}")
    assert not failures, "\n".join(failures)
    assert not list((ROOT / "benchmarks" / "results").glob("*tmp*"))
