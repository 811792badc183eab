"""Link's helper inside a kernel: the local kernel and every remote one.

This module is self-contained: it imports nothing of link_kernel, because a
remote host has only Python, ipykernel and dill. The router imports it by name
in the local kernel and sends its source to remote kernels, where it is
executed as the module ``__link_agent__``.

The router calls it with silent execute requests, so nothing it does reaches
the cell's outputs or the history, and it binds no name in the user namespace.
"""

from __future__ import annotations

import sys

NAME = "__link_agent__"


def install(shell) -> None:
    """Register the agent under its module name and the ``%link`` magic.

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
