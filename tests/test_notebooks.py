"""The notebook corpus gives the same outputs plain and with its cells routed.

Each notebook of ``tests/notebooks/`` runs through nbclient in plain ipykernel
(``python3``), then through Link with its ``heavy``-tagged cells routed to a
host (a ``# link: HOST`` first line), then through Link with every cell routed
(a first cell ``%link default proc-NN``, a host of the notebook's own, not
compared). Each run gets a fresh copy of the notebook and its ``data/`` folder.
One normalizer serves every comparison (see ``normalize``); the outputs must
match cell by cell.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from remote_hosts import register

from link_kernel import hosts
from link_kernel.hosts import HostConfig

CORPUS = Path(__file__).parent / "notebooks"
NOTEBOOKS = sorted(p.stem for p in CORPUS.glob("*.ipynb"))
#: Share of cells that must be identical when every cell is routed.
ALL_ROUTED_GOAL = 0.97
CELL_TIMEOUT = 180
#: Notebooks run at once by the tests that run the whole corpus: each kernel spends
#: most of its time on one core booting (imports), and CI has two.
PARALLEL = 2
#: Notebooks run at once with every cell routed: each cell mostly waits for a fresh
#: remote kernel, and three keep two cores busier than two do.
ROUTED_PARALLEL = 3

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


def execute(name: str, where: Path, kernel: str, *, edit=None, allow_errors: bool = False,
            saved: bool = False):
    """Run a fresh copy of notebook ``name`` in ``where``; return the executed notebook.

    ``saved``: as JupyterLab runs it, the (edited) notebook saved and its path in the
    kernel's ``JPY_SESSION_NAME`` (nbclient names no file)."""
    path = _fresh_copy(name, where)
    nb = nbformat.read(path, as_version=4)
    if edit is not None:
        edit(nb)
    env = {}
    if saved:
        nbformat.write(nb, path)
        env["env"] = {**os.environ, "JPY_SESSION_NAME": str(path)}
    # Several notebooks start at once in this one process. Over tcp, jupyter_client
    # picks each kernel's ports by binding and releasing them, and a port released
    # here can be taken by another kernel's connection before its owner binds it;
    # ipc sockets of the run's own cannot collide.
    with tempfile.TemporaryDirectory(prefix="nb-") as sockets:
        km = AsyncKernelManager(kernel_name=kernel, transport="ipc", ip=f"{sockets}/k")
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=kernel,
            timeout=CELL_TIMEOUT,
            allow_errors=allow_errors,
            resources={"metadata": {"path": str(where)}},
        )
        log = where / "kernel.log"  # the router's own log: shown if the run fails
        with log.open("wb") as stderr:
            try:
                client.execute(stderr=stderr, **env)
            except Exception as exc:
                exc.add_note(f"{kernel} kernel's log:\n{log.read_text(errors='replace')[-4000:]}")
                raise
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


class PlainRuns(dict):
    """Each corpus notebook run once in plain ipykernel, when first asked for
    (so a ``-k`` selection runs only the notebooks it needs). It must run cleanly:
    only cells tagged ``raises-exception`` may raise."""

    def __init__(self, kernel: str, base: Path) -> None:
        super().__init__()
        self.kernel, self.base = kernel, base

    def __missing__(self, name: str):
        self[name] = execute(name, self.base / name, self.kernel)
        return self[name]

    def run_all(self, names) -> None:
        """Run the notebooks of ``names`` not run yet, ``PARALLEL`` at a time."""
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(self.__getitem__, [n for n in names if n not in self]))


@pytest.fixture(scope="module")
def plain(python3_kernel, tmp_path_factory) -> PlainRuns:
    return PlainRuns(python3_kernel, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def proc_hosts(tmp_path_factory) -> dict[str, str]:
    """A ``process`` host of its own for each notebook (``proc-01``...), each with its
    own work directory: the notebooks run ``PARALLEL`` at a time, and two notebooks
    syncing one work directory at once would see each other's files."""
    aliases = {name: f"proc-{name.partition('_')[0]}" for name in NOTEBOOKS}
    register(
        *(HostConfig(alias=alias, transport="process", workdir=str(tmp_path_factory.mktemp(f"work-{alias}")))
          for alias in aliases.values())
    )
    return aliases


def test_corpus_is_a_corpus(plain):
    """At least 12 notebooks, each with heavy cells and markdown between its code cells."""
    assert len(NOTEBOOKS) >= 12
    plain.run_all(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = plain[name]
        assert any(heavy(c) for c in nb.cells), name
        assert any(c.cell_type == "markdown" for c in nb.cells), name


def test_normalizer_drops_only_run_to_run_noise():
    """Addresses, timings, the cell's file name and Link's line go; everything else stays."""
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + struct.pack(">II", 640, 480)).decode()
    outputs = [
        {"output_type": "stream", "name": "stdout", "text": "CPU times: user 3 ms, sys: 0 ns, total: 3 ms\n"},
        {"output_type": "stream", "name": "stdout", "text": "Wall time: 2.1 ms\n"},
        {"output_type": "stream", "name": "stderr", "text": "/tmp/ipykernel_123/456.py:1: Warning\n"},
        {"output_type": "stream", "name": "stdout", "text": "125 μs ± 0 ns per loop (mean ± std. dev. of 1 run, 3 loops each)\n"},
        {"output_type": "execute_result", "execution_count": 4, "metadata": {},
         "data": {"text/plain": "<torch._C.Generator at 0x7f3a2c0b1d30>", "image/png": png}},
        {"output_type": "display_data", "metadata": {"link": {"target": "proc"}},
         "data": {"text/plain": "[link] ran on proc in 0.12 s"}},
        {"output_type": "error", "ename": "ValueError", "evalue": "bad 0.5", "traceback": ["..."]},
    ]
    assert normalize(outputs) == [
        ("stream", "stdout", "CPU times: …\nWall time: …\n"),
        ("stream", "stderr", "/tmp/ipykernel_…/….py:1: Warning\n"),
        ("stream", "stdout", "… per loop (mean ± std. dev. of 1 run, 3 loops each)\n"),
        ("execute_result", "<torch._C.Generator at 0x…>", ("image/png", (640, 480))),
        ("error", "ValueError", "bad 0.5"),
    ]
    other = [dict(o) for o in outputs[4:5]]
    other[0]["data"] = {"text/plain": "<torch._C.Generator at 0x7f3a2c0b1d30>"}
    assert normalize(other) != normalize(outputs[4:5]), "a missing image must count"


#: Each notebook runs on a host of its own: notebooks on one host alias share its work
#: directory (a limit the README states), so 09_magics_and_env's ``!ls data`` would list
#: the other notebooks' files.


def _selected(request, test: str, transport: str) -> list[str]:
    """The notebooks of the session's ``test`` items run with the ``transport`` host."""
    return [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == test and item.callspec.params.get("remote") == transport
    ]


class HeavyRuns(dict):
    """Each corpus notebook with its heavy cells routed to a copy of the ``remote`` host
    of its own (alias ``HOST-NN``, its own work directory and cache): name -> (alias,
    executed notebook, or the exception its run raised). When the first is asked for,
    every notebook the session selected for this host runs, ``PARALLEL`` at a time."""

    def __init__(self, remote: str, selected: list[str], base: Path) -> None:
        super().__init__()
        self.remote, self.selected, self.base = remote, selected, base
        self.host = hosts.load_registry()[remote]

    def alias(self, name: str) -> str:
        return f"{self.remote}-{name.partition('_')[0]}"

    def _run(self, name: str):
        alias = self.alias(name)
        try:
            # as JupyterLab runs it: the kernel reads the saved notebook (and warms its host)
            routed = execute(name, self.base / name, "link", edit=route_heavy(alias), allow_errors=True,
                             saved=True)
            return alias, routed
        except Exception as exc:  # noqa: BLE001 (the notebook's own test raises it)
            return alias, exc

    def __missing__(self, name: str):
        names = [n for n in dict.fromkeys([name, *self.selected]) if n not in self]
        copies = []
        for n in names:
            workdir = self.base / f"work-{self.alias(n)}"
            workdir.mkdir()
            cache = str(self.base / f"work-{self.alias(n)}-cache") if self.host.cache else ""
            copies.append(replace(self.host, alias=self.alias(n), workdir=str(workdir), cache=cache))
        register(*copies)
        with ThreadPoolExecutor(PARALLEL) as pool:
            self.update(zip(names, pool.map(self._run, names)))
        return self[name]


@pytest.fixture(scope="module")
def heavy_runs(remote, plain, request, tmp_path_factory) -> HeavyRuns:
    transport = hosts.load_registry()[remote].transport
    selected = _selected(request, "test_heavy_cells_routed", transport)
    plain.run_all(selected)
    return HeavyRuns(remote, selected, tmp_path_factory.mktemp(f"heavy-{transport}"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_heavy_cells_routed(heavy_runs, name, plain):
    """Link with the heavy cells on a host: every cell as in plain ipykernel."""
    host, routed = heavy_runs[name]
    if isinstance(routed, Exception):
        raise routed
    total, differences = compare(name, plain[name], routed)
    for difference in differences:
        print(difference)
    assert not differences, f"{len(differences)} of {total} cells differ in {name} (printed above)"
    missing = unrouted(routed, host, [c for c in routed.cells if heavy(c)])
    assert not missing, f"heavy cells that did not run on {host}: {missing}"


def test_every_cell_routed(proc_hosts, plain, tmp_path):
    """Link with every cell on a host: at least 97% of the corpus' cells as in plain
    ipykernel, and each cell that differs says in its own output why. The notebooks
    run ``ROUTED_PARALLEL`` at a time (the longest first), each on a host of its own."""

    def run(name):
        return execute(name, tmp_path / name, "link", edit=route_all(proc_hosts[name]), allow_errors=True)

    plain.run_all(NOTEBOOKS)
    longest_first = sorted(NOTEBOOKS, key=lambda n: -sum(c.cell_type == "code" for c in plain[n].cells))
    with ThreadPoolExecutor(ROUTED_PARALLEL) as pool:
        runs = dict(zip(longest_first, pool.map(run, longest_first)))
    total, differences = 0, []
    for name in NOTEBOOKS:
        routed, host = runs[name], proc_hosts[name]
        count, found = compare(name, plain[name], routed)
        total += count
        differences += found
        code = [c for c in routed.cells if c.cell_type == "code" and c.id != "link-default"]
        missing = unrouted(routed, host, code)
        assert not missing, f"{name}: cells that did not run on {host}: {missing}"
    for difference in differences:
        print(difference)
    identical = (total - len(differences)) / total
    print(f"every cell routed: {total - len(differences)} of {total} cells identical ({identical:.1%})")
    assert identical >= ALL_ROUTED_GOAL, f"{len(differences)} of {total} cells differ (printed above)"
    silent = [f"{d.notebook} cell {d.index}" for d in differences if not d.explained]
    assert not silent, f"cells that differ without saying why: {silent}"
