"""A real OpenSSH server on 127.0.0.1 for tests, with throw-away keys.

``SSHServer`` starts ``/usr/sbin/sshd -D -e`` in a temporary directory with an
ed25519 host key and an authorized ed25519 client key made for this server
only, and writes the files a client needs to trust and reach it: a
``known_hosts`` that pins the host key for ``[127.0.0.1]:PORT`` and an
``ssh_config`` that defines a ``Host`` alias (``linktest`` by default)::

    with SSHServer() as server:
        subprocess.run(server.ssh_argv("true"), check=True)

Processes are owned: the sshd ``Popen`` is waited on, and ``stop()`` kills the
per-connection children leaves first so that their parents reap them (PID 1
of a container may not reap orphans). Nothing is ever killed by name.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from .processes import Service, end_process, free_port

SSHD = "/usr/sbin/sshd"
# sshd's per-connection monitor can exit without waiting for its unprivileged
# child (after a failed login), which then becomes an orphan. PID 1 of a
# container may not reap it, so sshd is made a child subreaper (the attribute
# survives execve) and, as its SIGCHLD handler waits for any child, reaps it.
_EXEC_AS_SUBREAPER = (
    "import ctypes, os, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0); "  # PR_SET_CHILD_SUBREAPER
    "os.execv(sys.argv[1], sys.argv[1:])"
)
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class SSHServerError(RuntimeError):
    """sshd did not start; the message carries its log."""


class SSHServer(Service):
    """An OpenSSH sshd on 127.0.0.1 that lives as long as the context.

    Attributes, valid once ``start()`` returned (``__enter__`` calls it):
    ``host``, ``port``, ``user``, ``client_key`` (private key path; ``.pub``
    beside it), ``known_hosts``, ``host_fingerprint`` ("SHA256:..."),
    ``ssh_config``, ``alias``, ``sshd_pid``, ``log`` (sshd's stderr lines,
    newest last, kept drained by a reader thread).

    ``password_only=True`` makes a server that refuses public keys and offers
    only password and keyboard-interactive logins (which no test can pass:
    there is no password to give). Both methods stay in the offered list, so
    a client sees exactly what a password-only host announces.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        alias: str = "linktest",
        password_only: bool = False,
        extra_config: str = "",
        session_env: dict[str, str] | None = None,
    ) -> None:
        self.alias = alias
        self.password_only = password_only
        #: Lines appended to sshd_config.
        self.extra_config = extra_config
        self.user = getpass.getuser()
        self.port: int = 0
        self.log: deque[str] = deque(maxlen=5000)
        self._dir = Path(tempfile.mkdtemp(prefix="link-sshd-"))
        #: The sessions' HOME: a directory of this server's own, so the login
        #: shell reads this server's startup files, not those of the machine's
        #: user. (A ``pyenv init`` in root's ~/.bashrc, killed mid-rehash by a
        #: test, leaves a lock that makes every later login wait 60 s.) SFTP
        #: still starts in the user's home from the password database.
        self.home = self._dir / "home"
        self.home.mkdir()
        #: Environment of every session (sshd's ``SetEnv``, which overrides
        #: sshd's defaults and takes only its first line: hence one line).
        self.session_env = {"HOME": str(self.home), **(session_env or {})}
        self.host_key = str(self._dir / "ssh_host_ed25519_key")
        self.client_key = str(self._dir / "id_ed25519")
        self.known_hosts = str(self._dir / "known_hosts")
        self.ssh_config = str(self._dir / "ssh_config")
        self.authorized_keys = str(self._dir / "authorized_keys")
        self._sshd_config = str(self._dir / "sshd_config")
        self._pid_file = str(self._dir / "sshd.pid")
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()
        self._keygen(self.host_key)
        self._keygen(self.client_key)
        shutil.copyfile(self.client_key + ".pub", self.authorized_keys)
        self.host_key_line = Path(self.host_key + ".pub").read_text().split()[:2]
        blob = base64.b64decode(self.host_key_line[1])
        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        self.host_fingerprint = f"SHA256:{digest}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start sshd and return once it listens.

        The first start picks a free port; if another process takes it before
        sshd binds, it retries with a new one. ``restart()`` keeps the port.
        """
        if self._proc is not None:
            raise SSHServerError("sshd is already running")
        keep_port = self.port != 0
        for _attempt in range(5):
            if not keep_port:
                self.port = free_port()
            self._write_configs()
            if self._spawn():
                return
            if keep_port or not self._bind_failed():
                break
        raise SSHServerError("sshd did not start:\n" + "\n".join(self.log))

    def stop(self) -> None:
        """Kill every per-connection sshd and its commands, then sshd itself.

        Session processes are killed leaves first (after SIGCONT, in case a
        test stopped them), each level waited for until its parent reaped it,
        so nothing is left for PID 1. Then the listener gets SIGTERM, and
        SIGKILL if it is still there after a few seconds.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            self._kill_sessions()
        finally:
            end_process(proc, STOP_TIMEOUT)
            if self._reader is not None:
                self._reader.join(STOP_TIMEOUT)
            if proc.stderr is not None:
                proc.stderr.close()
            self._proc = None
            self._reader = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same keys."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop sshd and delete the temporary directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- what tests use ----------------------------------------------------------

    @property
    def sshd_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def known_hosts_line(self, port: int | None = None) -> str:
        """This server's host key pinned for ``[127.0.0.1]:port`` (default: its own port).

        Give a proxy's port to trust the same key through a FaultProxy.
        """
        port = self.port if port is None else port
        name = self.host if port == 22 else f"[{self.host}]:{port}"
        return f"{name} {self.host_key_line[0]} {self.host_key_line[1]}\n"

    def ssh_argv(self, *cmd: str) -> list[str]:
        """argv for the system ssh client to run ``cmd`` on this server.

        ``cmd`` is an argv: it is quoted with shlex.join, so the remote shell
        runs exactly these words. Without ``cmd`` ssh opens a shell.
        """
        argv = ["ssh", "-F", self.ssh_config, self.alias]
        if cmd:
            argv.append(shlex.join(cmd))
        return argv

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes (not the listener, not commands).

        Each connection has a privileged monitor and an unprivileged child that
        talks to the network; both are listed. SIGSTOP all of them to freeze a
        connection, SIGKILL them to drop it.
        """
        if self._proc is None:
            return []
        return [
            pid
            for pid, _depth in _descendants(self._proc.pid)
            if _exe(pid) == SSHD or _comm(pid) == "sshd"
        ]

    # -- internals ---------------------------------------------------------------

    def _keygen(self, path: str) -> None:
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "link-test", "-f", path],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )

    def _write_configs(self) -> None:
        setenv = " ".join(f'"{k}={v}"' for k, v in self.session_env.items())
        auth = (
            "PubkeyAuthentication no\n"
            "PasswordAuthentication yes\n"
            "KbdInteractiveAuthentication yes\n"
            if self.password_only
            else "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
        )
        Path(self._sshd_config).write_text(
            f"ListenAddress {self.host}\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self._pid_file}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "StrictModes no\n"
            f"{auth}"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "AllowTcpForwarding yes\n"
            "PermitTTY yes\n"
            "X11Forwarding no\n"
            "MaxSessions 100\n"
            "MaxStartups 100\n"
            "LogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
            f"SetEnv {setenv}\n"
            f"{self.extra_config}"
        )
        Path(self.known_hosts).write_text(self.known_hosts_line())
        Path(self.ssh_config).write_text(
            f"Host {self.alias}\n"
            f"    HostName {self.host}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    UpdateHostKeys no\n"
            "    BatchMode yes\n"
            "    ControlMaster no\n"
            "    ControlPath none\n"
            "    ConnectTimeout 5\n"
        )

    def _spawn(self) -> bool:
        """Start sshd; True once it listens, False if it exited first."""
        os.makedirs("/run/sshd", exist_ok=True)
        self._listening.clear()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _EXEC_AS_SUBREAPER, SSHD, "-D", "-e", "-f", self._sshd_config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._proc = proc
        self._reader = threading.Thread(
            target=self._read_log, args=(proc,), name=f"sshd-log-{proc.pid}", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._listening.wait(0.05):
                return True
            if proc.poll() is not None:
                break
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._reader.join(STOP_TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()
        self._proc = None
        self._reader = None
        return False

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        for raw in proc.stderr or ():
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            if "Server listening" in line:
                self._listening.set()

    def _bind_failed(self) -> bool:
        return any("Address already in use" in line for line in self.log)

    def _kill_sessions(self) -> None:
        if self._proc is None:
            return
        tree = _descendants(self._proc.pid)
        if not tree:
            return
        for pid, _depth in tree:
            _signal(pid, signal.SIGCONT)
        for depth in sorted({d for _p, d in tree}, reverse=True):
            level = [pid for pid, d in tree if d == depth]
            for pid in level:
                _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and any(_exists(pid) for pid in level):
                time.sleep(0.01)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses; the fields after the last ')' are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, depth) of every descendant of ``root``; its children have depth 1."""
    children = _children_map()
    out: list[tuple[int, int]] = []
    stack = [(pid, 1) for pid in children.get(root, [])]
    while stack:
        pid, depth = stack.pop()
        out.append((pid, depth))
        stack.extend((child, depth + 1) for child in children.get(pid, []))
    return out


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
