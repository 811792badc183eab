"""The Link transport over one SSHConnection: work directory, files, blobs, kernels, ports.

Owns ``SSHTransport`` (a :class:`~link_kernel.transports.Transport`): the work directory and blob
store on the host, blobs over SFTP or, from ``BULK_MIN`` up, a short-lived OpenSSH client with
the same host, keys and known_hosts, supervisors in pty sessions, forwards for the kernel's
ports, and the fsspec filesystem the file sync uses. It may not speak SSH itself: everything
goes through :class:`.connection.SSHConnection`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import paramiko

from ...agent import UNCHECKED
from ...errors import ConnectionLostError, LinkError, TransferError
from ...hosts import HostConfig
from ...sync.files.transfers import increments
from .. import LaunchSpec, Supervisor, Transport
from .config import SSHHost
from .connection import SSHConnection
from .pipes import ChannelPipe, OpenSSHPipe
from .sftp import _makedirs, _SFTPClient
from .supervisor import SSHSupervisor
from .tunnel import Forward

log = logging.getLogger(__name__)


#: Files from this size up move with the OpenSSH client when it is there.
BULK_MIN = 16 * 2**20

#: A stream from this size up goes through an OpenSSH client: its login (0.2 s
#: here) is repaid by its rate (three times paramiko's) from about 40 MiB.
PIPE_OPENSSH_MIN = 48 * 2**20

#: Called with the bytes of a blob transfer as they are done (from its thread).
Tick = Callable[[int], None]


def _no_tick(n: int) -> None:
    pass


def _run_counted(argv: list[str], stdin: Any, stdout: Any, counted: Any, tick: Tick,
                 every: float = 0.1) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a copy through a file (``counted``, its stdin or stdout),
    telling ``tick`` how far it got: the offset of the child's stdin in that file, or the
    size the file has grown to."""
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    reading = counted is stdin

    def position() -> int:
        if not reading:
            return os.fstat(counted.fileno()).st_size
        try:  # the child shares the open file: its offset is how far it read
            with open(f"/proc/{proc.pid}/fdinfo/0") as f:
                return int(f.readline().split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    done = 0
    try:
        while True:
            try:  # reads stderr meanwhile: a chatty child never blocks on a full pipe
                _, err = proc.communicate(timeout=every)
                break
            except subprocess.TimeoutExpired:
                pass
            now = position()
            if now > done:
                tick(now - done)
                done = now
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode == 0:
        end = os.fstat(counted.fileno()).st_size
        if end > done:
            tick(end - done)
    return subprocess.CompletedProcess(argv, proc.returncode, b"", err)
#: What OpenSSH says when it cannot log in at all (as opposed to a broken connection).
_CANNOT_LOG_IN = re.compile(
    r"Permission denied|Host key verification failed|no such identity|Bad configuration|"
    r"Could not resolve|command-line|Too many authentication failures|kex_exchange_identification"
)


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
        with self._live().locked_sftp() as sftp:
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
                with self._live().locked_sftp() as sftp:
                    sftp.stat(path)
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(stat)

    async def remove(self, path: str) -> None:
        def remove() -> None:
            try:
                with self._live().locked_sftp() as sftp:
                    sftp.remove(path)
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

    def python_pipe(self, python: str, code: str, args: list[str], size: int) -> ChannelPipe | OpenSSHPipe:
        """A channel of the connection, or from PIPE_OPENSSH_MIN bytes up an OpenSSH client.

        Called from a worker thread.
        """
        command = shlex.join([python, "-c", code, *args])
        argv = self._openssh_argv() if size >= PIPE_OPENSSH_MIN and not self._bulk_failed else None
        if argv is not None:
            return OpenSSHPipe([*argv, command], self._openssh_ended)
        return self._live().open_pipe(command)

    def _openssh_ended(self, status: int, error: str) -> None:
        # OpenSSH cannot log in where paramiko can (an agent it cannot see, an
        # option it rejects): use the connection instead, from now on
        if status == 255 and _CANNOT_LOG_IN.search(error):
            log.warning("OpenSSH cannot log in to %s (%s); using SFTP for big files", self.alias, error)
            self._bulk_failed = True

    async def missing_blobs(self, ids: list[str]) -> list[str]:
        def listdir() -> list[str]:
            with self._live().locked_sftp() as sftp:
                return sftp.listdir(self.blob_dir)

        present = set(await asyncio.to_thread(listdir))
        return [i for i in ids if i not in present and i + UNCHECKED not in present]

    async def push_blobs(self, local_store: str, ids: list[str], tick: Tick | None = None) -> None:
        await asyncio.to_thread(self._push_blobs, local_store, ids, tick or _no_tick)

    def _push_blobs(self, local_store: str, ids: list[str], tick: Tick) -> None:
        connection = self._live()
        for blob_id in ids:
            source = os.path.join(local_store, blob_id)
            if not os.path.exists(source):
                source += UNCHECKED
            target = posixpath.join(self.blob_dir, blob_id + UNCHECKED)
            size = os.path.getsize(source)
            if size >= BULK_MIN and self._bulk(source, target, upload=True, tick=tick):
                continue
            temp = f"{target}.{secrets.token_hex(4)}.part"
            try:
                with connection.locked_sftp() as sftp:
                    try:
                        sftp.put(source, temp, callback=increments(tick), confirm=True)
                        sftp.posix_rename(temp, target)
                    except (OSError, paramiko.SSHException, EOFError):
                        _quietly(sftp.remove, temp)
                        raise
            except (OSError, paramiko.SSHException, EOFError) as exc:
                if not connection.alive:
                    raise ConnectionLostError(self.alias, f"{self.alias} went away while "
                                              f"receiving {blob_id}") from exc
                raise TransferError(self._why_not(f"sending {blob_id} to {self.alias} failed",
                                                  exc, self.blob_dir, size)) from exc

    def _bulk(self, local: str, remote: str, *, upload: bool, tick: Tick = None) -> bool:
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
                proc = _run_counted([*argv, command], src, subprocess.DEVNULL, src, tick or _no_tick)
        else:
            with open(temp, "wb") as dst:
                proc = _run_counted([*argv, f"cat {shlex.quote(remote)}"], subprocess.DEVNULL, dst,
                                    dst, tick or _no_tick)
        if proc.returncode == 0:
            if not upload:
                os.replace(temp, local)
            return True
        if not upload:
            _quietly(os.unlink, temp)
        else:
            with self._live().locked_sftp() as sftp:
                _quietly(sftp.remove, temp)
        error = proc.stderr.decode(errors="replace").strip()
        doing = f"{'sending' if upload else 'fetching'} {posixpath.basename(remote)}"
        self._openssh_ended(proc.returncode, error)
        if self._bulk_failed:
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

    async def pull_blobs(self, ids: list[str], local_store: str, tick: Tick | None = None) -> None:
        await asyncio.to_thread(self._pull_blobs, ids, local_store, tick or _no_tick)

    def _pull_blobs(self, ids: list[str], local_store: str, tick: Tick) -> None:
        connection = self._live()
        os.makedirs(local_store, mode=0o700, exist_ok=True)
        for blob_id in ids:
            target = os.path.join(local_store, blob_id + UNCHECKED)
            source = posixpath.join(self.blob_dir, blob_id)
            try:
                with connection.locked_sftp() as sftp:
                    size = sftp.stat(source).st_size or 0
            except FileNotFoundError:  # it came from here and no kernel loaded it
                source += UNCHECKED
                size = 0
            except (OSError, paramiko.SSHException, EOFError):
                size = 0
            if size >= BULK_MIN and self._bulk(target, source, upload=False, tick=tick):
                continue
            temp = f"{target}.{os.getpid()}.part"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with connection.locked_sftp() as sftp:
                    sftp.read_into(source, fd, tick)
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


def _quietly(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
