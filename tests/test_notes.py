"""Notes resolve and are indexed (Note [notes] in modelparallel/_notes.py): every ``Note [x]``
reference in a ``.py`` or ``.md`` file has exactly one definition, a reference that names a file
names the one holding the note, and ``docs/notes.md`` lists every note with its file."""

from __future__ import annotations

from pathlib import Path

from modelparallel import _notes

ROOT = Path(__file__).resolve().parent.parent


# Notes referred to by code whose note is still being written elsewhere (name -> why). An entry
# must go as soon as its note is defined (the test below fails then); keep this empty otherwise.
_PENDING: dict[str, str] = {}


def test_every_reference_has_exactly_one_definition() -> None:
    defs, refs = _notes.collect(ROOT)
    assert len(defs) > 50 and len(refs) > len(defs)
    defined = {d.name for d in defs}
    done = sorted(defined & set(_PENDING))
    assert not done, f"Notes {done} are defined now: remove them from _PENDING"
    issues = _notes.problems(defs, [r for r in refs if r.name not in _PENDING])
    assert not issues, "\n".join(issues)


def test_notes_index_is_up_to_date() -> None:
    """Regenerate it with ``python -m modelparallel._notes`` after adding, moving or renaming a
    note."""
    defs, _ = _notes.collect(ROOT)
    text = (ROOT / "docs" / "notes.md").read_text()
    assert text == _notes.notes_markdown(defs)
    for d in defs:
        assert f"| {d.name} | [`{d.path}`]" in text


def test_the_readme_points_to_the_index() -> None:
    assert "docs/notes.md" in (ROOT / "README.md").read_text()


def test_definitions_and_references_are_found_across_comment_lines() -> None:
    text = ('    """Why.\n\n    Note [two words]\n    ~~~~~~~~~~~~~~~~\n    Body.\n    """\n'
            "# (see Note [two\n# words] in ``m.py``, and Notes [a] and [b])\n"
            'msg = ("Note [two "\n       "words]")\n')
    defs = _notes.definitions_in(text, "pkg/m.py")
    assert [(d.name, d.line) for d in defs] == [("two words", 3)]
    refs = _notes.references_in(text, "pkg/m.py")
    assert [(r.name, r.where) for r in refs] == [("two words", ""), ("two words", "m.py"),
                                                 ("a", ""), ("b", ""), ("two words", "")]
    assert _notes.problems(defs, refs) == [
        "pkg/m.py:8 refers to Note [a], which no file defines; fix the name or write the note",
        "pkg/m.py:8 refers to Note [b], which no file defines; fix the name or write the note"]
    twice = defs + _notes.definitions_in(text, "other.py")
    assert "defined 2 times" in _notes.problems(twice, [])[0]
    wrong = [_notes.Reference("two words", "x.md", 1, "n.py")]
    assert "is in pkg/m.py" in _notes.problems(defs, wrong)[0]
