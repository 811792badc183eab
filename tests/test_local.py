"""The router over its local kernel, through the installed kernelspec and real clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from kernel_client import alive, start_client, wait_gone


def test_cell_outputs_are_relayed_with_one_status_pair(link):
    result = link.run("print('out')\nimport sys; print('err', file=sys.stderr)\n6*7")
    assert result.status == "ok"
    assert result.statuses == ["busy", "idle"]
    # ipykernel may split a print into two stream messages when its flush timer fires
    # between the writes (a loaded machine): count the streams' text, not their messages
    types = [m["msg_type"] for m in result.outputs]
    assert types[-1] == "execute_result" and set(types[:-1]) == {"stream"}
    assert (result.stdout, result.stderr, result.result) == ("out\n", "err\n", "42")


def test_execute_input_echoes_the_cell_exactly(link):
    code = "# link: local\nvalue = 'echo'  \n"
    result = link.run(code)
    assert [m["content"]["code"] for m in result.inputs] == [code]


def test_execution_counts_are_consistent_across_router_cells(link):
    first = link.run("1")
    routed = link.run("%link status")
    failed = link.run("# link: nowhere\n1")
    after = link.run("2")
    counts = [r.content["execution_count"] for r in (first, routed, failed, after)]
    assert counts == list(range(counts[0], counts[0] + 4))
    assert [r.inputs[0]["content"]["execution_count"] for r in (first, routed, failed, after)] == counts
    history = link.request("history", hist_access_type="tail", n=4, raw=True, output=False)
    assert [entry[1] for entry in history["content"]["history"]] == counts
    assert history["content"]["history"][2][2] == "# link: nowhere\n1"


def test_input_round_trips(link):
    asked = []

    def answer(request):
        asked.append(request)
        return "Ada"

    result = link.run("name = input('Name? ')\nprint('hello', name)", on_input=answer)
    assert result.status == "ok"
    assert asked[0]["prompt"] == "Name? " and asked[0]["password"] is False
    assert result.stdout == "hello Ada\n"


def test_getpass_round_trips_as_a_password_prompt(link):
    asked = []

    def answer(request):
        asked.append(request)
        return "s3cret"

    result = link.run("import getpass\nsecret = getpass.getpass('Key: ')\nlen(secret)", on_input=answer)
    assert asked[0]["password"] is True
    assert result.result == "6"


def test_widget_comm_round_trips(link):
    result = link.run("import ipywidgets as w\nslider = w.IntSlider(value=1)\nslider")
    assert result.status == "ok"
    opens = [m for m in link.drain_iopub() + result.outputs if m["msg_type"] == "comm_open"]
    comm_id = next(
        m["content"]["comm_id"]
        for m in opens
        if m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
    )
    # frontend -> kernel: the user drags the slider
    link.kc.session.send(
        link.kc.shell_channel.socket,
        "comm_msg",
        {"comm_id": comm_id, "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []}},
    )
    deadline = time.monotonic() + 10
    while link.run("slider.value").result != "7":
        assert time.monotonic() < deadline, "the kernel never saw the slider move"
        time.sleep(0.05)
    # kernel -> frontend: a cell moves the slider
    moved = link.run("slider.value = 3")
    updates = [
        m for m in moved.outputs + link.drain_iopub()
        if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
    ]
    assert any(m["content"]["data"].get("state", {}).get("value") == 3 for m in updates)


def test_interrupt_ends_a_sleeping_cell_within_two_seconds(link):
    msg_id = link.kc.execute("import time\ntime.sleep(60)")
    time.sleep(0.5)
    start = time.monotonic()
    link.km.interrupt_kernel()
    while True:
        reply = link.kc.get_shell_msg(timeout=5)
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    assert time.monotonic() - start < 2
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    link.drain_iopub()
    assert link.run("1+1").result == "2"


def _normalized_traceback(error: dict) -> list[str]:
    return [re.sub(r"In\[\d+\]", "In[N]", line) for line in error["traceback"]]


def test_traceback_matches_plain_ipykernel():
    code = "def inner(x):\n    return 1 / x\n\ndef outer():\n    return inner(0)\n\nouter()"
    tracebacks = []
    for name in ("python3", "link"):
        client = start_client(name)
        try:
            result = client.run(code)
        finally:
            client.shutdown()
        assert result.status == "error"
        assert len(result.of_type("error")) == 1
        tracebacks.append(_normalized_traceback(result.error))
    assert tracebacks[0] == tracebacks[1]
    assert any("line 7" in line for line in tracebacks[1])


@pytest.mark.parametrize(
    ("code", "ename", "fragment"),
    [
        ("# link: gpux\n1", "UnknownTargetError", "unknown host 'gpux'; known: "),
        ("# link:\n1", "RoutingError", "empty routing comment"),
        ("# link: local colour=red\n1", "RoutingError", "unknown option 'colour'; valid:"),
        ("# link: local timeout=soon\n1", "RoutingError", "timeout='soon'"),
        ("# link: a||b\n1", "RoutingError", "empty target"),
        ("%link frobnicate", "RoutingError", "unknown command '%link frobnicate'"),
        ("%link default", "RoutingError", "usage is '%link default TARGET'"),
    ],
)
def test_malformed_routing_gets_one_clear_error(link, code, ename, fragment):
    link.run("ran = False")
    result = link.run(code + "\nran = True" if not code.startswith("%") else code)
    assert result.status == "error"
    assert result.statuses == ["busy", "idle"]
    assert [m["msg_type"] for m in result.outputs] == ["error"]
    error = result.error
    assert error["ename"] == ename and fragment in error["evalue"]
    assert result.content["ename"] == ename
    assert not any("Traceback" in line or "link_kernel" in line for line in error["traceback"])
    assert link.run("ran").result == "False"


def test_error_aborts_the_queued_cells_like_ipykernel(link):
    first = link.kc.execute("# link: nowhere\n1")
    second = link.kc.execute("queued = 'ran'")
    replies = {}
    while len(replies) < 2:
        reply = link.kc.get_shell_msg(timeout=10)
        replies[reply["parent_header"]["msg_id"]] = reply["content"]["status"]
    assert replies == {first: "error", second: "aborted"}
    link.drain_iopub()
    assert link.run("'queued' in globals()").result == "False"


@pytest.mark.parametrize("failing", ["# link: nowhere\n1", "1 / 0"], ids=["router", "local"])
def test_a_cell_sent_the_moment_an_error_reply_arrives_runs(link, failing):
    """Only cells queued behind a failed one are aborted, never one sent after its reply.

    nbclient and fast frontends send the next cell as soon as the reply comes;
    that cell must run even when the reply arrives a few microseconds before
    the kernel has finished starting the abort.
    """
    link.run("answered = 0")
    statuses = []
    for _ in range(25):
        link.kc.execute(failing)
        while link.kc.get_shell_msg(timeout=10)["content"]["status"] != "error":
            pass
        after = link.kc.execute("answered += 1")
        reply = link.kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == after
        statuses.append(reply["content"]["status"])
    link.drain_iopub()
    assert statuses == ["ok"] * 25
    assert link.run("answered").result == "25"


@pytest.mark.parametrize("prefix", ["", "# link: local\n", "%link status\n"], ids=["plain", "routed", "link-line"])
def test_the_local_kernel_is_never_asked_to_abort(link, prefix):
    """The router aborts the cells queued behind a failed one itself. The local
    kernel gets one cell at a time, so an abort of its own could only ever hit the
    next cell, sent after the error reply: it must be asked for none."""
    code = prefix + "get_ipython().kernel.get_parent()['content']['stop_on_error']"
    result = link.run(code)
    assert result.status == "ok", result.text
    assert result.result == "False"


def test_link_default_and_status(link):
    status = link.run("%link status")
    text = status.outputs[0]["content"]["data"]["text/plain"]
    assert re.search(r"^local\s+running\s+pid \d+", text, re.M)
    assert link.run("%link default local").stdout == "" and link.run("1").result == "1"
    bad = link.run("%link default nowhere")
    assert bad.error["evalue"].startswith("unknown host 'nowhere'; known: ")
    assert bad.error["evalue"].endswith(", local")


def test_link_lines_run_with_the_rest_of_the_cell(link):
    result = link.run("%link status\nx_after_status = 5\nx_after_status * 2")
    assert [m["msg_type"] for m in result.outputs] == ["display_data", "execute_result"]
    assert result.result == "10"
    assert len(result.inputs) == 1


def _local_pid(client) -> int:
    status = client.run("%link status").outputs[0]["content"]["data"]["text/plain"]
    return int(re.search(r"^local\s+running\s+pid (\d+)", status, re.M).group(1))


def test_local_kernel_death_is_reported_and_the_next_cell_works(fresh_link):
    old = _local_pid(fresh_link)
    result = fresh_link.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.status == "error"
    assert result.error["ename"] == "KernelDiedError"
    assert "signal 9" in result.error["evalue"]
    assert fresh_link.run("'alive again'").result == "'alive again'"
    assert not alive(old)
    assert _local_pid(fresh_link) != old


def test_shutdown_leaves_no_child_process():
    client = start_client("link")
    client.run("import subprocess\nchild = subprocess.Popen(['sleep', '300'])")
    pids = client.descendants()
    assert len(pids) >= 2  # the local kernel and its sleep
    router = client.pid
    client.shutdown()
    assert wait_gone([router, *pids], timeout=5) == []


def test_restart_ends_the_old_local_kernel(fresh_link):
    fresh_link.run("x = 1")
    old = fresh_link.descendants()
    fresh_link.km.restart_kernel(now=False)
    fresh_link.kc.wait_for_ready(timeout=60)
    assert wait_gone(old, timeout=5) == []
    assert fresh_link.run("'x' in globals()").result == "False"


def test_kernel_info_names_python(link):
    reply = link.request("kernel_info")
    info = reply["content"]["language_info"]
    assert info["name"] == "python" and info["pygments_lexer"] == "ipython3"
    assert info["version"] == sys.version.split()[0]
    assert reply["content"]["implementation"] == "link_kernel"


def test_install_cli_registers_the_kernelspec(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "link_kernel.cli", "install", "--prefix", str(tmp_path),
         "--name", "link-test", "--display-name", "Link test"],
        check=True, capture_output=True, text=True,
    ).stdout
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "link-test"
    assert str(spec_dir) in out
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "Link test"
    assert spec["argv"][1:3] == ["-m", "link_kernel"]
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        check=True, capture_output=True, text=True,
        env={**__import__("os").environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
    ).stdout
    assert "link-test" in json.loads(listed)["kernelspecs"]


def test_a_cell_magic_behind_a_routing_comment_runs(link):
    code = "# link: local\n%%capture captured\nprint('hidden')\nvalue_from_magic = 7"
    result = link.run(code)
    assert result.status == "ok", result.text
    assert [m["content"]["code"] for m in result.inputs] == [code]
    assert link.run("(value_from_magic, captured.stdout)").result == "(7, 'hidden\\n')"


def test_sigusr1_dumps_the_routers_threads_and_tasks(tmp_path):
    """A cell that never ends can be located: SIGUSR1 writes the router's thread and asyncio
    task stacks to its stderr, and the kernel carries on."""
    from jupyter_client import KernelManager

    log = tmp_path / "router.log"
    km = KernelManager(kernel_name="link")
    with log.open("w") as err:
        km.start_kernel(stderr=err)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        os.kill(km.provisioner.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "[link] end of dump" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "[link] threads:" in text and "Current thread" in text
        assert "[link] asyncio tasks:" in text and "[link] end of dump" in text
        assert re.search(r"local\.py:\d+ in _watch_process\n.*tasks\.py:\d+ in sleep", text)  # the await chain
        reply = kc.execute_interactive("1 + 1", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_each_new_iopub_subscription_gets_its_welcome_first(link):
    """A client that subscribes while the kernel is publishing (another client's
    cells) gets ``iopub_welcome`` before any other message. zmq tells the kernel of
    a topic's first subscriber only, so each subscriber here takes a topic of its
    own: a prefix, one character longer each time, of the topic of Link's statuses."""
    import threading

    import zmq
    from jupyter_client.session import Session

    stop = threading.Event()

    def publish():
        while not stop.is_set():
            link.run("1")

    session = Session(key=link.km.session.key, signature_scheme=link.km.session.signature_scheme)
    info = link.km.get_connection_info()
    url = f"{info['transport']}://{info['ip']}:{info['iopub_port']}"
    context = zmq.Context.instance()

    def messages(topic: bytes, count: int):
        """The first ``count`` (topic, msg_type) a new subscriber to ``topic`` gets."""
        sub = context.socket(zmq.SUB)
        got = []
        try:
            sub.subscribe(topic)
            sub.connect(url)
            while len(got) < count:
                assert sub.poll(10_000), f"no iopub message in 10 s for topic {topic!r}"
                idents, frames = session.feed_identities(sub.recv_multipart())
                got.append((idents[0], session.deserialize(frames)["header"]["msg_type"]))
            return got
        finally:
            sub.close(linger=0)

    busy = threading.Thread(target=publish)
    busy.start()
    try:
        seen = messages(b"kernel.", 12)
        status = next(topic for topic, kind in seen if kind == "status")
        firsts = [seen[0]]
        firsts += [messages(status[:n], 1)[0] for n in range(len(b"kernel.") + 1, len(status) + 1)]
    finally:
        stop.set()
        busy.join()
    kinds = [kind for _, kind in firsts]
    assert len(kinds) > 30 and kinds == ["iopub_welcome"] * len(kinds), kinds
