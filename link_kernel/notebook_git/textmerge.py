"""Three-way merge of one cell's text, by ``git merge-file --diff3``.

git is there whenever its merge driver runs, and its merge is the one users know: the same
hunks, the same ``<<<<<<<`` / ``|||||||`` / ``=======`` / ``>>>>>>>`` markers. The texts go
through temporary files that are removed before this returns.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass


class TextMergeError(RuntimeError):
    """``git merge-file`` failed (not a conflict: it could not merge at all)."""


@dataclass(frozen=True)
class Merged:
    text: str
    conflicts: int


def merge3(base: str, ours: str, theirs: str, labels: tuple[str, str, str]) -> Merged:
    """``ours`` and ``theirs`` merged against ``base``; conflicts as marked hunks.

    ``labels`` name ours, base and theirs in the markers. Texts that need no merge
    (a side unchanged, or both the same) do not start git.
    """
    if ours == theirs or theirs == base:
        return Merged(ours, 0)
    if ours == base:
        return Merged(theirs, 0)
    with tempfile.TemporaryDirectory(prefix="link-merge-") as folder:
        paths = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8", newline="") as file:
                file.write(_ended(text))
            paths.append(path)
        argv = ["git", "merge-file", "-p", "--diff3"]
        for label in labels:
            argv += ["-L", label]
        done = subprocess.run(argv + paths, capture_output=True, check=False)
    if done.returncode < 0 or done.returncode > 127:
        msg = f"git merge-file failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
        raise TextMergeError(msg)
    text = done.stdout.decode("utf-8")
    if not (ours.endswith("\n") or theirs.endswith("\n")) and text.endswith("\n"):
        text = text[:-1]
    return Merged(text, done.returncode)


def _ended(text: str) -> str:
    """A last line with its newline, so git's merge sees whole lines (cells often lack one)."""
    return text if not text or text.endswith("\n") else text + "\n"
