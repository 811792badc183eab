"""Host resolution: where an SSH host is and how to log in to it, as ``~/.ssh/config`` says.

Owns :class:`SSHHost` (plain data), reading an ssh config with ``paramiko.SSHConfig``, the
ProxyJump chain (``_jump_host``) and the name a host goes by in known_hosts. No I/O after
``SSHHost.resolve``; it opens no socket and reads no key. It may not import any other module
of this package.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import paramiko

from ...errors import HostConfigError


SSH_PORT = 22


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


def _known_hosts_name(hostname: str, port: int) -> str:
    return hostname if port == SSH_PORT else f"[{hostname}]:{port}"
