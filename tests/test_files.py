"""The file sync engine, between two real directories: the 'host' is reached through
fsspec's LocalFileSystem, as the process transport does."""

from __future__ import annotations

import ast
import asyncio
import errno
import itertools
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from link_kernel.errors import TransferError
from link_kernel.sync.files import (
    DEFAULT_EXCLUDES,
    PART_PREFIX,
    SCAN_SOURCE,
    FileSync,
    Ignore,
    Journal,
    SyncReport,
    conflict_name,
    hash_racy,
    scan_tree,
    too_big,
)

OLD = 1_600_000_000_123_456_789  # an mtime (ns) no test writes by accident


def write(path: Path, data: str | bytes, *, mode: int | None = None, mtime: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    if mtime is not None:
        os.utime(path, ns=(mtime, mtime))
    return path


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under root (nothing excluded), by relative path."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def parts(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"{PART_PREFIX}*")]


class Pair:
    """A local directory synced with a 'host' directory."""

    def __init__(self, tmp: Path, *, fs: LocalFileSystem | None = None, journal: bool = False, **kw) -> None:
        self.local = tmp / "local"
        self.remote = tmp / "host"
        self.local.mkdir(exist_ok=True)
        self.remote.mkdir(exist_ok=True)
        self.state = tmp / "state" / "gpu.json"
        self.fs = fs or LocalFileSystem()
        self.journal = Journal(str(self.local), Ignore(str(self.local))) if journal else None
        if self.journal is not None:
            self.journal.start()
        self.sync = FileSync(str(self.local), "gpu", self.state, journal=self.journal, **kw)

    def scan(self) -> dict[str, list]:
        return scan_tree(str(self.remote), self.sync.ignore.prune_dirs())

    def push(self, *, known: bool = True, fs: LocalFileSystem | None = None) -> SyncReport:
        now = self.scan() if known else None
        return asyncio.run(self.sync.push(fs or self.fs, str(self.remote), now))

    def pull(self, *, fs: LocalFileSystem | None = None) -> SyncReport:
        return asyncio.run(self.sync.pull(fs or self.fs, str(self.remote), self.scan()))

    def both(self) -> SyncReport:
        return asyncio.run(self.sync.sync(self.fs, str(self.remote), self.scan()))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.stop()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


@pytest.fixture
def watched(tmp_path):
    p = Pair(tmp_path, journal=True)
    yield p
    p.close()


# -- moving files ----------------------------------------------------------------------


def test_a_file_written_on_the_host_appears_locally(pair):
    pair.both()
    write(pair.remote / "ckpt" / "model.bin", os.urandom(100_000), mode=0o640, mtime=OLD)
    write(pair.remote / "run.sh", "#!/bin/sh\n", mode=0o755, mtime=OLD + 10**9)

    report = pair.pull()

    assert sorted(report.downloaded) == ["ckpt/model.bin", "run.sh"]
    assert report.bytes == 100_000 + 10
    assert files(pair.local) == files(pair.remote)
    for name, mode in (("ckpt/model.bin", 0o640), ("run.sh", 0o755)):
        here, there = os.stat(pair.local / name), os.stat(pair.remote / name)
        assert here.st_mode & 0o7777 == mode
        assert here.st_mtime_ns == there.st_mtime_ns
    assert parts(pair.local) == []
    assert not pair.pull().changed  # the base knows them now


@pytest.mark.parametrize("known", [True, False], ids=["host-scanned", "host-unknown"])
def test_a_local_edit_is_pushed(pair, known):
    write(pair.local / "data.csv", "a,b\n1,2\n", mode=0o600, mtime=OLD)
    assert pair.push(known=known).uploaded == ["data.csv"]
    write(pair.local / "data.csv", "a,b\n1,2\n3,4\n")

    report = pair.push(known=known)

    assert report.uploaded == ["data.csv"]
    assert (pair.remote / "data.csv").read_text() == "a,b\n1,2\n3,4\n"
    here, there = os.stat(pair.local / "data.csv"), os.stat(pair.remote / "data.csv")
    assert (there.st_mode & 0o7777, there.st_mtime_ns) == (0o600, here.st_mtime_ns)
    assert parts(pair.remote) == []
    assert not pair.push(known=known).changed
    assert not pair.pull().changed  # what was pushed is not pulled back


def test_a_conflict_keeps_both_versions(pair):
    write(pair.local / "report.csv", "v1\n", mtime=OLD)
    write(pair.local / "Makefile", "all:\n", mtime=OLD)
    pair.both()
    write(pair.local / "report.csv", "mine, longer\n")
    write(pair.remote / "report.csv", "theirs\n")
    write(pair.local / "Makefile", "all: mine\n")
    write(pair.remote / "Makefile", "all: theirs\n")

    report = pair.pull()

    assert sorted(report.conflicts) == [
        ("Makefile", "Makefile.from-gpu"),
        ("report.csv", "report.from-gpu.csv"),
    ]
    assert (pair.local / "report.csv").read_text() == "mine, longer\n"
    assert (pair.local / "report.from-gpu.csv").read_text() == "theirs\n"
    assert (pair.local / "Makefile.from-gpu").read_text() == "all: theirs\n"
    assert "report.csv changed here and on gpu: kept yours, saved gpu's as report.from-gpu.csv" in (
        report.warnings()
    )
    # The next push makes the host like here: both versions on both sides.
    pair.push()
    assert files(pair.remote) == files(pair.local)
    assert (pair.remote / "report.csv").read_text() == "mine, longer\n"

    # Another conflict on the same file never overwrites the saved copy.
    write(pair.local / "report.csv", "mine again\n")
    write(pair.remote / "report.csv", "theirs again\n")
    report = pair.push()  # a conflict seen before the cell: same rule
    assert report.conflicts == [("report.csv", "report.from-gpu-2.csv")]
    assert (pair.local / "report.from-gpu.csv").read_text() == "theirs\n"
    assert (pair.local / "report.from-gpu-2.csv").read_text() == "theirs again\n"
    assert (pair.remote / "report.csv").read_text() == "mine again\n"


def test_conflict_names():
    assert conflict_name("report.csv", "gpu") == "report.from-gpu.csv"
    assert conflict_name("Makefile", "gpu") == "Makefile.from-gpu"
    assert conflict_name("a/.bashrc", "gpu") == "a/.bashrc.from-gpu"
    assert conflict_name("x.tar.gz", "my box/2") == "x.tar.from-my_box_2.gz"
    taken = {"r.from-gpu.csv", "r.from-gpu-2.csv"}
    assert conflict_name("r.csv", "gpu", taken.__contains__) == "r.from-gpu-3.csv"
    long = "é" * 127 + ".csv"
    assert len(conflict_name(long, "gpu").encode()) <= 255


def test_a_delete_propagates_both_ways(pair):
    for name in ("a.txt", "sub/b.txt", "c.txt"):
        write(pair.local / name, name, mtime=OLD)
    pair.both()

    (pair.local / "a.txt").unlink()
    assert pair.push().deleted_remote == ["a.txt"]
    assert not (pair.remote / "a.txt").exists()

    (pair.remote / "sub" / "b.txt").unlink()
    (pair.remote / "sub").rmdir()
    assert pair.pull().deleted_local == ["sub/b.txt"]
    assert not (pair.local / "sub").exists()  # emptied by the deletion, gone there too

    # Not when the other side changed the file: the change wins.
    (pair.local / "c.txt").unlink()
    write(pair.remote / "c.txt", "changed there")
    report = pair.both()
    assert report.deleted_remote == [] and report.downloaded == ["c.txt"]
    assert (pair.local / "c.txt").read_text() == "changed there"
    write(pair.local / "c.txt", "changed here")
    (pair.remote / "c.txt").unlink()
    report = pair.both()
    assert report.deleted_local == [] and report.uploaded == ["c.txt"]
    assert (pair.remote / "c.txt").read_text() == "changed here"


def test_ignored_files_never_move(pair):
    write(pair.local / ".linkignore", "*.log\nbuild/\n/secret.txt\n")
    for name in (
        "keep.py",
        "run.log",
        "build/out.o",
        "secret.txt",
        "sub/secret.txt",  # /secret.txt is anchored
        ".git/config",
        "pkg/__pycache__/m.cpython-311.pyc",
        ".ipynb_checkpoints/nb-checkpoint.ipynb",
        "node_modules/p/index.js",
        ".venv/bin/python",
        "tools/pyvenv.cfg",  # a virtual environment under any name
        "tools/lib/site.py",
    ):
        write(pair.local / name, name)
    pair.push()
    assert sorted(files(pair.remote)) == [".linkignore", "keep.py", "sub/secret.txt"]

    for name in ("out.log", "build/x.o", ".link/state.json", "venv2/pyvenv.cfg", "venv2/lib/a.py"):
        write(pair.remote / name, name)
    assert not pair.pull().changed
    assert not (pair.local / "out.log").exists() and not (pair.local / "build" / "x.o").exists()

    # Deleting an ignored file never deletes it on the other side.
    (pair.local / "run.log").unlink()
    (pair.remote / "out.log").unlink()
    write(pair.remote / "run.log", "theirs")
    assert not pair.both().changed
    assert (pair.remote / "run.log").read_text() == "theirs"


def test_ignore_rules(tmp_path):
    rules = "# data\n*.tmp\nbuild/\n/data\ncache\nout/\nlogs\n!out/keep.txt\n!lo*\n"
    write(tmp_path / ".linkignore", rules)
    write(tmp_path / "envs" / "a" / "pyvenv.cfg", "")
    ignore = Ignore(str(tmp_path))
    assert ignore.prune_dirs() == ["build", "/data", "cache", "out"]  # !lo* may re-include logs
    assert ignore.matches("x.tmp") and ignore.matches("a/b/x.tmp")
    assert ignore.matches("build/x") and ignore.matches("a/build", is_dir=True)
    assert ignore.matches("data/x") and not ignore.matches("a/data/x")
    assert ignore.matches("out/keep.txt")  # as in git: nothing below an ignored dir comes back
    assert ignore.matches("x/.git/config") and not ignore.matches("env")  # a file named env
    assert ignore.ignored("envs/a/bin/python") and not ignore.matches("envs/a/bin/python")
    assert not ignore.ignored("src/main.py")
    assert set(DEFAULT_EXCLUDES) >= {".git", "__pycache__", ".ipynb_checkpoints", ".venv", ".link"}

    write(tmp_path / ".linkignore", "*.csv\n")
    assert ignore.refresh()
    assert ignore.matches("a.csv") and not ignore.matches("x.tmp")
    assert not ignore.refresh()


def test_names_with_spaces_and_non_ascii(pair):
    names = ["my data/file one.csv", "données/été ☀.txt", "日本語 ファイル.txt", "tab\tand 'quotes'.txt"]
    for name in names[:2]:
        write(pair.local / name, name, mtime=OLD)
    for name in names[2:]:
        write(pair.remote / name, name, mtime=OLD)

    report = pair.both()

    assert sorted(report.uploaded) == sorted(names[:2])
    assert sorted(report.downloaded) == sorted(names[2:])
    assert files(pair.local) == files(pair.remote) == {n: n.encode() for n in names}
    write(pair.local / "données/été ☀.txt", "ici")
    write(pair.remote / "données/été ☀.txt", "là-bas")
    assert pair.pull().conflicts == [("données/été ☀.txt", "données/été ☀.from-gpu.txt")]


def test_symlinks_inside_are_recreated_outside_skipped(pair, tmp_path):
    write(tmp_path / "outside.txt", "not yours")
    write(pair.local / "data" / "real.txt", "real")
    (pair.local / "latest").symlink_to("data/real.txt")
    (pair.local / "data" / "self").symlink_to(".")
    (pair.local / "passwd").symlink_to("/etc/passwd")
    (pair.local / "up").symlink_to("../outside.txt")
    (pair.local / "away").symlink_to(tmp_path)  # a directory outside
    (pair.local / "through").symlink_to("away/outside.txt")  # inside lexically, outside really

    report = pair.push()

    assert sorted(report.uploaded) == ["data/real.txt", "data/self", "latest"]
    assert os.readlink(pair.remote / "latest") == "data/real.txt"
    assert (pair.remote / "latest").read_text() == "real"
    assert sorted(p for p, _ in report.skipped) == ["away", "passwd", "through", "up"]
    assert any("outside the working directory" in line for line in report.warnings())
    assert not (pair.remote / "away").exists() and not (pair.remote / "outside.txt").exists()

    (pair.remote / "newest").symlink_to("data/real.txt")
    (pair.remote / "host-secrets").symlink_to("/etc/hostname")
    report = pair.pull()
    assert report.downloaded == ["newest"] and [p for p, _ in report.skipped] == ["host-secrets"]
    assert os.readlink(pair.local / "newest") == "data/real.txt"
    assert not os.path.lexists(pair.local / "host-secrets")


def test_a_file_over_the_size_limit_is_skipped(tmp_path):
    pair = Pair(tmp_path, max_file_size=1000)
    write(pair.local / "big.bin", b"x" * 2048)
    write(pair.local / "small.txt", "ok")
    report = pair.push()
    assert report.uploaded == ["small.txt"]
    assert report.warnings() == ["big.bin was not synced: it is 2.0 KiB, over the 1000 bytes limit"]
    write(pair.remote / "huge.bin", b"y" * 5000)
    report = pair.pull()
    assert report.skipped == [("huge.bin", "it is 4.9 KiB, over the 1000 bytes limit")]
    assert not (pair.local / "huge.bin").exists() and not (pair.remote / "big.bin").exists()
    assert pair.both().skipped == []  # reported once, while they stay as they are
    write(pair.local / "big.bin", b"x" * 3000)
    assert [path for path, _ in pair.both().skipped] == ["big.bin"]


def test_first_sync_adopts_files_equal_on_both_sides(pair):
    for root in (pair.local, pair.remote):
        write(root / "same.txt", "same", mtime=OLD)
    write(pair.local / "differs.txt", "here", mtime=OLD)
    write(pair.remote / "differs.txt", "there!", mtime=OLD)
    report = pair.both()
    assert report.downloaded == [] and report.bytes == len("here") + len("there!")
    assert report.uploaded == ["differs.txt"]  # after saving the host's version
    assert report.conflicts == [("differs.txt", "differs.from-gpu.txt")]


def test_a_blind_push_never_overwrites_what_the_base_does_not_know(pair):
    write(pair.local / "notes.txt", "mine")
    write(pair.remote / "notes.txt", "the host's own")
    report = pair.push(known=False)
    assert report.conflicts == [("notes.txt", "notes.from-gpu.txt")]
    assert (pair.local / "notes.from-gpu.txt").read_text() == "the host's own"
    assert (pair.remote / "notes.txt").read_text() == "mine"


# -- many files, and doing nothing quickly ---------------------------------------------


def test_ten_thousand_small_files(tmp_path):
    pair = Pair(tmp_path)
    try:
        for d in range(100):
            folder = pair.local / f"d{d:02}"
            folder.mkdir()
            for i in range(100):
                (folder / f"f{i}.txt").write_text(f"{d} {i}\n")
        # files written a minute ago: just-written ones are rightly hashed again at each
        # sync until their mtime leaves the coarse window; this measures settled files
        old = time.time() - 60
        for path in pair.local.rglob("*.txt"):
            os.utime(path, (old, old))
        pair.journal = pair.sync.journal = Journal(str(pair.local), pair.sync.ignore)
        pair.journal.start()

        started = time.perf_counter()
        first = pair.both()
        first_seconds = time.perf_counter() - started
        assert len(first.uploaded) == 10_000
        assert scan_tree(str(pair.remote)) == scan_tree(str(pair.local))  # sizes, mtimes, modes

        host_now = pair.scan()
        started = time.perf_counter()
        again = asyncio.run(pair.sync.sync(pair.fs, str(pair.remote), host_now))
        seconds = time.perf_counter() - started
        assert not again.changed and again.bytes == 0
        assert seconds < 0.1, f"a no-change sync of 10,000 files took {seconds:.3f} s"

        for name in ("d00/f0.txt", "d50/f50.txt", "d99/f99.txt"):
            write(pair.remote / name, "changed on the host\n")
        assert sorted(pair.pull().downloaded) == ["d00/f0.txt", "d50/f50.txt", "d99/f99.txt"]
        print(f"\nfirst sync of 10,000 files: {first_seconds:.2f} s; no-change sync: {seconds * 1000:.1f} ms")
    finally:
        pair.close()


def test_the_journal_drives_the_push(watched):
    write(watched.local / "old" / "a.txt", "a")
    write(watched.local / "gone.txt", "gone")
    watched.both()  # full comparison: the journal's first take

    write(watched.local / "new" / "deep" / "b.txt", "b")
    write(watched.local / "gone.txt", "changed")
    (watched.local / "gone.txt").unlink()
    (watched.local / "old").rename(watched.local / "moved")
    (watched.local / "mode.sh").write_text("echo\n")
    report = watched.push()

    assert sorted(report.uploaded) == ["mode.sh", "moved/a.txt", "new/deep/b.txt"]
    assert sorted(report.deleted_remote) == ["gone.txt", "old/a.txt"]
    assert scan_tree(str(watched.remote)) == scan_tree(str(watched.local))
    (watched.local / "mode.sh").chmod(0o755)
    assert watched.push().uploaded == ["mode.sh"]
    assert os.stat(watched.remote / "mode.sh").st_mode & 0o777 == 0o755


# -- failures --------------------------------------------------------------------------


class _Flaky:
    """A file that moves ``rate`` bytes/s and fails after ``limit`` bytes, like a link that drops."""

    def __init__(self, f, *, limit: float = float("inf"), rate: float = 0) -> None:
        self.f, self.left, self.rate = f, limit, rate

    def _spend(self, n: int) -> None:
        if self.rate:
            time.sleep(n / self.rate)
        self.left -= n
        if self.left < 0:
            raise OSError(errno.ECONNRESET, "connection reset halfway")

    def read(self, n=-1):
        data = self.f.read(n)
        self._spend(len(data))
        return data

    def write(self, data):
        self._spend(len(data))
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class FailingFS(LocalFileSystem):
    """A host whose transfers break after 1 MiB."""

    def _open(self, path, mode="rb", **kwargs):
        return _Flaky(super()._open(path, mode, **kwargs), limit=2**20)


class SlowFS(LocalFileSystem):
    """A host that moves 10 MB/s."""

    def _open(self, path, mode="rb", **kwargs):
        return _Flaky(super()._open(path, mode, **kwargs), rate=10e6)


def test_an_interrupted_transfer_leaves_no_partial_file(pair):
    v1, v2, v3 = (os.urandom(3 * 2**20) for _ in range(3))
    write(pair.local / "weights.bin", v1)
    pair.both()
    state = pair.state.read_bytes()

    write(pair.local / "weights.bin", v2)
    with pytest.raises(TransferError, match="weights.bin") as caught:
        pair.push(fs=FailingFS())
    assert isinstance(caught.value.__cause__, OSError)
    assert (pair.remote / "weights.bin").read_bytes() == v1
    assert parts(pair.remote) == [] and pair.state.read_bytes() == state

    assert pair.push().uploaded == ["weights.bin"]  # the next sync finishes the job
    assert (pair.remote / "weights.bin").read_bytes() == v2
    state = pair.state.read_bytes()

    write(pair.remote / "weights.bin", v3)
    with pytest.raises(TransferError):
        pair.pull(fs=FailingFS())
    assert (pair.local / "weights.bin").read_bytes() == v2
    assert parts(pair.local) == [] and pair.state.read_bytes() == state
    assert pair.pull().downloaded == ["weights.bin"]
    assert (pair.local / "weights.bin").read_bytes() == v3


def test_progress_and_cancel(tmp_path):
    calls = []
    pair = Pair(tmp_path, fs=SlowFS(), progress=lambda *a: calls.append((time.monotonic(), *a)))
    write(pair.local / "a.bin", os.urandom(3 * 2**20))
    write(pair.local / "b.bin", os.urandom(3 * 2**20))
    pair.push()
    assert len(calls) >= 2
    times = [t for t, *_ in calls[:-1]]
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(times))
    assert calls[-1][1:] == (6 * 2**20, 6 * 2**20, "")
    assert {path for *_, path in calls[:-1]} <= {"a.bin", "b.bin"}

    write(pair.local / "a.bin", os.urandom(3 * 2**20))
    write(pair.local / "b.bin", os.urandom(3 * 2**20))

    async def cancelled():
        task = asyncio.create_task(pair.sync.push(pair.fs, str(pair.remote), pair.scan()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert parts(pair.remote) == []
    assert pair.push().uploaded == ["a.bin", "b.bin"]
    assert files(pair.remote) == files(pair.local)


# -- the scanner and the journal -------------------------------------------------------


def test_scan_source_runs_alone_on_a_host(tmp_path):
    root = tmp_path / "tree"
    write(root / "a.txt", "a", mode=0o600)
    write(root / "d" / "é b.txt", "b")
    write(root / "data" / "big.bin", "skip me")
    write(root / "x" / "data" / "keep.bin", "keep me")
    write(root / "cache" / "c", "skip me")
    write(root / ".git" / "HEAD", "skip me")
    write(root / "anyname" / "pyvenv.cfg", "skip me")
    write(root / "d" / f"{PART_PREFIX}0123", "skip me")
    (root / "l").symlink_to("a.txt")
    os.mkfifo(root / "fifo")
    prune = ["/data", "cache"]

    here = scan_tree(str(root), prune)
    code = SCAN_SOURCE + "\nimport json, sys\nprint(json.dumps(scan_tree(sys.argv[1], json.loads(sys.argv[2]))))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(root), json.dumps(prune)],
        capture_output=True, check=True, timeout=30,
    ).stdout
    assert json.loads(out) == here
    assert sorted(here) == ["a.txt", "d/é b.txt", "l", "x/data/keep.bin"]
    assert here["l"][3:] == ["l", "a.txt"] and here["a.txt"][2:] == [0o600, "f"]
    ast.parse(SCAN_SOURCE, feature_version=(3, 8))  # hosts may run Python 3.8


def take(journal: Journal, consumer: str = "") -> set[str] | None:
    return asyncio.run(journal.take(consumer))


def test_the_journal_sees_create_modify_delete_move(tmp_path):
    (tmp_path / ".git").mkdir()
    journal = Journal(str(tmp_path), Ignore(str(tmp_path)))
    with journal:
        assert take(journal) is None  # the first take: compare everything
        assert take(journal) == set()

        write(tmp_path / "a.txt", "a")
        assert take(journal) == {"a.txt"}  # no wait: take() waits for the observer
        with open(tmp_path / "a.txt", "a") as f:
            f.write("more")
        (tmp_path / "a.txt").chmod(0o600)
        assert take(journal) == {"a.txt"}
        (tmp_path / "a.txt").rename(tmp_path / "b.txt")
        assert take(journal) == {"a.txt", "b.txt"}
        (tmp_path / "b.txt").unlink()
        assert take(journal) == {"b.txt"}
        write(tmp_path / "d" / "e" / "f.txt", "f")
        assert "d" in take(journal)
        write(tmp_path / ".git" / "index", "ignored")
        write(tmp_path / "__pycache__" / "m.pyc", "ignored")
        assert take(journal) == set()

        assert take(journal, "other") is None  # consumers are independent
        write(tmp_path / "g.txt", "g")
        assert take(journal, "other") == {"g.txt"}
        assert take(journal) == {"g.txt"}

        write(tmp_path / ".linkignore", "*.txt\n")  # what is ignored changed
        assert take(journal) is None and take(journal, "other") is None
    assert not journal.alive and take(journal) is None


def test_take_waits_for_the_observer_on_the_event_loop(tmp_path):
    journal = Journal(str(tmp_path), Ignore(str(tmp_path)))
    threads = set(threading.enumerate())

    async def takes() -> list:
        seen = [await journal.take()]
        seen.append(await journal.take())
        write(tmp_path / "a.txt", "a")
        seen.append(await journal.take())  # written just before: listed
        seen.append(await journal.take())
        threads_during.update(threading.enumerate())
        write(tmp_path / ".linkignore", "*.txt\n")
        seen.append(await journal.take())
        return seen

    threads_during: set = set()
    with journal:
        observer = set(threading.enumerate()) - threads
        assert asyncio.run(takes()) == [None, set(), {"a.txt"}, set(), None]
        assert not journal._wakers  # every waiter removed itself
    assert threads_during - threads - observer == set()  # no worker thread was needed


def test_a_push_with_nothing_changed_does_nothing_and_a_change_is_pushed(watched):
    write(watched.local / "a.txt", "a")
    watched.both()  # full comparison: the journal's first take
    watched.push(known=False)  # takes the events of the write above, if late for the first
    assert not watched.sync._quiet(str(watched.remote))  # a.txt is racy: its hash is checked
    os.utime(watched.local / "a.txt", ns=(OLD, OLD))
    watched.push(known=False)  # pushes the new mtime; an old mtime is not racy
    assert watched.sync._quiet(str(watched.remote))

    operate = watched.sync._operate
    watched.sync._operate = None  # a quiet push must not start a worker
    try:
        assert not watched.push(known=False).changed
    finally:
        watched.sync._operate = operate
    write(watched.local / "b.txt", "b")  # just before the push
    assert watched.push(known=False).uploaded == ["b.txt"]
    assert scan_tree(str(watched.remote)) == scan_tree(str(watched.local))


def test_the_journal_gives_up_when_the_kernel_drops_events(tmp_path):
    """Overflow the kernel's inotify queue while this process keeps the GIL (so the
    observer cannot read): events are lost, and take() must say so."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 50_000:
        pytest.skip(f"max_queued_events is {limit}: too slow to overflow")
    root, flag = tmp_path / "root", tmp_path / "done"
    root.mkdir()
    flag.write_bytes(b"\0")
    count = limit // 2 + 3000  # two events a file: created, modified
    code = (
        "import sys\n"
        "for i in range(int(sys.argv[2])): open(sys.argv[1] + '/f%d' % i, 'w').write('x')\n"
        "open(sys.argv[3], 'r+b').write(b'\\1')\n"
    )
    journal = Journal(str(root), Ignore(str(root)))
    with journal, open(flag, "r+b") as f, mmap.mmap(f.fileno(), 1) as done:
        take(journal)
        writer = subprocess.Popen([sys.executable, "-c", code, str(root), str(count), str(flag)])
        interval = sys.getswitchinterval()
        sys.setswitchinterval(120)
        try:
            # No I/O here: it would release the GIL. The writer's flag is shared memory.
            deadline = time.monotonic() + 60
            while done[0] == 0 and time.monotonic() < deadline:
                pass
        finally:
            sys.setswitchinterval(interval)
        assert writer.wait(timeout=30) == 0
        assert len(list(root.iterdir())) == count
        assert take(journal) is None


def test_a_take_cancelled_as_the_observer_wakes_it_ends_cancelled(tmp_path):
    """An interrupt that lands while a remote cell's push waits for the observer
    ends the cell: the take is cancelled even when the wake-up comes at once.
    (``asyncio.wait_for`` on Python 3.11 returned instead, and the cell ran.)"""
    journal = Journal(str(tmp_path), Ignore(str(tmp_path)))
    journal.barrier_timeout = 0.5

    async def interrupted() -> asyncio.Task:
        assert await journal.take("cell") is None
        journal._caught_up = lambda consumer, seen: False  # the take waits for a wake-up
        task = asyncio.ensure_future(journal.take("cell"))
        while not journal._wakers:
            await asyncio.sleep(0)
        journal._wakers[-1]()  # the observer wakes the take...
        waits = []
        while not waits:
            await asyncio.sleep(0)
            waits = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Event.wait"]
        waits[0].add_done_callback(lambda _: task.cancel())  # ...as the interrupt comes
        await asyncio.wait({task})
        return task

    with journal:
        task = asyncio.run(interrupted())
    assert task.cancelled(), f"the take returned {task.result()!r} instead"


def test_journal_threads_are_joined(tmp_path):
    before = set(threading.enumerate())
    journal = Journal(str(tmp_path), Ignore(str(tmp_path)))
    journal.start()
    assert journal.alive
    journal.stop()
    assert set(threading.enumerate()) <= before


def test_too_big_counts_what_is_kept_and_stops_early(tmp_path):
    for i in range(30):
        write(tmp_path / "data" / f"{i}.bin", b"x" * 1000)
    for i in range(500):
        write(tmp_path / "node_modules" / f"{i}.js", "")  # a default exclude: never counted
    ignore = Ignore(str(tmp_path))
    assert too_big(str(tmp_path), ignore, 30, 10**6) == ""
    assert too_big(str(tmp_path), ignore, 29, 10**6) == "it holds more than 29 files"
    assert too_big(str(tmp_path), ignore, 100, 29_999).startswith("it holds more than")
    write(tmp_path / ".linkignore", "data/\n")
    ignore.refresh()
    assert too_big(str(tmp_path), ignore, 0, 0) == "it holds more than 0 files"  # .linkignore
    (tmp_path / ".linkignore").unlink()
    (tmp_path / "data").rename(tmp_path / ".git")
    assert too_big(str(tmp_path), Ignore(str(tmp_path)), 0, 0) == ""


def test_the_host_reports_only_what_changed_since_the_scan_the_router_holds(tmp_path):
    from link_kernel.agent import scan_report

    root = tmp_path / "work"
    for i in range(5):
        write(root / f"f{i}.txt", str(i))
    request = {"root": str(root), "prune": [], "id": "router1", "since": ""}
    first = scan_report(scan_tree(str(root)), request)
    assert first["files"] == scan_tree(str(root)) and first["files_token"]
    assert (root / ".link" / "scan-router1").exists() and ".link/scan-router1" not in first["files"]

    write(root / "f1.txt", "changed", mtime=OLD)
    (root / "f2.txt").unlink()
    write(root / "new.txt", "new")
    now = scan_tree(str(root))
    second = scan_report(now, {**request, "since": first["files_token"]})
    assert "files" not in second
    diff = second["files_diff"]
    assert diff["since"] == first["files_token"]
    assert set(diff["changed"]) == {"f1.txt", "new.txt"} and diff["removed"] == ["f2.txt"]
    rebuilt = dict(first["files"])
    rebuilt.update(diff["changed"])
    for path in diff["removed"]:
        rebuilt.pop(path)
    assert rebuilt == now

    kept = (root / ".link" / "scan-router1").stat()
    third = scan_report(now, {**request, "since": second["files_token"]})
    assert third["files_diff"] == {"since": second["files_token"], "changed": {}, "removed": []}
    # nothing changed: the kept scan stays as it is, under the same token
    assert third["files_token"] == second["files_token"]
    assert (root / ".link" / "scan-router1").stat().st_mtime_ns == kept.st_mtime_ns
    # a token this host does not hold (another router wrote since, or a restart): all of it
    stale = scan_report(now, {**request, "since": first["files_token"]})
    assert stale["files"] == now
    other = scan_report(now, {**request, "id": "router2", "since": stale["files_token"]})
    assert other["files"] == now  # each router keeps its own


# -- change is judged by content ----------------------------------------------------------


def same_size_edits(n: int = 20) -> list[str]:
    return [f"a,b\n{i + 10},{i + 10}\n" for i in range(n)]


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "scan"])
@pytest.mark.parametrize("known", [True, False], ids=["host-scanned", "host-unknown"])
def test_a_same_size_edit_with_the_same_mtime_is_pushed(tmp_path, journal, known):
    """Edits in one timestamp granule: same size, and the mtime set back to the very
    nanosecond, as a file system that keeps coarse times would leave it."""
    pair = Pair(tmp_path, journal=journal)
    try:
        data = pair.local / "data.csv"
        mtime = time.time_ns()
        for text in same_size_edits():
            write(data, text, mtime=mtime)
            pair.push(known=known)
            assert (pair.remote / "data.csv").read_text() == text
    finally:
        pair.close()


def test_same_size_edits_within_a_second_reach_the_host(watched):
    """No mtime games: edits as fast as a notebook makes them, each pushed at once."""
    data = watched.local / "data.csv"
    for text in same_size_edits():
        data.write_text(text)
        assert watched.push(known=False).uploaded == ["data.csv"]
        assert (watched.remote / "data.csv").read_text() == text


def test_an_old_file_is_not_hashed_again(watched, monkeypatch):
    write(watched.local / "old.csv", "a,b\n1,2\n", mtime=OLD)
    write(watched.local / "new.csv", "a,b\n1,2\n")
    watched.push(known=False)
    assert watched.sync._base.racy == {"new.csv"}  # only the recent one
    assert set(watched.sync._base.hashes) == {"old.csv", "new.csv"}
    os.utime(watched.local / "new.csv", ns=(OLD, OLD))
    watched.push(known=False)
    assert watched.sync._base.racy == set()
    assert watched.sync._quiet(str(watched.remote))
    state = json.loads(watched.state.read_text())
    assert set(state["hashes"]) == {"old.csv", "new.csv"} and state["racy"] == []


def test_same_size_edits_on_both_sides_are_a_conflict(pair):
    write(pair.local / "notes.txt", "v1\n")
    pair.both()
    mtime = time.time_ns()
    write(pair.local / "notes.txt", "l1\n", mtime=mtime)
    write(pair.remote / "notes.txt", "h1\n", mtime=mtime)

    report = pair.both()

    assert [path for path, _ in report.conflicts] == ["notes.txt"]
    assert (pair.local / "notes.txt").read_text() == "l1\n"
    assert (pair.local / "notes.from-gpu.txt").read_text() == "h1\n"


def test_a_local_edit_in_the_same_granule_is_never_overwritten_by_a_pull(pair):
    write(pair.local / "notes.txt", "v1\n")
    pair.push()
    sig = os.stat(pair.local / "notes.txt").st_mtime_ns
    write(pair.local / "notes.txt", "l1\n", mtime=sig)  # size and mtime as pushed
    write(pair.remote / "notes.txt", "h1\n")

    report = pair.pull()

    assert (pair.local / "notes.txt").read_text() == "l1\n"
    assert [path for path, _ in report.conflicts] == ["notes.txt"]
    assert (pair.local / "notes.from-gpu.txt").read_text() == "h1\n"


def test_equal_content_on_both_sides_is_adopted_unequal_is_not(pair):
    mtime = time.time_ns()
    write(pair.local / "same.txt", "abc", mtime=mtime)
    write(pair.remote / "same.txt", "abc", mtime=mtime + 5 * 10**8)
    write(pair.local / "differ.txt", "abc", mtime=mtime)
    write(pair.remote / "differ.txt", "xyz", mtime=mtime)  # same size, same second

    report = pair.push()

    assert report.uploaded == ["differ.txt"] and report.conflicts == [("differ.txt", "differ.from-gpu.txt")]
    assert (pair.local / "differ.from-gpu.txt").read_text() == "xyz"
    assert (pair.remote / "differ.txt").read_text() == "abc"


class _Unpokable(Journal):
    """A journal of a root that is not ours to chmod: it cannot make its barrier."""

    def _poke(self) -> bool:
        return False


def test_take_without_a_barrier_compares_everything(tmp_path):
    journal = _Unpokable(str(tmp_path), Ignore(str(tmp_path)))
    with journal:
        assert take(journal) is None  # the first take
        write(tmp_path / "a.txt", "a")
        assert take(journal) is None  # no proof every event arrived: compare everything


def test_a_same_size_rewrite_on_the_host_in_the_same_granule_comes_back(pair):
    """The host's scan hashes the files the router holds a racy state of."""
    data = pair.local / "data.csv"
    edits = same_size_edits(6)
    write(data, edits[0])  # just written: racy on both sides once pushed
    pair.push()
    assert pair.sync.racy_remote() == ["data.csv"]
    mtime = os.stat(pair.remote / "data.csv").st_mtime_ns
    for text in edits[1:]:
        write(pair.remote / "data.csv", text, mtime=mtime)  # size and mtime as recorded
        scan = hash_racy(str(pair.remote), pair.scan(), pair.sync.racy_remote())
        assert len(scan["data.csv"]) == 5
        report = asyncio.run(pair.sync.pull(pair.fs, str(pair.remote), scan))
        assert report.downloaded == ["data.csv"], report
        assert data.read_text() == text
    scan = hash_racy(str(pair.remote), pair.scan(), pair.sync.racy_remote())
    assert not asyncio.run(pair.sync.pull(pair.fs, str(pair.remote), scan)).changed
    host = {}
    exec(compile(SCAN_SOURCE, "<host>", "exec"), host)  # both run alone on a host
    assert host["hash_racy"](str(pair.remote), host["scan_tree"](str(pair.remote)), ["data.csv"]) == scan
