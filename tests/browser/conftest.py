"""Browser tests: a real JupyterLab, driven through Debian's chromium by playwright.

One ``jupyter lab`` and one chromium serve a test module; each test gets a
fresh browser context, a fresh workspace and its own notebook, and its kernels
are shut down after it. The browser must not outlive the module: while
playwright's sync API is open it marks an asyncio loop as running on the main
thread, and ``asyncio.run()`` in the suite's other tests would fail. Screenshots go to one folder, printed at the end of
the run. The browser is never downloaded: CI installs chromium with apt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lab import JupyterLab
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = pytest.StashKey[Path]()

expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def lab(session_root: Path, tmp_path_factory) -> JupyterLab:
    """``jupyter lab`` on 127.0.0.1, in the session's Jupyter dirs, serving a temp root."""
    root = tmp_path_factory.mktemp("lab-root")
    server = JupyterLab.start(root, log=tmp_path_factory.mktemp("lab-log") / "jupyter-lab.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's chromium. "
            "Install it with `sudo apt-get install -y chromium` (bash .ci/run does).",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def shots(request, tmp_path_factory) -> Path:
    """The folder for screenshots; its path is printed in the run's summary."""
    folder = tmp_path_factory.mktemp("screenshots", numbered=False)
    request.config.stash[SHOTS] = folder
    return folder


@pytest.fixture
def page(browser: Browser, lab: JupyterLab) -> Page:
    """A page in a fresh browser context; the test's kernels are shut down after it."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)
    try:
        yield context.new_page()
    finally:
        context.close()
        lab.shut_down_sessions()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    folder = config.stash.get(SHOTS, None)
    if folder is not None:
        terminalreporter.write_sep("-", "browser screenshots")
        terminalreporter.write_line(str(folder))
        for shot in sorted(folder.glob("*.png")):
            terminalreporter.write_line(f"  {shot.name}")
