"""Host keys: fingerprints, known_hosts files, and the check of a server's key against them.

Owns ``fingerprint``, ``fetch_host_key`` (for ``link-kernel hosts add``: a key exchange, no
login, nothing trusted), ``add_known_host`` (only after the user accepted a fingerprint) and
``_check_host_key`` (paramiko RejectPolicy semantics: an unknown or changed key is an error,
never accepted). It may not authenticate, and never writes known_hosts on its own.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterable

import paramiko

from ...errors import ChangedHostKeyError, HostConfigError, UnknownHostKeyError
from .config import SSH_PORT, SSHHost, _known_hosts_name
from .handshake import _open_tcp, _prefer_ciphers, _start_client


def fingerprint(key: paramiko.PKey) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it: ``SHA256:base64-without-padding``."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def fetch_host_key(hostname: str, port: int = SSH_PORT, timeout: float = 5.0) -> paramiko.PKey:
    """Connect to ``hostname:port``, do the key exchange, and return the server's host key.

    Called by ``link-kernel hosts add`` to show the fingerprint of a host that
    is not in known_hosts yet; nothing is authenticated and nothing is
    trusted. Raises ``HostUnreachableError`` when no SSH server answers within
    ``timeout`` seconds. (A host reached only through a jump host is not
    supported here.)
    """
    deadline = time.monotonic() + timeout
    sock = _open_tcp(hostname, hostname, port, deadline, keepalive_interval=None, dead_after=None)
    transport = paramiko.Transport(sock)
    try:
        _prefer_ciphers(transport)
        return _start_client(transport, hostname, f"{hostname}:{port}", deadline)
    finally:
        transport.close()
        if transport.is_alive():
            transport.join(2.0)
        sock.close()


def add_known_host(path: str, hostname: str, port: int, key: paramiko.PKey) -> None:
    """Append ``key`` for ``hostname:port`` to the known_hosts file ``path``.

    The entry is named ``hostname`` for port 22 and ``[hostname]:port``
    otherwise, as OpenSSH writes it. A missing file is created with mode 0600
    (and a missing directory with 0700). Existing lines are left alone: call
    this only after the user accepted the fingerprint, and only for a host
    that has no key of this type recorded (a different key means the host
    changed, which needs the user's eyes, not an append).
    """
    path = os.path.expanduser(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    line = f"{_known_hosts_name(hostname, port)} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="ascii") as f:
        if f.tell() > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    f.write("\n")
        f.write(line)


def _load_known_hosts(paths: Iterable[str]) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    for path in paths:
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            continue
        try:
            keys.load(path)
        except OSError as exc:
            msg = f"cannot read known_hosts file {path}: {exc}"
            raise HostConfigError(msg) from exc
    return keys


def _check_host_key(got: paramiko.PKey, host: SSHHost, known: paramiko.HostKeys) -> None:
    """paramiko RejectPolicy semantics, with Link's errors."""
    entries = known.lookup(host.known_hosts_name)
    if entries is None or len(entries) == 0:
        raise UnknownHostKeyError(host.alias, fingerprint(got))
    expected = entries.get(got.get_name())
    if expected is None:
        # The key types known_hosts has for this host were offered first, so a
        # server that still had that key would have shown it: it changed.
        expected = next(iter(entries.values()))
    if expected != got:
        raise ChangedHostKeyError(host.alias, fingerprint(got), fingerprint(expected))
