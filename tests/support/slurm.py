"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd.

``SlurmCluster`` writes everything in a temporary directory: a munge key and
socket (munged runs as the ``munge`` user; its socket directory is mode
0755), ``slurm.conf`` and ``gres.conf``, state, spool, pid and log files, and
two fake GPUs (character devices ``nvidia0`` and ``nvidia1``, made with
``mknod ... c 1 3``) that Slurm hands out with ``--gres=gpu:N``, setting
CUDA_VISIBLE_DEVICES::

    with SlurmCluster() as cluster:
        subprocess.run(["srun", "--gres=gpu:1", "env"], env=cluster.env(), check=True)

The node is ``localhost`` (127.0.0.1) with 2 CPUs and 2 GPUs in partition
``debug``; the daemons listen on free ports, so two clusters can run side by
side. Commands find the cluster through ``SLURM_CONF`` (:meth:`env`).

Processes are owned: each daemon is a ``Popen`` that ``close()`` terminates
and waits for (PID 1 of a container may not reap orphans). Root is needed
(slurmd runs jobs as their users; munged is started as ``munge``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .processes import Service, end_process, free_port

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
#: Slurm tracks a job's processes by cgroup where the v1 freezer is mounted (every
#: process of the job, double-forked daemons included); elsewhere by parentage.
CGROUP_V1 = os.path.isdir("/sys/fs/cgroup/freezer")


class SlurmError(RuntimeError):
    """The cluster did not start; the message carries the daemons' logs."""


def available() -> str:
    """Why a cluster cannot start here ('' if it can)."""
    if os.geteuid() != 0:
        return "needs root (slurmd and munged)"
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    missing += [c for c in ("srun", "squeue", "scancel", "sinfo", "mungekey") if not shutil.which(c)]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install slurm-wlm munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (apt-get install munge)"
    return ""


class SlurmCluster(Service):
    """munged + slurmctld + slurmd for one node, alive as long as the context."""

    partition = "debug"
    gpus = 2

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="link-slurm-"))
        self.dir.chmod(0o755)  # munged (user munge) must reach its socket dir
        self.conf = self.dir / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.log_dir = self.dir / "log"
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env()}

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._write_files()
        self._start_munged()
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait_idle()

    def close(self) -> None:
        """Terminate each daemon (slurmd first) and wait for it; remove the files."""
        for _, proc in reversed(self._procs):
            end_process(proc, STOP_TIMEOUT)
        self._procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- queries --------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 30.0) -> str:
        """Run a Slurm command against this cluster; return its stdout."""
        done = subprocess.run(
            argv, env=self._environ(), capture_output=True, text=True, timeout=timeout, check=True
        )
        return done.stdout

    def jobs(self) -> list[str]:
        """squeue's jobs (pending, running, completing): 'ID|STATE|NAME' each."""
        return self.run("squeue", "-h", "-o", "%i|%T|%j").split()

    def wait_no_jobs(self, timeout: float = 30.0) -> list[str]:
        """Wait until squeue lists no job; return what it still lists."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            if not jobs or time.monotonic() > deadline:
                return jobs
            time.sleep(0.1)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")) + sorted(self.munge_dir.glob("*.log")):
            try:
                parts.append(f"== {path.name}\n" + path.read_text()[-4000:])
            except OSError:
                pass
        return "\n".join(parts)

    # -- setup ----------------------------------------------------------------------

    def _write_files(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o755)
        for sub in ("state", "spool", "log", "dev"):
            (self.dir / sub).mkdir(mode=0o755)
        for index in range(self.gpus):
            os.mknod(self.dir / "dev" / f"nvidia{index}", 0o666 | 0o020000, os.makedev(1, 3))
        ctld_port, slurmd_port = free_port(), free_port()
        d = self.dir
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=linktest",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    f"StateSaveLocation={d / 'state'}",
                    f"SlurmdSpoolDir={d / 'spool'}",
                    f"SlurmctldPidFile={d / 'slurmctld.pid'}",
                    f"SlurmdPidFile={d / 'slurmd.pid'}",
                    f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
                    f"ProctrackType=proctrack/{'cgroup' if CGROUP_V1 else 'linuxproc'}",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "GresTypes=gpu",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "MessageTimeout=5",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=1",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "KillWait=1",
                    "MinJobAge=2",
                    "InactiveLimit=0",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:{self.gpus} "
                    "State=UNKNOWN",
                    f"PartitionName={self.partition} Nodes=localhost Default=YES "
                    "MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        last = self.gpus - 1
        (self.dir / "gres.conf").write_text(f"Name=gpu File={d / 'dev'}/nvidia[0-{last}]\n")
        if CGROUP_V1:  # Slurm's cgroup process tracking: a job's every process, daemons too
            (self.dir / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainDevices=no\n"
                "ConstrainCores=no\nConstrainRAMSpace=no\n"
            )

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        subprocess.run(
            ["mungekey", "--create", f"--keyfile={key}"], user="munge", group="munge",
            check=True, capture_output=True,
        )
        m = self.munge_dir
        self._spawn(
            "munged",
            [
                "/usr/sbin/munged", "--foreground", f"--socket={self.socket}",
                f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}",
            ],
            user="munge",
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.02)

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.log_dir / f"{name}.out.log", "wb")  # noqa: SIM115 (owned by the Popen)
        kwargs = {"user": user, "group": user} if user else {}
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self._environ(), cwd=self.dir, **kwargs,
            )
        finally:
            log.close()
        self._procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%t", timeout=10).strip()
            except subprocess.SubprocessError:
                state = ""
            if state == "idle":
                return
            time.sleep(0.1)
        raise SlurmError(f"the node did not become idle (sinfo: {state!r})\n{self.logs()}")


