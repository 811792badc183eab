"""A command on the host as a two-way byte stream (a file bundle's :class:`Pipe`).

Two kinds: a channel of the connection (no login, about 150 MiB/s through
paramiko) and a short-lived OpenSSH client (a login of about 0.2 s here, then
three times paramiko's rate), for streams big enough to repay the login.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import paramiko

#: Linux's fcntl to size a pipe, and the size asked (the default limit for a user).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 2**20

#: How long to wait for a command's exit status after its output ended.
_STATUS_WAIT = 30.0


class ChannelPipe:
    """A command on a session channel of the connection."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan
        self._out = chan.makefile("rb")

    def write(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.chan.sendall(chunk)

    def close_input(self) -> None:
        if not self.chan.closed:
            self.chan.shutdown_write()

    def lines(self) -> Iterator[bytes]:
        try:
            yield from self._out
        except (OSError, EOFError, paramiko.SSHException):
            return

    def finish(self) -> tuple[int, str]:
        try:
            if not self.chan.status_event.wait(_STATUS_WAIT):
                return -1, "no exit status"
            err = b""
            while self.chan.recv_stderr_ready():
                err += self.chan.recv_stderr(65536)
            return self.chan.exit_status, err.decode(errors="replace").strip()[-300:]
        finally:
            self.chan.close()


class OpenSSHPipe:
    """A command run by an OpenSSH client (``argv`` ends with the remote command)."""

    def __init__(self, argv: list[str], on_end: Callable[[int, str], None]) -> None:
        self._err = tempfile.TemporaryFile()  # never a pipe: a chatty client cannot block
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        with contextlib.suppress(OSError):  # fewer hand-overs to the client: a 1 MiB pipe
            fcntl.fcntl(self.proc.stdin.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
        self._on_end = on_end

    def write(self, *chunks: bytes) -> None:
        fd = self.proc.stdin.fileno()
        views = [memoryview(c) for c in chunks]
        while views:
            sent = os.writev(fd, views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][sent:]

    def close_input(self) -> None:
        self.proc.stdin.close()

    def lines(self) -> Iterator[bytes]:
        yield from self.proc.stdout

    def finish(self) -> tuple[int, str]:
        status = self.proc.wait()
        self.proc.stdout.close()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace").strip()[-300:]
        self._err.close()
        self._on_end(status, err)
        return status, err
