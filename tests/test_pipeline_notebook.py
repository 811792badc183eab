"""A saved notebook's components (link_kernel.pipeline.notebook), from real .ipynb files."""

from __future__ import annotations

import nbformat
import pytest

from link_kernel.errors import DuplicateComponentError
from link_kernel.pipeline.component import Component
from link_kernel.pipeline.notebook import read_notebook


def write(path, *sources, markdown: str = "# link: name=not_code"):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown)] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))
    return nb


def test_the_components_of_a_saved_notebook_with_their_cell_ids(tmp_path):
    nb = write(
        tmp_path / "flow.ipynb",
        "import pandas as pd",
        "# link: name=load\ndf = pd.read_csv('data.csv')",
        "# link: gpu name=train after=load\nmodel = fit(df)",
        "# link: gpu\nplain = 1",
    )
    saved = read_notebook(tmp_path / "flow.ipynb")
    assert [c.name for c in saved.components] == ["load", "train"]
    assert [c.cell_id for c in saved.components] == [nb.cells[2].id, nb.cells[3].id]
    assert saved.components[1].targets == ("gpu",)
    assert saved.problems == {}
    graph = saved.graph()
    assert graph.ancestors("train") == ["load"]
    # the same cell run from JupyterLab (its id in the request) replaces the saved one
    graph.add(Component.from_cell("# link: name=load\ndf = pd.read_csv('other.csv')", nb.cells[2].id))
    assert len(graph) == 2 and "other.csv" in graph.component("load").code


def test_source_saved_as_a_list_of_lines(tmp_path):
    path = tmp_path / "lines.ipynb"
    path.write_text(
        '{"cells": [{"cell_type": "code", "id": "a1", "metadata": {}, "outputs": [], '
        '"execution_count": null, "source": ["# link: name=load\\n", "x = 1\\n"]}], '
        '"metadata": {}, "nbformat": 4, "nbformat_minor": 5}'
    )
    (component,) = read_notebook(path).components
    assert (component.name, component.cell_id, component.code) == ("load", "a1", "\nx = 1\n")


def test_a_malformed_cell_is_a_problem_not_a_failure(tmp_path):
    write(tmp_path / "bad.ipynb", "# link: name=1load\nx = 1", "# link: name=ok\ny = 2")
    saved = read_notebook(tmp_path / "bad.ipynb")
    assert [c.name for c in saved.components] == ["ok"]
    (message,) = saved.problems.values()
    assert "name='1load'" in message


def test_two_saved_cells_with_one_name_are_refused(tmp_path):
    write(tmp_path / "dup.ipynb", "# link: name=load\nx = 1", "# link: name=load\nx = 2")
    with pytest.raises(DuplicateComponentError, match="two cells declare the component 'load'"):
        read_notebook(tmp_path / "dup.ipynb").graph()


def test_not_a_notebook(tmp_path):
    (tmp_path / "x.ipynb").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a Jupyter notebook"):
        read_notebook(tmp_path / "x.ipynb")
    with pytest.raises(OSError):
        read_notebook(tmp_path / "missing.ipynb")
