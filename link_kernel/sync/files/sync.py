"""FileSync: the two-way sync of the notebook folder with one host (see the package docstring)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import json
import logging
import os
import posixpath
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paramiko.ssh_exception import SSHException

from ...errors import FileSyncError, TransferError
from .base import _Base, _Plan, _Run
from .bundle import Opener, send_small
from .ignore import Ignore
from .journal import Journal
from .report import SyncReport
from .scan import conflict_name, scan_tree
from .signatures import (
    _BLOCKED,
    _DIR,
    _HOST_WINDOW,
    PART_PREFIX,
    Sig,
    _ancestors,
    _digest_file,
    _escapes,
    _lstat,
    _racy,
    _same,
    _size,
)
from .transfers import _host_for, _local_errors, _LocalFile, _remote_errors

log = logging.getLogger(__name__)

_CANCEL_WAIT = 10.0
_STATE_VERSION = 1


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

    ``opener``, if set, runs a python on the host (:data:`.bundle.Opener`): then
    many small files go in one bundle.
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
        self.opener: Opener | None = None
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
        """The host's files whose recorded state was racy: the host's scan after the
        next cell hashes them (:func:`hash_racy`), which covers any write since the
        state was recorded. Those whose mtime is now out of the window get that check
        once more and no other: no later write can land in their granule."""
        base = self._base
        if base is None or self._lock.locked():
            return []
        now = time.time_ns()
        paths = sorted(p for p in base.remote_racy if p in base.remote)
        for path in paths:
            if not _racy(base.remote[path], now, _HOST_WINDOW):
                base.remote_racy.discard(path)
                base.dirty = True
        return paths

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
        for path, lsig, blind, theirs in send_small(run, copies, known, self.local_root, self._uploaded):
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
            digest = src.digest
        self._uploaded(run, path, lsig, rsig, digest)

    def _uploaded(self, run: _Run, path: str, lsig: Sig, rsig: Sig, digest: str | None) -> None:
        if digest is not None:
            run.report.bytes += rsig[0]
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
