"""A real headless browser for tests that open the HTML report (Playwright driving Chromium).

:func:`find_browser` looks for a Chromium-family executable: ``$MODELPARALLEL_BROWSER``, then
Debian's ``chromium`` (``.ci/run`` installs it), then other usual names. Tests that need one skip
with the reason when Playwright or every browser is missing, and only then.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ARTIFACTS", "find_browser", "open_page"]

#: Where browser tests leave their screenshots (kept after the run, ignored by git).
ARTIFACTS = Path(os.environ.get("MODELPARALLEL_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "test-artifacts"))

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """The path of a Chromium-family browser, or ``None``."""
    env = os.environ.get("MODELPARALLEL_BROWSER")
    if env:
        return env
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def open_page(url: str, *, width: int = 1300, height: int = 900) -> Iterator[tuple[Any, list[str]]]:
    """Open ``url`` in headless Chromium; yield the Playwright page and the list its console
    errors and uncaught page errors are appended to. Skips the test without a browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; it is in the dev extra)")
    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium-family browser found (apt-get install chromium, or set "
                    "MODELPARALLEL_BROWSER to one)")
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()
