"""Cells on a Slurm host: real kernels through the installed kernelspec, on a real
one-node Slurm (tests/support/slurm.py) with two fake GPUs.

The host is registered on the ``process`` transport (this machine is the login
node); the router finds the cluster through SLURM_CONF in its environment.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from kernel_client import LinkClient, alive, start_client
from remote_hosts import register
from support.slurm import SlurmCluster, available

from link_kernel import cli, hosts
from link_kernel.hosts import HostConfig
from link_kernel.slurm import QueueState, parse_pending, srun_argv

# -- pure parts -----------------------------------------------------------------------


def test_srun_argv_asks_for_what_the_cell_wants():
    argv = srun_argv("/usr/bin/srun", "link-abc", {"gpus": "2", "mem": "32G", "partition": "gpu"})
    assert argv == [
        "/usr/bin/srun", "--job-name=link-abc", "--ntasks=1", "--nodes=1", "--unbuffered",
        "--gres=gpu:2", "--mem=32G", "--partition=gpu",
    ]
    assert not any(a.startswith("--gres") for a in srun_argv("srun", "x", {"gpus": "0"}))


def test_queue_position_counts_the_jobs_before():
    out = "7|Priority\n9|Resources\n12|Priority\n"
    assert parse_pending(out, "12") == QueueState("12", "Priority", 2)
    assert parse_pending(out, "7").describe("cluster") == (
        "[link] cluster: job 7 is queued (Priority), first in line\n"
    )
    assert parse_pending(out, "8") is None


def test_resource_defaults_need_slurm():
    with pytest.raises(hosts.HostConfigError, match="needs slurm = true"):
        HostConfig(alias="c", transport="process", gpus="1")
    with pytest.raises(hosts.HostConfigError, match="gpus='x'"):
        HostConfig(alias="c", transport="process", slurm=True, gpus="x")


def test_a_login_node_on_this_machine_works_outside_the_notebook_folder(tmp_path):
    from link_kernel.transports.factory import make_transport

    host = HostConfig(alias="cluster", transport="process", slurm=True)
    workdir = Path(make_transport(host, str(tmp_path)).workdir)
    assert workdir.is_absolute() and tmp_path not in workdir.parents


# -- a real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    reason = available()
    if reason:
        pytest.fail(f"the Slurm tests need a one-node Slurm: {reason}")
    with SlurmCluster() as running:
        yield running


@pytest.fixture(scope="module")
def slurm_host(cluster, tmp_path_factory) -> str:
    workdir = tmp_path_factory.mktemp("work-cluster")
    register(
        HostConfig(alias="cluster", transport="process", workdir=str(workdir), slurm=True,
                   partition=cluster.partition),
        HostConfig(alias="plain", transport="process", workdir=str(workdir) + "-plain"),
    )
    return "cluster"


def _notebook(cluster, tmp_path_factory) -> LinkClient:
    return start_client("link", cwd=str(tmp_path_factory.mktemp("nb")), env=cluster.env())


@pytest.fixture(scope="module")
def notebooks(cluster, slurm_host, tmp_path_factory):
    """Three notebooks; the third's kernels must start within 2 s once Slurm runs them."""
    clients = [_notebook(cluster, tmp_path_factory) for _ in range(2)]
    ipython = tmp_path_factory.mktemp("ipython")
    (ipython / "profile_default").mkdir()
    (ipython / "profile_default" / "link_kernel_config.py").write_text(
        "c.LinkKernel.remote_start_timeout = 2.0\n"
    )
    clients.append(start_client("link", cwd=str(tmp_path_factory.mktemp("nb")),
                                env={**cluster.env(), "IPYTHONDIR": str(ipython)}))
    yield clients
    for client in clients:
        client.shutdown()


def test_hosts_add_registers_a_slurm_host(cluster, slurm_host, capsys, monkeypatch):
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    status = cli.main(["hosts", "add", "login", "--process", "--slurm", "--partition", "debug",
                       "--gpus", "1"])
    assert status == 0, capsys.readouterr().err
    assert hosts.load()["login"] == HostConfig(
        alias="login", transport="process", slurm=True, partition="debug", gpus="1"
    )
    cli.main(["hosts", "list"])
    assert re.search(r"login .*Slurm jobs via srun gpus=1 partition=debug", capsys.readouterr().out)
    assert cli.main(["hosts", "add", "bad", "--process", "--gpus", "1"]) == 2
    assert "add --slurm" in capsys.readouterr().err
    cli.main(["hosts", "remove", "login"])


def test_a_gpu_cell_sees_the_device_slurm_gave_it(notebooks, slurm_host):
    r = notebooks[0].run(
        "# link: cluster gpus=1\nimport os\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['SLURM_JOB_ID'])"
    )
    assert r.error is None, r.text
    devices, job = r.stdout.split()
    assert devices in ("0", "1") and job.isdigit()


def test_after_a_cell_its_job_and_every_process_are_gone(notebooks, slurm_host, cluster):
    r = notebooks[0].run(
        "# link: cluster\nimport os, subprocess\n"
        "daemon = subprocess.run(['sh', '-c', 'setsid sleep 300 </dev/null >/dev/null 2>&1 & "
        "echo $!'], capture_output=True, text=True).stdout.strip()\n"
        "print(os.getpid(), daemon, os.environ['SLURM_JOB_ID'])"
    )
    assert r.error is None, r.text
    kernel, daemon, job = (int(x) for x in r.stdout.split())
    # execute_reply has arrived: nothing of the cell may be left
    assert cluster.jobs() == []
    assert not alive(kernel) and not alive(daemon)


def test_resource_options_on_a_host_without_slurm_run_nothing(notebooks, slurm_host):
    r = notebooks[0].run("# link: plain gpus=1\nran = 1")
    assert r.error["ename"] == "ResourceOptionError"
    assert "gpus=1" in r.error["evalue"] and "'plain'" in r.error["evalue"]
    assert notebooks[0].run("'ran' in dir()").result == "False"


def test_a_job_slurm_refuses_is_a_start_error_that_says_why(notebooks, slurm_host, cluster):
    r = notebooks[0].run("# link: cluster partition=nowhere\nran = 1")
    assert r.error["ename"] == "KernelStartError", r.text
    assert "Invalid partition" in r.error["evalue"]
    assert cluster.jobs() == []
    assert notebooks[0].run("'ran' in dir()").result == "False"


def _hold_gpu(client: LinkClient, gate: Path, results: dict, key: str) -> threading.Thread:
    """Run a cell that prints its GPU and holds it until ``gate`` exists."""
    code = (
        "# link: cluster gpus=1\nimport os, time\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)"
    )
    thread = threading.Thread(target=lambda: results.__setitem__(key, client.run(code, timeout=120)))
    thread.start()
    return thread


def _wait_jobs(cluster: SlurmCluster, state: str, count: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in cluster.jobs() if j.split("|")[1] == state]
        if len(jobs) >= count:
            return jobs
        assert time.monotonic() < deadline, f"no {count} {state} jobs: {cluster.jobs()}"
        time.sleep(0.05)


def test_two_notebooks_get_different_gpus_and_a_third_waits_its_turn(
    notebooks, slurm_host, cluster, tmp_path
):
    results: dict = {}
    gate_a, gate_b = tmp_path / "a", tmp_path / "b"
    threads = [_hold_gpu(notebooks[0], gate_a, results, "a"),
               _hold_gpu(notebooks[1], gate_b, results, "b")]
    try:
        _wait_jobs(cluster, "RUNNING", 2)
        seen: list[str] = []

        def third():
            results["c"] = notebooks[2].run(
                "# link: cluster gpus=1\nimport os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])",
                timeout=120,
                on_output=lambda msg: seen.append(msg["content"].get("text", "")),
            )

        waiting = threading.Thread(target=third)
        waiting.start()
        threads.append(waiting)
        deadline = time.monotonic() + 30
        while not any("is queued" in text for text in seen):
            assert time.monotonic() < deadline, f"no queued note; jobs: {cluster.jobs()}"
            time.sleep(0.05)
        assert "c" not in results  # it waits for a GPU
        # squeue is asked again meanwhile, and an unchanged answer is not repeated; the
        # wait outlasts the third notebook's start timeout (2 s), which queue time must not use
        time.sleep(3.5)
    finally:
        gate_a.touch()
    waiting.join(120)
    gate_b.touch()
    for thread in threads:
        thread.join(120)
    a, b, c = results["a"], results["b"], results["c"]
    assert a.error is None and b.error is None and c.error is None, (a.text, b.text, c.text)
    assert {a.stdout.strip(), b.stdout.strip()} == {"0", "1"}
    assert re.search(r"\[link\] cluster: job \d+ is queued \((Resources|Priority|not scheduled "
                     r"yet)\), (first in line|\d+ ahead)", c.stderr)
    notes = [line for line in c.stderr.splitlines() if "is queued" in line]
    assert all(one != next_ for one, next_ in zip(notes, notes[1:])), notes
    assert c.stdout.strip() in ("0", "1")
    assert cluster.jobs() == []


def test_interrupt_reaches_a_running_slurm_cell(notebooks, slurm_host, cluster):
    results: dict = {}
    started = threading.Event()

    def run():
        results["r"] = notebooks[1].run(
            "# link: cluster gpus=1\nimport time\nprint('go', flush=True)\ntime.sleep(60)",
            timeout=60,
            on_output=lambda msg: "go" in msg["content"].get("text", "") and started.set(),
        )

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    notebooks[1].km.interrupt_kernel()
    thread.join(60)
    r = results["r"]
    assert r.error is not None and r.error["ename"] == "KeyboardInterrupt", r.text
    assert "line 4" in re.sub(r"\x1b\[[0-9;]*m", "", "".join(r.error["traceback"]))  # in the cell
    assert cluster.jobs() == []


def test_interrupting_a_waiting_cell_cancels_its_job(notebooks, slurm_host, cluster, tmp_path):
    results: dict = {}
    gate = tmp_path / "gate"
    holder = threading.Thread(target=lambda: results.__setitem__("hold", notebooks[0].run(
        "# link: cluster gpus=2\nimport os, time\n"
        f"while not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)", timeout=120)))
    holder.start()
    try:
        _wait_jobs(cluster, "RUNNING", 1)
        waiter = threading.Thread(target=lambda: results.__setitem__(
            "wait", notebooks[1].run("# link: cluster gpus=1\nran = 1", timeout=120)))
        waiter.start()
        pending = _wait_jobs(cluster, "PENDING", 1)
        job = pending[0].split("|")[0]
        notebooks[1].km.interrupt_kernel()
        waiter.join(60)
        r = results["wait"]
        assert r.error is not None and r.error["ename"] == "KeyboardInterrupt", r.text
        # its reply has arrived: the waiting job is gone, the holder's runs on
        assert [j for j in cluster.jobs() if j.startswith(f"{job}|")] == []
        assert len(cluster.jobs()) == 1
    finally:
        gate.touch()
        holder.join(120)
    assert results["hold"].error is None, results["hold"].text
    assert notebooks[1].run("'ran' in dir()").result == "False"
    assert cluster.jobs() == []


def test_keep_holds_the_job_until_release(notebooks, slurm_host, cluster):
    first = notebooks[2].run(
        "# link: cluster gpus=1 keep\nimport os\njob = os.environ['SLURM_JOB_ID']"
    )
    assert first.error is None, first.text
    assert [j.split("|")[1] for j in cluster.jobs()] == ["RUNNING"]
    again = notebooks[2].run("# link: cluster\nimport os\nsame = os.environ['SLURM_JOB_ID'] == job")
    assert again.error is None, again.text
    assert notebooks[2].run("same").result == "True"
    notebooks[2].run("%link release cluster")
    assert cluster.wait_no_jobs() == []


# -- the login node over SSH ------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_sshd(cluster):
    from support.sshd import SSHServer

    with SSHServer(alias="linktest-slurm", session_env=cluster.env()) as server:
        yield server


def test_a_cell_through_an_ssh_login_node(slurm_sshd, cluster, tmp_path_factory):
    import os
    import sys

    workdir = tmp_path_factory.mktemp("work-login")
    register(
        HostConfig(
            alias="login-ssh", transport="ssh", hostname=slurm_sshd.host, port=slurm_sshd.port,
            user=slurm_sshd.user, identity=str(slurm_sshd.client_key),
            known_hosts=str(slurm_sshd.known_hosts), ssh_config=os.devnull, python=sys.executable,
            workdir=str(workdir), slurm=True, gpus="1",
        )
    )
    client = _notebook(cluster, tmp_path_factory)
    try:
        r = client.run(
            "# link: login-ssh\nimport json, os\nfrom ipykernel.connect import get_connection_file\n"
            "path = get_connection_file()\n"
            "print(os.environ['CUDA_VISIBLE_DEVICES'], os.getpid(), json.load(open(path))['ip'], "
            "path)"
        )
        assert r.error is None, r.text
        devices, pid, ip, path = r.stdout.split()
        assert devices in ("0", "1")
        # written on the node (its temp dir), for the node's address
        assert not path.startswith(str(workdir)) and ip
        assert cluster.jobs() == []
        assert not alive(int(pid))
    finally:
        client.shutdown()


def test_ssh_reach_tunnels_to_a_node_address_the_login_node_sees(slurm_sshd):
    """reach(port, node) opens a tunnel to node:port from the login node (here 127.0.0.2)."""
    import asyncio
    import os
    import socket

    from link_kernel.transports.ssh import SSHTransport

    server = socket.socket()
    server.bind(("127.0.0.2", 0))
    server.listen(1)
    port = server.getsockname()[1]
    config = HostConfig(
        alias="login-tunnel", transport="ssh", hostname=slurm_sshd.host, port=slurm_sshd.port,
        user=slurm_sshd.user, identity=str(slurm_sshd.client_key),
        known_hosts=str(slurm_sshd.known_hosts), ssh_config=os.devnull,
    )

    async def roundtrip() -> bytes:
        transport = SSHTransport(config, "/tmp")
        await transport.connect()
        try:
            ip, local = await transport.reach(port, "127.0.0.2")
            assert ip == "127.0.0.1"
            client = await asyncio.to_thread(socket.create_connection, (ip, local), 10)
            peer, _ = await asyncio.to_thread(server.accept)
            with client, peer:
                client.sendall(b"ping")
                return await asyncio.to_thread(peer.recv, 4)
        finally:
            await transport.unreach(port, "127.0.0.2")
            await transport.close()

    try:
        assert asyncio.run(roundtrip()) == b"ping"
    finally:
        server.close()
