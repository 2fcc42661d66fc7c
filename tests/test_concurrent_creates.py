"""Creates that arrive together: written together, each still answered on its own."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from legato.client import AsyncClient, EventType
from legato.client.errors import ResourceExhaustedError
from legato.server.daemon import Config, Daemon


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
