"""Moving bytes: local files that count and hash what goes through them, and the
host's work directory reached through fsspec (local for the process host, SFTP)."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import posixpath
import secrets
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem
from paramiko.ssh_exception import SSHException

from ...errors import FileSyncError, TransferError
from .signatures import _CHUNK, _DIR, HASH, PART_PREFIX, Sig, _ancestors, _lstat, _same


def _part_name(relpath: str) -> str:
    return posixpath.join(posixpath.dirname(relpath), PART_PREFIX + secrets.token_hex(8))


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


def increments(tick: Callable[[int], None]) -> Callable[[int, int], None]:
    """paramiko's transfer ``callback(so_far, total)`` as byte increments to ``tick``."""
    done = 0

    def callback(so_far: int, total: int) -> None:
        nonlocal done
        tick(so_far - done)
        done = so_far

    return callback


def _copy(src: Any, dst: Any, tick: Callable[[int], None]) -> None:
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return
        dst.write(chunk)
        tick(len(chunk))


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

    def write(self, src, relpath, size, tick):
        self.ftp.putfo(src, self.path(relpath), size, callback=increments(tick), confirm=False)

    def read(self, relpath, dst, tick):
        self.ftp.getfo(self.path(relpath), dst, callback=increments(tick))

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
