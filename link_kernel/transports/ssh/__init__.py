"""The SSH transport: one paramiko connection per host, reused by every cell that runs there.

An ``SSHHost`` says where a host is and how to log in, as ``~/.ssh/config``
would (``SSHHost.resolve``). An ``SSHConnection`` is one authenticated SSH
connection to it, opened once and reused by every cell that runs there::

    conn = SSHConnection(SSHHost.resolve("gpu"))
    conn.connect()                                  # host key, then keys; never a password
    code, out, err = conn.exec(["python3", "-c", "print(1)"])
    conn.put_file("/tmp/k.json", secret)            # created 0600, then written
    cmd = conn.spawn(["python3", "-m", "ipykernel_launcher", "-f", "/tmp/k.json"])
    fwd = conn.forward(remote_port)                 # 127.0.0.1:fwd.local_port -> host:remote_port
    ...
    conn.close()                                    # kernel gets SIGHUP through its pty

One concept per module, as paramiko does it; each imports only the ones above it::

    config.py      SSHHost: ssh_config resolution, ProxyJump hops, the known_hosts name
    handshake.py   a tuned TCP socket, cipher order, banner and key exchange
    hostkeys.py    fingerprints, known_hosts files, the check of the server's key
    auth.py        offering keys (identity files, ssh-agent); never a password
    sftp.py        paramiko's SFTP client plus an exclusive create and a pipelined read
    pump.py        one selector thread per connection that moves every byte
    session.py     one live connection: keepalive, liveness, channel opens, teardown
    tunnel.py      Forward: a local port tunnelled to the host, one channel per connection
    command.py     RemoteCommand: a command in a channel of its own, its output drained
    connection.py  SSHConnection: the pieces above put together
    supervisor.py  SSHSupervisor: a bootstrap supervisor in a pty session
    transport.py   SSHTransport: Link's Transport over one SSHConnection

Errors are mapped at this boundary onto ``link_kernel.errors``:

- ``connect``: ``HostUnreachableError`` (DNS, refused, no route, timeout, no SSH
  server), ``UnknownHostKeyError`` / ``ChangedHostKeyError`` (host key not the
  one in known_hosts), ``PasswordRequiredError`` (the host wants a password or
  keyboard-interactive; Link never prompts), ``AuthenticationError`` (every key
  refused), ``HostConfigError`` (a known_hosts file cannot be read);
- everything after ``connect``: ``ConnectionLostError`` when the connection is
  gone, whether it dropped, was reset, or went silent for ``dead_after`` seconds.

Threads. Each live connection runs paramiko's transport thread, a keepalive
thread that asks the server for a reply every ``keepalive_interval`` seconds,
and one pump thread that moves the bytes of every forward, drains the output of
every spawned command, and declares the connection dead when no reply came for
``dead_after`` seconds. Channel opens for forwards run in short-lived threads
so that a slow open never stalls the traffic of the other forwards. ``close()``
joins them all.

This package's ``__init__`` only re-exports; no module inside imports it.
"""

from __future__ import annotations

from .command import TAIL_BYTES, RemoteCommand
from .config import SSH_PORT, SSHHost
from .connection import SSHConnection
from .handshake import PREFERRED_CIPHERS
from .hostkeys import add_known_host, fetch_host_key, fingerprint
from .sftp import SFTP_CHUNK, SFTP_READ_CHUNK, SFTP_READ_DEPTH, SFTP_WINDOW
from .supervisor import SSHSupervisor
from .transport import BULK_MIN, SSHTransport
from .tunnel import Forward

__all__ = [
    "BULK_MIN",
    "PREFERRED_CIPHERS",
    "SFTP_CHUNK",
    "SFTP_READ_CHUNK",
    "SFTP_READ_DEPTH",
    "SFTP_WINDOW",
    "SSH_PORT",
    "TAIL_BYTES",
    "Forward",
    "RemoteCommand",
    "SSHConnection",
    "SSHHost",
    "SSHSupervisor",
    "SSHTransport",
    "add_known_host",
    "fetch_host_key",
    "fingerprint",
]
