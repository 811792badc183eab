"""The router's side of pipelines: component cells, hidden parents, ``%link`` pipeline commands.

:class:`RouterPipeline` is a mixin of :class:`~link_kernel.kernel.LinkKernel`, as
:mod:`link_kernel.commands` is. The kernel hands each execute request to
:meth:`RouterPipeline.execute_cell`; a cell whose routing comment has ``name=`` is a
component (DESIGN.md "Pipelines"):

1. the kernel learns it (and the saved notebook's components, when the frontend names the
   notebook), and the runner (:mod:`link_kernel.pipeline.runner`) brings its ancestors up
   to date: restored from the cache or run hidden, each where its routing comment says;
2. one quiet line per ancestor goes under the cell; a parent that raised ends the cell
   with the parent's own error (:class:`~link_kernel.errors.ComponentFailedError`);
3. the cell runs as any cell does (the kernel's own path), and what it bound goes into
   the cache for its children.

A hidden run goes to the local kernel as an internal request (its outputs are never
relayed), or to a remote backend under a request id the relay hides.

It reads and calls the router's ``local``, ``relay``, ``session``, ``default``,
``execution_count``, ``known_targets()``, ``backend()``, ``_choose()``,
``_execute()``, ``_topic()`` and sets ``_active`` while a hidden parent runs.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from html import escape as html_escape
from pathlib import Path
from typing import Any

from . import routing
from .backends import ExecuteRequest, Reply
from .errors import ComponentFailedError, DuplicateComponentError, LinkError
from .pipeline import picture
from .pipeline.cache import DEFAULT_LIMIT, Cache
from .pipeline.cells import AgentCells
from .pipeline.component import Component
from .pipeline.graph import Graph
from .pipeline.notebook import read_notebook
from .pipeline.runner import Ran, Report, Runner, Step
from .pipeline.units import format_size
from .sync.variables import default_store

log = logging.getLogger(__name__)

_VSCODE = "str(get_ipython().user_ns.get('__vsc_ipynb_file__', ''))"


@dataclass
class Pipeline:
    """The notebook's graph, cache and runner, and what the kernel knows of the saved file."""

    graph: Graph
    cache: Cache
    cells: AgentCells
    runner: Runner
    #: component -> (when the kernel learned it, "run" or "saved")
    learned: dict[str, tuple[float, str]] = field(default_factory=dict)
    saved_stamp: tuple = ()
    saved_ids: frozenset[str] = frozenset()
    #: The request whose cell is bringing its parents up to date (for fallback notes).
    parent: dict | None = None


def _error_of(content: dict[str, Any]) -> dict[str, Any]:
    return {
        "ename": content.get("ename", "Error"),
        "evalue": content.get("evalue", ""),
        "traceback": list(content.get("traceback", [])),
    }


class RouterPipeline:
    """Pipeline components, as methods of the router."""

    _pipeline_state: Pipeline | None = None

    # -- the pipeline --------------------------------------------------------------

    def pipeline(self) -> Pipeline:
        """The notebook's pipeline, made on first use (the cache is on disk already)."""
        if self._pipeline_state is None:
            store = default_store()
            limit = int(os.environ.get("LINK_CACHE_LIMIT", "0") or 0) or int(
                getattr(self, "cache_limit", DEFAULT_LIMIT)
            )
            graph = Graph()
            cache = Cache(store, limit)
            cells = AgentCells(self.local.call, store, self._run_hidden)
            self._pipeline_state = Pipeline(graph, cache, cells, Runner(graph, cache, cells))
        return self._pipeline_state

    async def notebook_path(self) -> Path | None:
        """The saved notebook the frontend named, if it exists: ``JPY_SESSION_NAME`` (as
        jupyter_server sets it), else VS Code's ``__vsc_ipynb_file__`` in the namespace."""
        name = os.environ.get("JPY_SESSION_NAME", "")
        if not name and self.local.alive:
            try:
                found = await self.local.call("", {"f": _VSCODE})
                name = ast.literal_eval(found["f"])
            except Exception:  # a kernel busy restarting: no saved notebook this time
                name = ""
        if not isinstance(name, str) or not name:
            return None
        path = Path(name)
        if not path.is_absolute():
            path = Path(os.getcwd()) / path
        if not path.is_file() and (Path(os.getcwd()) / path.name).is_file():
            path = Path(os.getcwd()) / path.name
        return path if path.suffix == ".ipynb" and path.is_file() else None

    async def read_saved(self) -> None:
        """Learn the saved notebook's components, when the file changed since last read.

        A saved component replaces the one the kernel learned from a run only if the file
        was saved after that run: the newer code wins. A component learned from the file
        and gone from it is forgotten (its cell was deleted).
        """
        pipe = self.pipeline()
        path = await self.notebook_path()
        if path is None:
            return
        try:
            info = path.stat()
        except OSError:
            return
        stamp = (str(path), info.st_mtime_ns, info.st_size)
        if stamp == pipe.saved_stamp:
            return
        try:
            saved = read_notebook(path)
        except (OSError, ValueError) as exc:
            log.warning("pipeline: cannot read the saved notebook %s: %s", path, exc)
            return
        saved.graph()  # DuplicateComponentError: two cells of the file declare one name
        pipe.saved_stamp = stamp
        pipe.saved_ids = frozenset(c.cell_id for c in saved.components if c.cell_id)
        mtime = info.st_mtime
        names = {c.name for c in saved.components}
        for name, (_, origin) in list(pipe.learned.items()):
            if origin == "saved" and name not in names:
                pipe.graph.remove(name)
                del pipe.learned[name]
        for component in saved.components:
            when, _ = pipe.learned.get(component.name, (0.0, "saved"))
            if component.name in pipe.graph and when > mtime:
                continue
            pipe.graph.add(component, replace_other=True)
            pipe.learned[component.name] = (mtime, "saved")

    async def learn(self, component: Component) -> None:
        """Add the component of a cell being run (DuplicateComponentError if another cell
        with another id declares its name, unless the saved notebook no longer has it)."""
        pipe = self.pipeline()
        await self.read_saved()
        try:
            pipe.graph.add(component)
        except DuplicateComponentError:
            other = pipe.graph.component(component.name)
            if not pipe.saved_ids or other.cell_id in pipe.saved_ids:
                raise
            pipe.graph.add(component, replace_other=True)
        pipe.learned[component.name] = (time.time(), "run")

    # -- a component cell ----------------------------------------------------------

    async def execute_cell(self, parent, frames, i, ident, code, silent, store) -> Reply:
        """Run one cell: a component brings its ancestors up to date first."""
        first = code.split("\n", 1)[0]
        component = None
        if "name=" in first:
            cell_id = (parent.get("metadata") or {}).get("cellId")
            component = Component.from_cell(code, cell_id if isinstance(cell_id, str) else None)
        if component is None:
            return await self._execute(parent, frames, i, ident, code, silent, store)
        pipe = self.pipeline()
        await self._ready()
        await self.learn(component)
        report = await self._bring_up(parent, component.name)
        started = time.perf_counter()
        reply = await self._execute(parent, frames, i, ident, code, silent, store)
        seconds = time.perf_counter() - started
        target = reply.metadata.get("link", {}).get("target", routing.LOCAL)
        try:
            if reply.status != "ok":
                ran = Ran(target, error=_error_of(reply.content))
            else:
                ran = await pipe.cells.outputs(component, target)
            await pipe.runner.record(component.name, report.keys[component.name], ran, seconds)
        except Exception:
            log.exception("pipeline: caching %s failed", component.name)
        return reply

    async def _bring_up(self, parent: dict, name: str | None, *, itself: bool = False) -> Report:
        """Restore or run (hidden) the ancestors of ``name`` (every component for None),
        one quiet line each; ComponentFailedError if one raised."""
        pipe = self.pipeline()
        pipe.parent = parent
        try:
            if name is None:
                report = await pipe.runner.prepare_all()
            else:
                report = await pipe.runner.prepare(name, itself=itself)
        finally:
            pipe.parent = None
        for step in report.steps:
            self._step_note(parent, step)
        if report.failure is not None:
            raise ComponentFailedError(report.error_content() or {})
        return report

    def _step_note(self, parent: dict, step: Step) -> None:
        """One quiet line under the cell: what happened to one ancestor."""
        text = step.line
        html = (
            '<div class="link-pipeline" style="font-size:0.8em;opacity:0.6;'
            f'font-family:var(--jp-ui-font-family,sans-serif)">&#8627; {html_escape(text)}</div>'
        )
        meta = {"component": step.name, "action": step.action, "seconds": round(step.seconds, 3)}
        if step.target:
            meta["target"] = step.target
        self.session.send(
            self.iopub_socket,
            "display_data",
            {
                "data": {"text/plain": f"[link] {text}", "text/html": html},
                "metadata": {"link": {"pipeline": meta}},
                "transient": {},
            },
            parent,
            ident=self._topic("display_data"),
        )

    async def _run_hidden(self, component: Component) -> Ran:
        """Run a component where its routing comment says, none of its outputs shown;
        what it bound ends up in the notebook's namespace, as after any cell."""
        pipe = self.pipeline()
        cell = routing.parse(component.source)
        wanted = cell.route.targets or self.default
        local_only = all(target == routing.LOCAL for target in wanted)
        targets = routing.resolve(wanted, [routing.LOCAL] if local_only else self.known_targets())
        backend = await self._choose(targets, pipe.parent or {"header": {}})
        content = {
            "code": cell.kernel_code or cell.code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        self._active = backend
        try:
            if backend is self.local:
                answer = await self.local._conn().request("execute_request", content)
                result = answer["content"]
            else:
                header = self.session.msg_header("execute_request")
                msg = {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "msg_id": header["msg_id"],
                    "msg_type": "execute_request",
                    "buffers": [],
                }
                request = ExecuteRequest(
                    msg=msg,
                    frames=[],
                    delim=0,
                    idents=[],
                    route=cell.route,
                    code=cell.code,
                    execution_count=self.execution_count,
                )
                self.relay.hidden.add(header["msg_id"])
                try:
                    result = (await backend.execute(request)).content
                finally:
                    self.relay.hidden.discard(header["msg_id"])
                    backend.notes.clear()
        finally:
            self._active = None
        if result.get("status") != "ok":
            return Ran(backend.name, error=_error_of(result))
        return await pipe.cells.outputs(component, backend.name)

    # -- %link cache, %link pipeline, %link run --------------------------------------

    async def command_cache(self, parent: dict, action: str | None = None, name: str | None = None) -> None:
        cache = self.pipeline().cache
        if action is None:
            self.display(parent, await asyncio.to_thread(cache.listing))
            return
        dropped = await asyncio.to_thread(cache.clear, name)
        size = sum(e.size for e in dropped)
        what = "the pipeline cache" if name is None else f"the cache of {name!r}"
        count = f"{len(dropped)} entr{'y' if len(dropped) == 1 else 'ies'}"
        self.display(parent, f"cleared {what}: {count}, {format_size(size)}")

    async def command_pipeline(self, parent: dict) -> None:
        await self._ready()
        await self.read_saved()
        rows = await self.pipeline().runner.states()
        self.display(parent, picture.text(rows), picture.markdown(rows))

    async def command_run(self, parent: dict, name: str | None = None) -> None:
        await self._ready()
        await self.read_saved()
        if name is None and not len(self.pipeline().graph):
            raise LinkError(
                "no pipeline components yet",
                hint="Declare one with '# link: name=NAME' and run its cell.",
            )
        report = await self._bring_up(parent, name, itself=True)
        done = "every component is" if name is None else f"{name!r} is"
        self.display(parent, f"{done} up to date ({len(report.steps)} steps)")


__all__ = ["RouterPipeline"]
