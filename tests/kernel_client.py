"""A real jupyter_client client for tests, and helpers to inspect processes.

Every message a test receives is validated against the protocol schema of
jupyter_kernel_test, so a malformed message fails the test that saw it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_kernel_test.msgspec_v5 import schema_fragments
from jupyter_kernel_test.msgspec_v5 import validate_message as _validate_known


def validate_message(msg: dict, msg_type: str, parent_id: str) -> None:
    """Validate against the protocol schema; types it lacks (comm_*) get the envelope check."""
    if msg_type in schema_fragments:
        _validate_known(msg, msg_type, parent_id)
        return
    assert msg["msg_type"] == msg_type == msg["header"]["msg_type"]
    assert msg["parent_header"]["msg_id"] == parent_id
    assert {"msg_id", "session", "username", "date", "version"} <= set(msg["header"])


@dataclass
class Result:
    """Everything one execute_request produced."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    #: The router's "ran on HOST in N s" lines under remote cells (kept apart), as a
    #: frontend shows them at the end: a progress line is replaced by what updated it.
    notes: list[dict[str, Any]] = field(default_factory=list)
    #: Every message of a progress line (``link-progress-*`` display id), in order.
    progress: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def content(self) -> dict[str, Any]:
        return self.reply["content"]

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.outputs if m["msg_type"] == msg_type]

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout"
        )

    @property
    def stderr(self) -> str:
        return "".join(
            m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stderr"
        )

    @property
    def text(self) -> str:
        """All text a notebook would show: streams, results, displays, errors."""
        parts = []
        for m in self.outputs:
            c = m["content"]
            if m["msg_type"] == "stream":
                parts.append(c["text"])
            elif m["msg_type"] in ("execute_result", "display_data"):
                parts.append(c["data"].get("text/plain", ""))
            elif m["msg_type"] == "error":
                parts.append(f"{c['ename']}: {c['evalue']}")
        return "".join(parts)

    @property
    def result(self) -> str | None:
        results = self.of_type("execute_result")
        return results[-1]["content"]["data"]["text/plain"] if results else None

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[-1]["content"] if errors else None


class LinkClient:
    """A kernel started through its kernelspec, with a blocking client."""

    def __init__(self, km: KernelManager, kc: BlockingKernelClient, log_file: Any = None) -> None:
        self.km = km
        self.kc = kc
        #: The kernel's stderr, where a Link router writes its log and its state dumps.
        self.log_file = log_file
        self.log = Path(log_file.name) if log_file is not None else None

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def dump_state(self) -> None:
        """Have a Link router write its threads' and tasks' stacks to its stderr
        (which the test's captured output shows), to see where a cell is stuck."""
        if self.km is None or self.km.kernel_name != "link" or not self.km.has_kernel:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while self.log is not None and time.monotonic() < deadline:
                if "[link] end of dump" in self.log.read_text(errors="replace"):
                    break
                time.sleep(0.05)
        if self.log is not None:  # shown with the failing test's captured output
            print(f"--- the router's stderr ({self.log}), last 30,000 characters ---")
            print(self.log.read_text(errors="replace")[-30_000:])

    def run(
        self,
        code: str,
        *,
        timeout: float = 60.0,
        allow_stdin: bool = False,
        on_input: Callable[[dict], str] | None = None,
        on_output: Callable[[dict], None] | None = None,
        silent: bool = False,
        store_history: bool = True,
        stop_on_error: bool = True,
        user_expressions: dict | None = None,
    ) -> Result:
        """Execute ``code`` and collect its reply and outputs until idle."""
        start = time.monotonic()
        msg_id = self.kc.execute(
            code,
            silent=silent,
            store_history=store_history,
            allow_stdin=allow_stdin or on_input is not None,
            stop_on_error=stop_on_error,
            user_expressions=user_expressions or {},
        )
        result = Result(reply={})
        deadline = start + timeout
        idle = False
        while not (idle and result.reply):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.dump_state()
                msg = f"no reply/idle within {timeout} s for {code!r}; got {result}"
                raise TimeoutError(msg)
            if on_input is not None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    # not validate_message: its schema wants a number for the
                    # boolean "password" field the protocol specifies
                    assert req["msg_type"] == "input_request"
                    assert req["parent_header"]["msg_id"] == msg_id
                    self.kc.input(on_input(req["content"]))
            try:
                msg = self.kc.get_iopub_msg(timeout=min(0.05, remaining))
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                validate_message(msg, msg["msg_type"], msg_id)
                if msg["msg_type"] == "status":
                    result.statuses.append(msg["content"]["execution_state"])
                    idle = msg["content"]["execution_state"] == "idle"
                elif msg["msg_type"] == "execute_input":
                    result.inputs.append(msg)
                elif msg["msg_type"] in ("display_data", "update_display_data") and (
                    "link" in msg["content"]["metadata"]
                ):  # the quiet line, or the progress line that becomes it
                    display_id = msg["content"].get("transient", {}).get("display_id", "")
                    if display_id.startswith("link-progress-"):
                        result.progress.append(msg)
                    shown = [i for i, n in enumerate(result.notes)
                             if display_id and n["content"].get("transient", {}).get("display_id") == display_id]
                    if msg["msg_type"] == "update_display_data" and shown:
                        result.notes[shown[0]] = {**msg, "msg_type": "display_data"}
                    else:
                        result.notes.append(msg)
                else:
                    result.outputs.append(msg)
                    if on_output is not None:
                        on_output(msg)
            if not result.reply:
                try:
                    reply = self.kc.get_shell_msg(timeout=0)
                except queue.Empty:
                    pass
                else:
                    if reply["parent_header"].get("msg_id") == msg_id:
                        validate_message(reply, "execute_reply", msg_id)
                        result.reply = reply
        result.elapsed = time.monotonic() - start
        return result

    def request(self, method: str, *args: Any, timeout: float = 30.0, **kwargs: Any) -> dict:
        """Send a shell request (kc.complete, kc.history, ...) and return its reply."""
        msg_id = getattr(self.kc, method)(*args, **kwargs)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                validate_message(reply, reply["msg_type"], msg_id)
                return reply

    def drain_iopub(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.kc.get_iopub_msg(timeout=0.05))
            except queue.Empty:
                return out

    def descendants(self) -> list[int]:
        return descendants(self.pid)

    def shutdown(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)
        self.close_log()

    def close_log(self) -> None:
        """Close and remove the router's log, printing it first if it shows an error
        (the print is shown only if the test fails). Idempotent."""
        if self.log is None:
            return
        self.log_file.close()
        text = self.log.read_text(errors="replace")
        if "Traceback" in text or "ERROR" in text:
            print(f"--- the router's stderr ---\n{text[-30_000:]}")
        self.log.unlink(missing_ok=True)
        self.log = None


def take_log(path: Path) -> list[str]:
    """The names a pipeline test's components wrote to their side-effect log, one per
    line, in the order they ran; the log is emptied for the next read."""
    names = path.read_text().split() if path.exists() else []
    path.write_text("")
    return names


def start_client(kernel_name: str, *, cwd: str | None = None, env: dict | None = None) -> LinkClient:
    km = KernelManager(kernel_name=kernel_name)
    kwargs: dict[str, Any] = {}
    if cwd is not None:
        kwargs["cwd"] = cwd
    if env is not None:
        kwargs["env"] = {**os.environ, **env}
    log = None
    if kernel_name == "link":  # the router's stderr, open while the client lives (a restart reuses it)
        log = tempfile.NamedTemporaryFile("a", prefix="link-router-", suffix=".log", delete=False)
        kwargs["stderr"] = log
    try:
        km.start_kernel(**kwargs)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
        except Exception:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise
    except BaseException:
        if log is not None:
            log.close()
            os.unlink(log.name)
        raise
    client = LinkClient(km, kc, log)
    client.drain_iopub()
    return client


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    tree = _children()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
