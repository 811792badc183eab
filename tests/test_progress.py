"""The live progress line under a remote cell.

The line itself with a fake clock, then through the installed kernelspec: a
kernel that is slow to start (a host python that takes 1.5 s to start), a
transfer slowed by a throttling TCP proxy in front of a real sshd, and a quick
cell that shows nothing; then a notebook run through nbclient, whose saved
cell keeps the quiet line and no trace of the progress line.
"""

from __future__ import annotations

import asyncio
import stat
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

from kernel_client import start_client
from remote_hosts import register
from support.faultproxy import FaultProxy
from test_ssh_hosts import ssh_host

from link_kernel.hosts import HostConfig
from link_kernel.progress import ProgressLine


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def line(show_after: float = 1.0, every: float = 0.25):
    sent: list[tuple[str, dict]] = []
    clock = Clock()
    progress = ProgressLine(lambda t, c: sent.append((t, c)), "link-progress-x",
                            show_after=show_after, every=every, clock=clock)
    return progress, sent, clock


def test_a_quick_step_shows_nothing():
    async def run():
        progress, sent, clock = line(show_after=0.05)
        step = progress.step("sending variables to gpu", 1000)
        step.add(1000)
        step.end()
        await asyncio.sleep(0.1)
        assert progress.close({"data": {"text/plain": "[link] ran on gpu"}, "metadata": {}}) is False
        return sent

    assert asyncio.run(run()) == []


def test_a_slow_transfer_shows_bytes_rate_and_time_left_then_becomes_the_final_line():
    async def run():
        progress, sent, clock = line(show_after=0.05, every=0.02)
        step = progress.step("sending variables to gpu", 100 * 2**20)
        clock.now += 2.0
        step.add(25 * 2**20)
        await asyncio.sleep(0.08)  # past show_after: drawn, then redrawn in place
        assert [t for t, _ in sent][:1] == ["display_data"]
        assert {t for t, _ in sent[1:]} <= {"update_display_data"}
        first = sent[0][1]
        assert first["transient"] == {"display_id": "link-progress-x"}
        assert first["data"]["text/plain"] == (
            "[link] sending variables to gpu: 25.0 MiB of 100.0 MiB, 12.5 MiB/s, 6 s left")
        clock.now += 2.0
        step.add(25 * 2**20)
        await asyncio.sleep(0.05)  # redrawn in place
        updates = [c for t, c in sent if t == "update_display_data"]
        assert updates and updates[-1]["transient"] == {"display_id": "link-progress-x"}
        assert "50.0 MiB of 100.0 MiB" in updates[-1]["data"]["text/plain"]
        assert "4 s left" in updates[-1]["data"]["text/plain"]
        step.end()
        final = {"data": {"text/plain": "[link] ran on gpu in 4.10 s"}, "metadata": {"link": {}}}
        assert progress.close(final) is True
        count = len(sent)
        await asyncio.sleep(0.05)
        return sent, count

    sent, count = asyncio.run(run())
    assert len(sent) == count  # nothing after the final line
    kind, last = sent[-1]
    assert kind == "update_display_data"
    assert last["data"]["text/plain"] == "[link] ran on gpu in 4.10 s"
    assert last["transient"] == {"display_id": "link-progress-x"}


def test_waiting_without_bytes_shows_how_long():
    async def run():
        progress, sent, clock = line(show_after=0.05, every=0.02)
        progress.step("starting a kernel on gpu")
        clock.now += 3.2
        await asyncio.sleep(0.08)
        progress.close()
        return sent

    sent = asyncio.run(run())
    assert sent[0][1]["data"]["text/plain"] == "[link] starting a kernel on gpu (3 s)"
    assert sent[-1] == ("update_display_data", {"data": {"text/plain": ""}, "metadata": {"link": {}},
                                                 "transient": {"display_id": "link-progress-x"}})


# -- through the kernel -----------------------------------------------------------------


@pytest.fixture
def slow_python(tmp_path):
    """A host python that takes 1.5 s before it starts (a busy host, a slow filesystem)."""
    wrapper = tmp_path / "slow-python"
    wrapper.write_text(f"#!/bin/sh\nsleep 1.5\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    register(HostConfig(alias="slowstart", transport="process", workdir=str(tmp_path / "host"),
                        python=str(wrapper), standby=False))
    return "slowstart"


def progress_texts(result) -> list[str]:
    return [m["content"]["data"]["text/plain"] for m in result.progress]


def test_a_slow_kernel_start_shows_a_line_that_becomes_the_quiet_line(slow_python, tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    try:
        result = client.run(f"# link: {slow_python}\nprint('hi')")
        assert result.status == "ok" and result.stdout == "hi\n"
        texts = progress_texts(result)
        assert texts[0].startswith(f"[link] starting a kernel on {slow_python} ("), texts
        assert [m["msg_type"] for m in result.progress][0] == "display_data"
        assert result.progress[-1]["msg_type"] == "update_display_data"
        assert texts[-1].startswith(f"[link] ran on {slow_python} in ")  # replaced in place
        assert {m["content"]["transient"]["display_id"] for m in result.progress} == {
            f"link-progress-{result.reply['parent_header']['msg_id']}"}
        (note,) = result.notes  # as the notebook shows it: one line
        assert note["content"]["data"]["text/plain"].startswith(f"[link] ran on {slow_python}")
        assert not result.of_type("update_display_data")
    finally:
        client.shutdown()


def test_a_slow_transfer_shows_bytes_done_of_the_total(sshd, tmp_path):
    with FaultProxy(sshd.host, sshd.port) as proxy:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line(proxy.port) + "\n")
        register(ssh_host("narrow", sshd, tmp_path, port=proxy.port, known_hosts=str(known)))
        (tmp_path / "nb").mkdir()
        client = start_client("link", cwd=str(tmp_path / "nb"))
        try:
            assert client.run("import os\nblob = os.urandom(6 << 20)").status == "ok"
            assert client.run("# link: narrow\n1").status == "ok"  # connected, kernel up
            proxy.throttle(2 << 20)
            result = client.run("# link: narrow\nlen(blob)", timeout=120)
            proxy.throttle(0)
            assert result.status == "ok" and result.result == str(6 << 20)
            sending = [t for t in progress_texts(result) if "sending variables to narrow" in t]
            assert sending, progress_texts(result)
            assert " of 6.0 MiB, " in sending[-1] and "/s, " in sending[-1] and " left" in sending[-1]
            assert progress_texts(result)[-1].startswith("[link] ran on narrow in ")
        finally:
            client.shutdown()


def test_a_quick_cell_shows_no_progress_line(tmp_path):
    register(HostConfig(alias="brisk", transport="process", workdir=str(tmp_path / "host")))
    client = start_client("link", cwd=str(tmp_path))
    try:
        client.run("# link: brisk\n1")  # the first kernel may be slow on a busy machine
        for _ in range(3):
            time.sleep(0.5)  # its kernel is ready: the cell has nothing to wait for
            result = client.run("# link: brisk\nx = 1")
            assert result.status == "ok"
            assert result.progress == [], progress_texts(result)
            (note,) = result.notes
            assert note["msg_type"] == "display_data"
    finally:
        client.shutdown()


def test_the_saved_notebook_keeps_the_quiet_line_only(slow_python, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"# link: {slow_python}\nprint('hi')")]
    NotebookClient(nb, kernel_name="link", resources={"metadata": {"path": str(tmp_path)}},
                   timeout=120).execute()
    outputs = nb.cells[0].outputs
    assert [o["output_type"] for o in outputs] == ["display_data", "stream"] or \
        [o["output_type"] for o in outputs] == ["stream", "display_data"], outputs
    (quiet,) = [o for o in outputs if o["output_type"] == "display_data"]
    assert quiet["data"]["text/plain"].startswith(f"[link] ran on {slow_python} in ")
    assert "target" in quiet["metadata"]["link"]
    assert "starting a kernel" not in str(outputs)
