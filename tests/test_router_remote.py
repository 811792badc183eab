"""What the router adds around a remote cell: the quiet line's time, widgets (comms).

Each test runs against a ``process`` host and an ``ssh`` host on a real sshd.
"""

from __future__ import annotations

import contextlib
import time


def test_the_quiet_line_shows_the_time_the_user_waited(link_remote, remote):
    link_remote.run(f"# link: {remote}\n0")  # the host's first kernel; a standby boots after it
    time.sleep(1.5)
    for _ in range(3):
        result = link_remote.run(f"# link: {remote}\n1 + 1")
        assert result.result == "2"
        (note,) = result.notes
        seconds = note["content"]["metadata"]["link"]["seconds"]
        # the router's span lies inside the client's; 10 ms for the line's rounding
        assert seconds <= result.elapsed + 0.01, (seconds, result.elapsed, result.reply["metadata"])
        assert result.reply["metadata"]["link"]["seconds"] == seconds
        assert note["content"]["data"]["text/plain"] == f"[link] ran on {remote} in {seconds:.2f} s"
        time.sleep(0.3)


SLIDER = (
    "import ipywidgets as w\n"
    "slider = w.IntSlider(value=1)\n"
    "slider.observe(lambda change: print('moved to', change['new']), 'value')\n"
    "slider"
)


def _slider_comm(messages: list[dict]) -> str:
    return next(
        m["content"]["comm_id"]
        for m in messages
        if m["msg_type"] == "comm_open"
        and m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
    )


def _move(client, comm_id: str, value: int) -> str:
    """Send what a frontend sends when the user drags the slider; return its msg_id."""
    msg = client.kc.session.msg(
        "comm_msg",
        {"comm_id": comm_id, "data": {"method": "update", "state": {"value": value}, "buffer_paths": []}},
    )
    client.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


@contextlib.contextmanager
def _released(client, remote):
    """A test's kept kernel ends with it, whatever happens: later cells get fresh ones."""
    try:
        yield
    finally:
        client.run(f"%link release {remote}")


def _iopub_until(client, done, timeout: float = 20.0) -> list[dict]:
    deadline, seen = time.monotonic() + timeout, []
    while not done(seen):
        assert time.monotonic() < deadline, f"not seen in {timeout} s: {seen}"
        seen += client.drain_iopub()
    return seen


def test_a_kept_kernels_widget_stays_live(link_remote, remote):
    with _released(link_remote, remote):
        shown = link_remote.run(f"# link: {remote} keep\n{SLIDER}")
        assert shown.status == "ok", shown.text
        views = [m for m in shown.outputs if m["msg_type"] in ("display_data", "execute_result")]
        assert "application/vnd.jupyter.widget-view+json" in views[0]["content"]["data"]
        comm_id = _slider_comm(shown.outputs)
        assert "no longer connected" not in shown.stderr
        info = link_remote.request("comm_info", target_name="jupyter.widget")["content"]
        assert comm_id in info["comms"]
        moved = _move(link_remote, comm_id, 7)
        # the observer runs in the kept kernel; its print reaches the frontend under the comm_msg
        _iopub_until(
            link_remote,
            lambda seen: any(
                m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == moved
                and "moved to 7" in m["content"]["text"]
                for m in seen
            ),
        )
        assert link_remote.run(f"# link: {remote} keep\nslider.value").result == "7"
        # a cell in the kept kernel moves the slider: the frontend hears of it
        moving = link_remote.run(f"# link: {remote} keep\nslider.value = 3")
        updates = moving.outputs + link_remote.drain_iopub()
        assert any(
            m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id
            and m["content"]["data"].get("state", {}).get("value") == 3
            for m in updates
        ), updates
        link_remote.run(f"%link release {remote}")
        # its kernel is gone now: the frontend's next message gets a comm_close back
        _move(link_remote, comm_id, 9)
        _iopub_until(
            link_remote,
            lambda seen: any(m["msg_type"] == "comm_close" and m["content"]["comm_id"] == comm_id for m in seen),
        )
        assert comm_id not in link_remote.request("comm_info")["content"]["comms"]


def test_a_released_kernels_widget_says_it_is_no_longer_connected(link_remote, remote):
    shown = link_remote.run(f"# link: {remote}\n{SLIDER}")
    assert shown.status == "ok", shown.text
    comm_id = _slider_comm(shown.outputs)
    # one slider (its layout and style are comms too, but not widgets one works)
    assert shown.stderr.count("this cell's widget is no longer connected") == 1, shown.stderr
    assert f"'# link: {remote} keep'" in shown.stderr
    assert comm_id not in link_remote.request("comm_info")["content"]["comms"]
    _move(link_remote, comm_id, 7)
    seen = _iopub_until(
        link_remote,
        lambda seen: any(m["msg_type"] == "comm_close" and m["content"]["comm_id"] == comm_id for m in seen),
    )
    # nothing reached the local kernel: no error there, nothing printed
    assert not [m for m in seen if m["msg_type"] in ("stream", "error")]
    assert link_remote.run("1 + 1").result == "2"


def test_a_progress_bar_of_a_released_kernel_says_nothing(link_remote, remote):
    """A finished progress bar (tqdm.notebook draws one so) needs no kernel: no line."""
    shown = link_remote.run(
        f"# link: {remote}\n"
        "import ipywidgets as w\n"
        "from IPython.display import display\n"
        "display(w.HBox([w.HTML('epoch'), w.IntProgress(value=10, max=10), w.HTML('10/10')]))\n"
        "print('trained')"
    )
    assert shown.status == "ok" and shown.stdout == "trained\n"
    assert any(m["msg_type"] == "comm_open" for m in shown.outputs)
    assert "no longer connected" not in shown.stderr, shown.stderr
    two = link_remote.run(
        f"# link: {remote}\nimport ipywidgets as w\nw.VBox([w.IntSlider(), w.Dropdown(options=[1, 2])])"
    )
    assert "this cell's 2 widgets are no longer connected" in two.stderr, two.stderr


def test_interact_in_a_kept_kernel_redraws_its_output(link_remote, remote):
    with _released(link_remote, remote):
        shown = link_remote.run(
            f"# link: {remote} keep\n"
            "from ipywidgets import interact\n"
            "@interact(n=(0, 10))\n"
            "def square(n=2):\n"
            "    print('square is', n * n)"
        )
        assert shown.status == "ok", shown.text
        comm_id = _slider_comm(shown.outputs)
        moved = _move(link_remote, comm_id, 7)
        seen = _iopub_until(
            link_remote,
            lambda seen: any(
                m["msg_type"] == "stream" and "square is 49" in m["content"]["text"] for m in seen
            ),
        )
        stream = next(m for m in seen if m["msg_type"] == "stream" and "square is 49" in m["content"]["text"])
        # under the frontend's own message: its Output widget (which took that msg_id) shows it
        assert stream["parent_header"]["msg_id"] == moved
        assert any(
            m["msg_type"] == "comm_msg" and m["content"]["data"].get("state", {}).get("msg_id") == moved
            for m in seen
        )
