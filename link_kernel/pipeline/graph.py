"""The pipeline's graph: components and their parents, order, cycles, cache keys, staleness.

Pure: no I/O. Data structure and graph logic only; the kernel supplies what only it can
know (the content hashes of the values a component reads from the notebook), and the
runner (:mod:`.runner`) acts on what the graph says.

:class:`Topology` is the read-only view (what the runner and the ``%link pipeline``
picture need); :class:`Graph` is the mutable class the kernel feeds with the components
of the cells it runs and of the saved notebook.

- **Order.** :meth:`~Topology.ancestors` lists a component's ancestors so that each
  comes after its own parents; among independent ones, parents in the order ``after=``
  names them (so when two parents bind one name, the later one's value is what the
  child sees, as if the cells ran in that order).
- **Errors, before anything runs.** An unknown parent (listing the known components),
  a cycle (named: ``a -> b -> a``, in run order), two different cells with one name:
  one :class:`~link_kernel.errors.PipelineError` each.
- **Cache keys.** A component's key is the hash of its code (routing comment aside:
  a new target keeps the key), its ``out=`` names, its parents' keys (in order), and
  the content hashes of the values it reads from outside its ancestry.
- **Staleness.** An ancestor is stale when its key is not among the cached ones, or it
  has ``cache=off``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Container, Iterable, Mapping
from dataclasses import replace
from typing import Protocol

from ..errors import DuplicateComponentError, PipelineCycleError, UnknownComponentError
from .component import Component

#: Changes when the key's recipe does, so old cache entries are never taken for new ones.
KEY_VERSION = "link-pipeline-key-1"


class Topology(Protocol):
    """A read-only view of the graph."""

    def __contains__(self, name: object) -> bool: ...

    def __len__(self) -> int: ...

    @property
    def names(self) -> tuple[str, ...]: ...

    def component(self, name: str) -> Component: ...

    def children(self, name: str) -> tuple[str, ...]: ...

    def ancestors(self, name: str) -> list[str]: ...

    def order(self, names: Iterable[str] | None = None) -> list[str]: ...

    def external_reads(self, name: str) -> frozenset[str]: ...

    def keys(self, name: str, inputs: Mapping[str, Mapping[str, str]]) -> dict[str, str]: ...

    def stale(self, name: str, keys: Mapping[str, str], cached: Container[str]) -> list[str]: ...


class Graph:
    """The notebook's components, by name (see the module docstring).

    Components are kept in the order they were first added, so listings and error
    messages do not depend on hashing.
    """

    def __init__(self, components: Iterable[Component] = ()) -> None:
        self._components: dict[str, Component] = {}
        for component in components:
            self.add(component)

    @classmethod
    def of_notebook(cls, components: Iterable[Component]) -> Graph:
        """The graph of one notebook's cells, all at once (the saved notebook).

        Two cells with one name are a :class:`DuplicateComponentError`: told apart by
        their cell ids when both have one, else by their code (the same code listed twice,
        as when a cell's run and its saved copy are merged, is one component).
        """
        graph = cls()
        for component in components:
            old = graph._components.get(component.name)
            if old is not None and _different_cells(old, component):
                raise DuplicateComponentError(component.name, [old.label, component.label])
            graph.add(component)
        return graph

    # -- changes ---------------------------------------------------------------------

    def add(self, component: Component, *, replace_other: bool = False) -> Component | None:
        """Add or replace a component; return the one it replaced, if any.

        A cell run again replaces its component, even with new code: it is the same cell
        when the cell ids match, or when either has none (a frontend that sends no cell id
        cannot tell an edited cell from another one; the saved notebook can, see
        :meth:`of_notebook`). Two cell ids that differ are two cells: a
        :class:`DuplicateComponentError`, and the graph is left as it was, unless
        ``replace_other`` (the kernel found that the other cell is gone from the saved
        notebook: the code moved to a new cell). A cell renamed (its id seen before under
        another name) drops its old component.
        """
        old = self._components.get(component.name)
        if old is not None and old.cell_id and component.cell_id and not replace_other:
            if old.cell_id != component.cell_id:
                raise DuplicateComponentError(component.name, [old.label, component.label])
        if old is not None and component.cell_id is None and old.cell_id:
            if old.code_hash == component.code_hash:
                component = _with_cell_id(component, old.cell_id)
        if component.cell_id:
            for name, other in list(self._components.items()):
                if other.cell_id == component.cell_id and name != component.name:
                    del self._components[name]
        self._components[component.name] = component
        return old

    def remove(self, name: str) -> Component | None:
        """Forget a component (its cell was deleted); return it, or None."""
        return self._components.pop(name, None)

    def remove_cell(self, cell_id: str) -> Component | None:
        """Forget the component of a cell that no longer declares one."""
        for name, component in self._components.items():
            if component.cell_id == cell_id:
                return self._components.pop(name)
        return None

    # -- the read-only view ----------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def __len__(self) -> int:
        return len(self._components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._components)

    def component(self, name: str) -> Component:
        """The component ``name``; UnknownComponentError (listing the known ones) if none."""
        try:
            return self._components[name]
        except KeyError:
            raise UnknownComponentError(name, _ranked(name, self.names)) from None

    def children(self, name: str) -> tuple[str, ...]:
        return tuple(n for n, c in self._components.items() if name in c.parents)

    def ancestors(self, name: str) -> list[str]:
        """Every ancestor of ``name``, each after its own parents; ``name`` not included.

        Raises UnknownComponentError for ``name`` or any parent in its ancestry that no
        component declares, and PipelineCycleError for a cycle among them.
        """
        return self._ordered([name])[:-1]

    def order(self, names: Iterable[str] | None = None) -> list[str]:
        """``names`` (default: every component) with their ancestors, each after its parents."""
        return self._ordered(list(self._components) if names is None else list(names))

    def external_reads(self, name: str) -> frozenset[str]:
        """The names ``name`` reads that none of its ancestors binds: the notebook's values
        whose content hashes go into its key."""
        bound: set[str] = set()
        for ancestor in self.ancestors(name):
            bound |= self._components[ancestor].binds | self._components[ancestor].deletes
        return self._components[name].reads - bound

    def keys(self, name: str, inputs: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """The cache keys of ``name`` and of every ancestor, in run order.

        ``inputs[component]`` maps each of its :meth:`external_reads` that exists in the
        notebook to its content hash; names it lacks do not exist (and count as such).
        """
        keys: dict[str, str] = {}
        for each in self._ordered([name]):
            component = self._components[each]
            keys[each] = component_key(
                component, [keys[p] for p in component.parents], inputs.get(each, {})
            )
        return keys

    def stale(self, name: str, keys: Mapping[str, str], cached: Container[str]) -> list[str]:
        """The ancestors of ``name`` that must run, in run order: those whose key (from
        :meth:`keys`) is not in ``cached``, and those with ``cache=off``."""
        return [
            each
            for each in self.ancestors(name)
            if not self._components[each].cache or keys[each] not in cached
        ]

    # -- order and cycles ------------------------------------------------------------

    def _ordered(self, roots: list[str]) -> list[str]:
        """Depth-first over parents: a post-order, with cycles and unknown names refused.

        Iterative, so a long chain of components never meets the recursion limit.
        """
        done: dict[str, None] = {}
        for root in roots:
            if root in done:
                continue
            if root not in self._components:
                raise UnknownComponentError(root, _ranked(root, self.names))
            path = [root]  # the chain being visited, child first
            on_path = {root}
            pending = [iter(self._components[root].parents)]
            while pending:
                parent = next(pending[-1], None)
                if parent is None:
                    pending.pop()
                    on_path.discard(path[-1])
                    done[path.pop()] = None
                elif parent in done:
                    continue
                elif parent in on_path:
                    raise PipelineCycleError(_cycle(path[path.index(parent) :]))
                elif parent not in self._components:
                    raise UnknownComponentError(parent, _ranked(parent, self.names), path[-1])
                else:
                    path.append(parent)
                    on_path.add(parent)
                    pending.append(iter(self._components[parent].parents))
        return list(done)


def component_key(component: Component, parent_keys: list[str], inputs: Mapping[str, str]) -> str:
    """The cache key of ``component`` (see the module docstring); 64 hex digits."""
    recipe = {
        "version": KEY_VERSION,
        "code": component.code_hash,
        "outputs": None if component.outputs is None else sorted(component.outputs),
        "parents": list(parent_keys),
        "inputs": sorted(inputs.items()),
    }
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _cycle(chain: list[str]) -> list[str]:
    """A cycle found child-first, as run order (parent -> child), from its smallest name,
    its first name repeated at the end: ``a -> b -> a``."""
    ring = list(reversed(chain))
    start = ring.index(min(ring))
    ring = ring[start:] + ring[:start]
    return [*ring, ring[0]]


def _different_cells(a: Component, b: Component) -> bool:
    if a.cell_id and b.cell_id:
        return a.cell_id != b.cell_id
    return a.code_hash != b.code_hash


def _with_cell_id(component: Component, cell_id: str) -> Component:
    return replace(component, cell_id=cell_id)


def _ranked(name: str, known: Iterable[str]) -> list[str]:
    """The known names, the closest to ``name`` first, then the others sorted."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return [*close, *sorted(k for k in known if k not in close)]
