"""The pipeline's cache: each component's cached results, by cache key, on disk.

An entry is an index record: the component's name, its key (:mod:`.graph`), the blob id
of each value it bound, the modules it bound and the names it deleted (what the local
kernel's agent needs to restore it: ``agent.apply``), their size, where and how long
it ran, when it was created and last used, and how many times it was restored.

The values themselves are blobs of the store the variable sync already uses
(``link_kernel.sync.variables.default_store()``; the format is the agent's): an output
that is already a blob costs nothing more, one that travelled inline (a small value) is
written as a blob file here. Two entries (or an entry and a variable) with equal values
share one file.

The index is one JSON file beside the store (``pipeline-cache.json`` in the store's
parent directory), read on every call and written atomically under a lock, so it
survives restarts and two kernels of one user can share it. A damaged index is set
aside (``.damaged``) and the cache starts empty: a cache miss, never a failure.

The cache stays under a byte limit: least recently used entries go first. A dropped
entry's blobs are deleted unless another entry holds them or the variable sync used
them after the entry was last used (then the store's own trimming decides). An entry
whose blob is gone (the store trims itself too) is no entry: a miss.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..agent import UNCHECKED, store_parts
from .units import format_age, format_size

log = logging.getLogger(__name__)

#: The default byte limit of the cache (what its blobs may take on disk).
DEFAULT_LIMIT = 20 * 2**30
INDEX_NAME = "pipeline-cache.json"
_FORMAT = 1
#: How much later than an entry's last use a blob's mtime may be and still be the
#: entry's (file systems keep coarse times); a blob used later belongs to the store.
_SLACK = 2.0


@dataclass
class Entry:
    """One cached result (see the module docstring). Times are seconds since the epoch."""

    key: str
    component: str
    outputs: dict[str, str] = field(default_factory=dict)  # name -> blob id
    modules: dict[str, str] = field(default_factory=dict)  # name -> module name
    deleted: list[str] = field(default_factory=list)
    size: int = 0
    seconds: float = 0.0  # how long the run took
    target: str = ""  # where it ran
    created: float = 0.0
    used: float = 0.0
    hits: int = 0

    @classmethod
    def from_record(cls, key: str, record: Mapping[str, Any]) -> Entry:
        return cls(key=key, **{k: v for k, v in record.items() if k in _FIELDS})

    def record(self) -> dict[str, Any]:
        record = asdict(self)
        del record["key"]
        return record


_FIELDS = {name for name in Entry.__dataclass_fields__ if name != "key"}


class Cache:
    """The cached results of pipeline components, over the blob store ``store``.

    ``limit`` is the byte limit (see :data:`DEFAULT_LIMIT`); ``clock`` gives the time,
    for tests.
    """

    def __init__(
        self,
        store: Path | str,
        limit: int = DEFAULT_LIMIT,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 0:
            msg = f"a cache limit of {limit} bytes: give a size of at least 0"
            raise ValueError(msg)
        self.store = Path(store)
        self.limit = limit
        self.clock = clock
        self.index = self.store.parent / INDEX_NAME

    # -- lookups ---------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has an entry whose every blob is still in the store."""
        return isinstance(key, str) and self.get(key) is not None

    def get(self, key: str) -> Entry | None:
        """The valid entry of ``key``, or None; a hit is counted only by :meth:`hit`."""
        with self._records() as records:
            record = records.get(key)
            if record is None:
                return None
            entry = Entry.from_record(key, record)
            if not self._whole(entry):
                log.info("pipeline cache: %s lost a blob; dropped", entry.component)
                del records[key]
                return None
            return entry

    def hit(self, key: str) -> Entry | None:
        """The valid entry of ``key``, now counted as used (for restoring it), or None."""
        with self._records() as records:
            record = records.get(key)
            if record is None:
                return None
            entry = Entry.from_record(key, record)
            if not self._whole(entry):
                del records[key]
                return None
            entry.used = self.clock()
            entry.hits += 1
            self._touch(entry)
            records[key] = entry.record()
            return entry

    def entries(self, component: str | None = None) -> list[Entry]:
        """Every entry (or ``component``'s), most recently used first."""
        with self._records(write=False) as records:
            entries = [Entry.from_record(k, r) for k, r in records.items()]
        if component is not None:
            entries = [e for e in entries if e.component == component]
        return sorted(entries, key=lambda e: (-e.used, e.component, e.key))

    @property
    def size(self) -> int:
        """The bytes the cache's blobs take (a blob two entries share counts once)."""
        with self._records(write=False) as records:
            return self._bytes(records.values())

    # -- changes -----------------------------------------------------------------------

    def put(
        self,
        key: str,
        component: str,
        values: Mapping[str, Any],
        *,
        modules: Mapping[str, str] | None = None,
        deleted: list[str] | tuple[str, ...] = (),
        seconds: float = 0.0,
        target: str = "",
    ) -> Entry | None:
        """Record the result of running ``component`` as the entry of ``key``.

        ``values`` maps each name the component bound to its manifest entry, as the
        agent reports it (a blob id, or ``{"id", "inline"}`` for a small value, written
        into the store here). Returns the entry, or None when its blobs alone are over
        the limit (nothing is kept) or one of them is missing from the store. Then
        least recently used entries are evicted down to the limit.
        """
        outputs: dict[str, str] = {}
        for name, value in values.items():
            blob_id = value["id"] if isinstance(value, Mapping) else str(value)
            if isinstance(value, Mapping) and "inline" in value:
                store_parts(str(self.store), blob_id, [base64.b64decode(value["inline"])])
            outputs[name] = blob_id
        now = self.clock()
        entry = Entry(
            key=key,
            component=component,
            outputs=outputs,
            modules=dict(modules or {}),
            deleted=list(deleted),
            seconds=float(seconds),
            target=target,
            created=now,
            used=now,
        )
        sizes = [self._blob_size(b) for b in set(outputs.values())]
        if any(s is None for s in sizes):
            log.warning("pipeline cache: a blob of %s is missing; not cached", component)
            return None
        entry.size = sum(s or 0 for s in sizes)
        if entry.size > self.limit:
            log.info("pipeline cache: %s (%d bytes) is over the limit", component, entry.size)
            return None
        with self._records() as records:
            old = records.pop(key, None)
            if old is not None:
                entry.hits = Entry.from_record(key, old).hits
            records[key] = entry.record()
            self._touch(entry)
            self._evict(records)
        return entry

    def adopt(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """Add entries made elsewhere (a cache archive), whose blobs are in the store now.

        An existing entry of a key is kept as it is, never overwritten, and so is one
        whose blob is missing from the store (it would be no entry). An adopted entry
        counts as used now, with no hits yet. Returns (the adopted, the left out).
        """
        adopted: list[Entry] = []
        left: list[Entry] = []
        with self._records() as records:
            now = self.clock()
            for entry in entries:
                if entry.key in records or not self._whole(entry):
                    left.append(entry)
                    continue
                entry = replace(entry, used=now, hits=0)
                records[entry.key] = entry.record()
                self._touch(entry)
                adopted.append(entry)
        return adopted, left

    def blob_file(self, blob_id: str) -> Path | None:
        """The file of a blob in the store (checked or not), or None if it is gone."""
        return self._blob_path(blob_id)

    def clear(self, component: str | None = None) -> list[Entry]:
        """Drop every entry (or ``component``'s); return the dropped ones."""
        with self._records() as records:
            dropped = [
                Entry.from_record(k, r)
                for k, r in records.items()
                if component is None or r.get("component") == component
            ]
            for entry in dropped:
                del records[entry.key]
            self._delete_blobs(dropped, records)
        return dropped

    def drop(self, key: str) -> Entry | None:
        """Drop the entry of ``key`` (one that would not restore); return it, or None."""
        with self._records() as records:
            record = records.pop(key, None)
            if record is None:
                return None
            entry = Entry.from_record(key, record)
            self._delete_blobs([entry], records)
            return entry

    def evict(self) -> list[Entry]:
        """Evict least recently used entries down to the limit; return the evicted ones."""
        with self._records() as records:
            return self._evict(records)

    # -- listing -----------------------------------------------------------------------

    def listing(self, component: str | None = None) -> str:
        """The entries as a text table: component, size, age, hits (``%link cache``)."""
        entries = self.entries(component)
        if not entries:
            return "the pipeline cache is empty" if component is None else (
                f"no cache entries for {component!r}"
            )
        now = self.clock()
        rows = [("component", "size", "age", "hits")] + [
            (e.component, format_size(e.size), format_age(now - e.created), str(e.hits))
            for e in entries
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
            for row in rows
        ]
        total = self._bytes(e.record() for e in entries)
        lines.append(
            f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {format_size(total)} "
            f"(limit {format_size(self.limit)})"
        )
        return "\n".join(lines)

    # -- the index file ----------------------------------------------------------------

    @contextlib.contextmanager
    def _records(self, write: bool = True) -> Iterator[dict[str, dict[str, Any]]]:
        """The index's records under the lock; written back (atomically) if changed."""
        self.index.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(f"{self.index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            records = self._load()
            before = json.dumps(records, sort_keys=True) if write else ""
            yield records
            if write and json.dumps(records, sort_keys=True) != before:
                self._save(records)
        finally:
            os.close(lock)  # closing releases the lock

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.index.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError("not a pipeline cache index")
            records = data["entries"]
            for key, record in records.items():
                Entry.from_record(key, record)
        except (ValueError, TypeError, AttributeError) as exc:
            aside = self.index.with_name(self.index.name + ".damaged")
            log.warning("pipeline cache: index %s is damaged (%s); set aside", self.index, exc)
            with contextlib.suppress(OSError):
                os.replace(self.index, aside)
            return {}
        return records

    def _save(self, records: dict[str, dict[str, Any]]) -> None:
        tmp = self.index.with_name(f"{self.index.name}.{os.getpid()}.tmp")
        text = json.dumps({"format": _FORMAT, "entries": records}, indent=1, sort_keys=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- blobs -------------------------------------------------------------------------

    def _blob_path(self, blob_id: str) -> Path | None:
        """The blob's file, checked or not (see agent.UNCHECKED); None if it is gone."""
        path = self.store / blob_id
        for candidate in (path, path.with_name(path.name + UNCHECKED)):
            if candidate.exists():
                return candidate
        return None

    def _blob_size(self, blob_id: str) -> int | None:
        path = self._blob_path(blob_id)
        try:
            return path.stat().st_size if path is not None else None
        except OSError:
            return None

    def _whole(self, entry: Entry) -> bool:
        return all(self._blob_path(b) is not None for b in entry.outputs.values())

    def _touch(self, entry: Entry) -> None:
        """Mark the entry's blobs used at ``entry.used``, for the store's own LRU trim."""
        for blob_id in set(entry.outputs.values()):
            path = self._blob_path(blob_id)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.utime(path, (entry.used, entry.used))

    def _bytes(self, records: Any) -> int:
        blobs = {b for r in records for b in r.get("outputs", {}).values()}
        return sum(self._blob_size(b) or 0 for b in blobs)

    def _evict(self, records: dict[str, dict[str, Any]]) -> list[Entry]:
        entries = sorted(
            (Entry.from_record(k, r) for k, r in records.items()), key=lambda e: (e.used, e.key)
        )
        sizes: dict[str, int] = {}
        holders: dict[str, int] = {}
        for entry in entries:
            for blob_id in set(entry.outputs.values()):
                holders[blob_id] = holders.get(blob_id, 0) + 1
                if blob_id not in sizes:
                    sizes[blob_id] = self._blob_size(blob_id) or 0
        total = sum(sizes.values())
        evicted: list[Entry] = []
        for entry in entries:
            if total <= self.limit:
                break
            evicted.append(entry)
            del records[entry.key]
            for blob_id in set(entry.outputs.values()):
                holders[blob_id] -= 1
                if not holders[blob_id]:
                    total -= sizes[blob_id]
        self._delete_blobs(evicted, records)
        return evicted

    def _delete_blobs(self, dropped: list[Entry], kept: Mapping[str, Mapping[str, Any]]) -> None:
        held = {b for r in kept.values() for b in r.get("outputs", {}).values()}
        for entry in dropped:
            for blob_id in set(entry.outputs.values()) - held:
                path = self._blob_path(blob_id)
                if path is None:
                    continue
                try:
                    if path.stat().st_mtime <= entry.used + _SLACK:
                        path.unlink()
                except OSError:
                    continue
