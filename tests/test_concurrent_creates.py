"""Creates that arrive together: written together, each still answered on its own."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from legato.client import AsyncClient, EventType
from legato.client.errors import AlreadyExistsError, ResourceExhaustedError
from legato.server.daemon import Config, Daemon
from legato.server.db import Database
from legato.server.errors import ResourceExhausted
from legato.server.model import TaskRecord
from legato.server.store.sqlite import SqliteStore
from legato.server.store.supervision import Batch
from legato.server.tasks import new_task_id


async def test_a_burst_of_creates_past_the_cap_makes_exactly_the_cap(config: Config) -> None:
    config = replace(config, max_open_tasks=5)
    async with Daemon(config) as daemon:
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key) as admin:
            _, key = await admin.create_agent("burst", labels=["@burst"])
            before = (await admin.list_tasks()).cursor
            async with AsyncClient(config.address, api_key=key) as burst:
                outcomes = await asyncio.gather(
                    *(burst.create_task(f"t{i}", labels=["@burst"]) for i in range(24)),
                    return_exceptions=True,
                )
            made = [o for o in outcomes if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(made) == 5
            assert all(isinstance(o, ResourceExhaustedError) for o in refused), refused
            listed = (await admin.list_tasks()).tasks
            assert sorted(t.id for t in listed) == sorted(h.id for h in made)
            # One CREATED event each, numbered without a gap.
            assert (await admin.list_tasks()).cursor == before + 5


async def test_creates_that_arrive_together_are_each_watched_once_in_order(
    config: Config,
) -> None:
    async with Daemon(config) as daemon:
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key) as admin:
            keys = [(await admin.create_agent(n, labels=["@many"]))[1] for n in ("one", "two")]
            cursor = (await admin.list_tasks()).cursor
            events = admin.watch(labels=["@many"], after_seq=cursor)
            clients = [AsyncClient(config.address, api_key=k) for k in keys]
            try:
                handles = await asyncio.gather(
                    *(clients[i % 2].create_task(f"t{i}", labels=["@many"]) for i in range(40))
                )
            finally:
                for client in clients:
                    await client.aclose()
            seen = [await anext(events) for _ in handles]
            assert all(e.type is EventType.CREATED for e in seen)
            assert sorted(e.task.id for e in seen) == sorted(h.id for h in handles)
            assert [e.seq for e in seen] == list(range(cursor + 1, cursor + 41))


async def test_a_burst_with_keys_used_before_answers_those_alone_and_makes_the_rest(
    config: Config,
) -> None:
    async with Daemon(config) as daemon:
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key) as admin:
            _, key = await admin.create_agent("burst", labels=["@burst"])
            async with AsyncClient(config.address, api_key=key) as burst:
                first = await burst.create_task("first", labels=["@burst"], idempotency_key="k1")
                other = await burst.create_task("other", labels=["@burst"], idempotency_key="k2")
                before = (await admin.list_tasks()).cursor
                outcomes = await asyncio.gather(
                    *(
                        burst.create_task(f"t{i}", labels=["@burst"], idempotency_key=f"n{i}")
                        for i in range(30)
                    ),
                    # The same request again: the original task, not a new one.
                    burst.create_task("first", labels=["@burst"], idempotency_key="k1"),
                    # A key used before for another task: refused.
                    burst.create_task("not other", labels=["@burst"], idempotency_key="k2"),
                    # Twice in the same burst: one task.
                    burst.create_task("twice", labels=["@burst"], idempotency_key="k3"),
                    burst.create_task("twice", labels=["@burst"], idempotency_key="k3"),
                    return_exceptions=True,
                )
            *made, again, refused, twice_a, twice_b = outcomes
            assert not [o for o in made if isinstance(o, BaseException)], made
            assert not isinstance(again, BaseException) and again.id == first.id
            assert isinstance(refused, AlreadyExistsError), refused
            assert other.id in str(refused)
            assert not isinstance(twice_a, BaseException) and not isinstance(twice_b, BaseException)
            assert twice_a.id == twice_b.id
            listed = await admin.list_tasks(page_size=1000)
            new = {h.id for h in made if not isinstance(h, BaseException)} | {twice_a.id}
            assert {t.id for t in listed.tasks} == new | {first.id, other.id}
            # One CREATED event per task made, numbered without a gap.
            assert listed.cursor == before + 31
            assert [t.content for t in listed.tasks if t.id == twice_a.id] == ["twice"]


@pytest.mark.sqlite_only("checks the statements of the SQLite backend's writer")
async def test_creates_that_arrive_together_are_written_by_one_statement(config: Config) -> None:
    async with Daemon(config) as daemon:
        assert daemon.tasks is not None
        store = daemon.tasks.store
        assert isinstance(store, SqliteStore)
        statements: list[str] = []
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key) as admin:
            _, key = await admin.create_agent("burst", labels=["@burst"])
            store._db._writer_conn.set_trace_callback(statements.append)
            try:
                async with AsyncClient(config.address, api_key=key) as burst:
                    handles = await asyncio.gather(
                        *(burst.create_task(f"t{i}", labels=["@burst"]) for i in range(64))
                    )
            finally:
                store._db._writer_conn.set_trace_callback(None)
            # Each row's trigger traces its statement again: each statement once.
            inserts = list(
                dict.fromkeys(s for s in statements if s.startswith("INSERT INTO tasks"))
            )
            rows_per_insert = [s.count("), (") + 1 for s in inserts]
            assert sum(rows_per_insert) == 64
            assert max(rows_per_insert) > 1, rows_per_insert
            assert len(inserts) < 64
            tasks = {t.id: t for t in (await admin.list_tasks(page_size=1000)).tasks}
            assert {h.id for h in handles} == set(tasks)
            assert all(tasks[h.id].content == f"t{i}" for i, h in enumerate(handles))


def _task(creator: str, content: str) -> TaskRecord:
    now = time.time_ns() // 1000
    return TaskRecord(
        id=new_task_id(),
        content=content,
        labels=("@x",),
        context=b"",
        created_by=creator,
        created_at=now,
        max_attempts=3,
        updated_at=now,
    )


async def test_a_creator_at_its_cap_does_not_keep_the_others_from_being_written_together(
    tmp_path: Path,
) -> None:
    """Creates of several agents in one group: the one at its cap is refused on
    its own, and each other agent's creates still share one statement."""
    store = await SqliteStore.open(tmp_path / "legato.db")
    try:
        for i in range(3):
            await store.create_task(_task("full", f"kept {i}"), max_open=3)
        statements: list[str] = []
        store._db._writer_conn.set_trace_callback(statements.append)
        # Hold the writer, so that every create below waits in one group.
        holds, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> bool:
            holds.set()
            return release.wait(10)

        holding = asyncio.create_task(store._db.write(hold))
        assert await asyncio.to_thread(holds.wait, 10)
        creates = [
            asyncio.create_task(store.create_task(_task(creator, f"{creator} {n}"), max_open=3))
            for n in range(3)
            for creator in ("full", "one", "two")
        ]
        await asyncio.sleep(0)  # each create runs up to its queued write
        assert store._db._writes.qsize() == len(creates)
        release.set()
        assert await holding
        outcomes = await asyncio.gather(*creates, return_exceptions=True)
        store._db._writer_conn.set_trace_callback(None)
    finally:
        await store.close()
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    made = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(refused) == 3 and len(made) == 6, outcomes
    assert {task.created_by for task, _ in made} == {"one", "two"}
    inserts = list(dict.fromkeys(s for s in statements if s.startswith("INSERT INTO tasks")))
    # One statement for each of the two others; none for the refused creates.
    assert len(inserts) == 2, inserts
    assert all(s.count("), (") == 2 for s in inserts)


async def test_a_set_that_fails_together_is_written_one_by_one_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A set's statement failing for an unexpected reason loses no write: each
    runs on its own, and the failure is logged, not hidden by the fallback."""
    db = Database.open(tmp_path / "legato.db")
    try:
        await db.write(lambda conn: conn.execute("CREATE TABLE t (x)").fetchall())

        def broken(conn: sqlite3.Connection, items: list[int]) -> list[int]:
            conn.execute("INSERT INTO t VALUES (-1)")  # rolled back with the set
            raise RuntimeError("a defect in the set's statement")

        def alone(x: int) -> Callable[[sqlite3.Connection], int]:
            return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (x,)).rowcount

        holds, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> bool:
            holds.set()
            return release.wait(10)

        holding = asyncio.create_task(db.write(hold))
        assert await asyncio.to_thread(holds.wait, 10)
        writes = [
            asyncio.create_task(db.write(alone(x), batch=Batch("set", x, broken))) for x in range(4)
        ]
        await asyncio.sleep(0)  # each write runs up to its place in the queue
        assert db._writes.qsize() == 4
        release.set()
        assert await holding
        assert await asyncio.gather(*writes) == [1, 1, 1, 1]
        rows = await db.read(lambda conn: conn.execute("SELECT x FROM t ORDER BY x").fetchall())
        assert rows == [(0,), (1,), (2,), (3,)]
    finally:
        await db.close()
    assert "a set of 4 writes failed together" in caplog.text
    assert "a defect in the set's statement" in caplog.text
