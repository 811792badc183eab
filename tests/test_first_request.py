"""The first request to a fresh router gets its reply and idle, while the local kernel starts.

Each test starts its own router and sends its request the moment the router
answers kernel_info, before the local kernel behind it is ready: the window
where a failed first cell once waited forever for a local kernel that could
not yet answer.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time

import pytest
from jupyter_client.manager import KernelManager

from kernel_client import descendants, validate_message, wait_gone

#: Fresh routers per bad first cell; LINK_FIRST_TRIES raises it to hunt a rare hang.
TRIES = int(os.environ.get("LINK_FIRST_TRIES", "3"))


class Fresh:
    """A router started through the kernelspec, answered kernel_info, nothing more."""

    def __init__(self) -> None:
        for attempt in range(3):
            self.log = tempfile.NamedTemporaryFile("a", prefix="link-first-", suffix=".log", delete=False)
            self.km = KernelManager(kernel_name="link")
            self.km.start_kernel(stderr=self.log)
            self.kc = self.km.client()
            self.kc.start_channels()
            try:
                self.kc.wait_for_ready(timeout=60)
                return
            except RuntimeError:
                # jupyter_client picks free ports that the kernel binds later: on a busy
                # machine another process can take one first. Only that is retried.
                self.kc.stop_channels()
                self.km.shutdown_kernel(now=True)
                self.log.close()
                with open(self.log.name, errors="replace") as f:
                    text = f.read()
                os.unlink(self.log.name)
                if "Address already in use" not in text or attempt == 2:
                    raise RuntimeError(f"the router did not start:\n{text[-5000:]}") from None

    def send(self, method: str, *args, **kwargs) -> str:
        return getattr(self.kc, method)(*args, **kwargs)

    def collect(self, msg_id: str, reply_type: str, timeout: float = 30.0) -> tuple[dict, list]:
        """The reply and the iopub messages of ``msg_id``, up to its idle."""
        deadline = time.monotonic() + timeout
        reply, messages, idle = None, [], False
        while reply is None or not idle:
            if time.monotonic() > deadline:
                self.km.signal_kernel(10)  # SIGUSR1: the router dumps its tasks to the log
                time.sleep(1)
                self.log.flush()
                with open(self.log.name, errors="replace") as f:
                    print(f.read()[-20_000:])
                raise TimeoutError(f"no {reply_type} and idle for the first request: got {reply}, {messages}")
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                messages.append(msg)
                idle = idle or msg["content"].get("execution_state") == "idle"
            if reply is None:
                try:
                    shell = self.kc.get_shell_msg(timeout=0)
                except queue.Empty:
                    continue
                if shell["parent_header"].get("msg_id") == msg_id:
                    validate_message(shell, reply_type, msg_id)
                    reply = shell
        return reply, messages

    def close(self) -> None:
        if self.log.closed:
            return
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture
def fresh():
    routers: list[Fresh] = []

    def start() -> Fresh:
        routers.append(Fresh())
        return routers[-1]

    yield start
    for router in routers:
        router.close()


@pytest.mark.parametrize(
    ("code", "ename"),
    [
        ("# link: gpux\n1", "UnknownTargetError"),
        ("# link: local bogus=1\n1", "RoutingError"),
        ("# link:\n1", "RoutingError"),
    ],
)
def test_a_bad_first_cell_gets_its_error_reply_and_idle(fresh, code, ename):
    for _ in range(TRIES):
        router = fresh()
        reply, messages = router.collect(router.send("execute", code), "execute_reply")
        content = reply["content"]
        assert content["status"] == "error" and content["ename"] == ename, content
        errors = [m for m in messages if m["msg_type"] == "error"]
        assert [m["content"]["ename"] for m in errors] == [ename]
        # the failed cell is in the history under its count, as a cell that raised is
        history = router.collect(
            router.send("history", hist_access_type="tail", n=1, raw=True, output=False),
            "history_reply",
        )[0]
        assert [e[1:] for e in history["content"]["history"]] == [[content["execution_count"], code]]
        router.close()


@pytest.mark.parametrize(
    ("method", "args", "reply_type"),
    [
        # complete, inspect and is_complete take one path; history and comm_info
        # replies are edited on the way; kernel_info is the router's own
        ("complete", ("import o", 8), "complete_reply"),
        ("history", (), "history_reply"),
        ("comm_info", (), "comm_info_reply"),
        ("kernel_info", (), "kernel_info_reply"),
        ("execute", ("6 * 7",), "execute_reply"),
    ],
)
def test_any_first_request_gets_its_reply_and_idle(fresh, method, args, reply_type):
    router = fresh()
    reply, messages = router.collect(router.send(method, *args), reply_type)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert [m["content"]["execution_state"] for m in messages if m["msg_type"] == "status"] == [
        "busy",
        "idle",
    ]
    # and the router still serves the next one
    assert router.collect(router.send("execute", "1 + 1"), "execute_reply")[0]["content"]["status"] == "ok"


def test_an_interrupt_first_gets_its_reply(fresh):
    router = fresh()
    msg = router.kc.session.msg("interrupt_request", {})
    router.kc.control_channel.send(msg)
    reply = router.kc.get_control_msg(timeout=30)
    assert reply["msg_type"] == "interrupt_reply" and reply["content"]["status"] == "ok"
    assert router.collect(router.send("execute", "1 + 1"), "execute_reply")[0]["content"]["status"] == "ok"


def test_a_shutdown_first_gets_its_reply_and_ends_every_process(fresh):
    router = fresh()
    pid = router.km.provisioner.process.pid
    router.kc.shutdown()
    reply = router.kc.get_control_msg(timeout=30)
    assert reply["msg_type"] == "shutdown_reply" and reply["content"]["status"] == "ok"
    children = descendants(pid)
    router.km.provisioner.process.wait(timeout=30)
    assert wait_gone(children, 10) == []


def test_a_comm_open_first_reaches_the_local_kernel(fresh):
    """JupyterLab opens the widget manager's control comm as soon as it connects; a
    kernel that has not imported ipywidgets answers it with a comm_close, as plain
    ipykernel does."""
    router = fresh()
    msg = router.kc.session.msg(
        "comm_open", {"comm_id": "control-1", "target_name": "jupyter.widget.control", "data": {}}
    )
    router.kc.shell_channel.send(msg)
    deadline, seen = time.monotonic() + 30, []
    while not any(m["msg_type"] == "comm_close" and m["content"]["comm_id"] == "control-1" for m in seen):
        assert time.monotonic() < deadline, seen
        try:
            seen.append(router.kc.get_iopub_msg(timeout=0.1))
        except queue.Empty:
            pass
    states = [m["content"]["execution_state"] for m in seen if m["msg_type"] == "status"
              and m["parent_header"].get("msg_id") == msg["header"]["msg_id"]]
    assert states[:2] == ["busy", "idle"]
    assert router.collect(router.send("execute", "1 + 1"), "execute_reply")[0]["content"]["status"] == "ok"
