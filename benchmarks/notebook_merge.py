"""The notebook merge against git's own line merge of the same files, in one run.

    python benchmarks/notebook_merge.py [-n 5]

Two cases, each a base and two sides written as nbformat files:

- edits: 1,000 cells, ours edits the even cells' bodies, theirs changes the odd cells'
  routing lines and inserts a cell in the middle;
- rename: 400 cells without cell ids, ours renames every component, theirs edits every body.

Each is merged by the notebook merge driver's own function (read, merge, check the
pipeline, write, as git's driver call does) and by ``git merge-file`` on the same JSON
files (the line merge git would do without the driver; it knows nothing of cells and may
report conflicts). The two take turns ``-n`` times; the medians and the ratio are printed.

A third line times the driver's whole command, as git runs it (a new interpreter that
imports the package), on a two-cell notebook: the fixed cost each merged notebook pays.
"""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from link_kernel.notebook_git.cells import dumps
from link_kernel.notebook_git.driver import merge_driver


def notebook(cells: list[tuple[str | None, str]]) -> dict:
    out = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}
    for cell_id, source in cells:
        cell = {"cell_type": "code", "source": source, "metadata": {}, "outputs": [],
                "execution_count": None}
        if cell_id is not None:
            cell["id"] = cell_id
        else:
            out["nbformat_minor"] = 4
        out["cells"].append(cell)
    return out


def edits() -> tuple[dict, dict, dict]:
    base = notebook([(f"c{i}", f"# link: name=c{i}\nx{i} = {i}\n") for i in range(1000)])
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for i in range(0, 1000, 2):
        ours["cells"][i]["source"] = f"# link: name=c{i}\nx{i} = -{i}\n"
        theirs["cells"][i + 1]["source"] = f"# link: process name=c{i + 1}\nx{i + 1} = {i + 1}\n"
    theirs["cells"].insert(500, notebook([("new", "print('new')\n")])["cells"][0])
    return base, ours, theirs


def rename() -> tuple[dict, dict, dict]:
    body = "\n".join(f"v{j} = {j}" for j in range(8))
    base = notebook([(None, f"# link: name=c{i}\n{body}\nw{i} = {i}\n") for i in range(400)])
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    for i in range(400):
        ours["cells"][i]["source"] = f"# link: name=renamed{i}\n{body}\nw{i} = {i}\n"
        theirs["cells"][i]["source"] = f"# link: name=c{i}\n{body}\nw{i} = {i} * 2\n"
    return base, ours, theirs


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def small() -> tuple[dict, dict, dict]:
    cells = [("a", "x = 1\n"), ("b", "y = 2\n")]
    return (notebook(cells), notebook([("a", "x = 10\n"), cells[1]]),
            notebook([cells[0], ("b", "y = 20\n")]))


def in_process(work: Path) -> int:
    """The driver's own function, as its command calls it."""
    sides = (str(work / f"{n}.ipynb") for n in ("base", "ours", "theirs"))
    return merge_driver(*sides, "nb.ipynb", err=io.StringIO())


def as_git_runs_it(work: Path) -> int:
    """The driver's whole command: a new interpreter that imports the package."""
    sides = (str(work / f"{n}.ipynb") for n in ("base", "ours", "theirs"))
    argv = [sys.executable, "-m", "link_kernel.cli", "git", "merge-driver", *sides, "nb.ipynb"]
    return subprocess.run(argv, capture_output=True, check=False).returncode


def git_merge_file(work: Path) -> None:
    argv = ["git", "merge-file", *(str(work / f"{n}.json") for n in ("ours", "base", "theirs"))]
    subprocess.run(argv, capture_output=True, check=False)


def compare(label: str, make, driver, work: Path, runs: int) -> None:
    """``driver`` and ``git merge-file`` in turn on fresh copies of ``make()``'s sides."""
    texts = [dumps(side) for side in make()]
    ours_times, git_times, statuses = [], [], set()
    for _ in range(runs):
        for name, text in zip(("base", "ours", "theirs"), texts):
            (work / f"{name}.ipynb").write_text(text)
            (work / f"{name}.json").write_text(text)
        ours_times.append(timed(lambda: statuses.add(driver(work))))
        git_times.append(timed(lambda: git_merge_file(work)))
    mine, git = statistics.median(ours_times), statistics.median(git_times)
    print(f"{label}: notebook merge {mine * 1000:.0f} ms, git merge-file on the JSON "
          f"{git * 1000:.0f} ms, ratio {mine / git:.1f}x "
          f"(range {min(ours_times) * 1000:.0f}-{max(ours_times) * 1000:.0f} ms; "
          f"driver exit {sorted(statuses)}, 0 = merged cleanly)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5, help="runs of each (default 5)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="link-merge-bench-"))
    try:
        compare("edits, 1,000 cells", edits, in_process, work, args.n)
        compare("rename, 400 cells, no ids", rename, in_process, work, args.n)
        compare("driver command as git runs it, 2 cells", small, as_git_runs_it, work, args.n)
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
