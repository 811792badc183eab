"""Link's helper inside a kernel: the local kernel and every remote one.

This module is self-contained: it imports nothing of link_kernel, because a
remote host has only Python, ipykernel and dill. The router imports it by name
in the local kernel; on a host, the bootstrap supervisor executes its source
as the module ``__link_agent__`` before the kernel starts.

In a remote kernel the agent wraps the kernel's execute_request handler, so a
routed cell costs one request: the router puts its instructions in the
request's metadata under ``"link"`` and the wrapper applies them around the
cell (the execution count now; variables later). In the local kernel the
router calls the agent with silent execute requests, so nothing it does
reaches the cell's outputs or the history, and it binds no user name.
"""

from __future__ import annotations

import sys

NAME = "__link_agent__"


def install(shell) -> None:
    """Register the agent, the no-op ``%link`` magic and the execute wrapper.

    ``%link`` lines are handled by the router. The kernel still sees them (the
    router forwards cells unchanged, so tracebacks keep the cell's line
    numbers), and for the kernel they do nothing.
    """
    module = sys.modules.get(__name__)
    if module is not None:
        sys.modules[NAME] = module

    def link(line: str) -> None:
        """Handled by the Link router; a no-op inside a kernel."""

    shell.register_magic_function(link, "line", "link")
    kernel = getattr(shell, "kernel", None)
    handlers = getattr(kernel, "shell_handlers", None)
    if handlers is not None and "execute_request" in handlers:
        handlers["execute_request"] = _wrap_execute(shell, handlers["execute_request"])


def _wrap_execute(shell, original):
    async def execute_request(stream, ident, parent):
        instructions = (parent.get("metadata") or {}).get("link")
        if isinstance(instructions, dict):
            count = instructions.get("count")
            if isinstance(count, int) and count > 0:
                shell.execution_count = count
        result = original(stream, ident, parent)
        if hasattr(result, "__await__"):
            result = await result
        return result

    execute_request.__wrapped__ = original
    return execute_request


def record(shell, code: str) -> int:
    """Record a cell the router ran elsewhere, as IPython records its own cells.

    The cell goes into the input history under the current execution count,
    and the count moves on, so the local kernel stays the notebook's record of
    every cell whatever ran it. Returns the count the cell got.
    """
    count = shell.execution_count
    shell.history_manager.store_inputs(count, code, code)
    shell.execution_count = count + 1
    return count
