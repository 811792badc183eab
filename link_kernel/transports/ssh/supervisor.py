"""The supervisor's session: a bootstrap supervisor running in a pty session on the host.

Owns ``SSHSupervisor``, the :class:`~link_kernel.transports.Supervisor` whose output comes from a
``RemoteCommand`` and whose stdin is that command's. Parsing the supervisor's lines is the base
class's; starting the command is :mod:`.transport`'s.
"""

from __future__ import annotations

import asyncio

from ...errors import LinkError
from .. import Supervisor
from .command import RemoteCommand


class SSHSupervisor(Supervisor):
    """A bootstrap supervisor running in a pty session on the host."""

    silent_start_hint = (
        "The host's login shell runs its startup files (~/.bashrc, ~/.profile) before the "
        "kernel: one of them may be waiting on something, such as a lock (pyenv, conda) or "
        "a prompt. 'ssh HOST true' shows whether it does."
    )

    def __init__(self, host: str, loop) -> None:
        super().__init__(host, loop)
        self.command: RemoteCommand | None = None

    def on_output(self, data: bytes) -> None:
        if data:
            self.feed(data)
        else:
            status = self.command.exit_status if self.command is not None else None
            self.feed_eof(status)

    def write(self, data: bytes) -> None:
        command = self.command
        if command is None:
            return
        try:
            command.write(data)
        except LinkError:
            pass

    async def close(self) -> None:
        command = self.command
        if command is None:
            return
        command.close()
        try:
            await asyncio.to_thread(command.wait, 10.0)
        except LinkError:
            pass
