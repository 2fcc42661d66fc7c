"""Reads whose cost must follow what the caller sees, not the history.

A non-admin listing merges the index ranges of what its agent sees (created,
claimed, its labels) instead of walking every task; trees and children
listings go by the parent index. The plans are checked on the SQL the daemon
runs, captured from its reader connections. Connecting and a cursor-less
watch ask for no listing at all (WhoAmI and GetCursor).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Connect
from legato.client import AsyncClient, Client, Task, TaskStatus
from legato.client.errors import UnauthenticatedError
from legato.server.daemon import Daemon
from legato.server.db import Database
from legato.server.store.sqlite import SqliteStore

# The statements and query plans of the SQLite backend are the subject here;
# the PostgreSQL backend has planner statistics and plans of its own.
pytestmark = pytest.mark.sqlite_only("checks the SQLite backend's statements and query plans")

LIST_TASKS = "/legato.v1.TaskService/ListTasks"
WHO_AM_I = "/legato.v1.AgentService/WhoAmI"
GET_CURSOR = "/legato.v1.TaskService/GetCursor"


def sqlite_store(daemon: Daemon) -> SqliteStore:
    assert daemon.tasks is not None
    store = daemon.tasks.store
    assert isinstance(store, SqliteStore)
    return store


@contextmanager
def daemon_sql(daemon: Daemon) -> Iterator[list[str]]:
    """The statements the daemon's readers run meanwhile, parameters filled in."""
    db = sqlite_store(daemon)._db
    readers: list[sqlite3.Connection] = [*db._reader_conns, db._loop_conn]
    statements: list[str] = []
    for conn in readers:
        conn.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        for conn in readers:
            conn.set_trace_callback(None)


def query_plan(db: Path, sql: str) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
    finally:
        conn.close()


def history_walks(plan: list[str]) -> list[str]:
    """The steps of a plan whose cost grows with every task ever stored: a scan,
    a range of all rowids, an index built on the fly, a sort of everything."""
    return [
        step
        for step in plan
        if (step.startswith("SCAN") and step not in ("SCAN CONSTANT ROW", "SCAN tree"))
        or "INTEGER PRIMARY KEY (rowid>?)" in step
        or "AUTOMATIC" in step
        or "TEMP B-TREE" in step
    ]


async def all_pages(client: AsyncClient, page_size: int, **filters: Any) -> list[Task]:
    tasks: list[Task] = []
    token = ""
    while True:
        page = await client.list_tasks(page_size=page_size, page_token=token, **filters)
        tasks.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return tasks


async def test_non_admin_listing_merges_what_the_agent_sees_in_order(
    connect: Connect, admin: AsyncClient
) -> None:
    busy = await connect("busy", ["@busy", "@few"])
    few = await connect("few", ["@few", "@side"])
    # A history the agent sees little of, with every reason to see a task:
    # created it, carries its labels (one or two of them), claimed it.
    await busy.create_task("claimed, then the label is taken away", labels=["@few"])
    job = await few.claim(["@few"])
    assert job is not None
    claimed = job.task.id
    done = await busy.create_task("done for few", labels=["@side"])
    side_job = await few.claim(["@side"])
    assert side_job is not None and side_job.id == done.id
    await side_job.complete({"ok": True})
    for i in range(30):
        await busy.create_task(f"not for few {i}", labels=["@busy"])
        if i % 7 == 0:
            await few.create_task(f"by few {i}", labels=["@busy"])
        if i % 11 == 0:
            await busy.create_task(f"for few {i}", labels=["@few"])
        if i % 13 == 0:
            await busy.create_task(f"for few twice {i}", labels=["@few", "@side"])
    await admin.update_agent("few", labels=["@side"])
    everything = await all_pages(admin, 1000)

    def seen_by_few(task: Task) -> bool:
        return "few" in (task.created_by, task.claimed_by) or "@side" in task.labels

    for statuses in ((), (TaskStatus.PENDING,), (TaskStatus.DONE, TaskStatus.CLAIMED)):
        expected = [
            t.id for t in everything if seen_by_few(t) and (not statuses or t.status in statuses)
        ]
        for page_size in (1, 2, 100):
            listed = [t.id for t in await all_pages(few, page_size, statuses=statuses)]
            assert listed == expected, (statuses, page_size)
    assert claimed in [t.id for t in await all_pages(few, 100)]  # seen only as its claimant


@pytest.mark.parametrize(
    "statuses", [(), (TaskStatus.PENDING,), (TaskStatus.DONE, TaskStatus.CLAIMED)]
)
async def test_non_admin_listing_reads_index_ranges_not_the_history(
    daemon: Daemon, connect: Connect, statuses: tuple[TaskStatus, ...]
) -> None:
    few = await connect("few", ["@few", "@side"])
    other = await connect("other")
    for i in range(20):
        await other.create_task(f"history {i}", labels=["@other"])
    await few.create_task("mine", labels=["@other"])
    with daemon_sql(daemon) as statements:
        await few.list_tasks(statuses=statuses)
    (listing,) = [s for s in statements if "'few'" in s]
    assert daemon.tasks is not None
    plan = query_plan(sqlite_store(daemon).path, listing)
    assert not history_walks(plan), plan
    assert any("tasks_created_by" in step for step in plan), plan
    assert any("tasks_claimed_by" in step for step in plan), plan


async def test_trees_and_children_listings_go_by_the_parent_index(
    daemon: Daemon, connect: Connect, admin: AsyncClient
) -> None:
    owner = await connect("owner")
    for i in range(20):
        await owner.create_task(f"history {i}", labels=["@owner"])
    root = await owner.create_task("plan", labels=["@owner"])
    child = await owner.create_task("part", labels=["@owner"], parent_id=root.id)
    await owner.create_task("detail", labels=["@owner"], parent_id=child.id)
    assert daemon.tasks is not None
    for client in (owner, admin):
        with daemon_sql(daemon) as statements:
            assert len(await client.get_task_tree(root.id)) == 3
            assert len((await client.list_tasks(parent_id=root.id)).tasks) == 1
        reads = [s for s in statements if "RECURSIVE" in s or f"parent_id = '{root.id}'" in s]
        assert len(reads) == 2, reads
        for sql in reads:
            plan = query_plan(sqlite_store(daemon).path, sql)
            assert not history_walks(plan), plan
            assert any("tasks_parent" in step for step in plan), plan


class _Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """The unary methods a grpc.aio channel calls; `cursor_taken` once a GetCursor answered."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.cursor_taken = asyncio.Event()

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.methods.append(method)
        call = await continuation(details, request)
        if method == GET_CURSOR:
            await call
            self.cursor_taken.set()
        return call


class _SyncRecorder(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []
        self.cursor_taken = threading.Event()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.methods.append(details.method)
        outcome = continuation(details, request)
        if details.method == GET_CURSOR:
            outcome.result()
            self.cursor_taken.set()
        return outcome


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Callable[[], _Recorder]:
    """Makes every grpc.aio channel opened afterwards record its unary calls."""

    def install() -> _Recorder:
        recorder = _Recorder()
        plain = grpc.aio.insecure_channel

        def recording(target: str, options: Any = None, **kwargs: Any) -> grpc.aio.Channel:
            return plain(target, options=options, interceptors=[recorder], **kwargs)

        monkeypatch.setattr(grpc.aio, "insecure_channel", recording)
        return recorder

    return install


async def test_connect_and_a_cursorless_watch_list_no_tasks(
    daemon: Daemon, agent_key: Callable[..., Any], recorded: Callable[[], _Recorder]
) -> None:
    key = await agent_key("watcher")
    creator_key = await agent_key("creator")
    recorder = recorded()
    client = await AsyncClient.connect(daemon.config.address, api_key=key)
    try:
        assert recorder.methods == [WHO_AM_I]
        events = client.watch(labels=["@watcher"])
        first = asyncio.ensure_future(anext(events))
        await asyncio.wait_for(recorder.cursor_taken.wait(), 10)
        async with AsyncClient(daemon.config.address, api_key=creator_key) as creator:
            handle = await creator.create_task("after the cursor", labels=["@watcher"])
        assert (await asyncio.wait_for(first, 10)).task.id == handle.id
        await events.aclose()
    finally:
        await client.aclose()
    assert LIST_TASKS not in recorder.methods
    assert GET_CURSOR in recorder.methods
    with pytest.raises(UnauthenticatedError):
        await AsyncClient.connect(daemon.config.address, api_key="lgt_000000000000_" + "x" * 43)


async def test_sync_connect_and_a_cursorless_watch_list_no_tasks(
    daemon: Daemon, agent_key: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await agent_key("watcher")
    creator_key = await agent_key("creator")
    recorder = _SyncRecorder()
    plain = grpc.insecure_channel

    def recording(target: str, options: Any = None, **kwargs: Any) -> grpc.Channel:
        return grpc.intercept_channel(plain(target, options=options, **kwargs), recorder)

    monkeypatch.setattr(grpc, "insecure_channel", recording)
    client = await asyncio.to_thread(Client.connect, daemon.config.address, api_key=key)
    try:
        assert recorder.methods == [WHO_AM_I]
        events = client.watch(labels=["@watcher"])
        first = asyncio.ensure_future(asyncio.to_thread(lambda: next(islice(events, 1))))
        assert await asyncio.to_thread(recorder.cursor_taken.wait, 10)
        async with AsyncClient(daemon.config.address, api_key=creator_key) as creator:
            handle = await creator.create_task("after the cursor", labels=["@watcher"])
        assert (await asyncio.wait_for(first, 10)).task.id == handle.id
        events.close()
    finally:
        client.close()
    assert LIST_TASKS not in recorder.methods
    assert GET_CURSOR in recorder.methods


async def test_a_task_is_read_on_the_loop_as_soon_as_its_create_is_answered(
    daemon: Daemon, connect: Connect
) -> None:
    """GetTask reads its row on the event loop: cheaper than a reader thread's
    round trip, and it sees every write already acknowledged."""
    db = sqlite_store(daemon)._db
    on_loop: list[str] = []
    on_threads: list[str] = []
    db._loop_conn.set_trace_callback(on_loop.append)
    for conn in db._reader_conns:
        conn.set_trace_callback(on_threads.append)
    try:
        creator = await connect("creator", ["@somewhere"])
        for i in range(20):
            handle = await creator.create_task(f"read me {i}", labels=["@somewhere"])
            assert (await creator.get_task(handle.id)).content == f"read me {i}"
    finally:
        for conn in [db._loop_conn, *db._reader_conns]:
            conn.set_trace_callback(None)
    assert sum("FROM tasks WHERE id =" in sql for sql in on_loop) == 20
    assert not [sql for sql in on_threads if "FROM tasks WHERE id =" in sql]


@pytest.mark.parametrize(
    "code",
    [sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY_RECOVERY, sqlite3.SQLITE_LOCKED_SHAREDCACHE],
    ids=["busy", "busy-recovery", "locked-sharedcache"],
)
async def test_a_read_the_loop_finds_locked_moves_to_a_reader_thread(
    tmp_path: Path, code: int
) -> None:
    """The loop never waits for a lock: a busy read is run again on a thread,
    whatever extended code SQLite gives the busy or locked condition."""
    db = Database.open(tmp_path / "legato.db")
    await db.write(lambda conn: conn.execute("CREATE TABLE t (x)").fetchall())
    await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (42)").fetchall())
    loop_thread = threading.current_thread()
    tried_on: list[str] = []

    def read(conn: sqlite3.Connection) -> int:
        tried_on.append("loop" if threading.current_thread() is loop_thread else "thread")
        if threading.current_thread() is loop_thread:
            conn.execute("BEGIN")
            conn.execute("SELECT x FROM t").fetchall()  # a read transaction left open
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = code
            raise busy
        value: int = conn.execute("SELECT x FROM t").fetchone()[0]
        return value

    try:
        assert await db.read_on_loop(read) == 42
        assert tried_on == ["loop", "thread"]
        # The loop's connection was handed back clean: its next read sees new writes.
        await db.write(lambda conn: conn.execute("UPDATE t SET x = 43").fetchall())
        assert (
            await db.read_on_loop(lambda conn: conn.execute("SELECT x FROM t").fetchone()[0]) == 43
        )

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT x FROM nowhere")

        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await db.read_on_loop(broken)  # any other error is the caller's, not retried
    finally:
        await db.close()
