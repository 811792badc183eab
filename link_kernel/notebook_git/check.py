"""After a merge: is the notebook's pipeline still one that can run?

Pure: no I/O. The same checks the kernel makes before a component runs
(:mod:`link_kernel.pipeline.graph`): every routing line parses, names are unique,
parents are known, no cycle. Each problem is one sentence naming what to fix.
"""

from __future__ import annotations

from ..errors import LinkError
from ..pipeline.component import Component
from ..pipeline.graph import Graph
from .cells import Notebook, source_of, split_route


def pipeline_problems(notebook: Notebook) -> list[str]:
    """What keeps ``notebook``'s pipeline from running; empty when nothing does."""
    problems: list[str] = []
    components: list[Component] = []
    for index, cell in enumerate(notebook["cells"]):
        if cell.get("cell_type") != "code":
            continue
        source = source_of(cell)
        if split_route(source)[0] is None:
            continue
        try:
            component = Component.from_cell(source, cell.get("id"))
        except LinkError as exc:
            problems.append(f"cell {index + 1}: {exc.message}")
            continue
        if component is not None:
            components.append(component)
    try:
        Graph.of_notebook(components).order()
    except LinkError as exc:
        problems.append(f"the pipeline breaks: {exc.message}")
    return problems
