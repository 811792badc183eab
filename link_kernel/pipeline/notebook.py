"""The components a saved notebook declares, so a restarted kernel knows its pipeline.

Reads an ``.ipynb`` file (nbformat 4; JSON, no nbformat import needed) and gives a
component for each code cell whose routing comment has ``name=``, with the cell's id
(nbformat 4.5), so a frontend that sends the cell id in the execute request's metadata
(JupyterLab, nbclient) matches the saved cell and replaces it when run. Finding the
notebook's path (``JPY_SESSION_NAME``, VS Code's ``__vsc_ipynb_file__``) is the kernel's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LinkError
from .component import Component
from .graph import Graph


@dataclass
class Saved:
    """A saved notebook's components, and the cells whose routing comment is malformed
    (``problems``: cell label -> message; they are reported when they run)."""

    components: list[Component] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)

    def graph(self) -> Graph:
        """The notebook's graph; DuplicateComponentError if two cells share a name."""
        return Graph.of_notebook(self.components)


def read_notebook(path: str | Path) -> Saved:
    """The components of the notebook at ``path``.

    Raises OSError if it cannot be read and ValueError if it is not a notebook.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return notebook_components(data, str(path))


def notebook_components(data: object, where: str = "the notebook") -> Saved:
    """The components of a notebook's parsed JSON ``data``; ValueError if it is none."""
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        msg = f"{where} is not a Jupyter notebook (no list of cells)"
        raise ValueError(msg)
    saved = Saved()
    for index, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        if "link" not in source.split("\n", 1)[0]:
            continue
        cell_id = cell.get("id") or None
        try:
            component = Component.from_cell(source, cell_id)
        except LinkError as exc:
            saved.problems[f"cell {cell_id or index + 1}"] = exc.message
            continue
        if component is not None:
            saved.components.append(component)
    return saved
