"""Client sockets to one ipykernel, driven by the router's event loop.

A :class:`KernelConnection` owns the shell, iopub, stdin and control sockets
the router opens to one kernel (local or remote; a remote kernel's ports are
tunnelled to 127.0.0.1 first). It matches replies to requests and tells when a
request is finished: its reply arrived *and* the kernel's ``idle`` status for
it, which the kernel publishes after every output of that request, so once
both are in, every output has been relayed.

Frames stay frames: a reply or output is handed on as the list of zmq frames
it arrived in, so relaying it to the frontend costs no (de)serialization.
Status messages are consumed here and never relayed: only the router reports
its own status to the frontend. ``iopub_welcome`` is consumed too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import zmq
from jupyter_client.session import DELIM, Session

from .errors import KernelDiedError, KernelStartError

log = logging.getLogger(__name__)

Frames = list  # a list of zmq.Frame (or bytes) as received
#: Called with (frames, index of the DELIM frame, msg_type, parent msg_id).
IopubSink = Callable[[Frames, int, str, str], None]
#: Called with (frames, index of the DELIM frame) for an input_request.
StdinSink = Callable[["KernelConnection", Frames, int], None]


def delim_index(frames: Frames) -> int:
    """Index of the ``<IDS|MSG>`` frame; everything before it is routing."""
    for i, frame in enumerate(frames):
        if _bytes(frame) == DELIM:
            return i
    msg = "not a Jupyter message: no <IDS|MSG> delimiter"
    raise ValueError(msg)


def _bytes(frame: Any) -> bytes:
    return frame if isinstance(frame, bytes) else frame.bytes


def header_of(frames: Frames, i: int) -> dict:
    return json.loads(_bytes(frames[i + 2]))


def parent_of(frames: Frames, i: int) -> dict:
    return json.loads(_bytes(frames[i + 3]))


class SocketReader:
    """Calls ``callback(frames)`` for each message on a zmq socket, on the loop.

    Leaner than ZMQStream, which costs a loop iteration and several
    getsockopt calls per message: this drains every queued message at each
    wake-up. A zmq socket's FD is edge-triggered and a send on the socket can
    consume the edge of a message that arrived meanwhile, so whoever sends on
    a socket this reads calls :meth:`kick` afterwards.
    """

    def __init__(self, socket: zmq.Socket, callback: Callable[[Frames], None]) -> None:
        self.socket = socket
        self.callback = callback
        self.loop = asyncio.get_event_loop()
        self.fd = socket.FD
        self.loop.add_reader(self.fd, self.drain)
        self.loop.call_soon(self.drain)

    def drain(self) -> None:
        socket = self.socket
        while not socket.closed:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError:
                log.exception("receiving failed")
                return
            try:
                self.callback(frames)
            except Exception:
                log.exception("handling a message failed")

    def kick(self) -> None:
        if not self.socket.closed and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self.drain)

    def send(self, frames: Frames) -> None:
        self.socket.send_multipart(frames, copy=False)
        self.kick()

    def close(self) -> None:
        if not self.socket.closed:
            self.loop.remove_reader(self.fd)
            self.socket.close(linger=0)


class LoopStream:
    """A socket read by a :class:`SocketReader`, with the part of ZMQStream's
    interface that ipykernel's kernel base uses on its shell stream.

    Replies are sent at once instead of on the next loop iteration.
    """

    def __init__(self, socket: zmq.Socket) -> None:
        from tornado.ioloop import IOLoop

        self.socket = socket
        self.io_loop = IOLoop.current()
        self.reader: SocketReader | None = None
        self._tasks: set[asyncio.Future] = set()

    def on_recv(self, callback: Callable[[Frames], Any], copy: bool = False) -> None:
        def run(frames: Frames) -> None:
            result = callback(frames)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._done)

        self.reader = SocketReader(self.socket, run)

    def _done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a shell message failed", exc_info=task.exception())

    def send_multipart(self, msg: list, flags: int = 0, copy: bool = True, **kwargs: Any) -> None:
        self.socket.send_multipart(msg, flags, copy=copy)
        if self.reader is not None:
            self.reader.kick()

    def flush(self, flag: int = zmq.POLLIN | zmq.POLLOUT, limit: int | None = None) -> int:
        """Sends are never queued; with POLLIN, handle what has arrived now."""
        if flag & zmq.POLLIN and self.reader is not None:
            self.reader.drain()
        return 0

    def closed(self) -> bool:
        return self.socket.closed

    def close(self, linger: int | None = None) -> None:
        if self.reader is not None:
            self.reader.close()
        elif not self.socket.closed:
            self.socket.close(linger=linger)


class Pending:
    """One request in flight: its reply frames and the kernel's idle for it."""

    __slots__ = ("msg_id", "reply", "idle", "internal", "outputs")

    def __init__(self, msg_id: str, *, internal: bool) -> None:
        loop = asyncio.get_running_loop()
        self.msg_id = msg_id
        self.reply: asyncio.Future[Frames] = loop.create_future()
        self.idle: asyncio.Future[None] = loop.create_future()
        self.internal = internal
        self.outputs: list[tuple[str, Frames, int]] = []

    async def done(self) -> Frames:
        """Wait for the reply and the idle status; return the reply frames."""
        frames = await self.reply
        await self.idle
        return frames

    def fail(self, exc: BaseException) -> None:
        for fut in (self.reply, self.idle):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a waiter may never come


class KernelConnection:
    """Shell, iopub, stdin and control sockets to one kernel.

    Created and used on the router's event loop thread only, except
    :meth:`send_control_threadsafe`.

    ``on_iopub`` receives every iopub message that is not a status, not a
    welcome, and not the output of an internal request; ``on_stdin`` receives
    the kernel's input requests. Both may be swapped at any time.
    """

    def __init__(
        self,
        info: dict[str, Any],
        *,
        context: zmq.Context,
        name: str,
        on_iopub: IopubSink | None = None,
        on_stdin: StdinSink | None = None,
    ) -> None:
        self.name = name
        self.info = info
        self.session = Session(
            key=info["key"].encode() if isinstance(info["key"], str) else info["key"],
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
            username="link",
        )
        self.context = context
        self.on_iopub = on_iopub
        self.on_stdin = on_stdin
        self._pending: dict[str, Pending] = {}
        self._readers: dict[str, SocketReader] = {}
        self._subscribed: asyncio.Future[None] | None = None
        self.closed = False

    def _url(self, channel: str) -> str:
        transport = self.info.get("transport", "tcp")
        ip = self.info["ip"]
        port = self.info[f"{channel}_port"]
        if transport == "ipc":
            return f"ipc://{ip}-{port}"
        return f"tcp://{ip}:{port}"

    def open(self) -> None:
        """Create and connect the sockets; they start receiving at once."""
        self._subscribed = asyncio.get_running_loop().create_future()
        identity = self.session.bsession
        for channel, kind, callback in (
            ("shell", zmq.DEALER, self._on_reply),
            ("iopub", zmq.SUB, self._on_iopub),
            ("stdin", zmq.DEALER, self._on_stdin),
            ("control", zmq.DEALER, self._on_reply),
        ):
            sock = self.context.socket(kind)
            sock.linger = 0
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(self._url(channel))
            self._readers[channel] = SocketReader(sock, callback)

    def close(self, exc: BaseException | None = None) -> None:
        """Close every socket; requests still pending fail with ``exc``."""
        if self.closed:
            return
        self.closed = True
        failure = exc or KernelDiedError(f"the connection to kernel {self.name!r} was closed")
        for pending in list(self._pending.values()):
            pending.fail(failure)
        self._pending.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    # -- sending ---------------------------------------------------------------

    def send(
        self,
        msg_type: str,
        content: dict,
        *,
        channel: str = "shell",
        parent: dict | None = None,
        header: dict | None = None,
        metadata: dict | None = None,
        buffers: list | None = None,
        internal: bool = True,
    ) -> Pending:
        """Sign and send a request; return its :class:`Pending`."""
        msg = self.session.msg(msg_type, content, parent=parent, header=header, metadata=metadata)
        pending = self._track(msg["header"]["msg_id"], internal=internal)
        reader = self._reader(channel)
        self.session.send(reader.socket, msg, buffers=buffers)
        reader.kick()
        return pending

    def forward(self, frames: Frames, i: int, msg_id: str, *, channel: str = "shell") -> Pending:
        """Send an already signed request (frames from DELIM on) unchanged."""
        pending = self._track(msg_id, internal=False)
        self._reader(channel).send(frames[i:])
        return pending

    def send_raw(self, frames: Frames, channel: str = "shell") -> None:
        """Send signed frames (from DELIM on) without tracking a reply."""
        self._reader(channel).send(frames)

    def send_stdin(self, frames: Frames) -> None:
        """Send an input_reply (frames from DELIM on) to the kernel."""
        self._reader("stdin").send(frames)

    def _reader(self, channel: str) -> SocketReader:
        try:
            return self._readers[channel]
        except KeyError:
            raise KernelDiedError(f"the connection to kernel {self.name!r} is closed") from None

    def _track(self, msg_id: str, *, internal: bool) -> Pending:
        pending = Pending(msg_id, internal=internal)
        self._pending[msg_id] = pending
        pending.idle.add_done_callback(lambda _f, m=msg_id: self._settle(m))
        pending.reply.add_done_callback(lambda _f, m=msg_id: self._settle(m))
        return pending

    def _settle(self, msg_id: str) -> None:
        pending = self._pending.get(msg_id)
        if pending is not None and pending.reply.done() and pending.idle.done():
            del self._pending[msg_id]

    # -- receiving -------------------------------------------------------------

    def _on_reply(self, frames: Frames) -> None:
        try:
            i = delim_index(frames)
            msg_id = parent_of(frames, i).get("msg_id")
        except (ValueError, json.JSONDecodeError):
            log.warning("kernel %s sent a malformed reply", self.name)
            return
        pending = self._pending.get(msg_id)
        if pending is not None and not pending.reply.done():
            pending.reply.set_result(frames[i:])

    def _on_iopub(self, frames: Frames) -> None:
        try:
            i = delim_index(frames)
            msg_type = header_of(frames, i)["msg_type"]
            parent = parent_of(frames, i)
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("kernel %s sent a malformed iopub message", self.name)
            return
        if self._subscribed is not None and not self._subscribed.done():
            self._subscribed.set_result(None)
        parent_id = parent.get("msg_id", "")
        pending = self._pending.get(parent_id)
        if msg_type == "status":
            if pending is not None and not pending.idle.done():
                if json.loads(_bytes(frames[i + 5])).get("execution_state") == "idle":
                    pending.idle.set_result(None)
            return
        if msg_type == "iopub_welcome":
            return
        if pending is not None and pending.internal:
            pending.outputs.append((msg_type, frames, i))
            return
        if self.on_iopub is not None:
            self.on_iopub(frames, i, msg_type, parent_id)

    def _on_stdin(self, frames: Frames) -> None:
        try:
            i = delim_index(frames)
        except ValueError:
            return
        if self.on_stdin is not None:
            self.on_stdin(self, frames, i)

    # -- requests with a deserialized reply --------------------------------------

    def unpack(self, frames: Frames) -> dict:
        """Verify and deserialize frames (from DELIM on, or the frames after it)."""
        start = 1 if _bytes(frames[0]) == DELIM else 0
        return self.session.deserialize(frames[start:], content=True, copy=False)

    async def request(
        self, msg_type: str, content: dict, *, timeout: float | None = None, **kwargs: Any
    ) -> dict:
        """Send an internal request and return its deserialized reply."""
        pending = self.send(msg_type, content, **kwargs)
        frames = await asyncio.wait_for(pending.done(), timeout)
        return self.unpack(frames)

    async def wait_ready(self, timeout: float) -> dict:
        """Wait until the kernel answers kernel_info and iopub is subscribed.

        Returns the kernel_info reply. A SUB socket misses what is published
        before its subscription reaches the kernel, so this repeats
        kernel_info until an iopub message (a welcome or a status) arrives.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reply: dict | None = None
        assert self._subscribed is not None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                msg = f"kernel {self.name!r} did not answer within {timeout:.0f} s"
                raise KernelStartError(msg)
            pending = self.send("kernel_info_request", {})
            try:
                frames = await asyncio.wait_for(asyncio.shield(pending.reply), min(remaining, 1.0))
            except asyncio.TimeoutError:
                continue
            reply = self.unpack(frames)
            try:
                await asyncio.wait_for(asyncio.shield(self._subscribed), 0.2)
            except asyncio.TimeoutError:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(pending.idle), 0.5)
            except asyncio.TimeoutError:
                pass
            return reply
