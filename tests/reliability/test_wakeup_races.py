"""A cancel that arrives together with a wake-up is never lost.

The daemon's timed waits (the lease timer's sleep until the next expiry, a
long-poll claim's wait for work) are woken by commits and ended by cancels.
When both land in the same turn of the event loop, the cancel must win: a
lease timer that swallowed its cancel kept the daemon's stop waiting until the
next lease ended (minutes, up to a day), and a claim that swallowed its
caller's cancel would go on to take a task for a caller that is gone.

Python 3.11's `asyncio.wait_for` returns the inner result instead of raising
when the cancel and the completion meet; these tests make them meet on
purpose, every time.
"""

from __future__ import annotations

import asyncio

import pytest
from legato.server.leases import LeaseReaper
from legato.server.model import system_clock
from legato.server.waiters import ClaimWaiters

# Far beyond the test's guard: a wait that is not ended by the cancel shows as a timeout.
FAR_US = 3600 * 1_000_000
GUARD = 5.0


async def test_the_lease_timer_stops_when_a_commit_wakes_it_as_it_is_stopped() -> None:
    asleep = asyncio.Event()

    async def expire(now: int) -> int:
        return 0

    async def next_expiry() -> int:
        asleep.set()  # the timer sleeps until the answer as soon as this returns
        return system_clock() + FAR_US

    reaper = LeaseReaper(expire=expire, next_expiry=next_expiry, clock=system_clock)
    reaper.start()
    await asyncio.wait_for(asleep.wait(), GUARD)

    # A commit with an earlier lease wakes the timer in the very turn the
    # daemon's stop cancels it.
    reaper.due_at(system_clock())
    stopping = asyncio.ensure_future(reaper.stop())
    # asyncio.wait, not wait_for: a wait_for that times out cancels `stop`, whose
    # await then cancels the timer a second time and hides the first one's loss.
    done, _ = await asyncio.wait({stopping}, timeout=GUARD)
    assert stopping in done, "the lease timer went on sleeping after it was stopped"


async def test_a_long_poll_claim_cancelled_as_it_is_woken_ends_cancelled() -> None:
    waiters = ClaimWaiters()
    with waiters.register("worker", ["@work"]) as waiter:
        waiting = asyncio.ensure_future(waiter.wait(3600))
        await asyncio.sleep(0)  # let it start waiting: the race needs a waiting claim
        assert not waiting.done()

        # A create wakes the claim in the turn its caller goes away.
        waiters.wake_one(["@work"])
        waiting.cancel()

        done, _ = await asyncio.wait({waiting}, timeout=GUARD)
        assert waiting in done
        with pytest.raises(asyncio.CancelledError):
            waiting.result()
