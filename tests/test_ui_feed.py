"""The UI's event feed against a real daemon: one watch of the whole view (or of
the page's label), every event once, in seq order, resumed from the last seq
(`legato.ui.feed`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from conftest import EVENT_GUARD, Connect
from legato.client import AsyncClient, EventType, TaskEvent
from legato.ui.feed import Follower, Stopped


async def events_until(
    follower: Follower, done: Callable[[list[TaskEvent]], bool]
) -> list[TaskEvent]:
    """Events from the follower until they satisfy `done`."""
    events: list[TaskEvent] = []

    async def read() -> None:
        while not done(events):
            events.append(await follower.get())

    await asyncio.wait_for(read(), EVENT_GUARD)
    return events


def kinds(events: list[TaskEvent]) -> list[tuple[str, EventType]]:
    return [(event.task.id, event.type) for event in events]


def has(task_id: str, kind: EventType) -> Callable[[list[TaskEvent]], bool]:
    return lambda events: (task_id, kind) in kinds(events)


async def test_tasks_on_labels_nobody_holds_arrive_on_one_watch_with_all_their_events(
    admin: AsyncClient,
) -> None:
    # More labels than WatchTasks takes in one request, none of them held by anyone.
    labels = [f"@nobody{n:02d}" for n in range(20)]
    after = await admin.get_cursor()
    async with Follower(admin, after=after) as follower:
        handles = [await admin.create_task(f"on {label}", labels=[label]) for label in labels]
        handles.append(await admin.create_task("on two", labels=[labels[0], labels[-1]]))
        for handle in handles:
            await handle.cancel()
        events = await events_until(follower, has(handles[-1].id, EventType.CANCELED))
    assert kinds(events) == [(h.id, EventType.CREATED) for h in handles] + [
        (h.id, EventType.CANCELED) for h in handles
    ]
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs)) and seqs[0] > after


async def test_an_agents_follower_sees_exactly_that_agents_view(
    admin: AsyncClient, connect: Connect
) -> None:
    viewer = await connect("viewer", ["@viewer"])
    after = await admin.get_cursor()
    async with Follower(viewer, after=after) as follower:
        await admin.create_task("not the viewer's", labels=["@other"])
        for_viewer = await admin.create_task("for the viewer", labels=["@viewer"])
        # Its own task, on a label no agent holds, is in its view too.
        own = await viewer.create_task("the viewer's own", labels=["@nobody"])
        events = await events_until(follower, has(own.id, EventType.CREATED))
    assert kinds(events) == [(for_viewer.id, EventType.CREATED), (own.id, EventType.CREATED)]


async def test_a_label_filter_follows_only_that_label(admin: AsyncClient) -> None:
    after = await admin.get_cursor()
    async with Follower(admin, after=after, labels=["@wanted"]) as follower:
        await admin.create_task("elsewhere", labels=["@elsewhere"])
        wanted = await admin.create_task("wanted", labels=["@wanted"])
        both = await admin.create_task("both", labels=["@elsewhere", "@wanted"])
        events = await events_until(follower, has(both.id, EventType.CREATED))
    assert kinds(events) == [(wanted.id, EventType.CREATED), (both.id, EventType.CREATED)]


async def test_a_follower_resumed_from_the_last_seq_misses_nothing_and_repeats_nothing(
    admin: AsyncClient,
) -> None:
    first = await admin.create_task("before", labels=["@resume"])
    after = await admin.get_cursor()
    async with Follower(admin, after=after) as follower:
        await first.cancel()
        events = await events_until(follower, lambda got: len(got) == 1)
    # Meanwhile, with no page connected:
    later = [await admin.create_task(f"later {n}", labels=["@resume"]) for n in range(3)]
    async with Follower(admin, after=events[-1].seq) as follower:
        resumed = await events_until(follower, lambda got: len(got) == 3)
    assert kinds(events + resumed) == [(first.id, EventType.CANCELED)] + [
        (handle.id, EventType.CREATED) for handle in later
    ]


async def test_stop_ends_a_waiting_follower_at_once(admin: AsyncClient) -> None:
    async with Follower(admin, after=await admin.get_cursor()) as follower:
        waiting = asyncio.ensure_future(follower.get())
        follower.stop()
        with pytest.raises(Stopped):
            await asyncio.wait_for(waiting, EVENT_GUARD)
