"""The pipeline JSON file: its format, the import's refusals, and updates in place.

No kernel: notebooks are written with nbformat and read back; the command's exit code
and one-line message are checked through ``python -m link_kernel.cli``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from link_kernel.errors import PipelineFileError
from link_kernel.pipeline.component import Component
from link_kernel.pipeline.exchange import export_pipeline, import_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]

CELLS = [
    "# notes\nprint('not a component')",
    "# link: name=load\nrows = [1, 2]",
    "# link: gpu|local name=train after=load keep timeout=30\nmodel = sum(rows)\n",
    "# link: name=report after=train,load cache=off\nprint(model)",
]


def notebook(path: Path, cells: list[str] = CELLS) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "link", "display_name": "Link", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("# A title"))
    nbformat.write(nb, path)
    return path


@pytest.fixture
def exported(tmp_path) -> dict:
    return export_pipeline(notebook(tmp_path / "source.ipynb"))


def test_export_lists_components_in_pipeline_order_with_their_routing_and_hash(exported):
    assert exported["format"] == "link-pipeline" and exported["version"] == 1
    load, train, report = exported["components"]
    assert train == {
        "name": "train",
        "parents": ["load"],
        "target": "gpu|local",
        "options": {"keep": True, "timeout": "30"},
        "code": "model = sum(rows)\n",
        "code_hash": Component.from_cell(CELLS[2]).code_hash,
    }
    assert report["parents"] == ["train", "load"] and report["options"] == {"cache": "off"}
    assert load["target"] == "" and load["options"] == {}


def test_parse_gives_back_the_components(exported):
    components = parse_pipeline(exported)
    assert [c.name for c in components] == ["load", "train", "report"]
    assert [c.code_hash for c in components] == [Component.from_cell(s).code_hash for s in CELLS[1:]]
    assert components[1].targets == ("gpu", "local") and components[2].cache is False


def broken(exported: dict, change) -> dict:
    data = copy.deepcopy(exported)
    change(data)
    return data


def _set(path: list, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _delete(path: list):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


def _append_copy(index: int):
    return lambda data: data["components"].append(copy.deepcopy(data["components"][index]))


def _cycle(data):
    data["components"][0]["parents"] = ["report"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_set(["version"], 2), "pipeline format version 2 (newer); this link-kernel reads version 1 only"),
        (_set(["version"], 0), "pipeline format version 0 (older); this link-kernel reads version 1 only"),
        (_set(["version"], "1"), "pipeline format version '1' (unknown)"),
        (_set(["version"], True), "pipeline format version True (unknown)"),
        (_delete(["version"]), "pipeline format version None"),
        (_set(["format"], "something-else"), 'is not a Link pipeline file (no "format": "link-pipeline")'),
        (_set(["components"], {}), '"components" must be a list'),
        (_delete(["components", 1, "code_hash"]), "component 2 lacks 'code_hash'"),
        (_delete(["components", 0, "parents"]), "component 1 lacks 'parents'"),
        (_set(["components", 1, "code"], "model = sum(rows) * 2\n"), "its code does not match its code_hash"),
        (_set(["components", 1, "parents"], "load"), "'parents' has the wrong type"),
        (_set(["components", 2], "report"), "component 3 is not an object"),
        (_set(["components", 1, "options", "timeout"], "3 0"), "option 'timeout' has the value '3 0'"),
        (_set(["components", 1, "options", "colour"], "red"), "unknown option 'colour'"),
        (_set(["components", 1, "options", "name"], "x"), "option 'name' does not belong"),
        (_set(["components", 1, "target"], "gpu local"), "target 'gpu local' is not a target chain"),
        (_set(["components", 0, "name"], "not a name"), "name='not'"),
        (_append_copy(1), "two components are named 'train'"),
        (_set(["components", 1, "parents"], ["lod"]), "component 'train' names an unknown parent 'lod'"),
        (_cycle, "the pipeline has a cycle: load -> train -> report -> load"),
    ],
)
def test_a_wrong_pipeline_file_is_one_clear_error(exported, change, says):
    with pytest.raises(PipelineFileError) as caught:
        parse_pipeline(broken(exported, change), "p.json")
    assert says in caught.value.message, caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.message.startswith("p.json")


def test_not_json_and_not_an_object_are_clear_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"format": "link-pipeline", "version": 1, "components": [')
    with pytest.raises(PipelineFileError, match=r"p.json is not valid JSON \(Expecting value"):
        import_pipeline(path, tmp_path / "new.ipynb")
    path.write_text("[1, 2]")
    with pytest.raises(PipelineFileError, match="is not a Link pipeline file"):
        import_pipeline(path, tmp_path / "new.ipynb")
    assert not (tmp_path / "new.ipynb").exists()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "link_kernel.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_a_refused_import_exits_2_with_one_line_and_leaves_the_notebook_as_it_was(tmp_path, exported):
    target = notebook(tmp_path / "target.ipynb", CELLS[:2])
    before = target.read_bytes()
    data = broken(exported, _set(["components", 0, "code"], "rows = [9]"))
    (tmp_path / "p.json").write_text(json.dumps(data))
    done = cli("pipeline", "import", "p.json", str(target), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        "link-kernel: PipelineFileError: p.json: component 1 ('load'): its code does not match its "
        "code_hash (the file was changed)"
    ), done.stderr
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "source.ipynb", "target.ipynb"], "no temp file left"


def test_import_updates_components_by_name_in_place_and_appends_new_ones(tmp_path, exported):
    cells = [
        "x = 1",
        "# link: name=train after=load\nmodel = 'old'",
        "# link: name=load\nrows = [1, 2]",
        "# link: name=mine\nprint('my own component')",
    ]
    target = notebook(tmp_path / "target.ipynb", cells)
    old = nbformat.read(target, as_version=4)
    old.cells[2].outputs = [nbformat.v4.new_output("stream", text="old output\n")]
    old.cells[3].outputs = [nbformat.v4.new_output("stream", text="kept output\n")]
    nbformat.write(old, target)
    (tmp_path / "p.json").write_text(json.dumps(exported))

    done = cli("pipeline", "import", "p.json", str(target), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 added (report), 1 replaced (train)" in done.stdout

    new = nbformat.read(target, as_version=4)
    nbformat.validate(new)
    assert [c.source for c in new.cells] == [
        "x = 1",
        "# A title",
        "# link: gpu|local name=train after=load keep timeout=30\nmodel = sum(rows)\n",
        "# link: name=load\nrows = [1, 2]",
        "# link: name=mine\nprint('my own component')",
        "# link: name=report after=train,load cache=off\nprint(model)",
    ]
    assert [c.get("id") for c in new.cells[:5]] == [c.get("id") for c in old.cells], "cells keep their ids"
    assert new.cells[2].outputs == [], "the replaced cell's old outputs went"
    assert new.cells[4].outputs == old.cells[4].outputs, "other cells are left alone"
    assert new.cells[5].id and new.cells[5].id not in {c.id for c in old.cells}


@pytest.mark.parametrize(
    ("cells", "says"),
    [
        (["# link: name=mine after=gone\nx = 1"], "after the import: component 'mine' names an unknown parent 'gone'"),
        (["# link: name=train\nx = 1", "# link: name=train\nx = 2"], "two cells declare the component 'train'"),
    ],
)
def test_an_import_into_a_notebook_whose_pipeline_is_broken_writes_nothing(tmp_path, exported, cells, says):
    target = notebook(tmp_path / "target.ipynb", cells)
    before = target.read_bytes()
    (tmp_path / "p.json").write_text(json.dumps(exported))
    with pytest.raises(PipelineFileError) as caught:
        import_pipeline(tmp_path / "p.json", target)
    assert says in caught.value.message
    assert target.read_bytes() == before
