"""What only an ssh host can get wrong: host keys, passwords, vanished hosts.

All against real OpenSSH servers on 127.0.0.1 started by the fixtures, through
the installed Link kernelspec.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
from kernel_client import start_client
from remote_hosts import register
from support.faultproxy import FaultProxy

from link_kernel.hosts import HostConfig


def ssh_host(alias: str, server, tmp_path, **overrides) -> HostConfig:
    settings = dict(
        alias=alias,
        transport="ssh",
        hostname=server.host,
        port=server.port,
        user=server.user,
        identity=str(server.client_key),
        known_hosts=str(server.known_hosts),
        ssh_config=os.devnull,
        python=sys.executable,
        workdir=str(tmp_path / f"{alias}-work"),
        cache=str(tmp_path / f"{alias}-cache"),
        standby=False,
    )
    settings.update(overrides)
    return HostConfig(**settings)


@pytest.fixture(scope="module")
def link_ssh(tmp_path_factory):
    client = start_client("link", cwd=str(tmp_path_factory.mktemp("notebook")))
    yield client
    client.shutdown()


def test_an_unknown_host_key_is_rejected(link_ssh, sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    register(ssh_host("stranger", sshd, tmp_path, known_hosts=str(empty)))
    result = link_ssh.run("# link: stranger\n1")
    assert result.status == "error"
    error = result.error
    assert error["ename"] == "UnknownHostKeyError"
    assert sshd.host_fingerprint in error["evalue"]
    assert "--accept-new-host-key" in "".join(error["traceback"])
    assert empty.read_text() == "", "an unknown key must never be recorded by the kernel"


def test_a_changed_host_key_is_rejected(link_ssh, sshd, tmp_path):
    other = tmp_path / "known_hosts"
    # a valid ed25519 key that is not the server's
    other.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    register(ssh_host("impostor", sshd, tmp_path, known_hosts=str(other)))
    result = link_ssh.run("# link: impostor\n1")
    assert result.error["ename"] == "ChangedHostKeyError"
    assert "ssh-keygen -R" in "".join(result.error["traceback"])


def test_a_host_that_needs_a_password_fails_at_once(link_ssh, sshd_password_only, tmp_path):
    register(ssh_host("locked", sshd_password_only, tmp_path))
    start = time.monotonic()
    result = link_ssh.run("# link: locked\n1")
    assert time.monotonic() - start < 5
    assert result.error["ename"] == "PasswordRequiredError"
    text = result.error["evalue"] + "".join(result.error["traceback"])
    assert "ssh-copy-id" in text or "ssh-add" in text
    assert [m["msg_type"] for m in result.outputs] == ["error"]


def test_a_blackholed_first_host_is_skipped_within_five_seconds(link_ssh, sshd, tmp_path):
    with FaultProxy(sshd.host, sshd.port) as proxy:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line(proxy.port) + "\n")
        register(
            ssh_host("vanishing", sshd, tmp_path, port=proxy.port, known_hosts=str(known)),
            ssh_host("steady", sshd, tmp_path),
        )
        proxy.blackhole()
        start = time.monotonic()
        result = link_ssh.run("# link: vanishing|steady\nimport os\nos.getpid()")
        elapsed = time.monotonic() - start
    assert result.status == "ok"
    note = result.outputs[0]["content"]["text"]
    assert note.startswith("[link] ran on steady: vanishing:")
    assert result.reply["metadata"]["link"]["target"] == "steady"
    timings = result.reply["metadata"]["link"]["timings"]
    assert elapsed - sum(timings.values()) < 5, "the unreachable host was not skipped within 5 s"


def test_hosts_cli_adds_checks_and_lists(sshd, tmp_path):
    import subprocess

    env = dict(os.environ)
    known = tmp_path / "known_hosts"
    known.write_text("")
    base = [sys.executable, "-m", "link_kernel.cli", "hosts"]
    target = f"{sshd.user}@{sshd.host}:{sshd.port}"
    added = subprocess.run(
        [*base, "add", "cli-host", target, "--identity", str(sshd.client_key),
         "--known-hosts", str(known), "--ssh-config", os.devnull,
         "--workdir", str(tmp_path / "w"), "--python", sys.executable, "--accept-new-host-key"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert added.returncode == 0, added.stderr
    assert sshd.host_fingerprint in added.stdout
    assert sshd.known_hosts_line(sshd.port).split()[2] in known.read_text()
    listed = subprocess.run([*base, "list"], capture_output=True, text=True, env=env, timeout=30)
    assert "cli-host" in listed.stdout and f"ssh {target}" in listed.stdout
    checked = subprocess.run([*base, "check", "cli-host"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert checked.returncode == 0, checked.stderr
    for step in ("connect", "start", "ready", "run 1+1", "stop"):
        assert step in checked.stdout
    assert "1+1 = 2" in checked.stdout
    kernels = subprocess.run([*base, "kernels", "cli-host"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert kernels.returncode == 0, kernels.stderr
    assert "python3" in kernels.stdout and "link" in kernels.stdout
    removed = subprocess.run([*base, "remove", "cli-host"], capture_output=True, text=True, env=env)
    assert removed.returncode == 0
    again = subprocess.run([*base, "remove", "cli-host"], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "no host 'cli-host'" in again.stderr


def test_hosts_add_refuses_an_unknown_key_without_a_terminal(sshd, tmp_path):
    import subprocess

    known = tmp_path / "known_hosts"
    known.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "link_kernel.cli", "hosts", "add", "unsure",
         f"{sshd.user}@{sshd.host}:{sshd.port}", "--identity", str(sshd.client_key),
         "--known-hosts", str(known), "--ssh-config", os.devnull],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert sshd.host_fingerprint in result.stdout + result.stderr
    assert "--accept-new-host-key" in result.stderr
    assert known.read_text() == ""


# -- the host's login shell ---------------------------------------------------------------
#
# sshd runs every command through the user's login shell, and Debian's bash reads
# ~/.bashrc for it: conda and pyenv set themselves up there, print banners, and
# take locks. Each server below has a home of its own with such a ~/.bashrc.


@pytest.fixture
def shell_host(tmp_path):
    """An sshd whose sessions' ~/.bashrc prints a banner and waits until ``gate`` exists."""
    from support.sshd import SSHServer

    gate = tmp_path / "gate"
    with SSHServer(alias="linktest-bashrc") as server:
        (server.home / ".bashrc").write_text(
            'echo "Welcome to the GPU host. Quota: 10 GiB"\n'
            f'while [ ! -e {gate} ]; do sleep 0.05; done\n'
            'export LINK_TEST_FROM_BASHRC=yes\n'
        )
        yield server, gate


def test_a_shell_that_prints_and_takes_its_time_still_runs_the_cell(shell_host, tmp_path):
    server, gate = shell_host
    register(ssh_host("chatty", server, tmp_path))
    client = start_client("link", cwd=str(tmp_path))
    try:
        import threading

        opener = threading.Timer(1.5, gate.touch)  # a slow `conda init`
        opener.start()
        result = client.run("# link: chatty\nimport os\nx = 6 * 7\nos.environ.get('LINK_TEST_FROM_BASHRC')")
        opener.join()
        assert result.status == "ok", result.error
        assert result.result == "'yes'", "the kernel must see what the shell's startup set"
        streams = "".join(m["content"].get("text", "") for m in result.outputs if m["msg_type"] == "stream")
        assert "Welcome" not in streams, "the shell's banner is not the cell's output"
        assert client.run("x").result == "42"
    finally:
        client.shutdown()


def test_a_shell_that_never_finishes_starting_is_named_in_the_error(shell_host, tmp_path):
    server, gate = shell_host
    register(ssh_host("stuck", server, tmp_path), ssh_host("fine", server, tmp_path))
    ipython = tmp_path / "ipython"
    (ipython / "profile_default").mkdir(parents=True)
    (ipython / "profile_default" / "link_kernel_config.py").write_text(
        "c.LinkKernel.remote_start_timeout = 3.0\n"
    )
    client = start_client("link", cwd=str(tmp_path), env={"IPYTHONDIR": str(ipython)})
    try:
        client.run("x = 1")
        result = client.run("# link: stuck\nx += 1")
        assert result.status == "error"
        assert result.error["ename"] == "KernelStartError"
        text = result.error["evalue"] + "".join(result.error["traceback"])
        assert "did not start in 3 s" in text
        assert "~/.bashrc" in text and "ssh HOST true" in text
        assert client.run("x").result == "1", "a kernel that never started changes nothing"
        gate.touch()
        assert client.run("# link: fine\nx += 1\nx").result == "2"
    finally:
        client.shutdown()
