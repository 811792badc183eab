"""LinkKernel: the frontend-facing router.

It speaks the Jupyter protocol to the frontend on ipykernel's kernel base and
runs nothing itself. Each request goes to a backend:

- execute_request: to the target the cell's first line names (see
  :mod:`link_kernel.routing`), or to the notebook's default target;
- complete, inspect, is_complete, history, comm_*: to the local kernel, which
  holds the notebook's namespace; a comm message to the kernel that opened the
  comm (a kept remote kernel's widget; see :meth:`Relay.on_frontend_comm`);
- kernel_info, connect, interrupt, shutdown: answered by the router;
- a cell's ``%link`` lines: the router's commands, in :mod:`link_kernel.commands`
  (a mixin of :class:`LinkKernel`).

Handlers are named after the message types they handle. Status is the
router's own: it publishes ``busy`` before and ``idle`` after every request
(ipykernel's dispatch does that) and drops its backends' status messages.
Every request gets a reply, whatever fails: Link's own failures are short
errors with a typed ``ename`` and a hint.
"""

from __future__ import annotations

import asyncio
import hmac
from html import escape as html_escape
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ipykernel._version import kernel_protocol_version as PROTOCOL_VERSION
from ipykernel.kernelbase import Kernel
from jupyter_client.session import DELIM
from traitlets import Any as AnyTrait
from traitlets import Bool, Float, Int, Unicode

from . import __version__, routing, warmup
from .backends import Backend, ExecuteRequest, Reply
from . import hosts as hosts_module
from .backends.local import LocalBackend
from .backends.remote import RemoteBackend
from .commands import RouterCommands
from .components import RouterPipeline
from .connection import _bytes, delim_index, header_of
from .errors import (
    ConflictMarkerError,
    ConnectionLostError,
    HostUnreachableError,
    LinkError,
    ResourceOptionError,
)
from .hosts import HostConfig
from .progress import NoProgress, ProgressLine
from .sync.files import Ignore, Journal, too_big
from .sync.variables import VariableSync, default_store, format_size
from .reaper import Reaper
from .relay import Relay

log = logging.getLogger(__name__)

LANGUAGE_INFO = {
    "name": "python",
    "version": sys.version.split()[0],
    "mimetype": "text/x-python",
    "codemirror_mode": {"name": "ipython", "version": sys.version_info[0]},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
    "file_extension": ".py",
}


def error_content(err: LinkError) -> dict[str, Any]:
    """The ename/evalue/traceback of a Link error, as the notebook shows it."""
    if isinstance(getattr(err, "content", None), dict):  # a parent component's own error
        return err.content
    ename = err.ename or type(err).__name__
    lines = [f"\x1b[0;31m{ename}\x1b[0m: {err.message}"]
    if err.hint:
        lines.append(f"\x1b[0;36mHint\x1b[0m: {err.hint}")
    return {"ename": ename, "evalue": err.message, "traceback": lines}


class LinkKernel(RouterPipeline, RouterCommands, Kernel):
    """The router kernel behind "Link (hybrid)"."""

    implementation = "link_kernel"
    implementation_version = __version__
    banner = f"Link (hybrid) {__version__}: cells run locally or on remote hosts"
    language_info = LANGUAGE_INFO
    help_links = [
        {"text": "Python Reference", "url": "https://docs.python.org/3/"},
        {"text": "IPython Reference", "url": "https://ipython.readthedocs.io/en/stable/"},
    ]

    msg_types = [
        *Kernel.msg_types,
        "comm_open",
        "comm_msg",
        "comm_close",
    ]

    #: The frontend's shell socket; a LoopStream (see app.py), not a ZMQStream.
    shell_stream = AnyTrait()

    default_target = Unicode(
        routing.LOCAL, help="Where cells without a routing comment run, e.g. 'gpu|local'."
    ).tag(config=True)
    local_start_timeout = Float(
        60.0, help="Seconds to wait for the local kernel to start."
    ).tag(config=True)
    remote_start_timeout = Float(
        60.0, help="Seconds to wait for a remote kernel to start."
    ).tag(config=True)
    reach_timeout = Float(
        3.0, help="Seconds to wait for a host to answer before it counts as unreachable."
    ).tag(config=True)
    max_output = Float(
        32 * 2**20,
        help="Bytes of stream output per cell sent to the frontend; the rest is saved to a file.",
    ).tag(config=True)
    sync_max_files = Int(
        100_000, help="A notebook folder with more files than this is not synced (see .linkignore)."
    ).tag(config=True)
    sync_max_bytes = Int(
        16 * 2**30, help="A notebook folder with more bytes than this is not synced."
    ).tag(config=True)
    cache_limit = Int(
        20 * 2**30, help="Bytes the pipeline cache may take on disk; least recently used entries go first."
    ).tag(config=True)
    show_target = Bool(
        True, help="Under each remote cell, one quiet line says where it ran and how long it took."
    ).tag(config=True)
    warm_ahead = Bool(
        True, help="At the start, each host the saved notebook routes to starts its fork server "
        "with the notebook's modules imported.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="link-"))
        self.reaper = Reaper(self.runtime_dir)
        self.default = routing.parse_targets(self.default_target)
        self.relay = Relay(self.session, self.iopub_socket, None)
        self.relay.output_budget = int(self.max_output)
        self.relay.spill_dir = default_store().parent / "outputs"
        self.local = LocalBackend(
            session=self.session,
            context=self.shell_stream.socket.context,
            relay=self.relay,
            runtime_dir=self.runtime_dir,
            start_timeout=self.local_start_timeout,
            reaper=self.reaper,
        )
        self.remotes: dict[str, RemoteBackend] = {}
        self._retired: set[asyncio.Future] = set()
        self._warming: set[asyncio.Future] = set()
        self.sync = VariableSync(self.local)
        self.journal: Journal | None = None
        self._unsynced = ""  # why the notebook folder is not synced, once said
        self._hosts: dict[str, HostConfig] = {}
        self._hosts_stamp: tuple = ()
        self._raw: dict[str, tuple[list, int]] = {}
        self._active: Backend | None = None
        self._echoed = ""
        self._recording: ExecuteRequest | None = None
        self._in_cell = False
        self._interrupt_waiting = False
        self._cell_started = time.perf_counter()
        self._started: asyncio.Task | None = None
        self._closing = False
        self.last_cell: dict[str, Any] = {}
        self._status_topic = self._topic("status")

    # -- startup and shutdown ------------------------------------------------------

    def start(self) -> None:
        super().start()
        self.io_loop.add_callback(self._start_backends)

    async def _start_backends(self) -> None:
        if self._started is None:  # a request that came first may have started it
            self._started = asyncio.ensure_future(self.local.start())
        await self._warm_hosts()  # while the local kernel starts
        try:
            await self._started
        except Exception:
            self.log.exception("the local kernel did not start")
        # The cell analysis imports IPython's transformers (~100 ms): not in a cell.
        await asyncio.to_thread(importlib.import_module, "IPython.core.inputtransformer2")

    async def _warm_hosts(self) -> None:
        """Each host the saved notebook routes to (or the default target) gets its fork
        server and a standby ready, with the notebook's modules (see warmup). Only the
        file the frontend names counts: VS Code names its file in the namespace once the
        kernel runs, too late for this."""
        if not self.warm_ahead or self._closing:
            return
        path = await self.notebook_path() if os.environ.get("JPY_SESSION_NAME") else None
        sources = await asyncio.to_thread(warmup.read, path) if path is not None else []
        try:
            known = self.known_targets()
        except LinkError:  # a malformed hosts file: the first cell says so
            return
        hosts = warmup.routed_hosts([*sources, f"# link: {'|'.join(self.default)}"], known)
        modules = warmup.imported_modules(sources, Path(os.getcwd()))
        for target in hosts:
            task = asyncio.ensure_future(self.backend(target).warm_ahead(modules))
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _ready(self) -> None:
        """Wait for the local kernel's first start; restart it if it died."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.local.start())
        try:
            await asyncio.shield(self._started)
        except LinkError:
            self._started = asyncio.ensure_future(self.local.start())
            await self._started

    async def _started_once(self) -> bool:
        """Wait for the local kernel's start under way (not a restart); True if it runs.

        A request to the local kernel before its start finished would reach a
        kernel without Link's agent, which drops what it cannot handle: no reply.
        """
        if self._started is None:
            self._started = asyncio.ensure_future(self.local.start())
        try:
            await asyncio.shield(self._started)
        except Exception:
            return False
        return self.local.alive

    def on_stdin_frames(self, frames: list) -> None:
        """The frontend's stdin socket: input replies go to the kernel that asked."""
        self.relay.on_frontend_stdin(frames)

    async def stop_backends(self, *, restart: bool = False) -> None:
        """End every kernel the router started. Runs on the main loop."""
        self._closing = True
        for task in list(self._warming):
            task.cancel()
        if self._retired or self._warming:
            await asyncio.gather(*self._retired, *self._warming, return_exceptions=True)
        backends = [*self.remotes.values(), self.local]
        results = await asyncio.gather(
            *(b.shutdown(restart=restart) for b in backends), return_exceptions=True
        )
        for backend, result in zip(backends, results):
            if isinstance(result, BaseException):
                self.log.error("shutting down %s failed: %r", backend.name, result)
        if self.journal is not None:
            self.journal.stop()
            self.journal = None
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        await asyncio.to_thread(self.reaper.close)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Called on the control thread: stop the backends on the main loop."""
        future = asyncio.run_coroutine_threadsafe(
            self.stop_backends(restart=restart), self.io_loop.asyncio_loop
        )
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), 30)
        except Exception:
            self.log.exception("stopping the backends failed")
        return {"status": "ok", "restart": restart}

    async def interrupt_request(self, stream, ident, parent) -> None:
        """Called on the control thread: interrupt the cell on its backend."""
        asyncio.run_coroutine_threadsafe(self.interrupt_active(), self.io_loop.asyncio_loop)
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def interrupt_active(self) -> None:
        backend = self._active
        if backend is None:
            # between cells, or a cell still choosing its target: the next
            # backend to run it gets the interrupt as soon as it starts
            self._interrupt_waiting = self._in_cell
            return
        try:
            await backend.interrupt()
        except Exception:
            self.log.exception("interrupting %s failed", backend.name)

    @property
    def kernel_info(self) -> dict[str, Any]:
        return {
            "protocol_version": PROTOCOL_VERSION,
            "implementation": self.implementation,
            "implementation_version": self.implementation_version,
            "language_info": self.language_info,
            "banner": self.banner,
            "help_links": self.help_links,
            "supported_features": [],
        }

    # -- dispatch -----------------------------------------------------------------

    async def dispatch_shell(self, msg, /, subshell_id=None, *, concurrent=False):
        """Keep the raw frames of each request, so it can be forwarded unchanged."""
        try:
            i = delim_index(msg)
            self._raw[header_of(msg, i)["msg_id"]] = (msg, i)
        except (ValueError, KeyError):
            pass
        await super().dispatch_shell(msg, subshell_id, concurrent=concurrent)

    async def shell_main(self, subshell_id, msg) -> None:
        """Serve execute requests without ipykernel's generic dispatch.

        The generic path deserializes the whole message, parses dates and
        flushes the router's stdio around every request; an execute request
        needs none of that, and it is the one request whose latency users
        feel. Everything else (and any request the fast path cannot read)
        takes the generic path.
        """
        request = self._read_execute(msg)
        if request is None:
            await super().shell_main(subshell_id, msg)
            return
        async with self._main_asyncio_lock:
            if self._aborting:
                await self.dispatch_shell(msg)
                return
            ident, i, parent = request
            self._raw[parent["header"]["msg_id"]] = (msg, i)
            header_raw = _bytes(msg[i + 2])
            self._publish_raw_status(b"busy", header_raw)
            try:
                await self.execute_request(self.shell_stream, ident, parent)
            except Exception:
                self.log.exception("execute_request failed")
            finally:
                self._publish_raw_status(b"idle", header_raw)

    def _read_execute(self, msg: list) -> tuple[list[bytes], int, dict] | None:
        """A signed execute_request's idents, DELIM index and message; else None."""
        try:
            i = delim_index(msg)
            parts = [_bytes(f) for f in msg[i + 2 : i + 6]]
            if len(parts) < 4 or b'"execute_request"' not in parts[0]:
                return None
            if self.session.auth is not None and not hmac.compare_digest(
                self.session.sign(parts), _bytes(msg[i + 1])
            ):
                return None
            header = json.loads(parts[0])
            if header.get("msg_type") != "execute_request" or header.get("subshell_id"):
                return None
            parent = {
                "header": header,
                "parent_header": json.loads(parts[1]),
                "metadata": json.loads(parts[2]),
                "content": json.loads(parts[3]),
                "msg_id": header["msg_id"],
                "msg_type": "execute_request",
                "buffers": [],
            }
        except (ValueError, KeyError, TypeError):
            return None
        return [_bytes(f) for f in msg[:i]], i, parent

    def _publish_raw_status(self, state: bytes, parent_header: bytes) -> None:
        """Publish a status whose parent header is the request's header frame."""
        session = self.session
        header = json.dumps(
            {
                "msg_id": session.msg_id,
                "msg_type": "status",
                "username": session.username,
                "session": session.session,
                "date": datetime.now(timezone.utc).isoformat(),
                "version": PROTOCOL_VERSION,
            }
        ).encode()
        parts = [header, parent_header, b"{}", b'{"execution_state": "' + state + b'"}']
        self.iopub_socket.send_multipart([self._status_topic, DELIM, session.sign(parts), *parts])

    def _take_raw(self, parent: dict) -> tuple[list, int]:
        return self._raw.pop(parent["header"]["msg_id"])

    async def relay_to_local(self, stream, ident, parent) -> None:
        """Forward a request to the local kernel and relay its reply."""
        frames, i = self._take_raw(parent)
        msg_type = parent["header"]["msg_type"]
        try:
            await self._ready()
            reply = await self.local.forward(frames, i, parent["header"]["msg_id"], "shell")
        except Exception as exc:
            err = exc
            if not isinstance(exc, LinkError):
                self.log.exception("%s failed inside the router", msg_type)
                err = LinkError(f"internal error in the Link router: {exc!r}")
            reply_type = msg_type.replace("_request", "_reply")
            content = {"status": "error", **error_content(err)}
            self.session.send(stream, reply_type, content, parent, ident=ident)
            return
        if msg_type == "history_request":
            reply = self._fix_history(parent["content"], reply)
        elif msg_type == "comm_info_request":
            reply = self.relay.add_comms(parent["content"], reply)
        stream.send_multipart([*ident, *reply], copy=False)

    complete_request = inspect_request = is_complete_request = relay_to_local
    comm_info_request = history_request = relay_to_local

    async def relay_comm(self, stream, ident, parent) -> None:
        """Comm messages have no reply; the kernel may handle them mid-cell."""
        frames, i = self._take_raw(parent)
        try:
            if self.relay.on_frontend_comm(frames, i, parent, self._topic("comm_close")):
                return
            await self._ready()
            self.local.forward_nowait(frames, i)
        except Exception as err:
            self.log.warning("comm message dropped: %r", err)

    comm_open = comm_msg = comm_close = relay_comm

    def _fix_history(self, request: dict, frames: list) -> list:
        """Give range results the session number the request asked for.

        IPython answers a range request on the current session with session
        0 in every entry; the protocol wants the session of each entry.
        """
        if request.get("hist_access_type") != "range" or self.local.session_number is None:
            return frames
        content = json.loads(_bytes(frames[5]))
        asked = int(request.get("session", 0))
        session = asked if asked > 0 else self.local.session_number + asked
        history = content.get("history", [])
        if not any(entry[0] == 0 for entry in history):
            return frames
        content["history"] = [[session if e[0] == 0 else e[0], *e[1:]] for e in history]
        parts = [_bytes(f) for f in frames[2:5]]
        parts.append(self.session.pack(content))
        return [frames[0], self.session.sign(parts), *parts, *frames[6:]]

    # -- execute -------------------------------------------------------------------

    async def execute_request(self, stream, ident, parent) -> None:
        frames, i = self._take_raw(parent)
        content = parent["content"]
        code = content.get("code", "")
        silent = bool(content.get("silent", False))
        store = bool(content.get("store_history", not silent))
        self.relay.shell_idents = ident
        self.relay.begin_cell(parent["header"]["msg_id"])
        self._in_cell, self._interrupt_waiting = True, False
        started = self._cell_started = time.perf_counter()
        try:
            marked = routing.conflict_line(code)
            if marked is not None:
                raise ConflictMarkerError(marked)
            reply = await self.execute_cell(parent, frames, i, ident, code, silent, store)
        except LinkError as err:
            reply = await self._failed(parent, code, err, silent, store)
        except Exception as exc:
            self.log.exception("execute_request failed inside the router")
            err = LinkError(f"internal error in the Link router: {exc!r}")
            reply = await self._failed(parent, code, err, silent, store)
        self._in_cell = self._interrupt_waiting = False
        if reply.status == "error" and (note := self.sync.name_error_note(reply.content)):
            self._note(parent, note)  # a name a host kept: say which and why
        cut, spill = self.relay.end_cell()
        if cut:
            self._note(
                parent,
                f"[link] output cut at {format_size(self.relay.output_budget)}: the cell printed "
                f"{format_size(cut)} more, saved to {spill} \n",
            )
        self.last_cell = {
            "target": reply.metadata.get("link", {}).get("target", "local"),
            "status": reply.status,
            "seconds": round(time.perf_counter() - started, 4),
        }
        if reply.status == "error" and content.get("stop_on_error", True) and not silent:
            self._abort_queued()
        if reply.frames is not None:
            stream.send_multipart([*ident, *reply.frames], copy=False)
        else:
            self.session.send(
                stream, "execute_reply", reply.content, parent, ident=ident, metadata=reply.metadata
            )
        for backend in self.remotes.values():
            backend.after_reply()

    def _abort_queued(self) -> None:
        """Abort the requests queued behind a failed cell, and none sent after its reply.

        ipykernel starts aborting after the error reply is sent and ends it with
        a marker that its shell-channel thread queues later still; a client that
        answers the error reply at once (nbclient, a test, a fast frontend) can
        get its next request in ahead of the marker and see it aborted. Here the
        marker is in the queue before the reply leaves, so only requests that
        were already waiting are aborted.
        """
        thread = self.shell_channel_thread
        if not thread:
            self._abort_queues()
            return
        self._aborting = True
        queued = threading.Event()

        def post_marker() -> None:
            try:
                self._post_dummy_stop_aborting_message(None)
            finally:
                queued.set()

        thread.io_loop.add_callback(post_marker)
        if not queued.wait(5.0):
            self.log.warning("the shell channel did not queue the end of the abort in 5 s")

    async def _execute(self, parent, frames, i, ident, code, silent, store) -> Reply:
        cell = routing.parse(code)
        wanted = cell.route.targets or self.default
        # the host registry is read afresh for each cell that names a host, not for local ones
        local_only = all(target == routing.LOCAL for target in wanted)
        targets = routing.resolve(wanted, [routing.LOCAL] if local_only else self.known_targets())
        await self._ready()
        died = await self.local.ensure_alive()
        if died is not None:
            raise died
        if not cell.commands and targets == (routing.LOCAL,) and cell.kernel_code is None:
            return await self._run_local(parent, frames, i, ident, cell)
        count = self.execution_count + (0 if silent else 1)
        if not silent:
            self._publish_execute_input(code, parent, count)
            self._echoed = parent["header"]["msg_id"]
        for command in cell.commands:
            await self.run_command(command, parent)
        request = ExecuteRequest(
            msg=parent,
            frames=frames,
            delim=i,
            idents=ident,
            route=cell.route,
            code=cell.code,
            execution_count=count,
            kernel_code=cell.kernel_code,
        )
        if not cell.has_code:
            if store and not silent:
                await self.local.record(code)
                self.execution_count = count
            return Reply(
                {"status": "ok", "execution_count": count, "user_expressions": {}},
                metadata={"link": {"target": "router"}},
            )
        backend = await self._choose(targets, parent)
        if cell.route.resources and not (
            isinstance(backend, RemoteBackend) and backend.host.slurm
        ):
            key, value = cell.route.resources[0]
            raise ResourceOptionError(backend.name, f"{key}={value}")
        if backend is self.local:
            self.relay.drop = frozenset({"execute_input"})
            try:
                return await self._run_local(parent, frames, i, ident, cell)
            finally:
                self.relay.drop = frozenset()
        return await self._run_remote(backend, request, silent, store)

    async def _choose(self, targets: tuple[str, ...], parent: dict) -> Backend:
        """The first target of the chain that is reachable; say so if not the first."""
        skipped: list[str] = []
        for position, target in enumerate(targets):
            backend = self.backend(target)
            last = position == len(targets) - 1
            if backend is not self.local:
                try:
                    await backend.reach()
                except (HostUnreachableError, ConnectionLostError) as err:
                    if last:
                        raise
                    skipped.append(f"{target}: {err.message}")
                    continue
            if skipped:
                self._note(parent, f"[link] ran on {target}: " + "; ".join(skipped) + "\n")
            return backend
        raise AssertionError("resolve() returns at least one target")

    async def _run_remote(self, backend: Backend, request: ExecuteRequest, silent: bool, store: bool):
        """Run a cell on a remote backend (which has the local kernel record it)."""
        request.record = store and not silent
        self._recording = request
        self._active = backend
        if self._interrupt_waiting:
            self._interrupt_waiting = False
            await backend.interrupt()
        self.relay.drop = frozenset({"execute_input"})
        backend.say = lambda text: self._note(request.msg, text)
        progress = ProgressLine(
            lambda msg_type, content: self.session.send(
                self.iopub_socket, msg_type, content, request.msg, ident=self._topic(msg_type)
            ),
            display_id=f"link-progress-{request.msg_id}",
        )
        backend.progress = progress
        try:
            reply = await backend.execute(request)
        finally:
            progress.stop()
            backend.progress = NoProgress()
            backend.say = lambda text: None
            self._active = None
            self.relay.drop = frozenset()
            if request.recorded:
                self.execution_count = request.execution_count
            for note in backend.notes:
                self._note(request.msg, note)
            backend.notes.clear()
            self._say_widgets_gone(request.msg, backend.name)
        reply.content["execution_count"] = request.execution_count
        link = {"target": backend.name, **backend.last, "seconds": self._cell_seconds()}
        reply.metadata = {**reply.metadata, "link": link}
        if self.show_target:
            self._target_note(request.msg, link, progress)
        else:
            progress.close()  # a line shown while the cell ran goes
        return reply

    def _target_note(self, parent: dict, link: dict, progress: ProgressLine | None = None) -> None:
        """One quiet line under a remote cell: where it ran, how long it took.

        It is an output, so the saved notebook keeps it: a reader sees later
        where each remote cell ran (the routing comment says where it was
        meant to run; a fallback or a default can differ). A progress line
        the cell showed becomes this line, in place.
        """
        seconds = link["seconds"]
        moved = link.get("sent", 0) + link.get("received", 0)
        text = f"ran on {link['target']} in {seconds:.2f} s"
        if moved:
            text += f", {format_size(moved)} moved"
        html = (
            '<div class="link-target" style="font-size:0.8em;opacity:0.6;'
            f'font-family:var(--jp-ui-font-family,sans-serif)">&#8674; {html_escape(text)}</div>'
        )
        content = {
            "data": {"text/plain": f"[link] {text}", "text/html": html},
            "metadata": {"link": {"target": link["target"], "seconds": round(seconds, 3)}},
            "transient": {},
        }
        if progress is not None and progress.close(content):
            return
        self.session.send(
            self.iopub_socket, "display_data", content, parent, ident=self._topic("display_data")
        )

    def _say_widgets_gone(self, parent: dict, host: str) -> None:
        """Once, under a cell whose kernel ended: its widgets are not connected now."""
        dead = self.relay.dead_inputs(parent["header"]["msg_id"])
        if dead:
            what = "widget is" if len(dead) == 1 else f"{len(dead)} widgets are"
            self._note(
                parent,
                f"[link] this cell's {what} no longer connected: {host}'s kernel was released "
                f"after the cell. Run it with '# link: {host} keep' to keep its widgets live.\n",
            )

    def _cell_seconds(self) -> float:
        """How long the user has waited for the cell being served: from the router
        taking its request up to now (its reply goes out next). The timings of a
        cell's steps do not add up to it: steps overlap, and work done before the
        request (a standby's boot) or after the reply is not the cell's."""
        return round(time.perf_counter() - self._cell_started, 3)

    def _note(self, parent: dict, text: str) -> None:
        self.session.send(
            self.iopub_socket,
            "stream",
            {"name": "stderr", "text": text},
            parent,
            ident=self._topic("stream"),
        )

    def backend(self, target: str) -> Backend:
        """The backend of a known target, created on first use."""
        if target == routing.LOCAL:
            return self.local
        host = self.hosts()[target]
        backend = self.remotes.get(target)
        if backend is not None and backend.host != host:
            # 'link-kernel hosts add' changed it: the old settings' kernels end
            self._retired.add(asyncio.ensure_future(backend.shutdown()))
            backend = None
        if backend is None:
            journal = self._journal()
            backend = RemoteBackend(
                host,
                local_dir=os.getcwd(),
                context=self.shell_stream.socket.context,
                relay=self.relay,
                sync=self.sync,
                journal=journal,
                start_timeout=self.remote_start_timeout,
                reach_timeout=self.reach_timeout,
            )
            if journal is None:
                backend.notes.append(self._unsynced)
            self.remotes[target] = backend
        return backend

    def _journal(self) -> Journal | None:
        """The change journal of the notebook folder, started on first use.

        None, with a note, when the folder is too big to sync file by file (a
        notebook opened in a home directory or /tmp): cells still run remotely,
        their files stay where they are.
        """
        if self.journal is None and not self._unsynced:
            root = os.getcwd()
            ignore = Ignore(root)
            why = too_big(root, ignore, self.sync_max_files, self.sync_max_bytes)
            if why:
                self._unsynced = (
                    f"[link] files are not synced: the notebook folder {root} is too big ({why}). "
                    "List what hosts do not need in .linkignore and restart the kernel, "
                    "or move the notebook to a project folder.\n"
                )
                return None
            self.journal = Journal(root, ignore)
            self.journal.start()
        return self.journal

    def hosts(self) -> dict[str, HostConfig]:
        """Known hosts, read again whenever their files change ('hosts add' needs no restart)."""
        stamp = hosts_module.stamp()
        if stamp != self._hosts_stamp:
            self._hosts, self._hosts_stamp = hosts_module.load(), stamp
        return self._hosts

    def known_targets(self) -> list[str]:
        return [routing.LOCAL, *sorted(self.hosts())]

    async def _run_local(self, parent, frames, i, ident, cell) -> Reply:
        request = ExecuteRequest(
            msg=parent,
            frames=frames,
            delim=i,
            idents=ident,
            route=cell.route,
            code=cell.code,
            execution_count=self.execution_count,
            kernel_code=cell.kernel_code,
        )
        self._active = self.local
        try:
            reply = await self.local.execute(request)
        finally:
            self._active = None
        count = reply.content.get("execution_count")
        if isinstance(count, int) and count > self.execution_count:
            self.execution_count = count
        reply.metadata = {"link": {"target": routing.LOCAL}}
        return reply

    async def _failed(self, parent, code: str, err: LinkError, silent: bool, store: bool) -> Reply:
        """Report a Link error as the cell's error: input echo, error, reply."""
        count = self.execution_count + (0 if silent else 1)
        if not silent and self._echoed != parent["header"]["msg_id"]:
            self._publish_execute_input(code, parent, count)
        body = error_content(err)
        self.session.send(self.iopub_socket, "error", body, parent, ident=self._topic("error"))
        recorded = self._recording is not None and self._recording.msg is parent and self._recording.recorded
        self._recording = None
        if recorded:
            self.execution_count = count
        elif store and not silent and await self._started_once():
            try:
                await self.local.record(code)
                self.execution_count = count
            except Exception:
                self.log.exception("recording the failed cell in the history failed")
        return Reply({"status": "error", "execution_count": count, **body})
