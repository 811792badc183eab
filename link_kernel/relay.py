"""Relays a backend kernel's iopub, stdin and shell frames to the frontend.

The frontend's request is sent to the kernel with its own header, so every
message the kernel sends back already carries the frontend's parent header.
The relay only has to:

- route each message to the frontend's socket identity;
- re-sign it when the kernel's HMAC key differs from the router's (remote
  kernels get a key of their own, so a host never learns the key the frontend
  trusts), and give it the router's session id; a local kernel shares the
  router's key and session id, and its frames pass as is.

Status and welcome messages never get here: :mod:`link_kernel.connection`
consumes them, so the frontend sees only the router's own status.
"""

from __future__ import annotations

import hmac
import json
import logging
import tempfile
import weakref
from pathlib import Path
from typing import Any

from jupyter_client.session import DELIM, Session

from .connection import Frames, KernelConnection, _bytes

log = logging.getLogger(__name__)

#: Widget models that only show something: a frontend works them without their
#: kernel (a finished progress bar, a layout, a tab). The others take input.
DISPLAY_ONLY_MODELS = frozenset(
    {
        "LayoutModel", "StyleModel", "WidgetModel", "DOMWidgetModel",
        "BoxModel", "HBoxModel", "VBoxModel", "GridBoxModel", "AccordionModel", "TabModel",
        "StackModel", "HTMLModel", "HTMLMathModel", "LabelModel", "ImageModel", "AudioModel",
        "VideoModel", "IntProgressModel", "FloatProgressModel", "ValidModel", "OutputModel",
    }
)


def takes_input(open_content: dict) -> bool:
    """Whether the widget a comm_open creates sends the user's input to its kernel."""
    data = open_content.get("data")
    state = data.get("state") if isinstance(data, dict) else None
    name = state.get("_model_name", "") if isinstance(state, dict) else ""
    return bool(name) and name not in DISPLAY_ONLY_MODELS and not name.endswith("StyleModel")


class Relay:
    """The frontend-facing half of the router's sockets.

    ``iopub`` is a socket-like object with ``send_multipart`` that is safe to
    call on the router's event loop thread. ``stdin`` is the router's stdin
    ROUTER socket's reader. ``shell_idents`` are the routing identities of the request
    being served, used for stdin (frontends use one identity for both).
    """

    def __init__(self, session: Session, iopub: Any, stdin: Any) -> None:
        self.session = session
        self.iopub = iopub
        self.stdin = stdin
        self.shell_idents: list[bytes] = []
        #: Message types not to relay for the cell being served.
        self.drop: frozenset[str] = frozenset()
        #: Requests whose outputs the frontend never sees (a pipeline's hidden parents).
        self.hidden: set[str] = set()
        self._stdin_kernel: KernelConnection | None = None
        #: Stream output a cell may send the frontend; the rest goes to a file.
        self.output_budget = 32 * 2**20
        self.spill_dir: Path | None = None
        self._cell = ""
        self._spent = 0
        self._cut = 0
        self._spill: Any = None
        self.spill_path: Path | None = None
        #: Comms that remote kernels opened: comm_id -> (kernel, target_name, opening
        #: msg_id, whether it takes input). The kernel is held weakly: an ended
        #: kernel's connection (and the cell it holds) is not kept for its comms.
        self.comms: dict[str, tuple[weakref.ref, str, str, bool]] = {}

    def begin_cell(self, msg_id: str) -> None:
        """Start counting the stream output of the cell ``msg_id``."""
        self.end_cell()
        self._cell, self._spent, self._cut = msg_id, 0, 0
        self.spill_path = None

    def end_cell(self) -> tuple[int, Path | None]:
        """(bytes kept from the frontend, file holding them) of the cell that ended."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        cut, self._cut = self._cut, 0
        self._cell = ""
        return cut, self.spill_path

    def _over_budget(self, frames: Frames, i: int, parent: str) -> bool:
        """Count a stream message; past the budget, write it to a file instead."""
        if parent != self._cell or not self._cell:
            return False
        size = len(_bytes(frames[i + 5]))
        if self._spent + size <= self.output_budget and not self._cut:
            self._spent += size
            return False
        try:
            text = json.loads(_bytes(frames[i + 5])).get("text", "")
        except ValueError:
            text = ""
        if self._spill is None:
            base = self.spill_dir or Path(tempfile.gettempdir())
            base.mkdir(parents=True, exist_ok=True)
            self.spill_path = base / f"output-{self._cell}.txt"
            self._spill = open(self.spill_path, "w", encoding="utf-8")  # noqa: SIM115
        self._spill.write(text)
        self._cut += size
        return True

    def _same_key(self, conn: KernelConnection) -> bool:
        return conn.session.key == self.session.key and (
            conn.session.signature_scheme == self.session.signature_scheme
        )

    def _resign(self, conn: KernelConnection, frames: Frames, i: int) -> list | None:
        """Frames from DELIM on, signed with the router's key; None if forged."""
        parts = [_bytes(f) for f in frames[i + 2 : i + 6]]
        if conn.session.auth is not None:
            expected = conn.session.sign(parts)
            if not hmac.compare_digest(expected, _bytes(frames[i + 1])):
                log.warning("dropped a message from %s with a bad signature", conn.name)
                return None
        # The frontend sees one kernel: every message carries the router's session id
        # (JupyterLab drops comm and display messages that arrive out of session order).
        header = json.loads(parts[0])
        header["session"] = self.session.session
        parts[0] = self.session.pack(header)
        return [DELIM, self.session.sign(parts), *parts, *frames[i + 6 :]]

    def iopub_sink(self, conn: KernelConnection):
        """The ``on_iopub`` callback that relays ``conn``'s outputs."""
        if self._same_key(conn):

            def relay_raw(frames: Frames, i: int, msg_type: str, parent: str) -> None:
                if msg_type in self.drop or parent in self.hidden:
                    return
                if msg_type == "stream" and self._over_budget(frames, i, parent):
                    return
                self.iopub.send_multipart(frames, copy=False)

            return relay_raw

        def relay_resigned(frames: Frames, i: int, msg_type: str, parent: str) -> None:
            if msg_type in ("comm_open", "comm_close"):
                self._track_comm(conn, frames, i, msg_type, parent)
            if msg_type in self.drop or parent in self.hidden:
                return
            if msg_type == "stream" and self._over_budget(frames, i, parent):
                return
            out = self._resign(conn, frames, i)
            if out is not None:
                self.iopub.send_multipart([*frames[:i], *out], copy=False)

        return relay_resigned

    # -- comms of remote kernels (widgets) ----------------------------------------------

    def _track_comm(
        self, conn: KernelConnection, frames: Frames, i: int, msg_type: str, parent: str
    ) -> None:
        """A remote kernel opened or closed a comm: remember whose it is."""
        try:
            content = json.loads(_bytes(frames[i + 5]))
            comm_id = content["comm_id"]
        except (ValueError, KeyError, TypeError):
            return
        if msg_type == "comm_open":
            target = content.get("target_name", "")
            self.comms[comm_id] = (weakref.ref(conn), target, parent, takes_input(content))
        else:
            self.comms.pop(comm_id, None)

    def _ended(self, ref: weakref.ref) -> bool:
        conn = ref()
        return conn is None or conn.closed

    def live_comms(self, target_name: str | None = None) -> dict[str, dict[str, str]]:
        """comm_info's entries for the comms of remote kernels still running."""
        return {
            comm_id: {"target_name": target}
            for comm_id, (ref, target, _, _) in self.comms.items()
            if not self._ended(ref) and (target_name is None or target == target_name)
        }

    def dead_inputs(self, parent: str) -> list[str]:
        """The widgets taking input that ``parent`` opened in a kernel that has ended.
        Their comms stay known until the frontend is told (:meth:`on_frontend_comm`)."""
        return [
            comm_id
            for comm_id, (ref, _, opened_by, takes) in self.comms.items()
            if takes and opened_by == parent and self._ended(ref)
        ]

    def to_comm_kernel(self, conn: KernelConnection, frames: Frames, i: int) -> bool:
        """Pass a frontend's comm message (frames from ``i``, the DELIM) to the remote
        kernel whose comm it is, signed with that kernel's key. False if it is forged."""
        parts = [_bytes(f) for f in frames[i + 2 : i + 6]]
        if self.session.auth is not None and not hmac.compare_digest(
            self.session.sign(parts), _bytes(frames[i + 1])
        ):
            log.warning("dropped a comm message with a bad signature")
            return False
        if self._same_key(conn):
            conn.send_raw(list(frames[i:]))
        else:
            conn.send_raw([DELIM, conn.session.sign(parts), *parts, *frames[i + 6 :]])
        return True

    def on_frontend_comm(self, frames: Frames, i: int, parent: dict, topic: bytes) -> bool:
        """A frontend's message to a comm a remote kernel opened: to that kernel if it
        runs, else a comm_close back (its widget is no longer connected), never to the
        local kernel. False if the comm is not a remote kernel's."""
        comm_id = (parent.get("content") or {}).get("comm_id")
        entry = self.comms.get(comm_id) if isinstance(comm_id, str) else None
        if entry is None:
            return False
        conn = entry[0]()
        closing = parent["header"]["msg_type"] == "comm_close"
        if conn is not None and not conn.closed:
            self.to_comm_kernel(conn, frames, i)
            if closing:
                del self.comms[comm_id]
            return True
        del self.comms[comm_id]
        if not closing:
            closed = {"comm_id": comm_id, "data": {}}
            self.session.send(self.iopub, "comm_close", closed, parent, ident=topic)
        return True

    def add_comms(self, request: dict, frames: Frames) -> Frames:
        """The local kernel's comm_info_reply (frames from DELIM on), with the comms of
        the remote kernels still running (a kept kernel's widgets)."""
        remote = self.live_comms(request.get("target_name"))
        content = json.loads(_bytes(frames[5]))
        if not remote or content.get("status") != "ok":
            return frames
        content["comms"] = {**content.get("comms", {}), **remote}
        parts = [_bytes(f) for f in frames[2:5]]
        parts.append(self.session.pack(content))
        return [frames[0], self.session.sign(parts), *parts, *frames[6:]]

    def reply_frames(self, conn: KernelConnection, frames: Frames) -> list | None:
        """A kernel's reply (frames from DELIM on), ready for the frontend's idents."""
        if self._same_key(conn):
            return list(frames)
        return self._resign(conn, frames, 0)

    def on_stdin_request(self, conn: KernelConnection, frames: Frames, i: int) -> None:
        """A kernel asks for input: pass the request to the frontend."""
        out = frames[i:] if self._same_key(conn) else self._resign(conn, frames, i)
        if out is None or not self.shell_idents:
            return
        self._stdin_kernel = conn
        self.stdin.send([*self.shell_idents, *out])

    def on_frontend_stdin(self, frames: Frames) -> None:
        """The frontend answered: pass its input_reply to the kernel that asked."""
        conn = self._stdin_kernel
        if conn is None or conn.closed:
            return
        try:
            i = [_bytes(f) for f in frames].index(DELIM)
        except ValueError:
            return
        if self._same_key(conn):
            conn.send_stdin(frames[i:])
            return
        parts = [_bytes(f) for f in frames[i + 2 : i + 6]]
        if not hmac.compare_digest(self.session.sign(parts), _bytes(frames[i + 1])):
            log.warning("dropped an input_reply with a bad signature")
            return
        conn.send_stdin([DELIM, conn.session.sign(parts), *parts, *frames[i + 6 :]])


class NullRelay:
    """A relay with no frontend: a kernel's outputs and input requests go nowhere.

    For kernels started outside a notebook (``link-kernel hosts check``).
    """

    def iopub_sink(self, conn: KernelConnection):
        return lambda *args: None

    def on_stdin_request(self, *args: Any) -> None:
        return None

