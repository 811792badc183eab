"""The local change journal: which paths changed under the root, kept by watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

from ...errors import FileSyncError
from .ignore import LINKIGNORE, Ignore

log = logging.getLogger(__name__)


class Journal:
    """The relative paths changed under the local root, kept by a watchdog observer.

    Each consumer (one per host) calls :meth:`take` before a sync; it returns the
    paths created, changed, deleted or moved since that consumer's previous take,
    or ``None`` when a full comparison is needed: on a consumer's first take,
    after the kernel's event queue overflowed, after ``.linkignore`` changed, and
    when the observer is not running. A path may be listed for a change that
    turns out to be none (the sync compares it with the base).

    Before answering, :meth:`take` waits until the observer has seen every event
    that happened before the call (it chmods the root to its own mode and waits
    for that event), so a file written just before a sync is never missed; if
    it cannot chmod the root it returns None rather than guess.
    It is awaited on the event loop: no thread blocks on the barrier.
    """

    #: A consumer with more pending paths than this does a full comparison instead.
    max_paths = 200_000
    #: How long :meth:`take` waits for the observer to catch up before giving up (None).
    barrier_timeout = 2.0

    def __init__(self, root: str, ignore: Ignore) -> None:
        self.root = os.path.abspath(root)
        self.ignore = ignore
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._lock = threading.Lock()
        self._pending: dict[str, set[str] | None] = {}
        self._barriers = 0
        self._wakers: list[Callable[[], None]] = []  # event loops awaiting a barrier
        self._observer: Any = None
        self._overflow: _OverflowWatch | None = None

    def start(self) -> None:
        """Start watching. Events from the moment this returns are recorded.

        Raises :class:`FileSyncError` if the root cannot be watched.
        """
        from watchdog.observers import Observer

        if self._observer is not None:
            return
        self._overflow = _OverflowWatch(self)
        logging.getLogger("watchdog.observers").addHandler(self._overflow)
        observer = Observer()
        try:
            observer.schedule(_Handler(self), self.root, recursive=True, event_filter=_event_filter())
            observer.start()  # watches are in place when start() returns
        except OSError as exc:
            observer.stop()
            logging.getLogger("watchdog.observers").removeHandler(self._overflow)
            self._overflow = None
            msg = f"cannot watch {self.root} for changes: {exc.strerror or exc}"
            raise FileSyncError(msg) from exc
        self._observer = observer

    def stop(self) -> None:
        """Stop watching and join the observer's threads. Idempotent."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()
        if self._overflow is not None:
            logging.getLogger("watchdog.observers").removeHandler(self._overflow)
            self._overflow = None
        self.invalidate()

    def __enter__(self) -> Journal:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        observer = self._observer
        return (
            observer is not None
            and observer.is_alive()
            and all(emitter.is_alive() for emitter in observer.emitters)
        )

    async def take(self, consumer: str = "") -> set[str] | None:
        """The paths changed since ``consumer``'s last take, or None: compare everything.

        Awaits, on the event loop, the observer catching up (about a millisecond;
        at most :attr:`barrier_timeout`); the observer's thread wakes it. It ends
        early when ``consumer`` is invalidated (after an overflow, the kernel may
        have dropped the barrier's own event).
        """
        with self._lock:
            first = consumer not in self._pending
            if first:
                self._pending[consumer] = set()
        if first or not self.alive:
            return None
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:  # on the observer's thread, under the lock
            loop.call_soon_threadsafe(woken.set)

        with self._lock:
            seen = self._barriers
            self._wakers.append(wake)
        try:
            if not self._poke():
                caught_up = False  # no barrier, so no proof that every event arrived
            else:
                deadline = loop.time() + self.barrier_timeout
                while not self._caught_up(consumer, seen):
                    woken.clear()
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    # not wait_for: on Python 3.11 it returns, swallowing a
                    # cancel (an interrupt), when the wake-up comes at the same time
                    waiting = asyncio.ensure_future(woken.wait())
                    try:
                        await asyncio.wait({waiting}, timeout=remaining)
                    finally:
                        waiting.cancel()
                caught_up = self._caught_up(consumer, seen)
        finally:
            with self._lock:
                self._wakers.remove(wake)
        with self._lock:
            paths, self._pending[consumer] = self._pending[consumer], set()
        return paths if caught_up else None

    def invalidate(self, consumer: str | None = None) -> None:
        """Make the next :meth:`take` of ``consumer`` (of every consumer if None) return None."""
        with self._lock:
            for key in self._pending:
                if consumer is None or key == consumer:
                    self._pending[key] = None
            self._wake()

    def _poke(self) -> bool:
        """Make an event the observer will see after every earlier one: chmod the root
        to its own mode. False if the root is not ours to chmod; then the caller
        compares everything (waiting out a guessed latency would miss events)."""
        try:
            os.chmod(self.root, stat.S_IMODE(os.stat(self.root).st_mode))
        except OSError:
            return False
        return True

    def _caught_up(self, consumer: str, seen: int) -> bool:
        return self._barriers > seen or self._pending.get(consumer, ()) is None

    def _wake(self) -> None:
        """Under the lock: wake every event loop awaiting a barrier."""
        for wake in self._wakers:
            wake()

    def _record(self, event: Any) -> None:
        """Called by the observer's thread for every event."""
        src = os.fsdecode(event.src_path)
        if event.is_directory and event.event_type in ("attrib", "modified"):
            if src.rstrip(os.sep) == self.root:
                with self._lock:
                    self._barriers += 1
                    self._wake()
            return
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        paths = []
        for path in (src, dest) if dest else (src,):
            if not path.startswith(self._prefix):
                continue
            rel = path[len(self._prefix) :]
            if os.sep != "/":
                rel = rel.replace(os.sep, "/")
            if rel == LINKIGNORE:
                self.invalidate()  # what is ignored changed: compare everything
            elif not self.ignore.matches(rel, event.is_directory):
                paths.append(rel)
        if paths:
            with self._lock:
                for key, pending in self._pending.items():
                    if pending is not None:
                        pending.update(paths)
                        if len(pending) > self.max_paths:
                            self._pending[key] = None


def _event_filter() -> list[type]:
    from watchdog import events as ev

    classes: list[type] = [
        ev.FileCreatedEvent,
        ev.DirCreatedEvent,
        ev.FileDeletedEvent,
        ev.DirDeletedEvent,
        ev.FileMovedEvent,
        ev.DirMovedEvent,
        ev.FileModifiedEvent,
    ]
    if hasattr(ev, "DirAttribEvent"):  # watchdog >= 6 reports chmod as *AttribEvent
        classes += [ev.FileAttribEvent, ev.DirAttribEvent]
    else:
        classes.append(ev.DirModifiedEvent)
    return classes


class _Handler:
    """A watchdog event handler that feeds a :class:`Journal`."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def dispatch(self, event: Any) -> None:
        try:
            self.journal._record(event)
        except Exception:  # an exception would kill the observer's thread
            log.exception("file journal: cannot record %r", event)
            self.journal.invalidate()


class _OverflowWatch(logging.Handler):
    """watchdog only logs when the kernel's inotify queue overflows; that record means
    events were lost, so every consumer must compare everything."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(logging.WARNING)
        self.journal = journal

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self.journal.invalidate()
