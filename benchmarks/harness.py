"""Shared parts of the benchmarks: an isolated Jupyter setup, an sshd, clients.

Every benchmark starts its own OpenSSH server on 127.0.0.1 (the test suite's
fixture class) and its own Jupyter/IPython dirs, so it measures this checkout
and nothing of the user's configuration.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@contextlib.contextmanager
def isolated_jupyter() -> Iterator[Path]:
    """Private Jupyter, IPython and cache dirs with the link kernelspec installed."""
    base = Path(tempfile.mkdtemp(prefix="link-bench-"))
    saved = dict(os.environ)
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_DATA_DIR", "data"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("XDG_CACHE_HOME", "cache"),
    ):
        os.environ[var] = str(base / sub)
    os.environ["JUPYTER_PATH"] = str(base / "share" / "jupyter")
    from link_kernel import kernelspec

    kernelspec.install(prefix=str(base))
    try:
        yield base
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def sshd() -> Iterator:
    from support.sshd import SSHServer

    with SSHServer(alias="linkbench") as server:
        yield server


def ssh_host(alias: str, server, base: Path, **settings):
    from link_kernel.hosts import HostConfig

    values = dict(
        alias=alias,
        transport="ssh",
        hostname=server.host,
        port=server.port,
        user=server.user,
        identity=str(server.client_key),
        known_hosts=str(server.known_hosts),
        ssh_config=os.devnull,
        python=sys.executable,
        workdir=str(base / f"{alias}-work"),
        cache=str(base / f"{alias}-cache"),
    )
    values.update(settings)
    return HostConfig(**values)


def register(*configs) -> None:
    from link_kernel import hosts

    known = hosts.load_registry()
    known.update({c.alias: c for c in configs})
    hosts.save_registry(known)


def link_client(cwd: Path):
    from kernel_client import start_client

    cwd.mkdir(parents=True, exist_ok=True)
    return start_client("link", cwd=str(cwd))


def timed_cell(client, code: str, timeout: float = 600.0):
    """(seconds from execute_request to reply and idle, Result)."""
    result = client.run(code, timeout=timeout)
    if result.status != "ok":
        raise RuntimeError(f"benchmark cell failed: {result.text}")
    return result.elapsed, result


def lean_cell(kc, code: str, timeout: float = 600.0) -> tuple[float, dict]:
    """(seconds from execute_request to reply and idle, reply), as a frontend sees it.

    The same for every kernel measured: a jupyter_client blocking client and no
    schema validation, so the client's own cost is small and equal on both sides.
    """
    start = time.perf_counter()
    msg_id = kc.execute(code)
    deadline = start + timeout
    reply, idle = None, False
    while reply is None:
        msg = kc.get_shell_msg(timeout=max(0.0, deadline - time.perf_counter()))
        if msg["parent_header"].get("msg_id") == msg_id:
            reply = msg
    while not idle:
        msg = kc.get_iopub_msg(timeout=max(0.0, deadline - time.perf_counter()))
        idle = (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        )
    seconds = time.perf_counter() - start
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"benchmark cell failed: {reply['content']}")
    return seconds, reply


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def drain(q) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False
