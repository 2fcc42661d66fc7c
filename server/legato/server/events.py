"""Live fan-out of committed events to watch streams.

Each subscription has a buffer bounded in events and in bytes. A subscriber
that falls further behind than that is cut off (it resumes from its last seq,
losing nothing) instead of letting the daemon's memory grow without bound.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable, Iterable

from legato.server.model import Event

# Events a watcher may have undelivered before it is cut off...
DEFAULT_BUFFER = 10_000
# ...and what they may add up to (`Event.size`): events are deltas of tens of
# bytes, but a CREATED event carries its task's context (up to 1 MiB).
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024


class SubscriptionOverflow(Exception):
    """The subscriber fell too far behind; it must resume from its last seq."""


class SubscriptionClosed(Exception):
    """The bus was closed (the daemon is shutting down)."""


class SubscriptionRevoked(Exception):
    """The subscriber's key stopped working (revoked or rotated)."""


class Subscription:
    """The live events of tasks with any of `labels` or any of `task_ids`, in seq order."""

    def __init__(
        self,
        labels: Iterable[str],
        task_ids: Iterable[str],
        buffer: int,
        owner: str,
        accepts: Callable[[Event], bool],
        max_bytes: int = DEFAULT_BUFFER_BYTES,
    ):
        self.labels = frozenset(labels)
        self.task_ids = frozenset(task_ids)
        self.owner = owner
        self.accepts = accepts
        self._buffer = buffer
        self._max_bytes = max_bytes
        self._bytes = 0
        self._events: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._ended: type[Exception] | None = None

    def _offer(self, event: Event) -> None:
        if self._ended is not None:
            return
        size = event.size
        if len(self._events) >= self._buffer or (
            self._events and self._bytes + size > self._max_bytes
        ):
            self._end(SubscriptionOverflow)
        else:
            self._events.append(event)
            self._bytes += size
            self._wakeup.set()

    def _end(self, reason: type[Exception]) -> None:
        if self._ended is None:
            self._ended = reason
        self._events.clear()  # free the memory now; the stream is ending
        self._bytes = 0
        self._wakeup.set()

    async def get(self) -> Event:
        """The next event; raises why the subscription ended once it has."""
        while not self._events:
            if self._ended is not None:
                raise self._ended
            self._wakeup.clear()
            await self._wakeup.wait()
        event = self._events.popleft()
        self._bytes -= event.size
        return event


class EventBus:
    """Routes each committed event to the subscriptions that match it."""

    def __init__(self, buffer: int = DEFAULT_BUFFER, max_bytes: int = DEFAULT_BUFFER_BYTES):
        self._buffer = buffer
        self._max_bytes = max_bytes
        self._by_label: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._by_task: defaultdict[str, set[Subscription]] = defaultdict(set)
        # Subscriptions with neither labels nor ids: every event (that `accepts` lets through).
        self._everything: set[Subscription] = set()
        self._closed = False

    def subscribe(
        self,
        labels: Iterable[str],
        task_ids: Iterable[str],
        *,
        owner: str = "",
        accepts: Callable[[Event], bool] = lambda event: True,
    ) -> Subscription:
        """Subscribes `owner` to events matching the labels or ids that `accepts` lets through."""
        sub = Subscription(labels, task_ids, self._buffer, owner, accepts, self._max_bytes)
        if self._closed:
            sub._end(SubscriptionClosed)
        for label in sub.labels:
            self._by_label[label].add(sub)
        for task_id in sub.task_ids:
            self._by_task[task_id].add(sub)
        if not sub.labels and not sub.task_ids:
            self._everything.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._everything.discard(sub)
        for index, keys in ((self._by_label, sub.labels), (self._by_task, sub.task_ids)):
            for key in keys:
                subs = index.get(key)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del index[key]

    def _subscriptions(self) -> set[Subscription]:
        return {
            s
            for subs in (*self._by_label.values(), *self._by_task.values(), self._everything)
            for s in subs
        }

    def publish(self, events: Iterable[Event]) -> None:
        """Delivers events, which must come in seq order, to every matching subscription."""
        for event in events:
            targets = set(self._by_task.get(event.task.id, ()))
            targets.update(self._everything)
            for label in event.task.labels:
                targets.update(self._by_label.get(label, ()))
            for sub in targets:
                if sub.accepts(event):
                    sub._offer(event)

    def end_owner(self, owner: str) -> None:
        """Ends the subscriptions of `owner`, whose key stopped working."""
        for sub in self._subscriptions():
            if sub.owner == owner:
                sub._end(SubscriptionRevoked)

    def close(self) -> None:
        """Ends every subscription, present and future."""
        self._closed = True
        for sub in self._subscriptions():
            sub._end(SubscriptionClosed)
