"""WatchTasks against a real daemon: resume without gaps, cursors, filters, slow consumers.

Most tests drive the stream through the raw `legato.v1` stub, so that they
decide exactly when a stream is opened, read and dropped. The reference a
watcher is checked against is the event log as stored, read straight from the
daemon's SQLite file.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from conftest import Connect, keyed_channel
from legato.client import AsyncClient, EventType, TaskEvent
from legato.common.paths import DB_NAME
from legato.server.daemon import Config, Daemon
from legato.v1 import tasks_pb2, tasks_pb2_grpc

if TYPE_CHECKING:
    from legato.v1.tasks_pb2_grpc import TaskServiceAsyncStub

    WatchCall = grpc.aio.UnaryStreamCall[tasks_pb2.WatchTasksRequest, tasks_pb2.TaskEvent]

# Every agent here holds the labels the scenarios use, so the tests speak about
# the stream, not about views (see test_agents for those).
WATCH_LABELS = ["@elsewhere", "@flood", "@inbox", "@live", "@research", "@review", "@stream"]
# (seq, event type, task id): how a test compares what it received with the log.
LoggedEvent = tuple[int, int, str]

# The most any single wait may take before the test is failed instead of hanging.
GUARD = 10.0
# The watch buffer of the daemon in the slow-consumer test.
SMALL_WATCH_BUFFER = 5


# -- helpers ------------------------------------------------------------------------


def stored_events(daemon: Daemon, label: str) -> list[LoggedEvent]:
    """The events of every task carrying `label`, as the daemon stored them, in seq order."""
    sql = (
        "SELECT e.seq, e.type, t.id FROM events e "
        "JOIN task_labels l ON l.task_rowid = e.task_rowid "
        "JOIN tasks t ON t.rowid = e.task_rowid "
        "WHERE l.label = ? ORDER BY e.seq"
    )
    rows: list[tuple[Any, ...]]
    if daemon.config.database:
        with psycopg.connect(daemon.config.database) as pg:
            rows = pg.execute(sql.replace("?", "%s"), (label,)).fetchall()
    else:
        db_path = daemon.config.data_dir / DB_NAME
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            rows = db.execute(sql, (label,)).fetchall()
    return [(int(seq), int(kind), str(task_id)) for seq, kind, task_id in rows]


def logged(event: tasks_pb2.TaskEvent) -> LoggedEvent:
    return (event.seq, int(event.type), event.task.id)


def watch_request(
    labels: list[str] | None = None, task_ids: list[str] | None = None, after_seq: int | None = None
) -> tasks_pb2.WatchTasksRequest:
    request = tasks_pb2.WatchTasksRequest(labels=labels or [], task_ids=task_ids or [])
    if after_seq is not None:
        request.after_seq = after_seq
    return request


async def read_event(call: WatchCall) -> tasks_pb2.TaskEvent:
    """The next message of a raw watch stream; fails the test if the stream ends."""
    message = await asyncio.wait_for(call.read(), GUARD)
    assert message is not grpc.aio.EOF, "the watch stream ended"
    assert isinstance(message, tasks_pb2.TaskEvent)
    return message


async def read_until_the_stream_fails(call: WatchCall, into: list[tasks_pb2.TaskEvent]) -> None:
    """Reads events into `into` until the stream ends with an error, which it raises."""
    while True:
        into.append(await read_event(call))


@pytest.fixture
def connect(connect: Connect) -> Connect:
    async def watcher(name: str, labels: list[str] | None = None) -> AsyncClient:
        return await connect(name, WATCH_LABELS if labels is None else labels)

    return watcher


@pytest.fixture
async def stub(daemon: Daemon, admin_key: str) -> AsyncIterator[TaskServiceAsyncStub]:
    """A raw `legato.v1.TaskService` stub on the test daemon, acting as the admin."""
    async with keyed_channel(daemon.config.address, admin_key) as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


# -- resume -------------------------------------------------------------------------


async def test_watcher_that_keeps_dropping_and_resuming_receives_the_exact_log(
    stub: TaskServiceAsyncStub, connect: Connect, daemon: Daemon
) -> None:
    rng = random.Random(20240611)
    received: list[tasks_pb2.TaskEvent] = []
    last_seq: list[int] = []  # the log's last seq, known once the writers are done

    async def watch_with_reconnects() -> None:
        after_seq = 0
        while True:
            call = stub.WatchTasks(watch_request(["@stream"], after_seq=after_seq))
            # Drop the stream after a few events, wherever that falls among the writes.
            budget = rng.randint(1, 8)
            try:
                async for event in call:
                    received.append(event)
                    after_seq = event.seq
                    if last_seq and event.seq >= last_seq[0]:
                        return
                    budget -= 1
                    if budget == 0:
                        break
            finally:
                call.cancel()

    async def write(agent: str, count: int) -> None:
        client = await connect(agent)
        for n in range(count):
            # Some tasks carry a second label (their events must still come once),
            # some only another one (their events must not come at all).
            labels = [["@stream"], ["@stream", "@elsewhere"], ["@elsewhere"]][n % 3]
            await client.create_task(f"{agent} task {n}", labels=labels)
            job = await client.claim(labels)
            if job is None:  # another writer took it: fine, go on
                continue
            if n % 4 == 0:
                await job.fail("transient", retryable=True)
            elif n % 4 == 1:
                await job.heartbeat()
                await job.complete({"n": n})
            else:
                await job.complete({"n": n})

    watcher = asyncio.create_task(watch_with_reconnects())
    await asyncio.gather(*(write(f"writer-{w}", 30) for w in range(4)))

    reference = stored_events(daemon, "@stream")
    last_seq.append(reference[-1][0])
    try:
        if not received or received[-1].seq < last_seq[0]:
            await asyncio.wait_for(watcher, GUARD)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    assert len(reference) > 200
    assert [logged(event) for event in received] == reference


async def test_live_only_watch_delivers_the_events_created_after_it_started_in_seq_order(
    stub: TaskServiceAsyncStub, coder: AsyncClient, daemon: Daemon
) -> None:
    before = await coder.create_task("before the watch", labels=["@live"])
    call = stub.WatchTasks(watch_request(["@live"]))  # no after_seq: live events only
    try:
        # The stream says nothing until its first event, so it proves it is live by
        # delivering one: create probes until one arrives.
        first = asyncio.ensure_future(read_event(call))
        probes: list[str] = []
        while not first.done() and len(probes) < 100:
            probes.append((await coder.create_task("are you there?", labels=["@live"])).id)
            # Only paces the probes: correctness does not hang on this timeout, as
            # every probe created after the stream went live is expected below.
            await asyncio.wait({first}, timeout=0.05)
        received = [await first]
        assert received[0].task.id in probes
        expected_ids = probes[probes.index(received[0].task.id) :]
        for n in range(20):
            label = "@elsewhere" if n % 4 == 0 else "@live"
            handle = await coder.create_task(f"after {n}", labels=[label])
            if label == "@live":
                expected_ids.append(handle.id)
        while len(received) < len(expected_ids):
            received.append(await read_event(call))
    finally:
        call.cancel()

    assert [event.task.id for event in received] == expected_ids
    assert before.id not in {event.task.id for event in received}
    assert all(event.type == tasks_pb2.TASK_EVENT_TYPE_CREATED for event in received)
    seqs = [event.seq for event in received]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Nothing on the label was skipped from the first event on.
    assert [logged(e) for e in received] == [
        e for e in stored_events(daemon, "@live") if e[0] >= received[0].seq
    ]


async def test_list_then_watch_from_its_cursor_misses_nothing_and_repeats_nothing(
    coder: AsyncClient, connect: Connect, stub: TaskServiceAsyncStub
) -> None:
    for n in range(10):
        await coder.create_task(f"old {n}", labels=["@inbox"])
    writing = asyncio.Event()
    stop = asyncio.Event()

    async def keep_creating(agent: str) -> list[str]:
        client = await connect(agent)
        created: list[str] = []
        while not stop.is_set() and len(created) < 100:
            created.append((await client.create_task("new", labels=["@inbox"])).id)
            if len(created) == 3:
                writing.set()
        return created

    writers = asyncio.gather(*(keep_creating(f"writer-{w}") for w in range(3)))
    await asyncio.wait_for(writing.wait(), GUARD)
    # The listing is taken while creates are in flight.
    page = await coder.list_tasks(labels=["@inbox"], page_size=1000)
    stop.set()
    created_by_writers = await writers
    for n in range(5):
        await coder.create_task(f"after the listing {n}", labels=["@inbox"])

    listed = {task.id for task in page.tasks}
    every_task = {
        task.id for task in (await coder.list_tasks(labels=["@inbox"], page_size=1000)).tasks
    }
    assert len(every_task) == 10 + sum(map(len, created_by_writers)) + 5
    assert len(listed) > 10  # some of the writers' tasks made it into the listing

    call = stub.WatchTasks(watch_request(["@inbox"], after_seq=page.cursor))
    try:
        watched = [await read_event(call) for _ in range(len(every_task) - len(listed))]
        # Events come in seq order: if the sentinel is next, nothing else was due.
        sentinel = await coder.create_task("sentinel", labels=["@inbox"])
        after = await read_event(call)
    finally:
        call.cancel()

    watched_ids = [event.task.id for event in watched]
    assert all(event.type == tasks_pb2.TASK_EVENT_TYPE_CREATED for event in watched)
    assert all(event.seq > page.cursor for event in watched)
    assert len(set(watched_ids)) == len(watched_ids)
    assert set(watched_ids) == every_task - listed
    assert after.task.id == sentinel.id


# -- filters ------------------------------------------------------------------------


async def test_task_id_watch_replays_that_tasks_history_and_nothing_else(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    mine = await coder.create_task("mine", labels=["@research"])
    other = await coder.create_task("other, same label", labels=["@research"])
    unrelated = await coder.create_task("unrelated", labels=["@review"])
    # Interleave the other tasks' events with this one's: a leak would show in the first three.
    job = await researcher.claim(task_id=mine.id)
    other_job = await researcher.claim(task_id=other.id)
    unrelated_job = await researcher.claim(task_id=unrelated.id)
    assert job is not None and other_job is not None and unrelated_job is not None
    await other_job.heartbeat()
    await unrelated_job.heartbeat()
    await job.complete({"answer": 1})
    await other_job.complete({"answer": 2})
    await unrelated_job.fail("nope")

    history: list[TaskEvent] = []
    events = coder.watch(task_ids=[mine.id], after_seq=0)
    try:
        for _ in range(3):
            history.append(await asyncio.wait_for(anext(events), GUARD))
    finally:
        await events.aclose()

    assert [event.type for event in history] == [
        EventType.CREATED,
        EventType.CLAIMED,
        EventType.COMPLETED,
    ]
    assert {event.task.id for event in history} == {mine.id}
    assert history[-1].task.result == {"answer": 1}
    assert history[0].seq < history[1].seq < history[2].seq


async def test_watch_with_neither_labels_nor_task_ids_follows_the_whole_view(
    connect: Connect, admin: AsyncClient
) -> None:
    """As ListTasks without filters: everything the caller sees, nothing else."""
    coder = await connect("coder", ["@coder"])
    researcher = await connect("researcher", ["@researcher"])
    outsider = await connect("outsider", ["@outsider"])
    cursor = await coder.get_cursor()
    mine = await coder.delegate("@researcher", "for the researcher")
    await outsider.delegate("@outsider", "not the coder's business")
    job = await researcher.claim(lease=60)
    assert job is not None and job.id == mine.id
    await job.complete({"answer": 1})

    async def first(client: AsyncClient, n: int) -> list[TaskEvent]:
        events = client.watch(after_seq=cursor)
        try:
            return [await asyncio.wait_for(anext(events), GUARD) for _ in range(n)]
        finally:
            await events.aclose()

    seen = await first(coder, 3)
    assert [(e.task.id, e.type) for e in seen] == [
        (mine.id, EventType.CREATED),
        (mine.id, EventType.CLAIMED),
        (mine.id, EventType.COMPLETED),
    ]
    everything = await first(admin, 4)
    assert len({e.task.id for e in everything}) == 2  # the admin sees the outsider's too

    # Live too: the coder's next event is its own, never the outsider's.
    live = coder.watch()
    try:
        pending = asyncio.ensure_future(anext(live))
        await outsider.delegate("@outsider", "still not the coder's")
        later = await coder.delegate("@researcher", "the coder's again")
        assert (await asyncio.wait_for(pending, GUARD)).task.id == later.id
    finally:
        await live.aclose()


# -- slow consumers -----------------------------------------------------------------


@pytest.fixture
async def small_buffer(config: Config) -> AsyncIterator[tuple[str, str]]:
    """A daemon cutting watchers off 5 undelivered events behind: (address, admin key)."""
    config = replace(config, watch_buffer=SMALL_WATCH_BUFFER)
    async with Daemon(config) as daemon:
        yield config.address, daemon.admin_key_path.read_text().strip()


async def test_slow_watcher_is_cut_off_with_resource_exhausted_and_resumes_without_a_gap(
    small_buffer: tuple[str, str],
) -> None:
    address, key = small_buffer
    flood = 40
    # BDP probing off: the stream's flow-control window stays small, so a reader
    # that does not read soon stops the daemon from sending.
    options = [("grpc.http2.bdp_probe", 0)]
    async with (
        AsyncClient(address, api_key=key, timeout=GUARD) as coder,
        keyed_channel(address, key, options=options) as channel,
    ):
        stub: TaskServiceAsyncStub = tasks_pb2_grpc.TaskServiceStub(channel)
        call = stub.WatchTasks(watch_request(["@flood"], after_seq=0))
        try:
            # Reading one event proves the stream has subscribed to live events.
            ready = await coder.create_task("ready?", labels=["@flood"])
            received = [await read_event(call)]
            assert received[0].task.id == ready.id
            # Now the watcher stops reading while big tasks pile up behind it.
            created = [ready.id]
            for n in range(flood):
                handle = await coder.create_task(f"{n}:" + "x" * 60_000, labels=["@flood"])
                created.append(handle.id)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read_until_the_stream_fails(call, received)
        finally:
            call.cancel()
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
        assert "after_seq" in (raised.value.details() or "")
        assert len(received) < len(created)

        resumed = stub.WatchTasks(watch_request(["@flood"], after_seq=received[-1].seq))
        try:
            while len(received) < len(created):
                received.append(await read_event(resumed))
        finally:
            resumed.cancel()

    assert [event.task.id for event in received] == created
    seqs = [event.seq for event in received]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
