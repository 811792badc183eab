"""The Link kernel refuses a cell that still holds a merge's conflict markers.

Through the installed kernelspec and a real jupyter_client client: the refused cell gets
its execute_reply (status error), an iopub error whose ename is the typed Link error with
a hint, and idle; none of its lines ran.
"""

from __future__ import annotations

from kernel_client import start_client

from link_kernel import routing
from link_kernel.notebook_git.merge import merge_notebooks

CONFLICTED = """# link: name=train after=load
<<<<<<< ours
x = 1
print('ours ran')
||||||| base
x = 0
=======
x = 2
print('theirs ran')
>>>>>>> theirs
"""


def test_a_cell_with_conflict_markers_is_refused_with_a_typed_error_and_a_hint(tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    try:
        result = client.run(CONFLICTED)
        assert result.status == "error"
        assert result.reply["content"]["ename"] == "ConflictMarkerError"
        assert result.error["ename"] == "ConflictMarkerError"
        assert "line 2" in result.error["evalue"]
        assert any("Hint" in line for line in result.error["traceback"])
        assert result.statuses[-1] == "idle"
        assert "ran" not in result.stdout
        # nothing of the cell ran, and the kernel goes on
        after = client.run("print('x' in dir())")
        assert after.status == "ok"
        assert after.stdout == "False\n"
    finally:
        client.shutdown()


def merged_cell() -> str:
    """The cell a real merge leaves when both sides changed one line of it."""

    def notebook(body: str) -> dict:
        cell = {"cell_type": "code", "id": "t", "metadata": {}, "outputs": [], "execution_count": None,
                "source": f"# link: name=train\n{body}"}
        return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [cell]}

    result = merge_notebooks(notebook("x = 0\n"), notebook("x = 1\n"), notebook("x = 2\n"))
    assert result.conflicts
    return result.notebook["cells"][0]["source"]


def test_the_cell_a_conflicted_merge_leaves_is_refused(tmp_path):
    client = start_client("link", cwd=str(tmp_path))
    try:
        result = client.run(merged_cell())
        assert result.status == "error"
        assert result.error["ename"] == "ConflictMarkerError"
        assert result.statuses[-1] == "idle"
    finally:
        client.shutdown()


def test_markers_count_only_when_all_three_start_lines():
    assert routing.conflict_line(CONFLICTED) == 2
    underline = "Title\n=======\n"
    assert routing.conflict_line(underline) is None
    quoted = "s = '<<<<<<< a'\n=======\n>>>>>>> b\n"
    assert routing.conflict_line(quoted) is None
    assert routing.conflict_line("a\n<<<<<<< x\n=======\n>>>>>>> y") == 2
