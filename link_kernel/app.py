"""LinkKernelApp: ipykernel's kernel application, trimmed for a router.

A router runs no user code, so it needs neither ipykernel's output capture nor
its IOPub and shell-channel threads: every frame it relays would pay two
thread hops. Here the shell, iopub and stdin sockets all live on the main
event loop, where the relay runs; the control channel keeps its own thread so
interrupt and shutdown are served while a cell runs.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import types
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp
from traitlets import Type
from zmq.eventloop.zmqstream import ZMQStream

from .connection import LoopStream, SocketReader
from .kernel import LinkKernel


class LoopSocket:
    """A socket owned by the main loop that any thread may send on.

    Sends from the main thread go straight out; sends from other threads (the
    control thread's status messages) are handed to the main loop, since a zmq
    socket must only be used by one thread.
    """

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.thread = threading.get_ident()
        self.reader: SocketReader | None = None

    def send_multipart(self, parts: list, copy: bool = True, **kwargs: Any) -> None:
        reader = self.reader
        if reader is None:
            self.socket.send_multipart(parts, copy=copy, **kwargs)
        elif threading.get_ident() == self.thread:
            self._send(parts)
        else:
            reader.loop.call_soon_threadsafe(self._send, list(parts))

    def _send(self, parts: list) -> None:
        # A client that subscribed is sent this message as soon as zmq has seen its
        # subscription, which may be before the loop read it: welcome it first, so
        # that its first message is always its iopub_welcome.
        if self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.reader.drain()
        self.reader.send(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.socket, name)


class LinkKernelApp(IPKernelApp):
    """``python -m link_kernel -f CONNECTION_FILE``"""

    name = "link-kernel"
    kernel_class = Type(LinkKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)

    def init_control(self, context: zmq.Context) -> None:
        super().init_control(context)
        # No subshells: shell messages are handled on the main loop, in order.
        unused, self.shell_channel_thread = self.shell_channel_thread, None
        if unused is not None:
            unused.io_loop.close()

    def init_iopub(self, context: zmq.Context) -> None:
        sock = context.socket(zmq.XPUB)
        sock.linger = 1000
        self._apply_curve_server_options(sock)
        self.iopub_port = self._bind_socket(sock, self.iopub_port)
        self.iopub_thread = None
        self.iopub_socket = LoopSocket(sock)

    def init_io(self) -> None:
        """The router prints nothing to the frontend: leave sys.stdout alone."""
        self.displayhook = types.SimpleNamespace()

    def init_signal(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def init_kernel(self) -> None:
        """ipykernel's init_kernel, with the shell socket on the main loop."""
        control_stream = ZMQStream(self.control_socket, self.control_thread.io_loop)
        debugpy_stream = ZMQStream(self.debugpy_socket, self.control_thread.io_loop)
        self.control_thread.start()
        kernel = self.kernel_class.instance(
            parent=self,
            session=self.session,
            control_stream=control_stream,
            debugpy_stream=debugpy_stream,
            debug_shell_socket=self.debug_shell_socket,
            shell_stream=LoopStream(self.shell_socket),
            control_thread=self.control_thread,
            shell_channel_thread=None,
            iopub_thread=None,
            iopub_socket=self.iopub_socket,
            stdin_socket=self.stdin_socket,
            log=self.log,
            profile_dir=self.profile_dir,
            user_ns=self.user_ns,
        )
        kernel.record_ports({name + "_port": port for name, port in self._ports.items()})
        self.kernel = kernel

    def init_readers(self) -> None:
        """Read the iopub (subscriptions) and stdin sockets on the main loop."""
        kernel: LinkKernel = self.kernel
        self._readers = [
            SocketReader(self.iopub_socket.socket, self._on_subscription),
            SocketReader(self.stdin_socket, kernel.on_stdin_frames),
        ]
        self.iopub_socket.reader = self._readers[0]
        kernel.relay.stdin = self._readers[1]

    def _on_subscription(self, frames: list) -> None:
        """Send ``iopub_welcome`` to each new subscriber, as ipykernel 7 does."""
        for frame in frames:
            data = frame.bytes
            if data[:1] != b"\x01":
                continue
            try:
                topic = data[1:].decode()
            except UnicodeDecodeError:
                continue
            msg = self.session.msg("iopub_welcome", {"subscription": topic})
            msg["parent_header"] = {}
            parts = self.session.serialize(msg)
            self.iopub_socket.reader.send([topic.encode(), *parts] if topic else parts)

    def start(self) -> None:
        loop = asyncio.get_event_loop()
        self.init_readers()
        kernel: LinkKernel = self.kernel
        loop.add_signal_handler(
            signal.SIGINT, lambda: asyncio.ensure_future(kernel.interrupt_active())
        )
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self._terminate()))
        loop.add_signal_handler(signal.SIGUSR1, self._dump_state)
        try:
            super().start()
        finally:
            if not kernel._closing:
                loop.run_until_complete(kernel.stop_backends())

    def _dump_state(self) -> None:
        """SIGUSR1: write every thread's stack and every asyncio task's to stderr (the
        Jupyter server's log), so a cell that never ends shows where it waits."""
        import faulthandler
        import io

        err = sys.__stderr__
        if err is None:
            return
        err.write("[link] threads:\n")
        err.flush()
        faulthandler.dump_traceback(file=err, all_threads=True)
        out = io.StringIO()
        for task in asyncio.all_tasks(asyncio.get_event_loop()):
            out.write(f"{task!r}\n")
            # the whole chain of awaits (Task.print_stack shows the outermost frame only)
            coro = task.get_coro()
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is not None:
                    code = frame.f_code
                    out.write(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        err.write("[link] asyncio tasks:\n" + out.getvalue() + "[link] end of dump\n")
        err.flush()

    async def _terminate(self) -> None:
        await self.kernel.stop_backends()
        self.io_loop.stop()

    def close(self) -> None:
        for reader in getattr(self, "_readers", ()):
            reader.close()
        super().close()


main = LinkKernelApp.launch_instance
