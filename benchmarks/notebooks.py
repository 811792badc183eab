"""The notebook corpus, plain and with its heavy cells routed, side by side in one run.

    python benchmarks/notebooks.py [-r ROUNDS] [--nbclient] [NOTEBOOK ...]

For each notebook of ``tests/notebooks/`` (a fresh copy of it and its
``data/`` each time), nbclient runs it in plain ipykernel (``python3``) and
through Link with each ``heavy``-tagged cell routed to a ``process`` host
(a ``# link: proc`` first line), one after the other, ROUNDS times. A cell's
time is what nbclient waits for it: from its execute_request to its reply
and idle; a notebook's wall time is the sum over its cells (kernel start
apart, printed on its own). The extra time of a routed cell is its time
through Link minus the same cell's time in plain ipykernel (goal: a median
of at most 150 ms); the medians are over rounds, then over the routed cells.
Kernels start as JupyterLab starts them, with the notebook's file named in
``JPY_SESSION_NAME`` (the saved copy has its routing comments), unless
``--nbclient``: then the kernel cannot read where the notebook routes cells.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, isolated_jupyter, register

CORPUS = ROOT / "tests" / "notebooks"
GOAL_MS = 150.0


def timed_run(name: str, where: Path, kernel: str, route: str | None, session: bool = True):
    """(kernel start seconds, {cell id: seconds}, ids of cells that raised) for one run."""
    import nbformat
    from nbclient import NotebookClient

    where.mkdir(parents=True)
    shutil.copy(CORPUS / f"{name}.ipynb", where / f"{name}.ipynb")
    shutil.copytree(CORPUS / "data", where / "data")
    nb = nbformat.read(where / f"{name}.ipynb", as_version=4)
    if route is not None:
        for cell in nb.cells:
            if cell.cell_type == "code" and "heavy" in cell.metadata.get("tags", []):
                cell.source = f"# link: {route}\n" + cell.source
    seconds: dict[str, float] = {}
    client = NotebookClient(nb, kernel_name=kernel, timeout=600, allow_errors=True,
                            resources={"metadata": {"path": str(where)}})
    # as JupyterLab starts it: jupyter_server names the notebook's file (nbclient does not)
    env = {"env": {**os.environ, "JPY_SESSION_NAME": str(where / f"{name}.ipynb")}} if session else {}
    if session:
        nbformat.write(nb, where / f"{name}.ipynb")  # the saved notebook has its routing comments
    start = time.perf_counter()
    with client.setup_kernel(**env):
        started = time.perf_counter() - start
        for index, cell in enumerate(nb.cells):
            start = time.perf_counter()
            client.execute_cell(cell, index)
            if cell.cell_type == "code":
                seconds[cell.id] = time.perf_counter() - start
    raised = {c.id for c in nb.cells
              if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)}
    return started, seconds, raised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--rounds", type=int, default=1)
    parser.add_argument("--nbclient", action="store_true",
                        help="start kernels as nbclient does, without naming the notebook's file "
                             "(JupyterLab names it: the kernel then warms the hosts it routes to)")
    parser.add_argument("notebooks", nargs="*", help="names without .ipynb (default: all)")
    args = parser.parse_args()
    names = args.notebooks or sorted(p.stem for p in CORPUS.glob("*.ipynb"))
    import nbformat

    from link_kernel.hosts import HostConfig

    with isolated_jupyter() as base:
        register(HostConfig(alias="proc", transport="process", workdir=str(base / "proc-work")))
        print(f"{'notebook':<26} {'cells':>5} {'routed':>6} {'plain s':>8} {'routed s':>9} "
              f"{'ratio':>6} {'start plain/link s':>19} {'extra/routed cell ms':>21} {'first ms':>8}"
              "  cells that raised only routed")
        all_extras, firsts = [], []
        for name in names:
            nb = nbformat.read(CORPUS / f"{name}.ipynb", as_version=4)
            heavy = [c.id for c in nb.cells
                     if c.cell_type == "code" and "heavy" in c.metadata.get("tags", [])]
            plain_runs, link_runs, starts, failed = [], [], ([], []), set()
            for r in range(args.rounds):
                s, cells, plain_raised = timed_run(name, base / f"plain-{name}-{r}", "python3", None,
                                                     not args.nbclient)
                starts[0].append(s)
                plain_runs.append(cells)
                s, cells, link_raised = timed_run(name, base / f"link-{name}-{r}", "link", "proc",
                                                    not args.nbclient)
                failed |= link_raised - plain_raised
                starts[1].append(s)
                link_runs.append(cells)
            ids = list(plain_runs[0])
            plain = {i: statistics.median(run[i] for run in plain_runs) for i in ids}
            link = {i: statistics.median(run[i] for run in link_runs) for i in ids}
            extras = [(link[i] - plain[i]) * 1000 for i in heavy]
            all_extras += extras
            firsts.append(extras[0])
            wall_plain, wall_link = sum(plain.values()), sum(link.values())
            print(f"{name:<26} {len(ids):>5} {len(heavy):>6} {wall_plain:>8.2f} {wall_link:>9.2f} "
                  f"{wall_link / wall_plain:>6.2f} "
                  f"{statistics.median(starts[0]):>9.2f}/{statistics.median(starts[1]):<9.2f} "
                  f"{statistics.median(extras):>+21.0f} {extras[0]:>+8.0f}  {len(failed) or ''}", flush=True)
        median = statistics.median(all_extras)
        print("(a cell that raised only when routed stopped early: its time is not the cell's)")
        print(f"\nmedian extra time per routed cell, {len(all_extras)} cells: {median:+.0f} ms "
              f"(goal <= {GOAL_MS:.0f} ms): {'met' if median <= GOAL_MS else 'NOT met'}")
        print(f"each notebook's first routed cell: median {statistics.median(firsts):+.0f} ms, "
              f"worst {max(firsts):+.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
