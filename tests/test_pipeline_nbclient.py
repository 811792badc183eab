"""A branching pipeline notebook run through nbclient and the installed Link kernelspec.

Six components: load -> clean -> left | right, each branch binding ``model``, and a report
under each branch. Every component appends its name to ``ran.log`` (its side effect), so
the log says exactly which components ran; a component restored from the cache writes
nothing. The kernel reads the saved notebook (``JPY_SESSION_NAME``, as jupyter_server sets
it), so an edit saved to the file is what the kernel knows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from kernel_client import take_log


def component(route: str, name: str, body: str) -> str:
    return f"# link: {route}\nopen(LOG, 'a').write('{name}\\n')\n{body}"


CELLS = [
    "LOG = 'ran.log'",
    component("name=load", "load", "print('loading')\nrows = list(range(10))"),
    component("name=clean after=load", "clean", "print('cleaning')\nrows = [r * 2 for r in rows]"),
    component("name=left after=clean", "left", "print('left model')\nmodel = ('left', sum(rows))"),
    component("name=right after=clean", "right", "print('right model')\nmodel = ('right', max(rows))"),
    component("name=left_report after=left", "left_report", "print('report', model)"),
    component("name=right_report after=right", "right_report", "print('report', model)"),
]
INDEX = {name: i for i, name in enumerate(["setup", "load", "clean", "left", "right", "left_report", "right_report"])}


class Notebook:
    """The notebook on disk, an nbclient client on it, and its side-effect log."""

    def __init__(self, folder: Path, cells: list[str] = CELLS) -> None:
        self.folder = folder
        self.path = folder / "pipeline.ipynb"
        self.nb = nbformat.v4.new_notebook()
        self.nb.metadata["kernelspec"] = {"name": "link", "display_name": "Link", "language": "python"}
        self.nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
        self.save()

    def save(self) -> None:
        nbformat.write(self.nb, self.path)

    def client(self) -> NotebookClient:
        return NotebookClient(
            self.nb, kernel_name="link", timeout=120, resources={"metadata": {"path": str(self.folder)}}
        )

    def kernel(self, client: NotebookClient):
        # the cache lives under XDG_CACHE_HOME: each notebook gets its own, kept across kernels
        env = {**os.environ, "JPY_SESSION_NAME": str(self.path), "XDG_CACHE_HOME": str(self.folder / "cache")}
        return client.setup_kernel(env=env, cwd=str(self.folder))

    def run(self, client: NotebookClient, name: str):
        index = INDEX[name]
        return client.execute_cell(self.nb.cells[index], index)

    def command(self, client: NotebookClient, code: str):
        """Run a cell that is not in the saved notebook (a scratch cell)."""
        self.nb.cells.append(nbformat.v4.new_code_cell(code))
        try:
            return client.execute_cell(self.nb.cells[-1], len(self.nb.cells) - 1)
        finally:
            self.nb.cells.pop()

    def ran(self) -> list[str]:
        return take_log(self.folder / "ran.log")


def shown(cell) -> tuple[str, list[str]]:
    """(the cell's own output text, the router's pipeline lines) of an executed cell."""
    text, lines = "", []
    for output in cell.outputs:
        if output.output_type == "stream":
            text += output.text
        elif output.output_type == "display_data" and "pipeline" in output.metadata.get("link", {}):
            lines.append(output.data["text/plain"])
        elif output.output_type in ("display_data", "execute_result"):
            text += output.data.get("text/plain", "")
    return text, lines


def test_a_leaf_runs_exactly_its_stale_ancestors_in_order_and_shows_only_its_output(tmp_path):
    notebook = Notebook(tmp_path)
    client = notebook.client()
    with notebook.kernel(client):
        for index, cell in enumerate(notebook.nb.cells):
            client.execute_cell(cell, index)
        # every component ran once; each child restored its ancestors from the cache
        assert notebook.ran() == ["load", "clean", "left", "right", "left_report", "right_report"]
        assert _lines_match(
            notebook.nb.cells[INDEX["left_report"]], "report ('left', 90)\n", ["load", "clean", "left"], "cache"
        ), notebook.nb.cells[INDEX["left_report"]].outputs
        # two branches bind 'model': each report sees its own branch's value
        assert shown(notebook.nb.cells[INDEX["right_report"]])[0] == "report ('right', 18)\n"
        run = notebook.run(client, "left_report")
        assert shown(run)[0] == "report ('left', 90)\n"
        assert notebook.ran() == ["left_report"]

        # a parent's code changes, saved: running a leaf runs exactly its stale ancestors
        clean = notebook.nb.cells[INDEX["clean"]]
        clean.source = clean.source.replace("r * 2", "r * 3")
        notebook.save()
        run = notebook.run(client, "left_report")
        assert notebook.ran() == ["clean", "left", "left_report"], "load came from the cache"
        text, lines = shown(run)
        assert text == "report ('left', 135)\n", "only the leaf's output, none of its parents'"
        assert [re.sub(r" (in|saved) [0-9.]+ m?s$", "", line) for line in lines] == [
            "[link] load: from cache,",
            "[link] clean: ran on local",
            "[link] left: ran on local",
        ]
        # the other branch: clean is cached now, right is stale
        run = notebook.run(client, "right_report")
        assert notebook.ran() == ["right", "right_report"]
        assert shown(run)[0] == "report ('right', 27)\n"

        # %link pipeline: the picture and the list with states
        clean.source = clean.source.replace("r * 3", "r * 4")
        notebook.save()
        picture = notebook.command(client, "%link pipeline")
        (display,) = [o for o in picture.outputs if o.output_type == "display_data"]
        assert display.data["text/markdown"].startswith("```mermaid\nflowchart TD\n")
        states = dict(re.findall(r"^(\w+)\s+(fresh|stale|cached|failed|never run)\s", display.data["text/plain"], re.M))
        assert states == {
            "load": "fresh",
            "clean": "stale",
            "left": "stale",
            "right": "stale",
            "left_report": "stale",
            "right_report": "stale",
        }, display.data["text/plain"]
        assert notebook.ran() == [], "%link pipeline runs nothing"
        # %link run NAME brings one component up to date (hidden); %link run all of them
        run = notebook.command(client, "%link run right")
        assert notebook.ran() == ["clean", "right"]
        assert "'right' is up to date" in shown(run)[0]
        notebook.command(client, "%link run")
        assert notebook.ran() == ["left", "left_report", "right_report"]

    # a new kernel (the cache is on disk): the leaf restores its parents, none run again
    client = notebook.client()
    with notebook.kernel(client):
        client.execute_cell(notebook.nb.cells[0], 0)
        run = notebook.run(client, "right_report")
        assert notebook.ran() == ["right_report"], "load, clean and right came from the cache"
        assert shown(run)[0] == "report ('right', 36)\n"
        assert _lines_match(run, "report ('right', 36)\n", ["load", "clean", "right"], "cache"), run.outputs


def _lines_match(cell, text: str, names: list[str], how: str) -> bool:
    got_text, lines = shown(cell)
    return got_text == text and [line.split(":")[0] for line in lines] == [f"[link] {n}" for n in names] and all(
        f"from {how}" in line for line in lines
    )


def failing_leaf(tmp_path, cells) -> tuple[list[str], str, list]:
    """Run ``left_report`` in a fresh kernel where it must fail: (what ran, the error
    nbclient raised without colours, the error outputs of the leaf's cell)."""
    notebook = Notebook(tmp_path, cells)
    client = notebook.client()
    with notebook.kernel(client):
        client.execute_cell(notebook.nb.cells[0], 0)
        with pytest.raises(CellExecutionError) as caught:
            notebook.run(client, "left_report")
        errors = [o for o in notebook.nb.cells[INDEX["left_report"]].outputs if o.output_type == "error"]
        return notebook.ran(), re.sub(r"\x1b\[[0-9;]*m", "", str(caught.value)), errors


def test_a_failing_parent_stops_the_leaf_with_the_parent_named(tmp_path):
    cells = list(CELLS)
    cells[INDEX["clean"]] = component("name=clean after=load", "clean", "rows = [r / 0 for r in rows]")
    ran, error, _ = failing_leaf(tmp_path, cells)
    assert ran == ["load", "clean"], "the failing parent stopped the rest"
    assert "The parent component 'clean' failed on local; 'left_report' did not run." in error
    assert "ZeroDivisionError" in error
    assert re.search(r"-*> 3 rows = \[r / 0", error), error


@pytest.mark.parametrize(
    ("change", "ename", "says"),
    [
        (("left", "after=clean", "after=cleaned"), "UnknownComponentError", "unknown parent 'cleaned'"),
        (("load", "name=load", "name=load after=left_report"), "PipelineCycleError", "->"),
        (("right", "name=right", "name=left"), "DuplicateComponentError", "two cells declare the component 'left'"),
    ],
)
def test_pipeline_errors_are_one_error_and_nothing_runs(tmp_path, change, ename, says):
    name, old, new = change
    cells = list(CELLS)
    cells[INDEX[name]] = cells[INDEX[name]].replace(old, new)
    ran, error, errors = failing_leaf(tmp_path, cells)
    assert ran == [], "nothing ran"
    assert ename in error and says in error, error
    assert len(errors) == 1
