"""psycopg 3 or asyncpg for the PostgreSQL backend: the create path, measured.

`python -m bench.pg_drivers [URL]` runs the transaction a CreateTask commits
(insert the task and its label rows, take the event counter last, insert the
event, notify, commit) on a scratch schema, one at a time and in groups of 32
(the daemon's group commit), with each candidate:

- psycopg 3, blocking, on a thread (how the backend runs it: one writer
  thread, like the SQLite one), in pipeline mode;
- psycopg 3, asyncio (`AsyncConnection`), in pipeline mode;
- asyncpg (no pipeline mode; each statement is its own round trip; `pip install
  asyncpg` first: it is no dependency of legato).

Prints transactions/s and creates/s per candidate. Not part of `make bench`:
it chose the driver, once, and is kept to check the choice.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

URL = os.environ.get("LEGATO_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = f"legato_driver_bench_{secrets.token_hex(4)}"
ROUNDS = 5
SECONDS = 1.5

DDL = """
CREATE TABLE tasks (rowid bigserial PRIMARY KEY, id text UNIQUE, content text, labels text,
    context bytea, created_by text, created_at bigint, status int);
CREATE TABLE task_labels (label text, task_rowid bigint, pending boolean,
    PRIMARY KEY (label, task_rowid));
CREATE TABLE events (seq bigint PRIMARY KEY, task_rowid bigint, type int, actor text, at bigint,
    state text);
CREATE TABLE seq_counter (one boolean PRIMARY KEY, last bigint NOT NULL);
INSERT INTO seq_counter VALUES (true, 0);
"""

INSERT_TASK = (
    "INSERT INTO tasks (id, content, labels, context, created_by, created_at, status) "
    "VALUES (%s, %s, %s, %s, %s, %s, 1) RETURNING rowid"
)
INSERT_LABEL = "INSERT INTO task_labels VALUES (%s, %s, true)"
TAKE_SEQ = (
    "WITH c AS (UPDATE seq_counter SET last = last + %s RETURNING last), "
    "e AS (INSERT INTO events SELECT c.last - %s + o, r, 1, 'bench', 0, s "
    "FROM c, unnest(%s::bigint[], %s::text[]) WITH ORDINALITY AS u(r, s, o)) "
    "SELECT last, pg_notify('bench', last::text) FROM c"
)


def _task() -> tuple[Any, ...]:
    return (
        "t_" + secrets.token_urlsafe(16), "what is the RPM?", json.dumps(["@bench"]),
        b"\x0a" * 200, "bench", time.time_ns() // 1000,
    )  # fmt: skip


def _asyncpg(sql: str) -> str:
    count = 0

    def number(_: str) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    import re

    return re.sub(r"%s", number, sql)


def psycopg_thread(group: int) -> float:
    conn = psycopg.connect(URL, autocommit=True, options=f"-csearch_path={SCHEMA}")
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < SECONDS:
        with conn.pipeline() as pipeline:
            conn.execute("BEGIN")
            cursors = []
            for _ in range(group):
                conn.execute("SAVEPOINT job")
                cursors.append(conn.execute(INSERT_TASK, _task()))
            pipeline.sync()
            rowids = [c.fetchone()[0] for c in cursors]  # type: ignore[index]
            for rowid in rowids:
                conn.execute(INSERT_LABEL, ("@bench", rowid))
                conn.execute("RELEASE job")
            conn.execute(TAKE_SEQ, (group, group, rowids, ["{}"] * group))
            conn.execute("COMMIT")
        done += group
    conn.close()
    return done / (time.perf_counter() - began)


async def psycopg_async(group: int) -> float:
    conn = await psycopg.AsyncConnection.connect(
        URL, autocommit=True, options=f"-csearch_path={SCHEMA}"
    )
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < SECONDS:
        async with conn.pipeline() as pipeline:
            await conn.execute("BEGIN")
            cursors = []
            for _ in range(group):
                await conn.execute("SAVEPOINT job")
                cursors.append(await conn.execute(INSERT_TASK, _task()))
            await pipeline.sync()
            rowids = [(await c.fetchone())[0] for c in cursors]  # type: ignore[index]
            for rowid in rowids:
                await conn.execute(INSERT_LABEL, ("@bench", rowid))
                await conn.execute("RELEASE job")
            await conn.execute(TAKE_SEQ, (group, group, rowids, ["{}"] * group))
            await conn.execute("COMMIT")
        done += group
    await conn.close()
    return done / (time.perf_counter() - began)


async def asyncpg_async(group: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(URL, server_settings={"search_path": SCHEMA})
    insert_task, insert_label, take_seq = (
        _asyncpg(s) for s in (INSERT_TASK, INSERT_LABEL, TAKE_SEQ)
    )
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < SECONDS:
        async with conn.transaction():
            rowids = []
            for _ in range(group):
                async with conn.transaction():  # a savepoint, as each job has
                    rowid = await conn.fetchval(insert_task, *_task())
                    await conn.execute(insert_label, "@bench", rowid)
                rowids.append(rowid)
            await conn.fetch(take_seq, group, group, rowids, ["{}"] * group)
        done += group
    await conn.close()
    return done / (time.perf_counter() - began)


def _on_thread(fn: Callable[[int], float], group: int) -> float:
    box: list[float] = []
    thread = threading.Thread(target=lambda: box.append(fn(group)))
    thread.start()
    thread.join()
    return box[0]


async def main() -> None:
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {SCHEMA}")
        admin.execute(f"SET search_path = {SCHEMA}")
        admin.execute(DDL)
    try:
        candidates: dict[str, Callable[[int], Awaitable[float]]] = {
            "psycopg, thread, pipeline": lambda g: asyncio.to_thread(_on_thread, psycopg_thread, g),
            "psycopg, asyncio, pipeline": psycopg_async,
            "asyncpg": asyncpg_async,
        }
        print(f"PostgreSQL at {URL.split('@')[-1]}; {ROUNDS} rounds of {SECONDS} s, median")
        for group in (1, 32):
            figures: dict[str, list[float]] = {name: [] for name in candidates}
            for _ in range(ROUNDS):
                for name, run in candidates.items():
                    figures[name].append(await run(group))
            for name, values in figures.items():
                print(
                    f"  creates per transaction {group:>2}  {name:<28} "
                    f"{statistics.median(values):>8,.0f} creates/s"
                )
    finally:
        with psycopg.connect(URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        URL = sys.argv[1]
    asyncio.run(main())
