"""The scan of a tree (run locally and, from :data:`SCAN_SOURCE`, on hosts) and the
name a conflicting copy is saved under. Standard library only."""

from __future__ import annotations

import inspect
import posixpath
import re
from collections.abc import Callable, Iterable

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
