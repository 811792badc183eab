"""The cache archive without a kernel: a store made with the agent's own blobs, a cache
index with entries, and archives built by hand where the manifest is what is wrong.

The end-to-end refusals (a flipped byte, ``../x``, links, devices, a missing blob)
run through the command in ``test_pipeline_sharing.py``; here each rule of the
manifest is seen refusing on its own, and the store seen unchanged.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import nbformat
import pytest

from link_kernel.agent import write_blob
from link_kernel.errors import ArchiveError
from link_kernel.pipeline.archive import export_cache, import_cache
from link_kernel.pipeline.cache import Cache
from link_kernel.pipeline.graph import component_key
from link_kernel.pipeline.component import Component

CELLS = ["# link: name=load\nrows = [1, 2]", "# link: name=clean after=load\nrows = rows * 2",
         "# link: name=other\nx = 1"]


@pytest.fixture
def made(tmp_path) -> tuple[Path, dict]:
    """An archive of load and clean exported from a store of their own: (path, manifest)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in CELLS]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    cache = Cache(tmp_path / "ana" / "blobs")
    keys = {}
    for source, value in zip(CELLS, ([1, 2], [1, 2, 1, 2], 1)):
        component = Component.from_cell(source)
        keys[component.name] = component_key(component, [keys[p] for p in component.parents], {})
        blob_id, _ = write_blob(str(cache.store), value, "xxh3t")
        cache.put(keys[component.name], component.name, {"rows": blob_id}, target="local")
    report = export_cache(path, ["clean"], tmp_path / "c.tar.gz", cache)
    assert sorted(e.component for e in report.entries) == ["clean", "load"], "other is not clean's ancestor"
    with tarfile.open(tmp_path / "c.tar.gz", "r:gz") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    return tmp_path / "c.tar.gz", manifest


def rebuild(path: Path, manifest: dict, tmp_path: Path, extra: list[tuple[str, bytes]] = ()) -> Path:
    """The archive at ``path`` with ``manifest`` in place of its own, plus ``extra`` members."""
    out = tmp_path / "rebuilt.tar.gz"
    with tarfile.open(path, "r:gz") as old, tarfile.open(out, "w:gz") as new:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        new.addfile(info, io.BytesIO(data))
        for member in old.getmembers()[1:]:
            new.addfile(member, old.extractfile(member))
        for name, body in extra:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            new.addfile(info, io.BytesIO(body))
    return out


def test_an_archive_imports_into_an_empty_cache_and_the_keys_are_hits(made, tmp_path):
    path, manifest = made
    cache = Cache(tmp_path / "ben" / "blobs")
    seen = []
    report = import_cache(path, cache, on_manifest=seen.append)
    assert seen == [manifest]
    assert sorted(e.component for e in report.entries) == ["clean", "load"]
    for item in manifest["entries"]:
        assert item["key"] in cache
    assert sorted(p.name for p in cache.store.iterdir()) == sorted(manifest["blobs"])
    assert [p.name for p in cache.store.parent.iterdir() if p.name.startswith(".link-import-")] == []


def _blob(manifest: dict) -> str:
    return sorted(manifest["blobs"])[0]


def _edit(change):
    def apply(manifest: dict) -> dict:
        manifest = copy.deepcopy(manifest)
        change(manifest)
        return manifest

    return apply


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_edit(lambda m: m.update(format="zip")), 'no "format": "link-cache"'),
        (_edit(lambda m: m.update(version=0)), "version 0; this link-kernel reads version 1 only"),
        (_edit(lambda m: m.update(exporter="me")), '"exporter" must give the user and host'),
        (_edit(lambda m: m["entries"].append(copy.deepcopy(m["entries"][0]))), "appears twice"),
        (_edit(lambda m: m["entries"][0].update(key="../../etc")), "its key is not 64 hex digits"),
        (_edit(lambda m: m["entries"][0]["record"].update(component="a b")), "its component is no name"),
        (_edit(lambda m: m["entries"][0]["record"].update(outputs={"rows": 3})), "its outputs has the wrong type"),
        (_edit(lambda m: m["entries"][0]["record"].update(outputs={"rows": "sha256-" + "1" * 64})),
         "which the manifest does not list"),
        (_edit(lambda m: m["blobs"].update({"../x": m["blobs"][_blob(m)]})), "'../x' is no blob id"),
        (_edit(lambda m: m["blobs"][_blob(m)].update(size=-1)), "has no size"),
        (_edit(lambda m: m["blobs"][_blob(m)].update(size=1)), "the manifest says 1"),
        (_edit(lambda m: m["blobs"][_blob(m)].update(sha256="0" * 64)), "do not match the manifest's sha256"),
        (_edit(lambda m: m.update(entries=m["entries"][:1])), "is listed but no entry uses it"),
    ],
)
def test_a_wrong_manifest_is_refused_and_nothing_is_stored(made, tmp_path, change, says):
    path, manifest = made
    bad = rebuild(path, change(manifest), tmp_path)
    cache = Cache(tmp_path / "ben" / "blobs")
    with pytest.raises(ArchiveError) as caught:
        import_cache(bad, cache)
    assert says in caught.value.message, caught.value.message
    assert not (tmp_path / "ben").exists(), "nothing was created"


def test_a_member_twice_is_refused(made, tmp_path):
    path, manifest = made
    blob = _blob(manifest)
    with tarfile.open(path, "r:gz") as tar:
        body = tar.extractfile(f"blobs/{blob}").read()
    bad = rebuild(path, manifest, tmp_path, extra=[(f"blobs/{blob}", body)])
    with pytest.raises(ArchiveError, match="appears twice") as caught:
        import_cache(bad, Cache(tmp_path / "ben" / "blobs"))
    assert caught.value.member == f"blobs/{blob}"


@pytest.mark.parametrize("content", [b"", b"not gzip at all", b"\x1f\x8b\x08\x00garbage"])
def test_what_is_no_archive_is_refused(tmp_path, content):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(content)
    with pytest.raises(ArchiveError):
        import_cache(path, Cache(tmp_path / "ben" / "blobs"))
    assert not (tmp_path / "ben").exists()


def test_export_leaves_out_an_entry_whose_blob_no_longer_matches_its_id(made, tmp_path):
    _, manifest = made
    cache = Cache(tmp_path / "ana" / "blobs")
    clean = next(e for e in manifest["entries"] if e["record"]["component"] == "clean")
    blob = cache.store / clean["record"]["outputs"]["rows"]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    report = export_cache(tmp_path / "nb.ipynb", [], tmp_path / "again.tar.gz", cache)
    assert sorted(e.component for e in report.entries) == ["load", "other"]
    with tarfile.open(tmp_path / "again.tar.gz", "r:gz") as tar:
        assert f"blobs/{blob.name}" not in tar.getnames()


@pytest.mark.parametrize("links", ["never", "only_within_the_store"])
def test_blobs_are_placed_without_overwriting_where_hard_links_fail(tmp_path, monkeypatch, links):
    """Staging on another file system (EXDEV), or one with no hard links at all."""
    import errno
    import os

    from link_kernel.pipeline import archive

    real_link = os.link

    def link(src, dst):
        if links == "never" or Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst)

    monkeypatch.setattr(archive.os, "link", link)
    staged = tmp_path / "stage" / "blob"
    staged.parent.mkdir()
    staged.write_bytes(b"theirs")
    store = tmp_path / "store"
    store.mkdir()
    assert archive._place(staged, store / "new") is True
    assert (store / "new").read_bytes() == b"theirs"
    (store / "mine").write_bytes(b"mine")
    assert archive._place(staged, store / "mine") is False
    assert (store / "mine").read_bytes() == b"mine"
    assert sorted(p.name for p in store.iterdir()) == ["mine", "new"], "no temporary file left"
