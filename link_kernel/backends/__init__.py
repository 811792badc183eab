"""Backends: the kernels a cell can run on.

The router (:class:`link_kernel.kernel.LinkKernel`) owns one
:class:`~link_kernel.backends.local.LocalBackend`, which holds the notebook's
state, and one :class:`~link_kernel.backends.remote.RemoteBackend` per host
alias, which runs cells in fresh kernels on that host.

A backend receives an :class:`ExecuteRequest`, relays the cell's outputs to the
frontend through the router's :class:`~link_kernel.relay.Relay` as they
happen, and returns a :class:`Reply`. The router sends that reply and then its
own ``idle``; a backend never publishes status.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from ..routing import Route


@dataclass
class ExecuteRequest:
    """One execute_request as the router received it.

    ``frames`` are the raw frames (``frames[delim]`` is ``<IDS|MSG>``), so a
    backend that shares the router's key can forward them unchanged.
    ``code`` is the code a kernel runs: the cell with its ``%link`` lines
    blanked; ``msg["content"]["code"]`` is the cell as the frontend sent it.
    """

    msg: dict[str, Any]
    frames: list
    delim: int
    idents: list[bytes]
    route: Route
    code: str
    execution_count: int
    #: The code the kernel gets when it must differ from the cell (see routing).
    kernel_code: str | None = None
    #: Whether the cell goes into the local kernel's history, and whether it has.
    record: bool = False
    recorded: bool = False

    @property
    def content(self) -> dict[str, Any]:
        return self.msg["content"]

    @property
    def kernel_content(self) -> dict[str, Any]:
        """The execute_request content to send a kernel."""
        if self.kernel_code is None:
            return self.msg["content"]
        return {**self.msg["content"], "code": self.kernel_code}

    @property
    def msg_id(self) -> str:
        return self.msg["header"]["msg_id"]



@dataclass
class Reply:
    """What a backend hands back: raw reply frames, or a content to sign."""

    content: dict[str, Any]
    frames: list | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.content.get("status", "error")


class Backend(abc.ABC):
    """A place where cells run.

    Lifecycle (all on the router's event loop): :meth:`start` once, then any
    number of :meth:`execute`, each possibly cut short by :meth:`interrupt`
    (called from the same loop while ``execute`` is awaiting), then
    :meth:`shutdown` once. Subclasses implement all four.
    """

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Make the backend ready to execute; raise a LinkError if it cannot."""

    @abc.abstractmethod
    async def execute(self, request: ExecuteRequest) -> Reply:
        """Run one cell, relaying its outputs; return the execute_reply to send."""

    def after_reply(self) -> None:
        """Called once the cell's execute_reply is sent: time for background work."""

    @abc.abstractmethod
    async def interrupt(self) -> None:
        """Interrupt the cell that is running, if any."""

    @abc.abstractmethod
    async def shutdown(self, *, restart: bool = False) -> None:
        """End every process this backend started and wait for them."""

    def status(self) -> dict[str, Any]:
        """A one-line summary for ``%link status``."""
        return {"target": self.name}
