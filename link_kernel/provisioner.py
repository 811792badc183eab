"""LinkProvisioner: a jupyter_client kernel provisioner for Link hosts.

Registered under the ``jupyter_client.kernel_provisioners`` entry point as
``link-remote``, so a plain kernelspec can run its kernels on a Link host::

    {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
     "display_name": "Python on gpu", "language": "python",
     "metadata": {"kernel_provisioner": {"provisioner_name": "link-remote",
                                         "config": {"host": "gpu"}}}}

The Link router uses the same class for its per-cell kernels. A launch:

1. ``pre_launch``: connect to the host, create its work directory, put the
   agent there (once per version) and a connection file with ports 0 and a
   fresh key, mode 0600. The key never appears on a command line.
2. ``launch_kernel``: run the bootstrap supervisor with the host's python by
   its absolute path; the kernel binds 127.0.0.1 only, on ports it picks; the
   supervisor reports them; each is made reachable on local 127.0.0.1 (a
   tunnel over ssh). The connection file is removed once the kernel has read it.
3. ``send_signal``/``terminate``/``kill`` go to the supervisor, which signals
   the kernel's process group; ``wait`` returns once the supervisor reports the
   kernel and every process of its group gone.

On a Slurm host (``slurm`` set) the supervisor runs under ``srun`` as a job of
its own (:mod:`link_kernel.slurm`): pre_launch writes only the key, to a 0600
file in the shared work directory; the supervisor writes the connection file
on the node Slurm picks and reports the node's address with the ports, which
the transport reaches through the login node. Time in the queue does not count
against ``start_timeout``; while the job waits, ``on_queue`` gets a line each
time squeue's answer changes. ``cleanup`` scancels the job and returns once
squeue no longer lists it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import sys
from importlib import resources
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Any as AnyTrait
from traitlets import Float, Instance, Unicode

from .backends.local import REMOTE_KERNEL_ARGS
from .errors import LinkError
from .slurm import SlurmJob, SlurmLaunch, job_name, srun_argv
from .sync.files import SCAN_SOURCE
from .transports import LaunchSpec, Supervisor, Transport

BOOTSTRAP = (resources.files("link_kernel") / "bootstrap.py").read_text()
AGENT = (
    (resources.files("link_kernel") / "agent.py").read_text()
    + "\n\n# link_kernel.sync.files.scan_tree, for the file sync\n"
    + SCAN_SOURCE
)
AGENT_NAME = f"agent-{hashlib.sha256(AGENT.encode()).hexdigest()[:12]}.py"
PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
_SIGNALS = {signal.SIGINT: "INT", signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}


async def put_agent(transport: Transport) -> str:
    """The agent's path on the host, put there once per version."""
    agent = transport.path(".link", AGENT_NAME)
    if not await transport.exists(agent):
        await transport.put(agent, AGENT.encode(), 0o644)
    return agent


def python_spec(display_name: str = "Link remote kernel") -> KernelSpec:
    return KernelSpec(
        argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=display_name,
        language="python",
        interrupt_mode="signal",
        metadata={},
        resource_dir="",
    )


class LinkProvisioner(KernelProvisionerBase):
    """Starts one ipykernel on a Link host and makes it reachable on 127.0.0.1."""

    host = Unicode("", config=True, help="Link host alias (see 'link-kernel hosts list').")
    start_timeout = Float(60.0, config=True, help="Seconds for the kernel to start.")
    dead_after = Float(
        10.0, config=True, help="The host kills the kernel this long after the router goes silent."
    )
    transport = Instance(Transport, allow_none=True)
    python = Unicode("", help="The host's python, absolute; found on the host when empty.")
    slurm = Instance(SlurmLaunch, allow_none=True, help="Start the kernel as a Slurm job.")
    on_queue = AnyTrait(None, help="Called with a line of text when a waiting job's state changes.")
    queue_poll = Float(1.0, help="Seconds between squeue calls while the job waits.")
    fork_server = Unicode("", help="The host's fork server to ask for the kernel (its socket's name).")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supervisor: Supervisor | None = None
        self._connection_file = ""
        self._reached: list[tuple[str, int]] = []
        self.remote_info: dict[str, Any] = {}
        self.job: SlurmJob | None = None
        self._job_ended = False

    # -- launch ------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        if self.transport is None:
            self.transport = self._transport_from_registry(kwargs.get("cwd"))
        transport = self.transport
        await transport.connect()
        await transport.prepare()
        if not self.python:
            self.python = await transport.default_python()
        agent = await put_agent(transport)
        key = secrets.token_hex(32)
        self._connection_file = transport.path(".link", f"kernel-{self.kernel_id}.json")
        info = {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "key": key,
            "signature_scheme": "hmac-sha256",
            "kernel_name": "",
            **dict.fromkeys(PORTS, 0),
        }
        self.remote_info = info
        prefix: list[str] = []
        if self.slurm is None:
            await transport.put(self._connection_file, json.dumps(info).encode(), 0o600)
            connection_arg = self._connection_file
        else:  # the node writes the connection file; it reads the key from here
            self._connection_file = transport.path(".link", f"key-{self.kernel_id}")
            await transport.put(self._connection_file, key.encode(), 0o600)
            connection_arg = f"node:{self._connection_file}"
            name = job_name(self.kernel_id)
            prefix = srun_argv(self.slurm.commands.srun, name, self.slurm.resources)
            self.job = SlurmJob(
                transport, self.slurm.commands, name, self.slurm.resources.get("partition", "")
            )
        self._spec = LaunchSpec(
            python=self.python,
            connection_file=connection_arg,
            agent_file=agent,
            dead_after=self.dead_after,
            kernel_args=[*REMOTE_KERNEL_ARGS, *kwargs.pop("kernel_args", [])],
            cwd=transport.workdir,
            prefix=prefix,
            fork_server=self.fork_server,
        )
        kwargs["cmd"] = self._spec.argv("<link_kernel.bootstrap>")
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        transport = self.transport
        assert transport is not None, "pre_launch first"
        self.supervisor = await transport.spawn(self._spec, BOOTSTRAP)
        watch = asyncio.ensure_future(self._watch_queue()) if self.job is not None else None
        try:
            ready = await self.supervisor.started(
                self.start_timeout, sys.version_info[:2], queue=self.job is not None
            )
            if self.job is not None:
                self.job.job_id = str(self.supervisor.hello.result().get("job") or self.job.job_id)
            node = str(ready.get("ip") or "127.0.0.1")
            local = {}
            ip = "127.0.0.1"
            for name, port in ready["ports"].items():
                ip, local[name] = await transport.reach(int(port), node)
                self._reached.append((node, int(port)))
        except BaseException:
            await self.cleanup()
            raise
        finally:
            if watch is not None:
                watch.cancel()
            await transport.remove(self._connection_file)
        self.connection_info = {
            "ip": ip,
            "transport": "tcp",
            "key": self.remote_info["key"].encode(),
            "signature_scheme": "hmac-sha256",
            **local,
        }
        return self.connection_info

    async def _watch_queue(self) -> None:
        """While the job waits: tell ``on_queue`` its state, once per change."""
        supervisor, job = self.supervisor, self.job
        assert supervisor is not None and job is not None
        job.job_id = await asyncio.shield(supervisor.queued)
        said = ""
        while not supervisor.hello.done():
            try:
                state = await job.queue_state()
            except (LinkError, OSError, asyncio.TimeoutError) as exc:
                self.log.debug("squeue failed: %s", exc)
                state = None
            if state is not None and not supervisor.hello.done():
                text = state.describe(self.host)
                if text != said and self.on_queue is not None:
                    self.on_queue(text)
                said = text
            await asyncio.sleep(self.queue_poll)

    def _transport_from_registry(self, cwd: str | None) -> Transport:
        from . import hosts
        from .transports.factory import make_transport

        known = hosts.load()
        if self.host not in known:
            from .errors import UnknownTargetError

            raise UnknownTargetError(self.host, sorted(known))
        return make_transport(known[self.host], cwd or ".")

    # -- process control -----------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.supervisor is not None and not self.supervisor.done

    async def poll(self) -> int | None:
        if self.supervisor is None or not self.supervisor.done:
            return None
        return self.supervisor.exited.result().get("status") or 0

    async def wait(self) -> int | None:
        if self.supervisor is None:
            return None
        result = await asyncio.shield(self.supervisor.exited)
        return result.get("status")

    async def send_signal(self, signum: int) -> None:
        if signum == 0 or self.supervisor is None:
            return
        name = _SIGNALS.get(signal.Signals(signum))
        if name is None:
            msg = f"signal {signum} cannot be sent to a Link kernel; use SIGINT, SIGTERM or SIGKILL"
            raise ValueError(msg)
        self.supervisor.signal(name)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Close the tunnels and the supervisor (which ends the kernel if it still runs).

        A Slurm job is cancelled first (it may still wait in the queue, where
        closing srun's stdin does nothing) and is gone from squeue on return.
        """
        transport, supervisor = self.transport, self.supervisor
        if transport is not None:
            for node, port in self._reached:
                await transport.unreach(port, node)
        self._reached.clear()
        job = self.job
        if job is not None and not self._job_ended:
            self._job_ended = True
            if supervisor is not None and not supervisor.done:
                await job.cancel()
            if supervisor is not None:
                await supervisor.close()
            await job.end()
        elif supervisor is not None:
            await supervisor.close()

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["host"] = self.host
        return info
