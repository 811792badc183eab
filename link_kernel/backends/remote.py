"""Remote backends: a fresh kernel on a host for each cell.

One :class:`RemoteBackend` per host alias. For a cell it:

1. reaches the host (one connection per host, reused across cells);
2. starts a kernel through :class:`~link_kernel.provisioner.LinkProvisioner`
   (or takes the one a ``keep`` cell left running);
3. sends the frontend's execute_request, with its own header, so outputs are
   relayed to the frontend as they happen, re-signed with the router's key;
   the request's metadata tells the kernel's agent the cell's execution count;
4. releases the kernel, escalating shutdown request, SIGTERM, SIGKILL, and
   waits until the host reports the kernel's process group gone, before the
   router sends the execute_reply.

On a Slurm host the kernel is a Slurm job (:mod:`link_kernel.slurm`): the
cell's ``gpus= cpus= mem= time= partition=`` options, over the host's
defaults, say what it asks for; while it waits in the queue the cell shows why
(:attr:`RemoteBackend.say`); releasing the kernel ends the job. Slurm hosts
keep no warm standby, which would hold a GPU idle.

A kept kernel stays until ``%link release``, its idle timeout, or shutdown.
While any kernel of the host lives, the backend sends its supervisor a
keepalive every second; without them the host kills the kernel.

This module owns the cell: reaching the host, preparing and sending the
inputs, running the cell (and interrupting it), bringing outputs, files and
module state back. How kernels start, wait as a standby and end is
:mod:`link_kernel.backends.kernels` (:class:`KernelLifecycle`, a mixin).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ..connection import KernelConnection, Pending
from ..errors import (
    CellInterrupted,
    ConnectionLostError,
    HostUnreachableError,
    KernelDiedError,
    LinkError,
    TransferError,
    TransportError,
)
from ..hosts import HostConfig
from ..progress import NoProgress, ProgressLine
from ..relay import Relay
from ..slurm import SlurmCommands
from ..sync.files import FileSync, Journal, SyncReport
from ..sync.state import StateSync
from ..sync.variables import Inputs, Outputs, Plan, VariableSync, default_store, format_size
from ..transports import Transport
from ..transports.factory import make_transport
from . import Backend, ExecuteRequest, Reply
from .forkserver import ForkServer
from .kernels import KernelLifecycle, RemoteKernel, ShutdownStep, settled


class RemoteBackend(KernelLifecycle, Backend):
    """Runs cells in fresh kernels on one host."""

    def __init__(
        self,
        host: HostConfig,
        *,
        local_dir: str,
        context: zmq.Context,
        relay: Relay,
        sync: VariableSync,
        journal: Journal | None = None,
        start_timeout: float = 60.0,
        reach_timeout: float = 3.0,
        shutdown_wait: float = 2.0,
    ) -> None:
        self.host = host
        self.name = host.alias
        self.local_dir = local_dir
        self.context = context
        self.relay = relay
        self.sync = sync
        self.journal = journal
        self.files: FileSync | None = None
        self.start_timeout = start_timeout
        self.reach_timeout = reach_timeout
        self.shutdown_wait = shutdown_wait
        self.transport: Transport | None = None
        self.kept: RemoteKernel | None = None
        self.running: RemoteKernel | None = None
        self.last: dict[str, Any] = {}
        self._keepalive: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._connect_lock = asyncio.Lock()
        self._pythons: dict[str, str] = {}
        #: The host's fork servers, by python.
        self._forks: dict[str, ForkServer] = {}
        #: Every started kernel not yet gone: each gets keepalives.
        self._live: set[RemoteKernel] = set()
        self._preparing: asyncio.Future | None = None
        self._recording: asyncio.Future | None = None
        self._started_cell = False
        self._interrupt_pending = False
        self._standby_due = False
        self._releasing: set[asyncio.Future] = set()
        #: The host's last scan of the work directory, and its token (see agent.scan_report).
        self._scan: dict[str, list] | None = None
        self._scan_token = ""
        #: The token of the host scan the last clean pull reconciled.
        self._pulled_token = ""
        #: The blobs of the last cell's big inputs and outputs (a standby preloads them).
        self._last_blobs: list[str] = []
        #: The blobs the standby holds (or will): those of the cell before it booted.
        self._standby_blobs: list[str] = []
        self._scan_id = uuid.uuid4().hex
        #: The next cell's kernel, booting or ready (warm standby).
        self.standby: asyncio.Future | None = None
        #: The standbys after it: one boots while cells come back to back (see
        #: kernels.KernelLifecycle._start_spare), each moves up when a cell takes one.
        self._spares: list[asyncio.Future] = []
        #: A cell waited for its standby and the cells since came less than
        #: RUN_ALL_GAP apart: Run All, where a second standby pays for itself.
        self._pressed = False
        self._spares_timer: asyncio.TimerHandle | None = None
        self._closing = False
        #: The hash the host can compute fastest (from its first kernel's HELLO).
        self.algo: str | None = None
        #: Notes for the cell's output (what could not come back), taken by the router.
        self.notes: list[str] = []
        #: Shows a line in the running cell's output at once (set by the router).
        self.say: Callable[[str], None] = lambda text: None
        #: The running cell's live line: steps that last show there (set by the router).
        self.progress: ProgressLine = NoProgress()
        self._slurm: SlurmCommands | None = None
        #: Module state: the cell's, sent to the host; what the cell changed, to restore.
        self.state = StateSync(sync.local if sync is not None else None)  # None: no notebook (hosts check)
        self._state_out: dict[str, Any] | None = None
        self._state_back: dict[str, Any] | None = None

    # -- reaching the host ------------------------------------------------------------

    def _transport(self) -> Transport:
        if self.transport is None:
            self.transport = make_transport(self.host, self.local_dir)
        return self.transport

    async def reach(self, timeout: float | None = None) -> None:
        """Connect to the host; raise HostUnreachableError within ``timeout``."""
        transport = self._transport()
        if transport.connected:
            return
        timeout = self.reach_timeout if timeout is None else timeout
        async with self._connect_lock:
            try:
                await asyncio.wait_for(transport.connect(), timeout)
            except asyncio.TimeoutError:
                msg = f"{self.name} did not answer within {timeout:g} s"
                raise HostUnreachableError(self.name, msg) from None

    async def start(self) -> None:
        await self.reach()

    # -- cells ------------------------------------------------------------------------

    async def execute(self, request: ExecuteRequest) -> Reply:
        """Run one cell: inputs out, cell, outputs back, kernel released.

        An interrupt while the kernel runs the cell reaches the kernel; an
        interrupt before that (connecting, starting, sending inputs) cancels
        the cell, which then never runs.
        """
        self._started_cell = False
        try:
            if self._interrupt_pending:  # interrupted while the router chose this host
                raise CellInterrupted(f"interrupted before the cell ran on {self.name}")
            self._preparing = asyncio.ensure_future(self._prepare(request))
            try:
                kernel, plan, inputs, keep, timings = await self._preparing
            except asyncio.CancelledError:
                if self._preparing is not None and self._preparing.cancelled():
                    msg = f"interrupted before the cell ran on {self.name}"
                    raise CellInterrupted(msg) from None
                raise
            finally:
                self._preparing = None
            return await self._execute(request, kernel, plan, inputs, keep, timings)
        except (LinkError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # A library error from a broken link (EOFError, an SSH or socket error)
            # is the host going away, when it is gone; anything else is a bug.
            transport = self.transport
            if transport is not None and not transport.connected:
                msg = f"lost the connection to {self.name}: {exc!r}"
                raise ConnectionLostError(self.name, msg) from exc
            raise
        finally:
            self._interrupt_pending = False

    async def _prepare(self, request: ExecuteRequest):
        timings: dict[str, float] = {}
        self.last = {"sent": 0, "received": 0}
        kernel, self.kept = self.kept, None
        keep = request.route.keep or kernel is not None
        self._cancel_idle()
        wanted = request.route.kernel or self.host.kernel
        resources = request.route.resources
        if kernel is not None and (
            kernel.kernel_name != wanted
            or (resources and kernel.resources != resources)
            or not kernel.alive
        ):
            await self._release(kernel)
            kernel, keep = None, request.route.keep
        plan = Plan.of(request.code, request.route)
        if plan.history:
            self.notes.append(
                f"[link] {', '.join(plan.history)}: IPython's output history is the local kernel's; "
                f"a cell on {self.name} sees only its own kernel's there\n"
            )
        fresh = None
        if kernel is None:
            fresh = asyncio.ensure_future(self._fresh_kernel(wanted, timings, resources))
            waiting = self.progress.step(f"starting a kernel on {self.name}")
            fresh.add_done_callback(lambda _: waiting.end())
            if self.algo is None:  # the first kernel tells which hashes the host has
                kernel = await fresh
        capturing = asyncio.ensure_future(self.state.capture(self.algo or "sha256", plan.reads))
        try:
            t0 = time.perf_counter()
            record = request.content["code"] if request.record else None
            if plan.reads or plan.placeholders or plan.everything or record is None:
                inputs = await self.sync.export(plan, self.algo or "sha256", record)
                request.recorded = request.record
            else:  # nothing to export: record the cell while the cell runs
                inputs = Inputs()
                self._recording = asyncio.ensure_future(self.sync.local.record(record))
            await self._push(inputs)
            self._state_out, notes = await capturing
            self.notes += notes + [f"[link] {line}\n" for line in inputs.notes]
            timings["inputs"] = time.perf_counter() - t0
            if request.route.files and self.journal is not None:
                t1 = time.perf_counter()
                await self.push_files()
                timings["files out"] = time.perf_counter() - t1
            if fresh is not None:
                t2 = time.perf_counter()
                kernel = await self._checked(await fresh, timings, resources)
                timings["kernel wait"] = time.perf_counter() - t2  # after the inputs went
                self._next_standby_now(kernel)
        except BaseException:
            # not cancelled: a request to the local kernel cut off mid-way would leave
            # its reply for the next request to find; it takes milliseconds
            await asyncio.wait({capturing}, timeout=5)
            capturing.cancel()
            if fresh is None:
                self.kept = kernel  # a kept kernel stays kept
            else:
                fresh.cancel()
                unused = await settled(fresh)
                if unused is not None:  # it ran nothing: it can wait for the next cell
                    self._offer_standby(unused)
            raise
        return kernel, plan, inputs, keep, timings

    async def _execute(self, request, kernel, plan, inputs, keep, timings) -> Reply:
        self.running = kernel
        outputs = None
        try:
            reply, outputs = await self._run(kernel, request, plan, inputs, timings, not keep)
            if outputs is not None:  # what the next cell's standby preloads
                big = [*inputs.values.values(), *outputs.values.values()]
                self._last_blobs = list(dict.fromkeys(v["id"] for v in big if "inline" not in v))
        finally:
            self.running = None
            kernel.cells += 1
            releasing = None
            if keep and kernel.alive:
                self.kept = kernel
            else:
                releasing = asyncio.ensure_future(self._timed_release(kernel, timings))
                if self._forking(kernel):  # a fork is cheap: the next kernel boots now
                    self._start_standby()
            self._schedule_idle()
            try:
                if outputs is not None:
                    t1 = time.perf_counter()
                    await self._bring_back(outputs, request)
                    timings["outputs"] = time.perf_counter() - t1
            finally:
                if releasing is not None:
                    await releasing
                    self._standby_due = True  # booted once the reply is out: see after_reply
                if self._recording is not None:
                    recording, self._recording = self._recording, None
                    await recording
                    request.recorded = request.record
                self.last["timings"] = {k: round(v, 4) for k, v in timings.items()}
        return Reply(content=reply["content"], metadata=reply.get("metadata") or {})

    async def _run(
        self, kernel, request, plan, inputs, timings, release: bool
    ) -> tuple[dict, Outputs | None]:
        """Send the cell and wait until it is over.

        A kernel to be released is asked to end the moment its ``link_result``
        arrives (everything of the cell is here then); it has run its exit
        hooks already, and ends while the outputs are brought back.
        """
        conn = kernel.conn
        relay = self.relay.iopub_sink(conn)
        result: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

        def on_iopub(frames, i, msg_type, parent_id):
            if msg_type == "link_result":
                if parent_id == request.msg_id and not result.done():
                    content = self._unpack_result(conn, frames[i:], result)
                    if content is None:
                        return
                    if release and isinstance(content.get("reply"), dict):
                        self._ask_to_end(kernel)
                    result.set_result(content)
                return
            if msg_type == "execute_input" and parent_id == request.msg_id:
                self._started_cell = True  # the kernel is in the cell: SIGINT now lands
                if self._interrupt_pending:
                    self._interrupt_pending = False
                    kernel.supervisor.signal("INT")
            relay(frames, i, msg_type, parent_id)

        if self._interrupt_pending:  # interrupted between preparing and sending
            self._interrupt_pending = False
            raise CellInterrupted(f"interrupted before the cell ran on {self.name}")

        conn.on_iopub = on_iopub
        conn.on_stdin = self.relay.on_stdin_request
        link = {"count": request.execution_count, "release": release, "host": self.name}
        transport = self._transport()
        link.update(self.sync.instructions(inputs, plan, transport.blob_dir, self.algo))
        if self._state_out is not None:
            link["state"], self._state_back = self._state_out, None
        if request.route.files and self.journal is not None:
            link["scan"] = {
                "root": transport.workdir,
                "prune": self._filesync().ignore.prune_dirs(),
                "hash": self._filesync().racy_remote(),  # judged by content on the host
                "id": self._scan_id,
                "since": self._scan_token,  # the host sends only what changed since
            }
        metadata = {**request.msg.get("metadata", {}), "link": link}
        t0 = time.perf_counter()
        pending = conn.send(
            "execute_request",
            request.kernel_content,
            header=request.msg["header"],
            parent=request.msg.get("parent_header") or None,
            metadata=metadata,
            internal=False,
        )
        reply = await self._finished(conn, pending, result)
        timings["run"] = time.perf_counter() - t0
        outputs = Outputs.from_content(result.result()) if result.done() else None
        self._state_back = result.result().get("state") if result.done() else None
        if outputs is not None:
            timings.update({f"host {k}": v for k, v in outputs.timings.items()})
            if outputs.ready:
                self.last["ready"] = outputs.ready
        return reply, outputs

    def _unpack_result(self, conn: KernelConnection, frames, result: asyncio.Future) -> dict | None:
        """The content of a ``link_result``; None (and the cell fails) if it does not verify.

        The message carries the cell's results: one that arrives damaged must
        fail the cell, never leave it looking as if it had given nothing back.
        """
        try:
            return conn.unpack(frames)["content"]
        except ValueError as exc:
            msg = f"the results of the cell on {self.name} did not arrive whole: {exc}"
            result.set_exception(TransferError(msg))
            return None

    async def _finished(self, conn: KernelConnection, pending: Pending, result: asyncio.Future) -> dict:
        """The cell's reply, as soon as the cell is over.

        The wrapper's ``link_result`` comes after every output of the cell and
        carries a copy of the reply: the cell is over when it arrives. A kernel
        that sends none (no wrapper) is over at its own reply and idle.
        """
        own = asyncio.ensure_future(pending.done())
        try:
            await asyncio.wait({own, result}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            own.cancel()
            raise
        if result.done() and isinstance(result.result().get("reply"), dict):
            own.cancel()
            return result.result()["reply"]
        frames = await own
        try:
            return conn.unpack(frames)
        except ValueError as exc:
            msg = f"the kernel on {self.name} sent a reply that does not verify: {exc}"
            raise KernelDiedError(msg) from exc

    async def _push(self, inputs: Inputs) -> None:
        ids = list(dict.fromkeys(v["id"] for v in inputs.values.values() if "inline" not in v))
        self.last["sent"] = sum({v["id"]: v["size"] for v in inputs.values.values() if "inline" in v}.values())
        if not ids:
            return
        transport = self._transport()
        missing = await transport.missing_blobs(ids)
        sizes = {v["id"]: v["size"] for v in inputs.values.values()}
        size = sum(sizes[i] for i in missing)
        if missing:
            with self.progress.step(f"sending variables to {self.name}", size) as step:
                await transport.push_blobs(str(self.sync.store), missing, step.add)
        self.last["sent"] += size

    def _remote_scan(self, outputs: Outputs) -> dict[str, list] | None:
        """The host's scan after the cell: as sent, or the kept one with its changes."""
        now = outputs.files
        diff = outputs.files_diff
        if now is None and diff is not None:
            if diff.get("since") == self._scan_token and self._scan is not None:
                now = dict(self._scan)
                now.update(diff.get("changed", {}))
                for path in diff.get("removed", ()):
                    now.pop(path, None)
            else:  # never happens with one router per token; be safe anyway
                outputs.files_error = "the host reported changes to a scan this notebook lacks"
        if now is not None or outputs.files_error:
            self._scan, self._scan_token = now, outputs.files_token if now is not None else ""
        return now

    async def _bring_back(self, outputs: Outputs, request: ExecuteRequest) -> None:
        """Files and variables back, side by side (they use separate channels)."""
        tasks = [self._bring_back_variables(outputs)]
        remote_now = self._remote_scan(outputs)
        diff = outputs.files_diff or {}
        unchanged = (
            outputs.files is None
            and diff.get("since") == outputs.files_token == self._pulled_token != ""
            and not diff.get("changed")
            and not diff.get("removed")
        )
        if remote_now is not None and not unchanged:  # (unchanged: pulled already)
            tasks.append(self.pull_files(remote_now, outputs.files_token))
        elif outputs.files_error:
            self.notes.append(f"[link] files not synced from {self.name}: {outputs.files_error}\n")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.notes += await self.state.restore(self._state_back, self.name)  # after the results

    async def _bring_back_variables(self, outputs: Outputs) -> None:
        """Pull the outputs' blobs, then apply them locally all at once."""
        missing = self.sync.missing_locally(outputs)
        sizes = {v["id"]: v["size"] for v in outputs.values.values()}
        size = sum(sizes[i] for i in missing)
        if missing:
            with self.progress.step(f"fetching variables from {self.name}", size) as step:
                await self._transport().pull_blobs(missing, str(self.sync.store), step.add)
        self.last["received"] = size + sum(
            {v["id"]: v["size"] for v in outputs.values.values() if "inline" in v}.values()
        )
        failures = await self.sync.apply(outputs)
        self.sync.remember(self.name, outputs)
        notes = [
            f"{name} ({error['type']}): {error['reason']}" for name, error in outputs.errors.items()
        ]
        notes += [f"{f['name']}: {f['reason']}" for f in failures]
        if notes:
            self.notes.append(
                "[link] not brought back from " + self.name + ":\n  " + "\n  ".join(notes) + "\n"
            )

    # -- files --------------------------------------------------------------------

    def _filesync(self) -> FileSync:
        if self.files is None:
            state = files_state_path(self.name, self.local_dir, self.host.workdir)
            self.files = FileSync(self.local_dir, self.name, state, journal=self.journal)
        return self.files

    async def push_files(self) -> SyncReport:
        """Push local changes to the host's work directory."""
        transport = self._transport()
        await transport.prepare()
        fs = await transport.filesystem()
        files = self._filesync()
        files.progress = self._file_progress(f"sending files to {self.name}")
        files.opener = self._opener(transport)
        report = await files.push(fs, transport.workdir, None)
        self._file_notes(report)
        return report

    def _opener(self, transport: Transport) -> Callable[[str, list[str], int], Any]:
        """How the file sync runs a python on the host for a bundle (from its worker thread)."""
        loop = asyncio.get_running_loop()

        def opener(code: str, args: list[str], size: int) -> Any:
            python = asyncio.run_coroutine_threadsafe(self._python(""), loop).result()
            return transport.python_pipe(python, code, args, size)

        return opener

    async def pull_files(self, remote_now: dict[str, list], token: str = "") -> SyncReport:
        """Bring back what changed on the host, given the host's own scan (``token``)."""
        transport = self._transport()
        fs = await transport.filesystem()
        self._pulled_token = ""
        files = self._filesync()
        files.progress = self._file_progress(f"fetching files from {self.name}")
        report = await files.pull(fs, transport.workdir, remote_now)
        self._file_notes(report)
        self._pulled_token = "" if report.warnings() else token
        return report

    async def sync_files(self) -> SyncReport:
        """``%link sync``: scan the host, push, pull."""
        await self.reach()
        transport = self._transport()
        await transport.prepare()
        files = self._filesync()
        remote_now = await transport.scan(
            transport.workdir, files.ignore.prune_dirs(), self.host.python or None
        )
        files.opener = self._opener(transport)
        report = await files.sync(await transport.filesystem(), transport.workdir, remote_now)
        self._file_notes(report)
        return report

    def _file_progress(self, what: str) -> Callable[[int, int, str], None]:
        """A file sync's progress callback, as one step of the cell's live line."""
        step = None

        def progress(done: int, total: int, path: str) -> None:
            nonlocal step
            if not path:  # the sync is over
                if step is not None:
                    step.end()
                    step = None
                return
            if step is None:
                step = self.progress.step(what, total)
            step.total, step.done = total, done

        return progress

    def _file_notes(self, report: SyncReport) -> None:
        for line in report.warnings():
            self.notes.append(f"[link] {line}\n")

    async def interrupt(self) -> None:
        """Interrupt the cell: in the kernel if it runs it, else before it starts.

        ipykernel ignores SIGINT between requests, so an interrupt that comes
        after the request was sent but before the kernel began the cell waits
        for the kernel's execute_input and is delivered then.
        """
        kernel = self.running
        if kernel is not None and kernel.alive and self._started_cell:
            kernel.supervisor.signal("INT")
        elif self._preparing is not None:
            self._preparing.cancel()
            # and if a library swallows the cancel, the cell still does not run
            self._interrupt_pending = True
        else:  # sent, or about to be: deliver when the kernel begins the cell
            self._interrupt_pending = True

    async def shutdown(self, *, restart: bool = False) -> None:
        self._closing = True
        await self.release(standby=True)
        if self.running is not None:
            await self._release(self.running)
            self.running = None
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await self._close_fork_servers()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.transport is not None:
            await self.transport.close()
            self.transport = None

    def status(self) -> dict[str, Any]:
        states = []
        if self.kept is not None and self.kept.alive:
            states.append(f"kept kernel pid {self.kept.pid}")
        if self._standby_ready():
            spare = self.standby.result()
            holding = f", holding {format_size(spare.preloaded)} ready" if spare.preloaded else ""
            states.append(f"standby kernel pid {spare.pid}{holding}")
        elif self.standby is not None:
            states.append("standby kernel starting")
        for task in self._spares:  # cells came back to back: one more boots behind it
            ready = task.done() and not task.cancelled() and task.exception() is None
            states.append(f"spare standby kernel pid {task.result().pid}" if ready
                          else "spare standby kernel starting")
        for server in self._forks.values():
            if server.serving:
                imported = f" with {', '.join(server.imported)} imported" if server.imported else ""
                states.append(f"fork server pid {server.pid}{imported}")
        if not states:
            connected = self.transport is not None and self.transport.connected
            states.append("connected" if connected else "not connected")
        state = ", ".join(states)
        detail = self.host.summary()
        if self.last.get("timings"):
            parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.last["timings"].items())
            detail += f"; last cell: {parts}"
        return {"target": self.name, "state": state, "detail": detail}


def files_state_path(alias: str, local_dir: str, workdir: str) -> Path:
    """Where the file sync keeps what both sides had at the last sync."""
    key = hashlib.sha256(f"{Path(local_dir).resolve()}\0{alias}\0{workdir}".encode()).hexdigest()
    return default_store().parent / "files" / f"{alias}-{key[:16]}.json"


__all__ = ["RemoteBackend", "RemoteKernel", "ShutdownStep", "TransportError"]
