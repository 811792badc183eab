"""Module state between the local kernel and a remote cell.

A long-lived kernel keeps what its modules hold: the global random generators
(``random``, ``numpy.random``, ``torch``), ``os.environ``, ``sys.path``,
warnings filters, matplotlib's rcParams and the inline backend's settings,
pandas' options, numpy's print options. A remote cell's kernel is fresh, so for each remote cell:

1. the local kernel's agent **captures** its state (:func:`agent.capture_state`,
   one light ``link_state_request``, sent while the inputs are exported): only
   what differs from a fresh kernel, each section a small inline blob named by
   its content hash;
2. the remote kernel's agent restores it before the cell (a section whose
   module the cell has not imported yet is set when it is imported) and, with
   the cell's results, sends back the sections whose hash the cell changed;
3. the router **restores** those in the local kernel, after the results have
   come back whole.

An unchanged state costs a few kilobytes in the request and nothing back. The
capture also names the modules the notebook uses, which a standby kernel
imports ahead of the next cell (:attr:`StateSync.modules`).
"""

from __future__ import annotations

import logging
from typing import Any

from ..agent import STATE_REQUEST
from ..backends.local import LocalBackend
from ..errors import LinkError

log = logging.getLogger(__name__)


class StateSync:
    """Captures and restores a notebook's module state in its local kernel."""

    def __init__(self, local: LocalBackend | None) -> None:
        self.local = local
        #: The installed modules the notebook used at its last capture.
        self.modules: list[str] = []

    async def _request(self, content: dict[str, Any]) -> dict[str, Any]:
        reply = await self.local._conn().request(STATE_REQUEST, content)
        content = reply["content"]
        if content.get("status") != "ok":
            raise RuntimeError(f"{content.get('ename')}: {content.get('evalue')}")
        return content

    async def capture(self, algo: str, reads: list[str] = ()) -> tuple[dict[str, Any] | None, list[str]]:
        """(the state to send, notes): None, with a note, if the local kernel could not
        capture it (the cell still runs, with a fresh kernel's state). The modules of
        ``reads`` (the cell's inputs) come first in :attr:`modules`."""
        try:
            content = await self._request({"capture": algo, "first": list(reads)})
        except (LinkError, RuntimeError) as exc:
            log.warning("module state not captured: %s", exc)
            return None, [f"[link] module state not sent: {exc}\n"]
        self.modules = list(content.get("modules") or [])
        notes = [f"[link] module state not sent: {name}: {reason}\n"
                 for name, reason in (content.get("errors") or {}).items()]
        return {"sections": content.get("sections") or {}}, notes

    async def restore(self, state: dict[str, Any] | None, host: str) -> list[str]:
        """Set what a remote cell changed in the local kernel; return notes of what failed."""
        if not state:
            return []
        notes = [f"{name}: {reason}" for name, reason in (state.get("errors") or {}).items()]
        if state.get("sections"):
            try:
                notes += (await self._request({"restore": state["sections"]})).get("errors", [])
            except (LinkError, RuntimeError) as exc:
                notes.append(str(exc))
        if not notes:
            return []
        return [f"[link] module state not brought back from {host}:\n  " + "\n  ".join(notes) + "\n"]


__all__ = ["StateSync"]
