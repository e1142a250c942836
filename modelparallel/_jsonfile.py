"""The JSON files modelparallel reads and writes: reading one with an error that names it, and
the one envelope check (format name, version) of the plan, IR, device-spec and node-times files.

Note [file envelope]
~~~~~~~~~~~~~~~~~~~~
Every file modelparallel writes is a JSON object whose ``format`` names what it is
(``modelparallel.plan``, ``modelparallel.ir``, ``modelparallel.node_times``,
``modelparallel.op_table``, ``modelparallel.device_spec``) and whose ``version`` is an integer
this release may or may not read. :func:`check_envelope` is the one check of both; each file kind
passes its own error class (``PlanFormatError``, ``IRFormatError``, ``ConfigError``) and the hint
that says how to make a readable file. A device spec may also be a bare object of its fields,
written by hand (the docs show such files): it is checked when it has a ``format`` or
``version``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from modelparallel.errors import ConfigError, ModelParallelError

__all__ = ["check_envelope", "read_json_file", "write_text_atomic"]


def read_json_file(path: str | Path, what: str) -> Any:
    """The parsed content of the JSON file ``path``; ``what`` names it in errors.

    Example:
        >>> read_json_file("/no/such.json", "device spec")
        Traceback (most recent call last):
        ...
        modelparallel.errors.ConfigError: cannot read device spec '/no/such.json': No such file or directory

    Raises:
        ConfigError: if the file cannot be read or is not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON: {e}") from None


def write_text_atomic(path: str | Path, text: str, what: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename), with
    the permissions of a newly created file (``0o666`` less the user's umask); ``what`` names
    the file in errors.

    Raises:
        ConfigError: if ``path`` is a directory.

    Example:
        >>> import tempfile
        >>> out = write_text_atomic(Path(tempfile.mkdtemp()) / "x.json", "{}", "file")
        >>> out.read_text()
        '{}'
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the {what} to {str(path)!r}: it is a directory; give "
                          f"a file name, e.g. {str(path / (what.replace(' ', '_') + '.json'))!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_envelope(data: Any, *, fmt: str, versions: Collection[int], what: str,
                   error: type[ModelParallelError] = ConfigError, hint: str = "",
                   version_hint: str = "") -> Mapping[str, Any]:
    """``data`` as a mapping, once its ``format`` is ``fmt`` and its ``version`` one of
    ``versions`` (Note [file envelope]).

    Args:
        data: Parsed JSON.
        fmt: The expected ``format`` value.
        versions: The versions this release reads.
        what: Names the file in messages (``"plan"``, ``"IR JSON"``, ``"node times 'x.json'"``).
        error: The exception class to raise.
        hint: Appended to a wrong-format message (how to get the right file).
        version_hint: Appended to an unsupported-version message.

    Example:
        >>> check_envelope({"format": "modelparallel.ir", "version": 1},
        ...                fmt="modelparallel.ir", versions=(1,), what="IR JSON")["version"]
        1
        >>> check_envelope({"format": "x"}, fmt="modelparallel.ir", versions=(1,), what="IR JSON")
        Traceback (most recent call last):
        ...
        modelparallel.errors.ConfigError: IR JSON has format 'x'; expected 'modelparallel.ir'

    Raises:
        ModelParallelError: of class ``error``, on a non-object, a wrong format or version.
    """
    if not isinstance(data, Mapping):
        raise error(f"{what} must be a JSON object, got {type(data).__name__}")
    got = data.get("format")
    if got != fmt:
        raise error(f"{what} has format {got!r}; expected {fmt!r}" + (f" {hint}" if hint else ""))
    version = data.get("version")
    if version not in versions:
        readable = " or ".join(str(v) for v in versions)
        raise error(f"{what} has version {version!r}; this modelparallel reads version "
                    f"{readable}" + (f". {version_hint}" if version_hint else ""))
    return data
