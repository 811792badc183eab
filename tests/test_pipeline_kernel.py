"""Pipelines through the installed Link kernelspec and a real jupyter_client client.

Each component appends its name to a log file: that side effect proves which components
ran (a component restored from the cache writes nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kernel_client import start_client, take_log


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def cell(route: str, name: str, body: str) -> str:
    return f"# link: {route}\nopen(LOG, 'a').write('{name}\\n')\n{body}"


@pytest.fixture
def nb(tmp_path):
    """A Link kernel in a folder of its own, with LOG set, and a way to read the log."""
    client = start_client("link", cwd=str(tmp_path))
    log = tmp_path / "ran.log"
    assert client.run(f"LOG = {str(log)!r}").status == "ok"

    client.ran = lambda: take_log(log)
    yield client
    client.shutdown()


def lines(result) -> list[str]:
    return [n["content"]["data"]["text/plain"] for n in result.notes if "pipeline" in n["content"]["metadata"]["link"]]


def test_a_child_runs_its_parents_hidden_then_restores_them_from_the_cache(nb):
    load = cell("name=load", "load", "print('loading')\nrows = list(range(10))\n")
    clean = cell("name=clean after=load", "clean", "print('cleaning')\nrows = [r for r in rows if r % 2 == 0]\n")
    report = cell("name=report after=clean", "report", "print(sum(rows))\n")
    # the kernel learns the components from the cells it runs
    assert nb.run(load).status == "ok"
    assert nb.run(clean).status == "ok"
    assert nb.ran() == ["load", "clean"]
    assert nb.run("rows = None").status == "ok"
    result = nb.run(report)
    assert result.status == "ok", result.reply
    assert result.stdout == "20\n", "only the child's output is shown"
    assert nb.ran() == ["report"], "both parents came from the cache"
    assert [re.sub(r"saved .*", "saved", x) for x in lines(result)] == [
        "[link] load: from cache, saved",
        "[link] clean: from cache, saved",
    ]
    # a parent's code changes: it and its children run again, hidden
    clean2 = clean.replace("r % 2 == 0", "r % 3 == 0")
    assert nb.run(clean2).stdout == "cleaning\n"
    assert nb.ran() == ["clean"]
    result = nb.run(report)
    assert result.stdout == "18\n"
    assert nb.ran() == ["report"]


def test_stale_parents_run_hidden_in_order_with_one_line_each(nb):
    cells = [
        cell("name=a", "a", "print('A')\nx = 1\n"),
        cell("name=b after=a", "b", "print('B')\nx = x + 1\n"),
        cell("name=c after=b", "c", "print('C', x)\n"),
    ]
    for source in cells:
        assert nb.run(source).status == "ok"
    assert nb.ran() == ["a", "b", "c"]
    assert nb.run("%link cache clear").status == "ok"
    result = nb.run(cells[2])
    assert result.stdout == "C 2\n"
    assert nb.ran() == ["a", "b", "c"]
    assert [re.sub(r" in .*", "", x) for x in lines(result)] == ["[link] a: ran on local", "[link] b: ran on local"]


def test_a_failing_parent_stops_the_child_and_is_named_with_its_line_numbers(nb):
    assert nb.run(cell("name=load", "load", "x = 1\n\nraise KeyError('missing column')\n")).status == "error"
    assert nb.ran() == ["load"]
    result = nb.run(cell("name=use after=load", "use", "print('used', x)\n"))
    assert result.status == "error"
    assert nb.ran() == ["load"], "the parent ran again (it has no cache), the child did not"
    assert result.content["ename"] == "KeyError"
    errors = result.of_type("error")
    assert len(errors) == 1
    traceback = [plain(line) for line in errors[0]["content"]["traceback"]]
    assert traceback[0] == "The parent component 'load' failed on local; 'use' did not run."
    assert any(re.search(r"^-*> 5 raise KeyError", line, re.M) for line in traceback), traceback
    assert "link_kernel" not in "".join(traceback)
    assert result.stdout == ""
    assert nb.run("1 + 1").result == "2", "the kernel goes on"


@pytest.mark.parametrize(
    ("cells", "ename", "says"),
    [
        (["# link: name=a after=nope\nprint(1)\n"], "UnknownComponentError", "unknown parent 'nope'"),
        (
            ["# link: name=a\nx = 1\n", "# link: name=b after=a\nprint('b')\n", "# link: name=a after=b\nprint('a')\n"],
            "PipelineCycleError",
            "a -> b -> a",
        ),
    ],
)
def test_unknown_parents_and_cycles_are_one_clear_error_and_nothing_runs(nb, cells, ename, says):
    for source in cells[:-1]:
        assert nb.run(source).status == "ok"
    result = nb.run(cells[-1])
    assert result.status == "error"
    assert result.content["ename"] == ename
    assert says in result.content["evalue"]
    assert len(result.of_type("error")) == 1
    assert result.stdout == ""
    assert result.statuses == ["busy", "idle"]


def test_two_cells_with_one_name_are_one_error(nb):
    def run_cell(source: str, cell_id: str):
        msg_id = nb.kc.execute(source)
        return msg_id

    # JupyterLab sends the cell's id in the request's metadata
    first = nb.kc.session.msg("execute_request", {"code": "# link: name=a\nx = 1\n", "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": "one"})
    second = nb.kc.session.msg("execute_request", {"code": "# link: name=a\nx = 2\n", "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": "two"})
    replies = []
    for msg in (first, second):
        nb.kc.shell_channel.send(msg)
        while True:
            reply = nb.kc.get_shell_msg(timeout=30)
            if reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]:
                replies.append(reply["content"])
                break
    assert replies[0]["status"] == "ok"
    assert replies[1]["status"] == "error"
    assert replies[1]["ename"] == "DuplicateComponentError"
    assert "cell one and cell two" in replies[1]["evalue"]
    assert nb.run("x").result == "1", "nothing ran"


def test_cache_off_always_runs_and_cache_clear_recomputes(nb):
    load = cell("name=load cache=off", "load", "x = 1\n")
    child = cell("name=child after=load", "child", "print(x)\n")
    grand = cell("name=grand after=child", "grand", "print('g')\n")
    for source in (load, child, grand):
        assert nb.run(source).status == "ok"
    nb.ran()
    result = nb.run(grand)
    assert result.status == "ok"
    assert nb.ran() == ["load", "grand"], "cache=off runs every time; child comes from the cache"
    assert [re.sub(r" (in|saved) .*", "", x) for x in lines(result)] == ["[link] load: ran on local", "[link] child: from cache,"]
    listing = nb.run("%link cache").text
    assert re.search(r"^child\s", listing, re.M) and re.search(r"^grand\s", listing, re.M)
    assert not re.search(r"^load\s", listing, re.M), listing
    assert "cleared the cache of 'child': 1 entry" in nb.run("%link cache clear child").text
    assert nb.run(grand).status == "ok"
    assert nb.ran() == ["load", "child", "grand"], "cleared: the child is computed again"


def test_the_cache_survives_a_kernel_restart(tmp_path):
    """After a restart the kernel knows the components from the saved notebook
    (JPY_SESSION_NAME) and restores the parents from the cache on disk."""
    import nbformat

    log = tmp_path / "ran.log"
    sources = [
        cell("name=a", "a", "x = 40\n"),
        cell("name=b after=a", "b", "y = x + 2\n"),
        cell("name=c after=b", "c", "print('y is', y)\n"),
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    path = tmp_path / "restart.ipynb"
    nbformat.write(notebook, path)
    client = start_client("link", cwd=str(tmp_path), env={"JPY_SESSION_NAME": str(path), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        assert client.run(f"LOG = {str(log)!r}").status == "ok"
        assert client.run(sources[2]).stdout == "y is 42\n"
        assert log.read_text().split() == ["a", "b", "c"]
        listing = client.run("%link cache").text
        assert re.search(r"^component\s+size\s+age\s+hits$", listing, re.M), listing
        assert re.search(r"^a\s+[0-9.]+ \S?B\s+.+\s0$", listing, re.M), listing
        client.km.restart_kernel(now=False)
        client.kc.wait_for_ready(timeout=60)
        client.drain_iopub()
        log.write_text("")
        assert client.run("'x' in dir()").result == "False", "a fresh namespace"
        assert client.run(f"LOG = {str(log)!r}").status == "ok"
        result = client.run(sources[2])
        assert result.stdout == "y is 42\n"
        assert log.read_text().split() == ["c"], "a and b came from the cache"
        assert len(lines(result)) == 2 and all("from cache, saved" in x for x in lines(result))
        assert re.search(r"^a\s+[0-9.]+ \S?B\s+.+\s1$", client.run("%link cache").text, re.M)
    finally:
        client.shutdown()


def test_vscode_names_the_notebook_in_the_namespace(nb, tmp_path):
    """VS Code sets __vsc_ipynb_file__: the kernel learns the saved components from it."""
    import nbformat

    sources = [cell("name=va", "va", "v = 2\n"), cell("name=vb after=va", "vb", "print(v * 21)\n")]
    path = tmp_path / "vscode.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path)
    assert nb.run(sources[1]).content["ename"] == "UnknownComponentError", "no notebook named yet"
    assert nb.run(f"__vsc_ipynb_file__ = {str(path)!r}").status == "ok"
    result = nb.run(sources[1])
    assert result.stdout == "42\n"
    assert nb.ran() == ["va", "vb"], "the parent ran hidden, learned from the saved notebook"
