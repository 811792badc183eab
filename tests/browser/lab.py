"""A JupyterLab server owned by a test, and a page object for one notebook in it.

The server runs in the test session's isolated Jupyter dirs (tests/conftest.py
sets JUPYTER_CONFIG_DIR, JUPYTER_PATH, ... at import), so it finds the Link
kernelspec that conftest installed and nothing of the user's own setup.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import Locator, Page, expect

#: Plugins that would reach the internet or pop up over the page.
DISABLED_PLUGINS = (
    "@jupyterlab/apputils-extension:announcements",
    "@jupyterlab/extensionmanager-extension",
)

#: Long enough for a kernel to start on a loaded CI machine; a healthy one takes ~2 s.
KERNEL_TIMEOUT_MS = 60_000


@dataclass
class JupyterLab:
    """A running ``jupyter lab``: the process, its address, its token, its root dir."""

    process: subprocess.Popen
    url: str
    token: str
    root: Path
    log: Path

    @classmethod
    def start(cls, root: Path, log: Path, timeout: float = 60.0) -> JupyterLab:
        """Start the server on 127.0.0.1 (a port the OS picks) and wait until it answers.

        The caller owns the result and must call ``stop()`` (try/finally).
        """
        config_dir = Path(os.environ["JUPYTER_CONFIG_DIR"])
        labconfig = config_dir / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(
            json.dumps({"disabledExtensions": {name: True for name in DISABLED_PLUGINS}})
        )
        # an untitled notebook's first save would ask for a new name
        docmanager = config_dir / "lab" / "user-settings" / "@jupyterlab" / "docmanager-extension"
        docmanager.mkdir(parents=True, exist_ok=True)
        (docmanager / "plugin.jupyterlab-settings").write_text(
            json.dumps({"renameUntitledFileOnSave": False})
        )
        token = secrets.token_hex(24)
        argv = [
            sys.executable, "-m", "jupyterlab",
            "--ip=127.0.0.1", "--port=0", "--no-browser", "--allow-root",
            f"--ServerApp.root_dir={root}",
            "--LabApp.extension_manager=readonly",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # fmt: skip
        env = {**os.environ, "JUPYTER_TOKEN": token}  # not on the command line
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        lab = cls(process=process, url="", token=token, root=root, log=log)
        try:
            lab.url = lab._wait_until_up(timeout)
        except BaseException:
            lab.stop()
            raise
        return lab

    def _wait_until_up(self, timeout: float) -> str:
        """The server's base URL, once its runtime file exists and /api/status answers."""
        info = Path(os.environ["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{self.process.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                msg = f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
            if info.exists():
                try:
                    url = json.loads(info.read_text())["url"].rstrip("/")
                    self.api("GET", "/api/status", base=url)
                except (ValueError, KeyError, OSError):
                    pass  # half-written file, or not listening yet
                else:
                    return url
            time.sleep(0.1)
        msg = f"jupyter lab did not answer within {timeout} s:\n{self.log_tail()}"
        raise TimeoutError(msg)

    def api(self, method: str, path: str, *, base: str | None = None) -> Any:
        request = urllib.request.Request(
            f"{base or self.url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_sessions(self) -> None:
        """End every notebook session and its kernel, as closing them in the UI would."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        """Ask the server to shut down (it shuts its kernels down), then wait for it."""
        if self.process.poll() is None and self.url:
            try:
                self.api("POST", "/api/shutdown")
            except OSError:
                pass
        for step in (lambda: None, self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                break
            step()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def workspace_url(self, path: str = "") -> str:
        """A fresh workspace (``?reset``), so a saved layout can't interfere."""
        tree = f"/tree/{path}" if path else ""
        return f"{self.url}/lab/workspaces/{uuid.uuid4().hex}{tree}?reset&token={self.token}"


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook with these code cells and the Link kernelspec."""
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "link", "display_name": "Link (hybrid)", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {
                "id": uuid.uuid4().hex[:8],
                "cell_type": "code",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": source,
            }
            for source in cells
        ],
    }
    path.write_text(json.dumps(notebook, indent=1))
    return path


class Notebook:
    """The notebook panel that is open in ``page``."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.panel = page.locator(".jp-NotebookPanel:visible")
        self.indicator = self.panel.locator(".jp-Notebook-ExecutionIndicator")
        self.idle = self.panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")

    def wait_ready(self, kernel: str = "Link (hybrid)") -> None:
        """The notebook is shown and its kernel has started and is idle.

        Before a session exists the indicator says idle under "No Kernel", so the
        kernel's name must show first; the status bar then says "NAME | Idle".
        """
        expect(self.panel.locator(".jp-Notebook")).to_be_visible(timeout=KERNEL_TIMEOUT_MS)
        expect(self.kernel_name).to_have_text(kernel, timeout=KERNEL_TIMEOUT_MS)
        expect(self.idle).to_have_count(1, timeout=KERNEL_TIMEOUT_MS)
        expect(self.status_bar).to_have_text(f"{kernel} | Idle", timeout=KERNEL_TIMEOUT_MS)

    @property
    def status_bar(self) -> Locator:
        """The status bar's kernel item: "Link (hybrid) | Idle"."""
        return self.page.locator(".jp-StatusBar-TextItem", has_text=" | ")

    @property
    def kernel_name(self) -> Locator:
        """The toolbar's kernel button, which shows the kernel's display name."""
        return self.panel.locator(".jp-Toolbar .jp-KernelName")

    def cell(self, index: int) -> Locator:
        return self.panel.locator(".jp-Notebook .jp-Cell").nth(index)

    def outputs(self, index: int) -> Locator:
        return self.cell(index).locator(".jp-OutputArea-output")

    def error(self, index: int) -> Locator:
        """The cell's error output (a traceback or Link's short error)."""
        return self.cell(index).locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
        )

    def set_source(self, index: int, code: str) -> None:
        """Replace the cell's code by typing into its editor."""
        editor = self.cell(index).locator(".cm-content")
        editor.click()
        self.page.keyboard.press("ControlOrMeta+a")
        self.page.keyboard.insert_text(code)
        expect(editor).to_have_text(re.compile(re.escape(code.splitlines()[0])))

    def start(self, index: int) -> None:
        """Run the cell with Shift+Enter, as a user does, without waiting for it."""
        self.cell(index).locator(".jp-InputPrompt").click()
        self.page.keyboard.press("Shift+Enter")
        expect(self.prompt(index)).not_to_have_text("[ ]:")  # queued: "[*]:", or done

    def prompt(self, index: int) -> Locator:
        return self.cell(index).locator(".jp-InputArea-prompt")

    def wait_done(self, index: int, timeout: float = KERNEL_TIMEOUT_MS) -> None:
        """The cell got its execution count and the kernel is idle again."""
        expect(self.prompt(index)).to_have_text(re.compile(r"^\[\d+\]:$"), timeout=timeout)
        expect(self.idle).to_have_count(1, timeout=timeout)

    def run(self, index: int, timeout: float = KERNEL_TIMEOUT_MS) -> Locator:
        """Run the cell and wait for it; return its outputs."""
        self.start(index)
        self.wait_done(index, timeout)
        return self.outputs(index)

    def save(self) -> None:
        """Save with the toolbar's button; wait until the tab no longer shows changes."""
        self.panel.locator("jp-button[data-command='docmanager:save']").click()
        expect(self.page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty")).to_have_count(0)
