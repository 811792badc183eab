"""The kernelspec's source is the repository's kernelspecs/link/ folder, in a checkout and in a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from link_kernel import kernelspec
from link_kernel.errors import KernelSpecSourceError

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "kernelspecs" / "link"


def folder_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(FOLDER.iterdir()) if p.is_file()}


def test_the_folder_holds_kernel_json_and_the_logos():
    assert set(folder_files()) == {"kernel.json", "logo-32x32.png", "logo-64x64.png", "logo-svg.svg"}
    spec = json.loads((FOLDER / "kernel.json").read_text())
    assert spec["argv"][1:] == ["-m", "link_kernel", "-f", "{connection_file}"]
    assert spec["display_name"] == "Link (hybrid)"


def test_install_writes_the_folder_with_the_installing_python(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "link_kernel.cli", "install", "--prefix", str(tmp_path)],
        check=True, capture_output=True, text=True,
    ).stdout
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "link"
    assert str(spec_dir) in out
    installed = {p.name: p.read_bytes() for p in spec_dir.iterdir()}
    source = folder_files()
    assert set(installed) == set(source)
    assert all(installed[name] == data for name, data in source.items() if name != "kernel.json")
    spec = json.loads(installed["kernel.json"])
    want = json.loads(source["kernel.json"])
    assert spec["argv"] == [sys.executable, *want["argv"][1:]]
    assert {k: v for k, v in spec.items() if k != "argv"} == {k: v for k, v in want.items() if k != "argv"}


def test_a_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kernelspec, "SOURCE", tmp_path / "nowhere")
    with pytest.raises(KernelSpecSourceError, match="nowhere"):
        kernelspec.write_kernel_spec(tmp_path / "out")


def test_the_wheel_ships_the_folder(tmp_path):
    """Built from the files git knows (as in a fresh clone), without build isolation."""
    tree = tmp_path / "tree"
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, target = REPO / name, tree / name
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the work tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(tree)],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("link_kernel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {
            name.rsplit("/", 1)[1]: zf.read(name)
            for name in zf.namelist()
            if name.startswith("link_kernel/kernelspecs/link/")
        }
    assert shipped == folder_files()
