"""A TCP proxy on 127.0.0.1 that misbehaves on request, for network fault tests.

``FaultProxy`` sits between a client and a server (an sshd in these tests)::

    with FaultProxy("127.0.0.1", sshd.port) as proxy:
        connect to 127.0.0.1:proxy.port ...
        proxy.blackhole()      # the host vanished: nothing moves, nothing closes
        proxy.reset()          # every current connection gets an RST
        proxy.refuse_new = True
        proxy.throttle(4 << 20)  # at most 4 MiB/s, all connections together

One thread runs everything with a selector. Mode switches are thread-safe and
synchronous: when ``blackhole()`` or ``reset()`` returns, the proxy thread has
applied it, so no byte crosses after a blackhole. ``close()`` joins the thread
and closes every socket.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

_CHUNK = 256 * 1024


class _Pipe:
    """One proxied connection: the accepted socket and the one to the server."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        # bytes read from one side and not yet written to the other
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_eof = False
        self.server_eof = False
        # whether our write side towards the client / the server is shut down
        self.client_shut = False
        self.server_shut = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.server) if s is not None]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_host:target_port``.

    ``port`` is the proxy's own port (bound to 0 and kept). Modes:

    - ``forward()``: bytes flow both ways (the initial mode);
    - ``blackhole()``: nothing is read or written in either direction, and every
      socket stays open, as a host that vanished from the network looks. New
      connections are accepted and held without a server side;
    - ``reset()``: close every current connection, both sides, with RST
      (SO_LINGER 0), then keep forwarding new ones;
    - ``refuse_new = True``: close each new connection at once (with RST);
    - ``throttle(rate)``: forward at most ``rate`` bytes a second, all connections
      together (the proxy thread sleeps after each read); ``throttle(0)`` lifts it.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pipes: list[_Pipe] = []
        self._lock = threading.Lock()
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._blackholed = False
        self._refuse_new = False
        self._rate = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def forward(self) -> None:
        """Forward bytes both ways again (after a blackhole)."""
        self._call(self._do_forward)

    def blackhole(self) -> None:
        """Stop moving bytes in both directions; keep every socket open."""
        self._call(self._do_blackhole)

    def throttle(self, rate: int) -> None:
        """Forward at most ``rate`` bytes a second (0: as fast as it goes)."""

        def apply() -> None:
            self._rate = rate

        self._call(apply)

    def reset(self) -> None:
        """Close every current connection, client and server side, with RST."""
        self._call(self._do_reset)

    @property
    def refuse_new(self) -> bool:
        return self._refuse_new

    @refuse_new.setter
    def refuse_new(self, value: bool) -> None:
        self._refuse_new = bool(value)

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        with self._lock:
            return len(self._pipes)

    def close(self) -> None:
        """Stop the thread, join it, and close every socket."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._thread.join()
        # The wake-up pair is closed only now: closed by the thread, its fd
        # number could be reused under a _wake() still in flight.
        self._wake_r.close()
        self._wake_w.close()

    # -- plumbing ---------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the proxy is closed")
        done = threading.Event()
        with self._lock:
            self._commands.append((fn, done))
        self._wake()
        while not done.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError("the proxy thread ended")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # a wake-up is already pending, or the proxy is closed

    def _run(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._drain_wake()
                    elif sock is self._listener:
                        self._accept()
                    else:
                        self._service(key.data, sock, mask)
                self._run_commands()
        finally:
            self._run_commands()
            for pipe in list(self._pipes):
                self._drop(pipe)
            self._sel.close()
            self._listener.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            try:
                fn()
            finally:
                done.set()

    # -- modes (proxy thread only) ---------------------------------------------

    def _do_forward(self) -> None:
        self._blackholed = False
        for pipe in list(self._pipes):
            if pipe.server is None and not self._connect_server(pipe):
                continue
            self._update(pipe)

    def _do_blackhole(self) -> None:
        self._blackholed = True
        for pipe in self._pipes:
            self._update(pipe)

    def _do_reset(self) -> None:
        for pipe in list(self._pipes):
            self._drop(pipe, rst=True)

    # -- connections ------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._listener.accept()
            except BlockingIOError:
                return
            if self._refuse_new:
                _close(client, rst=True)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(client)
            with self._lock:
                self._pipes.append(pipe)
            if not self._blackholed and not self._connect_server(pipe):
                continue
            self._update(pipe)

    def _connect_server(self, pipe: _Pipe) -> bool:
        try:
            server = socket.create_connection(self.target, timeout=5.0)
        except OSError:
            self._drop(pipe, rst=True)
            return False
        server.setblocking(False)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.server = server
        return True

    def _update(self, pipe: _Pipe) -> None:
        """(Re)register both sockets of a pipe for what they wait for now."""
        wanted: dict[socket.socket, int] = {}
        if not self._blackholed and pipe.server is not None:
            wanted[pipe.client] = (
                (selectors.EVENT_READ if not pipe.client_eof and not pipe.to_server else 0)
                | (selectors.EVENT_WRITE if pipe.to_client else 0)
            )
            wanted[pipe.server] = (
                (selectors.EVENT_READ if not pipe.server_eof and not pipe.to_client else 0)
                | (selectors.EVENT_WRITE if pipe.to_server else 0)
            )
        for sock in pipe.sockets():
            events = wanted.get(sock, 0)
            try:
                current = self._sel.get_key(sock).events
            except KeyError:
                current = 0
            if events == current:
                continue
            if current and events:
                self._sel.modify(sock, events, pipe)
            elif events:
                self._sel.register(sock, events, pipe)
            else:
                self._sel.unregister(sock)

    def _service(self, pipe: _Pipe, sock: socket.socket, mask: int) -> None:
        if pipe not in self._pipes:
            return
        to_client = sock is pipe.server
        other = pipe.client if to_client else pipe.server
        outgoing = pipe.to_server if not to_client else pipe.to_client
        incoming = pipe.to_client if not to_client else pipe.to_server
        try:
            if mask & selectors.EVENT_READ:
                data = sock.recv(min(_CHUNK, self._rate // 20) if self._rate else _CHUNK)
                if data and self._rate:
                    time.sleep(len(data) / self._rate)
                if data:
                    outgoing += data
                    self._flush(outgoing, other)
                else:
                    if to_client:
                        pipe.server_eof = True
                    else:
                        pipe.client_eof = True
            if mask & selectors.EVENT_WRITE:
                self._flush(incoming, sock)
            server = pipe.server
            if pipe.client_eof and not pipe.to_server and not pipe.server_shut and server:
                pipe.server_shut = True
                server.shutdown(socket.SHUT_WR)
            if pipe.server_eof and not pipe.to_client and not pipe.client_shut:
                pipe.client_shut = True
                pipe.client.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(pipe)
            return
        if pipe.client_eof and pipe.server_eof and not pipe.to_client and not pipe.to_server:
            self._drop(pipe)
            return
        self._update(pipe)

    @staticmethod
    def _flush(buf: bytearray, dest: socket.socket | None) -> None:
        if dest is None or not buf:
            return
        try:
            sent = dest.send(buf)
        except BlockingIOError:
            return
        del buf[:sent]

    def _drop(self, pipe: _Pipe, *, rst: bool = False) -> None:
        for sock in pipe.sockets():
            try:
                self._sel.unregister(sock)
            except KeyError:
                pass
            _close(sock, rst=rst)
        with self._lock:
            if pipe in self._pipes:
                self._pipes.remove(pipe)


def _close(sock: socket.socket, *, rst: bool) -> None:
    if rst:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


class EchoServer:
    """A TCP echo server on 127.0.0.1 (port 0, kept), one selector thread, for tests.

    ``port``; ``connections`` counts the connections it accepted;
    ``close()`` joins the thread and closes every socket.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: dict[socket.socket, bytearray] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"echo-{self.port}", daemon=True)
        self._thread.start()

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake_w.send(b"x")
        self._thread.join()
        self._wake_r.close()  # only now: the thread may exit on its own once _closing is set
        self._wake_w.close()

    def _run(self) -> None:
        try:
            while not self._closing:
                for key, _mask in self._sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        continue
                    if sock is self._listener:
                        self._accept()
                    else:
                        self._echo(sock)  # type: ignore[arg-type]
        finally:
            for sock in list(self._pending):
                sock.close()
            self._sel.close()
            self._listener.close()

    def _accept(self) -> None:
        try:
            conn, _addr = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        self._pending[conn] = bytearray()
        self._sel.register(conn, selectors.EVENT_READ, None)

    def _echo(self, sock: socket.socket) -> None:
        buf = self._pending[sock]
        try:
            if buf:
                sent = sock.send(buf)
                del buf[:sent]
            else:
                data = sock.recv(_CHUNK)
                if not data:
                    self._sel.unregister(sock)
                    del self._pending[sock]
                    sock.close()
                    return
                buf += data
                try:
                    sent = sock.send(buf)
                    del buf[:sent]
                except BlockingIOError:
                    pass
        except BlockingIOError:
            return
        except OSError:
            self._sel.unregister(sock)
            del self._pending[sock]
            sock.close()
            return
        self._sel.modify(sock, selectors.EVENT_WRITE if buf else selectors.EVENT_READ, None)
