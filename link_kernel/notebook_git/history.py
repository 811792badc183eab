"""``link-kernel git log NOTEBOOK``: what each commit did to the notebook's components.

Reads ``git log`` and ``git show COMMIT:PATH`` (argv lists, no shell); compares each
commit's notebook with its first parent's. A component is matched across the two by its
cell id, else by its name: added, removed, renamed (its cell id kept, its name changed),
re-parented (``after=`` changed) or edited (its code's hash changed; the routing line
aside, as the cache sees it).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GitSetupError, LinkError
from ..pipeline.component import Component
from .cells import NotebookFormatError, loads, source_of, split_route


@dataclass
class Change:
    """One commit's changes to the components, one line each."""

    commit: str
    date: str
    author: str
    subject: str
    lines: list[str] = field(default_factory=list)


def components_of(text: str) -> list[Component]:
    """The components a notebook's JSON text declares (malformed cells are skipped)."""
    if not text.strip():
        return []
    try:
        notebook = loads(text)
    except NotebookFormatError:
        return []
    found = []
    for cell in notebook["cells"]:
        source = source_of(cell)
        if cell.get("cell_type") != "code" or split_route(source)[0] is None:
            continue
        try:
            component = Component.from_cell(source, cell.get("id"))
        except LinkError:
            continue
        if component is not None:
            found.append(component)
    return found


def compare(old: list[Component], new: list[Component]) -> list[str]:
    """What changed from ``old`` to ``new``, one line per change."""
    lines: list[str] = []
    by_id = {c.cell_id: c for c in old if c.cell_id}
    by_name = {c.name: c for c in old}
    matched: set[str] = set()
    for component in new:
        before = by_id.get(component.cell_id) if component.cell_id else None
        if before is None or before.name in matched:
            before = by_name.get(component.name)
        if before is None or before.name in matched:
            lines.append(f"added {component.name}" + _after(component))
            continue
        matched.add(before.name)
        if before.name != component.name:
            lines.append(f"renamed {before.name} -> {component.name}")
        if set(before.parents) != set(component.parents):
            lines.append(
                f"re-parented {component.name}: {_names(before.parents)} -> {_names(component.parents)}"
            )
        if before.code_hash != component.code_hash:
            lines.append(f"edited {component.name}")
    lines.extend(f"removed {c.name}" for c in old if c.name not in matched)
    return lines


def log(notebook: Path, cwd: Path) -> list[Change]:
    """The commits that touched ``notebook``, newest first, with their component changes."""
    top = Path(_git(["rev-parse", "--show-toplevel"], cwd).strip())
    path = notebook.resolve().relative_to(top.resolve()).as_posix()
    out = _git(["log", "--format=%H%x1f%h%x1f%ad%x1f%an%x1f%s", "--date=short", "--", path], top)
    changes = []
    for record in out.splitlines():
        full, short, date, author, subject = record.split("\x1f", 4)
        new = _show(top, full, path)
        old = _show(top, f"{full}^", path)
        change = Change(short, date, author, subject, compare(components_of(old), components_of(new)))
        changes.append(change)
    return changes


def format_log(changes: list[Change]) -> str:
    parts = []
    for change in changes:
        parts.append(f"{change.commit} {change.date} {change.author}  {change.subject}\n")
        for line in change.lines or ["(no component changed)"]:
            parts.append(f"    {line}\n")
    return "".join(parts)


def _after(component: Component) -> str:
    return f" (after {_names(component.parents)})" if component.parents else ""


def _names(names: tuple[str, ...]) -> str:
    return ",".join(names) if names else "(none)"


def _show(top: Path, rev: str, path: str) -> str:
    done = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=top, capture_output=True, check=False
    )
    return done.stdout.decode("utf-8", errors="replace") if done.returncode == 0 else ""


def _git(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        msg = "git is not on PATH"
        raise GitSetupError(msg) from exc
    if done.returncode != 0:
        msg = f"'git {' '.join(args)}' failed: {done.stderr.strip()}"
        raise GitSetupError(msg)
    return done.stdout
