"""The runner: brings a component's ancestors up to date, in order, before it runs.

The graph (:mod:`.graph`) says what to do, the cache (:mod:`.cache`) holds results; the
kernel supplies the I/O as a :class:`Cells` object (this package imports no kernel and
no backend). For ``%link run NAME``, or a cell that declares ``name=NAME``, the kernel:

1. adds the cell's component to the graph and calls :meth:`Runner.prepare` (NAME),
   which checks the ancestry (a :class:`~link_kernel.errors.PipelineError` before
   anything runs), asks for the content hashes of the values the components read from
   the notebook, computes every key, then, parent before child, restores each ancestor
   whose result is cached and runs each stale one (hidden: the kernel shows none of its
   outputs) and caches its result;
2. shows :attr:`Report.lines`, one quiet line per ancestor ("clean: ran on gpu in 3.2 s",
   "load: from cache, saved 41 s"); if :attr:`Report.failure` is set, shows
   :meth:`Report.error_content` as the cell's error and does not run the cell;
3. otherwise runs the cell itself as usual (its outputs shown), then calls
   :meth:`Runner.record` with what it bound, so the component is cached for its own
   children.

Cache calls do file I/O and run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import LinkError, PipelineError
from .cache import Cache, Entry
from .component import Component
from .graph import Topology
from .picture import Row
from .units import format_seconds, format_size

log = logging.getLogger(__name__)


@dataclass
class Ran:
    """What running one component hidden gave (see :meth:`Cells.run`).

    ``values`` maps each name it bound to its manifest entry, as the agent's export
    reports it (a blob id, or ``{"id", "inline"}``); ``error`` is the iopub error
    content (``ename``, ``evalue``, ``traceback``) of a cell that raised, else None.
    """

    target: str
    values: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    #: Names it bound that cannot be saved (name -> reason): the result is not cached.
    unsaved: dict[str, str] = field(default_factory=dict)


class Cells(Protocol):
    """The kernel's side of the runner: the namespace and the backends."""

    async def hashes(self, names: frozenset[str]) -> Mapping[str, str]:
        """The content hash of each of ``names`` that the notebook's namespace holds
        (those it lacks are left out), as the variable sync names blobs (the agent's
        ``blob_of(value, algo)[0]``). A module gets its name (``module:numpy``); a value
        that cannot be pickled gets a token that never repeats, so its readers always run."""

    async def run(self, component: Component) -> Ran:
        """Run ``component.source`` where its routing comment says, its outputs hidden,
        in the notebook's namespace (a remote one syncs as any remote cell does); report
        what it bound. A LinkError (host unreachable...) stops the pipeline."""

    async def restore(self, component: Component, entry: Entry) -> bool:
        """Bind ``entry``'s values, modules and deletions in the notebook's namespace
        (``agent.apply`` with ``entry.outputs``); False if a blob cannot be loaded (the
        runner then runs the component instead)."""


@dataclass
class Step:
    """What happened to one ancestor."""

    name: str
    action: str  # "ran", "restored" or "failed"
    target: str = ""
    seconds: float = 0.0  # how long running or restoring took
    saved: float = 0.0  # restored: how much running it would have taken more
    cached: bool = True  # ran: whether its result went into the cache
    why: str = ""  # ran but not cached, or failed: why

    @property
    def line(self) -> str:
        """The quiet line under the cell."""
        if self.action == "restored":
            return f"{self.name}: from cache, saved {format_seconds(self.saved)}"
        where = f" on {self.target}" if self.target else ""
        if self.action == "failed":
            return f"{self.name}: failed{where} after {format_seconds(self.seconds)}"
        text = f"{self.name}: ran{where} in {format_seconds(self.seconds)}"
        return f"{text} ({self.why})" if self.why else text


@dataclass
class Report:
    """What :meth:`Runner.prepare` did; ``keys`` has the component's own key too."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    failure: Step | None = None
    error: dict[str, Any] | None = None

    @property
    def lines(self) -> list[str]:
        return [step.line for step in self.steps]

    def error_content(self) -> dict[str, Any] | None:
        """The iopub error of a failed ancestor, as Jupyter shows errors: its own ename,
        evalue and traceback (the parent's line numbers), under a line naming it."""
        if self.failure is None or self.error is None:
            return None
        where = f" on {self.failure.target}" if self.failure.target else ""
        if self.name and self.name != self.failure.name:
            head = (
                f"The parent component {self.failure.name!r} failed{where}; "
                f"{self.name!r} did not run."
            )
        else:
            head = f"The component {self.failure.name!r} failed{where}."
        return {
            "ename": self.error.get("ename", "Error"),
            "evalue": self.error.get("evalue", ""),
            "traceback": [head, *self.error.get("traceback", [])],
        }


class Runner:
    """Runs pipelines over ``graph`` and ``cache`` through ``cells`` (see the module docstring)."""

    def __init__(
        self,
        graph: Topology,
        cache: Cache,
        cells: Cells,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.graph = graph
        self.cache = cache
        self.cells = cells
        self.clock = clock
        #: component -> (the key it last ran or was restored at, what happened): what the
        #: notebook's namespace holds, for the states of ``%link pipeline``.
        self.last: dict[str, tuple[str, Step]] = {}

    async def prepare(self, name: str, *, itself: bool = False) -> Report:
        """Bring the ancestors of ``name`` up to date; ``name`` itself does not run,
        unless ``itself`` (``%link run NAME``: it is restored or run, hidden, as they are).

        Raises a PipelineError (unknown component or parent, cycle) before anything runs.
        """
        ancestors = self.graph.ancestors(name)
        keys = await self._keys([name], [*ancestors, name])
        report = Report(name=name, keys=keys)
        await self._bring(ancestors + ([name] if itself else []), keys, report)
        return report

    async def prepare_all(self) -> Report:
        """Bring every component up to date, each after its parents (``%link run``)."""
        order = self.graph.order()
        keys = await self._keys(order, order)
        report = Report(name="", keys=keys)
        await self._bring(order, keys, report)
        return report

    async def _keys(self, roots: list[str], names: list[str]) -> dict[str, str]:
        external = {n: self.graph.external_reads(n) for n in names}
        wanted = frozenset().union(*external.values())
        hashes = dict(await self.cells.hashes(wanted)) if wanted else {}
        inputs = {n: {v: hashes[v] for v in reads if v in hashes} for n, reads in external.items()}
        keys: dict[str, str] = {}
        for root in roots:
            keys.update(self.graph.keys(root, inputs))
        return keys

    async def _bring(self, names: list[str], keys: dict[str, str], report: Report) -> None:
        if not names:  # a component without parents: no cache lookup
            return
        valid = await asyncio.to_thread(lambda: {k for k in keys.values() if k in self.cache})
        for each in names:
            component = self.graph.component(each)
            step = None
            if component.cache and keys[each] in valid:
                step = await self._restore(component, keys[each])
            if step is None:
                step = await self._run(component, keys[each], report)
            report.steps.append(step)
            self.last[each] = (keys[each], step)
            if step.action == "failed":
                report.failure = step
                break

    async def record(self, name: str, key: str, ran: Ran, seconds: float) -> Entry | None:
        """Cache what the component ``name`` bound when the kernel ran it (shown), under the
        ``key`` :meth:`prepare` gave it; nothing for ``cache=off`` or a cell that raised."""
        component = self.graph.component(name)
        action = "failed" if ran.error is not None else "ran"
        self.last[name] = (key, Step(name, action, target=ran.target, seconds=seconds))
        if not component.cache or ran.error is not None or ran.unsaved:
            return None
        return await asyncio.to_thread(self._put, component, key, ran, seconds)

    async def states(self) -> list[Row]:
        """Every component with its state (see :mod:`.picture`), for ``%link pipeline``.

        Asks for the hashes of the values the components read, as :meth:`prepare` does;
        runs nothing. A component whose ancestry is broken (unknown parent, cycle) is
        listed with the error.
        """
        names = list(self.graph.names)
        external: dict[str, frozenset[str]] = {}
        problems: dict[str, str] = {}
        for name in names:
            try:
                external[name] = self.graph.external_reads(name)
            except PipelineError as exc:
                problems[name] = exc.message
        wanted = frozenset().union(*external.values())
        hashes = dict(await self.cells.hashes(wanted)) if wanted else {}
        inputs = {n: {v: hashes[v] for v in reads if v in hashes} for n, reads in external.items()}
        keys = {n: self.graph.keys(n, inputs)[n] for n in external}
        valid = await asyncio.to_thread(lambda: {k for k in keys.values() if k in self.cache})
        entries = await asyncio.to_thread(self.cache.entries)
        newest: dict[str, Entry] = {}
        for entry in entries:  # most recently used first
            newest.setdefault(entry.component, entry)
        rows = []
        for name in names:
            component = self.graph.component(name)
            key, last = keys.get(name), self.last.get(name)
            entry = newest.get(name)
            if last is not None and last[1].action == "failed" and last[0] in (key, None):
                state = "failed"
            elif last is not None and key is not None and last[0] == key:
                state = "fresh"
            elif key in valid and component.cache:
                state = "cached"
            elif last is not None or entry is not None:
                state = "stale"
            else:
                state = "never run"
            target, seconds = "|".join(component.targets), None
            if last is not None and last[1].action != "restored":
                target, seconds = last[1].target or target, last[1].seconds
            elif entry is not None:
                target, seconds = entry.target or target, entry.seconds
            problem = problems.get(name, "")
            rows.append(Row(name, component.parents, state, target, seconds, problem))
        return rows

    async def _restore(self, component: Component, key: str) -> Step | None:
        entry = await asyncio.to_thread(self.cache.hit, key)
        if entry is None:  # gone since the keys were checked
            return None
        started = self.clock()
        if not await self.cells.restore(component, entry):
            log.warning("pipeline: %s could not be restored; running it", component.name)
            await asyncio.to_thread(self.cache.drop, key)
            return None
        seconds = self.clock() - started
        return Step(
            component.name,
            "restored",
            target=entry.target,
            seconds=seconds,
            saved=max(0.0, entry.seconds - seconds),
        )

    async def _run(self, component: Component, key: str, report: Report) -> Step:
        started = self.clock()
        try:
            ran = await self.cells.run(component)
        except LinkError as exc:
            report.error = {
                "ename": exc.ename or type(exc).__name__,
                "evalue": exc.message,
                "traceback": [f"{exc.ename or type(exc).__name__}: {exc.message}"]
                + ([exc.hint] if exc.hint else []),
            }
            return Step(component.name, "failed", seconds=self.clock() - started, why=exc.message)
        seconds = self.clock() - started
        if ran.error is not None:
            report.error = ran.error
            return Step(component.name, "failed", target=ran.target, seconds=seconds)
        step = Step(component.name, "ran", target=ran.target, seconds=seconds)
        if not component.cache:
            step.cached = False
            return step
        if ran.unsaved:
            name, reason = next(iter(ran.unsaved.items()))
            step.cached, step.why = False, f"not cached: {name!r} cannot be saved: {reason}"
            return step
        entry = await asyncio.to_thread(self._put, component, key, ran, seconds)
        if entry is None:
            step.cached, step.why = False, "not cached: over the cache's limit or a blob is missing"
        return step

    def _put(self, component: Component, key: str, ran: Ran, seconds: float) -> Entry | None:
        entry = self.cache.put(
            key,
            component.name,
            ran.values,
            modules=ran.modules,
            deleted=ran.deleted,
            seconds=seconds,
            target=ran.target,
        )
        if entry is None and ran.values:
            limit = format_size(self.cache.limit)
            log.info("pipeline: %s not cached (limit %s)", component.name, limit)
        return entry
