"""The reaper: what the router leaves behind is removed even if it is SIGKILLed.

A tiny child process, started first, that reads the router's instructions on
its stdin and waits for end of file. The router tells it which process groups
it started (``watch PGID``/``forget PGID``); when the stdin closes, because the
router shut down cleanly or because it died, the reaper kills what is still
watched and removes the router's private runtime directory (ipc sockets,
connection files). Remote kernels need none of this: their supervisors kill
them when the router goes silent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOURCE = """
import os, shutil, signal, sys
root = sys.argv[1]
groups = set()
for line in sys.stdin:
    word, _, arg = line.strip().partition(" ")
    if word == "watch":
        groups.add(int(arg))
    elif word == "forget":
        groups.discard(int(arg))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
shutil.rmtree(root, ignore_errors=True)
"""


class Reaper:
    """The router's reaper process (see the module docstring)."""

    def __init__(self, runtime_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SOURCE, str(runtime_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _say(self, line: str) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(f"{line}\n".encode())
            stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def watch(self, pgid: int) -> None:
        self._say(f"watch {pgid}")

    def forget(self, pgid: int) -> None:
        self._say(f"forget {pgid}")

    def close(self, timeout: float = 5.0) -> None:
        """Let it clean up now and wait for it to end."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
