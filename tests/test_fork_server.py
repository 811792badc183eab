"""The fork server: kernels forked from a process that has ipykernel and the notebook's
modules imported, each still a fresh process of its own.

Through the installed kernelspec against a ``process`` host and a real sshd
(``remote``), and the fork server itself run as the host runs it
(``python -c BOOTSTRAP WORKDIR serve:NAME AGENT DEAD_AFTER -``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel_client import alive, start_client, wait_gone
from remote_hosts import register

from link_kernel.hosts import HostConfig, load
from link_kernel.provisioner import AGENT, AGENT_NAME, BOOTSTRAP

#: Run in a remote cell: the kernel's pid, its supervisor's, and the fork server's
#: (the supervisor's parent when it was forked: its command line says ``serve:``).
LINEAGE = textwrap.dedent("""\
    import os
    def _parent(pid):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    def _cmdline(pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\\0")
    _sup = os.getppid()
    _server = _parent(_sup)
    _forked = any(arg.startswith(b"serve:") for arg in _cmdline(_server))
    print(os.getpid(), _sup, _server if _forked else 0)
""")


def lineage(client, target: str, body: str = "", timeout: float = 60.0) -> tuple[tuple[int, int, int], str]:
    result = client.run(f"# link: {target}\n{LINEAGE}{body}", timeout=timeout)
    assert result.status == "ok", result.error or result.stdout
    first, _, rest = result.stdout.partition("\n")
    pid, sup, server = (int(x) for x in first.split())
    return (pid, sup, server), rest


def gone_entirely(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` exists, not even as a zombie no one reaps."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def notebook(tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    yield client
    client.shutdown()


def test_each_cell_is_a_fresh_process_forked_with_the_notebooks_modules(notebook, remote):
    assert notebook.run("import numpy as np").status == "ok"
    # numpy's C core mapped in the fork server: imported there, before the kernel's fork
    # (a standby kernel imports the notebook's modules itself, which this would not see)
    in_server = "print(any('_multiarray_umath' in line for line in open(f'/proc/{_server}/maps')))"
    seen = []
    for _ in range(4):
        ids, out = lineage(notebook, remote, f"{in_server}\n_n = 1")
        seen.append((ids, out.strip()))
    pids = [ids[0] for ids, _ in seen]
    servers = {ids[2] for ids, _ in seen}
    assert len(set(pids)) == 4, seen  # a process of its own each time
    assert 0 not in servers and len(servers) == 1, seen  # all forked, from one server
    # the first cell names the notebook's modules; from then on they are there at the fork
    assert [out for _, out in seen[1:]] == ["True"] * 3, seen
    assert wait_gone(pids, timeout=10) == []
    assert notebook.run("_n").result == "1"  # the cells' results came back as usual
    status = notebook.run("%link status").text
    assert f"fork server pid {servers.pop()} with numpy imported" in status, status


def test_a_host_without_fork_server_starts_each_kernel_afresh(notebook, remote, tmp_path):
    host = load()[remote]
    register(HostConfig(**{**host.__dict__, "alias": f"{remote}-nofork", "fork_server": False,
                           "workdir": str(tmp_path / "host"), "source": "registry"}))
    for _ in range(2):
        (pid, sup, server), _ = lineage(notebook, f"{remote}-nofork")
        assert server == 0  # the supervisor is not a fork server's child


def test_a_forked_kernels_memory_is_returned_when_it_ends(notebook, remote):
    lineage(notebook, remote)  # the server is up, the notebook's modules imported
    (pid, sup, server), _ = lineage(notebook, remote, "_x = bytearray(400 << 20)\n_x[::4096] = b'x' * len(_x[::4096])\nprint(len(_x))\ndel _x")
    assert server
    before = rss_kib(server)
    assert gone_entirely([pid, sup], timeout=10) == []  # reaped, not a zombie
    assert rss_kib(server) - before < 20 * 1024  # the 400 MB were the kernel's, not the server's
    assert rss_kib(server) < 400 * 1024


def test_the_standby_holds_what_the_cell_before_it_made(notebook, remote):
    """The next cell's standby boots while a cell runs (a fork is cheap), before the cell
    has made its data; a cell that made big data gets a standby that holds it ready."""
    lineage(notebook, remote)  # small: the standby for the next cell boots at once
    assert notebook.run(f"# link: {remote}\nbig = bytearray(8 << 20)").status == "ok"
    deadline = time.monotonic() + 15
    status = ""
    while time.monotonic() < deadline and "holding 8.0 MiB ready" not in status:
        time.sleep(0.2)
        status = notebook.run("%link status").text
    assert "holding 8.0 MiB ready" in status, status
    assert notebook.run(f"# link: {remote}\nlen(big)").result == str(8 << 20)


def test_a_package_changed_on_disk_is_imported_anew(tmp_path):
    """A fresh kernel imports a package's files as they are now; a fork server that imported
    the old ones stops forking, its standby is not used, and the next kernel comes from one
    that imports the new.

    On a process host, whose kernels see the notebook's PYTHONPATH."""
    remote = "proc-upgrade"
    register(HostConfig(alias=remote, transport="process", workdir=str(tmp_path / "host")))
    site = tmp_path / "site"
    (site / "shapes").mkdir(parents=True)
    init = site / "shapes" / "__init__.py"
    init.write_text("SIDES = 3\n")
    notebook = tmp_path / "nb"
    notebook.mkdir()
    client = start_client("link", cwd=str(notebook), env={"PYTHONPATH": str(site)})
    try:
        assert client.run("import shapes").status == "ok"
        lineage(client, remote)  # names shapes: the server imports it
        (_, _, first), out = lineage(client, remote, "print(shapes.SIDES)")
        assert out.strip() == "3" and first
        time.sleep(1.0)  # the next cell's standby is forked by now, with the old files loaded
        init.write_text("SIDES = 4  # the same package, upgraded\n")
        (_, _, second), out = lineage(client, remote, "import importlib, shapes\nprint(shapes.SIDES)")
        assert out.strip() == "4"
        if second:
            assert second != first  # a new server, not the one holding the old files
    finally:
        client.shutdown()


def test_a_sigkilled_router_leaves_no_fork_server_kernel_or_zombie(remote, tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    try:
        (pid, sup, server), _ = lineage(client, f"{remote} keep")
        assert server and alive(pid) and alive(server)
        os.kill(client.pid, signal.SIGKILL)
        client.km.provisioner.process.wait()
        assert gone_entirely([pid, sup, server], timeout=30) == []
    finally:
        client.kc.stop_channels()
        client.km.cleanup_resources()
        client.close_log()


# -- the fork server as the host runs it -------------------------------------------


def read_report(stream, word: str, timeout: float = 60.0) -> dict:
    """The payload of the next ``LINK WORD`` line a supervisor or fork server writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline().decode()
        if not line:
            break
        if line.startswith(f"LINK {word} "):
            return json.loads(line.split(" ", 2)[2])
    raise AssertionError(f"no {word} report")


class Server:
    """``python -c BOOTSTRAP WORKDIR serve:NAME AGENT 10 -``, read line by line."""

    def __init__(self, workdir: Path, env: dict | None = None, dead_after: float = 10.0) -> None:
        (workdir / ".link").mkdir(parents=True, exist_ok=True)
        agent = workdir / ".link" / AGENT_NAME
        agent.write_text(AGENT)
        self.workdir, self.agent = workdir, agent
        self.name = f"link-fork-test-{secrets.token_hex(6)}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, str(workdir), f"serve:{self.name}", str(agent), f"{dead_after:g}", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def report(self, word: str, timeout: float = 60.0) -> dict:
        return read_report(self.proc.stdout, word, timeout)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect("\0" + self.name)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def close(self) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        status = self.proc.wait(timeout=30)
        self.proc.stdout.close()
        return status


@pytest.fixture
def fake_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "starts_thread.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    # what torch reports once CUDA is set up, in a package that says so at import
    (site / "sets_up_cuda.py").write_text(textwrap.dedent("""\
        import sys, types
        torch = types.ModuleType("torch")
        torch.cuda = types.SimpleNamespace(is_initialized=lambda: True)
        sys.modules["torch"] = torch
    """))
    (site / "harmless.py").write_text("VALUE = 1\n")
    return site


@pytest.mark.parametrize("module", ["sets_up_cuda", "starts_thread"])
def test_an_import_that_leaves_the_server_unfit_to_fork_ends_it(tmp_path, fake_site, module):
    server = Server(tmp_path / "host", {"PYTHONPATH": str(fake_site)})
    try:
        server.report("READY")
        assert server.accepts()
        server.send(json.dumps(["harmless"]).join(["IMPORT ", ""]))
        assert server.report("IMPORTED") == {"imported": ["harmless"], "skipped": {}}
        server.send(json.dumps([module]).join(["IMPORT ", ""]))
        result = server.report("IMPORTED")
        assert module in result["unsafe"]
        assert ("CUDA" if module == "sets_up_cuda" else "thread") in result["unsafe"]
        assert module in server.report("STALE")["reason"]
        assert server.report("EXIT")["status"] == 0
        assert not server.accepts()  # no kernel is ever forked from it again
    finally:
        server.close()


def test_gpu_frameworks_are_never_imported_ahead(tmp_path):
    server = Server(tmp_path / "host")
    try:
        server.report("READY")
        server.send('IMPORT ["tensorflow", "jax.numpy", "torch.cuda", "no_such_module_here", "wave"]')
        result = server.report("IMPORTED")
        assert result["imported"] == ["wave"]
        assert set(result["skipped"]) == {"tensorflow", "jax.numpy", "torch.cuda", "no_such_module_here"}
        assert "fork" in result["skipped"]["tensorflow"]
        assert "ModuleNotFoundError" in result["skipped"]["no_such_module_here"]
        assert server.accepts()
    finally:
        assert server.close() == 0


def test_only_its_own_user_may_ask_it_for_a_kernel(tmp_path):
    """The socket is abstract (anyone on the host may connect): the server checks the peer."""
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    server = Server(tmp_path / "host")
    try:
        server.report("READY")
        probe = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""\
                import json, os, socket, struct, sys
                os.setgid(65534); os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\\0{server.name}")
                ask = json.dumps({{"env": {{}}, "argv": ["", "", "", "10", "-"]}}).encode()
                s.settimeout(10)
                try:
                    socket.send_fds(s, [struct.pack("!I", len(ask)) + ask], [0, 1, 2])
                    print(repr(s.recv(1)))
                except (BrokenPipeError, ConnectionResetError):
                    print("refused")
            """)],
            capture_output=True, text=True, timeout=30,
        )
        assert probe.stdout.strip() in ("b''", "refused"), probe  # closed without a fork
        assert server.accepts()
    finally:
        server.close()


def test_a_router_gone_silent_ends_the_server(tmp_path):
    server = Server(tmp_path / "host", dead_after=2.0)
    try:
        server.report("READY")
        started = time.monotonic()
        server.send("")  # a keepalive: the silence counts from here
        assert server.report("STALE", timeout=30)["reason"] == "the router is gone"
        assert 1.5 < time.monotonic() - started < 10
        assert not server.accepts()
    finally:
        server.close()


def test_the_server_outlives_the_kernels_it_forked(tmp_path):
    """The router's line to the server ends while a kernel it forked still runs: the server
    waits for that kernel's supervisor (which ends on its own line), so none is orphaned."""
    server = Server(tmp_path / "host")
    supervisor = None
    try:
        server.report("READY")
        conn_file = server.workdir / ".link" / "kernel.json"
        conn_file.write_text(json.dumps({
            "ip": "127.0.0.1", "transport": "tcp", "key": secrets.token_hex(16),
            "signature_scheme": "hmac-sha256", "kernel_name": "",
            **dict.fromkeys(("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"), 0)}))
        supervisor = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, str(server.workdir), str(conn_file), str(server.agent),
             "10", server.name, "--HistoryManager.enabled=False"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        forked = read_report(supervisor.stdout, "HELLO")["pid"]  # the server's child
        ready = read_report(supervisor.stdout, "READY")
        assert ready["forked"] is True and forked != supervisor.pid
        server.proc.stdin.close()  # the router is gone, for the server
        time.sleep(1.0)
        assert server.proc.poll() is None, "the server left a kernel it forked"
        assert alive(ready["pid"])
        supervisor.stdin.close()  # and for the kernel: its supervisor ends it
        assert read_report(supervisor.stdout, "EXIT")["status"] is not None
        assert supervisor.wait(timeout=30) == 0
        assert server.proc.wait(timeout=30) == 0
        assert gone_entirely([forked, ready["pid"]], timeout=5) == []
    finally:
        if supervisor is not None:
            if supervisor.poll() is None:
                supervisor.kill()
            supervisor.wait()
            for stream in (supervisor.stdin, supervisor.stdout):
                stream.close()
        server.close()


def test_run_all_keeps_a_spare_standby_that_goes_when_the_cells_stop(notebook, remote):
    """Cells sent back to back come faster than a kernel boots: a second standby boots
    behind the first, each cell still gets a fresh process of its own, and once no cell
    has come for a second the spare is gone from the host."""
    lineage(notebook, remote)  # the fork server is up
    pids = []
    for i in range(8):  # as Run All sends them: each the moment the last one is idle
        result = notebook.run(f"# link: {remote}\nimport os\nprint(os.getpid())\nr{i} = {i}")
        assert result.status == "ok", result.error
        pids.append(int(result.stdout))
    status = notebook.run("%link status").text
    assert len(set(pids)) == 8, pids
    assert "spare standby kernel" in status, status
    assert notebook.run("r0 + r7").result == "7"  # the cells' results all came back
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "spare standby kernel starting" in status:
        time.sleep(0.1)
        status = notebook.run("%link status").text
    spare = [int(w.split()[-1]) for w in status.split(", ") if w.startswith("spare standby kernel pid")]
    assert spare, status
    assert gone_entirely(spare, timeout=10) == [], status  # let go, not a zombie
    assert gone_entirely(pids, timeout=10) == []
    status = notebook.run("%link status").text
    assert "spare" not in status and "standby kernel pid" in status, status  # one standby stays
    (pid, _, server), _ = lineage(notebook, remote)  # the next cell takes that one
    assert server and pid not in pids + spare


def saved_notebook(folder: Path, sources: list[str]) -> Path:
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "outputs": [],
              "execution_count": None, "source": source} for i, source in enumerate(sources)]
    path = folder / "analysis.ipynb"
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}))
    return path


def test_a_saved_notebook_has_its_host_warmed_before_its_first_routed_cell(remote, tmp_path):
    """Opened in JupyterLab (JPY_SESSION_NAME names the file), the notebook says where
    its cells go and what they import: the host's fork server starts with those modules
    (the notebook's own are left out: test_warmup), and the first routed cell is forked
    with them."""
    (tmp_path / "helpers.py").write_text("")
    probe = "import sys\nprint(sorted(m for m in ('colorsys', 'fractions') if m in sys.modules))"
    path = saved_notebook(tmp_path, [
        "import colorsys\nimport helpers\nfrom fractions import Fraction",
        "%matplotlib inline\n!ls",
        "# link: nowhere\nx = 1",  # an unknown host: said when the cell runs
        f"# link: {remote}|local\n{probe}",
    ])
    client = start_client("link", cwd=str(tmp_path), env={"JPY_SESSION_NAME": str(path)})
    try:
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline and "standby kernel pid" not in status:
            time.sleep(0.2)
            status = client.run("%link status").text
        assert "fork server pid" in status and "standby kernel pid" in status, status
        assert "colorsys" in status and "fractions" in status, status
        (pid, sup, server), out = lineage(client, remote, probe)  # the namespace is empty
        assert server, status
        assert out.strip() == "['colorsys', 'fractions']"
        assert client.run("# link: nowhere\nx = 1").status == "error"
    finally:
        client.shutdown()


def test_without_a_saved_notebook_no_host_is_started_ahead(remote, tmp_path):
    path = saved_notebook(tmp_path, [f"# link: {remote}\nimport colorsys"])
    client = start_client("link", cwd=str(tmp_path), env={"JPY_SESSION_NAME": str(path) + ".gone"})
    try:
        time.sleep(1.5)
        status = client.run("%link status").text
        assert "fork server" not in status and "standby" not in status, status
        (pid, sup, server), _ = lineage(client, remote)
        assert server  # the first routed cell starts the fork server itself
    finally:
        client.shutdown()


def _configured(tmp_path: Path, text: str) -> dict:
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "link_kernel_config.py").write_text(text)
    return {"IPYTHONDIR": str(tmp_path / "ipython")}


def _status_after_start(client, seconds: float = 15.0) -> str:
    deadline = time.monotonic() + seconds
    status = ""
    while time.monotonic() < deadline and "standby kernel pid" not in status:
        time.sleep(0.2)
        status = client.run("%link status").text
    return status


def test_a_remote_default_target_is_warmed_at_the_start_and_warm_ahead_can_be_off(tmp_path):
    register(HostConfig(alias="procd", transport="process", workdir=str(tmp_path / "work")))
    env = _configured(tmp_path / "on", "c.LinkKernel.default_target = 'procd|local'\n")
    client = start_client("link", cwd=str(tmp_path), env=env)
    try:
        status = _status_after_start(client)
        assert "fork server pid" in status and "standby kernel pid" in status, status
    finally:
        client.shutdown()
    env = _configured(tmp_path / "off", "c.LinkKernel.default_target = 'procd|local'\n"
                                        "c.LinkKernel.warm_ahead = False\n")
    client = start_client("link", cwd=str(tmp_path), env=env)
    try:
        time.sleep(1.5)
        status = client.run("# link: local\n%link status").text
        assert "fork server" not in status and "standby" not in status, status
    finally:
        client.shutdown()
