"""Authentication: offering keys to a server (identity files, ssh-agent, default keys).

Owns ``_Authenticator``: it never asks for a password; when the keys run out it raises
``PasswordRequiredError`` or ``AuthenticationError`` with the command that fixes it. It may not
open sockets or look at host keys (that is :mod:`.handshake` and :mod:`.hostkeys`).
"""

from __future__ import annotations

import base64
import logging
import os
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

import paramiko

from ...errors import AuthenticationError, PasswordRequiredError
from .config import SSH_PORT, SSHHost
from .hostkeys import fingerprint

log = logging.getLogger(__name__)


_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_PASSWORD_METHODS = ("password", "keyboard-interactive")


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
