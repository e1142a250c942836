"""The index of Notes: every ``Note [name]`` block of the source tree and every reference to one.

Note [notes]
~~~~~~~~~~~~
A decision that spans files is explained once, in a comment or docstring block whose first line
is ``Note [name]`` alone and whose second line is a row of tildes (this block is one). Every other
place that depends on it says ``See Note [name]`` (or ``Note [name] in
``path.py````; ``Notes [a] and [b]`` names several). ``tests/test_notes.py`` checks that every
referenced name has exactly one definition, that a reference naming a file names the file that
holds the note, and that ``docs/notes.md`` (written by ``python -m modelparallel._notes``) lists
every note with its file. Notes explain decisions; measured figures belong in ``docs/`` (they go
stale), with the note pointing there.

This module imports nothing of modelparallel and no framework; it reads the files of a source
checkout (``.py`` and ``.md`` files under the repository root, outside hidden and build folders).

Example:
    >>> text = "x = 1\\n# Note [tiny]\\n# ~~~~~~~~~~~\\n# Why.\\n# See Note [tiny].\\n"
    >>> [(d.name, d.line) for d in definitions_in(text, "a.py")]
    [('tiny', 2)]
    >>> [r.name for r in references_in(text, "a.py")]
    ['tiny', 'tiny']
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Definition", "Reference", "collect", "definitions_in", "main", "notes_markdown",
           "problems", "references_in"]

#: The repository root of a source checkout (the folder holding ``modelparallel/``).
ROOT = Path(__file__).resolve().parent.parent

#: Folders never searched (virtual environments, caches, build output, result files).
_SKIP_DIRS = frozenset({".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__",
                        ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", "results",
                        "shared"})
#: Files never searched: the generated index itself.
_SKIP_FILES = frozenset({"docs/notes.md"})
#: Files whose mentions of notes are examples, not references (their definitions still count).
_EXAMPLE_FILES = frozenset({"modelparallel/_notes.py", "tests/test_notes.py"})

# A heading: "Note [name]" alone on its line (after a comment marker or indentation), followed by
# a line of tildes.
_DEFINITION = re.compile(r"^(?P<prefix>[ \t]*(?:#[ \t]*)?)Note \[(?P<name>[^\]\n]+)\][ \t]*\n"
                         r"(?P=prefix)~{3,}[ \t]*$", re.M)
# "Note [a]" or "Notes [a] and [b], [c]"; a name may wrap onto the next line of a comment.
_REFERENCE = re.compile(r"\bNotes?\s*\[(?P<first>[^\]]+)\](?P<more>(?:,?\s*(?:and\s+)?\[[^\]]+\])*)")
_MORE = re.compile(r"\[([^\]]+)\]")
# "... Note [a] in ``path.py``" / "in path.py" / "(`path.py`)": the file said to hold it.
_WHERE = re.compile(r"(?:\s*#)?\s*(?:,\s*part \d+,?\s*)?(?:in\s+(?:#\s*)?|\(\s*)[`:]*"
                    r"(?:mod:`~?)?(?P<path>[\w/.]+\.(?:py|md))`*")


@dataclass(frozen=True)
class Definition:
    """One ``Note [name]`` block.

    Attributes:
        name: The note's name, whitespace collapsed.
        path: The file, relative to the repository root, with ``/`` separators.
        line: The 1-based line of the heading.
    """

    name: str
    path: str
    line: int

    def __post_init__(self) -> None:
        if not self.name or self.line < 1:
            raise ValueError(f"a note needs a name and a line >= 1: {self}")


@dataclass(frozen=True)
class Reference:
    """One mention of a note by name.

    Attributes:
        name: The note's name, whitespace and comment markers collapsed.
        path: The file, relative to the repository root.
        line: The 1-based line where the mention starts.
        where: The file the mention says holds the note (``"problem.py"``), or ``""``.
    """

    name: str
    path: str
    line: int
    where: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.line < 1:
            raise ValueError(f"a reference needs a name and a line >= 1: {self}")


def _clean(name: str) -> str:
    """A name as written across comment lines, with comment markers and runs of space collapsed."""
    name = re.sub(r'"[ \t]*\n[ \t]*[rf]?"', " ", name)  # a string literal continued
    name = re.sub(r"\n[ \t]*(?:#:?|//|\*)?", " ", name)
    return " ".join(name.split())


def definitions_in(text: str, path: str) -> list[Definition]:
    """Every note heading in ``text`` (the contents of ``path``)."""
    return [Definition(_clean(m.group("name")), path, text.count("\n", 0, m.start("name")) + 1)
            for m in _DEFINITION.finditer(text)]


def references_in(text: str, path: str) -> list[Reference]:
    """Every mention of a note by name in ``text``, headings included."""
    out: list[Reference] = []
    for m in _REFERENCE.finditer(text):
        names = [m.group("first"), *_MORE.findall(m.group("more") or "")]
        w = _WHERE.match(text, m.end())
        where = w.group("path") if w else ""  # "Notes [a] and [b] in x.py": both in x.py
        line = text.count("\n", 0, m.start()) + 1
        out.extend(Reference(_clean(n), path, line, where) for n in names)
    return out


def _files(root: Path) -> Iterable[Path]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.suffix in (".py", ".md") and path.is_file() and rel.as_posix() not in _SKIP_FILES:
            yield path


def collect(root: Path = ROOT) -> tuple[list[Definition], list[Reference]]:
    """Every definition and reference under ``root``, in file order."""
    defs: list[Definition] = []
    refs: list[Reference] = []
    for path in _files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "Note" not in text:
            continue
        rel = path.relative_to(root).as_posix()
        defs.extend(definitions_in(text, rel))
        if rel not in _EXAMPLE_FILES:
            refs.extend(references_in(text, rel))
    return defs, refs


def problems(defs: Sequence[Definition], refs: Sequence[Reference]) -> list[str]:
    """What is wrong: names defined twice, references to no definition, and references whose
    stated file is not the one holding the note. Empty when all is well."""
    out = []
    by_name: dict[str, list[Definition]] = {}
    for d in defs:
        by_name.setdefault(d.name, []).append(d)
    for name, ds in sorted(by_name.items()):
        if len(ds) > 1:
            places = ", ".join(f"{d.path}:{d.line}" for d in ds)
            out.append(f"Note [{name}] is defined {len(ds)} times ({places}); keep one and "
                       "make the others references")
    for r in refs:
        found = by_name.get(r.name, [])
        if not found:
            out.append(f"{r.path}:{r.line} refers to Note [{r.name}], which no file defines; "
                       "fix the name or write the note")
        elif r.where and not _same_file(found[0].path, r.where):
            out.append(f"{r.path}:{r.line} says Note [{r.name}] is in {r.where}, but it is in "
                       f"{found[0].path}")
    return out


def _same_file(path: str, where: str) -> bool:
    """Whether ``where`` (``problem.py``, ``partitioner/problem.py``, a dotted module) names
    ``path`` (``modelparallel/partitioner/problem.py``)."""
    if where.endswith(".py") and "/" not in where and where.count(".") > 1:
        where = where[:-3].replace(".", "/") + ".py"  # modelparallel.partitioner.problem.py
    return path == where or path.endswith("/" + where)


def notes_markdown(defs: Sequence[Definition]) -> str:
    """The text of ``docs/notes.md``: every note and the file that holds it (no line numbers or
    counts, so that editing around a note does not make the index stale)."""
    lines = [
        "# Notes",
        "",
        "A decision that spans files is written once, as a `Note [name]` block, and referred to",
        "by name elsewhere (Note [notes] in `modelparallel/_notes.py`). This index is generated:",
        "regenerate it with `python -m modelparallel._notes` after adding, moving or renaming a",
        "note (`tests/test_notes.py` checks it is up to date). Measured figures the notes rely",
        "on are in [measurements.md](measurements.md), one section per note (details in",
        "[gpu.md](gpu.md) and in [benchmarks/README.md](../benchmarks/README.md)).",
        "",
        "| Note | File |",
        "|---|---|",
    ]
    for d in sorted(defs, key=lambda d: (d.name.lower(), d.path)):
        lines.append(f"| {d.name} | [`{d.path}`](../{d.path}) |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``docs/notes.md`` (or, with ``--check``, report whether it is up to date and whether
    every reference resolves). Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m modelparallel._notes", description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    defs, refs = collect(args.root)
    issues = problems(defs, refs)
    for issue in issues:
        print(issue, file=sys.stderr)
    target = args.root / "docs" / "notes.md"
    text = notes_markdown(defs)
    if args.check:
        stale = not target.exists() or target.read_text() != text
        if stale:
            print(f"{target} is out of date: run python -m modelparallel._notes", file=sys.stderr)
        return 1 if stale or issues else 0
    target.write_text(text)
    print(f"wrote {target} ({len(defs)} notes, {len(refs)} references)")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
