"""The notebook corpus gives the same outputs plain and with its cells routed.

Each notebook of ``tests/notebooks/`` runs through nbclient in plain ipykernel
(``python3``), then through Link with its ``heavy``-tagged cells routed to a
host (a ``# link: HOST`` first line), then through Link with every cell routed
(a first cell ``%link default proc``, not compared). Each run gets a fresh
copy of the notebook and its ``data/`` folder. One normalizer serves every
comparison (see ``normalize``); the outputs must match cell by cell.
"""

from __future__ import annotations

import base64
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from remote_hosts import register

from link_kernel.hosts import HostConfig

CORPUS = Path(__file__).parent / "notebooks"
NOTEBOOKS = sorted(p.stem for p in CORPUS.glob("*.ipynb"))
#: Share of cells that must be identical when every cell is routed.
ALL_ROUTED_GOAL = 0.97
CELL_TIMEOUT = 180

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
_UNIT = r"(?:ns|µs|μs|us|ms|s|min|h)"
_TIMEIT = re.compile(rf"\d+(?:\.\d+)? {_UNIT} ± \d+(?:\.\d+)? {_UNIT} per loop")
_SLOWEST = re.compile(r"The slowest run took [^\n]*\n?")
_CPU = re.compile(r"CPU times: [^\n]*")
_WALL = re.compile(r"Wall time: [^\n]*")
#: The file ipykernel compiles a cell to: named by the kernel's pid and the code's hash.
_CELL_FILE = re.compile(r"ipykernel_\d+/\d+\.py")


def scrub(text: str) -> str:
    """Remove what differs between two runs of one notebook in plain ipykernel:
    memory addresses, timings, the name of the file a cell is compiled to."""
    text = _ADDRESS.sub("0x…", text)
    text = _TIMEIT.sub("… per loop", text)
    text = _SLOWEST.sub("", text)
    text = _CPU.sub("CPU times: …", text)
    text = _CELL_FILE.sub("ipykernel_…/….py", text)
    return _WALL.sub("Wall time: …", text)


def png_size(data: str) -> tuple[int, int]:
    raw = base64.b64decode(data)
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def is_link_note(output: dict) -> bool:
    """Link's quiet "ran on" line under a remote cell."""
    return "link" in output.get("metadata", {})


def normalize(outputs: list[dict]) -> list[tuple]:
    """What a reader sees in a cell's outputs, without what differs from run to run:
    memory addresses, timings, Link's quiet line, execution counts. Adjacent
    stream chunks of one stream are one text, as a notebook shows them."""
    shown: list[list] = []
    for out in outputs:
        if is_link_note(out):
            continue
        kind = out["output_type"]
        if kind == "stream":
            if shown and shown[-1][:2] == ["stream", out["name"]]:
                shown[-1][2] += out["text"]
            else:
                shown.append(["stream", out["name"], out["text"]])
        elif kind in ("execute_result", "display_data"):
            item = [kind, out["data"].get("text/plain", "")]
            if "image/png" in out["data"]:
                item.append(("image/png", png_size(out["data"]["image/png"])))
            shown.append(item)
        elif kind == "error":
            shown.append(["error", out["ename"], out["evalue"]])
    return [tuple(scrub(x) if isinstance(x, str) else x for x in item) for item in shown]


def _fresh_copy(name: str, where: Path) -> Path:
    where.mkdir(parents=True)
    shutil.copy(CORPUS / f"{name}.ipynb", where / f"{name}.ipynb")
    shutil.copytree(CORPUS / "data", where / "data")
    return where / f"{name}.ipynb"


def execute(name: str, where: Path, kernel: str, *, edit=None, allow_errors: bool = False):
    """Run a fresh copy of notebook ``name`` in ``where``; return the executed notebook."""
    path = _fresh_copy(name, where)
    nb = nbformat.read(path, as_version=4)
    if edit is not None:
        edit(nb)
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=CELL_TIMEOUT,
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(where)}},
    )
    client.execute()
    return nb


def heavy(cell) -> bool:
    return cell.cell_type == "code" and "heavy" in cell.metadata.get("tags", [])


def route_heavy(target: str):
    def edit(nb):
        for cell in nb.cells:
            if heavy(cell):
                cell.source = f"# link: {target}\n" + cell.source

    return edit


def route_all(target: str):
    def edit(nb):
        setup = nbformat.v4.new_code_cell(f"%link default {target}")
        setup.id = "link-default"
        nb.cells.insert(0, setup)

    return edit


@dataclass
class Difference:
    notebook: str
    index: int
    source: str
    plain: list[tuple]
    link: list[tuple]
    link_outputs: list[dict]

    def __str__(self) -> str:
        first = self.source.splitlines()[0] if self.source else ""
        lines = [f"--- {self.notebook} cell {self.index}: {first}"]
        lines += ["  plain:"] + [f"    {item!r}" for item in self.plain]
        lines += ["  link:"] + [f"    {item!r}" for item in self.link]
        return "\n".join(lines)

    @property
    def explained(self) -> bool:
        """Whether the cell's own output says what Link could not do (a limit)."""
        return any("link" in str(item).lower() for item in self.link)


def compare(name: str, plain, routed) -> tuple[int, list[Difference]]:
    """(number of code cells compared, the cells whose outputs differ)."""
    by_id = {c.id: c for c in routed.cells if c.cell_type == "code"}
    code = [c for c in plain.cells if c.cell_type == "code"]
    differences = []
    for index, cell in enumerate(code):
        other = by_id[cell.id]
        mine, theirs = normalize(cell.outputs), normalize(other.outputs)
        if mine != theirs:
            differences.append(Difference(name, index, cell.source, mine, theirs, other.outputs))
    return len(code), differences


def unrouted(nb, target: str, cells) -> list[str]:
    """First lines of ``cells`` that show no sign of having run on ``target``."""
    missing = []
    for cell in cells:
        notes = [o for o in cell.outputs if is_link_note(o)]
        if not any(o["metadata"]["link"].get("target") == target for o in notes):
            missing.append(cell.source.splitlines()[-1 if cell.source.startswith("# link") else 0])
    return missing


@pytest.fixture(scope="module")
def python3_kernel(session_root) -> str:
    """ipykernel's ``python3`` spec, visible to this session's isolated Jupyter path."""
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=str(session_root))
    return "python3"


@pytest.fixture(scope="module")
def plain(python3_kernel, tmp_path_factory) -> dict:
    """Every corpus notebook run once in plain ipykernel (it must run cleanly)."""
    base = tmp_path_factory.mktemp("plain")
    return {name: execute(name, base / name, python3_kernel) for name in NOTEBOOKS}


@pytest.fixture(scope="module")
def proc_host(tmp_path_factory) -> str:
    register(HostConfig(alias="proc", transport="process", workdir=str(tmp_path_factory.mktemp("work-all"))))
    return "proc"


def test_corpus_is_a_corpus(plain):
    """At least 12 notebooks, each with heavy cells and markdown between its code cells."""
    assert len(NOTEBOOKS) >= 12
    for name, nb in plain.items():
        assert any(heavy(c) for c in nb.cells), name
        assert any(c.cell_type == "markdown" for c in nb.cells), name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_heavy_cells_routed(remote, name, plain, tmp_path):
    """Link with the heavy cells on a host: every cell as in plain ipykernel."""
    routed = execute(name, tmp_path / name, "link", edit=route_heavy(remote), allow_errors=True)
    total, differences = compare(name, plain[name], routed)
    for difference in differences:
        print(difference)
    assert not differences, f"{len(differences)} of {total} cells differ in {name} (printed above)"
    missing = unrouted(routed, remote, [c for c in routed.cells if heavy(c)])
    assert not missing, f"heavy cells that did not run on {remote}: {missing}"


def test_every_cell_routed(proc_host, plain, tmp_path):
    """Link with every cell on a host: at least 97% of the corpus' cells as in plain
    ipykernel, and each cell that differs says in its own output why."""
    total, differences = 0, []
    for name in NOTEBOOKS:
        routed = execute(name, tmp_path / name, "link", edit=route_all(proc_host), allow_errors=True)
        count, found = compare(name, plain[name], routed)
        total += count
        differences += found
        code = [c for c in routed.cells if c.cell_type == "code" and c.id != "link-default"]
        missing = unrouted(routed, proc_host, code)
        assert not missing, f"{name}: cells that did not run on {proc_host}: {missing}"
    for difference in differences:
        print(difference)
    identical = (total - len(differences)) / total
    print(f"every cell routed: {total - len(differences)} of {total} cells identical ({identical:.1%})")
    assert identical >= ALL_ROUTED_GOAL, f"{len(differences)} of {total} cells differ (printed above)"
    silent = [f"{d.notebook} cell {d.index}" for d in differences if not d.explained]
    assert not silent, f"cells that differ without saying why: {silent}"
