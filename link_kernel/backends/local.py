"""The local kernel: an ordinary ipykernel that holds the notebook's state.

It is started through jupyter_client with the router's own session key and on
the ``ipc`` transport in a private runtime directory, so its frames can be
relayed to the frontend unchanged and no TCP port is opened for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from ..connection import Frames, KernelConnection, Pending, _bytes
from ..errors import KernelDiedError, KernelStartError
from ..relay import Relay
from . import Backend, ExecuteRequest, Reply

log = logging.getLogger(__name__)

LOCAL_SPEC = "link-local"


class _OneSpec(KernelSpecManager):
    """A kernelspec manager that knows one spec, built in code."""

    def __init__(self, spec: KernelSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec

    def find_kernel_specs(self) -> dict[str, str]:
        return {LOCAL_SPEC: self._spec.resource_dir}


#: ipykernel sleeps 0.5 ms (on a 2-core VM often 1.5 ms) after each cell so
#: that a client reading the reply sees the cell's output first. The router
#: needs no such delay: it sends the reply only after the kernel's idle
#: status, which the kernel publishes after every output of the cell.
ROUTED_KERNEL_ARGS = ["--Kernel._execute_sleep=0"]
#: A per-cell kernel's history would be thrown away; the local kernel records it.
REMOTE_KERNEL_ARGS = [*ROUTED_KERNEL_ARGS, "--HistoryManager.enabled=False"]


def ipykernel_spec(
    python: str = sys.executable, extra: list[str] = ROUTED_KERNEL_ARGS
) -> KernelSpec:
    """The kernelspec of an ipykernel on ``python``, driven by the router."""
    argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", *extra]
    return KernelSpec(
        argv=argv,
        display_name="Link local kernel",
        language="python",
        interrupt_mode="signal",
        metadata={"debugger": False},
        resource_dir="",
    )


def exit_description(code: int | None) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"signal {-code}, {name}"
    return f"exit code {code}"


class LocalBackend(Backend):
    """The notebook's own kernel, owned by the router."""

    name = "local"

    def __init__(
        self,
        *,
        session: Session,
        context: zmq.Context,
        relay: Relay,
        runtime_dir: Path,
        cwd: str | None = None,
        start_timeout: float = 60.0,
        spec: KernelSpec | None = None,
        reaper=None,
    ) -> None:
        self.router_session = session
        self.context = context
        self.relay = relay
        self.runtime_dir = runtime_dir
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.spec = spec or ipykernel_spec()
        self.reaper = reaper
        self.km: AsyncKernelManager | None = None
        self.conn: KernelConnection | None = None
        self.kernel_info: dict[str, Any] = {}
        self.session_number: int | None = None
        self._watch: asyncio.Task | None = None
        self._warming: asyncio.Future | None = None
        self.pid: int | None = None
        self._running: Pending | None = None
        self.died: KernelDiedError | None = None
        self.death_reported = False
        self.generation = 0
        #: The agent is in: the kernel serves link_record_request (before, it drops it).
        self.agent_ready = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.generation += 1
        base = self.runtime_dir / f"local-{self.generation}"
        # The kernel's messages reach the frontend as they are, so they must carry the
        # router's session id: JupyterLab drops a comm_open, comm_msg or display update
        # whose header.session differs from that of the message that arrived after it.
        spec = KernelSpec(**self.spec.to_dict(), resource_dir=self.spec.resource_dir)
        spec.argv = [*spec.argv, f"--Session.session={self.router_session.session}"]
        km = AsyncKernelManager(
            kernel_name=LOCAL_SPEC,
            kernel_spec_manager=_OneSpec(spec),
            session=Session(
                key=self.router_session.key,
                signature_scheme=self.router_session.signature_scheme,
            ),
            transport="ipc",
            ip=str(base),
            connection_file=str(base) + ".json",
            cache_ports=False,
        )
        km.shutdown_wait_time = 3.0
        self.km = km
        try:
            await km.start_kernel(cwd=self.cwd, env=dict(os.environ))
        except Exception as exc:
            msg = f"the local kernel did not start: {exc}"
            raise KernelStartError(msg) from exc
        self.pid = km.provisioner.pid
        if self.reaper is not None:
            self.reaper.watch(self.pid)  # its own session: pgid == pid
        conn = KernelConnection(
            km.get_connection_info(session=False),
            context=self.context,
            name="local",
            on_stdin=self.relay.on_stdin_request,
        )
        conn.on_iopub = self.relay.iopub_sink(conn)
        conn.open()
        self.conn = conn
        self.died = None
        self.death_reported = False
        self.agent_ready = False
        self._watch = asyncio.create_task(self._watch_process(km, conn))
        reply = await conn.wait_ready(self.start_timeout)
        self.kernel_info = reply["content"]
        await self._install_agent()

    async def _install_agent(self) -> None:
        result = await self.call(
            "__import__('link_kernel.agent', fromlist=['install']).install(get_ipython(), False)",
            {"session": "get_ipython().history_manager.session_number"},
        )
        self.session_number = int(result["session"])
        self.agent_ready = True
        self._warming = asyncio.ensure_future(self.call("__import__('__link_agent__').warm()"))

    async def shutdown(self, *, restart: bool = False) -> None:
        km, conn, watch = self.km, self.conn, self._watch
        self.km = self.conn = self._watch = None
        if watch is not None:
            watch.cancel()
        if conn is not None:
            conn.close()
        if km is not None:
            try:
                await km.shutdown_kernel(now=False, restart=False)
            except Exception:
                log.exception("shutting down the local kernel failed; killing it")
                await km.shutdown_kernel(now=True)
            if self.reaper is not None and self.pid is not None:
                self.reaper.forget(self.pid)

    async def restart(self) -> None:
        await self.shutdown(restart=True)
        await self.start()

    async def _watch_process(self, km: AsyncKernelManager, conn: KernelConnection) -> None:
        """Fail what is pending at once when the kernel process dies."""
        provisioner = km.provisioner
        while True:
            await asyncio.sleep(0.2)
            if provisioner is None:
                return
            code = await provisioner.poll()
            if code is not None:
                break
        self.died = KernelDiedError(
            f"the local kernel died ({exit_description(code)}); its variables are lost",
            hint="Link starts a new local kernel for the next cell; run the notebook's "
            "cells again to rebuild its state.",
        )
        log.error("%s", self.died)
        conn.close(self.died)

    @property
    def alive(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def ensure_alive(self) -> KernelDiedError | None:
        """Restart the kernel if it died.

        Returns the error that reports the death if no cell has reported it
        yet (the kernel died between cells), else None.
        """
        if self.alive:
            return None
        died = None if self.death_reported else self.died
        await self.shutdown(restart=True)
        await self.start()
        return died

    # -- running cells -----------------------------------------------------------

    async def execute(self, request: ExecuteRequest) -> Reply:
        conn = self._conn()
        if request.kernel_code is None:
            frames = self._without_stop_on_error(request)
            pending = conn.forward(frames, request.delim, request.msg_id)
        else:
            pending = conn.send(
                "execute_request",
                {**request.kernel_content, "stop_on_error": False},
                header=request.msg["header"],
                parent=request.msg.get("parent_header") or None,
                metadata=request.msg.get("metadata") or {},
                internal=False,
            )
        self._running = pending
        try:
            frames = await pending.done()
        except KernelDiedError:
            self.death_reported = True
            raise
        finally:
            self._running = None
        return Reply(content=json.loads(_content(frames)), frames=frames)

    def _without_stop_on_error(self, request: ExecuteRequest) -> Frames:
        """The request's frames with ``stop_on_error`` off, signed again.

        The router aborts the cells queued behind a failed one itself; the
        local kernel never has a queue (the router sends it one cell at a
        time), so its own abort could only ever hit the next cell, sent after
        the error reply, and turn it into an "aborted" reply.
        """
        if request.content.get("stop_on_error", True) is False:
            return request.frames
        i = request.delim
        parts = [_bytes(f) for f in request.frames[i + 2 : i + 5]]
        parts.append(self.router_session.pack({**request.content, "stop_on_error": False}))
        signature = self.router_session.sign(parts)
        return [*request.frames[:i], request.frames[i], signature, *parts, *request.frames[i + 6 :]]

    async def forward(self, frames: Frames, delim: int, msg_id: str, channel: str) -> Frames:
        """Forward any other request unchanged and return the reply frames."""
        pending = self._conn().forward(frames, delim, msg_id, channel=channel)
        return await pending.done()

    def forward_nowait(self, frames: Frames, delim: int) -> None:
        """Forward a message that gets no reply (comm messages)."""
        self._conn().send_raw(frames[delim:])

    async def interrupt(self) -> None:
        if self.km is not None and self.alive:
            await self.km.interrupt_kernel()

    async def call(self, code: str, expressions: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``code`` silently in the local kernel; return evaluated expressions.

        Raises KernelDiedError if the kernel dies, and RuntimeError carrying
        the kernel's error if the code raises.
        """
        conn = self._conn()
        reply = await conn.request(
            "execute_request",
            {
                "code": code,
                "silent": True,
                "store_history": False,
                "user_expressions": expressions or {},
                "allow_stdin": False,
                "stop_on_error": False,
            },
        )
        content = reply["content"]
        if content["status"] != "ok":
            msg = f"{content.get('ename')}: {content.get('evalue')}"
            raise RuntimeError(msg)
        out: dict[str, Any] = {}
        for key, value in content.get("user_expressions", {}).items():
            if value.get("status") != "ok":
                msg = f"{key}: {value.get('ename')}: {value.get('evalue')}"
                raise RuntimeError(msg)
            out[key] = value["data"]["text/plain"]
        return out

    async def record(self, code: str) -> None:
        """Put a cell the router handled into the local kernel's history (the agent's
        ``link_record_request``: no IPython cell machinery for it)."""
        if not self.agent_ready:  # a kernel without the agent would never answer
            raise KernelStartError("the local kernel is still starting: the cell is not in its history")
        reply = await self._conn().request("link_record_request", {"code": code})
        content = reply["content"]
        if content.get("status") != "ok":
            raise RuntimeError(f"{content.get('ename')}: {content.get('evalue')}")

    def _conn(self) -> KernelConnection:
        if self.conn is None or self.conn.closed:
            raise self.died or KernelDiedError("the local kernel is not running")
        return self.conn

    def status(self) -> dict[str, Any]:
        pid = None
        if self.km is not None and self.km.provisioner is not None:
            pid = getattr(self.km.provisioner, "pid", None)
        return {"target": "local", "pid": pid, "alive": self.alive}


def _content(frames: Frames) -> bytes:
    frame = frames[5]
    return frame if isinstance(frame, bytes) else frame.bytes
