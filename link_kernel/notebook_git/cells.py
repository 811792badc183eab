"""A notebook's cells as git's tools need them: sources, routing lines by key, JSON text.

Pure: no I/O. The merge (:mod:`.merge`) and the diff (:mod:`.textconv`) read notebooks
through :func:`loads` and write them through :func:`dumps`; the routing line of a cell is
split into its keys by :class:`RouteLine`, the routing grammar's (:mod:`link_kernel.routing`)
tokens without its checks, so a line the grammar would refuse still merges key by key and
the kernel reports it when the cell runs.

:class:`RouteLine` keys: ``target`` (the chain as written, ``gpu|local``), ``name``,
``after`` (the parents, a list) and every other option (``keep`` is the value ``True``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ..routing import route_tokens

Notebook = dict[str, Any]
NbCell = dict[str, Any]


class NotebookFormatError(ValueError):
    """The text is not a notebook this module can merge (nbformat 4 JSON)."""


def loads(text: str, label: str = "notebook") -> Notebook:
    """The notebook ``text`` holds; NotebookFormatError if it is not nbformat 4 JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{label} is not JSON: {exc}"
        raise NotebookFormatError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        msg = f"{label} is not a Jupyter notebook (no list of cells)"
        raise NotebookFormatError(msg)
    if data.get("nbformat") != 4:
        msg = f"{label} is nbformat {data.get('nbformat')!r}; only nbformat 4 merges"
        raise NotebookFormatError(msg)
    for index, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str):
            msg = f"{label}: cell {index + 1} is not a cell"
            raise NotebookFormatError(msg)
    return data


def dumps(notebook: Notebook) -> str:
    """``notebook`` as nbformat writes it (sorted keys, one-space indent, source as lines)."""
    for cell in notebook.get("cells", []):
        cell["source"] = split_lines(source_of(cell))
    return json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def validate(notebook: Notebook) -> None:
    """Raise NotebookFormatError unless ``notebook`` is valid nbformat (nbformat's own
    schema when it is installed, else the structure this package relies on)."""
    ids = [cell.get("id") for cell in notebook["cells"] if "id" in cell]
    if len(ids) != len(set(ids)):
        msg = "two cells share one id"
        raise NotebookFormatError(msg)
    nbformat = _nbformat()
    if nbformat is None:
        return
    try:
        nbformat.validate(nbformat.from_dict(json.loads(json.dumps(notebook))))
    except nbformat.ValidationError as exc:
        msg = f"the merged notebook is not valid nbformat: {exc.message}"
        raise NotebookFormatError(msg) from exc


def _nbformat():
    """nbformat, or None when it is not installed, imported without rfc3987_syntax.

    nbformat imports jsonschema, and jsonschema imports rfc3987_syntax where it is
    installed (JupyterLab's dependencies bring it) to offer an ``iri`` format check;
    building that package's grammar takes over a second, and git pays it on every
    notebook it merges. nbformat's validation checks no formats, so the import is
    held back while jsonschema loads; later imports of it elsewhere still work.
    """
    if "nbformat" in sys.modules:
        return sys.modules["nbformat"]
    held = "rfc3987_syntax" not in sys.modules
    if held:
        sys.modules["rfc3987_syntax"] = None  # an import of it raises ImportError
    try:
        import nbformat
    except ImportError:
        return None
    finally:
        if held and sys.modules.get("rfc3987_syntax", False) is None:
            del sys.modules["rfc3987_syntax"]
    return nbformat


def source_of(cell: NbCell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def split_lines(text: str) -> list[str]:
    """``a\\nb`` -> ``["a\\n", "b"]``, as nbformat stores multi-line strings."""
    return text.splitlines(keepends=True)


def split_route(source: str) -> tuple[str | None, str]:
    """``(routing line without its ending or None, the rest)`` of a cell's source."""
    first, newline, rest = source.partition("\n")
    line = first.rstrip("\r")
    if route_tokens(line) is not None:
        return line, rest
    return None, source


def join_route(line: str | None, body: str) -> str:
    if line is None:
        return body
    return f"{line}\n{body}" if body else line


@dataclass
class RouteLine:
    """A routing line as ordered keys (see the module docstring)."""

    keys: dict[str, Any] = field(default_factory=dict)
    line: str | None = None

    @classmethod
    def of(cls, line: str | None) -> RouteLine:
        tokens = route_tokens(line) if line is not None else None
        if tokens is None:
            return cls()
        keys: dict[str, Any] = {}
        if tokens and "=" not in tokens[0] and tokens[0] != "keep":
            keys["target"] = tokens.pop(0)
        for token in tokens:
            key, eq, value = token.partition("=")
            if key == "after":
                keys[key] = [part for part in value.split(",") if part]
            else:
                keys[key] = value if eq else True
        return cls(keys, line)

    @property
    def name(self) -> str | None:
        value = self.keys.get("name")
        return value if isinstance(value, str) else None

    @property
    def parents(self) -> list[str]:
        return list(self.keys.get("after", []))

    def render(self) -> str | None:
        """The line these keys make: the original when they are unchanged."""
        if self.line is not None and RouteLine.of(self.line).keys == self.keys:
            return self.line
        if not self.keys:
            return None
        words = []
        if "target" in self.keys:
            words.append(str(self.keys["target"]))
        for key, value in self.keys.items():
            if key == "target":
                continue
            if key == "after":
                if value:
                    words.append("after=" + ",".join(value))
            elif value is True:
                words.append(key)
            else:
                words.append(f"{key}={value}")
        return "# link: " + " ".join(words)


def route_of(cell: NbCell) -> RouteLine:
    """The routing keys of a code cell (none for other cells)."""
    if cell.get("cell_type") != "code":
        return RouteLine()
    return RouteLine.of(split_route(source_of(cell))[0])


def component_name(cell: NbCell) -> str | None:
    return route_of(cell).name
