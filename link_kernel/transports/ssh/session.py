"""One live connection's session: its threads, its liveness, its channel opens, its teardown.

Owns ``_Session``, which lives exactly as long as one paramiko transport: the keepalive thread,
the pump's tick (a silent server is declared lost after ``dead_after``), the mapping of a failure
to ``ConnectionLostError`` or ``TransportError``, and ``close()``, which joins every thread. The
forwards and commands on it are closed through ``_close_in_pump`` and seen only through the
protocols below, so this module imports neither :mod:`.tunnel` nor :mod:`.command` nor
:mod:`.connection`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Protocol

import paramiko

from ...errors import ConnectionLostError, TransportError
from .config import SSHHost
from .pump import _WINDOW_RETRY, _Pump
from .sftp import _SFTPClient

log = logging.getLogger(__name__)


class _Member(Protocol):
    """A forward or a spawned command on the session; closed in the pump thread when it ends."""

    def _close_in_pump(self) -> None: ...


class _Remote(Protocol):
    """Where a forward's channels go, as the host sees it."""

    remote_host: str
    remote_port: int


class _TunnelEnd(Protocol):
    """One tunnelled TCP connection (:class:`.tunnel._Tunnel`), as the session opens and retries it."""

    forward: _Remote

    def attach(self, chan: paramiko.Channel) -> None: ...

    def send_to_chan(self) -> None: ...

    def close(self) -> None: ...


class _Jump(Protocol):
    """The jump host's connection (:class:`.connection.SSHConnection`), closed with the session."""

    host: SSHHost

    def close(self) -> None: ...


class _Session:
    """Everything that lives exactly as long as one transport.

    ``SSHConnection`` makes a new one on each successful ``connect`` and drops
    it on ``close`` or once it is lost.
    """

    def __init__(
        self,
        host: SSHHost,
        transport: paramiko.Transport,
        sock: socket.socket | paramiko.Channel,
        jump: _Jump | None,
        keepalive_interval: float,
        dead_after: float,
    ) -> None:
        self.host = host
        self.transport = transport
        self.sock = sock
        self.jump = jump
        self.keepalive_interval = keepalive_interval
        self.dead_after = dead_after
        self.lost_reason: str | None = None
        self._lost_lock = threading.Lock()
        self.closing = False
        self.forwards: set[_Member] = set()
        self.commands: set[_Member] = set()
        self.blocked: set[_TunnelEnd] = set()
        self.sftp: _SFTPClient | None = None
        self.sftp_lock = threading.Lock()
        self.last_heard = time.monotonic()
        self.probe_sent: float | None = None
        self._stop = threading.Event()
        self._openers: set[threading.Thread] = set()
        self._openers_lock = threading.Lock()
        self.pump = _Pump(f"ssh-pump-{host.alias}", self._tick)
        self._keepalive = threading.Thread(
            target=self._keepalive_loop, name=f"ssh-keepalive-{host.alias}", daemon=True
        )
        self._keepalive.start()

    @property
    def alive(self) -> bool:
        return self.lost_reason is None and not self.closing and self.transport.is_active()

    def error(self, exc: BaseException, doing: str) -> TransportError:
        """ConnectionLostError if the connection is gone, else a TransportError for ``doing``."""
        if not self.alive:
            return self.lost(exc)
        msg = f"{doing} on {self.host.alias!r} failed: {exc}"
        return TransportError(self.host.alias, msg)

    def broken(self, exc: BaseException) -> ConnectionLostError:
        """Declare the session lost after a transport-level failure; the error to raise."""
        self._declare_lost(str(self.transport.get_exception() or exc) or type(exc).__name__)
        return self.lost(exc)

    def lost(self, exc: BaseException | None) -> ConnectionLostError:
        """The ConnectionLostError to raise for an operation that failed with ``exc``."""
        reason = self.lost_reason
        if reason is None and self.closing:
            reason = "it was closed"
        if reason is None:
            cause = self.transport.get_exception() or exc
            reason = str(cause) if cause else "the server closed it"
        return ConnectionLostError(
            self.host.alias, f"the SSH connection to {self.host.alias!r} was lost: {reason}"
        )

    # -- liveness ----------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        """Ask the server for a reply every keepalive_interval; the pump checks the age."""
        transport = self.transport
        while not self._stop.wait(self.keepalive_interval):
            if not transport.is_active():
                break
            self.probe_sent = time.monotonic()
            try:
                # An unknown request with want_reply: OpenSSH answers REQUEST_FAILURE.
                transport.global_request("keepalive@openssh.com", wait=True)
            except (paramiko.SSHException, EOFError, OSError):
                break
            if not transport.is_active():
                break
            self.last_heard = time.monotonic()
            self.probe_sent = None
        self.pump.call(self._check_transport, wait=False)

    def _tick(self) -> float | None:
        """Pump hook: retry full windows, notice death; returns the next timeout."""
        for tunnel in list(self.blocked):
            tunnel.send_to_chan()
        if self.lost_reason is not None or self.closing:
            return None
        self._check_transport()
        now = time.monotonic()
        deadline = self.last_heard + self.dead_after
        if now >= deadline:
            if self.probe_sent is not None:
                self._declare_lost(f"{self.host.alias!r} did not answer for {now - self.last_heard:.1f} s")
                return None
            timeout = self.keepalive_interval  # no probe in flight yet: look again later
        else:
            timeout = deadline - now
        if self.lost_reason is not None:
            return None
        return min(timeout, _WINDOW_RETRY) if self.blocked else timeout

    def _check_transport(self) -> None:
        if self.lost_reason is None and not self.closing and not self.transport.is_active():
            exc = self.transport.get_exception()
            self._declare_lost(str(exc) if exc else "the server closed the connection")

    def _declare_lost(self, reason: str) -> None:
        """Any thread: mark the session lost, drop the transport, close its forwards.

        Called by the pump when the server went silent or the transport died,
        and by an operation whose send failed at the socket (the transport
        thread may not have noticed yet; ``alive`` must say False at once).
        """
        with self._lost_lock:
            if self.lost_reason is not None or self.closing:
                return
            self.lost_reason = reason
        log.warning("SSH connection to %s lost: %s", self.host.alias, reason)
        self.transport.close()
        self.pump.call(self._close_local, wait=False)

    def _close_local(self) -> None:
        for forward in list(self.forwards):
            forward._close_in_pump()
        for command in list(self.commands):
            command._close_in_pump()  # its status stays readable
        self.blocked.clear()

    # -- channels ------------------------------------------------------------------

    def open_session(self) -> paramiko.Channel:
        if not self.alive:
            raise self.lost(None)
        try:
            return self.transport.open_session(timeout=self.host.connect_timeout)
        except paramiko.ChannelException as exc:
            msg = f"{self.host.alias!r} refused a new channel: {exc}"
            raise TransportError(self.host.alias, msg) from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self.broken(exc) from exc

    def open_channel_for(self, tunnel: _TunnelEnd, peer: tuple[str, int]) -> None:
        """Pump thread: open the tunnel's channel in a helper thread, attach it in the pump."""
        forward = tunnel.forward
        dest = (forward.remote_host, forward.remote_port)

        def run() -> None:
            chan: paramiko.Channel | None = None
            try:
                try:
                    chan = self.transport.open_channel(
                        "direct-tcpip", dest, peer[:2], timeout=self.host.connect_timeout
                    )
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    log.debug("forward to %s:%s failed: %s", dest[0], dest[1], exc)

                def attach() -> None:
                    if chan is None:
                        tunnel.close()
                    else:
                        tunnel.attach(chan)

                if not self.pump.call(attach, wait=False) and chan is not None:
                    chan.close()
            finally:
                with self._openers_lock:
                    self._openers.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"ssh-open-{self.host.alias}", daemon=True)
        with self._openers_lock:
            self._openers.add(thread)
        thread.start()

    # -- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Close everything this session owns and join its threads. Idempotent."""
        if self.closing:
            return
        self.closing = True
        self._stop.set()
        # Closing the transport closes every channel at once (SFTP included, so a
        # put_file in another thread fails now instead of delaying the close);
        # sshd sees the connection end and hangs up every pty.
        self.transport.close()
        self.pump.stop(on_exit=self._close_local)
        self._keepalive.join()
        with self._openers_lock:
            openers = list(self._openers)
        for thread in openers:
            thread.join()
        self.transport.join(5.0)
        self.sock.close()
        if self.jump is not None:
            self.jump.close()
