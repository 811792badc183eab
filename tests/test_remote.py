"""Remote cells: a fresh kernel per cell, on the process transport and over a real sshd.

Every lifecycle test runs twice, against a ``process`` host and against an
``ssh`` host that is a real OpenSSH server on 127.0.0.1 (tests/support/sshd.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kernel_client import alive, start_client, wait_gone
from remote_hosts import register

from link_kernel.hosts import HostConfig


def test_outputs_arrive_in_order(link_remote, remote):
    code = (
        f"# link: {remote}\n"
        "import sys\n"
        "print('one')\n"
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>two</b>'))\n"
        "print('three', file=sys.stderr)\n"
        "raise ValueError('four')"
    )
    result = link_remote.run(code)
    assert result.status == "error"
    assert [m["msg_type"] for m in result.outputs] == ["stream", "display_data", "stream", "error"]
    assert result.outputs[0]["content"]["text"] == "one\n"
    assert result.outputs[1]["content"]["data"]["text/html"] == "<b>two</b>"
    assert result.outputs[2]["content"] == {"name": "stderr", "text": "three\n"}
    assert result.error["ename"] == "ValueError" and result.error["evalue"] == "four"
    assert result.statuses == ["busy", "idle"]
    note = result.notes[0]["content"]
    assert note["data"]["text/plain"].startswith(f"[link] ran on {remote} in ")
    assert note["metadata"]["link"]["target"] == remote
    assert [m["content"]["code"] for m in result.inputs] == [code]


def test_a_remote_cell_is_in_the_local_history_under_its_count(link_remote, remote):
    """The local kernel records each remote cell (one light request while it runs)."""
    plain = link_remote.run(f"# link: {remote}\n6 * 7")  # nothing to export: recorded alongside
    link_remote.run("local_value = 41")
    reads = link_remote.run(f"# link: {remote}\nlocal_value + 1")  # recorded with the export
    history = link_remote.request("history", hist_access_type="tail", n=3, raw=True, output=False)
    entries = [(entry[1], entry[2]) for entry in history["content"]["history"]]
    assert reads.result == "42"
    assert entries[0::2] == [
        (plain.content["execution_count"], f"# link: {remote}\n6 * 7"),
        (reads.content["execution_count"], f"# link: {remote}\nlocal_value + 1"),
    ]


def test_execution_count_and_traceback_match_the_cell(link_remote, remote):
    before = link_remote.run("1").content["execution_count"]
    result = link_remote.run(f"# link: {remote}\nx = 1\n1 / 0")
    count = result.content["execution_count"]
    assert count == before + 1 == result.inputs[0]["content"]["execution_count"]
    traceback = "\n".join(result.error["traceback"])
    assert f"In[{count}]" in traceback and "line 3" in traceback
    assert "link_kernel" not in traceback
    assert link_remote.run("2").content["execution_count"] == count + 1


def test_remote_kernel_is_gone_when_the_reply_arrives(link_remote, remote):
    result = link_remote.run(f"# link: {remote}\nimport os, subprocess\n"
                             "child = subprocess.Popen(['sleep', '300'])\n(os.getpid(), child.pid)")
    pid, child = eval(result.result)
    assert pid != link_remote.pid
    assert not alive(pid), "the remote kernel outlived its execute_reply"
    assert not alive(child), "a process the cell started outlived its execute_reply"
    assert result.reply["metadata"]["link"]["target"] == remote


def test_the_reply_is_the_kernels_and_exit_hooks_run_before_it(link_remote, remote, tmp_path):
    """The router takes the reply from the cell's last iopub message (it carries a copy):
    user_expressions and payloads are the kernel's own, and the kernel's atexit hooks
    have run by the time the reply arrives."""
    hook = tmp_path / "hook-ran"
    result = link_remote.run(
        f"# link: {remote}\nimport atexit\n"
        f"atexit.register(lambda: open({str(hook)!r}, 'w').write('done'))\n"
        "get_ipython().set_next_input('next cell')\nanswer = 6 * 7",
        user_expressions={"twice": "answer * 2", "bad": "1 / 0"},
    )
    assert result.status == "ok", result.text
    expressions = result.content["user_expressions"]
    assert expressions["twice"]["status"] == "ok"
    assert expressions["twice"]["data"]["text/plain"] == "84"
    assert expressions["bad"]["status"] == "error" and expressions["bad"]["ename"] == "ZeroDivisionError"
    assert [p["source"] for p in result.content["payload"]] == ["set_next_input"]
    assert hook.read_text() == "done"


def test_a_slow_exit_hook_finishes_before_the_kernel_ends(link_remote, remote, tmp_path):
    """The router's shutdown request reaches the kernel (on its control thread) a few
    ms after the cell, while the exit hooks the wrapper started may still run: it
    waits for them instead of ending the process halfway through one."""
    saved = tmp_path / "model.txt"
    hook = f"lambda: (__import__('time').sleep(1.0), open({str(saved)!r}, 'w').write('saved'))"
    result = link_remote.run(f"# link: {remote}\nimport atexit\natexit.register({hook})\n1")
    assert result.status == "ok", result.text
    assert saved.read_text() == "saved"


def test_exit_hooks_run_early_leave_the_iopub_thread_running(link_remote, remote):
    """A released kernel runs its atexit hooks just after queueing link_result on
    ipykernel's IOPub thread. ipykernel registers that thread's stop as an atexit
    hook: run there, it could stop the thread before the queued message went out,
    and the router waited for it forever (an intermittent hang)."""
    result = link_remote.run(
        f"# link: {remote} keep\nimport sys\n"
        "sys.modules['__link_agent__'].prepare_exit()\n"
        "get_ipython().kernel.iopub_thread.thread.is_alive()"
    )
    assert result.result == "True", result.text
    assert link_remote.run(f"# link: {remote}\nprint('still here')").stdout == "still here\n"


def test_keep_reuses_one_kernel_and_release_ends_it(link_remote, remote):
    first = int(link_remote.run(f"# link: {remote} keep\nimport os\nstate = 41\nos.getpid()").result)
    second = link_remote.run(f"# link: {remote}\nstate += 1\n(os.getpid(), state)")
    assert eval(second.result) == (first, 42)
    assert alive(first)
    status = link_remote.run("%link status").outputs[0]["content"]["data"]["text/plain"]
    assert f"kept kernel pid {first}" in status
    released = link_remote.run(f"%link release {remote}")
    assert released.outputs[0]["content"]["data"]["text/plain"] == f"released: {remote}"
    assert not alive(first)
    third = int(link_remote.run(f"# link: {remote}\nimport os\nos.getpid()").result)
    assert third != first


def test_interrupt_reaches_the_remote_cell(link_remote, remote):
    msg_id = link_remote.kc.execute(f"# link: {remote}\nimport time\nprint('sleeping')\ntime.sleep(60)")
    deadline = time.monotonic() + 30
    while True:  # wait until the remote kernel runs the cell
        msg = link_remote.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
        assert time.monotonic() < deadline
    time.sleep(0.2)
    start = time.monotonic()
    link_remote.km.interrupt_kernel()
    while True:
        reply = link_remote.kc.get_shell_msg(timeout=10)
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    assert time.monotonic() - start < 5
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    link_remote.drain_iopub()


def test_interrupt_while_the_kernel_starts_cancels_the_cell(link_remote, remote):
    link_remote.run(f"marker = 'local'\n%link release {remote}")  # no warm standby
    msg_id = link_remote.kc.execute(f"# link: {remote}\nmarker = 'remote'")
    time.sleep(0.15)
    link_remote.km.interrupt_kernel()
    while True:
        reply = link_remote.kc.get_shell_msg(timeout=30)
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    link_remote.drain_iopub()
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert "before the cell ran" in reply["content"]["evalue"]
    assert link_remote.run("marker").result == "'local'"


@pytest.mark.parametrize("delay", [0.01, 0.03, 0.06, 0.12, 0.25])
def test_an_interrupt_soon_after_the_request_is_never_lost(link_remote, remote, delay):
    """Whether it lands while the cell is prepared, sent, or running, it ends the cell.

    As with plain ipykernel, an interrupt the kernel handles before it has
    begun the cell interrupts nothing, so the test waits for the router's busy.
    """
    link_remote.run(f"# link: {remote}\n1")  # the next cell finds a standby, or boots one
    time.sleep(1.0)
    msg_id = link_remote.kc.execute(f"# link: {remote}\nimport time\ntime.sleep(60)")
    while True:
        msg = link_remote.kc.get_iopub_msg(timeout=10)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status":
            break
    time.sleep(delay)
    link_remote.km.interrupt_kernel()
    while True:
        reply = link_remote.kc.get_shell_msg(timeout=20)  # 60 s if the interrupt were lost
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    link_remote.drain_iopub()
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert link_remote.run(f"# link: {remote}\n6 * 7").result == "42"  # the next cell is fine


def test_input_works_in_a_remote_cell(link_remote, remote):
    result = link_remote.run(
        f"# link: {remote}\nanswer = input('Number? ')\nint(answer) * 2", on_input=lambda r: "21"
    )
    assert result.result == "42"


def test_link_lines_never_reach_the_remote_kernel(link_remote, remote):
    result = link_remote.run(f"# link: {remote}\n%link hosts\nprint('ran')")
    assert result.status == "ok"
    kinds = [m["msg_type"] for m in result.outputs]
    assert kinds == ["display_data", "stream"]
    assert remote in result.outputs[0]["content"]["data"]["text/plain"]


def test_a_sigkilled_router_leaves_no_remote_kernel(remote, tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    try:
        pid = int(client.run(f"# link: {remote} keep\nimport os\nos.getpid()").result)
        local = client.descendants()
        assert alive(pid)
        os.kill(client.pid, signal.SIGKILL)
        client.km.provisioner.process.wait()
        assert wait_gone([pid, *local], timeout=15) == []
    finally:
        client.kc.stop_channels()
        client.km.cleanup_resources()
        client.close_log()


def test_fallback_names_the_target_and_the_reason(link_remote, remote):
    register(HostConfig(alias="down", transport="ssh", hostname="127.0.0.1", port=_closed_port(),
                        python=sys.executable, ssh_config=os.devnull, known_hosts=os.devnull))
    start = time.monotonic()
    result = link_remote.run(f"# link: down|{remote}\nimport os\nos.getpid()")
    assert time.monotonic() - start < 5 + 5  # skipped within 5 s, then a kernel start
    assert result.status == "ok"
    assert result.outputs[0]["msg_type"] == "stream"
    note = result.outputs[0]["content"]["text"]
    assert note.startswith(f"[link] ran on {remote}: down:")
    assert result.reply["metadata"]["link"]["target"] == remote


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_process_host_has_its_own_work_directory(link_remote, remote):
    local_cwd = link_remote.run("import os; os.getcwd()").result
    remote_cwd = link_remote.run(f"# link: {remote}\nimport os; os.getcwd()").result
    assert local_cwd != remote_cwd
    assert Path(eval(remote_cwd)).name.startswith("work-")


def test_a_cell_magic_behind_a_routing_comment_runs_remotely(link_remote, remote):
    code = f"# link: {remote}\n%%capture captured\nprint('hidden')\nfrom_magic = 9"
    result = link_remote.run(code)
    assert result.status == "ok", result.text
    assert [m["content"]["code"] for m in result.inputs] == [code]
    assert link_remote.run("from_magic").result == "9"


def test_an_idle_kept_kernel_is_released(link_remote, remote, tmp_path):
    from link_kernel import hosts

    config = hosts.load_registry()[remote]
    register(HostConfig(**{**config.__dict__, "alias": "idler", "idle_timeout": 1.0, "standby": False,
                           "source": "registry"}))
    pid = int(link_remote.run("# link: idler keep\nimport os\nos.getpid()").result)
    assert alive(pid)
    assert wait_gone([pid], timeout=10) == []
    status = link_remote.run("%link status").outputs[0]["content"]["data"]["text/plain"]
    assert "kept kernel" not in [line for line in status.splitlines() if line.startswith("idler")][0]
