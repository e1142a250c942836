"""Reading a JSON file given by the user, with a :class:`ConfigError` that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelparallel.errors import ConfigError

__all__ = ["read_json_file"]


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
