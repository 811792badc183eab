"""What the router adds around a remote cell: the quiet line's time, widgets (comms).

Each test runs against a ``process`` host and an ``ssh`` host on a real sshd.
"""

from __future__ import annotations

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
