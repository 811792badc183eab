"""The paramiko SSH transport against a real OpenSSH server on 127.0.0.1.

No mocks: every test talks to sshd (the ``sshd`` fixture), directly or through
a FaultProxy that can blackhole or reset the connection.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest
from support.faultproxy import EchoServer, FaultProxy
from support.sshd import SSHServer

from link_kernel.errors import (
    AuthenticationError,
    ChangedHostKeyError,
    ConnectionLostError,
    HostConfigError,
    HostUnreachableError,
    PasswordRequiredError,
    UnknownHostKeyError,
)
from link_kernel.transports.ssh import (
    SSHConnection,
    SSHHost,
    add_known_host,
    fetch_host_key,
    fingerprint,
)

PY = sys.executable  # the remote host is this machine; its python starts fastest


def host_for(server: SSHServer, *, port: int | None = None, known_hosts: str | None = None, **kw) -> SSHHost:
    fields = dict(
        alias="test",
        hostname=server.host,
        port=server.port if port is None else port,
        user=server.user,
        identity_files=[server.client_key],
        known_hosts_files=[known_hosts or server.known_hosts],
        connect_timeout=5.0,
        identities_only=True,
    )
    fields.update(kw)
    return SSHHost(**fields)


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def conn(sshd: SSHServer):
    with SSHConnection(host_for(sshd)) as connection:
        yield connection


@pytest.fixture
def proxy(sshd: SSHServer, tmp_path: Path):
    """A FaultProxy in front of sshd and a known_hosts that trusts sshd's key on its port."""
    with FaultProxy(sshd.host, sshd.port) as fp:
        known = tmp_path / "known_hosts_proxy"
        known.write_text(sshd.known_hosts_line(fp.port))
        fp.known_hosts = str(known)
        yield fp


# -- connect and exec ------------------------------------------------------------------


def test_connect_and_exec(conn: SSHConnection):
    assert conn.alive
    assert conn.transport.remote_cipher == "aes128-gcm@openssh.com"
    status, out, err = conn.exec([PY, "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME", "it's; true"])
    assert (status, err) == (0, b"")
    assert out.decode().strip() == repr(["a b", "$HOME", "it's; true"])


def test_exec_stdin_stderr_and_status(conn: SSHConnection):
    status, out, err = conn.exec(["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"payload")
    assert (status, out, err) == (3, b"payload", b"oops\n")


def test_exec_large_stdin_and_output_do_not_deadlock(conn: SSHConnection):
    data = os.urandom(3 * 1024 * 1024)
    status, out, _err = conn.exec(["cat"], stdin=data, timeout=20)
    assert status == 0 and out == data


def test_exec_timeout(conn: SSHConnection):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.exec(["sleep", "5"], timeout=0.5)
    assert time.monotonic() - started < 3
    assert conn.alive


def test_connection_is_reused_and_survives_idle_time(sshd: SSHServer):
    with SSHConnection(host_for(sshd), keepalive_interval=0.2, dead_after=0.8) as c:
        transport = c.transport
        time.sleep(1.5)  # several keepalive rounds, longer than dead_after
        assert c.alive
        c.connect()  # a no-op while alive
        assert c.transport is transport
        assert c.exec(["true"])[0] == 0


# -- spawn -------------------------------------------------------------------------


def test_spawn_pty_command_dies_when_connection_closes(sshd: SSHServer):
    c = SSHConnection(host_for(sshd))
    c.connect()
    try:
        cmd = c.spawn([PY, "-c", "import os, time; print('pid', os.getpid(), flush=True); time.sleep(300)"])
        assert wait_until(lambda: "pid " in cmd.output_tail(), 10), cmd.output_tail()
        pid = int(cmd.output_tail().split("pid ", 1)[1].split()[0])
        assert pid_alive(pid)
        assert cmd.exit_status is None
    finally:
        c.close()
    assert wait_until(lambda: not pid_alive(pid), 5), f"remote process {pid} outlived the connection"


def test_spawn_close_hangs_up_the_command(conn: SSHConnection):
    cmd = conn.spawn([PY, "-c", "import os, time; print('pid', os.getpid(), flush=True); time.sleep(300)"])
    assert wait_until(lambda: "pid " in cmd.output_tail(), 10)
    pid = int(cmd.output_tail().split("pid ", 1)[1].split()[0])
    cmd.close()
    assert wait_until(lambda: not pid_alive(pid), 5)
    assert cmd.wait(1) == -1
    assert conn.alive


def test_spawn_exit_status_stdin_and_output_tail(conn: SSHConnection):
    cmd = conn.spawn([PY, "-c", "import sys; line = sys.stdin.readline(); print('got', line.strip()); sys.exit(7)"], pty=False)
    cmd.write(b"hello\n")
    assert cmd.wait(10) == 7
    assert cmd.exit_status == 7
    assert "got hello" in cmd.output_tail()
    cmd.close()


def test_spawn_output_is_drained_and_tail_is_bounded(conn: SSHConnection):
    # 4 MiB through a pty: it would block the command if nobody read it.
    cmd = conn.spawn([PY, "-c", "import sys; sys.stdout.write('x' * (4 << 20) + '\\nEND\\n')"])
    assert cmd.wait(20) == 0
    assert cmd.output_tail().endswith("END\r\n")  # complete once wait() returned
    assert len(cmd.output_tail()) <= 64 * 1024
    cmd.close()


# -- files -------------------------------------------------------------------------


def test_put_file_is_0600_and_round_trips(conn: SSHConnection, tmp_path: Path):
    target = tmp_path / "secret.json"
    target.write_text("old")
    target.chmod(0o644)
    data = os.urandom(300_000)
    conn.put_file(str(target), data)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == data
    assert conn.get_file(str(target)) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]  # no temp file left


def test_put_file_mode_and_empty_file(conn: SSHConnection, tmp_path: Path):
    target = tmp_path / "script.sh"
    conn.put_file(str(target), b"", mode=0o755)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert conn.get_file(str(target)) == b""


def test_file_errors_are_oserrors_not_connection_errors(conn: SSHConnection, tmp_path: Path):
    with pytest.raises(OSError):
        conn.put_file(str(tmp_path / "missing-dir" / "f"), b"x")
    with pytest.raises(FileNotFoundError):
        conn.get_file(str(tmp_path / "nope"))
    assert conn.alive


# -- forward -----------------------------------------------------------------------


def test_forward_tunnels_to_an_echo_server(conn: SSHConnection):
    with EchoServer() as echo:
        fwd = conn.forward(echo.port)
        try:
            clients = [socket.create_connection(("127.0.0.1", fwd.local_port), timeout=5) for _ in range(3)]
            for i, client in enumerate(clients):
                client.sendall(b"ping %d" % i)
            for i, client in enumerate(clients):
                assert client.recv(100) == b"ping %d" % i
            big = os.urandom(2 * 1024 * 1024)
            clients[0].sendall(big)
            got = bytearray()
            while len(got) < len(big):
                got += clients[0].recv(1 << 20)
            assert got == big
            for client in clients:
                client.close()
            assert echo.connections == 3
        finally:
            fwd.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", fwd.local_port), timeout=2)


def test_forward_to_a_closed_port_closes_the_local_connection(conn: SSHConnection):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        with conn.forward(holder.getsockname()[1]) as fwd:
            client = socket.create_connection(("127.0.0.1", fwd.local_port), timeout=5)
            try:
                assert client.recv(10) == b""
            except ConnectionResetError:
                pass
            client.close()
    finally:
        holder.close()
    assert conn.alive


def test_forward_round_trip_latency(conn: SSHConnection):
    with EchoServer() as echo, conn.forward(echo.port) as fwd:
        client = socket.create_connection(("127.0.0.1", fwd.local_port), timeout=5)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            client.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(client.recv(64))
        per_round = (time.perf_counter() - started) / rounds
        client.close()
    print(f"tunnel round trip: {per_round * 1e6:.0f} us")
    assert per_round < 0.005  # a polling pump would show here (ms, not us)


# -- host keys -----------------------------------------------------------------------


def test_unknown_host_key_is_rejected(sshd: SSHServer, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError) as info:
        SSHConnection(host_for(sshd, known_hosts=str(empty))).connect()
    assert info.value.fingerprint == sshd.host_fingerprint
    assert sshd.host_fingerprint in str(info.value)


def test_changed_host_key_is_rejected(sshd: SSHServer, tmp_path: Path):
    known = tmp_path / "known_hosts"
    other = paramiko.Ed25519Key(filename=sshd.client_key)  # any ed25519 key but the host's
    add_known_host(str(known), sshd.host, sshd.port, other)
    with pytest.raises(ChangedHostKeyError) as info:
        SSHConnection(host_for(sshd, known_hosts=str(known))).connect()
    assert info.value.got == sshd.host_fingerprint
    assert info.value.expected == fingerprint(other)


def test_fetch_host_key_and_add_known_host(sshd: SSHServer, tmp_path: Path):
    key = fetch_host_key(sshd.host, sshd.port)
    assert fingerprint(key) == sshd.host_fingerprint
    known = tmp_path / "new" / "known_hosts"
    add_known_host(str(known), sshd.host, sshd.port, key)
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    assert known.read_text() == sshd.known_hosts_line()
    with SSHConnection(host_for(sshd, known_hosts=str(known))) as c:
        assert c.alive


# -- authentication --------------------------------------------------------------------


def test_password_only_host_fails_fast_with_a_command_to_run(sshd_password_only: SSHServer):
    started = time.monotonic()
    with pytest.raises(PasswordRequiredError) as info:
        SSHConnection(host_for(sshd_password_only)).connect()
    assert time.monotonic() - started < 5
    text = str(info.value)
    assert "ssh-copy-id" in text and "never asks for a password" in text
    assert "without a password" in info.value.hint


def test_refused_key_is_an_authentication_error(sshd: SSHServer, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(AuthenticationError) as info:
        SSHConnection(host_for(sshd, identity_files=[str(stranger)])).connect()
    assert not isinstance(info.value, PasswordRequiredError)
    assert str(stranger) in str(info.value)


def test_key_with_passphrase_and_no_agent_says_ssh_add(sshd: SSHServer, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    locked = tmp_path / "id_locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    with pytest.raises(AuthenticationError) as info:
        SSHConnection(host_for(sshd, identity_files=[str(locked)])).connect()
    assert f"ssh-add {locked}" in str(info.value)


# -- unreachable and lost ------------------------------------------------------------------


def test_refused_port_is_unreachable(sshd: SSHServer):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # keeps the port ours and closed
    try:
        started = time.monotonic()
        with pytest.raises(HostUnreachableError) as info:
            SSHConnection(host_for(sshd, port=holder.getsockname()[1])).connect()
        assert time.monotonic() - started < 2
        assert "refused" in str(info.value).lower()
    finally:
        holder.close()


def test_unknown_hostname_is_unreachable(sshd: SSHServer):
    with pytest.raises(HostUnreachableError, match="cannot resolve"):
        SSHConnection(host_for(sshd, hostname="no-such-host.invalid")).connect()


def test_silent_server_is_unreachable_within_connect_timeout(sshd: SSHServer, proxy: FaultProxy):
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(HostUnreachableError):
        SSHConnection(host_for(sshd, port=proxy.port, known_hosts=proxy.known_hosts, connect_timeout=1.0)).connect()
    assert time.monotonic() - started < 2.5


def test_blackhole_makes_alive_false_within_dead_after(sshd: SSHServer, proxy: FaultProxy):
    dead_after = 3.0
    c = SSHConnection(
        host_for(sshd, port=proxy.port, known_hosts=proxy.known_hosts), keepalive_interval=0.5, dead_after=dead_after
    )
    c.connect()
    try:
        with EchoServer() as echo:
            fwd = c.forward(echo.port)
            assert c.exec(["true"])[0] == 0
            proxy.blackhole()
            started = time.monotonic()
            assert wait_until(lambda: not c.alive, dead_after + 3)
            noticed = time.monotonic() - started
            assert noticed <= dead_after + 1.5, noticed
            assert wait_until(lambda: fwd.closed, 2)  # a lost connection closes its forwards
            with pytest.raises(ConnectionLostError, match="did not answer"):
                c.exec(["true"])
    finally:
        started = time.monotonic()
        c.close()
        assert time.monotonic() - started < 3


def test_reset_makes_exec_raise_connection_lost(sshd: SSHServer, proxy: FaultProxy):
    with SSHConnection(host_for(sshd, port=proxy.port, known_hosts=proxy.known_hosts)) as c:
        cmd = c.spawn(["sleep", "30"])
        assert c.exec(["true"])[0] == 0
        proxy.reset()
        with pytest.raises(ConnectionLostError):
            c.exec(["true"])
        assert not c.alive
        with pytest.raises(ConnectionLostError):
            cmd.wait(5)
        # connect() again makes a fresh connection
        c.connect()
        assert c.alive and c.exec(["true"])[0] == 0


def test_frozen_sshd_is_noticed(tmp_path: Path):
    with SSHServer() as own:
        c = SSHConnection(host_for(own), keepalive_interval=0.3, dead_after=1.5)
        c.connect()
        try:
            pids = own.session_pids()
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            assert wait_until(lambda: not c.alive, 4)
        finally:
            c.close()


# -- ssh config -------------------------------------------------------------------------


def test_resolve_reads_ssh_config(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "config"
    config.write_text(
        "Host gpu\n"
        "    HostName gpu.example.org\n"
        "    Port 2222\n"
        "    User alice\n"
        "    IdentityFile ~/keys/id_gpu\n"
        "    IdentitiesOnly yes\n"
        "    ProxyJump bastion\n"
        "    UserKnownHostsFile ~/kh1 ~/kh2\n"
        "    ConnectTimeout 7\n"
        "Host bastion\n"
        "    HostName bastion.example.org\n"
        "    User bob\n"
        "Host legacy\n"
        "    ProxyCommand nc %h %p\n"
    )
    gpu = SSHHost.resolve("gpu", ssh_config=str(config))
    assert (gpu.hostname, gpu.port, gpu.user) == ("gpu.example.org", 2222, "alice")
    assert gpu.identity_files == [str(tmp_path / "keys" / "id_gpu")]
    assert gpu.identities_only
    assert gpu.proxy_jump == "bastion"
    assert gpu.known_hosts_files == [str(tmp_path / "kh1"), str(tmp_path / "kh2")]
    assert gpu.connect_timeout == 7.0
    assert gpu.known_hosts_name == "[gpu.example.org]:2222"

    override = SSHHost.resolve(
        "gpu", ssh_config=str(config), hostname="10.0.0.5", port=22, user="carol", identity="/k", known_hosts="/kh"
    )
    assert (override.hostname, override.port, override.user) == ("10.0.0.5", 22, "carol")
    assert override.identity_files == ["/k"] and override.known_hosts_files == ["/kh"]
    assert override.known_hosts_name == "10.0.0.5"

    plain = SSHHost.resolve("other.example.org", ssh_config=str(config))
    assert (plain.hostname, plain.port, plain.proxy_jump) == ("other.example.org", 22, None)
    assert plain.known_hosts_files == [str(tmp_path / ".ssh" / "known_hosts")]

    with pytest.raises(HostConfigError, match="ProxyCommand"):
        SSHHost.resolve("legacy", ssh_config=str(config))
    with pytest.raises(HostConfigError):
        SSHHost.resolve("gpu", ssh_config=str(tmp_path / "missing"))


def test_proxy_jump_through_an_alias(sshd: SSHServer, tmp_path: Path):
    config = tmp_path / "config"
    config.write_text(
        "Host jumpbox\n"
        f"    HostName {sshd.host}\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
        "Host inside\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
        "    ProxyJump jumpbox\n"
    )
    host = SSHHost.resolve("inside", ssh_config=str(config))
    assert host.proxy_jump == "jumpbox"
    with SSHConnection(host) as c:
        assert isinstance(c._session.sock, paramiko.Channel)  # the TCP stream is a channel of the jump
        assert c._session.jump is not None and c._session.jump.host.alias == "jumpbox"
        assert c.exec(["echo", "inside"])[1] == b"inside\n"
        jump = c._session.jump
    assert not jump.alive  # closing the connection closed its jump connection


@pytest.mark.parametrize("value", ["4", -1, True])
def test_a_bad_standby_data_setting_is_refused_clearly(tmp_path: Path, value):
    from link_kernel.hosts import load_registry

    registry = tmp_path / "hosts.toml"
    text = f"{value!r}".replace("True", "true").replace("'", '"')
    registry.write_text(f'[hosts.gpu]\nhostname = "gpu.example.org"\nstandby_data = {text}\n')
    with pytest.raises(HostConfigError, match="standby_data is GiB"):
        load_registry(registry)
