"""Remote commands: a command running on the host in a channel of its own, read by the pump.

Owns ``RemoteCommand`` (made by ``SSHConnection.spawn``): its output drained continuously into a
bounded tail and an ``on_output`` callback, ``write`` to its stdin, ``wait`` and ``close``. It may
not open channels (the connection does) and knows nothing of kernels or supervisors.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable

import paramiko

from .pump import _PUMP_CHUNK
from .session import _Session

log = logging.getLogger(__name__)


#: How much of a spawned command's output ``RemoteCommand.output_tail`` keeps.
TAIL_BYTES = 64 * 1024


class RemoteCommand:
    """A command running on the host in its own channel, made by ``SSHConnection.spawn``.

    Its combined output is read continuously by the connection's pump (so a
    pty never fills and blocks the command) and the last ``TAIL_BYTES`` are
    kept for ``output_tail``. With a pty, the remote process gets SIGHUP when
    the channel closes or the connection drops: this is what makes a remote
    kernel unable to outlive its router. Note that with a pty, ``write`` goes
    through the terminal's line discipline (echo, lines of at most 4095 bytes,
    control characters such as ^C and ^D interpreted): send data, not
    secrets, this way; files go over SFTP.
    """

    def __init__(
        self,
        session: _Session,
        chan: paramiko.Channel,
        argv: list[str],
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self._session = session
        self._chan = chan
        self.argv = list(argv)
        #: Called in the pump thread with each chunk of output, and with b"" at its end.
        self.on_output = on_output
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        self._output_done = threading.Event()
        self.output_bytes = 0

    def __repr__(self) -> str:
        return f"<RemoteCommand {shlex.join(self.argv)!r} exit_status={self.exit_status}>"

    @property
    def exit_status(self) -> int | None:
        """The exit status once it ended; -1 if it ended without one (killed by a
        signal, or closed); None while it runs."""
        if not self._chan.exit_status_ready():
            return None
        return self._chan.exit_status

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin (blocks while the channel's window is full).

        Raises ``ConnectionLostError`` if the connection is gone, and
        ``TransportError`` if only this channel is (the command ended or was closed).
        """
        try:
            self._chan.sendall(data)
        except OSError as exc:
            raise self._session.error(exc, f"writing to {shlex.join(self.argv)!r}") from exc

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the command to end; its exit status, or None if ``timeout`` passed first.

        Returns -1 for a command that ended without an exit status (killed by
        a signal, or ``close()``d). Raises ``ConnectionLostError`` if the
        connection dropped before the command reported how it ended. Once it
        returns a status, ``output_tail`` holds everything the command wrote.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._chan.status_event.wait(timeout):
            return None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._output_done.wait(remaining):
            return None
        status = self._chan.exit_status
        if status == -1 and not self._session.alive:
            raise self._session.lost(None)
        return status

    def output_tail(self) -> str:
        """The last ``TAIL_BYTES`` of its output (stdout and stderr), decoded."""
        with self._tail_lock:
            return self._tail.decode("utf-8", "replace")

    def close(self) -> None:
        """Close the channel (call it when done, even after the command ended).

        A command still running gets SIGHUP if it has a pty. ``exit_status``
        stays readable. Closing or losing the connection closes it too. Idempotent.
        """
        if not self._session.pump.call(self._close_in_pump):
            self._close_in_pump()

    # pump thread only
    def _on_output(self, _mask: int) -> None:
        chan = self._chan
        if not (chan.recv_ready() or chan.eof_received or chan.closed):
            return  # the channel stays blocking for write(); never let recv() wait here
        try:
            data = chan.recv(_PUMP_CHUNK)
        except OSError:
            data = b""
        if data:
            self.output_bytes += len(data)
            with self._tail_lock:
                self._tail += data
                if len(self._tail) > TAIL_BYTES:
                    del self._tail[: len(self._tail) - TAIL_BYTES]
        else:
            self._session.pump.unregister(chan)
            if self._output_done.is_set():
                return
            self._output_done.set()
        if self.on_output is not None:
            try:
                self.on_output(data)
            except Exception:
                log.exception("an output callback of %r failed", self)

    def _close_in_pump(self) -> None:
        self._session.pump.unregister(self._chan)
        self._chan.close()
        ended = self._output_done.is_set()
        self._output_done.set()
        self._session.commands.discard(self)
        if not ended and self.on_output is not None:
            try:
                self.on_output(b"")  # the output ends here too (closed, or connection lost)
            except Exception:
                log.exception("an output callback of %r failed", self)
