"""A real headless Chromium for tests: find it, screenshot a page, dump its rendered DOM.

setup.sh installs one (Debian's chromium-headless-shell) when none is on PATH; DRC_BROWSER
names another binary. Each call is a fresh browser process with its own throw-away profile.
"""
from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# The same names setup.sh looks for.
NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")


def find_browser() -> str | None:
    if os.environ.get("DRC_BROWSER"):
        return shutil.which(os.environ["DRC_BROWSER"])
    return next((path for path in map(shutil.which, NAMES) if path), None)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _run(browser: str, args: list[str], url: str, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="drc-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
               f"--user-data-dir={profile}", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def screenshot(browser: str, page: Path, png: Path, width: int, height: int, timeout: float = 180) -> Path:
    """The page's first width × height CSS pixels (the viewport) as a PNG."""
    png.unlink(missing_ok=True)
    proc = _run(browser, [f"--window-size={width},{height}", f"--screenshot={png}"], page.resolve().as_uri(), timeout)
    if not png.is_file():
        raise RuntimeError(f"no screenshot written to {png}:\n{proc.stderr[-3000:]}")
    return png


def dump_dom(browser: str, page: Path, timeout: float = 180) -> str:
    """document.documentElement.outerHTML after the page loaded (the DOM as the browser built it)."""
    return _run(browser, ["--dump-dom"], page.resolve().as_uri(), timeout).stdout


class Dom(html.parser.HTMLParser):
    """The parts of a DOM dump the tests look at: every <img src>, and every table with an id as
    rows of (tag, text) cells."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str]]]] = {}
        self._table: str | None = None
        self._depth = 0                 # nesting of tables inside the one being read
        self._cell: list | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "table":
            if self._table is None and attrs.get("id"):
                self._table = attrs["id"]
                self.tables[self._table] = []
            elif self._table is not None:
                self._depth += 1
        elif self._table is not None and not self._depth:
            if tag == "tr":
                self.tables[self._table].append([])
            elif tag in ("td", "th") and self.tables[self._table]:
                self._cell = [tag, ""]
                self.tables[self._table][-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag == "table" and self._table is not None:
            if self._depth:
                self._depth -= 1
            else:
                rows = self.tables[self._table]
                self.tables[self._table] = [[(t, " ".join(s.split())) for t, s in row] for row in rows]
                self._table = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
