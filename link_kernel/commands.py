"""The router's own commands, a cell's ``%link`` lines: help, default, status, hosts, release, sync.

:class:`RouterCommands` is a mixin of :class:`~link_kernel.kernel.LinkKernel`.
:mod:`link_kernel.routing` parses a cell's ``%link`` lines into
:class:`~link_kernel.routing.Command` objects; the router runs each with
:meth:`RouterCommands.run_command` before the cell's code, and ``command_NAME``
handles ``%link NAME``. A command shows its answer in the cell's output
(:meth:`RouterCommands.display`) and raises a :class:`~link_kernel.errors.LinkError`
to fail the cell.

It may not route or run cells, start or stop backends, or touch interrupts:
those are the router's (:mod:`link_kernel.kernel`), which imports this module
(never the reverse). It reads the router's ``default`` (and sets it),
``local``, ``remotes``, ``last_cell``, ``_unsynced``, ``session``,
``iopub_socket``, and calls its ``known_targets()``, ``hosts()``,
``backend()``, ``_note()`` and ``_topic()``.
"""

from __future__ import annotations

from . import routing
from .backends.remote import RemoteBackend
from .errors import FileSyncError, LinkError

HELP = """\
Link (hybrid) runs each cell where its first line says:

    # link: gpu                     run on host alias 'gpu'
    # link: gpu|tesla|local         first reachable target wins
    # link: gpu keep                keep the host's kernel for the next cells
    # link: gpu kernel=torch-2      use a remote kernelspec
    # link: gpu in=df out=model     name the variables to send and bring back
    # link: gpu files=off timeout=3600

Cells without one run on the default target ({default}).

    %link status                    targets, kernels and the last cell
    %link default TARGET            change the default target
    %link hosts                     known hosts
    %link release [ALIAS]           shut down kept kernels
    %link sync [ALIAS]              sync the working directory now

Pipelines: a cell that starts with '# link: name=NAME after=P1,P2' is a component;
running it brings its parents up to date first (from the cache, or run, hidden).

    %link pipeline                  the components, their parents and states
    %link run [NAME]                bring NAME (or every component) up to date
    %link cache                     the cached results: component, size, age, hits
    %link cache clear [NAME]        drop them (or NAME's)
"""


class RouterCommands:
    """The ``%link`` commands, as methods of the router."""

    async def run_command(self, command: routing.Command, parent: dict) -> None:
        handler = getattr(self, f"command_{command.name}")
        await handler(parent, *command.args)

    def display(self, parent: dict, text: str, markdown: str | None = None) -> None:
        data = {"text/plain": text}
        if markdown is not None:
            data["text/markdown"] = markdown
        self.session.send(
            self.iopub_socket,
            "display_data",
            {"data": data, "metadata": {}, "transient": {}},
            parent,
            ident=self._topic("display_data"),
        )

    async def command_help(self, parent: dict) -> None:
        self.display(parent, HELP.format(default="|".join(self.default)))

    async def command_default(self, parent: dict, chain: str) -> None:
        targets = routing.resolve(routing.parse_targets(chain), self.known_targets())
        self.default = targets
        self.display(parent, f"default target: {'|'.join(targets)}")

    async def command_status(self, parent: dict) -> None:
        rows = [("default", "|".join(self.default), "")]
        local = self.local.status()
        rows.append(("local", "running" if local["alive"] else "stopped", f"pid {local['pid']}"))
        for name, backend in self.remotes.items():
            info = backend.status()
            rows.append((name, info.get("state", ""), info.get("detail", "")))
        if self.last_cell:
            last = self.last_cell
            rows.append(("last cell", last["target"], f"{last['status']}, {last['seconds']} s"))
        width = max(len(r[0]) for r in rows)
        text = "\n".join(f"{a:<{width}}  {b}  {c}".rstrip() for a, b, c in rows)
        table = ["| target | state | detail |", "|---|---|---|"]
        table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        self.display(parent, text, "\n".join(table))

    async def command_hosts(self, parent: dict) -> None:
        rows = [("local", "the notebook's own kernel", "built-in")]
        rows += [(h.alias, h.summary(), h.source) for h in sorted(self.hosts().values(), key=lambda h: h.alias)]
        width = max(len(r[0]) for r in rows)
        text = "\n".join(f"{a:<{width}}  {b}  ({c})" for a, b, c in rows)
        table = ["| host | how | from |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
        self.display(parent, text, "\n".join(table))

    async def command_release(self, parent: dict, alias: str | None = None) -> None:
        if alias is not None:
            routing.resolve((alias,), self.known_targets())
        names = [alias] if alias is not None else list(self.remotes)
        released = []
        for name in names:
            backend = self.remotes.get(name)
            if isinstance(backend, RemoteBackend) and await backend.release(standby=True):
                released.append(name)
        text = f"released: {', '.join(released)}" if released else "no kept kernels to release"
        self.display(parent, text)

    async def command_sync(self, parent: dict, alias: str | None = None) -> None:
        if alias is not None:
            routing.resolve((alias,), self.known_targets())
            if alias == routing.LOCAL:
                raise LinkError("the local kernel works in the notebook folder: nothing to sync")
        names = [alias] if alias is not None else list(self.remotes)
        if not names:
            self.display(parent, "no host to sync with yet: run a cell on one, or name it")
            return
        lines = []
        for name in names:
            backend = self.backend(name)
            if backend.journal is None:
                raise FileSyncError(self._unsynced.removeprefix("[link] ").strip())
            report = await backend.sync_files()
            for note in backend.notes:
                self._note(parent, note)
            backend.notes.clear()
            lines.append(
                f"{name}: {len(report.uploaded)} sent, {len(report.downloaded)} received, "
                f"{len(report.deleted_local) + len(report.deleted_remote)} deleted, "
                f"{len(report.conflicts)} conflicts"
            )
        self.display(parent, "\n".join(lines))


__all__ = ["HELP", "RouterCommands"]
