"""Creates that arrive together: written together, each still answered on its own."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from legato.client import AsyncClient, EventType
from legato.client.errors import AlreadyExistsError, ResourceExhaustedError
from legato.server.daemon import Config, Daemon
from legato.server.store.sqlite import SqliteStore


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
