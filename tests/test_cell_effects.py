"""What a remote cell did comes back as plain Python would leave it.

A cell that raises (or is interrupted) keeps what it did before the raise; an
input changed in place is changed in place locally, so its aliases and views
see the change; names bound to one object stay bound to one object, on the
host and back. On process and ssh hosts.
"""

from __future__ import annotations

import time

import pytest
from test_variables import digest


def test_a_cell_that_raises_keeps_what_it_bound(link_remote, remote):
    link_remote.run("import threading\nstale = 'old'")
    result = link_remote.run(
        f"# link: {remote}\nmade = [1, 2]\nstale = 'new'\nlock = threading.Lock()\n"
        "raise ValueError('late')\nnever = 1"
    )
    count = result.content["execution_count"]
    assert result.status == "error"
    assert result.error["ename"] == "ValueError" and result.error["evalue"] == "late"
    traceback = "\n".join(result.error["traceback"])
    assert f"In[{count}]" in traceback and "line 5" in traceback and "link_kernel" not in traceback
    # the traceback first, then the bring-back (its note on what could not come back)
    assert [m["msg_type"] for m in result.outputs] == ["error", "stream"]
    assert "lock (_thread.lock)" in result.stderr
    back = link_remote.run("(made, stale, 'never' in globals(), 'lock' in globals())")
    assert back.result == "([1, 2], 'new', False, False)"


def test_a_failed_import_and_style_keep_the_module(link_remote, remote):
    result = link_remote.run(
        f"# link: {remote}\nimport matplotlib\nmatplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\nplt.style.use('no-such-style-name')"
    )
    assert result.status == "error"
    assert link_remote.run("(plt.__name__, matplotlib.__name__)").result == "('matplotlib.pyplot', 'matplotlib')"


def test_a_cell_that_raises_after_changing_an_input_in_place(link_remote, remote):
    link_remote.run("import numpy as np\nseen = [1]\nweights = np.zeros(3)\nalias = seen")
    result = link_remote.run(f"# link: {remote}\nseen.append(2)\nweights += 1\n1 / 0")
    assert result.error["ename"] == "ZeroDivisionError"
    assert link_remote.run("(seen, alias is seen, weights.tolist())").result == "([1, 2], True, [1.0, 1.0, 1.0])"


def test_an_interrupted_cell_keeps_what_it_did(link_remote, remote):
    msg_id = link_remote.kc.execute(
        f"# link: {remote}\nimport time\nsteps = []\nfor i in range(3):\n    steps.append(i)\n"
        "print('ready', flush=True)\ntime.sleep(60)\nsteps.append('never')"
    )
    deadline = time.monotonic() + 30
    while True:  # wait until the remote kernel runs the cell
        msg = link_remote.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
        assert time.monotonic() < deadline
    time.sleep(0.2)
    link_remote.km.interrupt_kernel()
    while True:
        reply = link_remote.kc.get_shell_msg(timeout=20)
        if reply["parent_header"]["msg_id"] == msg_id:
            break
    link_remote.drain_iopub()
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert link_remote.run("steps").result == "[0, 1, 2]"
