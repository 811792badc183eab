"""Cache entries as a ``.tar.gz``: ``link-kernel cache export`` and ``cache import``.

The archive's first member is ``manifest.json``; then each blob, ``blobs/<id>``::

    {"format": "link-cache", "version": 1, "created": 1764829200.0,
     "exporter": {"user": "ana", "host": "ws12"}, "notebook": "train.ipynb",
     "components": ["load", "train"],
     "entries": [{"key": "<64 hex>", "record": {<the cache index record>}}],
     "blobs": {"<id>": {"sha256": "<64 hex>", "size": 1234}}}

**Which entries.** Every entry of the named components and of their ancestors (all
components when none are named), by component name. The notebook alone does not say
which key its next run will ask for (a key also hashes the values a component reads
from the notebook, which only the kernel has), so every entry goes and the receiving
kernel takes the one whose key it computes: the leaf's parents are hits there.

**Import refuses the archive whole** unless every member checks out, and names the first
that does not: the manifest must come first and be well formed; every other member must
be a regular file named ``blobs/<id>`` for an id the manifest lists (no link, device,
folder, absolute path or ``..``), once; each blob must have the manifest's size and
SHA-256 and hash to its own id (a blob id is its content hash, ``ALGO-DIGEST``, see
:mod:`link_kernel.agent`); no listed blob may be missing. The archive is read as a
stream into a staging folder; only when all of it is verified are the blobs placed in
the store (never over an existing file: a blob already there is kept) and the entries
added to the cache index under its lock (:meth:`Cache.adopt
<link_kernel.pipeline.cache.Cache.adopt>`; an existing key is kept). A refusal leaves
the store and the index as they were.

Loading a cached result unpickles it, which runs code: the import command says so, and
says who made the archive, where and when (from the manifest).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import io
import json
import mmap
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..agent import blob_matches, has_blob
from ..errors import ArchiveError, ShareError
from .cache import Cache, Entry
from .exchange import read_saved
from .units import format_size

FORMAT = "link-cache"
VERSION = 1
MANIFEST = "manifest.json"
#: A manifest bigger than this is no manifest (it lists entries, not data).
MANIFEST_MAX = 64 * 2**20
_CHUNK = 1 << 20
_BLOB_ID = re.compile(r"(sha256|xxh3t|xxh3)-[0-9a-f]{32,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Report:
    """What an export or an import did, for the command to print."""

    action: str
    path: str
    entries: list[Entry] = field(default_factory=list)
    blobs: int = 0
    size: int = 0
    kept_entries: int = 0
    kept_blobs: int = 0
    #: Blobs of the store whose bytes differ from the archive's (kept; their entries left out).
    differing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        names = sorted({e.component for e in self.entries})
        text = (
            f"{self.action} {len(self.entries)} cache entr{'y' if len(self.entries) == 1 else 'ies'}"
            f" ({', '.join(names) or 'none'}), {self.blobs} blob(s), {format_size(self.size)}"
            f" {'to' if self.action == 'Exported' else 'from'} {self.path}"
        )
        if self.kept_entries or self.kept_blobs:
            text += (
                f"; kept what you had already: {self.kept_entries} entr"
                f"{'y' if self.kept_entries == 1 else 'ies'}, {self.kept_blobs} blob(s)"
            )
        if self.differing:
            text += (
                f"\n{len(self.differing)} blob(s) of your store differ from the archive's "
                f"(damaged?), e.g. {self.differing[0]}; they were kept and the entries that "
                "use them left out: delete those files and import again to take them"
            )
        return text


# -- export ----------------------------------------------------------------------------


def export_cache(
    notebook: str | Path, names: list[str], output: str | Path, cache: Cache
) -> Report:
    """Pack the cache entries of ``names`` (all when empty) and their ancestors.

    Raises PipelineError for an unknown name or a broken pipeline, ShareError when there
    is nothing to export. A blob of the store that no longer matches its id is left
    out, with the entries that need it.
    """
    graph = read_saved(notebook).graph()
    selected = graph.order(names or None)
    blobs: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    bad: set[str] = set()
    entries: list[Entry] = []
    chosen = [e for e in cache.entries() if e.component in selected]
    for entry in sorted(chosen, key=lambda e: (selected.index(e.component), e.created, e.key)):
        for blob_id in sorted(set(entry.outputs.values()) - set(blobs) - bad):
            found = _describe(cache, blob_id)
            if found is None:
                bad.add(blob_id)
            else:
                files[blob_id], blobs[blob_id] = found
        if not set(entry.outputs.values()) & bad:
            entries.append(entry)
    used = {b for e in entries for b in e.outputs.values()}
    blobs = {b: blobs[b] for b in sorted(used)}
    if not entries:
        msg = f"no cache entries of {', '.join(selected)} to export"
        raise ShareError(msg, hint="Run the components in the notebook first, then export.")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.time(),
        "exporter": {"user": _user(), "host": socket.gethostname()},
        "notebook": Path(notebook).name,
        "components": [c for c in selected if any(e.component == c for e in entries)],
        "entries": [{"key": e.key, "record": e.record()} for e in entries],
        "blobs": blobs,
    }
    _write_archive(Path(output), manifest, files)
    return Report("Exported", str(output), entries, len(blobs), sum(b["size"] for b in blobs.values()))


def _describe(cache: Cache, blob_id: str) -> tuple[Path, dict[str, Any]] | None:
    """(the blob's file, its manifest record), or None if it is gone or damaged."""
    path = cache.blob_file(blob_id)
    if path is None or not _BLOB_ID.fullmatch(blob_id):
        return None
    if not _matches(path, blob_id):
        return None
    return path, {"sha256": _sha256(path), "size": path.stat().st_size}


def _write_archive(output: Path, manifest: dict[str, Any], files: dict[str, Path]) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as exc:
        msg = f"cannot write {output}: {exc.strerror}"
        raise ShareError(msg, hint="Give a path in a folder you can write to.") from exc
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            tar.addfile(_info(MANIFEST, len(data)), io.BytesIO(data))
            for blob_id, record in manifest["blobs"].items():
                with open(files[blob_id], "rb") as f:
                    tar.addfile(_info(f"blobs/{blob_id}", record["size"]), f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(time.time())
    return info


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- import ----------------------------------------------------------------------------


def warning(manifest: dict[str, Any]) -> str:
    """What the import command says before it stores anything."""
    exporter = manifest.get("exporter", {})
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.get("created", 0)))
    return (
        "Loading cached results unpickles them, which runs code: import archives only "
        "from people you trust.\n"
        f"This archive was made by {exporter.get('user', '?')} on {exporter.get('host', '?')}"
        f" at {when}, from the notebook {manifest.get('notebook', '?')}."
    )


def import_cache(
    path: str | Path,
    cache: Cache,
    *,
    on_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> Report:
    """Verify the archive at ``path`` whole, then add its blobs and entries to ``cache``.

    ``on_manifest`` is called with the manifest once it is read (the command prints who
    made the archive). Raises ArchiveError, naming the first bad member, and then has
    changed nothing.
    """
    store = cache.store
    stage_in = store.parent if store.parent.is_dir() else None  # one file system: links
    with tempfile.TemporaryDirectory(dir=stage_in, prefix=".link-import-") as stage:
        manifest = _read_archive(Path(path), Path(stage), on_manifest)
        return _adopt(manifest, Path(stage), cache, str(path))


def _read_archive(
    path: Path, stage: Path, on_manifest: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    """The manifest, after every blob was verified and staged as ``stage/<id>``."""
    if not path.is_file():
        msg = f"no archive at {path}"
        raise ArchiveError(msg, hint="Give the path of a file 'link-kernel cache export' wrote.")
    member_name = ""
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            manifest: dict[str, Any] | None = None
            seen: set[str] = set()
            for member in tar:
                member_name = member.name
                _check_member(member)
                if manifest is None:
                    manifest = _read_manifest(tar, member)
                    if on_manifest is not None:
                        on_manifest(manifest)
                    continue
                _stage_blob(tar, member, manifest, seen, stage)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        where = f" at {member_name}" if member_name else ""
        msg = f"{path} is damaged or no .tar.gz{where}: {exc}"
        raise ArchiveError(msg, member_name) from exc
    if manifest is None:
        msg = f"{path} is empty: it has no {MANIFEST}"
        raise ArchiveError(msg)
    missing = sorted(set(manifest["blobs"]) - seen)
    if missing:
        name = f"blobs/{missing[0]}"
        msg = f"{name} is missing: the manifest lists it, the archive does not hold it"
        raise ArchiveError(msg, name)
    return manifest


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts or "\\" in name:
        msg = f"{name}: a path that would leave the store; refusing the archive"
        raise ArchiveError(msg, name)
    if member.issym() or member.islnk():
        msg = f"{name}: a link (to {member.linkname!r}); refusing the archive"
        raise ArchiveError(msg, name)
    if not member.isreg() or member.issparse():
        msg = f"{name}: not a regular file (a folder, device or fifo); refusing the archive"
        raise ArchiveError(msg, name)


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    if member.name != MANIFEST:
        msg = f"{member.name}: the archive must start with {MANIFEST}; this is no Link cache archive"
        raise ArchiveError(msg, member.name)
    if member.size > MANIFEST_MAX:
        msg = f"{MANIFEST}: {member.size} bytes is too big for a manifest"
        raise ArchiveError(msg, MANIFEST)
    f = tar.extractfile(member)
    data = f.read() if f is not None else b""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        msg = f"{MANIFEST}: not valid JSON ({exc})"
        raise ArchiveError(msg, MANIFEST) from exc
    problem = _manifest_problem(manifest)
    if problem:
        raise ArchiveError(f"{MANIFEST}: {problem}", MANIFEST)
    return manifest


def _manifest_problem(manifest: Any) -> str:
    """What is wrong with a manifest, or ""."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f'no "format": "{FORMAT}"; this is no Link cache archive'
    version = manifest.get("version")
    if type(version) is not int or version != VERSION:
        return (
            f"cache archive format version {version!r}; this link-kernel reads version "
            f"{VERSION} only (export it again with the same link-kernel version)"
        )
    exporter = manifest.get("exporter")
    if not isinstance(exporter, dict) or not all(
        isinstance(exporter.get(k), str) for k in ("user", "host")
    ):
        return '"exporter" must give the user and host as strings'
    if not isinstance(manifest.get("created"), (int, float)):
        return '"created" must be a time'
    blobs = manifest.get("blobs")
    if not isinstance(blobs, dict):
        return '"blobs" must be an object'
    for blob_id, record in blobs.items():
        if not _BLOB_ID.fullmatch(blob_id):
            return f"{blob_id!r} is no blob id"
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not (
            _HEX64.fullmatch(record["sha256"])
        ):
            return f"blob {blob_id} has no sha256"
        size = record.get("size")
        if type(size) is not int or size < 0:
            return f"blob {blob_id} has no size"
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        return '"entries" must be a list'
    keys: set[str] = set()
    used: set[str] = set()
    for index, item in enumerate(entries):
        problem = _entry_problem(item, blobs)
        if problem:
            return f"entry {index + 1}: {problem}"
        if item["key"] in keys:
            return f"entry {index + 1}: the key {item['key']} appears twice"
        keys.add(item["key"])
        used |= set(item["record"]["outputs"].values())
    extra = sorted(set(blobs) - used)
    if extra:
        return f"blob {extra[0]} is listed but no entry uses it"
    return ""


def _entry_problem(item: Any, blobs: dict[str, Any]) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("record"), dict):
        return "not an object with a key and a record"
    key, record = item.get("key"), item["record"]
    if not isinstance(key, str) or not _HEX64.fullmatch(key):
        return "its key is not 64 hex digits"
    component = record.get("component")
    if not isinstance(component, str) or not component.isidentifier():
        return "its component is no name"
    checks = {
        "outputs": lambda v: isinstance(v, dict)
        and all(isinstance(k, str) and isinstance(b, str) for k, b in v.items()),
        "modules": lambda v: isinstance(v, dict)
        and all(isinstance(k, str) and isinstance(m, str) for k, m in v.items()),
        "deleted": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "size": lambda v: type(v) is int and v >= 0,
        "seconds": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "target": lambda v: isinstance(v, str),
        "created": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    for name, ok in checks.items():
        if name in record and not ok(record[name]):
            return f"its {name} has the wrong type"
    if "outputs" not in record:
        return "it has no outputs"
    for blob_id in record["outputs"].values():
        if blob_id not in blobs:
            return f"it uses the blob {blob_id}, which the manifest does not list"
    return ""


def _stage_blob(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    manifest: dict[str, Any],
    seen: set[str],
    stage: Path,
) -> None:
    """Copy one blob member into ``stage``, verified against the manifest and its id."""
    name = member.name
    folder, _, blob_id = name.partition("/")
    record = manifest["blobs"].get(blob_id) if folder == "blobs" else None
    if record is None:
        msg = f"{name}: a member the manifest does not list; refusing the archive"
        raise ArchiveError(msg, name)
    if blob_id in seen:
        msg = f"{name}: appears twice in the archive"
        raise ArchiveError(msg, name)
    seen.add(blob_id)
    if member.size != record["size"]:
        msg = f"{name}: {member.size} bytes, the manifest says {record['size']}"
        raise ArchiveError(msg, name)
    source = tar.extractfile(member)
    target = stage / blob_id
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        while source is not None:
            chunk = source.read(_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
            f.write(chunk)
    if size != record["size"] or digest.hexdigest() != record["sha256"]:
        msg = f"{name}: its bytes do not match the manifest's sha256 (damaged or tampered with)"
        raise ArchiveError(msg, name)
    if not _matches(target, blob_id):
        msg = f"{name}: its bytes do not hash to its id (damaged or tampered with)"
        raise ArchiveError(msg, name)


def _matches(path: Path, blob_id: str) -> bool:
    """Whether the file's content hash is the one its blob id names."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return blob_matches(blob_id, b"")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return blob_matches(blob_id, view)
            except ValueError:
                return False
            finally:
                view.release()


def _adopt(manifest: dict[str, Any], stage: Path, cache: Cache, path: str) -> Report:
    """Place the verified blobs in the store (never over a file) and adopt the entries."""
    store = cache.store
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = Report("Imported", path)
    for blob_id, record in manifest["blobs"].items():
        if has_blob(str(store), blob_id) or not _place(stage / blob_id, store / blob_id):
            report.kept_blobs += 1
            mine = cache.blob_file(blob_id)
            if mine is None or _sha256(mine) != record["sha256"]:
                report.differing.append(blob_id)
        else:
            report.blobs += 1
            report.size += record["size"]
    entries = [Entry.from_record(item["key"], item["record"]) for item in manifest["entries"]]
    usable = [e for e in entries if not set(e.outputs.values()) & set(report.differing)]
    adopted, kept = cache.adopt(usable)
    report.entries = adopted
    report.kept_entries = len(kept) + len(entries) - len(usable)
    return report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place(staged: Path, dest: Path) -> bool:
    """Put ``staged`` at ``dest`` unless a file is there; whether it was put."""
    try:
        os.link(staged, dest)  # fails rather than overwrite
        return True
    except FileExistsError:
        return False
    except OSError:
        pass  # another file system, or no hard links there
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(staged, tmp)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        except OSError:
            if dest.exists():
                return False
            os.replace(tmp, dest)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
