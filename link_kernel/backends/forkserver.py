"""A host's fork server, as the router keeps it.

The fork server (:mod:`link_kernel.bootstrap`, run with ``serve:NAME``) is one
long-lived process per host and python that has ipykernel, the agent and the
notebook's installed modules imported; each kernel's supervisor asks it to
fork the kernel instead of starting a fresh interpreter. This class starts it
through the host's transport like a kernel's supervisor, keeps it alive with
the same keepalives, tells it which modules to import ahead, and ends it. It
owns nothing of a kernel: a kernel forked from it is supervised on its own
line, and a fork server that is gone or refuses only means the next kernel
starts the slow way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys

from ..errors import LinkError
from ..transports import LaunchSpec, Supervisor, Transport

log = logging.getLogger(__name__)

#: Starts of a host's fork server that may fail before the router stops trying.
MAX_STARTS = 3


class ForkServer:
    """One host's fork server for one python: starting, serving, retired."""

    def __init__(self, host: str, transport: Transport, python: str, dead_after: float = 10.0) -> None:
        self.host = host
        self.transport = transport
        self.python = python
        self.dead_after = dead_after
        self.supervisor: Supervisor | None = None
        #: Its socket's name (abstract, so no path limit and nothing left on disk).
        self.name = ""
        self._starting: asyncio.Future | None = None
        #: Modules asked for already (imported or refused, the server says which).
        self.asked: set[str] = set()
        self.imported: list[str] = []
        self.skipped: dict[str, str] = {}
        #: Why it ended or will not start (empty while it serves).
        self.ended = ""
        #: Servers that stopped taking requests but still wait for their kernels.
        self.retired: list[Supervisor] = []
        self.starts = 0
        #: Answers awaited to CHECK lines, in the order they were sent.
        self._checks: list[asyncio.Future] = []

    @property
    def pid(self) -> int:
        """Its process id on the host (0 until it serves)."""
        sup = self.supervisor
        return int(sup.ready.result().get("pid", 0)) if self.serving and sup is not None else 0

    @property
    def serving(self) -> bool:
        sup = self.supervisor
        return sup is not None and sup.ready.done() and not sup.done and not self.ended

    async def socket(self, timeout: float) -> str:
        """The socket to give a kernel's supervisor, starting the server if need be;
        "" when there is none to use (the kernel then starts as a fresh interpreter)."""
        if self.serving:
            return self.name
        if self._starting is None or self._starting.done():
            if self.starts >= MAX_STARTS:
                return ""
            self._retire()
            self._starting = asyncio.ensure_future(self._start(timeout))
        starting = self._starting
        try:
            await asyncio.wait_for(asyncio.shield(starting), timeout)
        except (LinkError, OSError, EOFError, asyncio.TimeoutError) as exc:
            log.warning("no fork server on %s: %s", self.host, exc)
            return ""
        except asyncio.CancelledError:
            if starting.cancelled():  # closed while it started (%link release): none
                return ""
            raise
        return self.name if self.serving else ""

    async def _start(self, timeout: float) -> None:
        from ..provisioner import BOOTSTRAP, put_agent

        self.starts += 1
        self.ended = ""
        self.asked.clear()  # a new server has imported nothing yet
        self.imported, self.skipped = [], {}
        await self.transport.connect()
        workdir = await self.transport.prepare()
        name = f"link-fork-{secrets.token_hex(12)}"
        spec = LaunchSpec(
            python=self.python,
            connection_file=f"serve:{name}",
            agent_file=await put_agent(self.transport),
            dead_after=self.dead_after,
            cwd=workdir,
        )
        supervisor = await self.transport.spawn(spec, BOOTSTRAP)
        supervisor.on_report = self._on_report
        supervisor.exited.add_done_callback(lambda fut, s=supervisor: self._on_exit(s, fut))
        self.supervisor = supervisor
        try:
            await supervisor.started(timeout, sys.version_info[:2])
        except BaseException:
            self.ended = self.ended or "did not start"
            await supervisor.close()
            raise
        self.name = name
        self.starts = 0  # it served: a later end may restart it as often as the first time

    async def check(self, name: str, timeout: float = 10.0) -> str | None:
        """Why a kernel forked by server ``name`` may hold modules a fresh kernel would
        not (a package's files changed since, or the server is gone and cannot say),
        or None if it is as fresh as a new one."""
        if name != self.name or not self.serving:
            return self.ended or "its fork server is gone"
        assert self.supervisor is not None
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self._checks.append(answer)
        self.supervisor.write(b"CHECK\n")
        try:
            return await asyncio.wait_for(asyncio.shield(answer), timeout)
        except asyncio.TimeoutError:
            return "its fork server did not answer"

    def _on_report(self, word: str, value: dict) -> None:
        if word == "CHECKED" and self._checks:
            answer = self._checks.pop(0)
            changed = value.get("stale")
            if not answer.done():
                answer.set_result(f"the files of {changed} changed since it was imported" if changed else None)
        if word == "IMPORTED":
            self.imported += value.get("imported") or []
            self.skipped.update(value.get("skipped") or {})
        elif word == "STALE":
            self.ended = str(value.get("reason") or "retired")
            log.info("the fork server on %s stopped forking: %s", self.host, self.ended)

    def _on_exit(self, supervisor: Supervisor, fut: asyncio.Future) -> None:
        result = fut.result() if not fut.cancelled() else {}
        if supervisor is self.supervisor and not self.ended:
            self.ended = str(result.get("reason") or f"ended (status {result.get('status')})")
            if result.get("status") == 3:  # refused at start (see bootstrap.serve): for good
                self.starts = MAX_STARTS
                log.warning("no fork server on %s: %s", self.host, self.ended)
        if supervisor in self.retired:
            self.retired.remove(supervisor)
        if supervisor is self.supervisor:  # no answer comes now
            for answer in self._checks:
                if not answer.done():
                    answer.set_result(self.ended or "its fork server is gone")
            self._checks.clear()

    def _retire(self) -> None:
        """Keep an ended server's supervisor until it exits (it waits for its kernels)."""
        supervisor, self.supervisor = self.supervisor, None
        self.name = ""
        for answer in self._checks:
            if not answer.done():
                answer.set_result(self.ended or "its fork server is gone")
        self._checks.clear()
        if supervisor is not None and not supervisor.done:
            self.retired.append(supervisor)

    def import_ahead(self, modules: list[str]) -> None:
        """Ask the server to import these modules (the new ones) before its next fork."""
        new = [m for m in modules if m not in self.asked]
        if not new or not self.serving:
            return
        self.asked.update(new)
        assert self.supervisor is not None
        self.supervisor.write(b"IMPORT " + json.dumps(new).encode() + b"\n")

    def supervisors(self) -> list[Supervisor]:
        """Every supervisor of it that is still there (for keepalives)."""
        out = [s for s in self.retired if not s.done]
        if self.supervisor is not None and not self.supervisor.done:
            out.append(self.supervisor)
        return out

    async def close(self) -> None:
        """End it (its kernels' supervisors end theirs on their own lines)."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        self.ended = self.ended or "closed"
        for supervisor in self.supervisors():
            await supervisor.close()
        self.retired.clear()


__all__ = ["ForkServer"]
