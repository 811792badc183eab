"""A pipeline as a JSON file: ``link-kernel pipeline export`` and ``pipeline import``.

The file is the notebook's components in pipeline order (each after its parents)::

    {"format": "link-pipeline", "version": 1,
     "components": [{"name": "train", "parents": ["load"], "target": "gpu",
                     "options": {"timeout": "60", "keep": true},
                     "code": "...", "code_hash": "..."}]}

``target`` is the routing comment's target chain ("" for the notebook's default),
``options`` its other options as written (``keep`` is ``true``), ``code`` the cell
below the routing comment, and ``code_hash`` :attr:`Component.code_hash
<link_kernel.pipeline.component.Component.code_hash>` (so the component's cache keys
are the same on both sides).

Importing checks everything before writing anything: the format and its version, the
JSON itself, every key, each code against its hash, unique names, known parents, no
cycle; then the merged notebook's pipeline again. A refusal is one
:class:`~link_kernel.errors.PipelineFileError`; the notebook is written (atomically)
only when all is well. Into an existing notebook, each component replaces the code
cell that declares its name (the cell keeps its id; its outputs go, as they belong
to the old code); new ones are appended in pipeline order; other cells are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .. import routing
from ..errors import LinkError, PipelineError, PipelineFileError, ShareError
from ..kernelspec import DISPLAY_NAME, KERNEL_NAME
from .component import Component
from .graph import Graph
from .notebook import Saved, notebook_components, read_notebook

FORMAT = "link-pipeline"
VERSION = 1
KEYS = ("name", "parents", "target", "options", "code", "code_hash")
_COMMENT = re.compile(r"[ \t]*#[ \t]*link[ \t]*:(?P<rest>.*)")
_VALUE = re.compile(r"[^\s#|]*")


# -- export ----------------------------------------------------------------------------


def export_pipeline(notebook: str | Path) -> dict[str, Any]:
    """The pipeline file's content for the notebook at ``notebook``.

    Raises PipelineError when the notebook's pipeline is broken (an unknown parent, a
    cycle, two cells with one name), RoutingError-like problems as PipelineFileError.
    """
    saved = read_saved(notebook)
    if saved.problems:
        label, message = next(iter(saved.problems.items()))
        msg = f"{notebook}: {label} has a malformed routing comment: {message}"
        raise PipelineFileError(msg, hint="Fix that cell's first line, then export again.")
    graph = saved.graph()
    components = []
    for name in graph.order():
        component = graph.component(name)
        target, options = route_parts(component.source)
        components.append(
            {
                "name": component.name,
                "parents": list(component.parents),
                "target": target,
                "options": options,
                "code": _body(component.source),
                "code_hash": component.code_hash,
            }
        )
    return {"format": FORMAT, "version": VERSION, "components": components}


def read_saved(notebook: str | Path) -> Saved:
    """The notebook's components; ShareError if it cannot be read or is no notebook."""
    try:
        return read_notebook(notebook)
    except (OSError, ValueError) as exc:
        msg = f"cannot read the notebook {notebook}: {exc}"
        raise ShareError(msg, hint="Give the path of a saved .ipynb file.") from exc


def route_parts(source: str) -> tuple[str, dict[str, str | bool]]:
    """(the target chain, the other options) of a cell's routing comment, as written;
    ``name=`` and ``after=`` are left out (they are the component's name and parents)."""
    first = source.splitlines()[0] if source else ""
    match = _COMMENT.fullmatch(first)
    if match is None:
        return "", {}
    rest = match["rest"]
    if "#" in rest:
        rest = rest[: rest.index("#")]
    tokens = re.sub(r"\s*\|\s*", "|", rest.strip()).split()
    target = ""
    if tokens and "=" not in tokens[0] and tokens[0] != "keep":
        target, tokens = tokens[0], tokens[1:]
    options: dict[str, str | bool] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if key in ("name", "after"):
            continue
        options[key] = value if eq else True
    return target, options


def _body(source: str) -> str:
    """The cell below its first line (the routing comment)."""
    lines = source.splitlines(keepends=True)
    return "".join(lines[1:])


# -- import ----------------------------------------------------------------------------


def load_pipeline(path: str | Path) -> list[Component]:
    """The components of the pipeline file at ``path``, checked, in the file's order.

    Raises PipelineFileError (one line, naming the file) for anything wrong.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read the pipeline file {path}: {exc}"
        raise PipelineFileError(msg, hint="Give the path of a file 'pipeline export' wrote.") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        msg = f"{path} is not valid JSON ({exc})"
        raise PipelineFileError(msg) from exc
    return parse_pipeline(data, str(path))


def parse_pipeline(data: Any, where: str = "the pipeline file") -> list[Component]:
    """The components of a pipeline file's parsed JSON ``data`` (see :func:`load_pipeline`)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        msg = f"{where} is not a Link pipeline file (no \"format\": \"{FORMAT}\")"
        raise PipelineFileError(msg)
    version = data.get("version")
    if type(version) is not int or version != VERSION:
        age = "unknown"
        if type(version) is int:
            age = "newer" if version > VERSION else "older"
        msg = (
            f"{where} has pipeline format version {version!r} ({age}); "
            f"this link-kernel reads version {VERSION} only"
        )
        raise PipelineFileError(msg, hint="Export it again with a link-kernel of the same version.")
    items = data.get("components")
    if not isinstance(items, list):
        msg = f"{where}: \"components\" must be a list"
        raise PipelineFileError(msg)
    components: list[Component] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        component = _component(item, f"{where}: component {index + 1}")
        if component.name in seen:
            msg = f"{where}: two components are named {component.name!r}"
            raise PipelineFileError(msg)
        seen.add(component.name)
        components.append(component)
    try:
        Graph.of_notebook(components).order()
    except PipelineError as exc:
        msg = f"{where}: {exc.message}"
        raise PipelineFileError(msg) from exc
    return components


def _component(item: Any, where: str) -> Component:
    if not isinstance(item, dict):
        msg = f"{where} is not an object"
        raise PipelineFileError(msg)
    missing = [key for key in KEYS if key not in item]
    if missing:
        msg = f"{where} lacks {', '.join(repr(k) for k in missing)}"
        raise PipelineFileError(msg)
    name, parents, target, options = item["name"], item["parents"], item["target"], item["options"]
    where = f"{where} ({name!r})" if isinstance(name, str) else where
    kinds = {
        "name": isinstance(name, str),
        "parents": isinstance(parents, list) and all(isinstance(p, str) for p in parents),
        "target": isinstance(target, str),
        "options": isinstance(options, dict),
        "code": isinstance(item["code"], str),
        "code_hash": isinstance(item["code_hash"], str),
    }
    wrong = [key for key, ok in kinds.items() if not ok]
    if wrong:
        msg = f"{where}: {wrong[0]!r} has the wrong type"
        raise PipelineFileError(msg)
    source = cell_source(name, parents, target, options, item["code"], where)
    try:
        component = Component.from_cell(source)
    except LinkError as exc:
        msg = f"{where}: {exc.message}"
        raise PipelineFileError(msg) from exc
    if component is None or component.name != name or list(component.parents) != parents:
        msg = f"{where}: its name or parents do not survive as a routing comment"
        raise PipelineFileError(msg)
    if component.code_hash != item["code_hash"]:
        msg = f"{where}: its code does not match its code_hash (the file was changed)"
        raise PipelineFileError(msg, hint="Export the pipeline again rather than editing the file.")
    return component


def cell_source(
    name: str, parents: list[str], target: str, options: dict[str, Any], code: str, where: str = ""
) -> str:
    """A component's cell: its routing comment, then ``code``."""
    words = [target] if target else []
    words.append(f"name={name}")
    if parents:
        words.append("after=" + ",".join(parents))
    for key, value in options.items():
        if key in ("name", "after") or not isinstance(key, str) or not _VALUE.fullmatch(key):
            msg = f"{where}: option {key!r} does not belong in \"options\""
            raise PipelineFileError(msg)
        if value is True:
            words.append(key)
        elif isinstance(value, str) and _VALUE.fullmatch(value):
            words.append(f"{key}={value}")
        else:
            msg = f"{where}: option {key!r} has the value {value!r}: give a string without spaces"
            raise PipelineFileError(msg)
    line = "# link: " + " ".join(words)
    if not _VALUE.fullmatch(target.replace("|", "")):
        msg = f"{where}: target {target!r} is not a target chain"
        raise PipelineFileError(msg)
    return f"{line}\n{code}" if code else line


def import_pipeline(path: str | Path, notebook: str | Path) -> tuple[list[str], list[str]]:
    """Write the pipeline file at ``path`` into ``notebook`` (created when new).

    Returns (the components replaced, the components added). Nothing is written when
    anything is wrong (PipelineFileError).
    """
    components = load_pipeline(path)
    notebook = Path(notebook)
    if notebook.exists():
        try:
            data = json.loads(notebook.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read the notebook {notebook}: {exc}"
            raise PipelineFileError(msg, hint="Give a new path or a valid notebook.") from exc
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            msg = f"{notebook} is not a Jupyter notebook (no list of cells)"
            raise PipelineFileError(msg)
    else:
        data = new_notebook()
    replaced, added = _merge(data, components, notebook)
    _check_merged(data, notebook)
    if replaced or added or not notebook.exists():
        write_atomic(notebook, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return replaced, added


def new_notebook() -> dict[str, Any]:
    """An empty nbformat 4.5 notebook on the Link kernel."""
    return {
        "cells": [],
        "metadata": {
            "kernelspec": {"name": KERNEL_NAME, "display_name": DISPLAY_NAME, "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _merge(
    data: dict[str, Any], components: list[Component], notebook: Path
) -> tuple[list[str], list[str]]:
    cells: list[Any] = data["cells"]
    by_name: dict[str, dict[str, Any]] = {}
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        try:
            name = routing.parse(source).route.name
        except LinkError:
            continue  # a malformed routing comment: left as it is
        if name is not None:
            if name in by_name:
                msg = f"{notebook}: two cells declare the component {name!r}"
                raise PipelineFileError(msg, hint="Give each of those cells its own name= first.")
            by_name[name] = cell
    ids = data.get("nbformat", 4) == 4 and int(data.get("nbformat_minor", 0)) >= 5
    replaced, added = [], []
    for component in components:
        cell = by_name.get(component.name)
        if cell is not None:
            old = cell.get("source", "")
            old = "".join(old) if isinstance(old, list) else old
            if _declares(old) != _declares(component.source):
                cell["source"] = component.source
                cell["outputs"] = []
                cell["execution_count"] = None
                replaced.append(component.name)
            continue
        cell = {
            "cell_type": "code",
            "execution_count": None,
            "metadata": {},
            "outputs": [],
            "source": component.source,
        }
        if ids:
            cell = {"id": uuid.uuid4().hex[:12], **cell}
        cells.append(cell)
        added.append(component.name)
    return replaced, added


def _declares(source: str) -> tuple[Any, ...]:
    """What a component cell declares, its routing comment's own comment and spacing aside."""
    try:
        parents = routing.parse(source).route.after
    except LinkError:
        parents = None
    return route_parts(source), parents, _body(source)


def _check_merged(data: dict[str, Any], notebook: Path) -> None:
    """The merged notebook's pipeline must hold: names unique, parents known, no cycle."""
    try:
        notebook_components(data, str(notebook)).graph().order()
    except PipelineError as exc:
        msg = f"{notebook} after the import: {exc.message}"
        raise PipelineFileError(msg, hint="Fix the notebook's own components first.") from exc


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and os.replace."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror}"
        raise ShareError(msg, hint="Give a path in a folder you can write to.") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
