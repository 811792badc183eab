"""The live line under a running remote cell: what it waits for, updated in place.

A remote cell can wait on things the user does not see: its kernel starting, a
gigabyte of variables going out or coming back, a folder of files. Each is a
:class:`Step` of the cell's :class:`ProgressLine`. Once a step has lasted
``show_after`` seconds the line appears (a ``display_data`` with a
``display_id``) and is updated in place (``update_display_data``) every
``every`` seconds while any step lasts: for a transfer, the bytes done of the
total, the rate and the time left; otherwise how long it has waited. When the
cell ends the router replaces the line with its quiet "ran on" line (same
display id), so the saved notebook keeps one line, not a stale progress bar. A
cell whose steps are all quick never shows the line.

Steps may be updated from worker threads (a transfer's callback adds bytes);
the line is drawn on the event loop only.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable
from typing import Any

from .sync.variables import format_size

#: Seconds a step lasts before the line appears.
SHOW_AFTER = 1.0
#: Seconds between redraws.
EVERY = 0.25


def format_seconds(s: float) -> str:
    s = max(0, round(s))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


class Step:
    """One thing the cell waits for; ``total`` bytes if it is a transfer (0 if not)."""

    def __init__(self, line: ProgressLine, what: str, total: int = 0) -> None:
        self.line = line
        self.what = what
        self.total = total
        self.done = 0
        self.started = line.clock()
        self.over = False

    def add(self, n: int) -> None:
        """Count ``n`` more bytes done (from any thread)."""
        self.done += n

    def end(self) -> None:
        self.over = True
        self.line._ended(self)

    def __enter__(self) -> Step:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()

    def describe(self, now: float) -> str:
        waited = now - self.started
        if not self.total:
            return f"{self.what} ({format_seconds(waited)})"
        done = min(self.done, self.total)
        text = f"{self.what}: {format_size(done)} of {format_size(self.total)}"
        if waited > 0 and done:
            rate = done / waited
            text += f", {format_size(rate)}/s, {format_seconds((self.total - done) / rate)} left"
        return text


class ProgressLine:
    """The progress line of one cell. ``send(msg_type, content)`` puts a message on iopub."""

    def __init__(
        self,
        send: Callable[[str, dict[str, Any]], None],
        display_id: str,
        *,
        show_after: float = SHOW_AFTER,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.display_id = display_id
        self.show_after = show_after
        self.every = every
        self.clock = clock
        self.steps: list[Step] = []
        #: True once the line is on screen (the final line then replaces it).
        self.shown = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    def step(self, what: str, total: int = 0) -> Step:
        """Begin a step; end it with :meth:`Step.end` or use it as a context manager."""
        step = Step(self, what, total)
        if not self.closed:
            self.steps.append(step)
            self._schedule(self.every if self.shown else self.show_after)
        return step

    def _ended(self, step: Step) -> None:
        if step in self.steps:
            self.steps.remove(step)
        if self.shown and not self.closed:
            self._draw()

    def _schedule(self, delay: float) -> None:
        if self._timer is not None or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed or not self.steps:
            return
        now = self.clock()
        if self.shown or any(now - s.started >= self.show_after for s in self.steps):
            self._draw()
            self._schedule(self.every)
        else:
            oldest = min(s.started for s in self.steps)
            self._schedule(max(0.01, self.show_after - (now - oldest)))

    def text(self) -> str:
        now = self.clock()
        return " · ".join(s.describe(now) for s in self.steps)

    def _draw(self) -> None:
        text = self.text()
        if not text:
            return
        content = {
            "data": {
                "text/plain": f"[link] {text}",
                "text/html": (
                    '<div class="link-progress" style="font-size:0.8em;opacity:0.6;'
                    f'font-family:var(--jp-ui-font-family,sans-serif)">&#8987; {html.escape(text)}</div>'
                ),
            },
            "metadata": {"link": {"progress": True}},
            "transient": {"display_id": self.display_id},
        }
        self.send("update_display_data" if self.shown else "display_data", content)
        self.shown = True

    def stop(self) -> None:
        """Draw no more (the cell is over); the line stays as it is until :meth:`close`."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.steps.clear()

    def close(self, final: dict[str, Any] | None = None) -> bool:
        """Stop; if the line was shown, replace it with ``final`` (a display_data
        content; an empty line if None), once. True if it was shown."""
        self.stop()
        if not self.shown:
            return False
        self.shown = False
        content = dict(final) if final is not None else {"data": {"text/plain": ""}, "metadata": {"link": {}}}
        content["transient"] = {"display_id": self.display_id}
        self.send("update_display_data", content)
        return True


class NoProgress(ProgressLine):
    """The progress line of no cell: steps are counted and never shown."""

    def __init__(self) -> None:
        super().__init__(lambda msg_type, content: None, "")
        self.closed = True


__all__ = ["EVERY", "NoProgress", "ProgressLine", "SHOW_AFTER", "Step"]
