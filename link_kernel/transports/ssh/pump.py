"""The pump: one selector thread per connection that runs callbacks for ready sockets and channels.

Owns ``_Pump`` (register, call into the pump thread, stop and join) and the constants of its
traffic. It knows nothing of SSH: what it watches and what runs on each event belong to the
tunnels (:mod:`.tunnel`), the commands (:mod:`.command`) and the session (:mod:`.session`).
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable


#: How long the pump waits before retrying a channel whose send window is
#: full. paramiko gives no file descriptor for "window open again", so a full
#: window is the one case the pump polls; it never happens while traffic is
#: request/reply sized.
_WINDOW_RETRY = 0.002

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_PUMP_CHUNK = 256 * 1024


class _Pump:
    """A selector loop that runs callbacks for ready sockets and channels.

    Every registered object's ``data`` is a callback taking the event mask.
    Other threads hand work over with ``call`` (runs in the pump thread, then
    returns). ``tick`` runs after every round: the connection's liveness check
    and the retry of channels with a full send window.
    """

    def __init__(self, name: str, tick: Callable[[], float | None]) -> None:
        self._sel = selectors.DefaultSelector()
        # object -> fd, so an object is unregistered by the fd it was registered
        # with: a closed paramiko Channel would make a new pipe if asked again.
        self._fds: dict[object, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _READ, None)
        self._calls: deque[tuple[Callable[[], None], threading.Event | None]] = deque()
        self._lock = threading.Lock()
        self._tick = tick
        self._stopping = False
        self._on_exit: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def in_pump(self) -> bool:
        return threading.current_thread() is self.thread

    def register(self, obj: object, events: int, callback: Callable[[int], None]) -> None:
        """Pump thread: watch ``obj`` (a socket or a paramiko Channel) for ``events``."""
        self.set_events(obj, events, callback)

    def set_events(self, obj: object, events: int, callback: Callable[[int], None]) -> None:
        """Pump thread: register, modify or unregister ``obj`` to wait for ``events`` (0: none)."""
        fd = self._fds.get(obj)
        if fd is None:
            if events:
                fd = obj.fileno()  # type: ignore[attr-defined]
                self._sel.register(fd, events, callback)
                self._fds[obj] = fd
            return
        if not events:
            self.unregister(obj)
        elif self._sel.get_key(fd).events != events:
            self._sel.modify(fd, events, callback)

    def unregister(self, obj: object) -> None:
        """Pump thread: stop watching ``obj``; call it before closing ``obj``."""
        fd = self._fds.pop(obj, None)
        if fd is not None:
            self._sel.unregister(fd)

    def call(self, fn: Callable[[], None], *, wait: bool = True) -> bool:
        """Run ``fn`` in the pump thread; False if the pump has stopped (fn not run)."""
        if self.in_pump:
            fn()
            return True
        done = threading.Event() if wait else None
        with self._lock:
            if self._stopping or not self.thread.is_alive():
                return False
            self._calls.append((fn, done))
        self._wake()
        if done is not None:
            while not done.wait(0.5):
                if not self.thread.is_alive():
                    return False
        return True

    def stop(self, on_exit: Callable[[], None] | None = None) -> None:
        """Stop the loop (``on_exit`` runs in the pump thread last) and join it.

        Called by the session's close(), never from the pump thread itself.
        """
        with self._lock:
            self._stopping = True
            if on_exit is not None:
                self._on_exit.append(on_exit)
        self._wake()
        if self.in_pump:
            return  # cannot join itself; the wake-up pair is left to the garbage collector
        self.thread.join()
        with self._lock:
            # Closed here, under the lock _wake() holds, so no wake-up can hit a
            # reused descriptor number.
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        with self._lock:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass  # a wake-up is pending already (buffer full), or the pump is closed

    def _run(self) -> None:
        try:
            timeout = self._tick()
            while not self._stopping:
                for key, mask in self._sel.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        key.data(mask)
                self._run_calls()
                timeout = self._tick()
        finally:
            self._run_calls()
            for fn in self._on_exit:
                fn()
            self._fds.clear()
            self._sel.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, done = self._calls.popleft()
            try:
                fn()
            finally:
                if done is not None:
                    done.set()
