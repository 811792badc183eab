"""Variables between the local kernel and a remote cell.

For a remote cell the router:

1. **plans**: the names the cell reads (:mod:`.analysis`, or ``in=``) and the
   names to bring back (detected on the host, or ``out=``);
2. **exports** the inputs: the local kernel's agent writes each value as a
   content-addressed blob into the local store (an unchanged value writes
   nothing) and reports any value that cannot be serialized, which stops the
   cell before it runs;
3. **pushes** the blobs the host lacks into the host's store (size-capped, so an
   input the host has seen before is not sent again, though each cell gets a
   fresh kernel);
4. after the cell (one that raised too), **pulls** the blobs of its results and
   **applies** them in the local kernel all at once, only when every one has
   arrived whole; the local objects the results came from are changed in place.

The blobs themselves are made and read by :mod:`link_kernel.agent`, in the
kernels; this module only moves them and keeps the books.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent import has_blob
from ..backends.local import LocalBackend
from ..errors import SerializationError, SyncError, TransferError
from ..routing import Route
from .analysis import analyze

log = logging.getLogger(__name__)

#: Default size cap of each blob store (local and per host), in bytes.
DEFAULT_CAP = 8 * 2**30


def default_store() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "link-kernel" / "blobs"


#: IPython's output and input history: ``_``, ``__``, ``___``, ``_7``, ``Out``, ``In``...
_HISTORY = re.compile(r"_{1,3}|_\d+|_i{1,3}|_i\d+|Out|_oh|In|_ih")


@dataclass
class Plan:
    """The names one remote cell takes and gives back."""

    reads: list[str]
    outputs: list[str] | None  # None: whatever the cell binds, rebinds or changes
    explicit: bool = False  # the reads were named with in=
    #: Names the cell only deletes: a stand-in is sent, not the value.
    placeholders: list[str] = field(default_factory=list)
    #: Inputs the cell changes in place as a whole (``a *= 2``).
    inplace: list[str] = field(default_factory=list)
    #: The cell lists the whole namespace (``%who``, ``globals()``): every local
    #: name that can be sent goes too; one that cannot is left out, not an error.
    everything: bool = False
    #: IPython's history names the cell reads (``_``, ``Out``): the host's are its own.
    history: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, code: str, route: Route) -> Plan:
        if route.inputs is not None:
            return cls(reads=list(route.inputs), outputs=_outputs(route), explicit=True)
        try:
            names = analyze(code)
        except SyntaxError:
            return cls(reads=[], outputs=_outputs(route))  # the kernel reports it itself
        return cls(
            reads=sorted(names.reads - names.placeholders),
            outputs=_outputs(route),
            placeholders=sorted(names.placeholders),
            inplace=sorted(names.inplace),
            everything=names.everything and route.outputs is None,
            history=sorted(n for n in names.reads if _HISTORY.fullmatch(n)),
        )


def _outputs(route: Route) -> list[str] | None:
    return list(route.outputs) if route.outputs is not None else None


@dataclass
class Inputs:
    """What the local kernel exported for a cell."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    placeholders: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Local names not sent (capped), for the host's NameError hint.
    unsent: list[str] = field(default_factory=list)
    #: What the cell should know of its inputs (a function's cache that stays here).
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:  # a group blob (values that share objects) counts once
        return sum({v["id"]: v["size"] for v in self.values.values()}.values())


@dataclass
class Outputs:
    """What a remote cell reported in its ``link_result``."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: The host's scan of its work directory after the cell (None: files=off).
    files: dict[str, list] | None = None
    #: Or only what changed since the scan named ``since`` (see agent.scan_report).
    files_diff: dict[str, Any] | None = None
    files_token: str = ""
    files_error: str = ""
    #: Inputs a standby had ready in memory.
    ready: list[str] = field(default_factory=list)

    @classmethod
    def from_content(cls, content: dict) -> Outputs:
        return cls(
            values=content.get("values", {}),
            modules=content.get("modules", {}),
            deleted=content.get("deleted", []),
            errors=content.get("errors", {}),
            timings=content.get("timings", {}),
            files=content.get("files"),
            files_diff=content.get("files_diff"),
            files_token=content.get("files_token", ""),
            files_error=content.get("files_error", ""),
            ready=content.get("ready", []),
        )

    @property
    def size(self) -> int:  # a group blob (values that share objects) counts once
        return sum({v["id"]: v["size"] for v in self.values.values()}.values())


class VariableSync:
    """Moves a notebook's variables between its local kernel and its hosts."""

    def __init__(self, local: LocalBackend, store: Path | None = None, cap: int = DEFAULT_CAP):
        self.local = local
        self.store = Path(store or default_store())
        self.cap = cap
        self.algo = "xxh3t"
        #: Names a remote cell bound but could not send back: name -> why (see remember).
        self.left_behind: dict[str, str] = {}

    async def export(self, plan: Plan, algo: str, record: str | None = None) -> Inputs:
        """Write the cell's inputs as blobs in the local store.

        ``record``, if given, is the cell to put in the local kernel's history
        in the same request (one local round trip for both).

        Raises SerializationError, before anything runs, for the first input
        that cannot be serialized, and SyncError for an ``in=`` name that does
        not exist locally.
        """
        agent = "__import__('sys').modules['__link_agent__']"
        recording = f"{agent}.record(get_ipython(), {record!r})\n" if record is not None else ""
        if not plan.reads and not plan.placeholders and not plan.everything:
            if record is not None:
                await self.local.record(record)
            return Inputs()
        self.store.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = time.perf_counter()
        code = recording + (
            f"{agent}._last_export = {agent}.export("
            f"get_ipython(), {plan.reads!r}, {str(self.store)!r}, {algo!r}, {plan.placeholders!r}"
            f"{', everything=True' if plan.everything else ''})"
        )
        result = await self.local.call(code, {"manifest": f"{agent}._last_export"})
        manifest = json.loads(ast.literal_eval(result["manifest"]))
        missing = [n for n in manifest["missing"] if n in plan.reads] if plan.explicit else []
        if missing:
            names = ", ".join(repr(n) for n in missing)
            raise SyncError(
                f"in= names {names}, not defined in the local namespace",
                hint="Define it first, or leave it out of in=.",
            )
        for name, error in manifest["errors"].items():
            raise SerializationError(
                name,
                error["type"],
                error["reason"],
                hint=f"Leave it out with in=... (the names the cell needs), or make {name!r} "
                "picklable.",
            )
        return Inputs(
            values=manifest["values"],
            modules=manifest["modules"],
            placeholders=manifest.get("placeholders", []),
            seconds=time.perf_counter() - started,
            unsent=manifest.get("unsent", []),
            notes=manifest.get("notes", []),
        )

    def instructions(self, inputs: Inputs, plan: Plan, store: str, algo: str) -> dict[str, Any]:
        """The ``link`` metadata of the remote execute_request (see the agent)."""
        return {
            "store": store,
            "algo": algo,
            "inputs": {name: _entry(v) for name, v in inputs.values.items()},
            "modules": inputs.modules,
            "placeholders": inputs.placeholders,
            "inplace": plan.inplace,
            "outputs": plan.outputs,
            "cap": self.cap,
            "unsent": inputs.unsent,
        }

    async def apply(self, outputs: Outputs) -> list[dict[str, str]]:
        """Bind the pulled outputs in the local kernel, all at once."""
        values = {name: _entry(v) for name, v in outputs.values.items()}
        if not values and not outputs.deleted and not outputs.modules:
            return []
        code = (
            "__import__('sys').modules['__link_agent__']._last_apply = "
            "__import__('sys').modules['__link_agent__'].apply(get_ipython(), "
            f"{values!r}, {outputs.deleted!r}, {str(self.store)!r}, {outputs.modules!r})"
        )
        result = await self.local.call(
            code, {"failures": "__import__('sys').modules['__link_agent__']._last_apply"}
        )
        return json.loads(ast.literal_eval(result["failures"]))

    def remember(self, host: str, outputs: Outputs) -> None:
        """Note the names a cell on ``host`` bound and could not send back, and forget
        those a cell brought back or deleted: a later NameError for one says why."""
        for name in [*outputs.values, *outputs.deleted]:
            self.left_behind.pop(name, None)
        for name, error in outputs.errors.items():
            self.left_behind[name] = (
                f"{name} was bound by a cell on {host} and stayed there: "
                f"{error.get('type')}: {error.get('reason')}"
            )

    def name_error_note(self, content: dict[str, Any]) -> str:
        """The note for a cell that raised NameError on a name left behind on a host."""
        if content.get("ename") != "NameError":
            return ""
        match = _NAME_ERROR.fullmatch(str(content.get("evalue", "")))
        why = self.left_behind.get(match.group(1)) if match else None
        return f"[link] {why}\n" if why else ""

    def missing_locally(self, outputs: Outputs) -> list[str]:
        return list(dict.fromkeys(
            v["id"]
            for v in outputs.values.values()
            if "inline" not in v and not has_blob(str(self.store), v["id"])
        ))


_NAME_ERROR = re.compile(r"name '(\w+)' is not defined")


def _entry(value: dict[str, Any]) -> Any:
    """A manifest entry for the other side: the blob id, or the inline value."""
    extra = {k: value[k] for k in ("group", "index", "origins", "view") if k in value}
    if "inline" in value:
        return {"id": value["id"], "inline": value["inline"], **extra}
    return {"id": value["id"], **extra} if extra else value["id"]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


__all__ = ["Inputs", "Outputs", "Plan", "SyncError", "TransferError", "VariableSync"]
