"""Signatures of files and what is judged from them; shared by every part of the sync.

A *signature* describes one file: ``[size, mtime_ns, mode, "f"]`` for a regular
file and ``[0, mtime_ns, mode, "l", target]`` for a symlink. This module holds
what compares them (and when they cannot be trusted: :data:`RACY_NS`), the
content hash, and path helpers. No transfers, no state.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable

#: Files are written under this prefix beside their target, then renamed.
#: Scans and the journal skip such names (a crash can leave one behind).
PART_PREFIX = ".link-part-"


_CHUNK = 1024 * 1024

#: A file whose mtime is this close to the moment its state was recorded (or
#: later) is *racy*: a write in the same timestamp granule would leave size and
#: mtime as they were, so its content is checked by hash at the next sync. Two
#: seconds cover file systems that keep whole seconds (ext3, HFS+, SFTP's utime)
#: or two (FAT), and a writer whose clock is a little ahead.
RACY_NS = 2 * 10**9

#: The content hash recorded for each synced file (``hashlib`` name).
HASH = "sha256"

Sig = list  # a signature, see the module docstring


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
