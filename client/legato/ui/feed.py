"""One page's live events: a single daemon watch from the seq the page last had.

A page's event stream is one `Follower`, and a follower is one WatchTasks
stream: with no labels, every task in the UI's view (an admin's: all), so a
task on a label nobody held before arrives like any other; with the page's
label, that label's tasks. The client's watch resumes by itself across drops
and daemon restarts, in seq order and without repeats, so the seq of the last
event read is where the page resumes (the SSE `id`).

The watch is read ahead into a bounded queue by a task of its own: the stream
can then wait for the next event with a timeout (to send a keepalive) without
cancelling the watch, and shutdown can end the wait at once. A page that reads
slowly fills the queue and the watch waits; past the daemon's own buffer the
daemon cuts the stream off and the client resumes it from its last seq, so
nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from contextlib import aclosing
from types import TracebackType
from typing import Any

from legato.client import AsyncClient, TaskEvent

# Events a slow page may leave unread before the watch waits.
QUEUE_EVENTS = 1000


class Stopped(Exception):
    """The UI is shutting down."""


_STOP = object()


class Follower:
    """The events of a page's tasks after `after`, each once, in seq order.

    Args:
        after: the seq the page has everything up to.
        labels: the page's label filter; empty follows the whole view.
    """

    def __init__(self, client: AsyncClient, *, after: int, labels: Sequence[str] = ()):
        self._client = client
        self._after = after
        self._labels = tuple(labels)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_EVENTS)
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> Follower:
        self._pump = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    def stop(self) -> None:
        """Ends `get` with `Stopped` (the UI shuts down)."""
        self._stopping = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_STOP)

    async def _read(self) -> None:
        events = self._client.watch(labels=self._labels, after_seq=self._after)
        try:
            async with aclosing(events):
                async for event in events:
                    await self._queue.put(event)
        except Exception as exc:  # not resumable (e.g. the key was revoked): the page's to see
            await self._queue.put(exc)
        else:  # the client was closed: the UI is shutting down
            await self._queue.put(_STOP)

    async def get(self) -> TaskEvent:
        """The next event; raises `Stopped` on shutdown, or what the watch cannot resume from.

        Cancelling a `get` (a timeout) loses no event.
        """
        if self._stopping:
            raise Stopped
        item = await self._queue.get()
        if item is _STOP or self._stopping:
            raise Stopped
        if isinstance(item, BaseException):
            raise item
        event: TaskEvent = item
        return event


def sse(*, data: Any = None, event: str = "", id: int | None = None, retry: int = 0) -> bytes:
    """One server-sent event. Without `data` it only moves the page's resume point (`id`)."""
    lines = []
    if retry:
        lines.append(f"retry: {retry}")
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    if data is not None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        lines.extend(f"data: {line}" for line in text.splitlines())
    return ("\n".join(lines) + "\n\n").encode()


def keepalive() -> bytes:
    """A comment: keeps proxies and the browser from timing out an idle stream."""
    return b": keepalive\n\n"
