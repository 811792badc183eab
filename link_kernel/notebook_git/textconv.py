"""A notebook as text for ``git diff``, ``git log -p`` and ``git show`` (a textconv).

Pure: no I/O. Each cell is a header line (``# ---- cell 3 [code] id=abcd``), then its
source as written, routing line first; a code cell's outputs are one summary line. JSON
punctuation, execution counts and output data stay out of the diff.
"""

from __future__ import annotations

from .cells import Notebook, source_of


def render(notebook: Notebook) -> str:
    """``notebook`` as the diff shows it."""
    parts: list[str] = []
    for index, cell in enumerate(notebook["cells"], 1):
        header = f"# ---- cell {index} [{cell.get('cell_type', '?')}]"
        if cell.get("id"):
            header += f" id={cell['id']}"
        parts.append(header + "\n")
        source = source_of(cell)
        if source:
            parts.append(source if source.endswith("\n") else source + "\n")
        outputs = cell.get("outputs") or []
        if outputs:
            kinds = ", ".join(_output_kind(output) for output in outputs)
            parts.append(f"# ---- outputs: {kinds}\n")
    return "".join(parts)


def _output_kind(output: dict) -> str:
    kind = output.get("output_type", "?")
    if kind == "stream":
        return f"stream {output.get('name', '')}".rstrip()
    if kind == "error":
        return f"error {output.get('ename', '')}".rstrip()
    return kind
