"""A cancel that arrives together with a wake-up is never lost in the client.

The client's timed waits (a heartbeat's sleep until the next beat, a worker's
backoff, `job.wait_interrupted`) wait on one event primitive. When the event is
set in the same turn of the event loop as the waiting task is canceled, the
task must end canceled: Python 3.11's `asyncio.wait_for` returned instead, and
the canceled task ran on.
"""

from __future__ import annotations

import asyncio

import pytest
from legato.client._concurrency import AsyncEvent

GUARD = 5.0


async def test_a_wait_canceled_as_its_event_is_set_ends_canceled() -> None:
    event = AsyncEvent()
    waiting = asyncio.ensure_future(event.wait(3600))
    await asyncio.sleep(0)  # it waits now: the race needs a waiting task
    assert not waiting.done()

    event.set()
    waiting.cancel()
    done, _ = await asyncio.wait({waiting}, timeout=GUARD)
    assert waiting in done
    with pytest.raises(asyncio.CancelledError):
        waiting.result()


async def test_a_wait_still_times_out_and_still_wakes() -> None:
    event = AsyncEvent()
    assert await event.wait(0.01) is False
    waiting = asyncio.ensure_future(event.wait(3600))
    await asyncio.sleep(0)
    event.set()
    assert await asyncio.wait_for(waiting, GUARD) is True
