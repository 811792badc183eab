"""Pipeline components through the installed kernelspec: the routing keys name=, after=, cache=.

The kernel does not run pipelines yet (the runner is not wired in): today a component cell
runs as the cell it is, where its target says, and a malformed key is refused before anything
runs. These tests pin that, so the keys never break a notebook that carries them.
"""

from __future__ import annotations

import re

import pytest


def test_a_component_with_only_pipeline_keys_runs_on_the_default_target(link):
    result = link.run("# link: name=load\nimport os\nrows = [1, 2, 3]\nlen(rows)")
    assert result.status == "ok", result.text
    assert result.result == "3"
    assert [m["content"]["code"] for m in result.inputs] == [
        "# link: name=load\nimport os\nrows = [1, 2, 3]\nlen(rows)"
    ]
    child = link.run("# link: local name=report after=load cache=off\nprint(sum(rows))")
    assert child.status == "ok", child.text
    assert child.stdout == "6\n"


def test_a_component_traceback_keeps_the_cells_line_numbers(link):
    result = link.run("# link: name=broken\nx = 1\nraise ValueError('line 3')")
    assert result.status == "error"
    assert result.error["ename"] == "ValueError"
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in result.error["traceback"]]
    assert any(re.search(r"^-*> 3 raise ValueError", line, re.M) for line in plain), plain


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        ("# link: name=1load\n1", "name='1load': give the component a Python name"),
        ("# link: name=a after=b,,c\n1", "bad parent '' in after=b,,c"),
        ("# link: name=a after=a\n1", "cannot be its own parent"),
        ("# link: name=a cache=maybe\n1", "cache='maybe': use cache=on or cache=off"),
        ("# link: after=load\n1", "after= is for pipeline components"),
        ("# link: name=a nmae=b\n1", "did you mean 'name'?"),
    ],
)
def test_malformed_pipeline_keys_get_one_clear_error(link, code, fragment):
    link.run("ran = False")
    result = link.run(code + "\nran = True")
    assert result.status == "error"
    assert result.statuses == ["busy", "idle"]
    assert [m["msg_type"] for m in result.outputs] == ["error"]
    assert result.error["ename"] == "RoutingError"
    assert fragment in result.error["evalue"]
    assert not any("link_kernel" in line for line in result.error["traceback"])
    assert link.run("ran").result == "False"


def test_a_remote_component_runs_on_its_host(link_remote, remote):
    assert link_remote.run("# link: name=load\ndata = list(range(5))").status == "ok"
    result = link_remote.run(
        f"# link: {remote} name=train after=load\ntotal = sum(data)\nprint('trained', total)"
    )
    assert result.status == "ok", result.text
    assert result.stdout == "trained 10\n"
    assert link_remote.run("total").result == "10"
