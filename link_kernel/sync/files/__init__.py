"""Files: two-way sync of the notebook's working directory with a host's work directory.

Before a remote cell the router **pushes** what changed locally; after it, it
**pulls** what the cell created, changed or deleted. Both are three-way merges
against a *base*, the state each side had at the last sync (per host, persisted
as JSON), so that an update is told from a deletion and from a conflict::

    local now ─── Journal (watchdog) or scan_tree ──┐
                                                    ├── base: what each side had ──▶ plan
    host now ──── scan_tree, run on the host ───────┘        at the last sync
                                                               │
                                  copies through fsspec ◀──────┘
                                  (SFTP, or local for the process host)

- Local changes come from a :class:`Journal`, so a sync with nothing to do walks
  nothing. The first sync, and any sync after the journal lost track, is a full
  comparison (:func:`scan_tree`).
- Host changes come from :func:`scan_tree` run *on the host* (it is sent there as
  :data:`SCAN_SOURCE`), never from a walk over SFTP.
- A file changed on both sides keeps the local version; the host's is saved
  beside it as ``NAME.from-HOST.EXT`` and reported. A deletion propagates unless
  the other side changed the file. Nothing is overwritten that is not known to
  be the version the other side last saw.
- Every file is written under a temporary name beside its target and renamed into
  place, so an interrupted transfer leaves no partial file, and the base records
  only what arrived.

A *signature* describes one file: ``[size, mtime_ns, mode, "f"]`` for a regular
file and ``[0, mtime_ns, mode, "l", target]`` for a symlink. Paths are relative to
the root and '/'-separated on both sides.

Change is judged by content
---------------------------

A file changed on either side reaches the other before the next cell, however
small the change and however soon after the last sync. Size and mtime cannot
promise that alone: a rewrite of the same size lands in the same mtime when the
file system keeps coarse times (a jiffy on Linux, whole seconds on ext3 and
HFS+ and through SFTP's utime, two on FAT), and two files with the same size and
second need not hold the same bytes. So:

- The base records, beside each side's signature, the **content hash** (sha256)
  of what was synced, computed while the bytes go through (no second read).
- The journal (or a full scan) says **where to look**: a path it does not name
  and whose signature matches the base is taken as unchanged without reading it.
  That is safe only for a signature recorded long enough after its mtime: a
  state recorded less than :data:`RACY_NS` after the file's mtime (or before it)
  is **racy**, since a later write in the same granule would leave it as is
  (git's "racily clean" index entries). Racy paths are re-checked at every
  push whatever the journal says, by hash, until a check finds them old enough;
  a file not written for two seconds is never read again until it changes.
- The same holds on the host: the router names the host's racy files in the
  cell's scan request and the host's scan adds their hash
  (:func:`hash_racy`), so a same-size rewrite by the cell comes back.
- Where both sides changed (or the base does not know a path), they are equal
  only if their bytes are: both are hashed (the host's read through the
  filesystem) unless kind or size already differ; else it is a conflict.
- The journal proves it has seen every earlier event with a barrier event of
  its own; when it cannot make one, the push compares everything.

The hot path is unchanged: a sync with nothing to do and nothing racy reads no
file and starts no worker.

The package, one concept a module (each imports only those above it):

- ``signatures``: signatures, the content hash, the racy window, path helpers;
- ``scan``: :func:`scan_tree` and :func:`hash_racy` (shipped to hosts), conflict names;
- ``ignore``: the default exclusions, ``.linkignore``, :func:`too_big`;
- ``journal``: the watchdog :class:`Journal`;
- ``report``: :class:`SyncReport`;
- ``transfers``: local files that count and hash, the host's side through fsspec;
- ``base``: the base, a plan, one operation's run;
- ``bundle``: many small files to the host in one stream, unpacked there by ``unpack``;
- ``sync``: :class:`FileSync`, the three-way plans and what carries them out.
"""

from __future__ import annotations

from .ignore import DEFAULT_EXCLUDES, LINKIGNORE, Ignore, too_big
from .journal import Journal
from .report import SyncReport
from .scan import SCAN_SOURCE, conflict_name, hash_racy, scan_tree
from .signatures import HASH, PART_PREFIX, RACY_NS, Sig
from .sync import FileSync

__all__ = [
    "DEFAULT_EXCLUDES",
    "HASH",
    "LINKIGNORE",
    "PART_PREFIX",
    "RACY_NS",
    "SCAN_SOURCE",
    "FileSync",
    "Ignore",
    "Journal",
    "Sig",
    "SyncReport",
    "conflict_name",
    "hash_racy",
    "scan_tree",
    "too_big",
]
