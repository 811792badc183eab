"""The SSH transport's connection layer: one paramiko connection per host.

An ``SSHHost`` says where a host is and how to log in, as ``~/.ssh/config``
would (``SSHHost.resolve``). An ``SSHConnection`` is one authenticated SSH
connection to it, opened once and reused by every cell that runs there::

    conn = SSHConnection(SSHHost.resolve("gpu"))
    conn.connect()                                  # host key, then keys; never a password
    code, out, err = conn.exec(["python3", "-c", "print(1)"])
    conn.put_file("/tmp/k.json", secret)            # created 0600, then written
    cmd = conn.spawn(["python3", "-m", "ipykernel_launcher", "-f", "/tmp/k.json"])
    fwd = conn.forward(remote_port)                 # 127.0.0.1:fwd.local_port -> host:remote_port
    ...
    conn.close()                                    # kernel gets SIGHUP through its pty

Errors are mapped at this boundary onto ``link_kernel.errors``:

- ``connect``: ``HostUnreachableError`` (DNS, refused, no route, timeout, no SSH
  server), ``UnknownHostKeyError`` / ``ChangedHostKeyError`` (host key not the
  one in known_hosts), ``PasswordRequiredError`` (the host wants a password or
  keyboard-interactive; Link never prompts), ``AuthenticationError`` (every key
  refused), ``HostConfigError`` (a known_hosts file cannot be read);
- everything after ``connect``: ``ConnectionLostError`` when the connection is
  gone, whether it dropped, was reset, or went silent for ``dead_after`` seconds.

Threads. Each live connection runs paramiko's transport thread, a keepalive
thread that asks the server for a reply every ``keepalive_interval`` seconds,
and one pump thread that moves the bytes of every forward, drains the output of
every spawned command, and declares the connection dead when no reply came for
``dead_after`` seconds. Channel opens for forwards run in short-lived threads
so that a slow open never stalls the traffic of the other forwards. ``close()``
joins them all.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import logging
import os
import posixpath
import re
import secrets
import selectors
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import paramiko
from paramiko.sftp import (
    CMD_DATA,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_STATUS,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_WRITE,
    int64,
)

from ..errors import (
    AuthenticationError,
    ChangedHostKeyError,
    ConnectionLostError,
    HostConfigError,
    HostUnreachableError,
    LinkError,
    PasswordRequiredError,
    TransferError,
    TransportError,
    UnknownHostKeyError,
)
from ..agent import UNCHECKED
from ..hosts import HostConfig
from . import LaunchSpec, Supervisor, Transport

log = logging.getLogger(__name__)

SSH_PORT = 22

#: Ciphers in the order we offer them. AES-GCM is paramiko's fastest: one
#: AEAD pass per packet instead of a cipher pass plus an HMAC pass.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

#: How much of a spawned command's output ``RemoteCommand.output_tail`` keeps.
TAIL_BYTES = 64 * 1024

#: The receive window of the SFTP channel. Measured: larger windows make
#: downloads slower, not faster, because paramiko's channel buffer pays for
#: every read with a move of everything buffered behind it.
SFTP_WINDOW = 2 * 1024 * 1024

#: Request size for SFTP writes (paramiko's own; larger requests measured no faster).
SFTP_CHUNK = 32 * 1024

#: Request size and number of requests in flight for SFTP reads. 255 KiB is
#: the most OpenSSH's sftp-server returns per read (SFTP_MAX_READ_LENGTH); a
#: server that returns less gets a request for the rest.
SFTP_READ_CHUNK = 256 * 1024 - 1024
SFTP_READ_DEPTH = 16

#: How long the pump waits before retrying a channel whose send window is
#: full. paramiko gives no file descriptor for "window open again", so a full
#: window is the one case the pump polls; it never happens while traffic is
#: request/reply sized.
_WINDOW_RETRY = 0.002

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_PUMP_CHUNK = 256 * 1024
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_PASSWORD_METHODS = ("password", "keyboard-interactive")


# ---------------------------------------------------------------------------
# Hosts


@dataclass
class SSHHost:
    """Where a host is and how to log in to it.

    Built by ``resolve`` from an ssh config and explicit settings (the host
    registry passes what ``link-kernel hosts add`` recorded). Plain data: it
    does no I/O after ``resolve``.

    ``proxy_jump`` is OpenSSH's ``ProxyJump`` value (``[user@]host[:port]``,
    comma-separated for a chain; each hop may be an alias of the same ssh
    config). ``identities_only`` mirrors ``IdentitiesOnly``: offer only the
    identity files (from disk or from the agent), not every agent key.
    """

    alias: str
    hostname: str
    port: int = SSH_PORT
    user: str = field(default_factory=getpass.getuser)
    identity_files: list[str] = field(default_factory=list)
    proxy_jump: str | None = None
    known_hosts_files: list[str] = field(
        default_factory=lambda: [os.path.expanduser("~/.ssh/known_hosts")]
    )
    connect_timeout: float = 5.0
    identities_only: bool = False
    ssh_config: str | None = None

    @property
    def known_hosts_name(self) -> str:
        """The name this host's key is recorded under in known_hosts."""
        return _known_hosts_name(self.hostname, self.port)

    @property
    def address(self) -> str:
        """``user@hostname:port``, for messages."""
        return f"{self.user}@{self.hostname}:{self.port}"

    @classmethod
    def resolve(
        cls,
        alias: str,
        *,
        ssh_config: str | None = None,
        hostname: str | None = None,
        port: int | None = None,
        user: str | None = None,
        identity: str | Iterable[str] | None = None,
        known_hosts: str | Iterable[str] | None = None,
    ) -> SSHHost:
        """The settings of ``alias`` from an ssh config, with explicit ones on top.

        Reads ``ssh_config`` (default ``~/.ssh/config``; a missing default file
        is an empty config) with ``paramiko.SSHConfig`` and honours HostName,
        Port, User, IdentityFile, IdentitiesOnly, ProxyJump, UserKnownHostsFile
        and ConnectTimeout. Any keyword given here overrides the config. An
        alias the config does not mention resolves to itself as the hostname.

        Raises ``HostConfigError`` when the config cannot be read or parsed,
        when a value is invalid, or when the host needs a ProxyCommand (not
        supported: use ProxyJump).
        """
        path = ssh_config or os.path.expanduser("~/.ssh/config")
        config = _load_ssh_config(path, required=ssh_config is not None)
        try:
            entry = config.lookup(alias)
        except (paramiko.SSHException, ValueError, KeyError) as exc:
            msg = f"cannot look up {alias!r} in {path}: {exc}"
            raise HostConfigError(msg) from exc
        proxy_command = entry.get("proxycommand")
        if proxy_command and proxy_command.lower() != "none":
            msg = f"host {alias!r} uses ProxyCommand in {path}, which Link does not support"
            raise HostConfigError(msg, hint="Use ProxyJump for a jump host instead.")

        try:
            resolved_port = int(port if port is not None else entry.get("port", SSH_PORT))
            timeout = float(entry.get("connecttimeout", 5.0))
        except ValueError as exc:
            msg = f"host {alias!r} in {path} has an invalid Port or ConnectTimeout: {exc}"
            raise HostConfigError(msg) from exc

        if identity is not None:
            identities = [identity] if isinstance(identity, str) else list(identity)
        else:
            identities = list(entry.get("identityfile", []))
        if known_hosts is not None:
            known = [known_hosts] if isinstance(known_hosts, str) else list(known_hosts)
        elif "userknownhostsfile" in entry:
            known = entry["userknownhostsfile"].split()
        else:
            known = ["~/.ssh/known_hosts"]
        jump = entry.get("proxyjump")
        if jump is not None and jump.lower() == "none":
            jump = None

        return cls(
            alias=alias,
            hostname=hostname or entry.get("hostname", alias),
            port=resolved_port,
            user=user or entry.get("user") or getpass.getuser(),
            identity_files=[os.path.expanduser(p) for p in identities],
            proxy_jump=jump,
            known_hosts_files=[os.path.expanduser(p) for p in known if p.lower() != "none"],
            connect_timeout=timeout,
            identities_only=entry.get("identitiesonly", "no").lower() == "yes",
            ssh_config=ssh_config,
        )


def _load_ssh_config(path: str, *, required: bool) -> paramiko.SSHConfig:
    if not os.path.exists(path):
        if required:
            msg = f"ssh config file {path} does not exist"
            raise HostConfigError(msg)
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        msg = f"cannot read ssh config {path}: {exc}"
        raise HostConfigError(msg) from exc


def _jump_host(target: SSHHost) -> SSHHost:
    """The host to connect to first for ``target.proxy_jump`` (last hop of the chain)."""
    *before, last = [hop.strip() for hop in (target.proxy_jump or "").split(",")]
    try:
        user, hostname, port = _parse_hop(last)
    except ValueError as exc:
        msg = f"host {target.alias!r} has an invalid ProxyJump {target.proxy_jump!r}"
        raise HostConfigError(msg) from exc
    hop = SSHHost.resolve(
        hostname,
        ssh_config=target.ssh_config,
        port=port,
        user=user,
    )
    hop.proxy_jump = ",".join(before) if before else None
    # Trust what the target's known_hosts files say too, and log in with the
    # target's keys when the hop has none of its own configured.
    hop.known_hosts_files += [p for p in target.known_hosts_files if p not in hop.known_hosts_files]
    if not hop.identity_files:
        hop.identity_files = list(target.identity_files)
        hop.identities_only = target.identities_only
    hop.connect_timeout = target.connect_timeout
    return hop


def _parse_hop(hop: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (host may be ``[v6addr]``) -> (user, host, port); ValueError if bad."""
    user = None
    if "@" in hop:
        user, hop = hop.rsplit("@", 1)
    port = None
    if hop.startswith("["):
        host, _, rest = hop[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hop.count(":") == 1:
        host, port_text = hop.split(":")
        port = int(port_text)
    else:
        host = hop
    return user, host, port


# ---------------------------------------------------------------------------
# Host keys


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


def _known_hosts_name(hostname: str, port: int) -> str:
    return hostname if port == SSH_PORT else f"[{hostname}]:{port}"


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


# ---------------------------------------------------------------------------
# Sockets and the SSH handshake


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


# ---------------------------------------------------------------------------
# Authentication


@dataclass
class _Candidate:
    label: str
    key: paramiko.PKey


def _read_public_blob(path: str) -> bytes | None:
    try:
        with open(path + ".pub", encoding="ascii") as f:
            fields = f.read().split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _load_private_key(path: str) -> paramiko.PKey:
    """Raises _Encrypted for a key with a passphrase; other errors pass through."""
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException as exc:
        raise _Encrypted(path) from exc
    except TypeError as exc:
        # cryptography's loaders raise TypeError for "encrypted, no password given".
        raise _Encrypted(path) from exc


class _Encrypted(Exception):
    pass


class _Authenticator:
    """Offers keys to a transport: identity files, then the agent, then default keys.

    Never asks for a password: when the keys run out and the server offers
    password or keyboard-interactive, it raises PasswordRequiredError with the
    command that fixes it.
    """

    def __init__(self, host: SSHHost) -> None:
        self.host = host
        self.refused: list[str] = []
        self.encrypted: list[str] = []
        self.unreadable: list[str] = []
        self.offered_files: list[str] = []

    def authenticate(self, transport: paramiko.Transport) -> None:
        host = self.host
        try:
            transport.auth_none(host.user)
            return
        except paramiko.BadAuthenticationType as exc:
            allowed = list(exc.allowed_types)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            msg = f"{host.address} closed the connection during login: {exc}"
            raise AuthenticationError(host.alias, msg) from exc

        agent = _open_agent()
        try:
            if "publickey" in allowed:
                allowed = self._offer_keys(transport, agent, allowed)
                if allowed is None:
                    return
        finally:
            if agent is not None:
                agent.close()
        raise self._failure(allowed)

    def _offer_keys(
        self, transport: paramiko.Transport, agent: paramiko.Agent | None, allowed: list[str]
    ) -> list[str] | None:
        """Try each key; None once authenticated, else what the server still allows."""
        for candidate in self._candidates(agent):
            try:
                remaining = transport.auth_publickey(self.host.user, candidate.key)
            except paramiko.BadAuthenticationType as exc:
                return list(exc.allowed_types)
            except paramiko.AuthenticationException:
                self.refused.append(candidate.label)
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # e.g. "Too many authentication failures": the server hung up.
                msg = (
                    f"{self.host.address} closed the connection after refusing "
                    f"{', '.join(self.refused) or 'our keys'}: {exc}"
                )
                raise AuthenticationError(self.host.alias, msg) from exc
            if not remaining:
                return None
            # Partial success: a second factor is wanted.
            return list(remaining)
        return allowed

    def _candidates(self, agent: paramiko.Agent | None) -> Iterable[_Candidate]:
        seen: set[bytes] = set()
        agent_keys = list(agent.get_keys()) if agent is not None else []
        by_blob = {k.asbytes(): k for k in agent_keys}
        files = list(self.host.identity_files)
        if not files:
            home = os.path.expanduser("~/.ssh")
            files = [os.path.join(home, n) for n in _DEFAULT_KEYS if os.path.exists(os.path.join(home, n))]
        for path in files:
            blob = _read_public_blob(path)
            if blob is not None and blob in by_blob:
                seen.add(blob)
                self.offered_files.append(path)
                yield _Candidate(f"{path} (from ssh-agent)", by_blob[blob])
                continue
            try:
                key = _load_private_key(path)
            except _Encrypted:
                self.encrypted.append(path)
                continue
            except (OSError, ValueError, paramiko.SSHException) as exc:
                if self.host.identity_files:
                    self.unreadable.append(f"{path} ({exc})")
                continue
            if key.asbytes() in seen:
                continue
            seen.add(key.asbytes())
            self.offered_files.append(path)
            yield _Candidate(path, key)
        if self.host.identities_only:
            return
        for key in agent_keys:
            if key.asbytes() in seen:
                continue
            seen.add(key.asbytes())
            comment = getattr(key, "comment", "") or fingerprint(key)
            yield _Candidate(f"agent key {comment}", key)

    def _failure(self, allowed: list[str]) -> AuthenticationError:
        """The error for a login that ran out of keys; its message names the command to run."""
        host = self.host
        who = f"{host.address} (host {host.alias!r})"
        adds = " && ".join(f"ssh-add {shlex.quote(p)}" for p in self.encrypted)
        notes = []
        if self.encrypted:
            notes.append(f"{', '.join(self.encrypted)} has a passphrase and is not loaded in ssh-agent")
        if self.unreadable:
            notes.append("cannot use " + ", ".join(self.unreadable))
        note = f" ({'; '.join(notes)})" if notes else ""
        if self.refused:
            tried = f"refused the keys offered ({', '.join(self.refused)}){note}"
        else:
            tried = f"was offered no key{note or ' (no identity file, no ssh-agent key)'}"

        password_methods = [m for m in allowed if m in _PASSWORD_METHODS]
        if password_methods:
            methods = " or ".join(password_methods)
            if "publickey" not in allowed:
                msg = (
                    f"{who} accepts only {methods} logins, and Link never asks for a password. "
                    f"Enable key logins for {host.user} there (PubkeyAuthentication yes), then run "
                    f"'{self._copy_id_command()}' in a terminal."
                )
            elif self.encrypted and not self.refused:
                msg = f"{who} {tried} and wants a {methods} login, which Link never does. Run '{adds}' in a terminal."
            else:
                msg = (
                    f"{who} {tried} and wants a {methods} login, which Link never does. "
                    f"Install your key: run '{self._copy_id_command()}' in a terminal."
                )
            hint = f"Once '{self._ssh_command()}' logs in without a password, run the cell again."
            return PasswordRequiredError(host.alias, msg, hint=hint)
        msg = f"{who} {tried}; it allows {', '.join(allowed) or 'no method'}."
        if self.encrypted:
            msg += f" Run '{adds}' in a terminal."
        return AuthenticationError(host.alias, msg)

    def _ssh_command(self) -> str:
        host = self.host
        argv = ["ssh"]
        if host.port != SSH_PORT:
            argv += ["-p", str(host.port)]
        if host.proxy_jump:
            argv += ["-J", host.proxy_jump]
        return shlex.join([*argv, f"{host.user}@{host.hostname}"])

    def _copy_id_command(self) -> str:
        host = self.host
        argv = ["ssh-copy-id"]
        key = next((p for p in self.offered_files + self.encrypted), None)
        if key is not None:
            argv += ["-i", key + ".pub"]
        if host.port != SSH_PORT:
            argv += ["-p", str(host.port)]
        if host.proxy_jump:
            argv += ["-o", f"ProxyJump={host.proxy_jump}"]
        argv.append(f"{host.user}@{host.hostname}")
        return shlex.join(argv)


def _open_agent() -> paramiko.Agent | None:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return None
    try:
        return paramiko.Agent()
    except (paramiko.SSHException, OSError) as exc:
        log.debug("ssh-agent unavailable: %s", exc)
        return None


# ---------------------------------------------------------------------------
# SFTP


class _SFTPClient(paramiko.SFTPClient):
    """paramiko's SFTP client plus two things it lacks, built on its request plumbing.

    ``create_exclusive``: a file created with its permissions in the same
    request. ``read_all``: a whole-file download with a bounded pipeline of
    large reads (paramiko's prefetch + read() is quadratic: 1 MiB/s for a
    100 MiB file here, against ~130 MiB/s for this).
    """

    def create_exclusive(self, path: str, mode: int) -> paramiko.SFTPFile:
        """Create ``path`` (it must not exist) with permissions ``mode`` from the start.

        paramiko's ``open`` sends no attributes, so the server creates the file
        with its default mode (0644 after umask) and a chmod would come too late
        for a reader who opened it in between. This is ``open(path, 'xb')`` with
        the permissions in the same request (O_CREAT|O_EXCL, mode).
        """
        attrs = paramiko.SFTPAttributes()
        attrs.st_mode = mode
        flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
        kind, msg = self._request(CMD_OPEN, self._adjust_cwd(path), flags, attrs)
        if kind != CMD_HANDLE:
            raise paramiko.SFTPError("Expected handle")
        return paramiko.SFTPFile(self, msg.get_binary(), "wb", 0)

    def read_all(self, path: str) -> bytes:
        """The whole content of ``path``, read with SFTP_READ_DEPTH requests in flight."""
        with self.open(path, "rb") as f:
            size = f.stat().st_size or 0
            return self._read_pipelined(f.handle, size)

    def read_into(self, path: str, fd: int) -> int:
        """Copy ``path`` into the local file descriptor ``fd``; return the size."""
        with self.open(path, "rb") as f:
            size = f.stat().st_size or 0
            return self._read_pipelined(f.handle, size, lambda at, data: os.pwrite(fd, data, at))

    def _read_pipelined(self, handle: bytes, size: int, write=None) -> bytes | int:
        out = bytearray(size) if write is None else None
        replies: dict[int, tuple[int, paramiko.Message]] = {}
        sink = _ReplySink(replies)
        queue: deque[tuple[int, int, int]] = deque()
        offset = 0
        end = size

        def request(start: int, length: int) -> None:
            num = self._async_request(sink, CMD_READ, handle, int64(start), length)
            queue.append((num, start, length))

        while queue or offset < end:
            while offset < end and len(queue) < SFTP_READ_DEPTH:
                length = min(SFTP_READ_CHUNK, end - offset)
                request(offset, length)
                offset += length
            num, start, length = queue.popleft()
            while num not in replies:
                self._read_response()
            kind, msg = replies.pop(num)
            if kind == CMD_STATUS:
                try:
                    self._convert_status(msg)
                except EOFError:
                    end = min(end, start)  # the file shrank since stat()
                    continue
            if kind != CMD_DATA:
                raise paramiko.SFTPError("Expected data")
            data = msg.get_binary()
            if out is None:
                write(start, data)
            else:
                out[start : start + len(data)] = data
            if not data:
                end = min(end, start)
            elif len(data) < length and start + len(data) < end:
                request(start + len(data), length - len(data))
        if out is None:
            return end
        del out[end:]
        return bytes(out)


class _ReplySink:
    """Where paramiko's SFTP client delivers replies to our pipelined requests."""

    def __init__(self, replies: dict[int, tuple[int, paramiko.Message]]) -> None:
        self._replies = replies

    def _async_response(self, kind: int, msg: paramiko.Message, num: int) -> None:
        self._replies[num] = (kind, msg)


# ---------------------------------------------------------------------------
# The pump: one selector thread per connection


class _Pump:
    """A selector loop that runs callbacks for ready sockets and channels.

    Every registered object's ``data`` is a callback taking the event mask.
    Other threads hand work over with ``call`` (runs in the pump thread, then
    returns). ``tick`` runs after every round: the connection's liveness check
    and the retry of channels with a full send window.
    """

    def __init__(self, name: str, tick: Callable[[], float | None]) -> None:
        self._sel = selectors.DefaultSelector()
        # object -> fd, so an object is unregistered by the fd it was registered
        # with: a closed paramiko Channel would make a new pipe if asked again.
        self._fds: dict[object, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _READ, None)
        self._calls: deque[tuple[Callable[[], None], threading.Event | None]] = deque()
        self._lock = threading.Lock()
        self._tick = tick
        self._stopping = False
        self._on_exit: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def in_pump(self) -> bool:
        return threading.current_thread() is self.thread

    def register(self, obj: object, events: int, callback: Callable[[int], None]) -> None:
        """Pump thread: watch ``obj`` (a socket or a paramiko Channel) for ``events``."""
        self.set_events(obj, events, callback)

    def set_events(self, obj: object, events: int, callback: Callable[[int], None]) -> None:
        """Pump thread: register, modify or unregister ``obj`` to wait for ``events`` (0: none)."""
        fd = self._fds.get(obj)
        if fd is None:
            if events:
                fd = obj.fileno()  # type: ignore[attr-defined]
                self._sel.register(fd, events, callback)
                self._fds[obj] = fd
            return
        if not events:
            self.unregister(obj)
        elif self._sel.get_key(fd).events != events:
            self._sel.modify(fd, events, callback)

    def unregister(self, obj: object) -> None:
        """Pump thread: stop watching ``obj``; call it before closing ``obj``."""
        fd = self._fds.pop(obj, None)
        if fd is not None:
            self._sel.unregister(fd)

    def call(self, fn: Callable[[], None], *, wait: bool = True) -> bool:
        """Run ``fn`` in the pump thread; False if the pump has stopped (fn not run)."""
        if self.in_pump:
            fn()
            return True
        done = threading.Event() if wait else None
        with self._lock:
            if self._stopping or not self.thread.is_alive():
                return False
            self._calls.append((fn, done))
        self._wake()
        if done is not None:
            while not done.wait(0.5):
                if not self.thread.is_alive():
                    return False
        return True

    def stop(self, on_exit: Callable[[], None] | None = None) -> None:
        """Stop the loop (``on_exit`` runs in the pump thread last) and join it.

        Called by the session's close(), never from the pump thread itself.
        """
        with self._lock:
            self._stopping = True
            if on_exit is not None:
                self._on_exit.append(on_exit)
        self._wake()
        if self.in_pump:
            return  # cannot join itself; the wake-up pair is left to the garbage collector
        self.thread.join()
        with self._lock:
            # Closed here, under the lock _wake() holds, so no wake-up can hit a
            # reused descriptor number.
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        with self._lock:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # a wake-up is pending already (buffer full), or the pump is closed

    def _run(self) -> None:
        try:
            timeout = self._tick()
            while not self._stopping:
                for key, mask in self._sel.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        key.data(mask)
                self._run_calls()
                timeout = self._tick()
        finally:
            self._run_calls()
            for fn in self._on_exit:
                fn()
            self._fds.clear()
            self._sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, done = self._calls.popleft()
            try:
                fn()
            finally:
                if done is not None:
                    done.set()


# ---------------------------------------------------------------------------
# Forwards


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


# ---------------------------------------------------------------------------
# Spawned commands


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


# ---------------------------------------------------------------------------
# One live connection


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
        jump: SSHConnection | None,
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
        self.forwards: set[Forward] = set()
        self.commands: set[RemoteCommand] = set()
        self.blocked: set[_Tunnel] = set()
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

    def open_channel_for(self, tunnel: _Tunnel, peer: tuple[str, int]) -> None:
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


# ---------------------------------------------------------------------------
# The connection


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


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except (OSError, paramiko.SSHException, EOFError):
        pass


# ---------------------------------------------------------------------------
# The Link transport over one SSHConnection


#: Files from this size up move with the OpenSSH client when it is there.
BULK_MIN = 16 * 2**20
#: What OpenSSH says when it cannot log in at all (as opposed to a broken connection).
_CANNOT_LOG_IN = re.compile(
    r"Permission denied|Host key verification failed|no such identity|Bad configuration|"
    r"Could not resolve|command-line|Too many authentication failures|kex_exchange_identification"
)


class SSHSupervisor(Supervisor):
    """A bootstrap supervisor running in a pty session on the host."""

    def __init__(self, host: str, loop) -> None:
        super().__init__(host, loop)
        self.command: RemoteCommand | None = None

    def on_output(self, data: bytes) -> None:
        if data:
            self.feed(data)
        else:
            status = self.command.exit_status if self.command is not None else None
            self.feed_eof(status)

    def write(self, data: bytes) -> None:
        command = self.command
        if command is None:
            return
        try:
            command.write(data)
        except LinkError:
            pass

    async def close(self) -> None:
        command = self.command
        if command is None:
            return
        command.close()
        try:
            await asyncio.to_thread(command.wait, 10.0)
        except LinkError:
            pass


class SSHTransport(Transport):
    """A host reached over one paramiko connection, reused across cells.

    Kernels run in pty sessions (SIGHUP reaches them when the connection
    drops), their ports are forwarded to local 127.0.0.1 ports, files and
    blobs move over the connection's SFTP channel.
    """

    kind = "ssh"

    def __init__(self, config: HostConfig, workdir: str) -> None:
        super().__init__(config.alias, workdir)
        self.config = config
        self.connection: SSHConnection | None = None
        self._forwards: dict[tuple[str, int], Forward] = {}
        self._fs = None
        self._bulk_failed = False
        self.home = ""

    def _resolve(self) -> SSHHost:
        c = self.config
        return SSHHost.resolve(
            c.alias,
            ssh_config=c.ssh_config or None,
            hostname=c.hostname or None,
            port=c.port or None,
            user=c.user or None,
            identity=c.identity or None,
            known_hosts=c.known_hosts or None,
        )

    def _connect(self) -> None:
        if self.connection is None:
            self.connection = SSHConnection(self._resolve())
        self.connection.connect()

    async def connect(self) -> None:
        if not self.connected:
            await asyncio.to_thread(self._connect)

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.alive

    def _live(self) -> SSHConnection:
        if self.connection is None:
            msg = f"not connected to {self.alias}"
            raise ConnectionLostError(self.alias, msg)
        return self.connection

    async def run(self, argv: list[str], timeout: float = 30.0) -> tuple[int, bytes, bytes]:
        return await asyncio.to_thread(self._live().exec, argv, timeout=timeout)

    async def prepare(self) -> str:
        if self.home and self.blob_dir:
            return self.workdir
        await asyncio.to_thread(self._prepare)
        return self.workdir

    def _prepare(self) -> None:
        sftp = self._live().sftp()
        self.home = sftp.normalize(".")
        if not self.workdir.startswith("/"):
            self.workdir = posixpath.join(self.home, self.workdir.removeprefix("~/"))
        cache = self.config.cache or "~/.cache/link-kernel/host-blobs"
        if not cache.startswith("/"):
            cache = posixpath.join(self.home, cache.removeprefix("~/"))
        self.blob_dir = cache
        for path, mode in ((self.workdir, 0o755), (self.path(".link"), 0o700), (self.blob_dir, 0o700)):
            _makedirs(sftp, path, mode)

    async def put(self, path: str, data: bytes, mode: int = 0o600) -> None:
        await asyncio.to_thread(self._live().put_file, path, data, mode)

    async def exists(self, path: str) -> bool:
        def stat() -> bool:
            try:
                self._live().sftp().stat(path)
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(stat)

    async def remove(self, path: str) -> None:
        def remove() -> None:
            try:
                self._live().sftp().remove(path)
            except FileNotFoundError:
                pass

        await asyncio.to_thread(remove)

    async def spawn(self, spec: LaunchSpec, source: str) -> Supervisor:
        supervisor = SSHSupervisor(self.alias, asyncio.get_running_loop())
        argv = ["exec", *spec.argv(source)]
        supervisor.command = await asyncio.to_thread(
            self._live().spawn, argv, pty=True, on_output=supervisor.on_output
        )
        return supervisor

    async def reach(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        forward = await asyncio.to_thread(self._live().forward, port, host)
        self._forwards[(host, port)] = forward
        return "127.0.0.1", forward.local_port

    async def unreach(self, port: int, host: str = "127.0.0.1") -> None:
        forward = self._forwards.pop((host, port), None)
        if forward is not None:
            await asyncio.to_thread(forward.close)

    async def filesystem(self):
        """fsspec's SFTP filesystem on a second SFTP channel of this connection.

        A channel of its own, so the file sync never shares a paramiko SFTP
        client (not thread-safe) with kernel starts. No second login.
        """
        if self._fs is None or self._fs.ftp.sock.closed:
            self._fs = await asyncio.to_thread(_LinkSFTPFileSystem.over, self._live(), self.alias)
        return self._fs

    async def missing_blobs(self, ids: list[str]) -> list[str]:
        present = set(await asyncio.to_thread(self._live().sftp().listdir, self.blob_dir))
        return [i for i in ids if i not in present and i + UNCHECKED not in present]

    async def push_blobs(self, local_store: str, ids: list[str]) -> None:
        await asyncio.to_thread(self._push_blobs, local_store, ids)

    def _push_blobs(self, local_store: str, ids: list[str]) -> None:
        connection = self._live()
        sftp = connection.sftp()
        for blob_id in ids:
            source = os.path.join(local_store, blob_id)
            if not os.path.exists(source):
                source += UNCHECKED
            target = posixpath.join(self.blob_dir, blob_id + UNCHECKED)
            size = os.path.getsize(source)
            if size >= BULK_MIN and self._bulk(source, target, upload=True):
                continue
            temp = f"{target}.{secrets.token_hex(4)}.part"
            try:
                sftp.put(source, temp, confirm=True)
                sftp.posix_rename(temp, target)
            except (OSError, paramiko.SSHException, EOFError) as exc:
                _quietly(sftp.remove, temp)
                if not connection.alive:
                    raise ConnectionLostError(self.alias, f"{self.alias} went away while "
                                              f"receiving {blob_id}") from exc
                raise TransferError(self._why_not(f"sending {blob_id} to {self.alias} failed",
                                                  exc, self.blob_dir, size)) from exc

    def _bulk(self, local: str, remote: str, *, upload: bool) -> bool:
        """Copy one big file with the OpenSSH client; False if it cannot be used.

        paramiko moves about 150 MiB/s here, OpenSSH (a C cipher loop, no
        GIL) three times that, so files from BULK_MIN up take a second,
        short-lived OpenSSH connection, with the same host, user, keys,
        known_hosts and jump hosts as this one, BatchMode (never a prompt) and
        strict host key checking. If OpenSSH is missing or cannot log in
        (exit status 255), the caller uses SFTP; any other failure is raised.
        """
        argv = self._openssh_argv()
        if argv is None or self._bulk_failed:
            return False
        temp = f"{remote}.{secrets.token_hex(4)}.part" if upload else f"{local}.{os.getpid()}.part"
        if upload:
            command = f"cat > {shlex.quote(temp)} && mv -f {shlex.quote(temp)} {shlex.quote(remote)}"
            with open(local, "rb") as src:
                proc = subprocess.run([*argv, command], stdin=src, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, check=False)
        else:
            with open(temp, "wb") as dst:
                proc = subprocess.run([*argv, f"cat {shlex.quote(remote)}"], stdin=subprocess.DEVNULL,
                                      stdout=dst, stderr=subprocess.PIPE, check=False)
        if proc.returncode == 0:
            if not upload:
                os.replace(temp, local)
            return True
        if not upload:
            _quietly(os.unlink, temp)
        else:
            _quietly(self._live().sftp().remove, temp)
        error = proc.stderr.decode(errors="replace").strip()
        doing = f"{'sending' if upload else 'fetching'} {posixpath.basename(remote)}"
        if proc.returncode == 255 and _CANNOT_LOG_IN.search(error):
            # OpenSSH cannot log in where paramiko can (an agent it cannot see, an
            # option it rejects): fall back to SFTP, from now on
            log.warning("OpenSSH cannot log in to %s (%s); using SFTP for big files",
                        self.alias, error)
            self._bulk_failed = True
            return False
        if proc.returncode == 255:
            raise ConnectionLostError(self.alias, f"{doing}: the connection broke ({error})")
        if "No space left" in error:
            raise TransferError(f"{doing}: no space left on {self.alias}: {error}")
        raise TransferError(f"{doing} with OpenSSH failed: {error or proc.returncode}")

    def _openssh_argv(self) -> list[str] | None:
        ssh = shutil.which("ssh")
        connection = self.connection
        if ssh is None or connection is None:
            return None
        host = connection.host
        known = " ".join(shlex.quote(f) for f in host.known_hosts_files)
        argv = [
            ssh, "-F", host.ssh_config or os.devnull, "-T", "-x", "-e", "none",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-o", "Compression=no", "-o", f"ConnectTimeout={max(1, int(host.connect_timeout))}",
            "-o", "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr",
            "-p", str(host.port), "-l", host.user,
        ]
        if host.identities_only:
            argv += ["-o", "IdentitiesOnly=yes"]
        for identity in host.identity_files:
            argv += ["-i", identity]
        if host.proxy_jump:
            argv += ["-J", host.proxy_jump]
        return [*argv, host.hostname]

    def _why_not(self, doing: str, exc: BaseException, directory: str, size: int) -> str:
        """The reason a write on the host failed, in words (SFTP says only 'Failure')."""
        try:
            status, out, _ = self._live().exec(["df", "-Pk", directory], timeout=10)
            free = int(out.decode().splitlines()[-1].split()[3]) * 1024 if status == 0 else -1
        except (LinkError, OSError, ValueError, IndexError, TimeoutError):
            free = -1
        if 0 <= free < size:
            return (f"{doing}: no space left on {self.alias} in {directory} "
                    f"({free // 2**20} MiB free, {max(1, size // 2**20)} MiB needed)")
        return f"{doing}: {exc}"

    async def pull_blobs(self, ids: list[str], local_store: str) -> None:
        await asyncio.to_thread(self._pull_blobs, ids, local_store)

    def _pull_blobs(self, ids: list[str], local_store: str) -> None:
        connection = self._live()
        sftp = connection.sftp()
        os.makedirs(local_store, mode=0o700, exist_ok=True)
        for blob_id in ids:
            target = os.path.join(local_store, blob_id + UNCHECKED)
            source = posixpath.join(self.blob_dir, blob_id)
            try:
                size = sftp.stat(source).st_size or 0
            except FileNotFoundError:  # it came from here and no kernel loaded it
                source += UNCHECKED
                size = 0
            except (OSError, paramiko.SSHException, EOFError):
                size = 0
            if size >= BULK_MIN and self._bulk(target, source, upload=False):
                continue
            temp = f"{target}.{os.getpid()}.part"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                sftp.read_into(source, fd)
                os.close(fd)
                fd = -1
                os.replace(temp, target)
            except (OSError, paramiko.SSHException, EOFError) as exc:
                if fd >= 0:
                    os.close(fd)
                _quietly(os.unlink, temp)
                if not connection.alive:
                    raise ConnectionLostError(self.alias, f"{self.alias} went away while "
                                              f"sending {blob_id}") from exc
                raise TransferError(f"fetching {blob_id} from {self.alias} failed: {exc}") from exc

    async def close(self) -> None:
        forwards, self._forwards = list(self._forwards.values()), {}
        connection, self.connection = self.connection, None
        fs, self._fs = self._fs, None
        if fs is not None:
            await asyncio.to_thread(fs.ftp.close)
        for forward in forwards:
            await asyncio.to_thread(forward.close)
        if connection is not None:
            await asyncio.to_thread(connection.close)


def _sftp_filesystem_class():
    from fsspec.implementations.sftp import SFTPFileSystem

    class LinkSFTPFileSystem(SFTPFileSystem):
        """fsspec's SFTP filesystem over a Link connection (no login of its own)."""

        cachable = False

        def __init__(self, sftp: paramiko.SFTPClient, alias: str) -> None:
            self._link_sftp = sftp
            super().__init__(alias)

        def _connect(self) -> None:
            self.client = None
            self.ftp = self._link_sftp

    return LinkSFTPFileSystem


class _LinkSFTPFileSystem:
    @staticmethod
    def over(connection: SSHConnection, alias: str):
        transport = connection.transport
        if transport is None:
            raise ConnectionLostError(alias, f"not connected to {alias}")
        sftp = _SFTPClient.from_transport(transport)
        return _sftp_filesystem_class()(sftp, alias)


def _makedirs(sftp: paramiko.SFTPClient, path: str, mode: int) -> None:
    parts = path.strip("/").split("/")
    current = ""
    for part in parts:
        current = f"{current}/{part}"
        try:
            sftp.stat(current)
        except FileNotFoundError:
            try:
                sftp.mkdir(current, mode)
            except OSError:
                sftp.stat(current)  # made meanwhile; otherwise this raises


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
