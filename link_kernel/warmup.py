"""What a saved notebook tells the kernel at its start: which hosts it routes to, and
which modules its cells import.

A notebook opened in JupyterLab (``JPY_SESSION_NAME``) or VS Code already says where
its cells go. The kernel reads it once, when it starts, and has each host it routes
to start its fork server with those modules imported, so the notebook's first
routed cell does not wait for a kernel start and ``import sklearn`` on the host
(a second or more) while the same import was paid locally cells ago. Nothing is
run that the notebook does not run itself: the notebook's own modules (files in its
folder) are never imported ahead, nor anything the fork server refuses (see
``bootstrap.NOT_AHEAD``); a host that cannot be reached is tried again by the cell.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from . import routing
from .errors import LinkError

#: At most this many modules are imported ahead (as for the namespace's modules).
MODULES_MAX = 24

_IMPORT = re.compile(
    r"^[ \t]*(?:import[ \t]+(?P<names>[\w. \t,]+)|from[ \t]+(?P<module>[\w.]+)[ \t]+import\b)",
    re.MULTILINE,
)


def cell_sources(data: object) -> list[str]:
    """The code cells' sources of a parsed notebook (empty if it is none)."""
    cells = data.get("cells") if isinstance(data, dict) else None
    out = []
    for cell in cells if isinstance(cells, list) else ():
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            out.append("".join(source) if isinstance(source, list) else str(source))
    return out


def routed_hosts(sources: Iterable[str], known: Iterable[str]) -> list[str]:
    """The known remote hosts the cells route to, first choices only, in order of
    appearance: a cell's routing comment (``gpu|local``: gpu) and ``%link default``."""
    known = set(known) - {routing.LOCAL}
    hosts: dict[str, None] = {}
    for source in sources:
        try:
            cell = routing.parse(source)
        except LinkError:  # the cell says what is wrong when it runs
            continue
        chains = [cell.route.targets]
        for command in cell.commands:
            if command.name == "default" and command.args:
                chains.append(routing.parse_targets(command.args[0]))
        for chain in chains:
            if chain and chain[0] in known:
                hosts[chain[0]] = None
    return list(hosts)


def imported_modules(sources: Iterable[str], folder: Path) -> list[str]:
    """The modules the cells import, in order, without the notebook's own (a module
    or package of that name in ``folder``) and relative imports."""
    found: dict[str, None] = {}
    for source in sources:
        names = []
        for match in _IMPORT.finditer(source):
            if match.group("module"):
                names.append(match.group("module"))
                continue
            for part in match.group("names").split(","):
                words = part.split()
                if words:
                    names.append(words[0])
        for name in names:
            top = name.partition(".")[0]
            if not name or not top.isidentifier() or top == "__future__" or name in found:
                continue
            if (folder / f"{top}.py").exists() or (folder / top).is_dir():
                continue
            found[name] = None
    return list(found)[:MODULES_MAX]


def read(path: Path) -> list[str]:
    """The code cells of the notebook file at ``path`` (empty if it cannot be read)."""
    try:
        return cell_sources(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []


__all__ = ["MODULES_MAX", "cell_sources", "imported_modules", "read", "routed_hosts"]
