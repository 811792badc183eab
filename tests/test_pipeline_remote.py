"""Remote components (a ``process`` host and an SSH host): cached like local ones.

A component routed to a host runs there, hidden when it is a parent; what it bound comes
back to the notebook as after any remote cell and goes into the cache, so a child later
restores it without the host. Each component appends its name to a log file (the host is
this machine, so it writes the same file).
"""

from __future__ import annotations

import os
import re

import pytest
from kernel_client import take_log


@pytest.fixture
def ran(link_remote, tmp_path):
    log = tmp_path / "ran.log"
    assert link_remote.run(f"LOG = {str(log)!r}").status == "ok"

    return lambda: take_log(log)


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



#: A parent output of 8 MiB of random bytes.
BIG = 8 * 2**20


def sent(result) -> int:
    """The bytes the router sent to the host for this cell (its reply's metadata)."""
    return result.reply["metadata"]["link"]["sent"]


def moved(result) -> str:
    """The quiet line under a remote cell: "ran on HOST in N s[, SIZE moved]"."""
    (note,) = [n for n in result.notes if "target" in n["content"]["metadata"]["link"]]
    return note["content"]["data"]["text/plain"]


def test_a_remote_parents_outputs_are_not_sent_again_to_its_host(link_remote, remote, ran, tmp_path):
    """A child on the parent's host reads the parent's big output from the host's blob
    store, whether the notebook holds it, the cache restored it (after a restart too),
    or the parent just ran hidden there: only a few bytes go to the host."""
    import nbformat
    import numpy as np

    seed = int.from_bytes(os.urandom(4), "big")  # a value no store has yet
    big = (
        f"# link: {remote} name=rbig\nopen(LOG, 'a').write('rbig\\n')\n"
        f"import numpy as np\nblob = np.random.default_rng({seed}).bytes({BIG})\n"
    )
    child = (
        f"# link: {remote} name=ruse after=rbig\nopen(LOG, 'a').write('ruse\\n')\n"
        "print(len(blob), blob[:4].hex())\n"
    )
    expected = f"{BIG} {np.random.default_rng(seed).bytes(4).hex()}\n"

    def check(result, what: str) -> None:
        assert result.status == "ok", result.reply
        assert sent(result) < BIG // 1000, f"{what}: {sent(result)} bytes sent for a {BIG}-byte output"
        assert not re.search(r"[KMG]iB moved", moved(result)), f"{what}: {moved(result)}"

    result = link_remote.run(big)
    assert result.status == "ok", result.reply
    assert ran() == ["rbig"]
    assert result.reply["metadata"]["link"]["received"] >= BIG, "the output came back once"

    # the notebook holds the parent's value, restored again from the cache
    result = link_remote.run(child)
    check(result, "after the parent ran")
    assert result.stdout == expected
    assert ran() == ["ruse"], "the parent came from the cache"

    # the notebook's value is gone: the cache restores it, the host keeps its copy
    assert link_remote.run("blob = None").status == "ok"
    result = link_remote.run(child)
    check(result, "restored from the cache")
    assert result.stdout == expected
    assert ran() == ["ruse"]
    (line,) = lines(result)
    assert line.startswith("[link] rbig: from cache, saved ")
    check(link_remote.run(f"# link: {remote}\nlen(blob)"), "a plain remote cell after the restore")

    # the cache cleared: the parent runs hidden on the host, the child reads the host's copy
    assert "cleared the cache of 'rbig'" in link_remote.run("%link cache clear rbig").text
    result = link_remote.run(child)
    check(result, "the parent ran hidden")
    assert result.stdout == expected
    assert ran() == ["rbig", "ruse"]

    # a new kernel (it learns the components from the saved notebook): restored from
    # the cache on disk, still not sent
    path = tmp_path / "remote.ipynb"
    cells = [nbformat.v4.new_code_cell(s) for s in (big, child)]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    link_remote.km.restart_kernel(now=False)
    link_remote.kc.wait_for_ready(timeout=60)
    link_remote.drain_iopub()
    assert link_remote.run("'blob' in dir()").result == "False", "a fresh namespace"
    assert link_remote.run(f"LOG = {str(tmp_path / 'ran.log')!r}").status == "ok"
    assert link_remote.run(f"__vsc_ipynb_file__ = {str(path)!r}").status == "ok"
    result = link_remote.run(child)
    check(result, "restored after a restart")
    assert result.stdout == expected
    assert ran() == ["ruse"], "after the restart the parent came from the cache"
