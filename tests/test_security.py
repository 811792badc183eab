"""Link never widens who can reach a kernel, and never trusts bytes it cannot check.

(Unknown and changed host keys are refused in tests/test_ssh_hosts.py.)
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest
import zmq
from kernel_client import descendants, start_client
from remote_hosts import register
from test_ssh_hosts import ssh_host

from link_kernel import agent
from link_kernel.relay import NullRelay
from link_kernel.transports import Supervisor

KEY = re.compile(rb"[0-9a-f]{64}")


def listening(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on (TCP, IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(_address(fields[1]))
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    if len(host) == 8:
        ip = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        ip = "::1" if host == "00000000000000000000000001000000" else host
    return f"{ip}:{int(port, 16)}"


def test_remote_kernels_and_tunnels_listen_on_loopback_only(sshd, tmp_path):
    register(ssh_host("loopback", sshd, tmp_path))
    client = start_client("link", cwd=str(tmp_path))
    try:
        pid = int(client.run("# link: loopback keep\nimport os\nos.getpid()").result)
        kernel_ports = listening(pid)
        router_ports = listening(client.pid)
        assert len(kernel_ports) >= 4
        assert all(a.startswith("127.0.0.1:") for a in kernel_ports), kernel_ports
        assert all(a.startswith("127.0.0.1:") for a in router_ports), router_ports
        client.run("%link release loopback")
    finally:
        client.shutdown()


def test_connection_files_are_private_and_removed(tmp_path, sshd):
    register(ssh_host("private", sshd, tmp_path))
    client = start_client("link", cwd=str(tmp_path))
    try:
        client.run("# link: private keep\n1")
        runtime = [Path(_last_arg(p)) for p in descendants(client.pid)
                   if _last_arg(p).startswith("/tmp/link-")]
        assert len(runtime) == 1
        assert stat.S_IMODE(runtime[0].stat().st_mode) & 0o777 == 0o700
        files = list(runtime[0].glob("*.json"))
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert not list((tmp_path / "private-work" / ".link").glob("kernel-*.json"))
        client.run("%link release private")
    finally:
        client.shutdown()
    assert not runtime[0].exists()


def _last_arg(pid: int) -> str:
    try:
        args = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return ""
    return args[-1].decode(errors="replace") if args else ""


def _all_command_lines() -> bytes:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return b"\n".join(out)


def test_no_key_on_a_command_line_or_in_a_log(sshd, tmp_path):
    """The router's key and a remote kernel's key, while both are in use."""
    from link_kernel.backends.remote import RemoteBackend

    host = ssh_host("secret", sshd, tmp_path)
    log = tmp_path / "router.log"

    async def remote_key() -> bytes:
        context = zmq.Context()
        backend = RemoteBackend(host, local_dir=str(tmp_path), context=context, relay=NullRelay(),
                                sync=None)
        kernel = await backend.start_kernel({})
        key = kernel.provisioner.remote_info["key"].encode()
        lines = _all_command_lines()
        await backend._release(kernel)
        await backend.shutdown()
        context.term()
        return key, lines

    with log.open("wb") as stream:
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="link")
        km.start_kernel(stdout=stream, stderr=stream, extra_arguments=["--debug"])
        try:
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            kc.execute_interactive("x = 1", timeout=30)
            router_key = km.session.key
            router_lines = _all_command_lines()
            key, lines = asyncio.run(remote_key())
            kc.stop_channels()
        finally:
            km.shutdown_kernel()
    assert router_key and key
    for secret in (router_key, key):
        assert secret not in router_lines and secret not in lines
        assert secret not in log.read_bytes()
        assert secret.decode() not in "\n".join(sshd.log)
    assert not [m for m in KEY.findall(lines) if m in (router_key, key)]


def test_only_blobs_that_match_their_hash_are_unpickled(tmp_path):
    """A blob that came by transfer (named ``ID.in``) is checked before it is unpickled."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob_id, size = agent.write_blob(str(tmp_path), Payload(), "sha256")
    path = tmp_path / blob_id
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit on the way
    path.unlink()
    arrived = tmp_path / (blob_id + agent.UNCHECKED)
    arrived.write_bytes(bytes(data))
    assert agent.has_blob(str(tmp_path), blob_id)
    with pytest.raises(agent.BlobError, match="does not match its hash"):
        agent.read_blob(str(tmp_path), blob_id)
    assert not marker.exists()
    assert arrived.exists() and not path.exists()  # still unchecked: refused again next time

    forged = tmp_path / ("sha256-" + "0" * 64 + agent.UNCHECKED)
    forged.write_bytes(bytes(data))
    with pytest.raises(agent.BlobError):
        agent.read_blob(str(tmp_path), forged.name[: -len(agent.UNCHECKED)])
    assert not marker.exists()

    # a good blob is checked on its first load, then known good
    good_id, _ = agent.write_blob(str(tmp_path), {"k": [1, 2]}, "sha256")
    (tmp_path / good_id).rename(tmp_path / (good_id + agent.UNCHECKED))
    assert agent.read_blob(str(tmp_path), good_id) == {"k": [1, 2]}
    assert (tmp_path / good_id).exists() and not (tmp_path / (good_id + agent.UNCHECKED)).exists()
    assert agent.read_blob(str(tmp_path), good_id) == {"k": [1, 2]}

    small_id, parts = agent.blob_of([1, 2, 3], "xxh3")
    entry = agent.describe([1, 2, 3], small_id, parts, str(tmp_path))
    assert agent.load_entry(str(tmp_path), entry) == [1, 2, 3]
    import base64

    tampered = bytearray(base64.b64decode(entry["inline"]))
    tampered[-9] ^= 0x01
    entry["inline"] = base64.b64encode(bytes(tampered)).decode()
    with pytest.raises(agent.BlobError):
        agent.load_entry(str(tmp_path), entry)


class FakeSupervisor(Supervisor):
    """Feeds scripted supervisor lines: a unit-test seam for the start checks."""

    def write(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        ({"python": "3.9.18", "executable": "/opt/py39/bin/python", "missing": []},
         "gpu runs Python 3.9.18 but this notebook runs"),
        ({"python": "3.11.2", "executable": "/usr/bin/python3", "missing": ["ipykernel", "dill"]},
         "the python on gpu (/usr/bin/python3) lacks ipykernel, dill"),
    ],
)
def test_a_host_python_that_does_not_fit_is_refused(hello, message):
    from link_kernel.errors import RemoteEnvironmentError

    async def check():
        supervisor = FakeSupervisor("gpu", asyncio.get_running_loop())
        supervisor._feed(f"LINK HELLO {__import__('json').dumps(hello)}\n".encode())
        await supervisor.started(5, (3, 11))

    with pytest.raises(RemoteEnvironmentError, match=re.escape(message)):
        asyncio.run(check())


def test_a_blob_loaded_for_writing_is_a_private_copy(tmp_path):
    import numpy as np

    blob_id, _ = agent.write_blob(str(tmp_path), np.arange(2**18, dtype=np.float64), "sha256")
    before = (tmp_path / blob_id).read_bytes()
    value = agent.read_blob(str(tmp_path), blob_id, write=True)
    # a copy in anonymous memory, not a map of the file: a cell's big write never faults
    # the file in, and the copy is freed with the kernel (huge pages where the host has them)
    assert str(tmp_path / blob_id) not in Path("/proc/self/maps").read_text()
    value *= 2
    assert value[-1] == 2 * (2**18 - 1)
    assert (tmp_path / blob_id).read_bytes() == before
    assert agent.read_blob(str(tmp_path), blob_id)[-1] == 2**18 - 1


def test_a_private_copy_over_several_reads_is_the_file_byte_for_byte(tmp_path, monkeypatch):
    """The copy is read in chunks into memory mapped populated: every byte lands where it
    belongs, the copy is writable, and a file shorter than it said is refused."""
    monkeypatch.setattr(agent, "_READ_CHUNK", 4096)
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    for huge in (False, True):
        with open(path, "rb", buffering=0) as f:
            copy = agent._private_copy(f, len(data), huge=huge)
        assert copy[:] == data
        copy[0] = data[0] ^ 0xFF  # private: the file stays as it was
        assert path.read_bytes() == data
        copy.close()
    with open(path, "rb", buffering=0) as f, pytest.raises(agent.BlobError, match="ended at"):
        agent._private_copy(f, len(data) + 1)


def test_a_preloaded_blob_is_a_private_copy_used_once(tmp_path):
    import numpy as np

    store = str(tmp_path)
    blob_id, size = agent.write_blob(store, np.arange(2**16, dtype=np.float64), "sha256")
    unchecked_id, _ = agent.write_blob(store, np.ones(2**16), "sha256")
    (tmp_path / unchecked_id).rename(tmp_path / (unchecked_id + agent.UNCHECKED))
    try:
        assert agent.preload(store, [blob_id, unchecked_id, "sha256-missing"], 2**20) == size
        assert agent.preloaded() == size
        agent._PRELOADED[blob_id].done.wait(10)
        value = agent.read_blob(store, blob_id, write=True)
        assert blob_id in agent._TAKEN
        value *= 2
        assert value[-1] == 2 * (2**16 - 1)
        assert agent.read_blob(store, blob_id)[-1] == 2**16 - 1  # the file, as it was
        assert blob_id not in agent._PRELOADED
        assert agent.preload(store, [blob_id], size - 1) == 0  # over the budget: nothing
        assert not agent._PRELOADED
    finally:
        agent._PRELOADED.clear()
        agent._TAKEN.clear()
        agent._PRELOADED_BYTES = 0


def test_the_chunked_hash_depends_on_the_content_alone(monkeypatch):
    """xxh3t hashes chunks side by side; how the content is cut into parts does not matter."""
    monkeypatch.setattr(agent._Xxh3Tree, "CHUNK", 1000)
    data = bytes(range(256)) * 20  # 5120 bytes: six chunks

    def name(*parts) -> str:
        hasher = agent._hasher("xxh3t")
        for part in parts:
            hasher.update(part)
        return hasher.hexdigest()

    whole = name(data)
    assert name(data[:7], data[7:2500], memoryview(data)[2500:]) == whole
    import numpy as np

    assert name(np.frombuffer(data, dtype=np.float64)) == whole  # any buffer, by its bytes
    changed = bytearray(data)
    changed[4000] ^= 1
    assert name(bytes(changed)) != whole
    assert name(data + b"\0") != whole and name(b"") != name(b"\0")


def test_an_interrupt_that_escapes_ipykernels_handler_still_gets_a_reply():
    """SIGINT between ipykernel's execute_input and the cell escapes its handler, which
    then sends no reply: the wrapper sends the error and the reply, and the router's
    link_result carries it (the router would otherwise wait for ever)."""
    import asyncio
    import types

    from jupyter_client.session import Session

    class Wire:
        def __init__(self):
            self.sent = []

        def send_multipart(self, frames, *args, **kwargs):
            self.sent.append(frames)

    session = Session(key=b"k")
    kernel = types.SimpleNamespace(session=session, iopub_socket=Wire())
    shell = types.SimpleNamespace(execution_count=3, user_ns={}, user_ns_hidden={},
                                  last_execution_result=types.SimpleNamespace(success=True))

    async def original(stream, ident, parent):
        raise KeyboardInterrupt

    handler = agent._wrap_execute(shell, kernel, original)
    parent = session.msg("execute_request", {"code": "1"}, metadata={"link": {"count": 3}})
    shell_stream = Wire()
    asyncio.run(handler(shell_stream, [b"id"], parent))

    def messages(wire):
        out = []
        for frames in wire.sent:
            i = frames.index(b"<IDS|MSG>")
            out.append(session.deserialize(frames[i + 1 :]))
        return out

    reply = messages(shell_stream)[0]
    assert reply["msg_type"] == "execute_reply" and reply["content"]["ename"] == "KeyboardInterrupt"
    published = messages(kernel.iopub_socket)
    assert [m["msg_type"] for m in published] == ["error", "link_result"]
    result = published[1]["content"]
    assert result["succeeded"] is False and result["reply"]["content"]["status"] == "error"
