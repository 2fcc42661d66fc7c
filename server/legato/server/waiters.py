"""Long-poll claims: workers wait for work without polling.

A claimant that finds nothing registers a waiter on its labels. When a task
becomes claimable (created, or requeued), the commit wakes exactly one waiter
holding one of its labels, the longest waiting; that one claims again. A
waiter that was woken but will not claim (it got another task meanwhile, timed
out, or its caller went away) passes the wake-up on, so no task is left
waiting next to idle workers.

When an agent changes (revoked, its key rotated, its labels or role changed),
its waiters are nudged: they look at the agent as it is now before they claim
again. A nudge is not a wake-up; it announces no task and is never passed on.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Waiter:
    """One claimant, agent `owner`, waiting on `labels`."""

    def __init__(self, owner: str, labels: tuple[str, ...], order: int):
        self.owner = owner
        self.labels = labels
        self.order = order
        self._event = asyncio.Event()
        self._woken = False

    @property
    def woken(self) -> bool:
        """Whether it holds a wake-up: a task became claimable since it last looked."""
        return self._woken

    def wake(self) -> None:
        self._woken = True
        self._event.set()

    def nudge(self) -> None:
        """Ends the wait without a wake-up: the agent changed; look at it again."""
        self._event.set()

    def rearm(self) -> None:
        self._woken = False
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        """True when woken or nudged, False when `timeout` seconds passed first."""
        # asyncio.timeout, not wait_for: on Python 3.11 a wait_for whose wake-up
        # and cancel land in the same turn returns instead of raising, and a
        # claim whose caller went away would go on to take a task.
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class ClaimWaiters:
    """Waiting claimants by label, woken one per claimable task."""

    def __init__(self) -> None:
        self._by_label: defaultdict[str, dict[int, Waiter]] = defaultdict(dict)
        self._order = itertools.count()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def register(self, owner: str, labels: Iterable[str]) -> Iterator[Waiter]:
        waiter = Waiter(owner, tuple(labels), next(self._order))
        for label in waiter.labels:
            self._by_label[label][waiter.order] = waiter
        if self._closed:
            waiter.wake()
        try:
            yield waiter
        finally:
            for label in waiter.labels:
                queue = self._by_label.get(label)
                if queue is not None:
                    queue.pop(waiter.order, None)
                    if not queue:
                        del self._by_label[label]
            if waiter.woken and not self._closed:
                self.wake_one(waiter.labels)

    def wake_one(self, labels: Iterable[str]) -> None:
        """Wakes the longest-waiting claimant on any of `labels` that is not awake yet."""
        candidates = (
            waiter
            for label in labels
            for waiter in self._by_label.get(label, {}).values()
            if not waiter.woken
        )
        first = min(candidates, key=lambda w: w.order, default=None)
        if first is not None:
            first.wake()

    def nudge_owner(self, owner: str) -> None:
        """Nudges every waiter of agent `owner` (see `Waiter.nudge`)."""
        for queue in self._by_label.values():
            for waiter in queue.values():
                if waiter.owner == owner:
                    waiter.nudge()

    def close(self) -> None:
        """Wakes everyone: the daemon is stopping and waits end empty."""
        self._closed = True
        for queue in self._by_label.values():
            for waiter in queue.values():
                waiter.wake()
