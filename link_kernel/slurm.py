"""Slurm: a cell's kernel as a job that ``srun`` starts from a login node.

On a Slurm host (``slurm = true`` in the registry) the bootstrap supervisor is
the one task of a job of its own::

    srun --job-name=link-<kernel id> --ntasks=1 --nodes=1 --unbuffered
         [--gres=gpu:N] [--cpus-per-task=C] [--mem=M] [--time=T] [--partition=P]
         PYTHON -c BOOTSTRAP WORKDIR node:KEY_FILE ...

so Slurm picks the node and its GPUs (CUDA_VISIBLE_DEVICES comes from the
allocation) and the job ends with the kernel. While the job waits, srun says
``srun: job N queued and waiting for resources`` on its stderr;
:class:`SlurmJob` then asks ``squeue`` why, and ``scancel`` ends the job when
a waiting cell is interrupted or a cell is done.

The argv builders and parsers here are pure; :class:`SlurmJob` runs its
commands on the login node through the host's transport. Slurm is a launcher
that a transport uses: this module imports nothing of ``link_kernel.transports``
and sees a transport only as a :class:`CommandRunner`; the queue state (srun's
``QUEUED`` line, squeue's answer) is parsed here and only here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .errors import LinkError, RemoteEnvironmentError
from .hosts import HostConfig
from .routing import RESOURCE_OPTIONS

log = logging.getLogger(__name__)


class CommandRunner(Protocol):
    """What Slurm needs of a host's transport: its alias and a command run on it."""

    alias: str

    async def run(self, argv: list[str], timeout: float = 30.0) -> tuple[int, bytes, bytes]: ...


#: What srun prints on stderr when the job must wait.
QUEUED = re.compile(r"srun: job (\d+) queued and waiting for resources")
COMMANDS = ("srun", "squeue", "scancel")
_FLAGS = {
    "gpus": "--gres=gpu:{}",
    "cpus": "--cpus-per-task={}",
    "mem": "--mem={}",
    "time": "--time={}",
    "partition": "--partition={}",
}
#: squeue's reasons, in words a notebook user reads.
_REASONS = {"None": "not scheduled yet", "Resources": "Resources", "Priority": "Priority"}


def job_name(kernel_id: str) -> str:
    return f"link-{kernel_id}"


def resources(host: HostConfig, cell: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """The host's default resources, overridden by the cell's own."""
    merged = host.slurm_defaults()
    merged.update(dict(cell))
    return merged


def srun_argv(srun: str, name: str, wanted: Mapping[str, str]) -> list[str]:
    """The srun prefix of a supervisor's command line (``gpus=0`` asks for no GPU)."""
    argv = [srun, f"--job-name={name}", "--ntasks=1", "--nodes=1", "--unbuffered"]
    for key in RESOURCE_OPTIONS:
        value = wanted.get(key, "")
        if value and not (key == "gpus" and value == "0"):
            argv.append(_FLAGS[key].format(value))
    return argv


@dataclass(frozen=True)
class QueueState:
    """A waiting job, as squeue reports it."""

    job: str
    reason: str
    ahead: int

    def describe(self, host: str) -> str:
        ahead = "first in line" if self.ahead == 0 else f"{self.ahead} ahead"
        reason = _REASONS.get(self.reason, self.reason)
        return f"[link] {host}: job {self.job} is queued ({reason}), {ahead}\n"


PENDING_FORMAT = "%i|%r"


def parse_pending(out: str, job: str) -> QueueState | None:
    """Find ``job`` in ``squeue -h -t PENDING -o '%i|%r' --sort=-p,i`` output."""
    rows = [line.split("|", 1) for line in out.splitlines() if "|" in line]
    for ahead, (job_id, reason) in enumerate(rows):
        if job_id.strip() == job:
            return QueueState(job, reason.strip(), ahead)
    return None


@dataclass(frozen=True)
class SlurmCommands:
    """Absolute paths of the Slurm commands on a login node."""

    srun: str
    squeue: str
    scancel: str


async def find_commands(transport: CommandRunner) -> SlurmCommands:
    """Look the Slurm commands up once on the host's PATH."""
    script = 'for c in srun squeue scancel; do command -v "$c" || echo "?$c"; done'
    status, out, err = await transport.run(["sh", "-c", script], timeout=30)
    paths = out.decode(errors="replace").split()
    missing = [p.lstrip("?") for p in paths if not p.startswith("/")]
    if len(paths) != len(COMMANDS) or missing:
        msg = (
            f"{transport.alias} is a Slurm host, but {', '.join(missing) or 'srun'} "
            f"is not on its PATH"
        )
        raise RemoteEnvironmentError(
            msg,
            hint=f"Install Slurm's client commands on {transport.alias}, or register it "
            "without --slurm.",
        )
    return SlurmCommands(*paths)


@dataclass
class SlurmLaunch:
    """What a provisioner needs to start its kernel as a Slurm job."""

    commands: SlurmCommands
    resources: dict[str, str] = field(default_factory=dict)


class SlurmJob:
    """One kernel's job, named ``link-<kernel id>``; its id once Slurm tells it."""

    def __init__(self, transport: CommandRunner, commands: SlurmCommands, name: str,
                 partition: str = "") -> None:
        self.transport = transport
        self.commands = commands
        self.name = name
        self.partition = partition
        self.job_id = ""

    async def queue_state(self) -> QueueState | None:
        """Why the job waits and how many wait before it; None once it does not."""
        argv = [self.commands.squeue, "-h", "-t", "PENDING", "-o", PENDING_FORMAT, "--sort=-p,i"]
        if self.partition:
            argv += ["-p", self.partition]
        status, out, _ = await self.transport.run(argv, timeout=10)
        if status != 0 or not self.job_id:
            return None
        return parse_pending(out.decode(errors="replace"), self.job_id)

    async def cancel(self) -> None:
        target = [self.job_id] if self.job_id else [f"--name={self.name}"]
        await self.transport.run([self.commands.scancel, "--quiet", *target], timeout=10)

    async def listed(self) -> bool:
        """True while squeue lists the job (pending, running or completing)."""
        argv = [self.commands.squeue, "-h", f"--name={self.name}", "-o", "%i"]
        status, out, _ = await self.transport.run(argv, timeout=10)
        return status != 0 or bool(out.strip())

    async def end(self, timeout: float = 30.0) -> bool:
        """scancel the job and wait until squeue no longer lists it; False on timeout."""
        deadline = time.monotonic() + timeout
        try:
            await self.cancel()
            while await self.listed():
                if time.monotonic() > deadline:
                    log.warning("Slurm job %s (%s) still listed after %g s", self.job_id,
                                self.name, timeout)
                    return False
                await asyncio.sleep(0.02)
        except (LinkError, OSError, asyncio.TimeoutError) as exc:
            log.warning("could not end Slurm job %s (%s): %s", self.job_id, self.name, exc)
            return False
        return True


__all__ = [
    "QUEUED",
    "CommandRunner",
    "QueueState",
    "SlurmCommands",
    "SlurmJob",
    "SlurmLaunch",
    "find_commands",
    "job_name",
    "parse_pending",
    "resources",
    "srun_argv",
]
