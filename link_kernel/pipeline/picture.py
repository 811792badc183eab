"""``%link pipeline``: the graph as a picture (Mermaid) and as a text list, with states.

Pure: no I/O. :meth:`link_kernel.pipeline.runner.Runner.states` gives the rows; this
module draws them. Mermaid goes out in ``text/markdown`` (JupyterLab 4 and Notebook 7
render a ```` ```mermaid ```` block), the list in ``text/plain`` for every other frontend.

A component's state is one of :data:`STATES`:

- ``fresh``: the notebook holds the result of its current code and inputs;
- ``cached``: the cache holds that result (it is restored, not run, when needed);
- ``stale``: it ran before, but its code, a parent or an input changed since;
- ``failed``: its last run raised;
- ``never run``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .units import format_seconds

STATES = ("fresh", "cached", "stale", "failed", "never run")

#: Node colours (fill, stroke) per state, readable on light and dark themes.
_COLOURS = {
    "fresh": ("#c8e6c9", "#2e7d32"),
    "cached": ("#bbdefb", "#1565c0"),
    "stale": ("#fff3c4", "#b28704"),
    "failed": ("#ffcdd2", "#c62828"),
    "never run": ("#eeeeee", "#757575"),
    "unknown": ("#ffffff", "#c62828"),
}


@dataclass(frozen=True)
class Row:
    """One component as ``%link pipeline`` shows it."""

    name: str
    parents: tuple[str, ...]
    state: str
    target: str = ""  # where it last ran, else where its routing comment says
    seconds: float | None = None  # how long its last run took
    problem: str = ""  # a pipeline error that stops it (unknown parent, cycle)


def text(rows: list[Row]) -> str:
    """The list: one line per component (name, state, target, last duration, parents)."""
    if not rows:
        return "no pipeline components yet: declare one with '# link: name=NAME'"
    table = [("component", "state", "target", "last run", "after")]
    for row in rows:
        last = format_seconds(row.seconds) if row.seconds is not None else "-"
        table.append((row.name, row.state, row.target or "-", last, ",".join(row.parents) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines += [f"{row.name}: {row.problem}" for row in rows if row.problem]
    return "\n".join(lines)


def mermaid(rows: list[Row]) -> str:
    """A Mermaid flowchart, parents above children, each node coloured by its state."""
    ids = {row.name: f"c{i}" for i, row in enumerate(rows)}
    lines = ["flowchart TD"]
    for row in rows:
        lines.append(f'  {ids[row.name]}["{_label(row)}"]:::{_css(row.state)}')
    unknown: dict[str, str] = {}
    for row in rows:
        for parent in row.parents:
            if parent not in ids and parent not in unknown:
                unknown[parent] = f"u{len(unknown)}"
                lines.append(f'  {unknown[parent]}["{_escape(parent)}<br/>unknown"]:::unknown')
            lines.append(f"  {ids.get(parent) or unknown[parent]} --> {ids[row.name]}")
    for state, (fill, stroke) in _COLOURS.items():
        lines.append(f"  classDef {_css(state)} fill:{fill},stroke:{stroke},color:#000")
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """The picture and the list, as ``text/markdown``."""
    if not rows:
        return text(rows)
    return f"```mermaid\n{mermaid(rows)}\n```\n\n```\n{text(rows)}\n```\n"


def _label(row: Row) -> str:
    details = [row.state]
    if row.target:
        details.append(row.target)
    if row.seconds is not None:
        details.append(format_seconds(row.seconds))
    return f"{_escape(row.name)}<br/>{_escape(' · '.join(details))}"


def _css(state: str) -> str:
    return state.replace(" ", "_")


def _escape(text: str) -> str:
    """Text safe inside a quoted Mermaid label."""
    for char, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, entity)
    return text
