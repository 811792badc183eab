"""Tunnels: a local port on 127.0.0.1 forwarded to a port the host reaches, one channel per connection.

Owns ``Forward`` (made by ``SSHConnection.forward``) and ``_Tunnel`` (one forwarded TCP connection,
moved by the pump with no polling). It runs in the session's pump thread and opens channels only
through the session (``open_channel_for``); it may not touch the paramiko transport itself.
"""

from __future__ import annotations

import logging
import socket

import paramiko

from .pump import _PUMP_CHUNK, _READ, _WRITE
from .session import _Session

log = logging.getLogger(__name__)


class Forward:
    """A local port on 127.0.0.1 tunnelled to ``remote_host:remote_port`` on the host.

    Made by ``SSHConnection.forward``. Each connection accepted on
    ``local_port`` gets its own direct-tcpip channel. ``close()`` stops
    listening and closes every tunnelled connection; closing or losing the SSH
    connection does the same.
    """

    def __init__(self, session: _Session, listener: socket.socket, remote: tuple[str, int]) -> None:
        self._session = session
        self._listener = listener
        self.remote_host, self.remote_port = remote
        self.local_port: int = listener.getsockname()[1]
        self._tunnels: set[_Tunnel] = set()
        self.closed = False

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Forward 127.0.0.1:{self.local_port} -> {self.remote_host}:{self.remote_port}>"

    def close(self) -> None:
        """Stop listening and close every tunnelled connection. Idempotent."""
        if not self._session.pump.call(self._close_in_pump):
            self._close_in_pump()

    # pump thread only
    def _accept(self, _mask: int) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("forward %r: accept failed: %s", self, exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tunnel = _Tunnel(self, sock)
            self._tunnels.add(tunnel)
            self._session.open_channel_for(tunnel, peer)

    def _close_in_pump(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._session.pump.unregister(self._listener)
        self._listener.close()
        for tunnel in list(self._tunnels):
            tunnel.close()
        self._session.forwards.discard(self)


class _Tunnel:
    """One forwarded TCP connection: a local socket and its channel. Pump thread only."""

    def __init__(self, forward: Forward, local: socket.socket) -> None:
        self.forward = forward
        self.pump = forward._session.pump
        self.local = local
        self.chan: paramiko.Channel | None = None
        self.to_chan = bytearray()
        self.to_local = bytearray()
        self.local_eof = False
        self.chan_eof = False
        self.chan_shut = False
        self.local_shut = False
        self.closed = False

    def attach(self, chan: paramiko.Channel) -> None:
        if self.closed:
            chan.close()
            return
        chan.settimeout(0.0)
        self.chan = chan
        self._update()

    def on_local(self, mask: int) -> None:
        try:
            if mask & _READ:
                data = self.local.recv(_PUMP_CHUNK)
                if data:
                    self.to_chan += data
                else:
                    self.local_eof = True
            if mask & _WRITE:
                self._flush_local()
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        self.send_to_chan()

    def on_chan(self, _mask: int) -> None:
        chan = self.chan
        if chan is None:
            return
        try:
            data = chan.recv(_PUMP_CHUNK)
        except socket.timeout:
            return
        except OSError:
            self.close()
            return
        if data:
            self.to_local += data
            try:
                self._flush_local()
            except OSError:
                self.close()
                return
        else:
            self.chan_eof = True
        self._update()

    def send_to_chan(self) -> None:
        """Move what the local side sent into the channel, as far as its window allows."""
        chan = self.chan
        if chan is not None:
            try:
                while self.to_chan:
                    sent = chan.send(bytes(self.to_chan[: chan.out_max_packet_size]))
                    if sent == 0:
                        self.close()
                        return
                    del self.to_chan[:sent]
            except socket.timeout:
                pass  # window full; the pump retries
            except OSError:
                self.close()
                return
        self._update()

    def _flush_local(self) -> None:
        while self.to_local:
            try:
                sent = self.local.send(self.to_local)
            except BlockingIOError:
                return
            del self.to_local[:sent]

    def _update(self) -> None:
        if self.closed:
            return
        chan = self.chan
        if chan is None:
            return  # the local side waits in the kernel's buffer until the channel is open
        try:
            if self.local_eof and not self.to_chan and not self.chan_shut:
                self.chan_shut = True
                chan.shutdown_write()
            if self.chan_eof and not self.to_local and not self.local_shut:
                self.local_shut = True
                self.local.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        # up: local -> channel is finished once EOF went out or the channel is gone;
        # down: channel -> local is finished once EOF was passed on to the local side.
        if (self.chan_shut or chan.closed) and self.local_shut:
            self.close()
            return
        self.pump.set_events(
            self.local,
            (_READ if not self.local_eof and not self.to_chan else 0)
            | (_WRITE if self.to_local else 0),
            self.on_local,
        )
        self.pump.set_events(chan, _READ if not self.chan_eof and not self.to_local else 0, self.on_chan)
        session = self.forward._session
        if self.to_chan:
            session.blocked.add(self)
        else:
            session.blocked.discard(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.forward._session.blocked.discard(self)
        self.forward._tunnels.discard(self)
        self.pump.unregister(self.local)
        self.local.close()
        if self.chan is not None:
            self.pump.unregister(self.chan)  # before close(): it closes the channel's pipe fd
            self.chan.close()
