"""The cell-level merge itself (``merge_notebooks``), case by case, without a repository.

The matrix through real git is tests/test_notebook_git.py; these are the finer rules: the
routing line's keys, outputs, ids, notebooks without cell ids, the merge's speed.
"""

from __future__ import annotations

import copy

import nbformat

from link_kernel.notebook_git.cells import RouteLine, dumps, loads, validate
from link_kernel.notebook_git.merge import merge_notebooks


def nb(*cells, minor: int = 5) -> dict:
    notebook = {"nbformat": 4, "nbformat_minor": minor, "metadata": {}, "cells": []}
    for cell_id, source in cells:
        cell = {"cell_type": "code", "source": source, "metadata": {}, "outputs": [], "execution_count": None}
        if minor >= 5:
            cell["id"] = cell_id
        notebook["cells"].append(cell)
    return notebook


def sources(notebook: dict) -> list[str]:
    return ["".join(c["source"]) for c in notebook["cells"]]


def edit(notebook: dict, index: int, source: str) -> dict:
    other = copy.deepcopy(notebook)
    other["cells"][index]["source"] = source
    return other


BASE = nb(("a", "# link: name=load\nx = 1\n"), ("b", "# link: name=train after=load\ny = x\n"),
          ("c", "# link: name=clean\nz = 0\n"))


def test_after_merges_as_a_set_each_sides_additions_minus_removals():
    ours = edit(BASE, 1, "# link: name=train after=load,clean\ny = x\n")
    theirs = edit(BASE, 1, "# link: name=train\ny = x\n")  # removed load
    result = merge_notebooks(BASE, ours, theirs)
    assert result.clean, result.conflicts
    assert sources(result.notebook)[1] == "# link: name=train after=clean\ny = x\n"


def test_options_merge_key_by_key_and_a_removed_key_stays_removed():
    base = edit(BASE, 1, "# link: gpu name=train after=load timeout=60 files=off\ny = x\n")
    ours = edit(base, 1, "# link: gpu name=train after=load timeout=120 files=off\ny = x\n")
    theirs = edit(base, 1, "# link: gpu keep name=train after=load timeout=60 cache=off\ny = x\n")
    result = merge_notebooks(base, ours, theirs)
    assert result.clean, result.conflicts
    line = sources(result.notebook)[1].splitlines()[0]
    assert line == "# link: gpu name=train after=load timeout=120 keep cache=off"
    assert RouteLine.of(line).keys == {
        "target": "gpu", "name": "train", "after": ["load"], "timeout": "120", "keep": True,
        "cache": "off",
    }
    # a key one side changed and the other removed is a conflict
    theirs = edit(base, 1, "# link: gpu name=train after=load files=off\ny = x\n")
    assert merge_notebooks(base, ours, theirs).conflicts == [
        "component 'train': both sides changed the routing line's timeout (kept ours above, "
        "both between markers)"
    ]


def test_a_line_whose_keys_did_not_change_keeps_its_spelling():
    base = edit(BASE, 1, "#link:  gpu | local   name=train after=load   # trains\ny = x\n")
    theirs = edit(base, 1, "#link:  gpu | local   name=train after=load   # trains\ny = x + 1\n")
    result = merge_notebooks(base, base, theirs)
    assert sources(result.notebook)[1] == "#link:  gpu | local   name=train after=load   # trains\ny = x + 1\n"


def test_outputs_are_ours_unless_only_theirs_changed_and_a_conflict_clears_them():
    out = [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]
    theirs = copy.deepcopy(BASE)
    theirs["cells"][0]["outputs"] = out
    theirs["cells"][0]["execution_count"] = 3
    result = merge_notebooks(BASE, BASE, theirs)
    assert result.notebook["cells"][0]["outputs"] == out
    assert result.notebook["cells"][0]["execution_count"] == 3
    ours = edit(theirs, 0, "# link: name=load\nx = 2\n")
    theirs2 = edit(theirs, 0, "# link: name=load\nx = 3\n")
    result = merge_notebooks(BASE, ours, theirs2)
    assert not result.clean
    assert result.notebook["cells"][0]["outputs"] == []
    assert result.notebook["cells"][0]["execution_count"] is None


def test_two_sides_inserting_one_component_name_is_a_conflict():
    ours = copy.deepcopy(BASE)
    ours["cells"].append(nb(("o", "# link: name=plot\nprint(1)\n"))["cells"][0])
    theirs = copy.deepcopy(BASE)
    theirs["cells"].append(nb(("t", "# link: name=plot\nprint(2)\n"))["cells"][0])
    result = merge_notebooks(BASE, ours, theirs)
    assert result.conflicts == [
        "the pipeline breaks: two cells declare the component 'plot': cell o and cell t"
    ]


def test_one_id_brought_by_both_sides_becomes_two_ids():
    ours = copy.deepcopy(BASE)
    ours["cells"].append(nb(("same", "print('ours')\n"))["cells"][0])
    theirs = copy.deepcopy(BASE)
    theirs["cells"].append(nb(("same", "print('theirs')\n"))["cells"][0])
    result = merge_notebooks(BASE, ours, theirs)
    ids = [c["id"] for c in result.notebook["cells"]]
    assert len(set(ids)) == len(ids) == 5
    validate(result.notebook)


def test_without_cell_ids_a_rename_is_still_followed():
    base = nb(("", "# link: name=load\nx = 1\n"), ("", "# link: name=train after=load\ny = x\n"), minor=4)
    ours = edit(base, 0, "# link: name=ingest\nx = 1\n")
    ours = edit(ours, 1, "# link: name=train after=ingest\ny = x\n")
    theirs = copy.deepcopy(base)
    theirs["cells"].append(nb(("", "# link: name=plot after=load\nprint(x)\n"), minor=4)["cells"][0])
    result = merge_notebooks(base, ours, theirs)
    assert result.clean, result.conflicts
    assert sources(result.notebook)[2] == "# link: name=plot after=ingest\nprint(x)\n"
    nbformat.validate(nbformat.from_dict(result.notebook))


def test_the_written_text_is_what_nbformat_writes_to_a_file():
    text = nbformat.writes(nbformat.from_dict(copy.deepcopy(BASE)))
    assert dumps(loads(text)) == text + "\n", "nbformat.write ends the file with a newline"


def test_a_thousand_cells_edited_on_both_sides_merge_cleanly():
    # how long it takes is benchmarks/notebook_merge.py's
    base = nb(*[(f"c{i}", f"# link: name=c{i}\nx{i} = {i}\n") for i in range(1000)])
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for i in range(0, 1000, 2):
        ours["cells"][i]["source"] = f"# link: name=c{i}\nx{i} = -{i}\n"
        theirs["cells"][i + 1]["source"] = f"# link: gpu name=c{i + 1}\nx{i + 1} = {i + 1}\n"
    theirs["cells"].insert(500, nb(("new", "print('new')\n"))["cells"][0])
    result = merge_notebooks(base, ours, theirs)
    assert result.clean, result.conflicts[:3]
    assert len(result.notebook["cells"]) == 1001
    assert sources(result.notebook)[500] == "print('new')\n"


# -- properties ------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def one_sided(draw):
    """A base notebook and a side made of random edits, deletes, inserts and moves."""
    count = draw(st.integers(0, 8))
    base = nb(*[(f"b{i}", f"# link: name=c{i}\nv{i} = {i}\n") for i in range(count)])
    side = copy.deepcopy(base)
    for step in range(draw(st.integers(0, 6))):
        cells = side["cells"]
        op = draw(st.sampled_from(["edit", "delete", "insert", "move"]))
        if op == "insert" or not cells:
            at = draw(st.integers(0, len(cells)))
            cells.insert(at, nb((f"n{step}", f"print({step})\n"))["cells"][0])
        elif op == "edit":
            at = draw(st.integers(0, len(cells) - 1))
            cells[at]["source"] = "".join(cells[at]["source"]) + f"w = {step}\n"
        elif op == "delete":
            cells.pop(draw(st.integers(0, len(cells) - 1)))
        else:
            cell = cells.pop(draw(st.integers(0, len(cells) - 1)))
            cells.insert(draw(st.integers(0, len(cells))), cell)
    return base, side


@settings(max_examples=150, deadline=None)
@given(one_sided())
def test_a_change_on_one_side_only_comes_out_exactly_as_that_side_made_it(case):
    base, side = case
    for ours, theirs in ((side, base), (base, side)):
        result = merge_notebooks(base, ours, theirs)
        assert sources(result.notebook) == sources(side)
        assert [c["id"] for c in result.notebook["cells"]] == [c["id"] for c in side["cells"]]
        assert result.clean, result.conflicts
        validate(result.notebook)
    same = merge_notebooks(base, side, side)
    assert sources(same.notebook) == sources(side)
