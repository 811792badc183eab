"""Many small files go to the host in one bundle, and decide nothing differently.

The host's side is the real ``unpack``, run by a python process on a real pipe; the
'host' directory is reached through fsspec's LocalFileSystem, as in test_files.py.
The same runs through the installed kernelspec on the ssh host are in
test_file_sync.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_files import OLD, Pair, files, parts, write

from link_kernel.errors import TransferError
from link_kernel.sync.files import scan_tree
from link_kernel.sync.files.bundle import BUNDLE_MIN_FILES, UNPACK_CODE


class LocalPipe:
    """``python -c code args`` on this machine, as a bundle's pipe."""

    def __init__(self, code: str, args: list[str], *, break_after: int | None = None, delay: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.writes = 0
        self.break_after = break_after
        self.delay = delay

    def write(self, *chunks: bytes) -> None:
        if self.break_after is not None and self.writes >= self.break_after:
            raise BrokenPipeError(32, "Broken pipe")  # the host went away here
        self.writes += 1
        time.sleep(self.delay)
        for chunk in chunks:
            self.proc.stdin.write(chunk)
        self.proc.stdin.flush()

    def close_input(self) -> None:
        self.proc.stdin.close()

    def lines(self):
        yield from self.proc.stdout

    def finish(self) -> tuple[int, str]:
        status = self.proc.wait()
        self.proc.stdout.close()
        return status, ""


class Opener:
    def __init__(self, before=None, **pipe_options) -> None:
        self.opened: list[LocalPipe] = []
        self.pipe_options = pipe_options
        self.before = before

    def __call__(self, code: str, args: list[str], size: int) -> LocalPipe:
        assert code == UNPACK_CODE
        if self.before is not None:
            self.before()
        pipe = LocalPipe(code, args, **self.pipe_options)
        self.opened.append(pipe)
        return pipe


def push(pair: Pair, opener, *, known: bool = False):
    pair.sync.opener = opener
    return pair.push(known=known)


def tree(root: Path, count: int = 40) -> None:
    for i in range(count):
        name = f"f{i:03}.csv" if i % 5 else f"f{i:03} données 数据.csv"
        write(root / f"d{i % 4}" / f"sub{i % 3}" / name, random.Random(i).randbytes(100 + i * 37),
              mode=0o640 if i % 2 else 0o755, mtime=OLD + i * 1_000_003)


def test_a_first_sync_of_many_files_is_one_bundle_with_exact_times_and_modes(tmp_path):
    pair = Pair(tmp_path)
    tree(pair.local)
    opener = Opener()
    report = push(pair, opener)
    assert len(opener.opened) == 1
    assert sorted(report.uploaded) == sorted(files(pair.local))
    assert report.bytes == sum(len(b) for b in files(pair.local).values())
    assert files(pair.remote) == files(pair.local)
    # size, mtime to the nanosecond, mode: what the host's own scan reports
    assert scan_tree(str(pair.remote)) == scan_tree(str(pair.local))
    assert parts(pair.remote) == []
    # the base holds what the host holds: nothing to bring back, nothing to send
    assert not pair.pull().changed
    assert push(pair, opener, known=True).uploaded == []
    assert len(opener.opened) == 1


def test_a_few_files_go_one_at_a_time(tmp_path):
    pair = Pair(tmp_path)
    tree(pair.local, BUNDLE_MIN_FILES - 1)
    opener = Opener()
    assert len(push(pair, opener).uploaded) == BUNDLE_MIN_FILES - 1
    assert opener.opened == []
    assert files(pair.remote) == files(pair.local)


def scenario(root: Path) -> Pair:
    """A blind first push where the host already holds some of the files."""
    root.mkdir()
    pair = Pair(root)
    tree(pair.local)
    (pair.local / "link.csv").symlink_to("d0/sub0/f000.csv")
    write(pair.local / "big.bin", b"b" * (2 * 2**20))  # over the bundle's per-file size
    # the host: an equal file (adopted), a different one (kept as a conflict), and a
    # file where the notebook has a folder (the sync's own error)
    write(pair.remote / "d1" / "sub1" / "f001.csv", (pair.local / "d1" / "sub1" / "f001.csv").read_bytes())
    write(pair.remote / "d2" / "sub2" / "f002.csv", "the host's own")
    write(pair.remote / "d3" / "sub0", "a file, not a folder")
    return pair


def outcome(pair: Pair, opener) -> tuple:
    """The error of the first push, then the trees and reports once the user removed
    what was in the way and ran the cell again."""
    with pytest.raises(TransferError) as caught:
        push(pair, opener)
    error = str(caught.value).replace(str(pair.remote), "HOST")
    (pair.remote / "d3" / "sub0").unlink()
    report = push(pair, opener)
    again = push(pair, opener, known=True)
    return (error, files(pair.remote), files(pair.local), parts(pair.remote),
            sorted(report.conflicts), again.uploaded, pair.pull().changed)


def test_a_bundle_decides_everything_as_one_file_at_a_time_would(tmp_path):
    one_at_a_time = outcome(scenario(tmp_path / "a"), None)
    opener = Opener()
    bundled = outcome(scenario(tmp_path / "b"), opener)
    assert len(opener.opened) == 1  # the second push had only the rest to do
    assert bundled == one_at_a_time
    error, remote, local, litter, _, again, pulled = bundled
    assert "d3/sub0" in error and "is not a directory" in error
    assert local["d2/sub2/f002.from-gpu.csv"] == b"the host's own"
    assert remote == local  # the host's version too, kept beside
    assert os.readlink(tmp_path / "b" / "host" / "link.csv") == "d0/sub0/f000.csv"
    assert litter == [] and again == [] and not pulled


def test_a_host_edit_after_the_scan_is_kept(tmp_path):
    """The host's scan said nothing changed there, then a file changed before the bundle."""
    pair = Pair(tmp_path)
    tree(pair.local)
    push(pair, Opener(), known=True)
    for path in (pair.local / "d0").rglob("*.csv"):
        write(path, path.read_bytes() + b"local edit")
    for path in (pair.local / "d1").rglob("*.csv"):
        write(path, path.read_bytes() + b"local edit")
    edited = pair.remote / "d1" / "sub2" / "f017.csv"
    report = push(pair, Opener(before=lambda: write(edited, "the host's edit")), known=True)
    assert report.conflicts == [("d1/sub2/f017.csv", "d1/sub2/f017.from-gpu.csv")]
    assert (pair.local / "d1/sub2/f017.from-gpu.csv").read_text() == "the host's edit"
    assert edited.read_bytes().endswith(b"local edit")


@pytest.mark.parametrize("cut", [0, 1, 17])
def test_a_bundle_cut_short_loses_nothing(tmp_path, cut):
    pair = Pair(tmp_path)
    tree(pair.local)
    opener = Opener(break_after=cut)
    report = push(pair, opener)
    assert sorted(report.uploaded) == sorted(files(pair.local))
    assert files(pair.remote) == files(pair.local)
    assert parts(pair.remote) == []
    assert not pair.pull().changed


def test_a_stopped_bundle_keeps_what_it_wrote(tmp_path):
    pair = Pair(tmp_path)
    tree(pair.local)
    opener = Opener(delay=0.02)

    async def cancelled():
        pair.sync.opener = opener
        task = asyncio.create_task(pair.sync.push(pair.fs, str(pair.remote), None))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    written = len(files(pair.remote))
    assert 0 < written < 40
    assert parts(pair.remote) == []
    rest = push(pair, None, known=True)
    assert len(rest.uploaded) == 40 - written  # what the bundle wrote is in the base
    assert files(pair.remote) == files(pair.local)


def test_unpack_runs_alone_on_an_old_python(tmp_path):
    """No splice (before Python 3.10): the bytes are read and written instead."""
    pair = Pair(tmp_path)
    tree(pair.local)
    code = UNPACK_CODE.replace('getattr(os, "splice", None)', "None")
    assert code != UNPACK_CODE

    def opener(_code, args, size):
        return LocalPipe(code, args)

    push(pair, opener)
    assert scan_tree(str(pair.remote)) == scan_tree(str(pair.local))
