"""Many small files to the host in one stream (a first sync, a new data folder).

One file at a time over SFTP costs five round trips a file (open, write, close,
attributes, rename): 2.5 ms a file here, most of a first sync. A bundle instead
writes, for each file, a header line and its bytes to the stdin of
:func:`unpack`, run on the host from :data:`UNPACK_CODE`; ``unpack`` writes each
file beside its target, sets its mode and mtime (to the nanosecond), renames it
into place and answers one line a file. The answers are read while the data
goes out.

A file the host changed since the router last saw it (its state is not the one
the header records) is not written: it is answered ``there``. Whatever is not
answered ``ok`` (a change there, an error, a bundle cut short) goes the usual
way, one file at a time, which looks before it overwrites. So a bundle never
decides anything the one-file path would decide differently; it is only faster.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from paramiko.ssh_exception import SSHException

from ...errors import LinkError
from .base import _Run
from .signatures import _DIR, HASH, PART_PREFIX, Sig, _ancestors, _lstat

log = logging.getLogger(__name__)

#: Files up to this size may travel in a bundle (each is read whole).
BUNDLE_MAX_FILE = 2**20
#: A bundle is used from this many files up (it costs one command on the host).
BUNDLE_MIN_FILES = 16


class Pipe(Protocol):
    """A command running on the host: its stdin and stdout as byte streams."""

    def write(self, *chunks: bytes) -> None:
        """Send to its stdin; OSError (or EOFError) once it is gone."""

    def close_input(self) -> None: ...

    def lines(self) -> Iterable[bytes]:
        """Its stdout, line by line, until it ends."""

    def finish(self) -> tuple[int, str]:
        """Wait for it to end: its exit status and the end of its stderr."""


#: ``opener(code, args, total_bytes)``: a python running ``code`` with ``args`` on
#: the host, or None when this host has no such way (then files go one at a time).
Opener = Callable[[str, list[str], int], "Pipe | None"]


def unpack(root: "str", prefix: "str") -> "None":  # noqa: UP037
    """The host's side: read headers and bytes from stdin, answer on stdout.

    Standard library only, Python >= 3.8: hosts run it, with
    :func:`.signatures._lstat`, from :data:`UNPACK_CODE`.
    """
    import json
    import os
    import secrets
    import stat
    import sys

    out = sys.stdout
    made = set()
    try:  # a 1 MiB pipe from sshd: fewer hand-overs (Linux; else as it is)
        import fcntl

        fcntl.fcntl(0, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass
    splice = getattr(os, "splice", None)  # Python >= 3.10: the pipe's pages go to the file

    def read_exact(n):
        parts, left = [], n
        while left:
            chunk = os.read(0, min(left, 1 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def take(fd, n):
        """Move ``n`` bytes of stdin into ``fd``: None, "short" if stdin ended first, or
        the OSError of writing (the rest of the ``n`` bytes is then read and dropped)."""
        nonlocal splice
        failed = None
        while n:
            if splice is not None and failed is None:
                try:
                    moved = splice(0, fd, n)
                except OSError:  # either end may refuse: read and write instead
                    splice = None
                    continue
            else:
                chunk = os.read(0, min(n, 1 << 20))
                moved = len(chunk)
                view = memoryview(chunk)
                while view and failed is None:
                    try:
                        view = view[os.write(fd, view):]
                    except OSError as exc:
                        failed = exc
            if not moved:
                return "short"
            n -= moved
        return failed

    def unchanged(recorded, there):  # as the router's SFTP host judges it: whole seconds
        if recorded == there:
            return True
        if recorded is None or not isinstance(there, list):
            return False
        if recorded[3] == "l" == there[3]:
            return recorded[4] == there[4]
        return (recorded[3] == "f" == there[3] and recorded[0] == there[0]
                and recorded[2] == there[2] and recorded[1] // 10**9 == there[1] // 10**9)

    def folder_of(rel):
        """The file's folder, made if missing; None if something there is not a folder."""
        path, sub = root, ""
        for part in rel.split("/")[:-1]:
            path = os.path.join(path, part)
            sub = sub + "/" + part if sub else part
            if sub in made:
                continue
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError:
                return None
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
            made.add(sub)
        return path

    def answer(*fields):
        out.write(json.dumps(fields) + "\n")

    def drop(n):
        """Read and drop ``n`` bytes of stdin (they were on their way); False if it ended."""
        with open(os.devnull, "wb") as sink:
            return take(sink.fileno(), n) != "short"

    while True:
        length = read_exact(4)
        if not length or length == b"\0\0\0\0":
            break
        header = read_exact(int.from_bytes(length, "big"))
        if header is None:
            break
        rel, size, mode, mtime, recorded = json.loads(header)
        folder = folder_of(rel)
        if folder is None:
            if not drop(size):
                break
            answer("error", rel, "a folder on its path is not a folder")
            continue
        path = os.path.join(root, rel)
        there = _lstat(path)
        if there is not None and not unchanged(recorded, there):
            if not drop(size):
                break
            answer("there", rel, there)
            continue
        temp = os.path.join(folder, prefix + secrets.token_hex(8))
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            if not drop(size):
                break
            answer("error", rel, exc.strerror or str(exc))
            continue
        try:
            failed = take(fd, size)
        finally:
            os.close(fd)
        try:
            if failed == "short":  # the router stopped
                raise EOFError
            if failed is not None:
                raise failed
            os.chmod(temp, mode)
            os.utime(temp, ns=(mtime, mtime))
            os.replace(temp, path)
        except (OSError, EOFError) as exc:
            try:
                os.unlink(temp)
            except OSError:
                pass
            if failed == "short":
                break
            answer("error", rel, exc.strerror or str(exc))
            continue
        answer("ok", rel, [size, mtime, mode, "f"])
    out.flush()


#: What the host's python runs: ``python -c UNPACK_CODE ROOT``.
UNPACK_CODE: str = (
    f"from __future__ import annotations\nimport os\nimport stat\nimport sys\n_DIR = {_DIR!r}\n\n" + inspect.getsource(_lstat) + "\n\n"
    + inspect.getsource(unpack) + f"\nunpack(sys.argv[1], {PART_PREFIX!r})\n"
)


class Sent:
    """What one file of a bundle became: ``ok`` (``sig`` is its state there), ``there``
    (the host changed it: ``sig`` is what is there) or ``error`` (``reason``)."""

    __slots__ = ("digest", "outcome", "reason", "sig")

    def __init__(self, outcome: str, detail: Any, digest: str) -> None:
        self.outcome = outcome
        self.sig: Sig | str | None = detail if outcome != "error" else None
        self.reason = detail if outcome == "error" else ""
        self.digest = digest


def send(
    pipe: Pipe,
    items: Iterable[tuple[str, str, Sig, Sig | None]],
    tick: Callable[[str, int], None],
) -> tuple[dict[str, Sent], str]:
    """Send ``(relpath, local path, local sig, recorded host sig)`` items through ``pipe``.

    Returns what the host answered, by relpath, and why the bundle ended early
    ("" if it did not). A file that vanished or cannot be read here is left out
    (not answered); ``tick(relpath, n)`` is told the bytes of each file sent, and may raise to
    stop the bundle, which then ends at the file it was sending. The answers of
    files written before the stop are still collected.
    """
    answers: list[bytes] = []
    reader = threading.Thread(target=lambda: answers.extend(pipe.lines()), daemon=True)
    reader.start()
    digests: dict[str, str] = {}
    stopped: BaseException | None = None
    broke = ""
    try:
        for relpath, local, sig, recorded in items:
            try:
                with open(local, "rb") as f:
                    data = f.read(BUNDLE_MAX_FILE + 1)
            except OSError:
                continue  # the journal has it, or the one-file path will say why
            if len(data) > BUNDLE_MAX_FILE:
                continue  # it grew: the one-file path streams it
            header = json.dumps([relpath, len(data), sig[2], sig[1], recorded]).encode()
            try:
                pipe.write(len(header).to_bytes(4, "big") + header, data)
            except (OSError, EOFError) as exc:
                broke = f"the host stopped reading ({exc or type(exc).__name__})"
                break
            digests[relpath] = hashlib.new(HASH, data).hexdigest()
            tick(relpath, len(data))
        else:
            pipe.write(bytes(4))
    except (OSError, EOFError) as exc:
        broke = f"the host stopped reading ({exc or type(exc).__name__})"
    except BaseException as exc:  # a stop: collect what was written, then re-raise
        stopped = exc
    finally:
        try:
            pipe.close_input()
        except (OSError, EOFError):
            pass
        reader.join()
        status, err = pipe.finish()
    done: dict[str, Sent] = {}
    for line in answers:
        try:
            outcome, relpath, detail = json.loads(line)
        except ValueError:
            continue
        if relpath in digests:
            done[relpath] = Sent(outcome, detail, digests[relpath])
    if stopped is not None:
        raise _Stopped(done) from stopped
    if status != 0 and not broke:
        broke = f"the host's unpacking ended with status {status}: {err}".rstrip(": ")
    return done, broke


class _Stopped(Exception):
    """The bundle was stopped; ``done`` is what the host wrote before that."""

    def __init__(self, done: dict[str, Sent]) -> None:
        super().__init__("bundle stopped")
        self.done = done


def send_small(
    run: _Run, copies: list, known: dict[str, Sig], local_root: str,
    uploaded: Callable[[_Run, str, Sig, Sig, str], None],
) -> list:
    """Send the small plain files of a push's ``copies`` in one bundle, if the host has
    a way (``run.opener``); return the copies left for one at a time: those the bundle
    did not write, now marked to be looked at before they are overwritten.
    ``uploaded(run, path, local sig, host sig, digest)`` records each file written."""
    small = [c for c in copies if c[3] is None and c[1][3] == "f" and c[1][0] <= BUNDLE_MAX_FILE]
    if run.opener is None or len(small) < BUNDLE_MIN_FILES:
        return copies
    try:
        pipe = run.opener(UNPACK_CODE, [run.host.root], sum(c[1][0] for c in small))
    except (OSError, EOFError, SSHException, LinkError) as exc:  # one at a time says it if it matters
        log.info("no bundle of files to %s (%s): they go one at a time", run.name, exc)
        return copies
    if pipe is None:
        return copies
    items = [(path, os.path.join(local_root, path), lsig, known.get(path)) for path, lsig, _, _ in small]

    def record(done: dict[str, Sent]) -> None:
        for path, lsig, _, _ in small:
            sent = done.get(path)
            if sent is not None and sent.outcome == "ok":
                uploaded(run, path, lsig, sent.sig, sent.digest)
                run.host.dirs.update(_ancestors(path))

    try:
        done, broke = send(pipe, items, lambda path, n: run.ticker(path)(n))
    except _Stopped as exc:
        record(exc.done)
        raise exc.__cause__ from None
    record(done)
    if broke:
        log.info("a bundle of files to %s ended early (%s): the rest go one at a time", run.name, broke)
    for path, sent in done.items():
        if sent.outcome == "error":
            log.info("the bundle could not write %s on %s: %s", path, run.name, sent.reason)
    bundled = {c[0] for c in small}
    return [
        (path, lsig, True, theirs) if path in bundled else (path, lsig, blind, theirs)
        for path, lsig, blind, theirs in copies
        if path not in done or done[path].outcome != "ok"
    ]
