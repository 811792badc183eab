"""What git runs: the merge driver and the textconv (see :mod:`.install`).

The merge driver's exit status is git's contract: 0 merged cleanly, 1 merged with
conflicts (the result, with its markers, is in the ``%A`` file), and :data:`CRASHED`
(above 128) when the driver itself failed: an unreadable side, a bug. git then stops
instead of taking the ``%A`` file, which is left as it was, for a merge. The result is
validated as nbformat before it replaces ``%A`` (atomically: a temporary file beside it,
then a rename).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TextIO

from .cells import NotebookFormatError, dumps, loads, validate
from .merge import merge_notebooks
from .textconv import render

CLEAN, CONFLICT = 0, 1
#: Above 128, as git expects of a driver that crashed, so it is never taken for a conflict.
CRASHED = 129


def merge_driver(base: str, ours: str, theirs: str, path: str, *, err: TextIO = sys.stderr) -> int:
    """Merge the files ``base`` (``%O``), ``ours`` (``%A``, the result goes there) and
    ``theirs`` (``%B``) of the notebook ``path`` (``%P``); return the exit status."""
    try:
        sides = []
        for label, file in (("base", base), ("ours", ours), ("theirs", theirs)):
            text = Path(file).read_text(encoding="utf-8")
            sides.append(loads(text, f"{label} of {path}") if text.strip() else None)
        if sides[1] is None or sides[2] is None:
            msg = f"one side of {path} is empty: not a notebook to merge"
            raise NotebookFormatError(msg)
        if sides[0] is None:  # added on both sides: an empty base
            sides[0] = {**sides[1], "cells": []}
        result = merge_notebooks(*sides)
        validate(result.notebook)
        _replace(Path(ours), dumps(result.notebook))
        for conflict in result.conflicts:
            print(f"link-kernel: {path}: {conflict}", file=err)
        if result.conflicts:
            print(f"link-kernel: {path}: {len(result.conflicts)} conflict(s); resolve them, "
                  "then 'git add' the notebook", file=err)
        return CONFLICT if result.conflicts else CLEAN
    except BaseException as exc:  # a crash must never pass for a merge
        print(f"link-kernel: the notebook merge driver failed on {path}: {exc}", file=err)
        print(f"link-kernel: {path} was left as it was (our side); nothing was merged", file=err)
        if not isinstance(exc, NotebookFormatError):
            traceback.print_exc(file=err)
        return CRASHED


def textconv(path: str, *, out: TextIO = sys.stdout) -> int:
    """Print the notebook at ``path`` as cells; a file that is no notebook, as it is."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        notebook = loads(text, path)
    except NotebookFormatError:
        out.write(text)
        return 0
    out.write(render(notebook))
    return 0


def _replace(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".merge", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
