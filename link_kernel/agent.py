"""Link's helper inside a kernel: the local kernel and every remote one.

This module is self-contained: it imports nothing of link_kernel, because a
remote host has only Python, ipykernel and dill (and maybe xxhash). The router
imports it by name in the local kernel; on a host, the bootstrap supervisor
executes its source as the module ``__link_agent__`` before the kernel starts.

**Remote kernels.** The agent wraps the kernel's execute_request handler, so a
routed cell costs one request. The router puts its instructions in the
request's metadata under ``"link"``::

    {"count": 7,                         the cell's execution count
     "store": "/home/ada/.cache/link-kernel/host-blobs",
     "algo": "xxh3t",                    how blobs are named and checked
     "inputs": {"df": "xxh3t-9f..."},    names to load from blobs
     "modules": {"np": "numpy"},         names to bind to imported modules
     "placeholders": ["old"],            names the cell deletes but never reads
     "outputs": null | ["model"]}        null: detect; a list: exactly these

Before the cell, the wrapper loads the inputs (a blob is unpickled only if its
content hash matches its name); if that fails the cell does not run. After a
cell that succeeded it publishes a ``link_result`` iopub message: the names
the cell bound or rebound, the inputs whose content it changed (compared by
content hash), the names it deleted, each new value written as a blob, and
the names that could not be serialized, with the reason.

**The local kernel.** The router calls :func:`export` (inputs of a remote
cell), :func:`apply` (its outputs, all or nothing) and :func:`record` with
silent execute requests, so nothing reaches the cell's outputs or history.

**Blobs** are files named ``ALGO-HEX`` after the hash of their whole content:
a header, the pickle (dill, protocol 5) and its out-of-band buffers (numpy
arrays travel without copies), each aligned to 64 bytes. They are loaded
through a private copy-on-write memory map, so a big array costs no read
until it is touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import re
import struct
import sys
import threading
import time
import types

NAME = "__link_agent__"
MAGIC = b"LINKBLOB1\n"
ALIGN = 64
_IPYTHON_NAMES = re.compile(r"_+|_i+|_i\d+|_\d+|_ih|_oh|_dh|In|Out|exit|quit|get_ipython")


# -- hashing -------------------------------------------------------------------------


def algorithms() -> list:
    """Hash algorithms this python has, fastest first."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return ["sha256"]
    return ["xxh3t", "sha256"]


def _hasher(algo: str):
    if algo == "xxh3t":
        return _Xxh3Tree()
    if algo == "xxh3":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash algorithm {algo!r}")


class _Xxh3Tree:
    """``xxh3t``: xxh3-128 of the xxh3-128s of the content's 64 MiB chunks and its length.

    The chunks are hashed side by side on every core (xxhash lets go of the
    GIL): a 1 GiB array hashes in about 0.08 s on two cores, against 0.13 s
    as one stream. It keeps references to what it is given until the digest.
    """

    CHUNK = 64 << 20

    def __init__(self) -> None:
        self._parts: list = []

    def update(self, data) -> None:
        view = memoryview(data)
        self._parts.append(view if view.format == "B" and view.ndim == 1 else view.cast("B"))

    def hexdigest(self) -> str:
        import xxhash

        chunks, current, room = [], [], self.CHUNK
        for view in self._parts:
            offset = 0
            while offset < view.nbytes:
                take = min(room, view.nbytes - offset)
                current.append(view[offset : offset + take])
                offset += take
                room -= take
                if not room:
                    chunks.append(current)
                    current, room = [], self.CHUNK
        if current or not chunks:
            chunks.append(current)

        def digest(pieces: list) -> bytes:
            h = xxhash.xxh3_128()
            for piece in pieces:
                h.update(piece)
            return h.digest()

        if len(chunks) == 1:
            digests = [digest(chunks[0])]
        else:
            digests = list(_hash_pool().map(digest, chunks))
        size = sum(view.nbytes for view in self._parts)
        return xxhash.xxh3_128(b"".join(digests) + struct.pack("<Q", size)).hexdigest()


@functools.lru_cache(maxsize=None)
def _hash_pool():
    """The threads that hash chunks, started once per process (not once per value)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="link-hash")


# -- serialization -------------------------------------------------------------------


def _to_host_memory(obj):
    """A GPU array or tensor as a CPU one; None for anything else.

    One small hook per library: torch tensors (and modules, whose parameters
    move in place; a remote kernel is discarded after the cell anyway) and
    cupy arrays. The local machine needs no GPU to load what comes back.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                return obj.detach().to("cpu")
            return None
        if isinstance(obj, torch.nn.Module):
            devices = {p.device.type for p in obj.parameters()} | {
                b.device.type for b in obj.buffers()
            }
            if devices - {"cpu"}:
                return obj.to("cpu")
            return None
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return cupy.asnumpy(obj)
    return None


def _process_bound_types() -> tuple:
    """Types whose values belong to the process that made them.

    dill would pickle some of them (a lock as a new lock, a file as its
    name), but what arrives is not the same thing, so they are refused.
    """
    import io
    import socket

    kinds = [
        type(threading.Lock()),
        type(threading.RLock()),
        threading.Condition,
        threading.Semaphore,
        threading.Event,
        threading.Thread,
        io.IOBase,
        socket.socket,
        types.GeneratorType,
        types.CoroutineType,
        types.AsyncGeneratorType,
        types.FrameType,
        types.TracebackType,
    ]
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        kinds.append(subprocess.Popen)
    return tuple(kinds)


class Refused(TypeError):
    """A value Link will not send; the message says why."""


def _refusal(obj) -> str:
    if isinstance(obj, types.GeneratorType):
        return "a generator's position cannot be sent; turn it into a list first"
    if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
        return "a running coroutine cannot be sent"
    kind = type(obj).__name__
    return f"a {kind} belongs to the process that made it and cannot be sent"


_PICKLER = None
_ATOMIC = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _pickler_class():
    """dill's pickler with Link's reducers (made once; numpy may come later).

    Besides numpy's out-of-band buffers, process-bound refusals and the GPU hook,
    it decides how classes and functions travel (see :func:`_code_reference`)
    and, as it meets the notebook's own ones, notes the global names they use
    in ``reached``: the one pass over the value finds what it needs.
    """
    global _PICKLER
    if _PICKLER is not None:
        return _PICKLER
    import dill

    bound = _process_bound_types()

    class Pickler(dill.Pickler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            #: global names used by the notebook functions and classes pickled by value
            self.reached: set = set()

        def reducer_override(self, obj):
            if type(obj) in _ATOMIC:  # most objects of a big list or dict: no hook applies
                return NotImplemented
            numpy = sys.modules.get("numpy")
            if numpy is not None and type(obj) is numpy.ndarray and not obj.dtype.hasobject:
                return obj.__reduce_ex__(5)
            if type(obj) is types.FunctionType or isinstance(obj, type):
                return _code_reference(obj, self.reached)
            if isinstance(obj, bound):
                raise Refused(_refusal(obj))
            with_grad = _tensor_with_grad(obj)
            if with_grad is not None:
                return with_grad
            moved = _to_host_memory(obj)
            if moved is not None:
                return _identity, (moved,)
            return NotImplemented

    _PICKLER = Pickler
    return Pickler


def _identity(value):
    return value


def _tensor_with_grad(obj):
    """The reduction of a torch leaf tensor (a parameter, say) with its gradient; None
    for anything else. torch's own reduction leaves ``.grad`` out, and a plain
    kernel still has it after the cell (``loss.backward()``, then the cell ends).
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor) or not obj.is_leaf:
        return None
    grad = obj.grad
    if grad is None or obj.device.type != "cpu":
        return None  # (a GPU tensor comes to the CPU through _to_host_memory)
    reduced = obj.__reduce_ex__(5)
    if not isinstance(reduced, tuple) or len(reduced) != 2:
        return None
    return _rebuilt_with_grad, (reduced[0], reduced[1], grad)


def _rebuilt_with_grad(rebuild, args, grad):
    tensor = rebuild(*args)
    tensor.grad = grad
    return tensor


def _code_reference(obj, reached: set):
    """How the pickler saves a class or a function: its qualified name, or by value.

    One the notebook defined (``__main__``) goes by value, through dill, and the
    global names its code uses go into ``reached``: the pickler meets its
    methods, properties, base classes, closures and defaults as it goes, so
    each of them adds its own. One that its module holds under its qualified
    name goes by reference, looked up in ``sys.modules``: dill's own lookup
    goes through the package's attributes and misses a submodule its package
    deleted (``torch.optim`` deletes ``sgd``), and then pickles the library's
    class by value, with every global its methods reach (and fails on one,
    such as typing_extensions' sentinels, that must not be copied).
    """
    module = getattr(obj, "__module__", None)
    if module == "__main__":
        code = getattr(obj, "__code__", None)
        if code is not None:
            reached |= _code_globals(code)
        return NotImplemented
    qualname = getattr(obj, "__qualname__", None)
    home = sys.modules.get(module) if isinstance(module, str) else None
    if home is None or not isinstance(qualname, str) or "<locals>" in qualname:
        return NotImplemented
    found = home
    for part in qualname.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            return NotImplemented
    return qualname if found is obj else NotImplemented


#: Bytecodes that name a global (or, in a class body, a name resolved as one).
_GLOBAL_OPS = frozenset({
    "LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME",
    "DELETE_NAME", "LOAD_FROM_DICT_OR_GLOBALS",
})


@functools.lru_cache(maxsize=4096)
def _code_globals(code) -> frozenset:
    """The global names a code object and the code nested in it use.

    Read from the bytecode, so an attribute (``self.data``) is not taken for
    the global ``data``.
    """
    import dis

    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_globals(const)
    return frozenset(n for n in names if isinstance(n, str))


#: (id of the value, the global names its notebook code uses) of the last dumps.
_LAST_REACHED: tuple = (None, frozenset())


def dumps(value) -> tuple:
    """(pickle bytes, out-of-band buffers) of a value.

    The global names the notebook functions and classes in it use are kept
    for :func:`_referenced_globals`.
    """
    import io

    global _LAST_REACHED
    buffers: list = []
    out = io.BytesIO()
    pickler = _pickler_class()(out, protocol=5, buffer_callback=buffers.append, byref=False)
    _LAST_REACHED = (None, frozenset())
    pickler.dump(value)
    _LAST_REACHED = (id(value), frozenset(pickler.reached))
    views = []
    for buf in buffers:
        raw = buf.raw()
        views.append(raw if raw.contiguous else memoryview(bytes(raw)))
    return out.getvalue(), views


def _pad(n: int) -> int:
    return (-n) % ALIGN


def _layout(pickled: bytes, views: list) -> list:
    """Every part of a blob file, in order."""
    header = json.dumps({"pickle": len(pickled), "buffers": [v.nbytes for v in views]}).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    parts = [head, b"\0" * _pad(len(head)), pickled, b"\0" * _pad(len(pickled))]
    for view in views:
        parts += [view, b"\0" * _pad(view.nbytes)]
    return parts


def blob_of(value, algo: str) -> tuple:
    """(blob id, parts to write) of a value."""
    pickled, views = dumps(value)
    parts = _layout(pickled, views)
    hasher = _hasher(algo)
    for part in parts:
        hasher.update(part)
    return f"{algo}-{hasher.hexdigest()}", parts


#: Values whose blob is at most this big travel inside the messages (base64),
#: not as files: a small variable costs no file and no transfer round trip.
INLINE_MAX = 64 * 1024


def _size(parts: list) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


#: The suffix of a blob that came by transfer and is not checked yet: the first
#: load checks it against its name and drops the suffix. A blob without it was
#: written by this side (from the value itself) or checked already, so loading
#: it costs no hashing: an unchanged 1 GiB input loads in microseconds, not
#: the ~0.1 s of hashing it again.
UNCHECKED = ".in"


def store_parts(store: str, blob_id: str, parts: list) -> None:
    """Write a blob file (atomically); an existing one is only touched."""
    path = os.path.join(store, blob_id)
    if os.path.exists(path):
        os.utime(path)
        return
    os.makedirs(store, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        os.unlink(path + UNCHECKED)  # the same content, checked now
    except OSError:
        pass


def write_blob(store: str, value, algo: str) -> tuple:
    """Store a value; return (blob id, size). An existing blob is only touched."""
    blob_id, parts = blob_of(value, algo)
    store_parts(store, blob_id, parts)
    return blob_id, _size(parts)


def describe(value, blob_id: str, parts: list, store: str) -> dict:
    """What a manifest says of a value: small ones inline, big ones as blob files."""
    import base64

    size = _size(parts)
    entry = {"id": blob_id, "size": size, "type": _type_name(value)}
    if size <= INLINE_MAX:
        entry["inline"] = base64.b64encode(b"".join(bytes(p) for p in parts)).decode()
    else:
        store_parts(store, blob_id, parts)
    return entry


def load_entry(store: str, entry, write: bool = False):
    """A value from a manifest entry: inline data, or a blob id in ``store``
    (see :func:`read_blob` for ``write``)."""
    if isinstance(entry, dict) and "inline" in entry:
        import base64

        return _load(entry["id"], memoryview(bytearray(base64.b64decode(entry["inline"]))))
    return read_blob(store, entry["id"] if isinstance(entry, dict) else entry, write)


class BlobError(Exception):
    """A blob is missing, corrupt, or does not match its name."""


def has_blob(store: str, blob_id: str) -> bool:
    """Whether ``store`` holds the blob, checked or not."""
    path = os.path.join(store, blob_id)
    return os.path.exists(path) or os.path.exists(path + UNCHECKED)


def read_blob(store: str, blob_id: str, write: bool = False):
    """Load a blob file; one that came by transfer is refused unless its content
    hash matches its name (then it is marked checked).

    By default the file is mapped copy-on-write: nothing is read until touched,
    best for values that are mostly read. ``write=True``, for values the cell
    changes, reads it into a private copy at once (see :func:`_private_copy`):
    writing to a copy-on-write map costs a page fault per 4 KiB (about 0.8 s
    per GiB here). A copy a standby made ahead of the cell is used if there is one.
    """
    path = os.path.join(store, blob_id)
    ready = _take_preloaded(blob_id)
    if ready is not None:
        view, checked = memoryview(ready), True
    else:
        view, checked = _read_view(path, blob_id, write)
    value = _load(blob_id, view, check=not checked)
    if not checked:
        try:
            os.replace(path + UNCHECKED, path)
        except OSError:
            pass  # another kernel checked it first, or a read-only store
    try:
        os.utime(path)
    except OSError:
        pass
    return value


def _read_view(path: str, blob_id: str, write: bool) -> tuple:
    """(the blob's bytes, whether it is checked): ``path``, else ``path`` + UNCHECKED."""
    checked = True
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        checked = False
        try:
            f = open(path + UNCHECKED, "rb", buffering=0)
        except FileNotFoundError:
            raise BlobError(f"blob {blob_id} is missing") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return memoryview(b""), checked
        if write:
            return memoryview(_private_copy(f, size)), checked
        return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)), checked


#: Values at least this big are copied into transparent huge pages.
_HUGE_MIN = 2 << 20


def _private_copy(f, size: int) -> mmap.mmap:
    """The ``size`` bytes of the open (unbuffered) file ``f``, read into anonymous memory.

    Values from 2 MiB up ask for transparent huge pages (Linux, ``madvise`` mode
    or ``always``). Measured here for 1 GiB, against a copy-on-write map made
    private with MADV_POPULATE_WRITE: the copy takes 0.4 s instead of 0.73,
    ``a *= 2`` over it 0.13 s instead of 0.19, and the process ends in 4 ms
    instead of 73 (the kernel frees 512 pages, not 262,144), which is time a
    released remote cell's reply waits for. Where huge pages are off, the
    same code gets ordinary pages.
    """
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
    mapped = mmap.mmap(-1, size, **private)  # shared anonymous memory gets no huge pages
    if size >= _HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    view = memoryview(mapped)
    try:
        done = 0
        while done < size:  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise BlobError(f"{f.name} ended at {done} of {size} bytes")
            done += n
    finally:
        view.release()
    return mapped


# -- a standby holds the last cell's data ready ------------------------------------------

class _Preload:
    """One blob a standby copies ahead of the cell (see :func:`preload`)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.started = False  # the copy is under way: a taker waits for it
        self.wanted = True  # False: taken before it started, or dropped; not copied
        self.copy = None


#: blob id -> _Preload, in a standby kernel; _PRELOAD_LOCK guards started/wanted
_PRELOADED: dict = {}
_PRELOADED_BYTES = 0
_PRELOAD_LOCK = None
#: The blobs a cell took from the preloaded copies.
_TAKEN: set = set()


def preloaded() -> int:
    """The bytes :func:`preload` took on."""
    return _PRELOADED_BYTES


def preload(store: str, ids: list, budget: int) -> int:
    """Make private copies of these (checked) blobs in the background; return the bytes.

    Run in a warm standby kernel with the blobs of the cell before: a cell run
    again, or the next one working on the same data, finds its inputs in
    memory, copied and ready to change, where a fresh kernel would spend
    about 0.5 s per GiB making them. At most ``budget`` bytes, and at most
    half of the memory the host has available. Only raw bytes are read; nothing
    is unpickled until a cell asks for it, but the data libraries the values
    need are imported (numpy: ~0.1 s), as the cell would.
    """
    store = os.path.expanduser(store)
    sizes = {}
    for blob_id in ids:
        try:
            sizes[blob_id] = os.path.getsize(os.path.join(store, blob_id))
        except OSError:
            continue  # gone, or not checked yet
    global _PRELOADED_BYTES, _PRELOAD_LOCK
    total = sum(sizes.values())
    if not sizes or total > min(budget, _available_memory() // 2):
        return 0
    for blob_id in sizes:  # here, on the main thread: imports in a thread can race the cell's
        _import_what_it_needs(os.path.join(store, blob_id))
    _PRELOADED_BYTES = total
    _PRELOAD_LOCK = lock = threading.Lock()
    slots = {blob_id: _Preload() for blob_id in sizes}
    _PRELOADED.update(slots)

    def run() -> None:
        for blob_id, slot in slots.items():
            try:
                with lock:
                    if not slot.wanted:
                        continue
                    slot.started = True
                with open(os.path.join(store, blob_id), "rb", buffering=0) as f:
                    slot.copy = _private_copy(f, sizes[blob_id])
            except (OSError, ValueError, BlobError):
                pass
            finally:
                slot.done.set()

    threading.Thread(target=run, name="link-preload", daemon=True).start()
    return total


#: What a standby may import ahead of a cell: data libraries whose import runs no
#: code of the user's and takes no device memory (torch or jax, say, are left to
#: the cell, and so are the user's own modules).
PRELOAD_IMPORTS = frozenset({"numpy", "pandas", "pyarrow", "scipy", "polars", "xarray"})


def _import_what_it_needs(path: str) -> None:
    """Import the data libraries a blob's pickle refers to (numpy, pandas, ...), quietly."""
    import importlib
    import pickletools

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            (hlen,) = struct.unpack_from("<Q", head, len(MAGIC))
            start = len(MAGIC) + 8
            header = json.loads(head[start : start + hlen])
            f.seek(start + hlen + _pad(start + hlen))
            pickled = f.read(min(header["pickle"], 1 << 20))
        modules, strings = set(), []
        for op, arg, _ in pickletools.genops(pickled):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                modules.add(strings[-2])
            elif op.name == "GLOBAL" and isinstance(arg, str):
                modules.add(arg.split(" ")[0])
    except Exception:  # a truncated pickle (over 1 MiB), an odd blob: the cell imports
        return
    for module in sorted(m for m in modules if m.partition(".")[0] in PRELOAD_IMPORTS):
        try:
            importlib.import_module(module)
        except Exception:
            pass


def _take_preloaded(blob_id: str):
    """A blob's preloaded private copy, once; None if there is none or its copy has not
    started (the caller loads it itself). A copy under way is waited for."""
    slot = _PRELOADED.pop(blob_id, None)
    if slot is None:
        return None
    with _PRELOAD_LOCK:
        if not slot.started:
            slot.wanted = False
            return None
    slot.done.wait()
    if slot.copy is not None:
        _TAKEN.add(blob_id)
    return slot.copy


def _drop_preloaded() -> None:
    """Free the preloaded copies no cell took, in the background."""
    slots = list(_PRELOADED.values())
    _PRELOADED.clear()
    if not slots:
        return
    with _PRELOAD_LOCK:
        for slot in slots:
            slot.wanted = False
    slots = [slot for slot in slots if slot.started]

    def free() -> None:
        for slot in slots:
            slot.done.wait()
        while slots:
            mapped = slots.pop().copy
            if mapped is not None:
                mapped.close()  # munmap, without the GIL: 8 ms for 1 GiB of huge pages

    threading.Thread(target=free, name="link-preload-free", daemon=True).start()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _load(blob_id: str, view: memoryview, check: bool = True):
    algo, _, digest = blob_id.partition("-")
    if check:
        hasher = _hasher(algo)
        hasher.update(view)
        if hasher.hexdigest() != digest:
            raise BlobError(f"blob {blob_id} does not match its hash; refusing to unpickle it")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise BlobError(f"blob {blob_id} is not a Link blob")
    (hlen,) = struct.unpack_from("<Q", view, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(bytes(view[start : start + hlen]))
    offset = start + hlen
    offset += _pad(offset)
    pickled = view[offset : offset + header["pickle"]]
    offset += header["pickle"] + _pad(header["pickle"])
    buffers = []
    for n in header["buffers"]:
        buffers.append(view[offset : offset + n])
        offset += n + _pad(n)
    import dill

    return dill.loads(pickled, buffers=buffers)


def trim_store(store: str, cap: int) -> None:
    """Delete the least recently used blobs until the store holds at most ``cap`` bytes."""
    try:
        entries = [e for e in os.scandir(store) if e.is_file() and "-" in e.name]
    except FileNotFoundError:
        return
    stats = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in entries]
    total = sum(s for _, s, _ in stats)
    for _, size, path in sorted(stats):
        if total <= cap:
            return
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size


# -- names ---------------------------------------------------------------------------


_MISSING = object()


def _is_user_name(shell, name: str) -> bool:
    """A name the user bound, not one IPython put there (In, Out, _i3, open...)."""
    if name.startswith("__") or _IPYTHON_NAMES.fullmatch(name):
        return False
    hidden = getattr(shell, "user_ns_hidden", {}).get(name, _MISSING)
    return hidden is _MISSING or shell.user_ns.get(name, _MISSING) is not hidden


def _type_name(value) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Refused):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _referenced_globals(value, ns: dict) -> set:
    """Names of the namespace ``ns`` that the notebook functions and classes a value
    reaches use, however deep (in a list, an instance, a partial, an estimator).

    Found while :func:`dumps` pickled the value (call it after); nothing if the
    last value pickled was another one.
    """
    ident, names = _LAST_REACHED
    if ident != id(value):
        return set()
    return {n for n in names if n in ns}


def export(shell, names: list, store: str, algo: str, placeholders: list = ()) -> str:
    """Write the named values of the user namespace as blobs (local side).

    Notebook functions and classes bring along the notebook names they use.
    Returns a JSON manifest: {"values": {name: {id, size, type}},
    "modules": {name: module}, "errors": {name: {type, reason}}, "missing": [...],
    "placeholders": [...]}: ``placeholders`` are names whose value the cell never
    uses (it only deletes them); only whether they exist is reported.
    """
    ns = shell.user_ns
    manifest: dict = {"values": {}, "modules": {}, "errors": {}, "missing": []}
    manifest["placeholders"] = [n for n in placeholders if n in ns and _is_user_name(shell, n)]
    todo = list(dict.fromkeys(names))
    seen = set(todo)
    while todo:
        name = todo.pop(0)
        if name not in ns or not _is_user_name(shell, name):
            manifest["missing"].append(name)
            continue
        value = ns[name]
        if isinstance(value, types.ModuleType):
            manifest["modules"][name] = value.__name__
            continue
        try:
            blob_id, parts = blob_of(value, algo)
            manifest["values"][name] = describe(value, blob_id, parts, store)
        except Exception as exc:
            manifest["errors"][name] = {"type": _type_name(value), "reason": _reason(exc)}
        for extra in sorted(_referenced_globals(value, ns) - seen):  # found by the pickling
            if _is_user_name(shell, extra):
                seen.add(extra)
                todo.append(extra)
    manifest["unsent"] = unsent_names(shell, seen)
    return json.dumps(manifest)


#: At most this many local names (of at most 64 characters) go with a cell for
#: the NameError hint (see :func:`_explain_name_errors`): a few KiB at most.
UNSENT_MAX = 2000


def unsent_names(shell, sent) -> list:
    """The user's local names that do not go with the cell (capped)."""
    names = []
    for name in shell.user_ns:
        if len(names) >= UNSENT_MAX:
            break
        if name not in sent and len(name) <= 64 and _is_user_name(shell, name):
            names.append(name)
    return names


def user_names(shell) -> list:
    """The user's names in the namespace (for in= checks and status)."""
    return [n for n in shell.user_ns if _is_user_name(shell, n)]


def apply(shell, values: dict, deleted: list, store: str, modules: dict = None) -> str:
    """Bind returned values and delete deleted names: all that load, at once.

    Every blob is loaded (and every module imported) first; only then is the
    namespace changed, in one step. A value that fails to load is reported
    and its name left as it was. Returns a JSON list of {name, reason}.
    """
    import importlib

    loaded = {}
    failures = []
    for name, entry in values.items():
        try:
            loaded[name] = load_entry(store, entry)
        except Exception as exc:
            failures.append({"name": name, "reason": _reason(exc)})
    for name, module in (modules or {}).items():
        try:
            loaded[name] = importlib.import_module(module)
        except Exception as exc:
            failures.append({"name": name, "reason": _reason(exc)})
    ns = shell.user_ns
    ns.update(loaded)
    for name in deleted:
        ns.pop(name, None)
    return json.dumps(failures)


def warm() -> None:
    """Import what moving variables needs, before a cell waits for it (~25 ms)."""
    import dill  # noqa: F401

    try:
        import xxhash  # noqa: F401
    except ImportError:
        pass
    _pickler_class()


def record(shell, code: str) -> int:
    """Record a cell the router ran elsewhere, as IPython records its own cells.

    The cell goes into the input history under the current execution count,
    and the count moves on, so the local kernel stays the notebook's record of
    every cell whatever ran it. Returns the count the cell got.
    """
    count = shell.execution_count
    shell.history_manager.store_inputs(count, code, code)
    shell.execution_count = count + 1
    return count


# -- the remote side -------------------------------------------------------------------


class _Placeholder:
    """Bound to a name a cell deletes without reading it, so ``del`` works."""

    def __repr__(self) -> str:
        return "<deleted by this cell>"


class Cell:
    """What the wrapper knows about the routed cell it runs."""

    def __init__(self, shell, instructions: dict) -> None:
        self.shell = shell
        self.store = os.path.expanduser(instructions.get("store") or "")
        self.algo = instructions.get("algo") or algorithms()[0]
        #: name -> blob id, or {"id", "inline"} for a small value sent inline
        self.inputs = dict(instructions.get("inputs") or {})
        self.modules = dict(instructions.get("modules") or {})
        self.placeholders = list(instructions.get("placeholders") or [])
        self.inplace = set(instructions.get("inplace") or ())
        self.outputs = instructions.get("outputs")
        self.cap = int(instructions.get("cap") or 0)
        self.scan = instructions.get("scan")
        self.before: dict = {}
        #: Inputs the standby had ready in memory (see preload).
        self.ready: list = []

    def load(self) -> None:
        """Bind the inputs; raise before the cell runs if any cannot be loaded."""
        import importlib

        values = {}
        for name, entry in self.inputs.items():
            try:  # mapped: an input the cell only reads costs no copy at all
                values[name] = load_entry(self.store, entry, write=name in self.inplace)
                if self._input_id(name) in _TAKEN:
                    self.ready.append(name)
            except Exception as exc:
                raise RuntimeError(f"input {name!r} could not be loaded: {_reason(exc)}") from exc
        for name, module in self.modules.items():
            values[name] = importlib.import_module(module)
        placeholder = _Placeholder()
        for name in self.placeholders:
            values.setdefault(name, placeholder)
        _drop_preloaded()  # what the cell does not use goes (its memory with it)
        ns = self.shell.user_ns
        ns.update(values)
        self.before = {n: v for n, v in ns.items() if _is_user_name(self.shell, n)}

    def result(self) -> dict:
        """What changed: written blobs, deletions and serialization failures."""
        ns = self.shell.user_ns
        now = {n: v for n, v in ns.items() if _is_user_name(self.shell, n)}
        if self.outputs is not None:
            changed = [n for n in self.outputs if n in now]
            deleted = [n for n in self.outputs if n not in now and n in self.before]
        else:
            changed = [
                n
                for n, v in now.items()
                if (n not in self.before or v is not self.before[n])
                and not isinstance(v, (_Placeholder, types.ModuleType))
            ]
            deleted = [n for n in self.before if n not in now]
        out: dict = {"values": {}, "modules": {}, "deleted": deleted, "errors": {}}
        for name in changed:
            value = now[name]
            if isinstance(value, types.ModuleType):
                out["modules"][name] = value.__name__
                continue
            self._export(name, value, out)
        if self.outputs is None:
            for name in self.inputs:
                if name in now and name not in changed:
                    self._export(name, now[name], out)  # comes back only if it changed
        _bring_reached(self, out, now)
        if self.cap:
            trim_store(self.store, self.cap)
        return out

    def _input_id(self, name: str):
        entry = self.inputs.get(name)
        return entry.get("id") if isinstance(entry, dict) else entry

    def _export(self, name: str, value, out: dict) -> None:
        """Add a value to the result, unless it is an input the cell left as it was."""
        try:
            blob_id, parts = blob_of(value, self.algo)
            _note_reached(self, value)
            if self.outputs is None and self._input_id(name) == blob_id:
                return
            out["values"][name] = describe(value, blob_id, parts, self.store)
        except Exception as exc:
            out["errors"][name] = {"type": _type_name(value), "reason": _reason(exc)}


def _note_reached(cell: Cell, value) -> None:
    """Keep the names the notebook code in a value just pickled uses (see dumps)."""
    cell.__dict__.setdefault("reached", set()).update(_referenced_globals(value, cell.shell.user_ns))


def _bring_reached(cell: Cell, out: dict, now: dict) -> None:
    """With ``out=``, the names the code in the outputs uses come back too, if this
    cell bound them: a class made here must work locally, with its globals.

    (Without ``out=`` every name the cell bound comes back anyway, and the
    others are the local kernel's own.)
    """
    if cell.outputs is None:
        return
    done = set(cell.outputs)
    todo = sorted(cell.__dict__.get("reached", set()) - done)
    while todo:
        name = todo.pop(0)
        if name in done or name not in now or not _is_user_name(cell.shell, name):
            continue
        done.add(name)
        value = now[name]
        if name in cell.before and value is cell.before[name]:
            continue  # the local kernel has it
        if isinstance(value, types.ModuleType):
            out["modules"][name] = value.__name__
            continue
        cell._export(name, value, out)
        todo.extend(sorted(cell.__dict__.get("reached", set()) - done))


def install(shell, wrap: bool = True) -> None:
    """Register the agent, the no-op ``%link`` magic and (remote) the execute wrapper.

    ``%link`` lines are handled by the router. The kernel still sees them (the
    router forwards cells unchanged, so tracebacks keep the cell's line
    numbers), and for the kernel they do nothing.
    """
    module = sys.modules.get(__name__)
    if module is not None:
        sys.modules[NAME] = module

    def link(line: str) -> None:
        """Handled by the Link router; a no-op inside a kernel."""

    shell.register_magic_function(link, "line", "link")
    kernel = getattr(shell, "kernel", None)
    handlers = getattr(kernel, "shell_handlers", None)
    if wrap and handlers is not None and "execute_request" in handlers:
        handlers["execute_request"] = _wrap_execute(shell, kernel, handlers["execute_request"])
        _lean_exit(shell, kernel)
    elif handlers is not None:
        handlers[RECORD_REQUEST] = _record_handler(shell, kernel)


#: The router's request to the local kernel to record a cell that ran elsewhere.
RECORD_REQUEST = "link_record_request"


def _record_handler(shell, kernel):
    """Serve ``link_record_request`` ({"code": ...}): :func:`record`, and a reply
    with the count the cell got. A silent execute_request did the same through
    IPython's whole cell machinery, ten times the CPU, while the remote cell
    it records runs on the same machine's cores."""

    async def link_record_request(stream, ident, parent):
        try:
            content = {"status": "ok", "execution_count": record(shell, parent["content"]["code"])}
        except Exception as exc:
            content = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": []}
        kernel.session.send(stream, "link_record_reply", content, parent, ident=ident)

    return link_record_request


def _lean_exit(shell, kernel) -> None:
    """End a per-cell kernel in milliseconds when the router asks it to.

    A released kernel's process simply ends: its replies have all arrived.
    On the router's shutdown_request it runs the atexit hooks the user
    registered, flushes every open file and exits, skipping what only a
    long-lived kernel needs: IPython's exit hook (namespace reset, garbage
    collection, history) and ipykernel's socket teardown, which together
    take from 50 ms to a second (zmq linger).
    """
    import atexit

    atexit.unregister(shell.atexit_operations)
    try:
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            app = IPKernelApp.instance()
            atexit.unregister(app.close)
            if getattr(app, "iopub_thread", None) is not None:
                # prepare_exit runs the atexit hooks right after link_result is
                # queued for this thread; stopping it there could drop the message
                # (the loop's stop can run before the queued send), and the router
                # would wait for it forever.
                atexit.unregister(app.iopub_thread.stop)
                global _IOPUB
                _IOPUB = app.iopub_thread
    except ImportError:
        pass
    _keep_messaging_up()

    def remove_tempfiles() -> None:
        for path in list(getattr(shell, "tempfiles", [])):
            try:
                os.unlink(path)
            except OSError:
                pass

    atexit.register(remove_tempfiles)
    _track_open_files(shell)
    handlers = getattr(kernel, "control_handlers", None)
    if handlers is not None and "shutdown_request" in handlers:

        async def shutdown_request(stream, ident, parent):
            exit_now(0)

        handlers["shutdown_request"] = shutdown_request


_OPEN_FILES = None


def _track_open_files(shell) -> None:
    """Remember every file a cell opens with ``open``, so it can be flushed.

    Wraps ``io.open``/``builtins.open`` and IPython's own ``open`` of the user
    namespace (which calls the io.open it imported, not the module's).
    """
    global _OPEN_FILES
    import builtins
    import io
    import weakref

    if _OPEN_FILES is not None:
        return
    _OPEN_FILES = weakref.WeakSet()

    def tracking(original):
        def tracked_open(*args, **kwargs):
            f = original(*args, **kwargs)
            try:
                _OPEN_FILES.add(f)
            except TypeError:
                pass
            return f

        tracked_open.__wrapped__ = original
        tracked_open.__doc__ = original.__doc__
        return tracked_open

    io.open = builtins.open = tracking(io.open)
    ns_open = shell.user_ns.get("open")
    if ns_open is not None and ns_open is not io.open:
        wrapped = tracking(ns_open)
        shell.user_ns["open"] = wrapped
        if "open" in shell.user_ns_hidden:
            shell.user_ns_hidden["open"] = wrapped


def flush_open_files() -> None:
    for f in list(_OPEN_FILES or ()):
        try:
            if not f.closed:
                f.flush()
        except Exception:
            pass


#: Held while the exit is prepared; True once it is.
_EXIT_LOCK = threading.Lock()
_EXIT_PREPARED = False
#: ipykernel's IOPub thread, which sends every iopub message (see _drain_iopub).
_IOPUB = None


def _keep_messaging_up() -> None:
    """Keep pyzmq's own exit hook out of the early exit (:func:`prepare_exit`).

    That hook stops pyzmq's garbage collector, which every zero-copy send (any
    frame over 64 KiB: a big ``link_result``, a long stream) relies on: run while
    the IOPub thread still sends, the frame's memory is freed under libzmq (the
    router sees a bad signature) or the send fails half-way. The process ends by
    ``os._exit``, which needs no hook of pyzmq's.
    """
    import atexit

    try:  # imported now: pyzmq imports it at the first zero-copy send, hook and all
        from zmq.utils.garbage import gc
    except ImportError:
        return
    atexit.unregister(gc._atexit)


def _drain_iopub(timeout: float = 10.0) -> None:
    """Wait until the IOPub thread has handed every message queued so far to zmq.

    Messages are queued for that thread in order, so a marker queued now runs
    after the cell's last message (``link_result``) has left the process's hands.
    """
    thread = _IOPUB
    if thread is None or threading.current_thread() is getattr(thread, "thread", None):
        return
    sent = threading.Event()
    try:
        thread.schedule(sent.set)
    except Exception:
        return
    sent.wait(timeout)


def prepare_exit() -> None:
    """Run the atexit hooks and flush open files and stdio, once.

    Run when the kernel's last cell is over and its shutdown is on the way,
    so that the shutdown only has to end the process. A shutdown request that
    arrives (on ipykernel's control thread) while the hooks still run waits
    for them: a hook that saves a model takes what time it takes.
    """
    global _EXIT_PREPARED
    import atexit

    with _EXIT_LOCK:
        if _EXIT_PREPARED:
            return
        _drain_iopub()  # the hooks run once the cell's messages are out, not during
        try:
            atexit._run_exitfuncs()
        finally:
            _EXIT_PREPARED = True
            flush_open_files()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass


def exit_now(status: int) -> None:
    """Prepare the exit (if not done), end the process (no interpreter teardown)."""
    try:
        prepare_exit()
    finally:
        os._exit(status)


def _wrap_execute(shell, kernel, original):
    async def execute_request(stream, ident, parent):
        instructions = (parent.get("metadata") or {}).get("link")
        if not isinstance(instructions, dict):
            return await _call(original, stream, ident, parent)
        count = instructions.get("count")
        if isinstance(count, int) and count > 0:
            shell.execution_count = count
        cell = Cell(shell, instructions)
        started = time.perf_counter()
        try:
            cell.load()
        except KeyboardInterrupt:
            _refuse(shell, kernel, stream, ident, parent, "interrupted before the cell ran",
                    "KeyboardInterrupt")
            return None
        except Exception as exc:
            _refuse(shell, kernel, stream, ident, parent, exc)
            return None
        loaded = time.perf_counter() - started
        _explain_name_errors(shell, instructions)
        replying = _ReplyCopy(stream)
        result = None
        try:
            result = await _call(original, replying, ident, parent)
        except KeyboardInterrupt:
            # An interrupt that lands between ipykernel's execute_input and the
            # cell itself escapes ipykernel's handler, which then sends no reply.
            if replying.reply is None:
                _refuse(shell, kernel, replying, ident, parent, "interrupted before the cell began",
                        "KeyboardInterrupt", echo=False)
        last = getattr(shell, "last_execution_result", None)
        succeeded = (replying.reply is None or replying.ok) and last is not None and last.success
        content: dict = {"succeeded": succeeded, "ready": cell.ready}
        if replying.reply is not None:  # the router needs nothing after this message
            content["reply"] = replying.reply
        started = time.perf_counter()
        if succeeded and instructions.get("store"):
            try:
                content.update(cell.result())
            except (Exception, KeyboardInterrupt) as exc:  # nothing comes back; the cell ran
                content["errors"] = {"*": {"type": "", "reason": _reason(exc)}}
        if cell.scan:  # files come back whether or not the cell succeeded
            flush_open_files()  # what the cell wrote to files it left open counts
            scan = globals().get("scan_tree")
            try:
                now = scan(cell.scan["root"], cell.scan.get("prune", ()))
                content.update(scan_report(now, cell.scan))
            except (Exception, KeyboardInterrupt) as exc:
                content["files_error"] = _reason(exc)
        content["timings"] = {"load": loaded, "save": time.perf_counter() - started}
        kernel.session.send(kernel.iopub_socket, "link_result", content, parent=parent)
        if instructions.get("release"):  # the router's shutdown_request is on its way
            prepare_exit()
        return result

    execute_request.__wrapped__ = original
    return execute_request


#: What the NameError hint of the running cell needs: the host's name, the names
#: the cell was sent, and the local names it was not.
_UNSENT: dict = {}


def _explain_name_errors(shell, instructions: dict) -> None:
    """Make a NameError for a name the local kernel has say so, and how to send it.

    A name the cell reaches dynamically (``eval('df1')``, ``globals()[name]``)
    is invisible to the router's analysis, so it is not sent. IPython's
    custom exception hook rewrites the message of such a NameError and shows
    the cell's own traceback as usual. A handler the user set is left alone.
    """
    _UNSENT.clear()
    _UNSENT.update(
        host=str(instructions.get("host") or "this host"),
        names=set(instructions.get("unsent") or ()),
        sent=sorted({*(instructions.get("inputs") or {}), *(instructions.get("modules") or {})}),
    )
    if not _UNSENT["names"]:
        return
    if getattr(shell, "custom_exceptions", None) == ():  # once: the handler reads _UNSENT
        shell.set_custom_exc((NameError,), _name_error_shown)


def _name_error_shown(shell, etype, value, tb, tb_offset=None):
    name = getattr(value, "name", None)
    if (
        isinstance(name, str)
        and name in _UNSENT.get("names", ())
        and name not in shell.user_ns
        and value.args == (f"name {name!r} is not defined",)
    ):
        names = ",".join([*_UNSENT["sent"], name])
        value.args = (
            f"name {name!r} is not defined on {_UNSENT['host']}; it exists in the local kernel, "
            "but the cell does not name it directly, so Link did not send it: add "
            f"in={names} to the routing comment",
        )
    shell.showtraceback((etype, value, tb), tb_offset=tb_offset)


class _ReplyCopy:
    """The shell stream, keeping a copy of the execute_reply sent through it.

    ``link_result`` carries the copy, so the router has the whole cell from
    iopub alone (outputs, then the result, in order) and can release the
    kernel without waiting for the reply and the idle to come in on their
    own sockets.
    """

    def __init__(self, stream) -> None:
        import zmq.asyncio

        if isinstance(stream, zmq.asyncio.Socket):  # as Session.send would
            stream = zmq.Socket.shadow(stream.underlying)
        self._stream = stream
        self.reply = None

    @property
    def ok(self) -> bool:
        return self.reply is not None and self.reply["content"].get("status") == "ok"

    def send_multipart(self, frames, *args, **kwargs):
        try:
            i = next(n for n, f in enumerate(frames) if bytes(f) == b"<IDS|MSG>")
            header = json.loads(bytes(frames[i + 2]))
            if header.get("msg_type") == "execute_reply":
                self.reply = {
                    "metadata": json.loads(bytes(frames[i + 4])),
                    "content": json.loads(bytes(frames[i + 5])),
                }
        except (StopIteration, ValueError, IndexError, TypeError):
            pass
        return self._stream.send_multipart(frames, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def scan_report(now: dict, request: dict) -> dict:
    """The work directory's scan for the router: whole, or what changed since the last.

    The router names the scan it holds (``since``, a token this function made);
    if this host still has that scan (``ROOT/.link/scan-ID``), only the paths
    that differ from it travel. Either way the new scan is kept under a new
    token. A scan of 10,000 files is ~0.5 MB of JSON to send, sign and parse;
    an unchanged one is a few bytes. The scan is kept as one string, an entry
    per file, because comparing strings costs a fresh kernel a tenth of what
    loading 10,000 lists back would.
    """
    import secrets

    folder = os.path.join(request["root"], ".link")
    name = "scan-" + "".join(c for c in str(request.get("id", "")) if c.isalnum())
    path = os.path.join(folder, name)
    sep = "\x00\x00"  # NUL is in no path or field; entries are "path NUL field NUL ..."
    entries = ["\x00".join([p, *map(str, sig)]) for p, sig in now.items()]
    since, previous = request.get("since"), None
    if since:
        try:
            with open(path, "rb") as f:
                token, _, kept = f.read().decode("utf-8", "surrogateescape").partition(sep)
            if token == since:
                previous = set(kept.split(sep)) if kept else set()
        except (OSError, ValueError):
            pass
    if previous is not None and len(previous) == len(entries) and previous.issuperset(entries):
        # nothing changed: the kept scan stays, under its token
        return {"files_diff": {"since": since, "changed": {}, "removed": []}, "files_token": since}
    token = secrets.token_hex(8)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(sep.join([token, *entries]).encode("utf-8", "surrogateescape"))
        os.replace(tmp, path)
    except OSError:  # a full disk, say: not kept, and the next report is whole again
        token = ""
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _forget_old_scans(folder, name)
    if previous is None:
        return {"files": now, "files_token": token}
    changed = {}
    for entry in entries:
        if entry not in previous:
            relpath = entry.partition("\x00")[0]
            changed[relpath] = now[relpath]
    previous.difference_update(entries)
    removed = [p for p in (e.partition("\x00")[0] for e in previous) if p not in now]
    return {"files_diff": {"since": since, "changed": changed, "removed": removed},
            "files_token": token}


def _forget_old_scans(folder: str, keep: str, age: float = 86400.0) -> None:
    """Remove the kept scans of routers gone for a day."""
    cutoff = time.time() - age
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("scan-") and entry.name != keep:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass


async def _call(handler, *args):
    result = handler(*args)
    if hasattr(result, "__await__"):
        result = await result
    return result


def _refuse(shell, kernel, stream, ident, parent, exc, ename: str = "TransferError",
            echo: bool = True) -> None:
    """Reply to a cell that did not run: its inputs did not load, or (``echo=False``:
    ipykernel has sent the cell's execute_input already) it was interrupted before
    it began, past ipykernel's own handler (see the wrapper)."""
    count = shell.execution_count
    content = {
        "ename": ename,
        "evalue": str(exc),
        "traceback": [f"\x1b[0;31m{ename}\x1b[0m: {exc}"],
    }
    session = kernel.session
    if echo:
        session.send(kernel.iopub_socket, "execute_input", {"code": parent["content"].get("code", ""),
                     "execution_count": count}, parent=parent)
    session.send(kernel.iopub_socket, "error", content, parent=parent)
    session.send(stream, "execute_reply", {"status": "error", "execution_count": count, **content},
                 parent, ident=ident)
