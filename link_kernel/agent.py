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
content hash matches its name); if that fails the cell does not run. After the
cell, whether it succeeded, raised or was interrupted (plain Python keeps what
a cell did before the exception), it publishes a ``link_result`` iopub
message: the names the cell bound or rebound (modules by name), the inputs
whose content it changed (compared by content hash), the names it deleted,
each new value written as a blob, where each value's objects came from among
the inputs (see "shared references" below), and the names that could not be
serialized, with the reason.

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
import io
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
    import weakref

    kinds += [weakref.ref, weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet]
    return tuple(kinds)


#: Files that are only memory (``%%capture``'s output, a buffer a figure was saved to):
#: they travel with their content and position.
_IN_MEMORY = (io.StringIO, io.BytesIO)


class Refused(TypeError):
    """A value Link will not send; the message says why."""


def _refusal(obj) -> str:
    if isinstance(obj, types.GeneratorType):
        return "a generator's position cannot be sent; turn it into a list first"
    if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
        return "a running coroutine cannot be sent"
    kind = type(obj).__name__
    if type(obj).__module__ == "weakref" or isinstance(obj, __import__("weakref").ref):
        return f"a {kind} refers weakly to objects of the process that made it and cannot be sent"
    return f"a {kind} belongs to the process that made it and cannot be sent"


#: reverted: dill's import undone in pickle's table; notebook: the notebook imported dill;
#: look: the namespace is to be looked at once after the revert (it may have dill already)
_DILL = {"reverted": False, "notebook": False, "look": False}


def _dill():
    """dill, without the change its import makes to pickle's own registry.

    Importing dill puts its functions into the pure-Python pickler's table
    (``pickle._Pickler.dispatch``), where a pickler that is not dill's (joblib's)
    fails on them: ``joblib.dump`` of a notebook class raised a TypeError in
    every kernel Link had loaded dill into. A plain kernel has no dill until the
    notebook imports it; then :func:`_dill_for_the_notebook` puts the table back
    as dill's import would have.
    """
    import dill

    if not _DILL["reverted"] and not _DILL["notebook"]:
        _DILL["reverted"] = _DILL["look"] = True
        dill.extend(False)
    return dill


def _dill_for_the_notebook(shell, raw_cell: str) -> None:
    """After a cell: if the notebook imported dill (bound it or a name from it), dill
    extends pickle's registry, as its own import does, once. The namespace is walked
    only after a cell that names dill (and once after Link's revert), not every cell."""
    dill = sys.modules.get("dill")
    if dill is None or _DILL["notebook"] or not _DILL["reverted"]:
        return
    if not _DILL["look"] and "dill" not in raw_cell:
        return
    _DILL["look"] = False
    for value in list(shell.user_ns.values()):
        if isinstance(value, types.ModuleType):
            home = value.__name__
        elif isinstance(value, (types.FunctionType, type)):
            home = value.__module__
        else:
            continue
        if isinstance(home, str) and home.partition(".")[0] == "dill":
            _DILL["notebook"] = True
            dill.extend(True)
            return


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
    dill = _dill()

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
                enum = _enum_reduction(obj)
                if enum is not None:
                    self.reached.add(obj.__name__)
                    return enum
                return _code_reference(obj, self.reached)
            widget = _widget_reduction(obj)
            if widget is not None:
                return widget
            if isinstance(obj, bound) and type(obj) not in _IN_MEMORY:
                closed = _closed_file(obj)
                if closed is not None:
                    return closed
                raise Refused(_refusal(obj))
            with_grad = _tensor_with_grad(obj)
            if with_grad is not None:
                return with_grad
            scheduler = _scheduler_reduction(obj)
            if scheduler is not None:
                return scheduler
            if type(obj) is functools.cached_property:  # (its lock, before 3.12, would refuse it)
                return _rebuilt_cached_property, (obj.func, obj.attrname, obj.__doc__)
            moved = _to_host_memory(obj)
            if moved is not None:
                return _identity, (moved,)
            return NotImplemented

    _PICKLER = Pickler
    return Pickler


def _closed_file(obj):
    """The reduction of a closed file on disk (``with open(...) as f`` leaves ``f``
    bound to one): a closed file of the same type, name, mode and encoding, as a
    plain kernel keeps it. None for anything else: an open file stays refused.
    """
    import io

    try:
        if not obj.closed:
            return None
        raw = obj
        while isinstance(raw, (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter,
                               io.BufferedRandom)):
            raw = raw.buffer if isinstance(raw, io.TextIOWrapper) else raw.raw
        if type(raw) is not io.FileIO or type(obj).__module__ not in ("_io", "io"):
            return None
        text = isinstance(obj, io.TextIOWrapper)
        mode = getattr(obj, "mode", None) if text else raw.mode
        if not isinstance(mode, str):
            return None
        return _closed_file_like, (type(obj).__name__, raw.name, mode,
                                   obj.encoding if text else None, obj.errors if text else None)
    except (ValueError, AttributeError):
        return None


def _closed_file_like(kind: str, name, mode: str, encoding, errors):
    """A closed file like the one :func:`_closed_file` saw (opened on os.devnull, renamed)."""
    import io

    opening = mode.replace("x", "w").replace("U", "")
    if kind == "FileIO":
        f = io.FileIO(os.devnull, opening.replace("b", "").replace("t", "") or "r")
    elif kind == "TextIOWrapper":
        f = open(os.devnull, opening, encoding=encoding, errors=errors)
    else:
        f = open(os.devnull, opening if "b" in opening else opening + "b")
    try:
        if kind == "TextIOWrapper":
            f.mode = mode
        raw = f
        while not isinstance(raw, io.FileIO):
            raw = raw.buffer if isinstance(raw, io.TextIOWrapper) else raw.raw
        raw.name = name
    finally:
        f.close()  # closed on every path: the copy only looks like the file
    return f


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


def _scheduler_reduction(obj):
    """The reduction of a torch learning-rate scheduler; None for anything else.

    A scheduler wraps its optimizer's ``step`` to check the order of the two
    calls, and the optimizer's pickle leaves the wrapper out: the first
    ``scheduler.step()`` after the trip warned that ``optimizer.step()`` had been
    overridden. The scheduler travels as its attributes and wraps it again.
    """
    schedulers = sys.modules.get("torch.optim.lr_scheduler")
    kind = getattr(schedulers, "LRScheduler", None)
    if kind is None or not isinstance(obj, kind) or not isinstance(getattr(obj, "__dict__", None), dict):
        return None
    wrapped = hasattr(getattr(getattr(obj, "optimizer", None), "step", None), "_wrapped_by_lr_sched")
    return _rebuilt_scheduler, (type(obj), dict(vars(obj)), wrapped)


def _rebuilt_cached_property(func, attrname, doc):
    made = functools.cached_property(func)
    made.attrname, made.__doc__ = attrname, doc
    return made


def _rebuilt_scheduler(kind, state: dict, wrapped: bool):
    scheduler = kind.__new__(kind)
    scheduler.__dict__.update(state)
    optimizer = state.get("optimizer")
    step = getattr(optimizer, "step", None)
    if wrapped and not hasattr(step, "_wrapped_by_lr_sched") and hasattr(step, "__func__"):
        # a method of the optimizer (not a closure over it, as torch's is): one
        # merged into the local optimizer becomes that optimizer's (see _relink)
        optimizer.step = types.MethodType(_counted_step, optimizer)
    return scheduler


def _counted_step(optimizer, *args, **kwargs):
    """torch's wrapper of a scheduled optimizer's step: note the call, then step."""
    optimizer._opt_called = True
    return type(optimizer).step(optimizer, *args, **kwargs)


_counted_step._wrapped_by_lr_sched = True


# -- widgets ---------------------------------------------------------------------------
#
# An ipywidgets widget is a model in the frontend, reached through its kernel's comm.
# It travels as its state (trait values, the observers the notebook added) and its
# model id, never its comm: in a remote cell it is a stand-in for the live local
# widget (reading ``slider.value`` reads the local value; displaying it shows the live
# local widget, whose model the frontend knows by that id; its messages go nowhere),
# and what the cell changed is set on the local widget when the results arrive, which
# the frontend's views then show. Its observers ran in the remote cell, as they would
# have in a plain kernel, and what they changed comes back with the cell's results, so
# the local widget takes the new values without running them twice. A widget a remote
# cell made comes back as a live widget of the local kernel.

#: Remote side: this kernel runs routed cells (set by :func:`install`).
_REMOTE = False
#: Remote side: this kernel is kept after the running cell (its widgets stay live here).
_KEPT = False
#: Local side: (live widget, arrived state) to set once a cell's results have all loaded.
_WIDGET_UPDATES: list = []
#: What a widget's __dict__ holds that belongs to its kernel, not to its state.
_WIDGET_OWN = frozenset({"_repr_mimebundle_", "_model_id"})
#: traitlets' machinery in a widget's __dict__ (reset by its __getstate__).
_TRAITS_OWN = frozenset({"_trait_values", "_trait_notifiers", "_trait_validators",
                         "_cross_validation_lock"})


def _widget_module():
    return sys.modules.get("ipywidgets.widgets.widget")


def _widget_reduction(obj):
    """The reduction of an ipywidgets widget (see above); None for anything else."""
    module = _widget_module()
    if module is None or not isinstance(obj, module.Widget):
        return None
    import traitlets

    state = obj.__getstate__()
    state["_trait_values"] = {k: v for k, v in state["_trait_values"].items() if k != "comm"}
    for key in _WIDGET_OWN:
        state.pop(key, None)
    observers = []  # the notebook's own: the class's handlers come with the class
    for name, kinds in obj._trait_notifiers.items():
        for kind, handlers in kinds.items():
            observers += [[name, kind, h] for h in handlers if not isinstance(h, traitlets.EventHandler)]
    comm = obj._trait_values.get("comm")
    model_id = getattr(comm, "comm_id", None) if comm is not None else None
    if _REMOTE and _KEPT and comm is not None and not isinstance(comm, _ElsewhereComm):
        raise Refused("a widget made in a kept kernel stays live there; use it from the cells "
                      "that run in that kernel")
    return _widget_like, (type(obj), model_id), (state, observers), None, None, _set_widget_state


def _live_widget(model_id):
    module = _widget_module()
    if module is None or model_id is None:
        return None
    instances = getattr(module, "_instances", None)
    if instances is None:  # ipywidgets 7
        instances = getattr(module.Widget, "widgets", {})
    return instances.get(model_id)


class _ElsewhereComm:
    """The comm of a widget whose live model is in the other kernel: it has that
    model's id, and what the widget sends goes nowhere."""

    kernel = None

    def __init__(self, comm_id: str) -> None:
        self.comm_id = comm_id

    def send(self, *args, **kwargs) -> None:
        pass

    def close(self, *args, **kwargs) -> None:
        pass

    def on_msg(self, callback) -> None:
        pass

    def on_close(self, callback) -> None:
        pass


def _widget_like(cls, model_id):
    """The live widget of this model id in this kernel, or a new one of ``cls`` (its
    state is set by :func:`_set_widget_state`)."""
    live = _live_widget(model_id)
    if live is not None and type(live) is cls:
        return live
    widget = cls.__new__(cls)
    widget.__dict__["_link_model_id"] = model_id
    return widget


def _set_widget_state(widget, state) -> None:
    values, observers = state
    model_id = widget.__dict__.pop("_link_model_id", _MISSING)
    if model_id is _MISSING:  # the live widget: set when the results have all arrived
        if _REMOTE:  # (a kept kernel's stand-in, from an earlier cell: before this one)
            _update_widget(widget, values, observers)
        else:
            _WIDGET_UPDATES.append((widget, values, observers))
        return
    widget.__setstate__(dict(values, _trait_values=dict(values["_trait_values"])))
    for name, kind, handler in observers:
        widget.observe(handler, names=name, type=kind)
    if model_id is None:  # a closed widget stays closed
        return
    if _REMOTE:  # a stand-in for the live widget of the local kernel
        import traitlets

        widget._model_id = model_id
        try:
            widget.comm = _ElsewhereComm(model_id)
        except traitlets.TraitError:  # a comm trait that takes only a kernel's comm
            widget._trait_values["comm"] = _ElsewhereComm(model_id)
    else:  # made by a remote cell whose kernel is gone: a live widget of this kernel
        widget._model_id = None
        widget.open()


def _observer_key(observers) -> list:
    return [(name, kind, getattr(h, "__qualname__", type(h).__qualname__)) for name, kind, h in observers]


def _update_widgets() -> None:
    """Set each live widget of this kernel to the state a remote cell left it in."""
    updates, _WIDGET_UPDATES[:] = list(_WIDGET_UPDATES), []
    for widget, values, observers in updates:
        _update_widget(widget, values, observers)


def _update_widget(widget, values: dict, observers: list) -> None:
    """Set a live widget to the state it arrived in, without running its observers
    (they ran where the cell ran), and tell the frontend's views."""
    import traitlets

    changed = []
    for key, value in values["_trait_values"].items():
        if key not in widget._trait_values or _differs(widget._trait_values[key], value):
            widget._trait_values[key] = value
            changed.append(key)
    for key, value in values.items():
        if key not in _TRAITS_OWN and (key not in widget.__dict__ or _differs(widget.__dict__[key], value)):
            widget.__dict__[key] = value
    mine = [[n, k, h] for n, kinds in widget._trait_notifiers.items() for k, hs in kinds.items()
            for h in hs if not isinstance(h, traitlets.EventHandler)]
    if _observer_key(mine) != _observer_key(observers):  # the cell added or removed some
        for name, kind, handler in mine:
            widget.unobserve(handler, names=name, type=kind)
        for name, kind, handler in observers:
            widget.observe(handler, names=name, type=kind)
    synced = [k for k in changed if k in widget.keys]
    if synced:
        try:
            widget.send_state(synced)
        except Exception:
            pass


# The functions a pickle calls to rebuild a value are named as the agent's, which
# every kernel has under this name (a host has no link_kernel package).
for _rebuild in (_identity, _rebuilt_with_grad, _rebuilt_scheduler, _rebuilt_cached_property,
                 _closed_file_like, _widget_like, _set_widget_state):
    _rebuild.__module__ = NAME
if __name__ in sys.modules:  # (a host's kernel registers the agent once it is loaded)
    sys.modules.setdefault(NAME, sys.modules[__name__])


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
        elif isinstance(obj, type) and "__slotnames__" not in vars(obj):
            # what pickling its first instance caches on it, so that the class pickles
            # the same before and after (else a cell that only used it changed it)
            import copyreg

            copyreg._slotnames(obj)
        name = getattr(obj, "__name__", None)
        if isinstance(name, str) and getattr(obj, "__qualname__", None) == name:
            # its own name too: code that pickles by reference (pickle, joblib,
            # multiprocessing) finds it in ``__main__``, as in the local kernel
            reached.add(name)
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


def _from_notebook(attr) -> bool:
    """Whether a class attribute is code the notebook wrote (a method, a property...)."""
    for inner in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None)):
        if getattr(inner, "__module__", None) == "__main__" and callable(inner):
            return True
    return False


def _enum_reduction(cls):
    """The reduction of an Enum class the notebook defined; None for anything else.

    dill cannot copy one by value (its members refer to their class), so it
    travels as what its body said: its members' values and the notebook's own
    methods, properties and hooks (``_missing_``), replayed through its
    metaclass on arrival. A custom ``__new__`` is left to dill.
    """
    enum = sys.modules.get("enum")
    if enum is None or not isinstance(cls, enum.EnumMeta) or cls.__module__ != "__main__":
        return None
    own = vars(cls)
    members = own.get("_member_map_")
    if not isinstance(members, dict) or _from_notebook(own.get("_new_member_")):
        return None
    body = [(k, v) for k, v in own.items() if k not in members and _from_notebook(v)]
    if isinstance(own.get("__doc__"), str):
        body.append(("__doc__", own["__doc__"]))
    values = [(k, m._value_) for k, m in members.items()]
    return _rebuilt_enum, (type(cls), cls.__name__, cls.__qualname__, cls.__bases__, body, values)


def _rebuilt_enum(metaclass, name, qualname, bases, body, members):
    home = _home(qualname, metaclass)
    if home is not None and type(home) is metaclass and home.__bases__ == tuple(bases) \
            and [(k, m._value_) for k, m in home._member_map_.items()] == members \
            and all(_codes(vars(home).get(k)) == _codes(v) for k, v in body if k != "__doc__"):
        return home
    namespace = metaclass.__prepare__(name, bases)
    namespace["__module__"], namespace["__qualname__"] = "__main__", qualname
    for key, value in [*body, *members]:
        namespace[key] = value
    made = metaclass(name, bases, namespace)
    if qualname == name:
        _HOMES[name] = made
    return made


_rebuilt_enum.__module__ = NAME


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
#: The same for every value pickled since the last export or result began
#: (a value is pickled alone and again in its group: the log keeps both).
_REACHED_LOG: dict = {}


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
    _REACHED_LOG[id(value)] = _LAST_REACHED[1]
    _note_memo(pickler.memo)
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


#: Values at least this big may be copied into transparent huge pages.
_HUGE_MIN = 2 << 20
_READ_CHUNK = 64 << 20


def _private_copy(f, size: int, huge: bool = False) -> mmap.mmap:
    """The ``size`` bytes of the open (unbuffered) file ``f``, read into anonymous memory.

    ``huge``: values from 2 MiB up ask for transparent huge pages (Linux,
    ``madvise`` mode or ``always``). Measured here for 1 GiB of a file at rest:
    the copy takes 0.15 s instead of 0.5, ``a *= 2`` over it 0.13 s instead of
    0.19, and the process ends in 4 ms instead of 73 (the kernel frees 512 pages,
    not 262,144). But 1 GiB of huge pages asked for just after a 1 GiB file was
    written (the blob a cell's input just became, or just received) took 0.2-2.4 s
    to get here, and the copy 2.2-2.3 s in six of six 1 GiB ``process`` cells
    (0.5-0.6 s with ordinary pages). So only a standby's preload, off the cell's
    path, asks for them.

    Ordinary pages are mapped populated (``MAP_POPULATE``): the kernel fills the
    262,144 pages of a GiB in one call instead of one fault each as ``read``
    reaches them; the copy of 1 GiB took 0.38-0.41 s instead of 0.51-0.55 here.
    """
    huge = huge and size >= _HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE")
    flags = getattr(mmap, "MAP_PRIVATE", 0)
    if not huge:  # populated now, huge pages would come too late: they are asked for below
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    # private: shared anonymous memory gets no huge pages (fd -1 adds MAP_ANONYMOUS)
    mapped = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if huge:
        try:
            mapped.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    view = memoryview(mapped)
    try:
        done = 0
        while done < size:  # 64 MiB a read (one read() returns at most ~2 GiB on Linux)
            n = f.readinto(view[done : done + _READ_CHUNK])
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
                    slot.copy = _private_copy(f, sizes[blob_id], huge=True)
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


# -- module state: what a long-lived kernel's modules keep --------------------------------
#
# A notebook's kernel keeps more than its namespace: the global random generators,
# os.environ, sys.path, warnings filters, matplotlib's rcParams (and the inline
# backend's settings), pandas' options, numpy's print options. A fresh remote kernel
# starts clean, so the router carries them both ways (see :func:`capture_state`): the
# local kernel's are restored in the remote kernel before the cell, and what the cell
# changed comes back with its results. A section whose module is not imported on the other side
# yet is restored the moment it is imported (:func:`_when_imported`), so torch is
# never imported for a cell that does not use it.

#: Environment variables that belong to one machine or to the kernel's own
#: connection: never sent to a host, never brought back.
_HOST_ENVIRON = re.compile(
    r"(JPY|JUPYTER|IPYTHON|SSH|SLURM|SLURMD|SBATCH|SRUN|XDG|CONDA|PYDEVD|VSCODE|DBUS|"
    r"KRB5|TMUX|WSL|PBS|LSB|OMPI|PMI|PMIX)_\w*"
    r"|HOME|PATH|USER|USERNAME|LOGNAME|SHELL|PWD|OLDPWD|HOSTNAME|HOST|MAIL|SHLVL|_"
    r"|TMPDIR|TEMP|TMP|TERM|TERM_PROGRAM|COLORTERM|DISPLAY|WAYLAND_DISPLAY|COLUMNS|LINES"
    r"|VIRTUAL_ENV|PYTHONHOME|PYTHONPATH|PYTHONSTARTUP|PYTHONEXECUTABLE|PYTHONUSERBASE"
    r"|LD_LIBRARY_PATH|LD_PRELOAD|DYLD_\w*|LIBRARY_PATH|CPATH|MANPATH|INFOPATH"
    r"|CUDA_VISIBLE_DEVICES|NVIDIA_VISIBLE_DEVICES|ROCR_VISIBLE_DEVICES|HIP_VISIBLE_DEVICES"
    r"|GPU_DEVICE_ORDINAL|MPLBACKEND|PAGER|GIT_PAGER|CLICOLOR|FORCE_COLOR|KERNEL_ID"
)

#: What this kernel had when the agent was installed (before any cell): the
#: baseline that local changes are measured against.
_BASE: dict = {}

#: rcParams that belong to the kernel's display, not to the notebook's figures.
_MPL_OWN = frozenset({"backend", "backend_fallback", "interactive"})


def _note_baseline() -> None:
    if not _BASE:
        import warnings

        _BASE.update(environ=dict(os.environ), path=list(sys.path), cwd=os.getcwd(),
                     warnings=list(warnings.filters))
        _BASE["logging"] = _get_logging()


def _environ_diff(before: dict) -> dict:
    """{"set": ..., "unset": [...]}: what differs from ``before``, host variables aside."""
    now = os.environ
    changed = {k: v for k, v in now.items() if before.get(k) != v and not _HOST_ENVIRON.fullmatch(k)}
    gone = sorted(k for k in before if k not in now and not _HOST_ENVIRON.fullmatch(k))
    return {"set": changed, "unset": gone} if changed or gone else {}


def _restore_environ(diff: dict) -> None:
    for key, value in diff.get("set", {}).items():
        if not _HOST_ENVIRON.fullmatch(key):
            os.environ[key] = value
    for key in diff.get("unset", ()):
        if not _HOST_ENVIRON.fullmatch(key):
            os.environ.pop(key, None)


def _path_additions(before: list) -> list:
    """Entries of sys.path not in ``before``: [front?, "cwd" | "abs", path]; one under the
    notebook's folder is relative to it, so it names the same folder in the host's mirror."""
    known = set(before)
    first = next((i for i, p in enumerate(sys.path) if p in known), len(sys.path))
    cwd = _BASE.get("cwd") or os.getcwd()
    out = []
    for i, entry in enumerate(sys.path):
        if entry in known or not isinstance(entry, str):
            continue
        if os.path.isabs(entry) and (entry == cwd or entry.startswith(cwd.rstrip(os.sep) + os.sep)):
            out.append([i < first, "cwd", os.path.relpath(entry, cwd)])
        else:
            out.append([i < first, "abs", entry])
    return out


def _cwd_inside() -> str | None:
    """The working directory relative to the notebook's folder (its mirror on a host):
    "." there, None outside it (that one cannot be named on the other side)."""
    base = _BASE.get("cwd")
    try:
        here = os.getcwd()
    except OSError:  # deleted under the kernel
        return None
    if not base or not (here == base or here.startswith(base.rstrip(os.sep) + os.sep)):
        return None
    return os.path.relpath(here, base)


def _restore_cwd(relative: str) -> None:
    """``os.chdir`` into the folder the other side's cell left it in (a folder of
    the notebook's, created if a cell's files have not arrived yet)."""
    base = _BASE.get("cwd")
    if base and isinstance(relative, str) and not os.path.isabs(relative) \
            and not relative.split(os.sep)[0] == os.pardir:
        target = os.path.normpath(os.path.join(base, relative))
        os.makedirs(target, exist_ok=True)
        os.chdir(target)


def _restore_path(additions: list) -> None:
    cwd = _BASE.get("cwd") or os.getcwd()
    front = 0
    for at_front, kind, entry in additions:
        if kind == "cwd":
            entry = os.path.normpath(os.path.join(cwd, entry))
        if entry in sys.path:
            continue
        if at_front:
            sys.path.insert(front, entry)
            front += 1
        else:
            sys.path.append(entry)


def _get_warnings():
    import warnings

    return list(warnings.filters)


def _filter_additions(before: list) -> list:
    """The warnings filters not in ``before``, in order, each as plain data:
    [front?, action, message, module, (category module, name), lineno]. Libraries
    add filters of their own when imported (torch, scipy, numpy): a category is sent
    by name, and set where its module is imported, never importing it."""
    filters = _get_warnings()
    first = next((i for i, f in enumerate(filters) if f in before), len(filters))
    out = []
    for i, (action, message, category, module, lineno) in enumerate(filters):
        if filters[i] in before:
            continue
        out.append([i < first, action, getattr(message, "pattern", message),
                    getattr(module, "pattern", module),
                    [category.__module__, category.__qualname__], lineno])
    return out


def _set_warnings(additions: list, shell=None) -> None:
    import builtins
    import warnings

    front = [0]

    def add(at_front, action, message, module, category, lineno) -> None:
        owner, qualname = category
        try:
            if owner == "builtins":
                cls = getattr(builtins, qualname)
            elif owner == "__main__":
                cls = (shell.user_ns if shell is not None else {})[qualname]
            else:
                cls = functools.reduce(getattr, qualname.split("."), sys.modules[owner])
        except (KeyError, AttributeError):
            return
        entry = (action, re.compile(message, re.I) if message is not None else None, cls,
                 re.compile(module) if module is not None else None, lineno)
        if entry in warnings.filters:
            return
        if at_front:
            warnings.filters.insert(min(front[0], len(warnings.filters)), entry)
            front[0] += 1
        else:
            warnings.filters.append(entry)
        mutated = getattr(warnings, "_filters_mutated", None) or getattr(
            warnings, "_filters_mutated_lock_held", None)
        if mutated is not None:
            mutated()

    for item in additions:
        owner = item[4][0]
        if owner in ("builtins", "__main__") or owner in sys.modules:
            add(*item)
        else:  # set once the category's module is imported
            _when_imported(owner, functools.partial(add, *item))


def _module(name: str):
    """A module by name, imported if need be; one being imported (a callback of
    :func:`_when_imported` runs inside its import) is not an attribute of its parent yet."""
    import importlib

    module = sys.modules.get(name)
    return module if module is not None else importlib.import_module(name)


def _get_random():
    return sys.modules["random"].getstate()


def _set_random(state) -> None:
    _module("random").setstate(state)


def _get_numpy():
    return sys.modules["numpy.random"].get_state()


def _set_numpy(state) -> None:
    _module("numpy.random").set_state(state)


def _get_torch():
    return bytes(sys.modules["torch"].get_rng_state().tolist())  # the CPU generator only


def _set_torch(state) -> None:
    torch = _module("torch")
    torch.set_rng_state(torch.tensor(list(state), dtype=torch.uint8))


def _get_matplotlib():
    """The rcParams that differ from matplotlib's defaults (read without resolving the
    backend: reading ``backend`` would import pyplot)."""
    mpl = sys.modules["matplotlib"]
    rc, default = mpl.rcParams, mpl.rcParamsDefault
    return {k: rc._get(k) for k in rc if k not in _MPL_OWN and rc._get(k) != default._get(k)}


def _set_matplotlib(changed: dict) -> None:
    matplotlib = _module("matplotlib")
    rc, default = matplotlib.rcParams, matplotlib.rcParamsDefault
    for key in _get_matplotlib():  # what the sender has at its default
        if key not in changed:
            rc[key] = default._get(key)
    for key, value in changed.items():
        try:
            rc[key] = value
        except (KeyError, ValueError):  # another matplotlib version: not its key, not its value
            pass


def _get_inline(shell=None):
    """The inline backend's settings (figure formats, savefig options), once it has any."""
    config = sys.modules["matplotlib_inline.config"]
    if not config.InlineBackend.initialized():
        return None
    cfg = config.InlineBackend.instance()
    return {"figure_formats": sorted(cfg.figure_formats), "rc": dict(cfg.rc),
            "print_figure_kwargs": dict(cfg.print_figure_kwargs), "close_figures": cfg.close_figures}


def _set_inline(settings: dict, shell=None) -> None:
    InlineBackend = _module("matplotlib_inline.config").InlineBackend
    values = dict(settings, figure_formats=set(settings["figure_formats"]))
    if shell is not None:  # a backend loaded later starts from these
        shell.config.InlineBackend.update(values)
    cfg = InlineBackend.instance(parent=shell)
    for key, value in values.items():
        setattr(cfg, key, value)


_LOG_STYLES = {"PercentStyle": "%", "StrFormatStyle": "{", "StringTemplateStyle": "$"}


def _log_handler(handler):
    """A handler that prints into the cell (a stream handler on sys.stdout or
    sys.stderr), as what makes it again; None for any other handler."""
    logging = sys.modules["logging"]
    if type(handler) is not logging.StreamHandler or handler.stream not in (sys.stdout, sys.stderr):
        return None
    form = handler.formatter
    return {"stream": "stdout" if handler.stream is sys.stdout else "stderr", "level": handler.level,
            "fmt": getattr(form, "_fmt", None), "datefmt": getattr(form, "datefmt", None),
            "style": _LOG_STYLES.get(type(getattr(form, "_style", None)).__name__, "%")}


def _get_logging():
    """The loggers the notebook configured: levels, and handlers printing into cells
    (``logging.basicConfig(level=logging.INFO)``); {} for logging as the kernel started
    (and dill's logger, which Link's own import of dill configures)."""
    logging = sys.modules["logging"]
    loggers = [("", logging.root)] + sorted(
        (n, v) for n, v in logging.root.manager.loggerDict.items() if isinstance(v, logging.Logger))
    base = _BASE.get("logging", {})
    out = {}
    for name, logger in loggers:
        handlers = [h for h in map(_log_handler, logger.handlers) if h is not None]
        level = logger.level != (logging.WARNING if name == "" else logging.NOTSET)
        entry = {"level": logger.level, "handlers": handlers, "propagate": logger.propagate}
        if (handlers or level) and entry != base.get(name) and name.partition(".")[0] != "dill":
            out[name] = entry
    return out


def _set_logging(state: dict) -> None:
    logging = _module("logging")
    if "" not in state:
        state = {"": {"level": logging.WARNING, "handlers": [], "propagate": True}, **state}
    for name, entry in state.items():
        logger = logging.getLogger(name) if name else logging.root
        logger.setLevel(entry["level"])
        logger.propagate = entry["propagate"]
        for handler in list(logger.handlers):
            if _log_handler(handler) is not None:
                logger.removeHandler(handler)
        for made in entry["handlers"]:
            handler = logging.StreamHandler(sys.stdout if made["stream"] == "stdout" else sys.stderr)
            handler.setLevel(made["level"])
            handler.setFormatter(logging.Formatter(made["fmt"], made["datefmt"], made["style"]))
            logger.addHandler(handler)


#: figure format -> (mime type, pylabtools function, its arguments), as IPython selects them
_FIGURE_FORMATS = {
    "png": ("image/png", "print_figure", {"fmt": "png", "base64": True}),
    "retina": ("image/png", "retina_figure", {"base64": True}),
    "png2x": ("image/png", "retina_figure", {"base64": True}),
    "jpeg": ("image/jpeg", "print_figure", {"fmt": "jpg", "base64": True}),
    "jpg": ("image/jpeg", "print_figure", {"fmt": "jpg", "base64": True}),
    "svg": ("image/svg+xml", "print_figure", {"fmt": "svg"}),
    "pdf": ("application/pdf", "print_figure", {"fmt": "pdf", "base64": True}),
}


def _figure_formats_by_name(shell, settings: dict) -> None:
    """The inline backend's figure formatters, registered by the Figure's name.

    In a plain kernel, a figure shown as a cell's value (``fig`` on the last
    line) is an image once the inline backend has loaded, in any later cell. A
    fresh kernel loads it only when pyplot draws; a figure that arrived as an
    input showed as its repr. Registered by name, a cell with no figure imports
    no matplotlib; the backend, if it loads, replaces them with its own.
    """
    formatters = shell.display_formatter.formatters
    kwargs = dict(settings.get("print_figure_kwargs") or {})
    for fmt in sorted(settings.get("figure_formats") or ()):
        mime, how, extra = _FIGURE_FORMATS.get(fmt, (None, None, None))
        if mime in formatters:
            printer = functools.partial(_print_figure, how, {**extra, **kwargs})
            formatters[mime].for_type_by_name("matplotlib.figure", "Figure", printer)


def _print_figure(how: str, kwargs: dict, figure):
    from IPython.core import pylabtools

    return getattr(pylabtools, how)(figure, **kwargs)


def _pandas_options():
    config = sys.modules["pandas._config.config"]
    return {k: o for k, o in config._registered_options.items() if k not in config._deprecated_options}


def _get_pandas():
    import warnings

    get = sys.modules["pandas"].get_option
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: get(k) for k, o in _pandas_options().items() if _differs(get(k), o.defval)}


def _differs(a, b) -> bool:
    try:
        return bool(a != b)
    except Exception:
        return True


def _set_pandas(options: dict) -> None:
    import warnings

    pandas = _module("pandas")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registered = _pandas_options()
        for key in _get_pandas():
            if key not in options:
                pandas.reset_option(key)
        for key, value in options.items():
            if key in registered:
                try:
                    pandas.set_option(key, value)
                except (KeyError, ValueError, TypeError):
                    pass


#: numpy's print options in a fresh interpreter (the same since numpy 1.14), as
#: ``get_printoptions`` gives them; a key another version lacks is left out.
_NUMPY_PRINT = {"edgeitems": 3, "threshold": 1000, "floatmode": "maxprec", "precision": 8,
                "suppress": False, "linewidth": 75, "nanstr": "nan", "infstr": "inf",
                "sign": "-", "formatter": None, "legacy": False, "override_repr": None}


def _get_numpy_print() -> dict:
    """numpy's print options (``np.set_printoptions``) that differ from a fresh kernel's."""
    now = sys.modules["numpy"].get_printoptions()
    return {k: v for k, v in now.items() if k not in _NUMPY_PRINT or _differs(v, _NUMPY_PRINT[k])}


def _set_numpy_print(options: dict) -> None:
    numpy = _module("numpy")
    known = numpy.get_printoptions()
    wanted = {k: v for k, v in _NUMPY_PRINT.items() if k in known}  # what the sender has at default
    wanted.update({k: v for k, v in options.items() if k in known})
    try:
        numpy.set_printoptions(**wanted)
    except (TypeError, ValueError):  # another numpy: set what it takes, one by one
        for key, value in wanted.items():
            try:
                numpy.set_printoptions(**{key: value})
            except (TypeError, ValueError):
                pass


#: section -> (the module it lives in, read it, set it). A section is read only
#: where its module is imported, and set the moment its module is.
_MODULE_STATE = {
    "random": ("random", _get_random, _set_random),
    "numpy": ("numpy.random", _get_numpy, _set_numpy),
    "numpy_print": ("numpy", _get_numpy_print, _set_numpy_print),
    "torch": ("torch", _get_torch, _set_torch),
    "matplotlib": ("matplotlib", _get_matplotlib, _set_matplotlib),
    "inline": ("matplotlib_inline.config", _get_inline, _set_inline),
    "pandas": ("pandas", _get_pandas, _set_pandas),
    "logging": ("logging", _get_logging, _set_logging),
}


#: Sections that hold options which differ from their defaults: an empty one (all at
#: their defaults) is still read, so a cell that resets them is seen.
_OPTIONS = frozenset({"matplotlib", "pandas", "numpy_print"})


def _module_state() -> dict:
    """section -> value, for the sections whose module is imported here."""
    out = {}
    for section, (module, get, _) in _MODULE_STATE.items():
        if module in sys.modules:
            try:
                value = get()
            except Exception:  # half imported, or an unknown version: not carried
                continue
            if value is not None and (value != {} or section in _OPTIONS):
                out[section] = value
    return out


def _state_entry(value, algo: str) -> dict:
    """A state section as an inline manifest entry, named by its content hash."""
    import base64

    blob_id, parts = blob_of(value, algo)
    return {"id": blob_id, "inline": base64.b64encode(b"".join(bytes(p) for p in parts)).decode()}


def capture_state(shell, algo: str, first=()) -> dict:
    """The local kernel's module state, as sections to restore on a host.

    Only what differs from a fresh kernel: the environment and sys.path as changes
    since this kernel started (host variables such as HOME, PATH and JPY_* aside),
    the working directory if a cell moved it into a folder of the notebook's,
    warnings filters if they changed, rcParams, pandas options and numpy print
    options that differ from their defaults (for the modules imported here); the generators always, for
    the modules imported here. Also the modules the notebook uses (a standby
    imports them ahead of the next cell).
    """
    values = {k: v for k, v in _module_state().items() if v != {}}
    environ = _environ_diff(_BASE.get("environ", {}))
    if environ:
        values["environ"] = environ
    path = _path_additions(_BASE.get("path", sys.path))
    if path:
        values["path"] = path
    filters = _filter_additions(_BASE.get("warnings", _get_warnings()))
    if filters:
        values["warnings"] = filters
    cwd = _cwd_inside()
    if cwd not in (None, "."):
        values["cwd"] = cwd
    sections, errors = {}, {}
    for name, value in values.items():
        try:
            sections[name] = _state_entry(value, algo)
        except Exception as exc:  # a filter's warning class that will not pickle, say
            errors[name] = _reason(exc)
    for name, entry in _DEFERRED.items():  # restored, waiting for its module's import
        if name not in sections and _MODULE_STATE[name][0] not in sys.modules:
            sections[name] = entry
    return {"sections": sections, "errors": errors, "modules": notebook_modules(shell, first)}


#: section -> the entry restored while its module was not imported yet: the state that
#: section has, as far as the next cell is concerned (numpy imports numpy.random only
#: when the notebook first uses it, say, after a remote cell seeded it).
_DEFERRED: dict = {}


def _set_deferred(name: str, setter, value, entry) -> None:
    if _DEFERRED.get(name) is entry:
        del _DEFERRED[name]
    elif name in _DEFERRED:  # a later restore replaced it: that one sets it
        return
    setter(value)


def restore_state(shell, sections: dict) -> list:
    """Set the state sections (from :func:`capture_state` or :meth:`CellState.changes`);
    return what could not be set, as "section: reason" lines."""
    failures = []
    for name, entry in (sections or {}).items():
        try:
            value = load_entry("", entry)
            if name == "environ":
                _restore_environ(value)
            elif name == "path":
                _restore_path(value)
            elif name == "warnings":
                _set_warnings(value, shell)
            elif name == "cwd":
                _restore_cwd(value)
            elif name in _MODULE_STATE:
                module, _, put = _MODULE_STATE[name]
                setter = (lambda v, put=put: put(v, shell)) if name == "inline" else put
                if module not in sys.modules:  # what it is until its module is imported
                    _DEFERRED[name] = entry
                    if name == "inline" and shell is not None:
                        _figure_formats_by_name(shell, value)
                else:
                    _DEFERRED.pop(name, None)
                _when_imported(module, functools.partial(_set_deferred, name, setter, value, entry))
                if name == "matplotlib":  # an older inline backend sets its rc when it loads
                    _when_imported("matplotlib_inline.backend_inline",
                                   functools.partial(setter, value), now=False)
        except Exception as exc:
            failures.append(f"{name}: {_reason(exc)}")
    return failures


class CellState:
    """The module state around one remote cell: restored before it, its changes after."""

    def __init__(self, shell, instructions) -> None:
        self.shell = shell
        self.algo = instructions.get("algo") or algorithms()[0]
        sent = instructions.get("state") or {}
        self.errors = restore_state(shell, sent.get("sections"))
        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.warnings = _get_warnings()
        self.cwd = _cwd_inside()
        #: section -> id before the cell; a section still waiting for its import has
        #: the id of what it will be set to
        self.ids = {k: v["id"] for k, v in (sent.get("sections") or {}).items()}
        for name, value in _module_state().items():
            try:
                self.ids[name] = _state_entry(value, self.algo)["id"]
            except Exception:
                pass

    def changes(self) -> dict:
        """What the cell changed: the sections to restore in the local kernel."""
        sections, errors = {}, {}
        values = _module_state()
        environ = _environ_diff(self.environ)
        if environ:
            values["environ"] = environ
        path = _path_additions(self.path)
        if path:
            values["path"] = path
        filters = _filter_additions(self.warnings)
        if filters:
            values["warnings"] = filters
        cwd = _cwd_inside()
        if cwd != self.cwd and cwd is not None:
            values["cwd"] = cwd
        for name, value in values.items():
            try:
                entry = _state_entry(value, self.algo)
            except Exception as exc:
                errors[name] = _reason(exc)
                continue
            if entry["id"] != self.ids.get(name) and (value != {} or name in self.ids):
                sections[name] = entry
        errors.update(dict(e.split(": ", 1) for e in self.errors if ": " in e))
        return {"sections": sections, "errors": errors}


class _ThenLoader:
    """A module's loader, and callbacks to run once the module is executed."""

    def __init__(self, loader, callbacks: list) -> None:
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        spec = getattr(module, "__spec__", None)
        if spec is not None:
            spec.loader = self._loader  # the module sees its own loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                pass

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _ImportWatch:
    """A meta path finder that wraps the loader of the modules it waits for."""

    def __init__(self) -> None:
        self.pending: dict = {}

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenLoader(spec.loader, self.pending.pop(name))
        return spec


_WATCH = None


def _when_imported(module: str, callback, now: bool = True) -> None:
    """Run ``callback`` now if ``module`` is imported (and ``now``), else once it is."""
    global _WATCH
    if module in sys.modules:
        if now:
            callback()
        return
    if _WATCH is None:
        _WATCH = _ImportWatch()
    if _WATCH not in sys.meta_path:
        sys.meta_path.insert(0, _WATCH)
    _WATCH.pending.setdefault(module, []).append(callback)


#: How many modules a standby imports ahead of a cell, at most.
NOTEBOOK_MODULES_MAX = 64


def notebook_modules(shell, first=()) -> list:
    """The installed modules the notebook uses: those bound in its namespace and those
    of the classes, functions and values bound there (``from sklearn.linear_model
    import LinearRegression``: sklearn.linear_model). The notebook's own modules (under
    its folder) are left out: importing them ahead of a cell would run the user's code.
    The modules of the names in ``first`` (the cell's inputs: the next cell likely
    reads the same) come first."""
    cwd = (_BASE.get("cwd") or os.getcwd()).rstrip(os.sep) + os.sep
    found: dict = {}
    ns = shell.user_ns
    names = [n for n in first if n in ns] + [n for n in list(ns) if n not in set(first)]
    for name in names:
        value = ns[name]
        if not _is_user_name(shell, name):
            continue
        if isinstance(value, types.ModuleType):
            module = value.__name__
        elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
            module = getattr(value, "__module__", None)
        else:
            module = type(value).__module__
        if not isinstance(module, str) or module in found or module in ("__main__", "builtins"):
            continue
        top = sys.modules.get(module.partition(".")[0])
        if module not in sys.modules or top is None:
            continue
        origin = getattr(top, "__file__", None) or ""
        if origin.startswith(cwd) or not origin:  # the notebook's own, or built in
            continue
        found[module] = None
        if len(found) >= NOTEBOOK_MODULES_MAX:
            break
    return sorted(found)


_PREIMPORT = None  # (thread, stop event) of a standby's imports


def preimport(modules: list) -> None:
    """Import these modules in the background (a standby, ahead of the next cell).

    One after another, in a thread, so the standby is ready at once: a cell that
    arrives meanwhile waits only for the module under way (see
    :func:`_finish_preimport`); the rest it imports itself if it needs them.
    """
    global _PREIMPORT
    import importlib

    stop = threading.Event()

    def run() -> None:
        for module in modules:
            if stop.is_set():
                return
            try:
                importlib.import_module(module)
            except Exception:  # not installed on this host: the cell will say so if it needs it
                pass

    thread = threading.Thread(target=run, name="link-preimport", daemon=True)
    _PREIMPORT = (thread, stop)
    thread.start()


def _finish_preimport() -> None:
    """Stop a standby's imports after the one under way, and wait for it (the cell's
    own imports then never race them)."""
    global _PREIMPORT
    if _PREIMPORT is not None:
        thread, stop = _PREIMPORT
        _PREIMPORT = None
        stop.set()
        thread.join()


STATE_REQUEST = "link_state_request"


def _state_handler(shell, kernel):
    """Serve ``link_state_request``: {"capture": ALGO} (:func:`capture_state`) or
    {"restore": SECTIONS} (:func:`restore_state`), without IPython's cell machinery."""

    async def link_state_request(stream, ident, parent):
        request = parent["content"]
        try:
            if "capture" in request:
                content = {"status": "ok", **capture_state(shell, request["capture"],
                                                           request.get("first") or ())}
            else:
                content = {"status": "ok", "errors": restore_state(shell, request.get("restore"))}
        except Exception as exc:
            content = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc),
                       "traceback": []}
        kernel.session.send(stream, "link_state_reply", content, parent, ident=ident)

    return link_state_request


def blob_matches(blob_id: str, view) -> bool:
    """Whether the bytes ``view`` hash to the digest ``blob_id`` (``ALGO-DIGEST``) names;
    ValueError for an algorithm this python lacks."""
    algo, _, digest = blob_id.partition("-")
    hasher = _hasher(algo)
    hasher.update(view)
    return hasher.hexdigest() == digest


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
    return _unpickle(pickled, buffers)


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
        names = _REACHED_LOG.get(id(value), frozenset())
    return {n for n in names if n in ns}


def export(shell, names: list, store: str, algo: str, placeholders: list = (),
           everything: bool = False) -> str:
    """Write the named values of the user namespace as blobs (local side).

    Notebook functions and classes bring along the notebook names they use.
    Returns a JSON manifest: {"values": {name: {id, size, type}},
    "modules": {name: module}, "errors": {name: {type, reason}}, "missing": [...],
    "placeholders": [...]}: ``placeholders`` are names whose value the cell never
    uses (it only deletes them); only whether they exist is reported. With
    ``everything`` (the cell lists the namespace), every other user name goes
    too, unless it cannot be sent: that one is left out, not an error.
    """
    ns = shell.user_ns
    manifest: dict = {"values": {}, "modules": {}, "errors": {}, "missing": []}
    manifest["placeholders"] = [n for n in placeholders if n in ns and _is_user_name(shell, n)]
    todo = list(dict.fromkeys(names))
    optional = [n for n in user_names(shell) if n not in todo and n not in placeholders] \
        if everything else []
    todo += optional
    seen = set(todo)
    values: dict = {}
    done: dict = {}
    _REACHED_LOG.clear()
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
            done[name] = _tracked_blob(value, algo)
        except Exception as exc:
            if name not in optional:
                manifest["errors"][name] = {"type": _type_name(value), "reason": _reason(exc)}
        else:
            values[name] = value
        for extra in sorted(_referenced_globals(value, ns) - seen):  # found by the pickling
            if _is_user_name(shell, extra):
                seen.add(extra)
                todo.append(extra)
    manifest["values"], errors = _describe_all(values, algo, store, done=done)
    manifest["errors"].update((n, e) for n, e in errors.items() if n not in optional)
    manifest["notes"] = _cache_notes(values)
    manifest["unsent"] = unsent_names(shell, seen)
    _EXPORTED.clear()
    _EXPORTED.update(_last_memos)
    _last_memos.clear()
    return json.dumps(manifest)


_last_memos: dict = {}


def _cache_notes(values: dict) -> list:
    """A line for each input that is a function with a filled ``lru_cache``: the cache
    stays here, and the remote cell's copy starts empty."""
    kind = getattr(functools, "_lru_cache_wrapper", None)
    notes = []
    for name, value in values.items():
        if kind is not None and isinstance(value, kind):
            try:
                filled = value.cache_info().currsize
            except Exception:
                continue
            if filled:
                notes.append(f"{name}: its cache ({filled} results) stays in the local kernel; "
                             "the remote cell's copy starts empty")
    return notes


def _describe_all(values: dict, algo: str, store: str, origin: dict = None,
                  done: dict = None) -> tuple:
    """({name: manifest entry}, {name: error}) of values, those that share objects
    in one group blob (see :func:`blobs_of`); ``origin`` (the host's input objects)
    adds where each value's objects came from. The memos go to ``_last_memos``."""
    done, errors = {n: b for n, b in (done or {}).items() if n in values}, {}
    for name, value in values.items():
        if name in done:
            continue
        try:
            done[name] = _tracked_blob(value, algo)
        except Exception as exc:
            errors[name] = {"type": _type_name(value), "reason": _reason(exc)}
    ok = {n: v for n, v in values.items() if n in done}
    try:
        blobs = blobs_of(ok, algo, done)
    except Exception as exc:  # the values pickled alone but not together
        for name, value in ok.items():
            errors[name] = {"type": _type_name(value), "reason": _reason(exc)}
        return {}, errors
    entries, described, found_in = {}, {}, {}
    for name, (blob_id, parts, index, memo, names) in blobs.items():
        if blob_id not in described:
            value = ok[name] if index is None else tuple(ok[n] for n in names)
            described[blob_id] = describe(value, blob_id, parts, store)
        _last_memos[names[0]] = memo
        entry = dict(described[blob_id], type=_type_name(ok[name]))
        entry.update(_group_fields(names, index))
        if origin and names[0] not in found_in:
            found_in[names[0]] = _origins(memo, origin)
        found = found_in.get(names[0])
        if found:
            entry["origins"] = found
        entries[name] = entry
    return entries, errors


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
    _WIDGET_UPDATES.clear()
    loader = _Loader(store, memos=bool(_EXPORTED))
    for name, entry in values.items():
        try:
            loaded[name] = loader.load(name, entry)
        except Exception as exc:
            failures.append({"name": name, "reason": _reason(exc)})
    try:  # the objects that came from the local ones are changed in place
        loaded = _bind_in_place(loader, values, loaded, shell.user_ns)
    except Exception as exc:
        failures.append({"name": "(in place)", "reason": _reason(exc)})
    finally:
        _EXPORTED.clear()
    try:  # an array that was a view into an input is one into the local array again
        _as_views(values, loaded, shell.user_ns)
    except Exception as exc:
        failures.append({"name": "(views)", "reason": _reason(exc)})
    try:  # the live widgets the cell changed
        _update_widgets()
    except Exception as exc:
        failures.append({"name": "(widgets)", "reason": _reason(exc)})
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
    _dill()

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


# -- shared references and in-place changes ----------------------------------------------
#
# Values that share objects travel as one blob (a *group*: the tuple of their
# values), so ``b = a``, or a model and the optimizer holding its parameters,
# are one object on the other side too. Objects are matched across the trip by
# their pickle memo index: the pickler numbers each object it writes and the
# unpickler numbers what it builds the same way, so (blob id, index) names the
# same object on both sides. The host reports, for each value it sends back,
# which of its objects came from which input object; the local side changes
# those local objects in place to the state that came back, and puts them
# wherever the arrived ones were referenced, so aliases, views and links
# between variables see what plain Python would show.

_MEMO = {"want": False, "dumped": None, "loaded": None}


def _note_memo(memo: dict) -> None:
    """Keep the last pickler's memo ({id: (index, object)}) when asked for."""
    if _MEMO["want"]:
        _MEMO["dumped"] = memo


def _unpickle(pickled, buffers):
    import io

    unpickler = _unpickler_class()(io.BytesIO(pickled), buffers=buffers)
    value = unpickler.load()
    if _MEMO["want"]:
        _MEMO["loaded"] = unpickler.memo.copy()
    return value


# -- a notebook's classes and functions keep their identity ----------------------------
#
# dill copies a class or function the notebook defined by value, and unpickling makes a
# new one each time: instances that came back from a remote cell were not instances of
# the local class (isinstance failed), and two inputs loaded apart had two classes. A
# copy made from the same definition as the one ``__main__`` holds (or as one this load
# already made) is that one instead. The same definition: the same code, compiled from
# the same cell file (whose name holds the kernel's pid), so a class a remote cell
# redefined is a new class, as it would be locally.

_UNPICKLER = None
#: name -> the class or function a load made or found for it (reset by each load)
_HOMES: dict = {}


def _unpickler_class():
    global _UNPICKLER
    if _UNPICKLER is None:
        dill = _dill()

        made = {"_create_type": _homed_type, "_create_function": _homed_function}

        class Unpickler(dill.Unpickler):
            def find_class(self, module, name):
                if module in ("dill._dill", "dill.dill") and name in made:
                    return made[name]
                return super().find_class(module, name)

        _UNPICKLER = Unpickler
    return _UNPICKLER


def _code_key(code) -> tuple:
    return (code.co_filename, code.co_firstlineno, code.co_qualname if hasattr(code, "co_qualname")
            else code.co_name, code.co_code)


def _codes(attr) -> list:
    """The code objects of a class attribute that is a function, a method or a property."""
    inner = [attr, getattr(attr, "__func__", None)]
    inner += [attr.func] if isinstance(attr, functools.cached_property) else []
    inner += [getattr(attr, f, None) for f in ("fget", "fset", "fdel")] if isinstance(attr, property) else []
    return [_code_key(f.__code__) for f in inner if isinstance(f, types.FunctionType)]


def _same_body(home, body: dict) -> bool:
    """Whether ``home``'s own attributes are the code of ``body``, name for name."""
    own = {k: v for k, v in vars(home).items() if k not in _NOT_BODY and not k.startswith("_abc_")}
    slots = getattr(home, "__slots__", ())
    if set(own) - set(body) - set([slots] if isinstance(slots, str) else slots or ()):
        return False
    return all(k in own and _codes(own[k]) == _codes(v) for k, v in body.items() if k not in _NOT_BODY)


#: What a class gains by being used (pickling an instance caches ``__slotnames__``).
_NOT_BODY = frozenset({"__dict__", "__weakref__", "__slotnames__"})


def _home(name: str, kind):
    """What this load made, or ``__main__`` holds, under the top-level ``name``."""
    found = _HOMES.get(name)
    if found is None:
        found = getattr(sys.modules.get("__main__"), name, None)
    if isinstance(found, kind) and getattr(found, "__module__", None) == "__main__" \
            and getattr(found, "__qualname__", None) == name:
        return found
    return None


def _same_defaults(a, b) -> bool:
    try:
        return bool(a.__defaults__ == b.__defaults__ and a.__kwdefaults__ == b.__kwdefaults__)
    except Exception:  # (an array as a default: its == is no bool)
        return False


def _homed_type(metaclass, name, bases, body):
    home = _home(name, type)
    if home is not None and type(home) is metaclass and home.__bases__ == tuple(bases) \
            and _same_body(home, body):
        return home
    made = metaclass(name, bases, body)
    if body.get("__module__") == "__main__":
        _HOMES[name] = made
    return made


def _homed_function(fcode, fglobals, fname=None, *args):
    made = _dill()._dill._create_function(fcode, fglobals, fname, *args)
    if getattr(made, "__module__", None) != "__main__" or made.__qualname__ != made.__name__:
        return made  # (dill sets the qualified name after; a nested one has its own)
    home = _home(made.__name__, types.FunctionType)
    if home is not None and _code_key(home.__code__) == _code_key(fcode) \
            and _same_defaults(home, made):
        return home
    _HOMES[made.__name__] = made
    return made


def _pairable(obj) -> bool:
    """Whether an object has an identity worth keeping across the trip: something
    mutable that names can share (not a str, a number, a type or a function)."""
    if isinstance(obj, (list, dict, set, bytearray)):
        return True
    if isinstance(obj, (type, types.FunctionType, types.ModuleType, types.MethodType,
                        types.BuiltinFunctionType, functools.partial)):
        return False
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return True
    try:
        return isinstance(vars(obj), dict)
    except TypeError:
        return False


def _memo_objects(memo: dict) -> dict:
    """{index: object} of a pickler's memo, pairable objects only."""
    main = getattr(sys.modules.get("__main__"), "__dict__", None)
    return {i: o for i, o in memo.values() if o is not main and _pairable(o)}


def _tracked_blob(value, algo: str) -> tuple:
    """(blob id, parts, {index: object}) of a value."""
    _MEMO["want"] = True
    try:
        blob_id, parts = blob_of(value, algo)
        memo = _MEMO["dumped"] or {}
    finally:
        _MEMO.update(want=False, dumped=None)
    return blob_id, parts, _memo_objects(memo)


def blobs_of(values: dict, algo: str, done: dict = None) -> dict:
    """{name: (blob id, parts, index in the group or None, {index: object}, the group's names)}.

    Each value is pickled alone; values whose pickles share pairable objects
    are pickled again together, as the tuple of their values, in one group blob.
    ``done`` holds values already pickled alone (name -> (id, parts, memo)).
    Values that cannot be pickled raise as blob_of does, under their name:
    the exception gets a ``link_name`` attribute.
    """
    alone = dict(done or {})
    for name, value in values.items():
        if name not in alone:
            try:
                alone[name] = _tracked_blob(value, algo)
            except Exception as exc:
                exc.link_name = name
                raise
    owner: dict = {}  # id(object) -> the first name whose pickle holds it
    parent = {name: name for name in values}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name in values:
        for obj in alone[name][2].values():
            first = owner.setdefault(id(obj), name)
            if first != name:
                parent[root(name)] = root(first)
    groups: dict = {}
    for name in values:
        groups.setdefault(root(name), []).append(name)
    out = {}
    for names in groups.values():
        if len(names) == 1:
            blob_id, parts, memo = alone[names[0]]
            out[names[0]] = (blob_id, parts, None, memo, names)
            continue
        blob_id, parts, memo = _tracked_blob(tuple(values[n] for n in names), algo)
        for i, name in enumerate(names):
            out[name] = (blob_id, parts, i, memo, names)
    return out


def _group_fields(names_in_group: list, index) -> dict:
    return {} if index is None else {"group": names_in_group, "index": index}


def _source_key(name: str, entry) -> str:
    """What names a loaded value's objects across the trip: its name, or a group's first."""
    group = entry.get("group") if isinstance(entry, dict) else None
    return group[0] if group else name


class _Loader:
    """Loads manifest entries (a group blob once), keeping each loaded pickle's memo
    under its :func:`_source_key` (two values of the same content are two objects)."""

    def __init__(self, store: str, memos: bool) -> None:
        _HOMES.clear()
        self.store = store
        self.memos = memos
        self.loaded: dict = {}  # source key -> value (a tuple for a group)
        self.memo: dict = {}  # source key -> {index: object}

    def load(self, name: str, entry, write: bool = False):
        key = _source_key(name, entry)
        if key not in self.loaded:
            _MEMO["want"] = self.memos
            try:
                self.loaded[key] = load_entry(self.store, entry, write)
                if self.memos:
                    self.memo[key] = {i: o for i, o in (_MEMO["loaded"] or {}).items()
                                      if _pairable(o)}
            finally:
                _MEMO.update(want=False, loaded=None)
        value = self.loaded[key]
        if isinstance(entry, dict) and entry.get("index") is not None:
            return value[entry["index"]]
        return value


#: Local side: what the last export sent, source key -> {memo index: local object},
#: to find the local objects a cell's results came from. Dropped by apply.
_EXPORTED: dict = {}


def _origins(memo: dict, origin: dict) -> dict:
    """{input key: [[index here, index there], ...]} for the objects of a value that
    came from an input (``origin``: id(object) -> (its :func:`_source_key`, index, object))."""
    found: dict = {}
    for i, obj in memo.items():
        source = origin.get(id(obj))
        if source is not None and source[2] is obj:
            found.setdefault(source[0], []).append([i, source[1]])
    return found


def _pairs(loader: _Loader, values: dict) -> dict:
    """id(arrived object) -> the local object it came from, where it can be changed
    in place to the arrived state (same type; arrays of the same shape and dtype)."""
    pairs: dict = {}
    for name, entry in values.items():
        if not isinstance(entry, dict) or not entry.get("origins"):
            continue
        arrived = loader.memo.get(_source_key(name, entry), {})
        for source, matches in entry["origins"].items():
            local = _EXPORTED.get(source, {})
            for here, there in matches:
                a, l = arrived.get(here), local.get(there)
                if a is not None and l is not None and _can_merge(l, a):
                    pairs[id(a)] = l
    return pairs


def _can_merge(local, new) -> bool:
    kind, other = type(local), type(new)
    if kind is not other and not (  # a notebook class travels by value: a copy of it
        kind.__module__ == other.__module__ == "__main__" and kind.__qualname__ == other.__qualname__
    ):
        return False
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(local, numpy.ndarray):
        return local.shape == new.shape and local.dtype == new.dtype and local.flags.writeable
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(local, torch.Tensor):
        return local.shape == new.shape and local.dtype == new.dtype and local.device == new.device
    return True


def _merge(local, new, m) -> None:
    """Change ``local`` in place to the state of ``new``; ``m`` maps what that
    state refers to onto local objects."""
    numpy = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    pandas = sys.modules.get("pandas")
    if numpy is not None and isinstance(local, numpy.ndarray):
        numpy.copyto(local, new)
        return
    if torch is not None and isinstance(local, torch.Tensor):
        with torch.no_grad():
            local.copy_(new)
        if local.is_leaf:
            local.requires_grad_(new.requires_grad)
            if new.grad is not None:  # (a pickled tensor has none: the local one's stays)
                local.grad = m(new.grad)
        return
    if pandas is not None and isinstance(local, (pandas.DataFrame, pandas.Series)):
        local._update_inplace(new)
        local.attrs = new.attrs
        if isinstance(local, pandas.Series):
            local.name = new.name
        return
    if isinstance(local, list):
        local[:] = [m(x) for x in new]
    elif isinstance(local, dict):
        items = [(m(k), m(v)) for k, v in new.items()]
        local.clear()
        local.update(items)
        if hasattr(new, "default_factory"):
            local.default_factory = m(new.default_factory)
    elif isinstance(local, set):
        items = [m(x) for x in new]
        local.clear()
        local.update(items)
    elif isinstance(local, bytearray):
        local[:] = new
        return
    state = getattr(new, "__dict__", None)
    if isinstance(state, dict) and state is not getattr(local, "__dict__", None):
        attrs = {k: m(v) for k, v in state.items()}
        local.__dict__.clear()
        local.__dict__.update(attrs)


def _relink(value, m, seen: set):
    """Point what the cell made (not changed in place) at the local objects; the
    value to bind (a tuple is rebuilt, if it has to be)."""
    if id(value) in m.pairs:
        return m(value)
    if id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, list):
        value[:] = [_relink(x, m, seen) for x in value]
    elif isinstance(value, dict):
        items = [(_relink(k, m, seen), _relink(v, m, seen)) for k, v in value.items()]
        if any(a is not k or b is not v for (a, b), (k, v) in zip(items, value.items())):
            value.clear()
            value.update(items)
    elif isinstance(value, set):
        items = [_relink(x, m, seen) for x in value]
        if any(id(x) in m.pairs for x in value):
            value.clear()
            value.update(items)
    elif type(value) is tuple:
        items = tuple(_relink(x, m, seen) for x in value)
        if any(a is not b for a, b in zip(items, value)):
            return items
    elif isinstance(value, types.MethodType) and id(value.__self__) in m.pairs:
        return types.MethodType(value.__func__, m(value.__self__))  # the local object's method
    elif _pairable(value):
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            _relink(state, m, seen)
    return value


class _Mapper:
    def __init__(self, pairs: dict) -> None:
        self.pairs = pairs

    def __call__(self, obj):
        return self.pairs.get(id(obj), obj)


#: An array at least this big that nothing but its name holds is rebound, not copied into.
_REBIND_MIN = 1 << 20


def _unshared_arrays(pairs: dict, arrived: dict, ns) -> list:
    """The pairs whose local object is a big array that only its one name holds.

    Copying 1 GiB into the local array costs about 0.4 s; when no other name,
    object or view refers to it (a view holds its base), binding the arrived
    array instead is the same to the notebook, and costs nothing. The count of
    references is compared against a probe held the same known ways (its name
    in the namespace, the export's memo, ``pairs``), so anything else holding
    it, IPython's ``Out`` included, means a copy in place.
    """
    numpy = sys.modules.get("numpy")
    if numpy is None or ns is None:
        return []
    found = []
    for key in arrived:
        kind = type(pairs[key])
        if kind is numpy.ndarray and pairs[key].nbytes >= _REBIND_MIN and pairs[key].base is None:
            if not _referred_elsewhere(pairs[key], ns):
                found.append(key)
    return found


def _referred_elsewhere(obj, ns) -> bool:
    """Whether anything but one name of ``ns``, the export's memo and the pairs holds obj.

    (No closure or generator here may hold ``obj``: each would be one more reference.)
    """
    names = 0
    for value in ns.values():
        if value is obj:
            names += 1
    value = None
    if names != 1:
        return True  # bound to two names
    probe = object()
    keep = [probe] * (names + _memo_count(obj) + 1)  # noqa: F841 (held as obj is held)
    return sys.getrefcount(obj) > sys.getrefcount(probe)


def _memo_count(obj) -> int:
    count = 0
    for memo in _EXPORTED.values():
        for value in memo.values():
            if value is obj:
                count += 1
    value = None
    return count


def _bind_in_place(loader: _Loader, values: dict, loaded: dict, ns=None) -> dict:
    """The values to bind: the local objects the arrived ones came from, changed in place."""
    pairs = _pairs(loader, values)
    if not pairs:
        _EXPORTED.clear()
        return loaded
    m = _Mapper(pairs)
    arrived = {}
    for memo in loader.memo.values():
        for obj in memo.values():
            if id(obj) in pairs:
                arrived[id(obj)] = obj
    seen: set = set()

    def relinked(obj):
        return _relink(obj, m, seen)

    for key in _unshared_arrays(pairs, arrived, ns):
        del pairs[key]  # nothing else sees it: binding what arrived is the same, and free
    for key, new in arrived.items():
        if key in pairs:
            _merge(pairs[key], new, relinked)
    _EXPORTED.clear()
    return {name: _relink(value, m, seen) for name, value in loaded.items()}


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
        #: id(object) -> (input blob id, memo index, object): the inputs' objects.
        self.origin: dict = {}
        #: Inputs the standby had ready in memory (see preload).
        self.ready: list = []

    def load(self) -> None:
        """Bind the inputs; raise before the cell runs if any cannot be loaded."""
        import importlib

        values = {}
        loader = _Loader(self.store, memos=True)
        for name, entry in self.inputs.items():
            group = entry.get("group", ()) if isinstance(entry, dict) else ()
            write = name in self.inplace or any(n in self.inplace for n in group)
            try:  # mapped: an input the cell only reads costs no copy at all
                values[name] = loader.load(name, entry, write=write)
                if self._input_id(name) in _TAKEN:
                    self.ready.append(name)
            except Exception as exc:
                raise RuntimeError(f"input {name!r} could not be loaded: {_reason(exc)}") from exc
        for name, module in self.modules.items():
            values[name] = importlib.import_module(module)
        placeholder = _Placeholder()
        for name in self.placeholders:
            values.setdefault(name, placeholder)
        self.origin = {id(o): (b, i, o) for b, memo in loader.memo.items() for i, o in memo.items()}
        _drop_preloaded()  # what the cell does not use goes (its memory with it)
        ns = self.shell.user_ns
        ns.update(values)
        self.before = {n: v for n, v in ns.items() if _is_user_name(self.shell, n)}

    def result(self) -> dict:
        """What changed: written blobs, deletions and serialization failures."""
        ns = self.shell.user_ns
        _REACHED_LOG.clear()
        now = {n: v for n, v in ns.items() if _is_user_name(self.shell, n)}
        if self.outputs is not None:
            changed = [n for n in self.outputs if n in now]
            deleted = [n for n in self.outputs if n not in now and n in self.before]
        else:
            changed = [
                n
                for n, v in now.items()
                if (n not in self.before or v is not self.before[n])
                and not isinstance(v, _Placeholder)
            ]  # a module the cell imported comes back by name, as import binds it
            deleted = [n for n in self.before if n not in now]
        out: dict = {"values": {}, "modules": {}, "deleted": deleted, "errors": {}}
        values = {}
        for name in changed:
            value = now[name]
            if isinstance(value, types.ModuleType):
                out["modules"][name] = value.__name__
                continue
            values[name] = value
        done: dict = {}
        if self.outputs is None:  # an input comes back only if it changed
            values.update(self._changed_inputs(now, set(changed), done))
        out["values"], out["errors"] = _describe_all(values, self.algo, self.store, self.origin,
                                                     done)
        _last_memos.clear()
        for name, view in _views_of_inputs(values, {n: now[n] for n in self.inputs if n in now}).items():
            if name in out["values"]:
                out["values"][name]["view"] = view
        _bring_reached(self, out, now, values)
        if self.cap:
            trim_store(self.store, self.cap)
        return out

    def _input_id(self, name: str):
        entry = self.inputs.get(name)
        return entry.get("id") if isinstance(entry, dict) else entry

    def _changed_inputs(self, now: dict, rebound: set, done: dict) -> dict:
        """The inputs (still bound to the objects they came as) whose content changed,
        judged by their blob (a group's as a whole). ``done`` gets the single inputs'
        blobs, to reuse."""
        changed = {}
        seen = set()
        for name, entry in self.inputs.items():
            if name not in now or name in rebound or name in seen:
                continue
            group = entry.get("group") if isinstance(entry, dict) else None
            names = [n for n in (group or [name])]
            seen.update(names)
            if any(n not in now or n in rebound for n in names):
                changed.update({n: now[n] for n in names if n in now and n not in rebound})
                continue
            try:
                if group:
                    blob_id, _, _ = _tracked_blob(tuple(now[n] for n in names), self.algo)
                else:
                    done[name] = _tracked_blob(now[name], self.algo)
                    blob_id = done[name][0]
            except Exception:
                blob_id = None  # reported when it is written
            if blob_id != self._input_id(name):
                changed.update({n: now[n] for n in names})
        return changed


def _views_of_inputs(values: dict, inputs: dict) -> dict:
    """{name: [input name, byte offset, shape, strides]} of the arrays among ``values``
    that are views into an input array (``row = a[1]``): locally, they become views
    of the local array, so they see what later changes it, as in plain Python."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return {}
    bases = {n: v for n, v in inputs.items()
             if type(v) is numpy.ndarray and v.flags.c_contiguous and v.nbytes}
    views = {}
    for name, value in values.items():
        if type(value) is not numpy.ndarray or name in bases or not value.nbytes:
            continue
        low, high = numpy.lib.array_utils.byte_bounds(value) if hasattr(numpy.lib, "array_utils") \
            else numpy.byte_bounds(value)
        for base_name, base in bases.items():
            start = base.__array_interface__["data"][0]
            if start <= low and high <= start + base.nbytes and value.dtype == base.dtype:
                offset = value.__array_interface__["data"][0] - start
                views[name] = [base_name, offset, list(value.shape), list(value.strides)]
                break
    return views


def _as_views(values: dict, loaded: dict, ns: dict) -> None:
    """Make the arrays that were views into an input on the host views into the local
    array again (see :func:`_views_of_inputs`)."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return
    for name, entry in values.items():
        view = entry.get("view") if isinstance(entry, dict) else None
        arrived = loaded.get(name)
        if view is None or type(arrived) is not numpy.ndarray:
            continue
        base_name, offset, shape, strides = view
        base = loaded.get(base_name, ns.get(base_name))
        if type(base) is not numpy.ndarray or not base.flags.c_contiguous or base.dtype != arrived.dtype:
            continue
        try:
            local = numpy.ndarray(tuple(shape), arrived.dtype, buffer=base, offset=offset,
                                  strides=tuple(strides))
        except (TypeError, ValueError):  # not within the local array: the copy stays
            continue
        if local.shape == arrived.shape and numpy.array_equal(local, arrived, equal_nan=arrived.dtype.kind in "fc"):
            loaded[name] = local


def _bring_reached(cell: Cell, out: dict, now: dict, values: dict) -> None:
    """With ``out=``, the names the code in the outputs uses come back too, if this
    cell bound them: a class made here must work locally, with its globals.

    (Without ``out=`` every name the cell bound comes back anyway, and the
    others are the local kernel's own.)
    """
    if cell.outputs is None:
        return
    ns = cell.shell.user_ns
    reached: set = set()
    for value in values.values():
        reached |= _referenced_globals(value, ns)
    done = set(cell.outputs)
    todo = sorted(reached - done)
    extra: dict = {}
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
        extra[name] = value
        try:
            dumps(value)  # finds the names its own code uses
        except Exception:
            continue  # reported by _describe_all below
        todo.extend(sorted(_referenced_globals(value, ns) - done))
    if extra:
        entries, errors = _describe_all(extra, cell.algo, cell.store, cell.origin)
        out["values"].update(entries)
        out["errors"].update(errors)
        _last_memos.clear()


def install(shell, wrap: bool = True) -> None:
    """Register the agent, the no-op ``%link`` magic and (remote) the execute wrapper.

    ``%link`` lines are handled by the router. The kernel still sees them (the
    router forwards cells unchanged, so tracebacks keep the cell's line
    numbers), and for the kernel they do nothing.
    """
    global _REMOTE
    module = sys.modules.get(__name__)
    if module is not None:
        sys.modules[NAME] = module
    _note_baseline()
    _REMOTE = wrap

    def link(line: str) -> None:
        """Handled by the Link router; a no-op inside a kernel."""

    shell.register_magic_function(link, "line", "link")
    shell.events.register(
        "post_run_cell",
        lambda result: _dill_for_the_notebook(shell, getattr(result.info, "raw_cell", None) or ""),
    )
    kernel = getattr(shell, "kernel", None)
    handlers = getattr(kernel, "shell_handlers", None)
    if wrap and handlers is not None and "execute_request" in handlers:
        handlers["execute_request"] = _wrap_execute(shell, kernel, handlers["execute_request"])
        _lean_exit(shell, kernel)
    elif handlers is not None:
        handlers[RECORD_REQUEST] = _record_handler(shell, kernel)
    if handlers is not None:
        handlers[STATE_REQUEST] = _state_handler(shell, kernel)


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
        global _KEPT
        cell = Cell(shell, instructions)
        _KEPT = not instructions.get("release")
        started = time.perf_counter()
        _finish_preimport()
        try:
            cell.load()
        except KeyboardInterrupt:
            _refuse(shell, kernel, stream, ident, parent, "interrupted before the cell ran",
                    "KeyboardInterrupt")
            return None
        except Exception as exc:
            _refuse(shell, kernel, stream, ident, parent, exc)
            return None
        state = CellState(shell, instructions) if "state" in instructions else None
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
        if instructions.get("store"):  # a cell that raised keeps what it did before the raise
            try:
                content.update(cell.result())
            except (Exception, KeyboardInterrupt) as exc:  # nothing comes back; the cell ran
                content["errors"] = {"*": {"type": "", "reason": _reason(exc)}}
        if state is not None and "values" in content:  # module state comes back with the results
            try:
                content["state"] = state.changes()
            except Exception as exc:  # the cell's variables still come back
                content["state"] = {"sections": {}, "errors": {"*": _reason(exc)}}
        if cell.scan:  # files come back whether or not the cell succeeded
            flush_open_files()  # what the cell wrote to files it left open counts
            scan = globals().get("scan_tree")
            try:
                now = scan(cell.scan["root"], cell.scan.get("prune", ()))
                if cell.scan.get("hash"):  # files whose size and mtime cannot tell a rewrite
                    now = globals()["hash_racy"](cell.scan["root"], now, cell.scan["hash"])
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
