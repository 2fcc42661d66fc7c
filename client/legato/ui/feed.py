"""One page's live events: daemon watches from a cursor, merged, resumed, restarted.

A page's event stream is one `Follower`. It watches the labels the page asks
for, or all of `Coverage.labels`, from the seq the page last had; WatchTasks
takes at most 16 labels, so more labels are several watches ("chunks"). The
client's watch already resumes by itself across daemon restarts.

Each event goes out once: a task's events arrive on every chunk holding one of
its labels, and only its *home* chunk (the first such) passes them on. The
`watermark` is the seq up to which every chunk has delivered: the page resumes
from it (the SSE `id`), so a reconnect replays at most what it already has,
never less. When the coverage grows, the watches restart from before the new
labels' first events (`Coverage.since`); what was sent already is not sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from legato.client import AsyncClient, TaskEvent
from legato.ui.coverage import Coverage

# WatchTasks takes at most this many labels.
LABELS_PER_WATCH = 16
# Events a slow page may leave unread before the watches wait (and, past the
# daemon's own buffer, are cut off and resume: nothing is lost).
QUEUE_EVENTS = 1000


class Stopped(Exception):
    """The UI is shutting down."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the page gets next: an event (or nothing new) and where to resume after it."""

    watermark: int
    event: TaskEvent | None


@dataclass(frozen=True, slots=True)
class _Chunk:
    labels: frozenset[str]
    task_ids: frozenset[str]

    def holds(self, event: TaskEvent) -> bool:
        return event.task.id in self.task_ids or not self.labels.isdisjoint(event.task.labels)


def _home(chunks: Sequence[_Chunk], event: TaskEvent) -> int:
    return next((n for n, chunk in enumerate(chunks) if chunk.holds(event)), -1)


@dataclass(frozen=True, slots=True)
class _Sent:
    """What the watches of an earlier generation had delivered when they restarted."""

    chunks: tuple[_Chunk, ...]
    last: tuple[int, ...]

    def delivered(self, event: TaskEvent) -> bool:
        home = _home(self.chunks, event)
        return home >= 0 and event.seq <= self.last[home]


_GROWN = object()
_STOP = object()


class Follower:
    """The events of a page's tasks from `after` on, each once, in seq order per task.

    Args:
        labels: the labels to watch; None follows `coverage` (the whole view).
        task_ids: tasks to watch whatever their labels.
    """

    def __init__(
        self,
        client: AsyncClient,
        coverage: Coverage,
        *,
        after: int,
        labels: Sequence[str] | None = None,
        task_ids: Sequence[str] = (),
    ):
        self._client = client
        self._coverage = coverage
        self._start = after
        self._labels = None if labels is None else frozenset(labels)
        self._task_ids = frozenset(task_ids)
        self._chunks: tuple[_Chunk, ...] = ()
        self._last: list[int] = []
        self._watermark = after
        self._sent: list[_Sent] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._ending: set[asyncio.Task[None]] = set()
        self._stopping = False
        # The coverage's generation the watches were opened with.
        self._generation = 0

    @property
    def following_coverage(self) -> bool:
        return self._labels is None

    async def __aenter__(self) -> Follower:
        self._open(self._start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_pumps()
        await asyncio.gather(*self._ending, return_exceptions=True)

    def stop(self) -> None:
        """Ends `get` with `Stopped` (the UI shuts down)."""
        self._stopping = True
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_STOP)

    def _open(self, after: int) -> None:
        labels = sorted(self._coverage.labels if self._labels is None else self._labels)
        groups = [labels[n : n + LABELS_PER_WATCH] for n in range(0, len(labels), LABELS_PER_WATCH)]
        if self._task_ids and not groups:
            groups = [[]]
        self._chunks = tuple(
            _Chunk(frozenset(group), self._task_ids if n == 0 else frozenset())
            for n, group in enumerate(groups)
        )
        self._last = [after] * len(self._chunks)
        self._watermark = after
        self._queue = asyncio.Queue(maxsize=QUEUE_EVENTS)
        self._pumps = [
            asyncio.create_task(self._pump(n, chunk, after, self._queue))
            for n, chunk in enumerate(self._chunks)
        ]
        if self._labels is None:
            self._generation = self._coverage.generation
            self._pumps.append(asyncio.create_task(self._on_growth(self._generation, self._queue)))

    def _close_pumps(self) -> None:
        for pump in self._pumps:
            pump.cancel()
            self._ending.add(pump)
            pump.add_done_callback(self._ending.discard)
        self._pumps = []

    async def _pump(self, index: int, chunk: _Chunk, after: int, queue: asyncio.Queue[Any]) -> None:
        events = self._client.watch(
            labels=sorted(chunk.labels), task_ids=sorted(chunk.task_ids), after_seq=after
        )
        try:
            async with aclosing(events):
                async for event in events:
                    await queue.put((index, event))
        except Exception as exc:  # not resumable (e.g. the key was revoked): the page's to see
            await queue.put(exc)

    async def _on_growth(self, generation: int, queue: asyncio.Queue[Any]) -> None:
        await self._coverage.grown(generation)
        await queue.put(_GROWN)

    def _restart(self) -> None:
        # The new labels' events all come after `since`; what the old watches
        # delivered up to their last seq is not sent again.
        self._sent.append(_Sent(self._chunks, tuple(self._last)))
        since = self._coverage.since(self._generation)
        restart_at = min(self._watermark, max(self._start, since))
        self._close_pumps()
        self._open(restart_at)

    async def get(self) -> Delivery:
        """The next delivery; raises `Stopped` on shutdown, or what a watch cannot resume from."""
        while True:
            if self._stopping:
                raise Stopped
            item = await self._queue.get()
            if item is _STOP:
                raise Stopped
            if item is _GROWN:
                self._restart()
                continue
            if isinstance(item, BaseException):
                raise item
            index, event = item
            self._last[index] = event.seq
            self._watermark = max(self._watermark, min(self._last))
            if self._labels is None:
                self._coverage.saw(event.seq)
            if self._sent and min(self._last) > max(max(s.last, default=0) for s in self._sent):
                self._sent.clear()  # every watch is past what was sent before
            duplicate = _home(self._chunks, event) != index or any(
                sent.delivered(event) for sent in self._sent
            )
            return Delivery(self._watermark, None if duplicate else event)


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
