"""A released remote kernel ends only after its last message has left: nothing is lost at exit.

The kernel runs its exit hooks as soon as the cell's ``link_result`` is queued
(so that its shutdown only has to end the process). Those hooks once included
pyzmq's own, which stops the garbage collector that zero-copy sends (any frame
over 64 KiB) depend on: a ``link_result`` still in ipykernel's IOPub queue then
failed half-sent, and the router saw a message with a bad signature, or none.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.processes import end_process

#: A training-like cell: a lot of printing, many small results (inline in the
#: ``link_result``, which makes it bigger than 64 KiB) and big ones (blobs).
TRAINING = (
    "import numpy as np\n"
    "history = []\n"
    "for epoch in range(300):\n"
    "    history.append(epoch * 0.5)\n"
    "    print(f'epoch {epoch:4d} loss {1 / (epoch + 1):.6f}', flush=epoch % 7 == 0)\n"
    "w0, w1, w2, w3, w4, w5 = (np.full(5000, float(i) + round_) for i in range(6))\n"
    "big = np.full(2**17, round_)\n"
    "done = round_\n"
)


@pytest.fixture
def busy_core():
    """Keep one core busy, as another notebook's work would."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    end_process(proc, 5)


#: Rounds of the training cell. Without the fix (neither pyzmq's hook kept out nor the
#: IOPub queue drained) the first round already fails, on both transports.
ROUNDS = 4


def test_outputs_and_results_arrive_whole_cell_after_cell(link_remote, remote, busy_core):
    for round_ in range(ROUNDS):
        link_remote.run(f"round_ = {round_}")
        result = link_remote.run(f"# link: {remote}\n{TRAINING}", timeout=60)
        assert result.status == "ok", result.text
        assert "Traceback" not in result.stderr and "zmq" not in result.stderr, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 300 and lines[-1] == "epoch  299 loss 0.003333", result.stdout[-500:]
        check = (
            "(done, len(history), sorted({float(w[0]) - i for i, w in enumerate([w0, w1, w2, w3, w4, w5])}),"
            " float(big[-1]))"
        )
        assert eval(link_remote.run(check).result) == (round_, 300, [float(round_)], float(round_))


def test_results_that_arrive_damaged_fail_the_cell(link_remote, remote):
    """A ``link_result`` that does not verify fails the cell; nothing of it is applied."""
    link_remote.run("model_state = 'before'")
    result = link_remote.run(
        f"# link: {remote}\n"
        "model_state = 'after'\n"
        "_kernel = get_ipython().kernel\n"
        "_send = _kernel.session.send\n"
        "def _damaging(stream, msg_type, *args, **kwargs):\n"
        "    if msg_type == 'link_result':\n"
        "        _kernel.session.key = b'not the key'\n"
        "    return _send(stream, msg_type, *args, **kwargs)\n"
        "_kernel.session.send = _damaging\n"
    )
    assert result.status == "error"
    assert result.error["ename"] == "TransferError"
    assert "did not arrive whole" in result.error["evalue"]
    assert link_remote.run("model_state").result == "'before'"
    assert link_remote.run(f"# link: {remote}\n6 * 7").result == "42"
