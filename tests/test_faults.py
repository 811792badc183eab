"""Faults survived and bad input refused, with nothing lost.

A TCP fault proxy on 127.0.0.1 stands between the router and a real sshd;
it can blackhole (stop forwarding, keep the sockets open) or reset every
connection. Kernels are killed with real signals. Every test checks that the
local namespace is exactly as it was (a digest of it) when a cell could not
finish, and that the next cell works.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kernel_client import alive, start_client, wait_gone
from remote_hosts import register
from support.faultproxy import FaultProxy
from test_ssh_hosts import ssh_host
from test_variables import digest


#: What a cell reports when its host's connection breaks under it.
LOST = ("ConnectionLostError", "TransferError", "KernelDiedError", "HostUnreachableError")


@pytest.fixture(scope="module")
def link_faults(tmp_path_factory):
    client = start_client("link", cwd=str(tmp_path_factory.mktemp("notebook")))
    yield client
    client.shutdown()


@pytest.fixture
def proxied(sshd, tmp_path):
    """An ssh host 'flaky' reached through a fault proxy, and its proxy."""
    with FaultProxy(sshd.host, sshd.port) as proxy:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line(proxy.port) + "\n")
        register(ssh_host("flaky", sshd, tmp_path, port=proxy.port, known_hosts=str(known)),
                 ssh_host("steady", sshd, tmp_path))
        yield proxy


def wait_for_output(client, msg_id: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        try:
            msg = client.kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
            if text in seen:
                return seen
    raise AssertionError(f"never saw {text!r}; saw {seen!r}")


def reply_of(client, msg_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = client.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"]["msg_id"] == msg_id:
            client.drain_iopub()
            return reply


def test_a_host_that_vanishes_mid_cell(link_faults, proxied):
    link_faults.run("import numpy as np\nkept = np.arange(5)\nlabel = 'before'")
    before = digest(link_faults)
    msg_id = link_faults.kc.execute(
        "# link: flaky\nimport os, time\nlabel = 'after'\nprint('running', os.getpid(), flush=True)\n"
        "time.sleep(60)"
    )
    pid = int(wait_for_output(link_faults, msg_id, "running").split()[1])
    proxied.blackhole()
    start = time.monotonic()
    reply = reply_of(link_faults, msg_id, timeout=30)
    assert time.monotonic() - start < 15
    assert wait_gone([pid], timeout=15 - (time.monotonic() - start)) == [], (
        "the host did not kill the kernel of a router that went silent"
    )
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] in ("ConnectionLostError", "KernelDiedError")
    assert "flaky" in reply["content"]["evalue"]
    assert digest(link_faults) == before
    assert link_faults.run("label").result == "'before'"
    start = time.monotonic()
    fallback = link_faults.run("# link: flaky|steady\nlabel + '!'")
    assert fallback.result == "'before!'"
    assert fallback.reply["metadata"]["link"]["target"] == "steady"
    timings = fallback.reply["metadata"]["link"]["timings"]
    assert time.monotonic() - start - sum(v for k, v in timings.items() if not k.startswith("host")) < 5


def _watch_for(directory: Path, suffix: str, then, timeout: float = 60) -> threading.Thread:
    """Call ``then()`` once a file ending in ``suffix`` appears under ``directory``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if directory.exists() and any(p.name.endswith(suffix) for p in directory.rglob("*")):
                then()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_reset_while_inputs_are_sent(link_faults, proxied, tmp_path):
    link_faults.run("import numpy as np\nbig_in = np.random.default_rng(1).random(40_000_000)\nmark = 1")
    before = digest(link_faults)
    watcher = _watch_for(tmp_path / "flaky-cache", ".part", lambda: (proxied.blackhole(), proxied.reset()))
    result = link_faults.run("# link: flaky\nmark = 2\nbig_in.sum()", timeout=120)
    watcher.join()
    assert result.status == "error"
    assert result.error["ename"] in LOST
    assert digest(link_faults) == before
    leftovers = [p for p in (tmp_path / "flaky-work").rglob("*") if ".part" in p.name]
    assert leftovers == []
    proxied.forward()
    after = link_faults.run("# link: flaky\nmark + 1")
    assert after.result == "2", after.text


@pytest.mark.parametrize("size", [100_000, 200_000], ids=["channel", "openssh"])
def test_a_reset_while_a_folder_of_files_goes_out(proxied, tmp_path, size):
    """Many small files travel in one bundle; the link breaks in the middle of it."""
    notebook = tmp_path / "notebook"
    for i in range(300):  # 30 MB through a channel of the connection, 60 MB through OpenSSH
        path = notebook / "data" / f"part{i % 7}" / f"{i:03}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    client = start_client("link", cwd=str(notebook))
    try:
        client.run("mark = 1")
        before = digest(client)
        proxied.throttle(10_000_000)
        host_data = tmp_path / "flaky-work" / "data"
        watcher = _watch_for(host_data, ".bin", lambda: (time.sleep(0.5), proxied.blackhole(), proxied.reset()))
        result = client.run("# link: flaky\nmark = 2", timeout=120)
        watcher.join()
        assert result.status == "error", result.text
        assert result.error["ename"] in LOST
        assert digest(client) == before
        arrived = sum(1 for p in host_data.rglob("*.bin"))
        assert 0 < arrived < 300, arrived  # the link broke in the middle of the bundle
        proxied.throttle(0)
        proxied.forward()
        after = client.run(
            "# link: flaky\nimport hashlib, pathlib\n"
            "sorted((p.as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in pathlib.Path('data').rglob('*') if p.is_file())",
            timeout=120,
        )
        assert after.status == "ok", after.text
        here = sorted((p.relative_to(notebook).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                      for p in (notebook / "data").rglob("*") if p.is_file())
        assert eval(after.result) == here
        assert [p for p in host_data.rglob("*") if p.name.startswith(".link-part-")] == []
    finally:
        client.shutdown()


def test_a_reset_while_outputs_come_back(link_faults, proxied):
    here = Path(eval(link_faults.run("import os; os.getcwd()").result))
    link_faults.run("result_out = 'old'")
    before = digest(link_faults)
    store = Path(os.environ["XDG_CACHE_HOME"]) / "link-kernel" / "blobs"
    watcher = _watch_for(store, ".part", lambda: (proxied.blackhole(), proxied.reset()))
    result = link_faults.run(
        "# link: flaky\nimport numpy as np\n"
        "open('made-remotely.bin', 'wb').write(b'x' * 50_000_000)\n"
        "result_out = np.random.default_rng(2).random(40_000_000)",
        timeout=120,
    )
    watcher.join()
    assert result.status == "error", result.text
    assert result.error["ename"] in LOST
    assert digest(link_faults) == before, link_faults.run(
        "sorted((k, type(v).__name__) for k, v in globals().items() if not k.startswith('_'))").result
    assert not [p for p in here.rglob("*") if ".link-part" in p.name or p.name.endswith(".part")]
    proxied.forward()


def test_a_remote_kernel_killed_mid_cell(link_faults, sshd, tmp_path):
    register(ssh_host("victim", sshd, tmp_path))
    link_faults.run("survivor = 'here'")
    before = digest(link_faults)
    msg_id = link_faults.kc.execute(
        "# link: victim\nimport os, time\nsurvivor = 'gone'\nprint(os.getpid(), flush=True)\ntime.sleep(60)"
    )
    pid = int(wait_for_output(link_faults, msg_id, "\n").split()[0])
    os.kill(pid, signal.SIGKILL)
    reply = reply_of(link_faults, msg_id, timeout=30)
    assert reply["content"]["ename"] == "KernelDiedError"
    assert reply["content"]["evalue"] == "the kernel on victim died (signal 9, SIGKILL)"
    assert digest(link_faults) == before
    assert link_faults.run("# link: victim\n'works'").result == "'works'"


def test_sshd_restarted_between_cells(link_faults, sshd, tmp_path):
    register(ssh_host("restarting", sshd, tmp_path))
    assert link_faults.run("# link: restarting\n1").result == "1"
    sshd.restart()
    assert link_faults.run("# link: restarting\n2").result == "2"


def test_a_sigkilled_router_leaves_nothing_behind(sshd, tmp_path):
    register(ssh_host("orphaned", sshd, tmp_path, standby=True))
    client = start_client("link", cwd=str(tmp_path))
    try:
        kept = int(client.run("# link: orphaned keep\nimport os\nos.getpid()").result)
        client.run("# link: process\n1")  # a process host's kernel too
        router = client.pid
        everything = client.descendants() + [kept]
        runtime = [Path(a) for a in map(_last_arg, everything) if a.startswith(tempfile.gettempdir())]
        assert runtime and all(p.is_dir() for p in runtime)
        os.kill(router, signal.SIGKILL)
        client.km.provisioner.process.wait()
        assert wait_gone(everything, timeout=15) == []
        deadline = time.monotonic() + 15
        while any(p.exists() for p in runtime) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in runtime if p.exists()], "the router's temp files survived it"
        assert not list((tmp_path / "orphaned-work" / ".link").glob("kernel-*.json"))
    finally:
        client.kc.stop_channels()
        client.km.cleanup_resources()
        client.close_log()


def _last_arg(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    args = [a for a in args if a]
    return args[-1].decode(errors="replace") if args else ""


def test_a_host_python_without_ipykernel(link_faults, sshd, tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    register(ssh_host("bare", sshd, tmp_path, python=str(bare / "bin" / "python")))
    result = link_faults.run("# link: bare\n1")
    assert result.error["ename"] == "RemoteEnvironmentError"
    assert "lacks ipykernel, dill" in result.error["evalue"]
    assert "pip install ipykernel dill" in "".join(result.error["traceback"])


def test_a_failed_authentication(link_faults, sshd, tmp_path):
    stranger_key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger_key)], check=True)
    register(ssh_host("refused", sshd, tmp_path, identity=str(stranger_key)))
    result = link_faults.run("# link: refused\n1")
    assert result.error["ename"] in ("AuthenticationError", "PasswordRequiredError")
    assert "refused" in result.error["evalue"] or "refused" in "".join(result.error["traceback"])


def test_a_full_disk_on_the_host(link_faults, sshd, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        register(ssh_host("cramped", sshd, tmp_path, workdir=str(mount / "work"),
                          cache=str(mount / "cache")))
        link_faults.run("import numpy as np\npayload = np.ones(1_000_000)\nfill_mark = 'local'")
        before = digest(link_faults)
        result = link_faults.run("# link: cramped\nfill_mark = 'remote'\npayload.sum()")
        assert result.status == "error"
        assert result.error["ename"] in ("TransferError", "FileSyncError")
        assert "no space left on cramped" in result.error["evalue"]
        assert digest(link_faults) == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_hundred_megabytes_of_text_output(link_faults):
    result = link_faults.run("print('x' * 100_000_000)", timeout=120)
    shown = sum(len(m["content"]["text"]) for m in result.of_type("stream") if m["content"]["name"] == "stdout")
    assert shown < 100_000_000
    note = result.stderr
    assert "[link] output cut" in note
    saved = Path(note.split(" saved to ")[1].split()[0])
    assert shown + saved.stat().st_size >= 100_000_000
    assert link_faults.run("1+1").result == "2"
