"""Ends expired leases and passed deadlines on a timer: no one polls for them.

The reaper sleeps until the earliest lease end or deadline and is woken early
only when a change sets an earlier one. On start it first ends what ran out
while the daemon was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from legato.server.model import Clock

log = logging.getLogger(__name__)


class LeaseReaper:
    """Calls `expire(now)` whenever a lease may have ended or a deadline passed."""

    def __init__(
        self,
        *,
        expire: Callable[[int], Awaitable[int]],
        next_expiry: Callable[[], Awaitable[int | None]],
        clock: Clock,
    ):
        self._expire = expire
        self._next_expiry = next_expiry
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._due: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="legato-lease-reaper")

    def due_at(self, when: int) -> None:
        """Tells the reaper something (a lease, a deadline) is due at `when`."""
        if self._due is None or when < self._due:
            self._due = when
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            # Clear before reading the next expiry, and forget the old due time:
            # any lease set from here on (even one later than the deadline that
            # just passed) wakes the wait below instead of being missed.
            self._wakeup.clear()
            self._due = None
            try:
                expired = await self._expire(self._clock())
                if expired:
                    log.info("ended %d expired lease(s) or deadline(s)", expired)
                self._due = await self._next_expiry()
            except Exception:
                log.exception("ending expired leases and deadlines failed; retrying in 1 s")
                self._due = self._clock() + 1_000_000
            # A millisecond of slack: asyncio timers may fire a hair early.
            timeout = (
                None if self._due is None else max(0.0, (self._due - self._clock()) / 1e6) + 0.001
            )
            # asyncio.timeout, not wait_for: on Python 3.11 a wait_for whose
            # wake-up and cancel land in the same turn returns instead of
            # raising, and the daemon's stop then waited for the next expiry.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
