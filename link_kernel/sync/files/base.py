"""The state a sync works against: what each side had at the last sync (the base),
a plan of what to do, and one operation's run (host, report, progress, caches)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .report import SyncReport
from .signatures import _HOST_WINDOW, Sig, _ancestors, _racy
from .transfers import _Host, _Interrupted

_PROGRESS_EVERY = 0.2


@dataclass
class _Base:
    """What each side had at the last sync: ``local`` and ``remote`` signatures."""

    remote_root: str
    local: dict[str, Sig] = field(default_factory=dict)
    remote: dict[str, Sig] = field(default_factory=dict)
    #: A full comparison was done against it (else a push compares everything).
    complete: bool = False
    #: The content hash of each regular file as both sides had it.
    hashes: dict[str, str] = field(default_factory=dict)
    #: Paths whose local state was recorded within :data:`RACY_NS` of its mtime.
    racy: set[str] = field(default_factory=set)
    #: The same for the host's state (its scan hashes them, see :func:`hash_racy`).
    remote_racy: set[str] = field(default_factory=set)
    dirty: bool = False

    def set(self, path: str, local: Sig, remote: Sig, digest: str | None = None) -> None:
        """Record a synced path; ``digest``: its content hash (None: unknown, or a symlink)."""
        self.local[path] = local
        self.remote[path] = remote
        if not digest:
            self.hashes.pop(path, None)
        else:
            self.hashes[path] = digest
        if _racy(remote, time.time_ns(), _HOST_WINDOW):
            self.remote_racy.add(path)
        else:
            self.remote_racy.discard(path)
        self.mark(path, local)

    def mark(self, path: str, local: Sig) -> None:
        """Note, now, whether ``path``'s recorded local state is racy."""
        if _racy(local, time.time_ns()):
            self.racy.add(path)
        else:
            self.racy.discard(path)
        self.dirty = True

    def drop(self, path: str) -> None:
        self.local.pop(path, None)
        self.remote.pop(path, None)
        self.hashes.pop(path, None)
        self.racy.discard(path)
        self.remote_racy.discard(path)
        self.dirty = True


@dataclass
class _Plan:
    forget: list[str] = field(default_factory=list)
    adopt: list[tuple[str, Sig, Sig, str | None]] = field(default_factory=list)  # (..., digest)
    keep: list[str] = field(default_factory=list)  # local change wins over a host deletion
    delete: list[tuple[str, Sig | None]] = field(default_factory=list)
    copy: list[tuple[str, Sig, Any]] = field(default_factory=list)  # (path, sig, extra)
    conflicts: list[tuple[str, Sig, Sig]] = field(default_factory=list)


class _Run:
    """One push or pull: its host, report, progress and caches. Lives in one worker thread."""

    def __init__(self, sync: Any, host: _Host, loop: asyncio.AbstractEventLoop) -> None:
        """``sync``: the :class:`~.sync.FileSync` it runs for (not imported: no cycle)."""
        self.host = host
        self.name = sync.host
        self.loop = loop
        self.progress = sync.progress
        self.report = SyncReport(host=sync.host)
        self.warned = sync._warned
        self.stop = threading.Event()
        self.base: _Base = _Base(host.root)
        self.remote_view: dict[str, Sig] | None = None  # the host's state after a push
        self.opener = sync.opener  # a python on the host, for a bundle (.bundle.Opener)
        self.local_dirs: dict[str, tuple[str, str]] = {}
        self._remote_dirs: set[str] | None = None
        self.total = 0
        self.done = 0
        self._last = time.monotonic()
        self._reported = False

    def check(self) -> None:
        if self.stop.is_set():
            raise _Interrupted

    def ticker(self, relpath: str) -> Callable[[int], None]:
        def tick(n: int) -> None:
            self.done += n
            self.check()
            now = time.monotonic()
            if self.progress is not None and now - self._last >= _PROGRESS_EVERY:
                self._last = now
                self._reported = True
                self.loop.call_soon_threadsafe(self.progress, self.done, self.total, relpath)

        return tick

    def finish(self) -> None:
        if self._reported and self.progress is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.progress, self.done, self.total, "")

    def skip(self, relpath: str, reason: str, sig: Sig) -> None:
        """Report a file not synced, once for as long as it stays as it is (``sig``)."""
        if self.warned.get(relpath) != (reason, sig):
            self.warned[relpath] = (reason, sig)
            self.report.skipped.append((relpath, reason))

    def remote_dirs(self, state: dict[str, Sig]) -> set[str]:
        """The directories of the host (those holding a file), from its state."""
        if self._remote_dirs is None:
            dirs: set[str] = set()
            for path in state:
                for folder in _ancestors(path):
                    if folder in dirs:
                        break
                    dirs.add(folder)
            self._remote_dirs = dirs
        return self._remote_dirs
