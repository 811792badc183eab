"""Sharing through the ``link-kernel`` command and real clients (DESIGN.md "Sharing").

A three-component notebook (load -> clean -> report) runs through nbclient on the Link
kernel. Each component appends its name to ``ran.log`` (its side effect), so the log
says which components ran; one restored from the cache writes nothing.

- The pipeline goes out as JSON and into a new notebook; both notebooks give the same
  outputs.
- The cache goes out of one user's home (a store of its own) into another's; there
  the leaf runs and no parent does.
- Damaged and unsafe archives are refused whole, by the command, and the receiving
  store is byte for byte as it was.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from kernel_client import take_log

ROOT = Path(__file__).resolve().parents[1]


def component(route: str, name: str, body: str) -> str:
    return f"# link: {route}\nopen('ran.log', 'a').write('{name}\\n')\n{body}"


CELLS = [
    "import math",
    component("name=load", "load", "print('loading')\nrows = list(range(10))"),
    component("local name=clean after=load timeout=60", "clean", "rows = [r * 3 for r in rows]\nprint('clean', len(rows))"),
    component("name=report after=clean", "report", "print('report', sum(rows))"),
]
NAMES = ["load", "clean", "report"]


class Home:
    """One user: a home, a cache (the store and the index) and a work folder of their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.cache = root / "cache"
        self.work = root / "work"
        for folder in (self.home, self.cache, self.work):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.cache),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "link_kernel.cli", *args],
            cwd=self.work, env=self.env, capture_output=True, text=True, timeout=120,
        )

    def run(self, path: Path, cells: list[int] | None = None) -> nbformat.NotebookNode:
        """Run the notebook's cells (all, or the given indexes) in one fresh Link kernel."""
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, kernel_name="link", timeout=120, resources={"metadata": {"path": str(self.work)}}
        )
        env = {**self.env, "JPY_SESSION_NAME": str(path)}
        with client.setup_kernel(env=env, cwd=str(self.work)):
            for index in range(len(nb.cells)) if cells is None else cells:
                client.execute_cell(nb.cells[index], index)
        return nb

    def ran(self) -> list[str]:
        return take_log(self.work / "ran.log")

    def files(self) -> dict[str, bytes | None]:
        """Every path of the cache folder (store, index, lock), with a file's bytes."""
        return {
            str(p.relative_to(self.cache)): p.read_bytes() if p.is_file() else None
            for p in sorted(self.cache.rglob("*"))
        }


def write_notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "link", "display_name": "Link", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def shown(cell) -> tuple[str, list[str]]:
    """(the cell's own output text, the router's pipeline lines without their timings)."""
    text, lines = "", []
    for output in cell.outputs:
        if output.output_type == "stream":
            text += output.text
        elif output.output_type == "display_data" and "pipeline" in output.metadata.get("link", {}):
            lines.append(re.sub(r" (in|saved) [0-9.]+ m?s$", "", output.data["text/plain"]))
        elif output.output_type in ("display_data", "execute_result"):
            text += output.data.get("text/plain", "")
    return text, lines


def component_outputs(nb) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for cell in nb.cells:
        match = re.search(r"name=(\w+)", cell.source.split("\n", 1)[0])
        if match:
            out[match[1]] = shown(cell)
    return out


# -- the pipeline as JSON --------------------------------------------------------------


def test_a_pipeline_exported_and_imported_into_a_new_notebook_runs_the_same(tmp_path):
    user = Home(tmp_path / "ana")
    original = write_notebook(user.work / "original.ipynb", CELLS[1:])  # components only
    done = user.cli("pipeline", "export", str(original), "-o", "pipeline.json")
    assert done.returncode == 0, done.stderr
    data = json.loads((user.work / "pipeline.json").read_text())
    assert data["format"] == "link-pipeline" and data["version"] == 1
    assert [c["name"] for c in data["components"]] == NAMES
    assert data["components"][1]["target"] == "local"
    assert data["components"][1]["options"] == {"timeout": "60"}

    other = Home(tmp_path / "ben")
    (other.work / "pipeline.json").write_bytes((user.work / "pipeline.json").read_bytes())
    copy = other.work / "copy.ipynb"
    done = other.cli("pipeline", "import", "pipeline.json", str(copy))
    assert done.returncode == 0, done.stderr
    imported = nbformat.read(copy, as_version=4)
    nbformat.validate(imported)
    assert imported.nbformat_minor == 5 and imported.metadata.kernelspec.name == "link"
    assert [c.source for c in imported.cells] == [
        "# link: name=load\n" + CELLS[1].split("\n", 1)[1],
        "# link: local name=clean after=load timeout=60\n" + CELLS[2].split("\n", 1)[1],
        "# link: name=report after=clean\n" + CELLS[3].split("\n", 1)[1],
    ]

    first = component_outputs(user.run(original))
    assert user.ran() == NAMES
    second = component_outputs(other.run(copy))
    assert other.ran() == NAMES
    assert first == second
    assert first["report"] == ("report 135\n", ["[link] load: from cache,", "[link] clean: from cache,"]), first
    assert first["load"][0] == "loading\n" and first["clean"][0].endswith("clean 10\n")


# -- the cache as an archive -----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One user ran the notebook and exported the leaf's cache: (that user, archive)."""
    user = Home(tmp_path_factory.mktemp("ana"))
    path = write_notebook(user.work / "shared.ipynb", CELLS)
    user.run(path)
    assert user.ran() == NAMES
    done = user.cli("cache", "export", str(path), "report", "-o", "cache.tar.gz")
    assert done.returncode == 0, done.stderr
    assert "3 cache entries (clean, load, report)" in done.stdout, done.stdout
    return user, user.work / "cache.tar.gz"


def test_cache_export_of_an_unknown_component_is_one_error(exported):
    user, _ = exported
    done = user.cli("cache", "export", "shared.ipynb", "reprot", "-o", "x.tar.gz")
    assert done.returncode == 2
    assert "unknown component 'reprot'; known components: report" in done.stderr, done.stderr
    assert not (user.work / "x.tar.gz").exists()


def test_the_archive_holds_the_manifest_first_then_the_blobs(exported):
    _, archive = exported
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        manifest = json.load(tar.extractfile(members[0]))
    assert members[0].name == "manifest.json"
    assert sorted(m.name for m in members[1:]) == sorted(f"blobs/{b}" for b in manifest["blobs"])
    assert {e["record"]["component"] for e in manifest["entries"]} == set(NAMES)
    assert manifest["exporter"]["user"] and manifest["exporter"]["host"]
    assert all(set(b) == {"sha256", "size"} for b in manifest["blobs"].values())


def test_an_imported_cache_makes_the_leaf_run_with_no_parent_running(exported, tmp_path):
    user, archive = exported
    other = Home(tmp_path / "ben")
    notebook = other.work / "shared.ipynb"
    notebook.write_bytes((user.work / "shared.ipynb").read_bytes())
    done = other.cli("cache", "import", str(archive))
    assert done.returncode == 0, done.stderr
    assert "runs code" in done.stderr and "import archives only from people you trust" in done.stderr
    manifest = _manifest(archive)
    made_by = f"made by {manifest['exporter']['user']} on {manifest['exporter']['host']}"
    assert made_by in done.stderr, done.stderr
    assert "Imported 3 cache entries" in done.stdout, done.stdout

    nb = other.run(notebook, [0, 3])  # the setup cell, then the leaf only
    assert other.ran() == ["report"], "load and clean came from the imported cache"
    text, lines = shown(nb.cells[3])
    assert text == "report 135\n"
    assert lines == ["[link] load: from cache,", "[link] clean: from cache,"]

    assert other.cli("cache", "import", "nothing.tar.gz").returncode == 2
    again = other.cli("cache", "import", str(archive))  # a second import overwrites nothing
    assert again.returncode == 0, again.stderr
    assert "Imported 0 cache entries" in again.stdout and "kept what you had already" in again.stdout


def _manifest(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        return json.load(tar.extractfile("manifest.json"))


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive, "r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info = _copy(info)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    for attr in ("size", "mode", "mtime", "type", "linkname", "uid", "gid", "devmajor", "devminor"):
        setattr(new, attr, getattr(info, attr))
    return new


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _manifest_member(manifest: dict) -> tuple[tarfile.TarInfo, bytes]:
    data = json.dumps(manifest).encode()
    return tarfile.TarInfo("manifest.json"), data


def _last_blob(members) -> int:
    return max(i for i, (m, _) in enumerate(members) if m.name.startswith("blobs/"))


def tampered(members, tmp_path: Path) -> Path:
    """One byte flipped inside the last blob (others come before it, all valid)."""
    i = _last_blob(members)
    info, data = members[i]
    members[i] = (info, _flip(data, len(data) // 2))
    return _write(tmp_path / "tampered.tar.gz", members)


def tampered_with_its_manifest(members, tmp_path: Path) -> Path:
    """As :func:`tampered`, and the manifest's sha256 made to match: only the id tells."""
    import hashlib

    i = _last_blob(members)
    info, data = members[i]
    data = _flip(data, len(data) // 2)
    members[i] = (info, data)
    manifest = json.loads(members[0][1])
    manifest["blobs"][info.name.split("/", 1)[1]]["sha256"] = hashlib.sha256(data).hexdigest()
    members[0] = _manifest_member(manifest)
    return _write(tmp_path / "tampered.tar.gz", members)


def escaping(members, tmp_path: Path) -> Path:
    members.insert(1, (tarfile.TarInfo("../x"), b"escaped\n"))
    return _write(tmp_path / "escaping.tar.gz", members)


def symlinked(members, tmp_path: Path) -> Path:
    i = _last_blob(members)
    link = tarfile.TarInfo(members[i][0].name)
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    members[i] = (link, None)
    return _write(tmp_path / "symlink.tar.gz", members)


def hardlinked(members, tmp_path: Path) -> Path:
    i = _last_blob(members)
    link = tarfile.TarInfo(members[i][0].name)
    link.type = tarfile.LNKTYPE
    link.linkname = members[1][0].name
    members[i] = (link, None)
    return _write(tmp_path / "hardlink.tar.gz", members)


def device(members, tmp_path: Path) -> Path:
    i = _last_blob(members)
    dev = tarfile.TarInfo(members[i][0].name)
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    members[i] = (dev, None)
    return _write(tmp_path / "device.tar.gz", members)


def missing_blob(members, tmp_path: Path) -> Path:
    del members[_last_blob(members)]
    return _write(tmp_path / "missing.tar.gz", members)


def extra_member(members, tmp_path: Path) -> Path:
    members.append((tarfile.TarInfo("blobs/sha256-" + "0" * 64), b"extra"))
    return _write(tmp_path / "extra.tar.gz", members)


def manifest_not_first(members, tmp_path: Path) -> Path:
    members.append(members.pop(0))
    return _write(tmp_path / "late.tar.gz", members)


def newer_version(members, tmp_path: Path) -> Path:
    manifest = json.loads(members[0][1])
    manifest["version"] = 2
    members[0] = _manifest_member(manifest)
    return _write(tmp_path / "newer.tar.gz", members)


def truncated(members, tmp_path: Path) -> Path:
    path = _write(tmp_path / "whole.tar.gz", members)
    cut = tmp_path / "truncated.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return cut


def _last_name(members) -> str:
    return members[_last_blob(members)][0].name


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (tampered, lambda m: f"{_last_name(m)}: its bytes do not match the manifest's sha256"),
        (tampered_with_its_manifest, lambda m: f"{_last_name(m)}: its bytes do not hash to its id"),
        (escaping, lambda m: "../x: a path that would leave the store"),
        (symlinked, lambda m: f"{_last_name(m)}: a link (to '/etc/passwd')"),
        (hardlinked, lambda m: f"{_last_name(m)}: a link"),
        (device, lambda m: f"{_last_name(m)}: not a regular file"),
        (missing_blob, lambda m: f"{_last_name(m)} is missing"),
        (extra_member, lambda m: "blobs/sha256-" + "0" * 64 + ": a member the manifest does not list"),
        (manifest_not_first, lambda m: "the archive must start with manifest.json"),
        (newer_version, lambda m: "version 2; this link-kernel reads version 1 only"),
        (truncated, lambda m: "is damaged or no .tar.gz"),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_a_damaged_or_unsafe_archive_is_refused_whole_and_the_store_is_unchanged(
    exported, tmp_path, damage, says
):
    _, archive = exported
    members = _members(archive)
    other = Home(tmp_path / "ben")
    _seed(other)
    bad = damage(list(members), tmp_path)
    before = other.files()
    done = other.cli("cache", "import", str(bad))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "ArchiveError" in done.stderr and says(members) in done.stderr, done.stderr
    assert other.files() == before, "the store and the index are byte for byte as they were"
    assert not (tmp_path / "x").exists() and not (other.root / "x").exists()


def _seed(home: Home) -> None:
    """A store that is not empty: one blob of the user's own and an index naming it."""
    from link_kernel.agent import write_blob

    store = home.cache / "link-kernel" / "blobs"
    blob_id, _ = write_blob(str(store), {"mine": list(range(5))}, "sha256")
    index = {"format": 1, "entries": {"f" * 64: {"component": "mine", "outputs": {"x": blob_id}}}}
    (store.parent / "pipeline-cache.json").write_text(json.dumps(index))


def test_an_import_never_overwrites_a_file_of_the_store(exported, tmp_path):
    _, archive = exported
    other = Home(tmp_path / "ben")
    store = other.cache / "link-kernel" / "blobs"
    store.mkdir(parents=True)
    first = sorted(_manifest(archive)["blobs"])[0]
    (store / first).write_bytes(b"my own bytes")
    done = other.cli("cache", "import", str(archive))
    assert done.returncode == 0, done.stderr
    assert (store / first).read_bytes() == b"my own bytes"
    kept = done.stdout.split("kept what you had already")[1]
    assert "1 blob(s)" in kept and "1 blob(s) of your store differ from the archive's" in kept, done.stdout
    users = [e["record"]["component"] for e in _manifest(archive)["entries"] if first in e["record"]["outputs"].values()]
    assert f"Imported {3 - len(users)} cache entr" in done.stdout, "the entries of the differing blob are left out"
