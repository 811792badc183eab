"""The kernels of a remote backend: start, keepalive, release, warm standby, idle timer.

:class:`KernelLifecycle` is a mixin of
:class:`~link_kernel.backends.remote.RemoteBackend`: it owns how a kernel on the
host comes and goes, and nothing of the cell it runs.

- start: a fresh kernel through :class:`~link_kernel.provisioner.LinkProvisioner`
  (a Slurm job on a Slurm host), connected and ready;
- keepalive: while any kernel of the host lives, its supervisor gets a
  keepalive every second; without them the host kills the kernel;
- release: shutdown request, SIGTERM, SIGKILL, until the host reports the
  kernel's process group gone (:class:`ShutdownStep` says which step did it);
- warm standby: the next cell's kernel, booted once a cell's reply is out, with
  one silent cell run in it (and the last cell's data preloaded); a cell takes it
  if it suits (:meth:`KernelLifecycle._fresh_kernel`). While cells come back to
  back (Run All), a second one boots behind it (:meth:`KernelLifecycle._start_spare`);
- the kept kernel's idle timer and ``%link release``;
- the host's fork servers (:mod:`link_kernel.backends.forkserver`), one per
  python: a kernel is forked from one when it serves, and starts as a fresh
  interpreter when it does not.

It may not touch a cell's inputs, outputs, files or interrupts: those are
:mod:`link_kernel.backends.remote`'s, which imports this module (never the
reverse). It reads the backend's ``host``, ``name``, ``context``, ``transport``,
``start_timeout``, ``shutdown_wait``, ``say``, ``state``, ``_closing``,
``reach()`` and ``_transport()``, and keeps the kernel state the backend's
``__init__`` sets: ``kept``, ``standby``, ``_spares``, ``_pressed``, ``_spares_timer``, ``algo``, ``_live``, ``_keepalive``,
``_idle``, ``_releasing``, ``_pythons``, ``_slurm``, ``_forks``, and ``last["shutdown"]``;
the cell sets ``_standby_due`` and ``_last_blobs`` for the next standby (which
keeps ``_standby_blobs``, the blobs it holds).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..connection import KernelConnection
from ..errors import ConnectionLostError, KernelDiedError, KernelStartError, LinkError
from ..provisioner import LinkProvisioner, python_spec
from ..slurm import SlurmLaunch, find_commands
from ..slurm import resources as slurm_resources
from .forkserver import ForkServer
from .local import exit_description

log = logging.getLogger(__name__)

#: Cells that come less than this apart, after one waited for its standby, are a Run
#: All: the backend keeps a second standby booting (see KernelLifecycle._start_spare).
RUN_ALL_GAP = 1.0
#: Standbys booting behind the first one in a Run All. Two cost more than they save on
#: two cores: remote_cell.py's back to back was 117 ms a cell with two, 70-73 ms with one.
SPARES = 1


class ShutdownStep(enum.Enum):
    """Which step of the escalating shutdown ended a kernel."""

    REQUEST = "shutdown_request"
    TERM = "SIGTERM"
    KILL = "SIGKILL"
    DROPPED = "supervisor dropped"
    DIED = "died on its own"


@dataclass(eq=False)
class RemoteKernel:
    """One started kernel on a host."""

    provisioner: LinkProvisioner
    conn: KernelConnection
    pid: int
    kernel_name: str = ""
    #: The Slurm resources its job holds (empty off Slurm).
    resources: tuple[tuple[str, str], ...] = ()
    started_at: float = field(default_factory=time.monotonic)
    cells: int = 0
    #: The router has asked it to end (it ends once its cell is over).
    ending: bool = False
    #: Bytes of the last cell's data it holds ready (a standby; see agent.preload).
    preloaded: int = 0
    #: The fork server (its socket's name) it was forked from; "" if it was exec'd.
    forked_by: str = ""
    #: A taken standby's check that its fork server's modules are still current.
    checking: asyncio.Future | None = None
    #: Found stale and released: never offered as a standby again.
    discarded: bool = False

    @property
    def supervisor(self):
        return self.provisioner.supervisor

    @property
    def alive(self) -> bool:
        return self.provisioner.has_process



class KernelLifecycle:
    """How the backend's kernels start, stay alive, wait as a standby and end."""

    # -- starting and keeping alive ---------------------------------------------------

    async def _python(self, kernel_name: str) -> str:
        """The host python for a kernelspec name ("" = the host's own python), asked of
        the host once."""
        if not kernel_name and self.host.python:
            return self.host.python
        python = self._pythons.get(kernel_name)
        if python is None:
            transport = self._transport()
            if kernel_name:
                python = await transport.kernel_python(kernel_name, self.host.python or None)
            else:
                python = await transport.default_python()
            self._pythons[kernel_name] = python
        return python

    async def _slurm_launch(self, wanted: tuple[tuple[str, str], ...]) -> SlurmLaunch | None:
        """How to start a kernel as a Slurm job, on a Slurm host."""
        if not self.host.slurm:
            return None
        if self._slurm is None:
            self._slurm = await find_commands(self._transport())
        return SlurmLaunch(self._slurm, slurm_resources(self.host, wanted))

    async def start_kernel(
        self,
        timings: dict[str, float] | None = None,
        kernel_name: str = "",
        resources: tuple[tuple[str, str], ...] = (),
    ) -> RemoteKernel:
        """Start a fresh kernel on the host and connect to it.

        ``resources`` are the cell's Slurm options (a Slurm host only).
        """
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        await self.reach()
        timings["connect"] = time.perf_counter() - t0
        kernel_name = kernel_name or self.host.kernel
        python = await self._python(kernel_name)
        fork_server = await self._fork_server(python)
        timings["fork_server"] = time.perf_counter() - t0 - timings["connect"]
        provisioner = LinkProvisioner(
            kernel_id=uuid.uuid4().hex,
            kernel_spec=python_spec(),
            host=self.name,
            transport=self._transport(),
            python=python,
            start_timeout=self.start_timeout,
            slurm=await self._slurm_launch(resources),
            on_queue=lambda text: self.say(text),
            fork_server=fork_server,
        )
        t1 = time.perf_counter()
        try:
            kwargs = await provisioner.pre_launch()
            info = await provisioner.launch_kernel(kwargs.pop("cmd"), **kwargs)
        except LinkError:
            await provisioner.cleanup()
            raise
        except (OSError, EOFError) as exc:
            await provisioner.cleanup()
            msg = f"the kernel on {self.name} did not start: {exc}"
            raise KernelStartError(msg) from exc
        timings["start"] = time.perf_counter() - t1
        conn = KernelConnection(info, context=self.context, name=self.name)
        conn.open()
        supervisor = provisioner.supervisor
        ready = supervisor.ready.result()
        kernel = RemoteKernel(
            provisioner,
            conn,
            pid=int(ready["pid"]),
            kernel_name=kernel_name,
            resources=resources,
            forked_by=fork_server if ready.get("forked") else "",
        )
        if self.algo is None:
            modules = supervisor.hello.result().get("modules", {})
            self.algo = "xxh3t" if "xxhash" in modules else "sha256"
        supervisor.exited.add_done_callback(lambda fut, k=kernel: self._on_exit(k, fut))
        self._live.add(kernel)
        self._ensure_keepalive()
        t2 = time.perf_counter()
        try:
            await conn.wait_ready(self.start_timeout)
        except BaseException:
            await self._release(kernel)
            raise
        timings["ready"] = time.perf_counter() - t2
        return kernel

    async def _fork_server(self, python: str) -> str:
        """The socket of the host's fork server for ``python`` ("" for none), which
        imports the notebook's modules first (once each: later kernels have them)."""
        if not self.host.forks_kernels or not python or self._closing:
            return ""
        server = self._forks.get(python)
        if server is None:
            server = self._forks[python] = ForkServer(self.name, self._transport(), python)
        name = await server.socket(self.start_timeout)
        self._ensure_keepalive()
        if name and self.state.modules:
            server.import_ahead(self.state.modules)
        return name

    async def warm_ahead(self, modules: list[str]) -> None:
        """The saved notebook routes cells here: start the host's fork server now,
        with the modules the notebook imports, and a standby forked from it, so its
        first routed cell finds a kernel with them (see :mod:`link_kernel.warmup`).

        Only where kernels are forked (a fork server and a standby cost the host a
        process each, as after any cell); a failure is logged: the cell tries again."""
        if not (self.host.forks_kernels and self.host.keeps_standby) or self._closing:
            return
        try:
            await self.reach()
            python = await self._python(self.host.kernel)
            if not await self._fork_server(python):
                return
            self._forks[python].import_ahead(modules)  # before the standby's fork
            self._start_standby()
        except (LinkError, OSError, EOFError, asyncio.TimeoutError) as exc:
            log.info("%s not warmed ahead of the notebook's cells: %s", self.name, exc)

    async def _close_fork_servers(self) -> None:
        servers = list(self._forks.values())
        self._forks.clear()
        for server in servers:
            await server.close()

    def _on_exit(self, kernel: RemoteKernel, fut: asyncio.Future) -> None:
        result = fut.result() if not fut.cancelled() else {}
        transport = self.transport
        if result.get("lost") and transport is not None and not transport.connected:
            err: LinkError = ConnectionLostError(
                self.name, f"lost the connection to {self.name} while its kernel ran"
            )
        elif result.get("lost"):
            err = KernelDiedError(f"the kernel on {self.name} ended without a word")
        else:
            desc = exit_description(result.get("status"))
            err = KernelDiedError(f"the kernel on {self.name} died ({desc})")
        kernel.conn.close(err)
        self._live.discard(kernel)
        if self.kept is kernel:
            self.kept = None

    def _ensure_keepalive(self) -> None:
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.ensure_future(self._send_keepalives())

    async def _send_keepalives(self) -> None:
        while True:
            supervisors = [k.supervisor for k in self._live if k.alive]
            for server in self._forks.values():
                supervisors += server.supervisors()
            if not supervisors:
                return
            for supervisor in supervisors:
                supervisor.keepalive()
            await asyncio.sleep(1.0)

    # -- releasing --------------------------------------------------------------------

    async def _release(self, kernel: RemoteKernel, *, tidy_later: bool = False) -> ShutdownStep:
        """Escalate until the host reports the kernel's process group gone.

        Then close its tunnels and its supervisor's session, at once or, with
        ``tidy_later``, in a kept background task (a cell's reply need not
        wait for that: its kernel is already gone). A Slurm job's end is
        always waited for: it holds the job's GPUs until it leaves the queue.
        """
        supervisor = kernel.supervisor
        step = ShutdownStep.DIED
        if not supervisor.done:
            step = ShutdownStep.REQUEST
            self._ask_to_end(kernel)
            for next_step, command in (
                (ShutdownStep.TERM, "TERM"),
                (ShutdownStep.KILL, "KILL"),
                (ShutdownStep.DROPPED, None),
            ):
                try:
                    await asyncio.wait_for(asyncio.shield(supervisor.exited), self.shutdown_wait)
                    break
                except asyncio.TimeoutError:
                    step = next_step
                    if command is not None:
                        supervisor.signal(command)
                    else:
                        await supervisor.close()
        kernel.conn.close()
        self.last["shutdown"] = step.value
        if tidy_later and kernel.provisioner.job is None:
            self._keep_task(kernel.provisioner.cleanup())
        else:
            await kernel.provisioner.cleanup()
        return step

    def _ask_to_end(self, kernel: RemoteKernel) -> None:
        """Send the kernel its shutdown_request, once."""
        if kernel.ending:
            return
        kernel.ending = True
        try:
            kernel.conn.send("shutdown_request", {"restart": False}, channel="control")
        except LinkError:
            pass

    async def _timed_release(self, kernel: RemoteKernel, timings: dict[str, float]) -> None:
        t0 = time.perf_counter()
        await self._release(kernel, tidy_later=True)
        timings["release"] = time.perf_counter() - t0

    def _release_soon(self, kernel: RemoteKernel) -> None:
        """Release in the background."""
        self._keep_task(self._release(kernel))

    def _keep_task(self, work) -> None:
        """Run ``work`` in the background; the task is kept (the loop holds tasks only
        weakly) and shutdown waits for it."""
        task = asyncio.ensure_future(work)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def release(self, *, standby: bool = False) -> bool:
        """End the kept kernel (and the standby and fork servers, if asked); True if a
        kernel ended."""
        self._cancel_idle()
        kernels = []
        kernel, self.kept = self.kept, None
        if kernel is not None:
            kernels.append(kernel)
        if standby:
            self._cancel_spares_timer()
            self._pressed = False
            tasks = [self.standby, *self._spares] if self.standby is not None else list(self._spares)
            self.standby, self._spares = None, []
            for task in tasks:
                task.cancel()
            for task in tasks:
                spare = await settled(task)
                if spare is not None:
                    kernels.append(spare)
        for each in kernels:
            await self._release(each)
        if standby:
            await self._close_fork_servers()
        return kernel is not None

    def _schedule_idle(self) -> None:
        self._cancel_idle()
        if self.host.idle_timeout > 0:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(
                self.host.idle_timeout,
                lambda: asyncio.ensure_future(self.release(standby=True)),
            )

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    # -- warm standby -----------------------------------------------------------------

    def _standby_ready(self) -> bool:
        task = self.standby
        return task is not None and task.done() and not task.cancelled() and task.exception() is None

    async def _fresh_kernel(
        self, wanted: str, timings: dict[str, float], resources: tuple[tuple[str, str], ...] = ()
    ) -> RemoteKernel:
        """The warm standby if it suits, else a kernel started now."""
        self._cancel_spares_timer()
        task, self.standby = self.standby, None
        if self._spares:  # the next standby moves up
            self.standby = self._spares.pop(0)
        if task is not None:
            if not task.done():  # cells come faster than a kernel boots
                self._pressed = True
            try:
                kernel = await settled(task)
            except asyncio.CancelledError:  # the cell was interrupted: the standby stays
                if not self._closing:
                    if self.standby is not None:
                        self._spares.insert(0, self.standby)
                    self.standby = task
                else:
                    task.add_done_callback(self._release_when_done)
                raise
            if (
                kernel is not None
                and kernel.alive
                and kernel.kernel_name == wanted
                and kernel.resources == resources
            ):
                timings["standby"] = 1.0
                server = self._forks.get(kernel.provisioner.python)
                if kernel.forked_by and server is not None:  # answered while the inputs go
                    kernel.checking = asyncio.ensure_future(server.check(kernel.forked_by))
                return kernel
            if kernel is not None:
                self._release_soon(kernel)
        return await self.start_kernel(timings, wanted, resources)

    async def _checked(
        self, kernel: RemoteKernel, timings: dict[str, float], resources: tuple[tuple[str, str], ...]
    ) -> RemoteKernel:
        """The standby if its fork server's modules are still what a fresh kernel would
        import, else a kernel started now (from a new fork server)."""
        checking, kernel.checking = kernel.checking, None
        if checking is None:
            return kernel
        why = await checking
        if why is None:
            return kernel
        log.info("a standby on %s was not used: %s", self.name, why)
        kernel.discarded = True
        self._release_soon(kernel)
        timings.pop("standby", None)
        return await self.start_kernel(timings, kernel.kernel_name, resources)

    def _next_standby_now(self, kernel: RemoteKernel) -> None:
        """Boot the next cell's kernel while this cell runs, when a fork makes it cheap
        and there is no big data for it to preload (it preloads what this cell makes:
        that standby boots once this cell is over). Run All then rarely waits.

        Called once the cell's module state is captured: the fork server imports the
        modules the notebook uses now before it forks the standby."""
        if not self._last_blobs and self._forking(kernel):
            self._start_standby()
            if self._pressed:
                self._start_spare()

    def _forking(self, kernel: RemoteKernel) -> bool:
        """True if the next kernel like this one comes from a serving fork server."""
        server = self._forks.get(kernel.provisioner.python)
        return server is not None and server.serving

    def after_reply(self) -> None:
        """The cell's reply is sent: boot the next cell's kernel now.

        Not before, unless a fork server forks it (see _execute): on a small
        machine, booting an interpreter competes with the end of the cell
        (outputs, recording, the reply) for the same cores.
        """
        if self._standby_due:
            self._standby_due = False
            self._start_standby()
        if self._spares or self._pressed:  # Run All is over if no cell comes soon
            self._cancel_spares_timer()
            self._spares_timer = asyncio.get_running_loop().call_later(RUN_ALL_GAP, self._drop_spares)

    def _start_standby(self) -> None:
        """Boot the next cell's kernel in the background (warm standby), holding the
        last cell's big data (``_last_blobs``) ready.

        A standby booted before the last cell made its data (see _next_standby_now)
        holds none of it: it is let go and a new one boots, which costs a fork.
        """
        task = self.standby
        if task is not None and self._last_blobs and self._standby_blobs != self._last_blobs:
            self.standby = None
            if task.done():
                self._release_when_done(task)
            else:
                task.add_done_callback(self._release_when_done)
        if self._last_blobs:  # a spare holds no data: the next cell wants the standby's
            self._drop_spares()
        if self.host.keeps_standby and self.standby is None and not self._closing:
            self._standby_blobs = list(self._last_blobs)
            self.standby = asyncio.ensure_future(self._boot_standby(self._standby_blobs))
            self.standby.add_done_callback(self._standby_done)

    def _start_spare(self) -> None:
        """Boot a second standby behind the first, when cells come back to back.

        A cell takes the standby and the next one starts booting; back to back, the
        next cell comes before that boot is over and waits for most of it. With one
        more standby booting, each boot has two cells' time. Only for forked kernels
        with no big data to preload, and only while cells keep coming: the spare is
        let go when none came for RUN_ALL_GAP (see after_reply).
        """
        if (
            self.host.keeps_standby
            and self.standby is not None
            and len(self._spares) < SPARES
            and not self._last_blobs
            and not self._closing
        ):
            spare = asyncio.ensure_future(self._boot_standby([]))
            spare.add_done_callback(self._spare_done)
            self._spares.append(spare)

    def _drop_spares(self) -> None:
        """Run All is over: back to one standby."""
        self._spares_timer = None
        self._pressed = False
        spares, self._spares = self._spares, []
        for task in spares:
            if task.done():
                self._release_when_done(task)
            else:
                task.add_done_callback(self._release_when_done)

    def _cancel_spares_timer(self) -> None:
        if self._spares_timer is not None:
            self._spares_timer.cancel()
            self._spares_timer = None

    def _spare_done(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("a spare standby on %s did not start: %s", self.name, task.exception())
            if task in self._spares:
                self._spares.remove(task)

    async def _boot_standby(self, blobs: list[str]) -> RemoteKernel:
        """Start a kernel and run one silent empty cell in it.

        IPython's first execution imports and compiles what later ones reuse;
        paid here, in the background, the user's cell does not pay it.
        """
        kernel = await self.start_kernel({}, self.host.kernel)
        agent = "__import__('__link_agent__')"
        code = f"{agent}.warm()\n"
        if self.state.modules:  # the notebook's modules, imported before its next cell
            code += f"{agent}.preimport({self.state.modules!r})\n"
        budget = int(self.host.standby_data * 2**30)
        if blobs and budget > 0:
            store = self._transport().blob_dir
            code += f"{agent}.preload({store!r}, {blobs!r}, {budget})\n"
        try:
            reply = await kernel.conn.request(
                "execute_request",
                {"code": code + "0", "silent": False, "store_history": False,
                 "user_expressions": {"preloaded": f"{agent}.preloaded()"},
                 "allow_stdin": False, "stop_on_error": False},
                timeout=self.start_timeout,
            )
            preloaded = reply["content"].get("user_expressions", {}).get("preloaded", {})
            kernel.preloaded = int(preloaded.get("data", {}).get("text/plain", "0"))
        except (LinkError, asyncio.TimeoutError, ValueError, AttributeError):
            pass
        except BaseException:  # cancelled (released, shut down): end what was started
            await asyncio.shield(self._release(kernel))
            raise
        return kernel

    def _offer_standby(self, kernel: RemoteKernel) -> None:
        if kernel.discarded:
            return  # on its way out already
        if self.host.keeps_standby and self.standby is None and kernel.alive and not self._closing:
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            fut.set_result(kernel)
            self.standby = fut
        else:
            self._release_soon(kernel)

    def _release_when_done(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            self._release_soon(task.result())

    def _standby_done(self, task: asyncio.Future) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("the standby kernel on %s did not start: %s", self.name, task.exception())
            if self.standby is task:
                self.standby = None


async def settled(task: asyncio.Future) -> Any:
    """The task's result, or None if it failed or was cancelled.

    Cancelling the caller raises CancelledError here and leaves the task
    alone (a bare ``await task`` would cancel it and hide the caller's).
    """
    await asyncio.wait([task])
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()



__all__ = ["KernelLifecycle", "RemoteKernel", "ShutdownStep", "settled"]
