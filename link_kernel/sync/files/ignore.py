"""What never moves: the default exclusions, ``.linkignore``, and a folder too big to sync."""

from __future__ import annotations

import fnmatch
import os

import pathspec

from ...errors import FileSyncError
from .signatures import PART_PREFIX, _size

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
