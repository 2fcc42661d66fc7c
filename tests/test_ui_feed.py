"""The UI's event feed against a real daemon: every event once, across chunks,
label discovery and reconnects (`legato.ui.coverage`, `legato.ui.feed`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import EVENT_GUARD
from legato.client import AsyncClient, EventType, TaskEvent
from legato.ui.coverage import Coverage
from legato.ui.feed import LABELS_PER_WATCH, Delivery, Follower

DOORBELL = 0.05


@pytest.fixture
async def coverage(admin: AsyncClient) -> AsyncIterator[Coverage]:
    covering = Coverage(admin, admin=True, doorbell_seconds=DOORBELL)
    await covering.start()
    yield covering
    await covering.aclose()


async def deliveries_until(
    follower: Follower, done: Callable[[list[TaskEvent]], bool]
) -> tuple[list[TaskEvent], list[Delivery]]:
    """Deliveries until the events passed on satisfy `done`."""
    events: list[TaskEvent] = []
    seen: list[Delivery] = []

    async def read() -> None:
        while not done(events):
            delivery = await follower.get()
            seen.append(delivery)
            if delivery.event is not None:
                events.append(delivery.event)

    await asyncio.wait_for(read(), EVENT_GUARD)
    return events, seen


def kinds(events: list[TaskEvent]) -> list[tuple[str, EventType]]:
    return [(event.task.id, event.type) for event in events]


async def test_more_labels_than_one_watch_takes_deliver_each_event_once(
    admin: AsyncClient, agent_key: Callable[..., Awaitable[str]], coverage: Coverage
) -> None:
    labels = [f"@l{n:02d}" for n in range(LABELS_PER_WATCH + 4)]
    await agent_key("left", labels[:10])
    await agent_key("right", labels[10:])
    async with coverage.listening():
        while len(coverage.labels) < len(labels):  # the doorbell's scan finds the new agents
            await coverage.grown(coverage.generation)
    after = await admin.get_cursor()
    async with Follower(admin, coverage, after=after) as follower:
        # One task per label, and one whose labels fall in the first and the last watch.
        handles = [await admin.create_task(f"on {label}", labels=[label]) for label in labels]
        handles.append(await admin.create_task("on both", labels=[labels[0], labels[-1]]))
        for handle in handles:
            await handle.cancel()
        expected = [(h.id, t) for h in handles for t in (EventType.CREATED, EventType.CANCELED)]
        events, seen = await deliveries_until(follower, lambda got: len(got) >= len(expected))
    assert sorted(kinds(events)) == sorted(expected)
    assert len({event.seq for event in events}) == len(events)
    watermarks = [delivery.watermark for delivery in seen]
    assert watermarks == sorted(watermarks)
    # Every watch is past an event before the page is told to resume after it.
    for delivery in seen:
        assert delivery.event is None or delivery.watermark <= delivery.event.seq


async def test_a_task_on_a_label_nobody_had_joins_the_feed_with_all_its_events(
    admin: AsyncClient, coverage: Coverage
) -> None:
    known = await admin.create_task("on a known label", labels=["@known"])
    await asyncio.wait_for(coverage_has(coverage, "@known"), EVENT_GUARD)
    after = await admin.get_cursor()
    async with coverage.listening(), Follower(admin, coverage, after=after) as follower:
        await known.cancel()
        novel = await admin.create_task("a typo in the label", labels=["@reseacher"])
        await novel.cancel()
        events, _ = await deliveries_until(
            follower, lambda got: (novel.id, EventType.CANCELED) in kinds(got)
        )
    assert "@reseacher" in coverage.labels
    # The new label's events come from its first one on, and the restart sends
    # none of the known task's again.
    assert kinds(events) == [
        (known.id, EventType.CANCELED),
        (novel.id, EventType.CREATED),
        (novel.id, EventType.CANCELED),
    ]


async def coverage_has(coverage: Coverage, label: str) -> None:
    async with coverage.listening():
        while label not in coverage.labels:
            await coverage.grown(coverage.generation)


async def test_a_follower_resumed_from_the_watermark_misses_nothing_and_repeats_nothing(
    admin: AsyncClient, coverage: Coverage
) -> None:
    first = await admin.create_task("before", labels=["@resume"])
    await asyncio.wait_for(coverage_has(coverage, "@resume"), EVENT_GUARD)
    after = await admin.get_cursor()
    async with Follower(admin, coverage, after=after, labels=["@resume"]) as follower:
        await first.cancel()
        events, seen = await deliveries_until(follower, lambda got: len(got) == 1)
    resume_at = seen[-1].watermark
    # Meanwhile, with no page connected:
    later = [await admin.create_task(f"later {n}", labels=["@resume"]) for n in range(3)]
    async with Follower(admin, coverage, after=resume_at, labels=["@resume"]) as follower:
        resumed, _ = await deliveries_until(follower, lambda got: len(got) == 3)
    assert kinds(events + resumed) == [(first.id, EventType.CANCELED)] + [
        (handle.id, EventType.CREATED) for handle in later
    ]
