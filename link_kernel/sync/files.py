"""Files: two-way sync of the notebook's working directory with a host's work directory.

Before a remote cell the router **pushes** what changed locally; after it, it
**pulls** what the cell created, changed or deleted. Both are three-way merges
against a *base*, the state each side had at the last sync (per host, persisted
as JSON), so that an update is told from a deletion and from a conflict::

    local now ─── Journal (watchdog) or scan_tree ──┐
                                                    ├── base: what each side had ──▶ plan
    host now ──── scan_tree, run on the host ───────┘        at the last sync
                                                               │
                                  copies through fsspec ◀──────┘
                                  (SFTP, or local for the process host)

- Local changes come from a :class:`Journal`, so a sync with nothing to do walks
  nothing. The first sync, and any sync after the journal lost track, is a full
  comparison (:func:`scan_tree`).
- Host changes come from :func:`scan_tree` run *on the host* (it is sent there as
  :data:`SCAN_SOURCE`), never from a walk over SFTP.
- A file changed on both sides keeps the local version; the host's is saved
  beside it as ``NAME.from-HOST.EXT`` and reported. A deletion propagates unless
  the other side changed the file. Nothing is overwritten that is not known to
  be the version the other side last saw.
- Every file is written under a temporary name beside its target and renamed into
  place, so an interrupted transfer leaves no partial file, and the base records
  only what arrived.

A *signature* describes one file: ``[size, mtime_ns, mode, "f"]`` for a regular
file and ``[0, mtime_ns, mode, "l", target]`` for a symlink. Paths are relative to
the root and '/'-separated on both sides.

Change is judged by content
---------------------------

A file changed on either side reaches the other before the next cell, however
small the change and however soon after the last sync. Size and mtime cannot
promise that alone: a rewrite of the same size lands in the same mtime when the
file system keeps coarse times (a jiffy on Linux, whole seconds on ext3 and
HFS+ and through SFTP's utime, two on FAT), and two files with the same size and
second need not hold the same bytes. So:

- The base records, beside each side's signature, the **content hash** (sha256)
  of what was synced, computed while the bytes go through (no second read).
- The journal (or a full scan) says **where to look**: a path it does not name
  and whose signature matches the base is taken as unchanged without reading it.
  That is safe only for a signature recorded long enough after its mtime: a
  state recorded less than :data:`RACY_NS` after the file's mtime (or before it)
  is **racy**, since a later write in the same granule would leave it as is
  (git's "racily clean" index entries). Racy paths are re-checked at every
  push whatever the journal says, by hash, until a check finds them old enough;
  a file not written for two seconds is never read again until it changes.
- The same holds on the host: the router names the host's racy files in the
  cell's scan request and the host's scan adds their hash
  (:func:`hash_racy`), so a same-size rewrite by the cell comes back.
- Where both sides changed (or the base does not know a path), they are equal
  only if their bytes are: both are hashed (the host's read through the
  filesystem) unless kind or size already differ; else it is a conflict.
- The journal proves it has seen every earlier event with a barrier event of
  its own; when it cannot make one, the push compares everything.

The hot path is unchanged: a sync with nothing to do and nothing racy reads no
file and starts no worker.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import contextlib
import fnmatch
import functools
import hashlib
import inspect
import json
import logging
import os
import posixpath
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pathspec
from fsspec.implementations.local import LocalFileSystem
from paramiko.ssh_exception import SSHException

from ..errors import FileSyncError, TransferError

log = logging.getLogger(__name__)

#: Directory names never synced, at any depth. A directory holding a
#: ``pyvenv.cfg`` (a virtual environment under any name) is never synced either.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    "__pycache__",
    ".ipynb_checkpoints",
    ".venv",
    "venv",
    ".tox",
    "node_modules",
    ".link",
)

#: The file, in the local root, that lists what not to sync (gitignore syntax).
LINKIGNORE = ".linkignore"

#: Files are written under this prefix beside their target, then renamed.
#: Scans and the journal skip such names (a crash can leave one behind).
PART_PREFIX = ".link-part-"

_CHUNK = 1024 * 1024
_PROGRESS_EVERY = 0.2
_CANCEL_WAIT = 10.0
_STATE_VERSION = 1

#: A file whose mtime is this close to the moment its state was recorded (or
#: later) is *racy*: a write in the same timestamp granule would leave size and
#: mtime as they were, so its content is checked by hash at the next sync. Two
#: seconds cover file systems that keep whole seconds (ext3, HFS+, SFTP's utime)
#: or two (FAT), and a writer whose clock is a little ahead.
RACY_NS = 2 * 10**9

#: The content hash recorded for each synced file (``hashlib`` name).
HASH = "sha256"

Sig = list  # a signature, see the module docstring


# -- scanning (also runs on hosts) ---------------------------------------------------


def scan_tree(root: "str", prune: "Iterable[str]" = ()) -> "dict[str, list]":  # noqa: UP037
    """Signatures of the files and symlinks under ``root``: ``{relpath: signature}``.

    Walks with :func:`os.scandir` and never follows a symlink. Skips the
    directories named in ``DEFAULT_EXCLUDES``, any directory holding a
    ``pyvenv.cfg``, and ``prune``: an entry without '/' is a directory name
    skipped at any depth, one with '/' a path from ``root`` (``/data`` is
    ``data`` at the top only). Other kinds of files (fifos, sockets) are left out.

    Raises ``OSError`` if ``root`` cannot be listed; what vanishes or cannot be
    read during the walk is left out. About 5 µs a file, most of it ``lstat``.

    Self-contained, standard library only, Python >= 3.8 (hence the quoted
    annotations): hosts run it from :data:`SCAN_SOURCE`.
    """
    import os
    import stat

    excluded = {".git", "__pycache__", ".ipynb_checkpoints", ".venv", "venv", ".tox"}
    excluded |= {"node_modules", ".link"}
    skip_names = excluded | {p for p in prune if "/" not in p}
    skip_paths = {p.strip("/") for p in prune if "/" in p}
    file_type, regular, symlink = 0o170000, stat.S_IFREG, stat.S_IFLNK
    readlink = os.readlink
    found = {}
    stack = [(root, "")]
    while stack:
        path, prefix = stack.pop()
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except OSError:
            if not prefix:
                raise
            continue
        if prefix and any(entry.name == "pyvenv.cfg" for entry in entries):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    name = entry.name
                    rel = prefix + name
                    if name not in skip_names and rel not in skip_paths:
                        stack.append((entry.path, rel + "/"))
                    continue
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if mode & file_type == regular:
                    name = entry.name
                    if name[:11] != ".link-part-":
                        found[prefix + name] = [st.st_size, st.st_mtime_ns, mode & 0o7777, "f"]
                elif mode & file_type == symlink:
                    target = readlink(entry.path)
                    found[prefix + entry.name] = [0, st.st_mtime_ns, mode & 0o7777, "l", target]
            except OSError:
                continue
    return found


def hash_racy(root: "str", found: "dict[str, list]", paths: "Iterable[str]") -> "dict[str, list]":  # noqa: UP037
    """Append the content hash (sha256) to the signatures of ``paths`` in ``found``.

    ``found`` is a :func:`scan_tree` of ``root``; ``paths`` are the files the router
    holds a racy state of (see :data:`RACY_NS`): their size and mtime alone cannot
    tell a rewrite. What vanished or cannot be read keeps its plain signature.
    Self-contained like :func:`scan_tree`: hosts run it from :data:`SCAN_SOURCE`.
    """
    import hashlib
    import os

    for rel in paths:
        sig = found.get(rel)
        if sig is None or sig[3] != "f" or len(sig) != 4:
            continue
        h = hashlib.sha256()
        try:
            with open(os.path.join(root, rel), "rb") as f:
                chunk = f.read(1 << 20)
                while chunk:
                    h.update(chunk)
                    chunk = f.read(1 << 20)
        except OSError:
            continue
        sig.append(h.hexdigest())
    return found


#: The source of :func:`scan_tree` and :func:`hash_racy`, for a host to ``exec``.
SCAN_SOURCE: str = inspect.getsource(scan_tree) + "\n\n" + inspect.getsource(hash_racy)


def conflict_name(relpath: str, host: str, taken: Callable[[str], bool] = lambda _: False) -> str:
    """Where the host's version of a conflicting file is saved: ``report.from-gpu.csv``.

    ``Makefile`` becomes ``Makefile.from-gpu`` and ``.bashrc`` ``.bashrc.from-gpu``.
    If ``taken(name)`` says the name is in use, ``-2``, ``-3``... is added to the tag.
    """
    folder, name = posixpath.split(relpath)
    stem, ext = posixpath.splitext(name)
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", host).strip(".") or "host"
    n = 1
    while True:
        label = f".from-{tag}" if n == 1 else f".from-{tag}-{n}"
        room = 255 - len((label + ext).encode(errors="surrogateescape"))
        short = stem.encode(errors="surrogateescape")[:room].decode(errors="ignore")  # NAME_MAX
        candidate = posixpath.join(folder, short + label + ext)
        if not taken(candidate):
            return candidate
        n += 1


# -- what is ignored -------------------------------------------------------------------


class Ignore:
    """What never moves: ``ROOT/.linkignore`` (gitignore syntax) plus the defaults.

    As in git, nothing below an ignored directory can be re-included. Rules are
    re-read by :meth:`refresh` when ``.linkignore`` changed; :class:`FileSync`
    calls it at the start of every operation. Thread-safe for :meth:`matches`.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._stamp: object = object()  # never equal: the first refresh loads
        #: Whether ``.linkignore`` has patterns (else only the defaults apply).
        self.has_rules = False
        self._spec: pathspec.GitIgnoreSpec | None = None
        self._prune: list[str] = []
        self._dirs: dict[str, bool] = {}  # relpath of a directory -> ignored by the rules
        self._venvs: dict[str, bool] = {}  # relpath of a directory -> holds a pyvenv.cfg
        self.refresh()

    def refresh(self) -> bool:
        """Re-read ``.linkignore`` if it changed; return whether the rules changed.

        Raises :class:`FileSyncError` if it cannot be read or has a bad pattern.
        """
        path = os.path.join(self.root, LINKIGNORE)
        self._venvs = {}
        try:
            st = os.stat(path)
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            raise FileSyncError(f"cannot read {LINKIGNORE}: {exc.strerror}") from exc
        if stamp == self._stamp:
            return False
        lines: list[str] = []
        if stamp is not None:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError as exc:
                raise FileSyncError(f"cannot read {LINKIGNORE}: {exc.strerror}") from exc
        try:
            spec = pathspec.GitIgnoreSpec.from_lines(lines)
        except ValueError as exc:
            raise FileSyncError(
                f"{LINKIGNORE} has a bad pattern: {exc}", hint=f"Fix {LINKIGNORE} (gitignore syntax)."
            ) from exc
        self._spec = spec if len(spec) else None
        self.has_rules = self._spec is not None
        self._prune = _plain_directories(lines)
        self._dirs = {}
        self._stamp = stamp
        return True

    def matches(self, relpath: str, is_dir: bool = False) -> bool:
        """Whether the rules (defaults and ``.linkignore``) exclude ``relpath``.

        Looks at names only, never at the file system.
        """
        parent, _, name = relpath.rpartition("/")
        if parent and self._dir_ignored(parent):
            return True
        if is_dir:
            return self._dir_ignored(relpath)
        if name.startswith(PART_PREFIX):
            return True
        spec = self._spec
        return spec is not None and spec.match_file(relpath)

    def ignored(self, relpath: str, is_dir: bool = False) -> bool:
        """:meth:`matches`, or ``relpath`` is inside a local virtual environment."""
        if self.matches(relpath, is_dir):
            return True
        parts = relpath.split("/")
        folder = ""
        for part in parts if is_dir else parts[:-1]:
            folder = f"{folder}/{part}" if folder else part
            venv = self._venvs.get(folder)
            if venv is None:
                venv = os.path.lexists(os.path.join(self.root, folder, "pyvenv.cfg"))
                self._venvs[folder] = venv
            if venv:
                return True
        return False

    def prune_dirs(self) -> list[str]:
        """Directories a scanner may skip without pathspec (the ``prune`` of :func:`scan_tree`).

        The plain patterns of ``.linkignore`` (no wildcard, no later negation);
        the defaults are not listed, :func:`scan_tree` knows them.
        """
        return list(self._prune)

    def _dir_ignored(self, relpath: str) -> bool:
        hit = self._dirs.get(relpath)
        if hit is None:
            parent, _, name = relpath.rpartition("/")
            spec = self._spec
            hit = (
                name in DEFAULT_EXCLUDES
                or (bool(parent) and self._dir_ignored(parent))
                or (spec is not None and spec.match_file(relpath + "/"))
            )
            self._dirs[relpath] = hit
        return hit


def _plain_directories(lines: list[str]) -> list[str]:
    """The patterns a scanner can prune by name or path: ``build``, ``/data``, ``a/b/``.

    Only plain ones (no wildcard) that no later negation could re-include: nothing
    below an ignored directory comes back, so only a negation whose last part may
    name the directory itself matters.
    """
    prune = []
    for i, line in enumerate(lines):
        text = line.rstrip()
        if not text or text[0] in "#!" or any(c in text for c in "*?[\\"):
            continue
        body = text.strip("/")
        if not body:
            continue
        name = body.rpartition("/")[2]
        negations = [later[1:].rstrip().rstrip("/") for later in lines[i + 1 :] if later.startswith("!")]
        if any("**" in n or fnmatch.fnmatchcase(name, n.rpartition("/")[2]) for n in negations):
            continue
        anchored = "/" in text.rstrip("/")
        prune.append("/" + body if anchored else body)
    return prune


# -- the local change journal ----------------------------------------------------------


def too_big(root: str, ignore: Ignore, max_files: int, max_bytes: int) -> str:
    """Why ``root`` is too big to sync file by file, or "" if it is not.

    Walks what :class:`Ignore` keeps, and stops as soon as either limit is
    passed, so a huge folder (a home directory, /tmp) costs at most
    ``max_files`` stat calls.
    """
    files = size = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(root, rel)))
        except OSError:
            continue
        for entry in entries:
            relpath = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if ignore.ignored(relpath, is_dir):
                    continue
                if is_dir:
                    stack.append(relpath)
                    continue
                files += 1
                size += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            if files > max_files:
                return f"it holds more than {max_files:,} files"
            if size > max_bytes:
                return f"it holds more than {_size(max_bytes)}"
    return ""


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
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(woken.wait(), remaining)
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


# -- reports ---------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What one push, pull or sync did. Paths are relative to the roots."""

    uploaded: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    #: (path, where the host's version was saved)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    #: (path, why it was not synced)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    host: str = ""

    @property
    def changed(self) -> bool:
        return bool(
            self.uploaded
            or self.downloaded
            or self.deleted_local
            or self.deleted_remote
            or self.conflicts
        )

    def warnings(self) -> list[str]:
        """One line for the user per conflict and per skipped file."""
        host = self.host or "the host"
        lines = [
            f"{path} changed here and on {host}: kept yours, saved {host}'s as {saved}"
            for path, saved in self.conflicts
        ]
        lines += [f"{path} was not synced: {reason}" for path, reason in self.skipped]
        return lines

    def merge(self, other: SyncReport) -> SyncReport:
        skipped = list(dict.fromkeys(self.skipped + other.skipped))
        return SyncReport(
            uploaded=self.uploaded + other.uploaded,
            downloaded=self.downloaded + other.downloaded,
            deleted_local=self.deleted_local + other.deleted_local,
            deleted_remote=self.deleted_remote + other.deleted_remote,
            conflicts=self.conflicts + other.conflicts,
            skipped=skipped,
            bytes=self.bytes + other.bytes,
            seconds=self.seconds + other.seconds,
            host=self.host or other.host,
        )


# -- signatures ------------------------------------------------------------------------

_DIR = "dir"  # lstat found a directory
_BLOCKED = "blocked"  # a parent is a file or a symlink


def _same(a: Sig | None, b: Sig | None) -> bool:
    """Whether two signatures describe the same state (a symlink is its target)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    return a[3] == "l" == b[3] and a[4] == b[4]


def _racy(sig: Sig, now_ns: int, window: int = RACY_NS) -> bool:
    """Whether a file's recorded state could be left unchanged by a write after ``now_ns``."""
    return sig[3] == "f" and sig[1] > now_ns - window


#: The host's clock may lag this one: its racy window is taken twice as wide.
_HOST_WINDOW = 2 * RACY_NS


def _digest_file(path: str) -> str:
    """The content hash of a local file (:data:`HASH`)."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _lstat(path: str) -> Sig | str | None:
    """The signature of a local path, ``_DIR``, or None (missing, or not a file or link)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return [st.st_size, st.st_mtime_ns, stat.S_IMODE(mode), "f"]
    if stat.S_ISLNK(mode):
        return [0, st.st_mtime_ns, stat.S_IMODE(mode), "l", os.readlink(path)]
    if stat.S_ISDIR(mode):
        return _DIR
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _part_name(relpath: str) -> str:
    return posixpath.join(posixpath.dirname(relpath), PART_PREFIX + secrets.token_hex(8))


def _ancestors(relpath: str) -> Iterable[str]:
    parent = posixpath.dirname(relpath)
    while parent:
        yield parent
        parent = posixpath.dirname(parent)


def _escapes(relpath: str, target: str) -> bool:
    """Whether a symlink at ``relpath`` to ``target`` points outside the root, lexically."""
    if posixpath.isabs(target):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(relpath), target))
    return resolved == ".." or resolved.startswith("../")


@contextlib.contextmanager
def _local_errors(relpath: str, doing: str):
    try:
        yield
    except OSError as exc:
        msg = f"{doing} {relpath!r} failed: {exc.strerror or exc}"
        raise FileSyncError(msg) from exc


@contextlib.contextmanager
def _remote_errors(host: str, relpath: str, doing: str):
    try:
        yield
    except (OSError, EOFError, SSHException) as exc:
        reason = str(exc) or ("the connection closed" if isinstance(exc, EOFError) else type(exc).__name__)
        msg = f"{doing} {relpath!r} on {host} failed: {reason}"
        raise TransferError(
            msg, hint="Files synced before the failure are kept; run the cell again to finish."
        ) from exc


class _Interrupted(Exception):
    """The operation was cancelled; raised between chunks in the worker thread."""


class _LocalFile:
    """A local file object handed to a copy: its OSErrors are local problems, and it counts."""

    def __init__(self, f: BinaryIO | None, relpath: str) -> None:
        self._f = f
        self._relpath = relpath
        self.count = 0
        self._hash = hashlib.new(HASH)  # what went through: the base records it

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def read(self, n: int = -1) -> bytes:
        with _local_errors(self._relpath, "reading"):
            data = self._f.read(n)
        self.count += len(data)
        self._hash.update(data)
        return data

    def write(self, data: bytes) -> int:
        if self._f is None:  # only hashing
            written = len(data)
        else:
            with _local_errors(self._relpath, "writing"):
                written = self._f.write(data)
        self.count += len(data)
        self._hash.update(data)
        return written


def _copy(src: Any, dst: Any, tick: Callable[[int], None]) -> None:
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return
        dst.write(chunk)
        tick(len(chunk))


# -- the host's side -------------------------------------------------------------------


class _Host(abc.ABC):
    """The host's work directory, reached through an fsspec filesystem.

    Paths given to methods are relative; every method may raise OSError (or a
    paramiko error) for the caller to map to :class:`TransferError`.
    """

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.dirs: set[str] = set()  # relative directories known to exist
        self.litter: set[str] = set()  # temporary files that could not be removed

    def path(self, relpath: str) -> str:
        return posixpath.join(self.root, relpath)

    @abc.abstractmethod
    def write(self, src: _LocalFile, relpath: str, size: int, tick: Callable[[int], None]) -> None:
        """Write ``src`` to ``relpath`` (created or truncated)."""

    @abc.abstractmethod
    def read(self, relpath: str, dst: _LocalFile, tick: Callable[[int], None]) -> None:
        """Copy ``relpath`` into ``dst``."""

    @abc.abstractmethod
    def set_attrs(self, relpath: str, mode: int, mtime_ns: int) -> int:
        """Set mode and mtime; return the mtime (ns) the host's scan will report."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Rename, replacing ``dst`` atomically."""

    @abc.abstractmethod
    def symlink(self, target: str, relpath: str) -> None: ...

    @abc.abstractmethod
    def remove(self, relpath: str) -> None:
        """Remove a file or symlink; a missing one is not an error."""

    @abc.abstractmethod
    def rmdir(self, relpath: str) -> None: ...

    @abc.abstractmethod
    def mkdir(self, relpath: str) -> None:
        """Create a directory whose parent exists; an existing directory is not an error."""

    @abc.abstractmethod
    def lstat(self, relpath: str) -> Sig | str | None:
        """Like :func:`_lstat`, on the host."""

    def digest(self, relpath: str) -> str:
        """The content hash of the host's file (read through, nothing stored)."""
        sink = _LocalFile(None, relpath)
        self.read(relpath, sink, lambda n: None)
        return sink.digest

    def unchanged(self, recorded: Sig | None, there: Sig) -> bool:
        """Whether :meth:`lstat`'s ``there`` is the state the base ``recorded``."""
        return _same(recorded, there)

    def put_file(self, src: _LocalFile, relpath: str, sig: Sig, tick: Callable[[int], None]) -> Sig:
        """Copy a local file to ``relpath`` atomically; return its signature there."""
        self.make_parents(relpath)
        temp = _part_name(relpath)
        try:
            self.write(src, temp, sig[0], tick)
            mtime = self.set_attrs(temp, sig[2], sig[1])
            self.rename(temp, relpath)
        except BaseException:
            self.discard(temp)
            raise
        return [src.count, mtime, sig[2], "f"]

    def put_link(self, relpath: str, target: str) -> Sig:
        self.make_parents(relpath)
        temp = _part_name(relpath)
        try:
            self.symlink(target, temp)
            self.rename(temp, relpath)
        except BaseException:
            self.discard(temp)
            raise
        return [0, 0, 0o777, "l", target]  # its mtime is learnt from the next scan

    def make_parents(self, relpath: str) -> None:
        missing = []
        for folder in _ancestors(relpath):
            if folder in self.dirs:
                break
            missing.append(folder)
        for folder in reversed(missing):
            self.mkdir(folder)
            self.dirs.add(folder)

    def discard(self, relpath: str) -> None:
        """Remove a temporary file, or remember it (the connection may be gone)."""
        try:
            self.remove(relpath)
        except (OSError, EOFError, SSHException):
            self.litter.add(relpath)
        else:
            self.litter.discard(relpath)


class _LocalHost(_Host):
    """The ``process`` host: fsspec's LocalFileSystem (data through ``fs.open``)."""

    def write(self, src, relpath, size, tick):
        with self.fs.open(self.path(relpath), "wb") as dst:
            _copy(src, dst, tick)

    def read(self, relpath, dst, tick):
        with self.fs.open(self.path(relpath), "rb") as src:
            _copy(src, dst, tick)

    def set_attrs(self, relpath, mode, mtime_ns):
        os.chmod(self.path(relpath), mode)
        os.utime(self.path(relpath), ns=(mtime_ns, mtime_ns))
        return mtime_ns

    def rename(self, src, dst):
        os.replace(self.path(src), self.path(dst))

    def symlink(self, target, relpath):
        os.symlink(target, self.path(relpath))

    def remove(self, relpath):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path(relpath))

    def rmdir(self, relpath):
        os.rmdir(self.path(relpath))

    def mkdir(self, relpath):
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path(relpath))
        if not stat.S_ISDIR(os.lstat(self.path(relpath)).st_mode):
            raise NotADirectoryError(f"{self.path(relpath)} is not a directory")

    def lstat(self, relpath):
        return _lstat(self.path(relpath))


class _SFTPHost(_Host):
    """An ssh host: an fsspec SFTP filesystem whose ``ftp`` is a paramiko SFTPClient."""

    def __init__(self, fs: Any, root: str) -> None:
        super().__init__(fs, root)
        self.ftp = fs.ftp

    @staticmethod
    def _callback(tick: Callable[[int], None]) -> Callable[[int, int], None]:
        done = 0

        def callback(so_far: int, total: int) -> None:
            nonlocal done
            tick(so_far - done)
            done = so_far

        return callback

    def write(self, src, relpath, size, tick):
        self.ftp.putfo(src, self.path(relpath), size, callback=self._callback(tick), confirm=False)

    def read(self, relpath, dst, tick):
        self.ftp.getfo(self.path(relpath), dst, callback=self._callback(tick))

    def set_attrs(self, relpath, mode, mtime_ns):
        seconds = mtime_ns // 10**9  # SFTP v3 carries whole seconds
        self.ftp.chmod(self.path(relpath), mode)
        self.ftp.utime(self.path(relpath), (seconds, seconds))
        return seconds * 10**9

    def rename(self, src, dst):
        self.ftp.posix_rename(self.path(src), self.path(dst))

    def symlink(self, target, relpath):
        self.ftp.symlink(target, self.path(relpath))

    def remove(self, relpath):
        with contextlib.suppress(FileNotFoundError):
            self.ftp.remove(self.path(relpath))

    def rmdir(self, relpath):
        self.ftp.rmdir(self.path(relpath))

    def mkdir(self, relpath):
        try:
            self.ftp.mkdir(self.path(relpath))
        except OSError as exc:  # SFTP v3 does not say "exists": look
            try:
                exists = stat.S_ISDIR(self.ftp.stat(self.path(relpath)).st_mode or 0)
            except OSError:
                raise exc from None
            if not exists:
                raise

    def unchanged(self, recorded, there):
        # SFTP v3 reports whole seconds; the host's own scan, nanoseconds
        if recorded is None or recorded[3] != "f" or there[3] != "f":
            return _same(recorded, there)
        return recorded[0] == there[0] and recorded[2] == there[2] and recorded[1] // 10**9 == there[1] // 10**9

    def lstat(self, relpath):
        try:
            st = self.ftp.lstat(self.path(relpath))
        except FileNotFoundError:
            return None
        mode = st.st_mode or 0
        mtime = int(st.st_mtime or 0) * 10**9
        if stat.S_ISREG(mode):
            return [st.st_size, mtime, stat.S_IMODE(mode), "f"]
        if stat.S_ISLNK(mode):
            return [0, mtime, stat.S_IMODE(mode), "l", self.ftp.readlink(self.path(relpath))]
        return _DIR if stat.S_ISDIR(mode) else None


def _host_for(fs: Any, root: str) -> _Host:
    if isinstance(fs, LocalFileSystem):
        return _LocalHost(fs, root)
    if getattr(fs, "ftp", None) is not None:
        return _SFTPHost(fs, root)
    msg = f"cannot sync files through {type(fs).__name__}: use LocalFileSystem or an SFTP filesystem"
    raise TypeError(msg)


# -- the base --------------------------------------------------------------------------


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

    def __init__(self, sync: FileSync, host: _Host, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.name = sync.host
        self.loop = loop
        self.progress = sync.progress
        self.report = SyncReport(host=sync.host)
        self.warned = sync._warned
        self.stop = threading.Event()
        self.base: _Base = _Base(host.root)
        self.remote_view: dict[str, Sig] | None = None  # the host's state after a push
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


# -- the sync --------------------------------------------------------------------------


class FileSync:
    """Two-way sync of ``local_root`` with one host's work directory.

    The router keeps one per host, shares one :class:`Journal` among them, and
    calls :meth:`push` before a remote cell and :meth:`pull` after it (or
    :meth:`sync` for ``%link sync``). Operations on one instance run one at a
    time, each in a worker thread; the base is saved to ``state_path`` after
    each one that changed it.

    ``progress(done_bytes, total_bytes, path)``, if set, is called on the event
    loop's thread at most every 0.2 s while files are copied, and once with
    ``path=""`` at the end of an operation that reported progress.

    A file that cannot be synced (too large, a symlink leading out, a file here
    where the host has a directory...) is listed in ``SyncReport.skipped`` once,
    and again only if it changes.
    """

    def __init__(
        self,
        local_root: str,
        host: str,
        state_path: Path,
        *,
        max_file_size: int = 512 * 2**20,
        journal: Journal | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.local_root = os.path.abspath(local_root)
        self.host = host
        self.state_path = Path(state_path)
        self.max_file_size = max_file_size
        self.journal = journal
        self.ignore = journal.ignore if journal is not None else Ignore(self.local_root)
        self.progress = progress
        self._lock = threading.Lock()
        self._base: _Base | None = None
        #: Paths a pull left for the next push to look at (kept local versions).
        self._pending: set[str] = set()
        #: The host's temporary files a failed transfer could not remove.
        self._litter: set[str] = set()
        #: What was reported as skipped, and in which state (reported once).
        self._warned: dict[str, tuple[str, Sig]] = {}

    # -- public, async ----------------------------------------------------------------

    async def push(self, fs: Any, remote_root: str, remote_now: dict[str, Sig] | None = None) -> SyncReport:
        """Send local changes since the last sync to the host (before a remote cell).

        ``remote_now`` is the host's :func:`scan_tree` or None when unknown: then the
        host is taken to be as the base says, except that a file the base does not
        know is never overwritten on the host.
        """
        changed = await self._take()
        if changed == set() and remote_now is None and self._quiet(remote_root):
            return SyncReport(host=self.host)  # nothing changed here: no worker needed
        return (await self._push_taken(fs, remote_root, remote_now, changed)).report

    async def _take(self) -> set[str] | None:
        """The journal's changed paths for this host; None: compare everything."""
        return await self.journal.take(self.host) if self.journal is not None else None

    async def _push_taken(self, fs: Any, remote_root: str, remote_now: Any, changed: set[str] | None) -> _Run:
        try:
            return await self._operate(fs, remote_root, functools.partial(self._push, changed=changed), remote_now)
        except BaseException:
            if self.journal is not None:  # the paths taken may not all have been pushed
                self.journal.invalidate(self.host)
            raise

    def _quiet(self, remote_root: str) -> bool:
        """Whether a push that the journal says has no changed path has nothing to do."""
        base = self._base
        return (
            base is not None
            and base.complete
            and base.remote_root == (remote_root.rstrip("/") or "/")
            and not self._pending
            and not base.racy
            and not self._litter
            and not self._lock.locked()
        )

    async def pull(self, fs: Any, remote_root: str, remote_now: dict[str, Sig]) -> SyncReport:
        """Bring back what the host created, changed or deleted since the last sync.

        ``remote_now`` is the host's :func:`scan_tree` after the cell.
        """
        return (await self._operate(fs, remote_root, self._pull, remote_now)).report

    async def sync(self, fs: Any, remote_root: str, remote_now: dict[str, Sig] | None) -> SyncReport:
        """Push, then pull (``%link sync``). With ``remote_now=None`` only push."""
        pushed = await self._push_taken(fs, remote_root, remote_now, await self._take())
        if pushed.remote_view is None:
            return pushed.report
        pulled = await self._operate(fs, remote_root, self._pull, pushed.remote_view)
        return pushed.report.merge(pulled.report)

    async def _operate(self, fs: Any, remote_root: str, body: Callable, remote_now: Any) -> _Run:
        run = _Run(self, _host_for(fs, remote_root), asyncio.get_running_loop())
        worker = asyncio.ensure_future(asyncio.to_thread(self._work, run, body, remote_now))
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            run.stop.set()  # the worker stops at the next chunk and saves the base
            await asyncio.wait({worker}, timeout=_CANCEL_WAIT)
            if worker.done() and not worker.cancelled():
                worker.exception()
            raise
        return run

    # -- the worker ---------------------------------------------------------------------

    def _work(self, run: _Run, body: Callable, remote_now: Any) -> None:
        with self._lock:
            started = time.monotonic()
            run.base = base = self._load(run.host.root)
            for temp in list(self._litter):
                run.host.discard(temp)
            try:
                self.ignore.refresh()
                body(run, remote_now)
            except BaseException:
                with contextlib.suppress(FileSyncError):
                    self._save(base)
                raise
            finally:
                self._litter = set(run.host.litter)
                run.report.seconds = time.monotonic() - started
                run.finish()
            self._save(base)

    def _push(self, run: _Run, remote_now: dict[str, Sig] | None, changed: set[str] | None) -> None:
        """``changed``: the journal's paths (None: compare everything)."""
        base = run.base
        pending, self._pending = self._pending, set()
        try:
            full = changed is None or not base.complete
            if full:
                local_now, candidates = self._scan_all(run)
            else:
                local_now, candidates = self._scan_some(run, changed | pending | base.racy)
            view = dict(remote_now) if remote_now is not None else None
            run.remote_view = view
            known = view if view is not None else base.remote
            plan = _Plan()
            for path in sorted(candidates):
                lsig = local_now.get(path)
                if _same(base.local.get(path), lsig) and not self._changed_unseen(run, path, lsig):
                    continue
                rsig = known.get(path)
                theirs = view is not None and not _same(base.remote.get(path), rsig)
                if lsig is None:
                    if rsig is None:
                        plan.forget.append(path)
                    elif not theirs:  # else the host's change comes back at the pull
                        plan.delete.append((path, None))
                elif theirs and rsig is not None:
                    digest = self._same_content(run, path, lsig, rsig)
                    if digest is not None:
                        plan.adopt.append((path, lsig, rsig, digest))
                    else:
                        plan.conflicts.append((path, lsig, rsig))
                else:
                    # the host's state is unknown: look before overwriting
                    plan.copy.append((path, lsig, view is None))
            self._apply_push(run, plan, known)
            if full and not base.complete:
                base.complete = base.dirty = True
        except BaseException:
            self._pending |= pending  # and the journal is invalidated (_push_taken)
            raise

    def _pull(self, run: _Run, remote_now: dict[str, Sig]) -> None:
        base = run.base
        remote = base.remote
        remote_now, rewritten = self._unhash(run, remote_now)
        if remote_now == remote and not rewritten:  # nothing happened there (one C-level comparison)
            return
        changed = [path for path, sig in remote_now.items() if remote.get(path) != sig or path in rewritten]
        changed += [path for path in remote if path not in remote_now]
        plan = _Plan()
        for path in sorted(changed):
            rsig = remote_now.get(path)
            if _same(remote.get(path), rsig) and path not in rewritten:  # a symlink: learn its signature there
                remote[path] = rsig
                base.dirty = True
                continue
            if self.ignore.ignored(path):
                continue
            lsig = self._local_state(run, path)
            if lsig == _BLOCKED or lsig == _DIR:
                if rsig is None:
                    plan.forget.append(path)
                else:
                    run.skip(path, self._blocked_reason(run, path, lsig), rsig)
                continue
            mine = not _same(base.local.get(path), lsig) or self._changed_unseen(run, path, lsig)
            if rsig is None:
                if lsig is None:
                    plan.forget.append(path)
                elif mine:
                    plan.keep.append(path)
                else:
                    plan.delete.append((path, lsig))
            elif lsig is None or not mine:
                plan.copy.append((path, rsig, lsig))
            elif (digest := self._same_content(run, path, lsig, rsig)) is not None:
                plan.adopt.append((path, lsig, rsig, digest))
            else:
                plan.conflicts.append((path, lsig, rsig))
        self._apply_pull(run, plan, remote_now)

    # -- finding local changes -------------------------------------------------------

    def _scan_all(self, run: _Run) -> tuple[dict[str, Sig], set[str]]:
        with _local_errors(".", "scanning"):
            found = scan_tree(self.local_root, self.ignore.prune_dirs())
        matches = self.ignore.matches
        if self.ignore.has_rules:
            local_now = {path: sig for path, sig in found.items() if not matches(path)}
        else:
            local_now = found  # the scan left out the defaults already
        gone = {p for p in run.base.local if p not in local_now and not self.ignore.ignored(p)}
        return local_now, set(local_now) | gone

    def _scan_some(self, run: _Run, paths: set[str]) -> tuple[dict[str, Sig], set[str]]:
        """Look at the journal's paths only: a directory is scanned, anything is
        checked against what the base had below it."""
        base = run.base
        local_now: dict[str, Sig] = {}
        candidates: set[str] = set()
        keys: list[str] | None = None
        prune = self.ignore.prune_dirs()
        for path in paths:
            state = self._local_state(run, path)
            if state == _DIR:
                if not self.ignore.ignored(path, is_dir=True):
                    with _local_errors(path, "scanning"):
                        found = scan_tree(os.path.join(self.local_root, path), _sub_prune(prune, path))
                    for rel, sig in found.items():
                        rel = f"{path}/{rel}"
                        if not self.ignore.matches(rel):
                            local_now[rel] = sig
                            candidates.add(rel)
            elif not self.ignore.ignored(path):
                if isinstance(state, list):
                    local_now[path] = state
                candidates.add(path)
            if path in base.local and state != _DIR:
                continue  # it was a file: nothing of the base is below it
            if keys is None:
                keys = sorted(base.local)
            prefix = path + "/"
            i = bisect.bisect_left(keys, prefix)
            while i < len(keys) and keys[i].startswith(prefix):
                if keys[i] not in local_now and not self.ignore.ignored(keys[i]):
                    candidates.add(keys[i])
                i += 1
        return local_now, candidates

    def _local_state(self, run: _Run, path: str) -> Sig | str | None:
        """A local path's signature, None, ``_DIR``, or ``_BLOCKED`` (a parent is not a directory)."""
        kind, _ = self._local_dir(run, posixpath.dirname(path))
        if kind == _BLOCKED:
            return _BLOCKED
        if kind == "missing":
            return None
        with _local_errors(path, "reading"):
            return _lstat(os.path.join(self.local_root, path))

    def _local_dir(self, run: _Run, folder: str) -> tuple[str, str]:
        """("dir" | "missing" | _BLOCKED, the blocking path) for a local directory."""
        if not folder:
            return ("dir", "")
        known = run.local_dirs.get(folder)
        if known is None:
            up = self._local_dir(run, posixpath.dirname(folder))
            if up[0] != "dir":
                known = up
            else:
                try:
                    st = os.lstat(os.path.join(self.local_root, folder))
                    known = ("dir", "") if stat.S_ISDIR(st.st_mode) else (_BLOCKED, folder)
                except FileNotFoundError:
                    known = ("missing", "")
                except OSError:
                    known = (_BLOCKED, folder)
            run.local_dirs[folder] = known
        return known

    def _blocked_reason(self, run: _Run, path: str, state: Any) -> str:
        if state == _DIR:
            return f"it is a directory here and a file on {self.host}"
        where = self._local_dir(run, posixpath.dirname(path))[1]
        return f"{where} is not a directory here"

    def _make_local_dirs(self, run: _Run, folder: str) -> str | None:
        """Create a local directory below the root; return why not, or None."""
        kind, where = self._local_dir(run, folder)
        if kind == "dir":
            return None
        if kind == _BLOCKED:
            return f"{where} is not a directory here"
        missing = [folder] + [a for a in _ancestors(folder) if self._local_dir(run, a)[0] != "dir"]
        for part in reversed(missing):
            with _local_errors(part, "creating directory"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(self.local_root, part))
                if not stat.S_ISDIR(os.lstat(os.path.join(self.local_root, part)).st_mode):
                    return f"{part} is not a directory here"
            run.local_dirs[part] = ("dir", "")
        return None

    # -- judging by content ----------------------------------------------------------

    def racy_remote(self) -> list[str]:
        """The host's files whose recorded state a write from now on could leave as
        it is: the host's scan after the next cell hashes them (:func:`hash_racy`)."""
        base = self._base
        if base is None:
            return []
        now = time.time_ns()
        return sorted(p for p in base.remote_racy if p in base.remote and _racy(base.remote[p], now, _HOST_WINDOW))

    def _unhash(self, run: _Run, remote_now: dict[str, Sig]) -> tuple[dict[str, Sig], set[str]]:
        """The host's scan without the hashes :func:`hash_racy` added, and the paths
        whose content changed although size and mtime are as the base recorded."""
        hashed = [path for path, sig in remote_now.items() if len(sig) == 5 and sig[3] == "f"]
        if not hashed:
            return remote_now, set()
        base = run.base
        remote_now = dict(remote_now)
        rewritten: set[str] = set()
        now = time.time_ns()
        for path in hashed:
            *sig, digest = remote_now[path]
            remote_now[path] = sig
            if base.remote.get(path) != sig:
                continue  # changed by its signature anyway
            if digest != base.hashes.get(path):
                rewritten.add(path)
            elif not _racy(sig, now, _HOST_WINDOW):
                base.remote_racy.discard(path)
                base.dirty = True
        return remote_now, rewritten

    def _changed_unseen(self, run: _Run, path: str, lsig: Any) -> bool:
        """Whether a local file whose size and mtime are as the base recorded them
        changed all the same: only a racy one can, and its hash says."""
        base = run.base
        if path not in base.racy or not isinstance(lsig, list) or lsig[3] != "f":
            return False
        try:
            with _local_errors(path, "reading"):
                digest = _digest_file(os.path.join(self.local_root, path))
        except FileSyncError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return True  # gone since the scan: let the plan look again
            raise
        if digest != base.hashes.get(path):
            return True
        base.mark(path, lsig)  # checked now: racy still only if its mtime is recent
        return False

    def _same_content(self, run: _Run, path: str, lsig: Sig, rsig: Sig) -> str | None:
        """The content hash ("" for a symlink) if the local file and the host's hold
        the same, else None. Reads both (the host's through the filesystem) unless
        kind or size already tell them apart."""
        if lsig[3] != rsig[3]:
            return None
        if lsig[3] == "l":
            return "" if lsig[4] == rsig[4] else None
        if lsig[0] != rsig[0]:
            return None
        try:
            with _local_errors(path, "reading"):
                mine = _digest_file(os.path.join(self.local_root, path))
            with _remote_errors(self.host, path, "reading"):
                theirs = run.host.digest(path)
        except (FileSyncError, TransferError) as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return None  # gone since the scan: the copy that follows will see
            raise
        return mine if mine == theirs else None

    # -- doing it ----------------------------------------------------------------------

    def _problem(self, path: str, sig: Sig, *, upload: bool) -> str | None:
        """Why a file cannot be copied, or None."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            return "its name is not valid UTF-8"
        if sig[3] == "l":
            target = sig[4]
            if _escapes(path, target):
                return f"it is a symlink to {target}, outside the working directory"
            real_root = os.path.realpath(self.local_root)
            where = os.path.join(self.local_root, path)
            real = os.path.realpath(where if upload else os.path.join(os.path.dirname(where), target))
            if os.path.commonpath([real_root, real]) != real_root:
                return f"it is a symlink to {target}, which leads outside the working directory"
            return None
        if sig[0] > self.max_file_size:
            return f"it is {_size(sig[0])}, over the {_size(self.max_file_size)} limit"
        return None

    def _apply_push(self, run: _Run, plan: _Plan, known: dict[str, Sig]) -> None:
        base, host, report = run.base, run.host, run.report
        view = run.remote_view
        for path in plan.forget:
            base.drop(path)
        for path, lsig, rsig, digest in plan.adopt:
            base.set(path, lsig, rsig, digest)
        emptied: set[str] = set()
        deleted: set[str] = set()
        for path, _ in plan.delete:
            run.check()
            with _remote_errors(self.host, path, "deleting"):
                host.remove(path)
            base.drop(path)
            deleted.add(path)
            report.deleted_remote.append(path)
            if view is not None:
                view.pop(path, None)
            emptied.add(posixpath.dirname(path))
        self._prune_dirs(
            emptied, lambda d: not os.path.isdir(os.path.join(self.local_root, d)), host.rmdir
        )

        if not plan.copy and not plan.conflicts:
            return
        state = {p: s for p, s in known.items() if p not in deleted} if deleted else known
        host.dirs.update(run.remote_dirs(state))
        copies: list[tuple[str, Sig, bool, Sig | None]] = []
        for path, lsig, blind in plan.copy:
            problem = self._problem(path, lsig, upload=True) or self._remote_clash(run, path, state)
            if problem:
                run.skip(path, problem, lsig)
            else:
                copies.append((path, lsig, blind, None))
        for path, lsig, rsig in plan.conflicts:
            problem = self._problem(path, lsig, upload=True) or self._problem(path, rsig, upload=False)
            if problem:
                run.skip(path, problem, lsig)
            else:
                copies.append((path, lsig, False, rsig))
        run.total = sum(lsig[0] + (theirs[0] if theirs else 0) for _, lsig, _, theirs in copies)
        for path, lsig, blind, theirs in copies:
            run.check()
            if blind:  # the host's state is unknown: never overwrite a change made there
                with _remote_errors(self.host, path, "checking"):
                    there = host.lstat(path)
                if there == _DIR:
                    run.skip(path, f"it is a directory on {self.host}", lsig)
                    continue
                if there is not None and not host.unchanged(base.remote.get(path), there):
                    digest = self._same_content(run, path, lsig, there)  # changed there too
                    if digest is not None:
                        base.set(path, lsig, there, digest)
                        continue
                    theirs = there
            if theirs is not None:
                saved = self._save_theirs(run, path, theirs)
                if saved is None:
                    continue
                report.conflicts.append((path, saved))
                self._pending.add(saved)
            self._upload(run, path, lsig)

    def _remote_clash(self, run: _Run, path: str, state: dict[str, Sig]) -> str | None:
        if path in state:
            return None
        if path in run.remote_dirs(state):
            return f"it is a file here and a directory on {self.host}"
        for folder in _ancestors(path):
            if folder in state:
                return f"{folder} is not a directory on {self.host}"
        return None

    def _upload(self, run: _Run, path: str, lsig: Sig) -> None:
        host = run.host
        digest = None
        if lsig[3] == "l":
            with _remote_errors(self.host, path, "creating symlink"):
                rsig = host.put_link(path, lsig[4])
        else:
            try:
                with _local_errors(path, "reading"):
                    f = open(os.path.join(self.local_root, path), "rb")  # noqa: SIM115
            except FileSyncError as exc:
                if isinstance(exc.__cause__, FileNotFoundError):
                    return  # deleted since the scan; the journal has it
                raise
            src = _LocalFile(f, path)
            with f, _remote_errors(self.host, path, "copying"):
                rsig = host.put_file(src, path, lsig, run.ticker(path))
            run.report.bytes += rsig[0]
            digest = src.digest
        run.base.set(path, lsig, rsig, digest)
        run.report.uploaded.append(path)
        if run.remote_view is not None:
            run.remote_view[path] = rsig

    def _apply_pull(self, run: _Run, plan: _Plan, remote_now: dict[str, Sig]) -> None:
        base, report = run.base, run.report
        for path in plan.forget:
            base.drop(path)
        for path, lsig, rsig, digest in plan.adopt:
            base.set(path, lsig, rsig, digest)
        for path in plan.keep:
            base.remote.pop(path, None)
            base.dirty = True
            self._pending.add(path)
        emptied: set[str] = set()
        for path, lsig in plan.delete:
            run.check()
            where = os.path.join(self.local_root, path)
            with _local_errors(path, "deleting"):
                if not _same(_lstat(where), lsig):  # changed here meanwhile: keep it
                    base.remote.pop(path, None)
                    base.dirty = True
                    self._pending.add(path)
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.remove(where)
            base.drop(path)
            report.deleted_local.append(path)
            emptied.add(posixpath.dirname(path))

        def rmdir(folder: str) -> None:
            os.rmdir(os.path.join(self.local_root, folder))
            run.local_dirs.pop(folder, None)

        self._prune_dirs(emptied, lambda d: d not in run.remote_dirs(remote_now), rmdir)

        copies = []
        for path, rsig, lsig in plan.copy:
            problem = self._problem(path, rsig, upload=False)
            if problem:
                run.skip(path, problem, rsig)
            else:
                copies.append((path, rsig, lsig, False))
        for path, lsig, rsig in plan.conflicts:
            problem = self._problem(path, rsig, upload=False)
            if problem:
                run.skip(path, problem, rsig)
            else:
                copies.append((path, rsig, lsig, True))
        run.total = sum(rsig[0] for _, rsig, _, _ in copies)
        for path, rsig, lsig, conflict in copies:
            run.check()
            if conflict:
                saved = self._save_theirs(run, path, rsig)
                if saved is not None:
                    base.remote[path] = rsig
                    base.dirty = True
                    self._pending.update((path, saved))
                    report.conflicts.append((path, saved))
            else:
                self._download(run, path, rsig, lsig)

    def _download(self, run: _Run, path: str, rsig: Sig, expected: Sig | None) -> None:
        problem = self._make_local_dirs(run, posixpath.dirname(path))
        if problem:
            run.skip(path, problem, rsig)
            return
        temp, digest = self._fetch(run, path, rsig)
        if temp is None:
            return
        where = os.path.join(self.local_root, path)
        with _local_errors(path, "writing"):
            try:
                if not _same(_lstat(where), expected):  # changed here meanwhile: keep it
                    saved = self._place_beside(run, path, temp)
                    run.base.remote[path] = rsig
                    run.base.dirty = True
                    self._pending.update((path, saved))
                    run.report.conflicts.append((path, saved))
                    return
                os.replace(temp, where)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise
            lsig = _lstat(where)
        if isinstance(lsig, list):
            run.base.set(path, lsig, rsig, digest)
        run.report.downloaded.append(path)
        run.report.bytes += rsig[0]

    def _save_theirs(self, run: _Run, path: str, rsig: Sig) -> str | None:
        """Copy the host's version of ``path`` beside the local one; return its name."""
        temp, _ = self._fetch(run, path, rsig)
        if temp is None:
            return None
        with _local_errors(path, "saving the host's version of"):
            try:
                return self._place_beside(run, path, temp)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(temp)
                raise

    def _place_beside(self, run: _Run, path: str, temp: str) -> str:
        base = run.base

        def taken(name: str) -> bool:
            return (
                name in base.local
                or name in base.remote
                or os.path.lexists(os.path.join(self.local_root, name))
            )

        saved = conflict_name(path, self.host, taken)
        os.rename(temp, os.path.join(self.local_root, saved))
        run.report.bytes += os.lstat(os.path.join(self.local_root, saved)).st_size
        return saved

    def _fetch(self, run: _Run, path: str, rsig: Sig) -> tuple[str | None, str | None]:
        """Copy the host's ``path`` to a temporary file beside the local one (absolute
        path), with the host's mode and mtime; None if it vanished from the host.
        Also the content hash of what came (None for a symlink)."""
        folder = os.path.dirname(os.path.join(self.local_root, path))
        temp = os.path.join(folder, PART_PREFIX + secrets.token_hex(8))
        if rsig[3] == "l":
            with _local_errors(path, "creating symlink"):
                os.symlink(rsig[4], temp)
            return temp, None
        try:
            with _local_errors(path, "writing"):
                f = os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            with f:
                dst = _LocalFile(f, path)
                try:
                    with _remote_errors(self.host, path, "copying"):
                        run.host.read(path, dst, run.ticker(path))
                except TransferError as exc:
                    if isinstance(exc.__cause__, FileNotFoundError):
                        os.remove(temp)
                        return None, None  # gone since the scan
                    raise
            with _local_errors(path, "writing"):
                os.chmod(temp, rsig[2])
                os.utime(temp, ns=(rsig[1], rsig[1]))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
        return temp, dst.digest

    def _prune_dirs(
        self, folders: set[str], gone_there: Callable[[str], bool], rmdir: Callable[[str], None]
    ) -> None:
        """Remove directories emptied by deletions, up the tree, while the other side
        has no such directory either. Failures (not empty) stop quietly."""
        tried: set[str] = set()
        for folder in sorted(folders, key=lambda d: -d.count("/")):
            while folder and folder not in tried and gone_there(folder):
                tried.add(folder)
                try:
                    rmdir(folder)
                except (OSError, SSHException):
                    break
                folder = posixpath.dirname(folder)

    # -- the base on disk ----------------------------------------------------------

    def _load(self, remote_root: str) -> _Base:
        remote_root = remote_root.rstrip("/") or "/"
        if self._base is not None and self._base.remote_root == remote_root:
            return self._base
        base = _Base(remote_root)
        try:
            data = json.loads(self.state_path.read_text())
            if (
                data.get("version") == _STATE_VERSION
                and data.get("local_root") == self.local_root
                and data.get("remote_root") == remote_root
            ):
                base = _Base(remote_root, data["local"], data["remote"], bool(data.get("complete")))
                base.hashes = dict(data.get("hashes", {}))  # a state without them: none known
                base.racy = set(data.get("racy", ())) & set(base.local)
                base.remote_racy = set(data.get("remote_racy", ())) & set(base.remote)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable file sync state %s: %s", self.state_path, exc)
        self._base = base
        return base

    def _save(self, base: _Base) -> None:
        if not base.dirty:
            return
        data = {
            "version": _STATE_VERSION,
            "host": self.host,
            "local_root": self.local_root,
            "remote_root": base.remote_root,
            "complete": base.complete,
            "local": base.local,
            "remote": base.remote,
            "hashes": base.hashes,
            "racy": sorted(base.racy),
            "remote_racy": sorted(base.remote_racy),
        }
        temp = self.state_path.with_name(f"{self.state_path.name}.{secrets.token_hex(4)}.tmp")
        with _local_errors(str(self.state_path), "saving the sync state"):
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                temp.write_text(json.dumps(data, separators=(",", ":")))
                os.replace(temp, self.state_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise
        base.dirty = False


def _sub_prune(prune: list[str], folder: str) -> list[str]:
    """``prune`` for a scan rooted at ``folder`` (relative to the root)."""
    inside = folder + "/"
    out = []
    for entry in prune:
        if "/" not in entry:
            out.append(entry)
        elif entry.lstrip("/").startswith(inside):
            out.append("/" + entry.lstrip("/")[len(inside) :])
    return out
