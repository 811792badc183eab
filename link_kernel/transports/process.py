"""The ``process`` transport: this machine, behaving exactly like a remote host.

Each kernel is a fresh child process started through the same bootstrap
supervisor a remote host runs, in the host's own work directory, with its own
session key. Nothing about it is shortcut: variables and files are synced
into that directory as they would be over SSH, so examples and tests of the
remote path need no SSH server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..agent import UNCHECKED, has_blob
from . import LaunchSpec, Supervisor, Transport

log = logging.getLogger(__name__)


class ProcessSupervisor(Supervisor):
    def __init__(self, host: str, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen) -> None:
        super().__init__(host, loop)
        self.proc = proc
        self.pid = proc.pid
        self._reader = threading.Thread(target=self._read, name=f"link-{host}-{proc.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.proc.stdout
        assert stream is not None
        while True:
            data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not data:
                break
            self.feed(data)
        self.feed_eof(self.proc.wait())

    def write(self, data: bytes) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        await asyncio.to_thread(self._wait)

    def _wait(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ProcessTransport(Transport):
    """Kernels as local child processes in the host's work directory."""

    kind = "process"

    def __init__(self, alias: str, workdir: str) -> None:
        super().__init__(alias, str(Path(workdir).expanduser()))

    async def connect(self) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    async def default_python(self) -> str:
        return sys.executable

    async def run(self, argv: list[str], timeout: float = 30.0) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir if os.path.isdir(self.workdir) else None,
            env=_kernel_env(),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode or 0, out, err

    async def prepare(self) -> str:
        path = Path(self.workdir)
        path.mkdir(parents=True, exist_ok=True)
        (path / ".link").mkdir(mode=0o700, exist_ok=True)
        self.workdir = str(path.resolve())
        if not self.blob_dir:
            self.blob_dir = str(path / ".link" / "blobs")
        Path(self.blob_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.workdir

    async def put(self, path: str, data: bytes, mode: int = 0o600) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    async def exists(self, path: str) -> bool:
        return os.path.exists(path)

    async def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    async def spawn(self, spec: LaunchSpec, source: str) -> Supervisor:
        proc = subprocess.Popen(
            spec.argv(source),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=spec.cwd or self.workdir,
            start_new_session=True,
            env=_kernel_env(),
        )
        return ProcessSupervisor(self.alias, asyncio.get_running_loop(), proc)

    async def filesystem(self):
        import fsspec

        return fsspec.filesystem("file")

    async def missing_blobs(self, ids: list[str]) -> list[str]:
        return [i for i in ids if not has_blob(self.blob_dir, i)]

    async def push_blobs(self, local_store: str, ids: list[str], tick=None) -> None:
        await asyncio.to_thread(_link_or_copy, local_store, self.blob_dir, ids, tick)

    async def pull_blobs(self, ids: list[str], local_store: str, tick=None) -> None:
        await asyncio.to_thread(_link_or_copy, self.blob_dir, local_store, ids, tick)

    async def reach(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        return host, port

    async def close(self) -> None:
        return None


def _kernel_env() -> dict[str, str]:
    """The router's environment, minus what only concerns the router's own parent."""
    env = dict(os.environ)
    env.pop("JPY_PARENT_PID", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _link_or_copy(src: str, dest: str, ids: list[str], tick=None) -> None:
    """Hard-link blobs between stores on one machine (copy across filesystems).

    Nothing crosses a wire: a checked blob stays checked, an unchecked one not.
    """
    import shutil

    os.makedirs(dest, mode=0o700, exist_ok=True)
    for blob_id in ids:
        if has_blob(dest, blob_id):
            continue
        suffix = "" if os.path.exists(os.path.join(src, blob_id)) else UNCHECKED
        source = os.path.join(src, blob_id + suffix)
        target = os.path.join(dest, blob_id + suffix)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        if tick is not None:
            tick(os.path.getsize(target))
