"""Remote components (a ``process`` host and an SSH host): cached like local ones.

A component routed to a host runs there, hidden when it is a parent; what it bound comes
back to the notebook as after any remote cell and goes into the cache, so a child later
restores it without the host. Each component appends its name to a log file (the host is
this machine, so it writes the same file).
"""

from __future__ import annotations

import re

import pytest


@pytest.fixture
def ran(link_remote, tmp_path):
    log = tmp_path / "ran.log"
    assert link_remote.run(f"LOG = {str(log)!r}").status == "ok"

    def read() -> list[str]:
        names = log.read_text().split() if log.exists() else []
        log.write_text("")
        return names

    return read


def lines(result) -> list[str]:
    return [n["content"]["data"]["text/plain"] for n in result.notes if "pipeline" in n["content"]["metadata"]["link"]]


def test_a_remote_parent_is_cached_and_runs_hidden_on_its_host(link_remote, remote, ran):
    load = (
        f"# link: {remote} name=rload\nopen(LOG, 'a').write('rload\\n')\nprint('loading on the host')\n"
        "import numpy as np\ndata = np.arange(1000) * 2\n"
    )
    total = "# link: name=rtotal after=rload\nopen(LOG, 'a').write('rtotal\\n')\nprint(int(data.sum()))\n"
    result = link_remote.run(load)
    assert result.status == "ok", result.reply
    assert result.stdout == "loading on the host\n"
    assert ran() == ["rload"]
    assert link_remote.run("data = None").status == "ok"
    result = link_remote.run(total)
    assert result.status == "ok", result.reply
    assert result.stdout == "999000\n"
    assert ran() == ["rtotal"], "the remote parent came from the cache"
    (line,) = lines(result)
    assert line.startswith("[link] rload: from cache, saved ")
    assert re.search(rf"^rload\s.*", link_remote.run("%link cache").text, re.M)

    assert "cleared the cache of 'rload'" in link_remote.run("%link cache clear rload").text
    result = link_remote.run(total)
    assert result.status == "ok", result.reply
    assert ran() == ["rload", "rtotal"], "cleared: the parent ran again, on its host"
    assert result.stdout == "999000\n", "none of the hidden parent's output"
    (line,) = lines(result)
    assert re.fullmatch(rf"\[link\] rload: ran on {remote} in [0-9.]+ m?s", line), line
    assert link_remote.run("type(np).__name__, int(data[-1])").result == "('module', 1998)"


def test_a_failing_remote_parent_stops_the_child_with_its_host_named(link_remote, remote, ran):
    bad = f"# link: {remote} name=rbad\nopen(LOG, 'a').write('rbad\\n')\n\nraise ValueError('on the host')\n"
    child = "# link: name=rchild after=rbad\nopen(LOG, 'a').write('rchild\\n')\n"
    assert link_remote.run(bad).status == "error"
    assert ran() == ["rbad"]
    result = link_remote.run(child)
    assert result.status == "error"
    assert ran() == ["rbad"], "the parent ran again on its host; the child did not"
    assert result.content["ename"] == "ValueError"
    (error,) = result.of_type("error")
    traceback = [re.sub(r"\x1b\[[0-9;]*m", "", t) for t in error["content"]["traceback"]]
    assert traceback[0] == f"The parent component 'rbad' failed on {remote}; 'rchild' did not run."
    assert any(re.search(r"^-*> 4 raise ValueError", t, re.M) for t in traceback), traceback
