"""Sockets and the SSH handshake: a tuned TCP connection, cipher order, banner and key exchange.

Owns ``_open_tcp`` (with TCP_NODELAY, keepalives and TCP_USER_TIMEOUT), the preferred ciphers
and host key types, and ``_start_client`` (errors mapped to ``HostUnreachableError`` /
``TransportError``). It trusts nothing: checking the server's key is :mod:`.hostkeys`'s, logging
in is :mod:`.auth`'s. It imports no other module of this package.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

import paramiko

from ...errors import HostUnreachableError, TransportError


#: Ciphers in the order we offer them. AES-GCM is paramiko's fastest: one
#: AEAD pass per packet instead of a cipher pass plus an HMAC pass.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


def _open_tcp(
    alias: str,
    hostname: str,
    port: int,
    deadline: float,
    *,
    keepalive_interval: float | None,
    dead_after: float | None,
) -> socket.socket:
    """A connected TCP socket, tuned for a long-lived low-latency SSH connection."""
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"cannot resolve {hostname!r} (host {alias!r}): {exc.strerror}"
        raise HostUnreachableError(alias, msg) from exc
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            _tune(sock, keepalive_interval, dead_after)
            sock.settimeout(remaining)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is None or isinstance(last, TimeoutError):
        reason = "no answer within the connect timeout"
    else:
        reason = last.strerror or str(last)
    msg = f"cannot reach {hostname}:{port} (host {alias!r}): {reason}"
    raise HostUnreachableError(alias, msg) from last


def _tune(sock: socket.socket, keepalive_interval: float | None, dead_after: float | None) -> None:
    """TCP_NODELAY always; kernel keepalives and TCP_USER_TIMEOUT for a live connection.

    TCP_USER_TIMEOUT makes the kernel drop the connection when data it sent
    stays unacknowledged for ``dead_after`` seconds, which is how a vanished
    host looks on a real network; the SSH-level probe of the keepalive thread
    covers a host whose kernel still acknowledges but whose sshd is gone.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive_interval is None or dead_after is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(keepalive_interval))
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", idle),
        ("TCP_KEEPCNT", max(1, int(dead_after // idle))),
        ("TCP_USER_TIMEOUT", int(dead_after * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _prefer_ciphers(transport: paramiko.Transport) -> None:
    options = transport.get_security_options()
    available = list(options.ciphers)
    first = [c for c in PREFERRED_CIPHERS if c in available]
    options.ciphers = first + [c for c in available if c not in first]


def _prefer_host_key_types(transport: paramiko.Transport, known: Iterable[str]) -> None:
    """Offer the key types known_hosts has for this host first, as OpenSSH does."""
    options = transport.get_security_options()
    available = list(options.key_types)
    wanted: list[str] = []
    for name in known:
        names = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if name == "ssh-rsa" else [name]
        wanted += [n for n in names if n in available and n not in wanted]
    if wanted:
        options.key_types = wanted + [n for n in available if n not in wanted]


def _start_client(transport: paramiko.Transport, alias: str, where: str, deadline: float) -> paramiko.PKey:
    """Banner and key exchange within the deadline, errors mapped; the server's host key."""
    remaining = max(0.1, deadline - time.monotonic())
    transport.banner_timeout = remaining
    transport.handshake_timeout = remaining
    try:
        transport.start_client(timeout=remaining)
        # start_client returns quietly when its timeout passes first; this raises then.
        return transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if transport.remote_version and transport.is_active():
            msg = f"SSH negotiation with {where} (host {alias!r}) failed: {exc}"
            raise TransportError(alias, msg) from exc
        if transport.remote_version:
            reason = f"the key exchange did not finish ({transport.get_exception() or exc})"
        else:
            reason = f"no SSH banner ({transport.get_exception() or exc})"
        msg = f"no SSH server answered at {where} (host {alias!r}) within the connect timeout: {reason}"
        raise HostUnreachableError(alias, msg) from exc
