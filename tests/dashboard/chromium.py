"""Debian's ``/usr/bin/chromium`` under Playwright, the one way every browser test here starts it.

Never ``playwright install``: the tests drive the distribution's browser, as a hospital's
desktop would have it. A missing browser or package skips locally and fails under CI=true.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import unavailable

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def launch(*extra_args: str) -> Iterator[Any]:
    """A headless chromium (a Playwright ``Browser``), closed on exit."""
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *extra_args])
        try:
            yield b
        finally:
            b.close()


@contextmanager
def served_page(browser: Any, state: Path) -> Iterator[tuple[Any, Any, list[str]]]:
    """A read-only dashboard over ``state`` and a fresh page of ``browser``: (server, page, the
    page's JavaScript errors). Both are closed afterwards."""
    from fedbus.dashboard.server import BackgroundServer, ServeOptions

    server = BackgroundServer(ServeOptions(state=state, port=0)).start()
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield server, page, errors
    finally:
        page.close()
        server.stop()
