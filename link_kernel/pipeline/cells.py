"""The runner's :class:`~.runner.Cells` over the notebook's local kernel and its agent.

The kernel builds one :class:`AgentCells` per notebook from two things it owns: ``call``
(``LocalBackend.call``: run code silently in the local kernel, return the evaluated
expressions as text) and ``run`` (run a component's cell hidden where its routing
comment says, return its :class:`~.runner.Ran`; for a local component,
:meth:`AgentCells.outputs` gives what it bound). Hashing and restoring go through the
local kernel's agent (``__link_agent__``), in the blob store the variable sync uses:

- :meth:`~AgentCells.hashes`: each value's blob id (``agent.blob_of``), written nowhere;
- :meth:`~AgentCells.restore`: ``agent.apply`` of an entry's blob ids, modules, deletions;
- :meth:`~AgentCells.outputs`: ``agent.export`` of the names a component bound.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .cache import Entry
from .component import Component
from .runner import Ran

AGENT = "__import__('sys').modules['__link_agent__']"

#: Defined in the agent's module (not the notebook's namespace) on first use.
_HELPERS = '''
def pipeline_hashes(shell, names, algo):
    import json, os, types
    ns = shell.user_ns
    out = {}
    for name in names:
        if name not in ns or not _is_user_name(shell, name):
            continue  # IPython's own names (its 'open', In, Out...) are not the notebook's
        value = ns[name]
        if isinstance(value, types.ModuleType):
            out[name] = "module:" + value.__name__
            continue
        try:
            out[name] = blob_of(value, algo)[0]
        except Exception:
            out[name] = "unhashable:" + os.urandom(16).hex()
    return json.dumps(out)
'''


class AgentCells:
    """Hashes and restores through the local kernel's agent; runs through ``run``."""

    def __init__(
        self,
        call: Callable[[str, dict[str, str]], Awaitable[dict[str, Any]]],
        store: Path | str,
        run: Callable[[Component], Awaitable[Ran]],
        algo: str = "xxh3t",
    ) -> None:
        self.call = call
        self.store = str(store)
        self._run = run
        self.algo = algo
        self._helpers = False

    async def hashes(self, names: frozenset[str]) -> dict[str, str]:
        if not self._helpers:
            await self.call(f"exec({_HELPERS!r}, {AGENT}.__dict__)", {})
            self._helpers = True
        code = f"{AGENT}.pipeline_hashes(get_ipython(), {sorted(names)!r}, {self.algo!r})"
        result = await self.call("", {"hashes": code})
        return json.loads(ast.literal_eval(result["hashes"]))

    async def run(self, component: Component) -> Ran:
        return await self._run(component)

    async def restore(self, component: Component, entry: Entry) -> bool:
        code = (
            f"{AGENT}._last_apply = {AGENT}.apply(get_ipython(), {entry.outputs!r}, "
            f"{entry.deleted!r}, {self.store!r}, {entry.modules!r})"
        )
        result = await self.call(code, {"failures": f"{AGENT}._last_apply"})
        return not json.loads(ast.literal_eval(result["failures"]))

    async def outputs(self, component: Component, target: str = "local") -> Ran:
        """What a component that ran in the local kernel bound, as blobs in the store."""
        names = sorted(component.binds)
        Path(self.store).mkdir(parents=True, exist_ok=True, mode=0o700)
        code = (
            f"{AGENT}._last_export = {AGENT}.export(get_ipython(), {names!r}, "
            f"{self.store!r}, {self.algo!r})"
        )
        result = await self.call(code, {"manifest": f"{AGENT}._last_export"})
        manifest = json.loads(ast.literal_eval(result["manifest"]))
        return Ran(
            target,
            values=manifest["values"],
            modules=manifest["modules"],
            deleted=sorted(component.deletes),
            unsaved={name: e["reason"] for name, e in manifest["errors"].items()},
        )
