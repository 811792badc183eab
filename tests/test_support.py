"""The test fixtures themselves: the sshd helper and the FaultProxy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from support.faultproxy import EchoServer, FaultProxy
from support.sshd import SSHServer


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# -- sshd ------------------------------------------------------------------------------


def test_system_ssh_through_the_config(sshd: SSHServer):
    result = subprocess.run(sshd.ssh_argv("echo", "hello world", "$HOME"), capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello world $HOME\n"


def test_host_fingerprint_matches_ssh_keygen(sshd: SSHServer):
    out = subprocess.run(["ssh-keygen", "-lf", sshd.host_key + ".pub"], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == sshd.host_fingerprint


def test_known_hosts_pins_the_key(sshd: SSHServer, tmp_path):
    assert sshd.known_hosts_line() == f"[127.0.0.1]:{sshd.port} {open(sshd.host_key + '.pub').read().split()[0]} " + (
        open(sshd.host_key + ".pub").read().split()[1] + "\n"
    )
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = sshd.ssh_argv("true")
    argv[1:1] = ["-o", f"UserKnownHostsFile={empty}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert result.returncode == 255 and "Host key verification failed" in result.stderr


def test_password_only_server_refuses_keys(sshd_password_only: SSHServer):
    result = subprocess.run(sshd_password_only.ssh_argv("true"), capture_output=True, text=True, timeout=20)
    assert result.returncode == 255
    assert "Permission denied (password,keyboard-interactive)" in result.stderr


def test_restart_keeps_port_and_key_and_stop_kills_sessions():
    with SSHServer() as server:
        port, first_pid = server.port, server.sshd_pid
        server.restart()
        assert (server.port, server.host_fingerprint) == (port, server.host_fingerprint)
        assert server.sshd_pid != first_pid
        session = subprocess.Popen(server.ssh_argv("sleep", "60"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not server.session_pids() and time.monotonic() < deadline:
                time.sleep(0.02)
            pids = server.session_pids()
            assert pids and server.sshd_pid not in pids
            os.kill(pids[0], signal.SIGSTOP)  # stop() copes with frozen sessions too
            server.stop()
            assert session.wait(10) == 255
            assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
        finally:
            if session.poll() is None:
                session.kill()
            session.wait()
            session.stderr.close()
        assert any("Server listening" in line for line in server.log)


# -- FaultProxy --------------------------------------------------------------------------


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


def test_proxy_forwards(echo: EchoServer):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == b"hello"
        big = os.urandom(1 << 20)
        client.sendall(big)
        assert recv_exactly(client, len(big)) == big
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""  # EOF is passed on both ways
        client.close()


def test_proxy_blackhole_keeps_sockets_open_and_moves_nothing(echo: EchoServer):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"one")
        assert recv_exactly(client, 3) == b"one"
        proxy.blackhole()
        client.sendall(b"two")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(10)  # nothing comes back, and nothing closes
        assert proxy.connections == 1
        late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        late.settimeout(0.3)
        late.sendall(b"late")
        with pytest.raises(TimeoutError):
            late.recv(10)
        proxy.forward()
        client.settimeout(5)
        late.settimeout(5)
        assert recv_exactly(client, 3) == b"two"  # held bytes flow once forwarding resumes
        assert recv_exactly(late, 4) == b"late"
        client.close()
        late.close()


def test_proxy_reset_and_refuse_new(echo: EchoServer):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"x")
        assert recv_exactly(client, 1) == b"x"
        proxy.reset()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            client.sendall(b"y")
            client.recv(10)
        client.close()
        assert proxy.connections == 0

        proxy.refuse_new = True
        with pytest.raises(ConnectionResetError):  # from connect() or from the first recv()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as refused:
                refused.recv(10)

        proxy.refuse_new = False
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"z")
        assert recv_exactly(again, 1) == b"z"
        again.close()


def test_proxy_close_closes_everything(echo: EchoServer):
    proxy = FaultProxy("127.0.0.1", echo.port)
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    client.sendall(b"a")
    assert recv_exactly(client, 1) == b"a"
    proxy.close()
    assert client.recv(10) == b""
    client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
