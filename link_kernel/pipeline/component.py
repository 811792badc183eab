"""One cell as a pipeline component: what its routing comment declares, and its code.

Pure: no I/O. The kernel calls :meth:`Component.from_cell` on each cell it runs (and on
the cells of the saved notebook); a cell without ``name=`` is no component.

The component's :attr:`~Component.code` is the cell with its routing comment blanked
(``%link`` lines are blanked by the routing grammar already), so its line numbers are
the cell's, and :attr:`~Component.code_hash` does not change when only the routing
comment does: moving a component to another host keeps its cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .. import routing


@dataclass(frozen=True)
class Component:
    """A named cell with parents.

    ``targets`` is empty for the notebook's default target. ``reads``, ``binds`` and
    ``deletes`` are the module-level names the code reads, may bind and surely deletes
    (see :mod:`link_kernel.sync.analysis`);
    empty when the code does not parse, which the kernel reports when it runs it.
    ``source`` is the cell as the frontend sent it: what the kernel runs.
    """

    name: str
    parents: tuple[str, ...] = ()
    code: str = ""
    targets: tuple[str, ...] = ()
    cache: bool = True
    cell_id: str | None = None
    outputs: tuple[str, ...] | None = None
    reads: frozenset[str] = frozenset()
    binds: frozenset[str] = frozenset()
    deletes: frozenset[str] = frozenset()
    source: str = field(default="", compare=False)

    @classmethod
    def from_cell(cls, source: str, cell_id: str | None = None) -> Component | None:
        """The component ``source`` declares, or None if its routing comment has no name=.

        Raises RoutingError for a malformed routing comment, as :func:`routing.parse` does.
        """
        cell = routing.parse(source)
        route = cell.route
        if route.name is None:
            return None
        code = _blank_first_line(cell.code)
        reads, binds, deletes = _names(cell.code)
        return cls(
            name=route.name,
            parents=route.after,
            code=code,
            targets=route.targets,
            cache=route.cache,
            cell_id=cell_id or None,
            outputs=route.outputs,
            reads=reads,
            binds=binds,
            deletes=deletes,
            source=source,
        )

    @property
    def code_hash(self) -> str:
        """The hash of the code: line endings and trailing blank space do not count."""
        text = self.code.replace("\r\n", "\n").replace("\r", "\n").lstrip("\n").rstrip()
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def label(self) -> str:
        """How an error names the cell: its id, else its first line of code."""
        if self.cell_id:
            return f"cell {self.cell_id}"
        for line in self.code.splitlines():
            if line.strip():
                text = line.strip()
                return repr(text if len(text) <= 40 else text[:37] + "...")
        return "an empty cell"


def _blank_first_line(code: str) -> str:
    """``code`` with its first line (the routing comment) emptied, its line ending kept."""
    lines = code.splitlines(keepends=True)
    if not lines:
        return code
    first = lines[0]
    return first[len(first.rstrip("\r\n")) :] + "".join(lines[1:])


def _names(code: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    from ..sync.analysis import analyze

    try:
        names = analyze(code)
    except SyntaxError:
        return frozenset(), frozenset(), frozenset()
    return names.reads, names.binds, names.deletes
