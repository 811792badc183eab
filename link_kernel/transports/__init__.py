"""Transports: how kernels on one host are started and reached.

A transport runs :mod:`link_kernel.bootstrap` on its host, which starts one
ipykernel and supervises it, and makes the kernel's ports reachable from the
router on 127.0.0.1. Two transports exist:

- :mod:`~link_kernel.transports.process`: the host is this machine; the
  supervisor is a child process in a work directory of its own;
- :mod:`~link_kernel.transports.ssh`: the host is reached over one paramiko
  connection; the supervisor runs in a pty session, ports are tunnelled.

Both speak to the supervisor the same way (:class:`Supervisor`): its stdout
carries ``LINK HELLO/READY/EXIT`` lines and its stdin carries keepalives and
signal commands, so the ``process`` transport behaves exactly like a host.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ..agent import UNCHECKED
from ..errors import KernelStartError, RemoteEnvironmentError
from ..slurm import QUEUED

log = logging.getLogger(__name__)

_LIST_SPECS = (
    "import json\n"
    "from jupyter_client.kernelspec import KernelSpecManager\n"
    "specs = KernelSpecManager().get_all_specs()\n"
    "print(json.dumps({name: s['spec'] for name, s in specs.items()}))"
)


@dataclass
class LaunchSpec:
    """What to start: the host's python, the files the supervisor needs, args."""

    python: str
    connection_file: str
    agent_file: str
    dead_after: float = 10.0
    kernel_args: list[str] = field(default_factory=list)
    cwd: str | None = None
    #: A launcher the supervisor runs under (``srun ...`` on a Slurm host).
    prefix: list[str] = field(default_factory=list)
    #: The host's fork server (its socket's name) to ask for the kernel; "" for none.
    fork_server: str = ""

    def argv(self, source: str) -> list[str]:
        return [
            *self.prefix,
            self.python,
            "-c",
            source,
            self.cwd or "",
            self.connection_file,
            self.agent_file,
            f"{self.dead_after:g}",
            self.fork_server or "-",
            *self.kernel_args,
        ]


class Supervisor(abc.ABC):
    """The running bootstrap supervisor of one kernel, as its transport sees it.

    Subclasses feed :meth:`feed` with the supervisor's stdout bytes (from any
    thread), call :meth:`feed_eof` once when it ends, and implement
    :meth:`write` (its stdin) and :meth:`close`.
    """

    def __init__(self, host: str, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.loop = loop
        self.hello: asyncio.Future[dict] = loop.create_future()
        self.ready: asyncio.Future[dict] = loop.create_future()
        self.exited: asyncio.Future[dict] = loop.create_future()
        #: The Slurm job id, once srun says the job waits in the queue.
        self.queued: asyncio.Future[str] = loop.create_future()
        self._buffer = b""
        self._tail: list[str] = []
        #: Called with (word, value) for each other LINK report (a fork server's).
        self.on_report: Any = None

    # -- supervisor output, parsed as it arrives -----------------------------------

    def feed(self, data: bytes) -> None:
        """Called with output bytes, from any thread."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._feed, data)

    def feed_eof(self, status: int | None) -> None:
        """Called once when the supervisor's output ends (its exit status if known)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._eof, status)

    def _feed(self, data: bytes) -> None:
        self._buffer += data.replace(b"\r", b"")
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line.startswith("LINK "):
                word, _, payload = line[5:].partition(" ")
                try:
                    value = json.loads(payload)
                except ValueError:
                    value = {}
                fut = {"HELLO": self.hello, "READY": self.ready, "EXIT": self.exited}.get(word)
                if fut is not None and not fut.done():
                    fut.set_result(value)
                elif fut is None and self.on_report is not None:
                    self.on_report(word, value)
            elif line.strip():
                queued = QUEUED.search(line)
                if queued is not None and not self.queued.done():
                    self.queued.set_result(queued.group(1))
                self._tail.append(line)
                del self._tail[:-200]

    def _eof(self, status: int | None) -> None:
        if self._buffer:
            self._feed(b"\n")
        err = self.failure(f"the kernel supervisor on {self.host} ended (status {status})")
        for fut in (self.hello, self.ready):
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        if not self.exited.done():
            self.exited.set_result({"status": status, "lost": True})

    def failure(self, message: str, hint: str | None = None) -> KernelStartError:
        tail = self.output_tail()
        return KernelStartError(f"{message}:\n{tail}" if tail else message, hint=hint)

    #: What to tell the user when the host's python never said HELLO: None
    #: for the generic hint; the SSH supervisor names the login shell.
    silent_start_hint: str | None = None

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(self._tail[-lines:])

    # -- commands -----------------------------------------------------------------

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Write to the supervisor's stdin; never raises on a dead supervisor."""

    def keepalive(self) -> None:
        self.write(b"\n")

    def signal(self, name: str) -> None:
        """Send INT, TERM or KILL to the kernel."""
        self.write(f"{name}\n".encode())

    @abc.abstractmethod
    async def close(self) -> None:
        """Drop the supervisor's stdin and channel (it kills the kernel) and wait for it."""

    @property
    def done(self) -> bool:
        return self.exited.done()

    async def started(
        self, timeout: float, local_python: tuple[int, int], *, queue: bool = False
    ) -> dict:
        """Wait for HELLO and READY; check the host's environment; return READY.

        With ``queue=True`` (a Slurm job) HELLO has no time limit: the job may
        wait in the queue for as long as the scheduler says; ``timeout`` counts
        from HELLO to READY.
        """
        try:
            hello = await asyncio.wait_for(asyncio.shield(self.hello), None if queue else timeout)
        except asyncio.TimeoutError:
            msg = f"the kernel on {self.host} did not start in {timeout:g} s: its python never reported"
            raise self.failure(msg, self.silent_start_hint) from None
        if hello.get("missing"):
            missing = ", ".join(hello["missing"])
            msg = f"the python on {self.host} ({hello.get('executable')}) lacks {missing}"
            raise RemoteEnvironmentError(
                msg,
                hint=f"Run '{hello.get('executable')} -m pip install "
                f"{' '.join(hello['missing'])}' on {self.host}, or give the host another "
                "python with 'link-kernel hosts add ... --python PATH'.",
            )
        remote = tuple(int(p) for p in str(hello.get("python", "0.0")).split(".")[:2])
        if remote != tuple(local_python):
            msg = (
                f"{self.host} runs Python {hello.get('python')} but this notebook runs "
                f"{local_python[0]}.{local_python[1]}: functions and classes cannot travel "
                "between them"
            )
            raise RemoteEnvironmentError(
                msg, hint="Give the host a python of the same minor version with --python."
            )
        try:
            return await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except asyncio.TimeoutError:
            raise self.failure(f"the kernel on {self.host} did not start in {timeout:g} s") from None


class Transport(abc.ABC):
    """One host: files in its work directory and kernel supervisors.

    Blocking work runs in threads; every coroutine here may be awaited on the
    router's loop. Raise :class:`~link_kernel.errors.TransportError`
    subclasses for reachability, authentication and host-key failures.
    """

    kind: str = ""

    def __init__(self, alias: str, workdir: str) -> None:
        self.alias = alias
        self.workdir = workdir
        #: The host's blob store (absolute), set by :meth:`prepare`.
        self.blob_dir = ""

    def path(self, *parts: str) -> str:
        return str(PurePosixPath(self.workdir, *parts))

    @abc.abstractmethod
    async def connect(self) -> None:
        """Make the host reachable (idempotent; quick when already connected)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @abc.abstractmethod
    async def run(self, argv: list[str], timeout: float = 30.0) -> tuple[int, bytes, bytes]:
        """Run a command on the host; return (status, stdout, stderr)."""

    async def default_python(self) -> str:
        """The absolute path of the host's python, when none is configured."""
        status, out, _ = await self.run(["sh", "-c", "command -v python3 || command -v python"])
        path = out.decode().strip().splitlines()[0] if out.strip() else ""
        if status != 0 or not path.startswith("/"):
            msg = f"no python found on {self.alias}'s PATH"
            raise RemoteEnvironmentError(
                msg, hint="Give the host's python with 'link-kernel hosts add ... --python PATH'."
            )
        return path

    async def kernelspecs(self, python: str | None = None) -> dict[str, dict]:
        """The host's kernelspecs, as ``{name: kernel.json}``."""
        python = python or await self.default_python()
        status, out, err = await self.run([python, "-c", _LIST_SPECS])
        if status != 0:
            msg = f"listing kernelspecs on {self.alias} failed: {err.decode(errors='replace')[-500:]}"
            raise RemoteEnvironmentError(msg)
        return json.loads(out)

    async def kernel_python(self, name: str, python: str | None = None) -> str:
        """The python a kernelspec of the host runs, for ``kernel=NAME``."""
        specs = await self.kernelspecs(python)
        if name not in specs:
            msg = f"no kernelspec {name!r} on {self.alias}; it has: {', '.join(sorted(specs)) or 'none'}"
            raise RemoteEnvironmentError(
                msg, hint=f"Run 'link-kernel hosts kernels {self.alias}' to list them."
            )
        argv = specs[name].get("argv") or []
        first = argv[0] if argv else ""
        if not first.startswith("/"):
            return python or await self.default_python()
        return first

    @abc.abstractmethod
    async def prepare(self) -> str:
        """Create the work directory; return its absolute path (also sets workdir)."""

    @abc.abstractmethod
    async def put(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write a file no one else can read at any moment."""

    @abc.abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def remove(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""

    @abc.abstractmethod
    async def filesystem(self) -> Any:
        """An fsspec filesystem of the host, for the file sync."""

    async def scan(self, root: str, prune: list[str], python: str | None = None) -> dict:
        """The host's scan of ``root`` (link_kernel.sync.files.scan_tree), run on the host."""
        from ..sync.files import SCAN_SOURCE

        code = SCAN_SOURCE + "\nimport json, sys\nprint(json.dumps(scan_tree(sys.argv[1], sys.argv[2:])))"
        python = python or await self.default_python()
        status, out, err = await self.run([python, "-c", code, root, *prune], timeout=120)
        if status != 0:
            msg = f"scanning {root} on {self.alias} failed: {err.decode(errors='replace')[-300:]}"
            raise RemoteEnvironmentError(msg)
        return json.loads(out)

    def python_pipe(self, python: str, code: str, args: list[str], size: int) -> Any:
        """``python -c code *args`` on the host as a two-way byte stream
        (:class:`~link_kernel.sync.files.bundle.Pipe`), ``size`` bytes to be sent into
        it; None where the host's files are as near as the local ones (no bundle pays)."""
        return None

    @abc.abstractmethod
    async def missing_blobs(self, ids: list[str]) -> list[str]:
        """The blobs of ``ids`` the host's store lacks (checked or not)."""

    @abc.abstractmethod
    async def push_blobs(self, local_store: str, ids: list[str], tick=None) -> None:
        """Copy blobs from the local store into the host's; whole or not at all.

        ``tick(n)``, if given, is called (from any thread) as bytes are done.

        Each lands as ``ID`` + :data:`UNCHECKED`: its first load checks it.
        """

    @abc.abstractmethod
    async def pull_blobs(self, ids: list[str], local_store: str, tick=None) -> None:
        """Copy blobs from the host's store into the local one; whole or not at all.

        ``tick(n)``, if given, is called (from any thread) as bytes are done.

        Each lands as ``ID`` + :data:`UNCHECKED`: its first load checks it.
        """

    @abc.abstractmethod
    async def spawn(self, spec: LaunchSpec, source: str) -> Supervisor:
        """Start the bootstrap supervisor."""

    @abc.abstractmethod
    async def reach(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """The address the router connects to for ``host:port`` as the host sees it.

        ``host`` is the host's 127.0.0.1, or a compute node's address that the
        host (a Slurm login node) reaches.
        """

    async def unreach(self, port: int, host: str = "127.0.0.1") -> None:
        """Close what :meth:`reach` opened for ``host:port``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection and everything on it."""

    def describe(self) -> dict[str, Any]:
        return {"transport": self.kind, "workdir": self.workdir}
