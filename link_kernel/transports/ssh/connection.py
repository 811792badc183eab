"""The connection: one authenticated SSH connection to a host, reused by every cell that runs there.

Owns ``SSHConnection``: ``connect`` (TCP or a jump host, handshake, host key, login, in that
order), ``exec``, ``spawn``, ``sftp``/``put_file``/``get_file`` and ``forward``. It puts the
pieces of the other modules together and adds no protocol of its own; it knows nothing of Link's
kernels, blobs or work directories (that is :mod:`.transport`).
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator

import paramiko

from ...errors import ConnectionLostError, HostUnreachableError
from .auth import _Authenticator
from .command import RemoteCommand
from .config import SSHHost, _jump_host
from .handshake import _open_tcp, _prefer_ciphers, _prefer_host_key_types, _start_client
from .hostkeys import _check_host_key, _load_known_hosts
from .pipes import ChannelPipe
from .pump import _PUMP_CHUNK, _READ, _WINDOW_RETRY
from .session import _Session
from .sftp import SFTP_CHUNK, SFTP_WINDOW, _remove_quietly, _SFTPClient
from .tunnel import Forward


class SSHConnection:
    """One authenticated SSH connection to a host, reused by every cell that runs there.

    The remote backend makes one per host alias and calls ``connect()`` before
    the first cell (and again to reconnect once ``alive`` is False). All other
    methods need a live connection and raise ``ConnectionLostError`` when it is
    gone; they are safe to call from several threads (SFTP calls are
    serialized). ``close()`` must be called when the host is no longer needed
    (release, kernel shutdown): it closes every channel, which hangs up every
    command spawned with a pty.

    ``keepalive_interval``: seconds between keepalive probes (each wants a
    reply). ``dead_after``: seconds without a reply after which the
    connection is declared lost; also the socket's TCP_USER_TIMEOUT.
    """

    def __init__(self, host: SSHHost, *, keepalive_interval: float = 2.0, dead_after: float = 10.0) -> None:
        if keepalive_interval <= 0 or dead_after <= keepalive_interval:
            msg = "need 0 < keepalive_interval < dead_after"
            raise ValueError(msg)
        self.host = host
        self.keepalive_interval = keepalive_interval
        self.dead_after = dead_after
        self._session: _Session | None = None
        self._lock = threading.Lock()
        #: seconds the last successful connect() took (TCP, key exchange, login)
        self.connect_seconds: float | None = None

    def __enter__(self) -> SSHConnection:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "closed"
        return f"<SSHConnection {self.host.alias} {self.host.address} {state}>"

    # -- lifecycle ---------------------------------------------------------------

    def connect(self) -> None:
        """Open and authenticate the connection; a no-op while it is alive.

        Blocking; call it from a worker thread (``asyncio.to_thread``), not the
        event loop. After a loss it tears the old session down first (its
        forwards and commands are gone) and connects afresh.

        Raises ``HostUnreachableError`` (within ``host.connect_timeout`` for
        each hop), ``UnknownHostKeyError``, ``ChangedHostKeyError``,
        ``PasswordRequiredError``, ``AuthenticationError``, ``HostConfigError``
        or ``TransportError``. Never prompts.
        """
        with self._lock:
            if self._session is not None:
                if self._session.alive:
                    return
                self._session.close()
                self._session = None
            started = time.monotonic()
            self._session = self._open()
            self.connect_seconds = time.monotonic() - started

    def close(self) -> None:
        """Close forwards, SFTP, channels and the transport; join every thread. Idempotent."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    @property
    def alive(self) -> bool:
        """True while the connection is up and the server answered within ``dead_after``."""
        session = self._session
        return session is not None and session.alive

    @property
    def transport(self) -> paramiko.Transport | None:
        """The live paramiko Transport, for what this class does not wrap (or None)."""
        session = self._session
        return session.transport if session is not None else None

    def _open(self) -> _Session:
        host = self.host
        jump: SSHConnection | None = None
        sock: socket.socket | paramiko.Channel
        if host.proxy_jump:
            jump = SSHConnection(
                _jump_host(host), keepalive_interval=self.keepalive_interval, dead_after=self.dead_after
            )
            jump.connect()  # its errors name the jump host
            deadline = time.monotonic() + host.connect_timeout
            sock = self._open_via(jump, deadline)
        else:
            deadline = time.monotonic() + host.connect_timeout
            sock = _open_tcp(
                host.alias,
                host.hostname,
                host.port,
                deadline,
                keepalive_interval=self.keepalive_interval,
                dead_after=self.dead_after,
            )
        transport = paramiko.Transport(sock)
        ok = False
        try:
            known = _load_known_hosts(host.known_hosts_files)
            entries = known.lookup(host.known_hosts_name)
            _prefer_ciphers(transport)
            if entries:
                _prefer_host_key_types(transport, entries.keys())
            server_key = _start_client(transport, host.alias, f"{host.hostname}:{host.port}", deadline)
            _check_host_key(server_key, host, known)
            transport.auth_timeout = max(host.connect_timeout, 10.0)
            _Authenticator(host).authenticate(transport)
            session = _Session(host, transport, sock, jump, self.keepalive_interval, self.dead_after)
            ok = True
            return session
        finally:
            if not ok:
                transport.close()
                if transport.is_alive():
                    transport.join(2.0)
                sock.close()
                if jump is not None:
                    jump.close()

    def _open_via(self, jump: SSHConnection, deadline: float) -> paramiko.Channel:
        host = self.host
        transport = jump.transport
        remaining = max(0.1, deadline - time.monotonic())
        try:
            if transport is None:
                raise paramiko.SSHException("jump connection closed")
            return transport.open_channel(
                "direct-tcpip", (host.hostname, host.port), ("127.0.0.1", 0), timeout=remaining
            )
        except (paramiko.SSHException, EOFError, OSError) as exc:
            jump.close()
            msg = (
                f"jump host {jump.host.alias!r} cannot reach {host.hostname}:{host.port} "
                f"(host {host.alias!r}): {exc}"
            )
            raise HostUnreachableError(host.alias, msg) from exc

    def _live(self) -> _Session:
        session = self._session
        if session is None:
            msg = f"not connected to {self.host.alias!r}"
            raise ConnectionLostError(self.host.alias, msg)
        if not session.alive:
            raise session.lost(None)
        return session

    # -- commands ------------------------------------------------------------------

    def exec(self, argv: list[str], *, stdin: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
        """Run ``shlex.join(argv)`` on the host and return (exit status, stdout, stderr).

        ``stdin`` is sent and then closed (without it stdin is closed at
        once). Exit status -1 means the command ended without one (killed by a
        signal). Raises ``ConnectionLostError`` if the connection drops, and
        ``TimeoutError`` if the command has not finished after ``timeout``
        seconds (its channel is closed then; without a pty the command itself
        is not signalled, so give long-running work to ``spawn``).
        """
        session = self._live()
        chan = session.open_session()
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        pending = memoryview(stdin or b"")
        sel = selectors.DefaultSelector()
        try:
            chan.exec_command(shlex.join(argv))
            if not pending:
                chan.shutdown_write()
            sel.register(chan, _READ)
            while True:
                if pending and chan.send_ready():
                    sent = chan.send(bytes(pending[: chan.out_max_packet_size]))
                    pending = pending[sent:]
                    if not pending:
                        chan.shutdown_write()
                while chan.recv_ready():
                    out += chan.recv(_PUMP_CHUNK)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(_PUMP_CHUNK)
                if (chan.eof_received or chan.closed) and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{shlex.join(argv)!r} on {self.host.alias!r} ran longer than {timeout:g} s")
                sel.select(min(remaining, _WINDOW_RETRY) if pending else remaining)
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{shlex.join(argv)!r} on {self.host.alias!r} did not report its exit status")
            status = chan.exit_status
            if status == -1 and not session.alive:
                raise session.lost(None)
            return status, bytes(out), bytes(err)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if isinstance(exc, TimeoutError) and session.alive:
                raise
            raise session.error(exc, f"running {shlex.join(argv)!r}") from exc
        finally:
            sel.close()
            chan.close()

    def open_pipe(self, command: str) -> ChannelPipe:
        """Start ``command`` on the host, its stdin and stdout a two-way stream (no pty)."""
        session = self._live()
        chan = session.open_session()
        try:
            chan.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            chan.close()
            raise session.error(exc, f"starting {command[:60]!r}") from exc
        return ChannelPipe(chan)

    def spawn(
        self,
        argv: list[str],
        *,
        pty: bool = True,
        on_output: Callable[[bytes], None] | None = None,
    ) -> RemoteCommand:
        """Start ``shlex.join(argv)`` on the host and return at once.

        ``on_output`` gets each chunk of output (in the pump thread), from the
        first byte on, and ``b""`` once the output has ended.

        With ``pty=True`` the command runs on a pseudo-terminal, so it gets
        SIGHUP when its channel closes or the connection drops (a remote kernel
        cannot outlive its router); stdout and stderr arrive merged. Without a
        pty stderr is merged into the output too. Raises
        ``ConnectionLostError`` if the connection is gone.
        """
        session = self._live()
        chan = session.open_session()
        try:
            if pty:
                chan.get_pty(term="dumb", width=200, height=50)
            else:
                chan.set_combine_stderr(True)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            chan.close()
            raise session.error(exc, f"starting {shlex.join(argv)!r}") from exc
        command = RemoteCommand(session, chan, argv, on_output)

        def register() -> None:
            session.commands.add(command)
            session.pump.register(chan, _READ, command._on_output)

        if not session.pump.call(register):
            chan.close()
            raise session.lost(None)
        return command

    # -- files -----------------------------------------------------------------------

    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP client, opened on first use and cached.

        paramiko's SFTP client is not meant for concurrent use: hold it from
        one thread at a time (``put_file``/``get_file`` serialize themselves).
        """
        session = self._live()
        with session.sftp_lock:
            return self._sftp_locked(session)

    @contextlib.contextmanager
    def locked_sftp(self) -> Iterator[paramiko.SFTPClient]:
        """The SFTP client, held by this thread for the ``with`` block: requests of two
        threads on one client (a kernel start writing its connection file while the
        inputs' blobs are listed) can leave both waiting for ever."""
        session = self._live()
        with session.sftp_lock:
            yield self._sftp_locked(session)

    def _sftp_locked(self, session: _Session) -> _SFTPClient:
        if session.sftp is None or session.sftp.sock.closed:
            try:
                client = _SFTPClient.from_transport(session.transport, window_size=SFTP_WINDOW)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise session.lost(exc) from exc
            if client is None:
                raise session.lost(None)
            session.sftp = client
        return session.sftp

    def put_file(self, remote_path: str, data: bytes, mode: int = 0o600) -> None:
        """Write ``data`` to ``remote_path`` on the host, atomically, never readable by others.

        The bytes go into a new file beside the target, created exclusively
        with mode 0600 in the same request that creates it, then the file gets
        ``mode`` and is renamed over ``remote_path`` (posix-rename). So no one
        else can open it at any moment, and a reader sees the old file or the
        whole new one. Raises ``ConnectionLostError`` if the connection drops;
        an SFTP error (missing directory, permission) is raised as ``OSError``.
        """
        session = self._live()
        directory, name = posixpath.split(remote_path)
        temp = posixpath.join(directory, f".{name}.{secrets.token_hex(6)}.part")
        view = memoryview(data)
        with session.sftp_lock:
            sftp = self._sftp_locked(session)
            try:
                f = sftp.create_exclusive(temp, 0o600)
                try:
                    f.set_pipelined(True)
                    for offset in range(0, len(view), SFTP_CHUNK):
                        f.write(bytes(view[offset : offset + SFTP_CHUNK]))
                    if mode != 0o600:
                        f.chmod(mode)
                finally:
                    f.close()
                sftp.posix_rename(temp, remote_path)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if not session.alive:
                    raise session.lost(exc) from exc
                _remove_quietly(sftp, temp)
                raise

    def get_file(self, remote_path: str) -> bytes:
        """The content of ``remote_path`` on the host.

        Raises ``ConnectionLostError`` if the connection drops; an SFTP error
        (no such file, permission) is raised as ``OSError``.
        """
        session = self._live()
        with session.sftp_lock:
            sftp = self._sftp_locked(session)
            try:
                return sftp.read_all(remote_path)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if not session.alive:
                    raise session.lost(exc) from exc
                raise

    # -- tunnels ---------------------------------------------------------------------

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> Forward:
        """Listen on 127.0.0.1 (a fresh port) and tunnel each connection to the host.

        Every accepted connection gets a direct-tcpip channel to
        ``remote_host:remote_port`` as seen from the host; if that open fails
        (nothing listens there yet) the local connection is closed, and a
        ZeroMQ client simply reconnects. Bytes move in the connection's pump
        thread with TCP_NODELAY and no polling. Raises ``ConnectionLostError``
        if the connection is gone.
        """
        session = self._live()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        forward = Forward(session, listener, (remote_host, remote_port))

        def register() -> None:
            session.forwards.add(forward)
            session.pump.register(listener, _READ, forward._accept)

        if not session.pump.call(register) or not session.alive:
            forward.closed = True
            listener.close()
            raise session.lost(None)
        return forward
