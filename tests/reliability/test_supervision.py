"""Supervision: a daemon whose database fails says so and stops; it never hangs while SERVING.

Here, the database on its own: a post-commit callback that raises.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from legato.server import db as database
from legato.server.db import Database

# The longest any call or event may take here; a hang shows as a failed wait.
GUARD = 10.0


# -- a post-commit callback raises --------------------------------------------------------


async def test_a_raising_after_commit_callback_does_not_strand_its_group(short_tmp: Path) -> None:
    db = Database(short_tmp / "group.db")
    try:
        await db.write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
        # Hold the writer inside a transaction so that the next writes queue up and are
        # committed together, as one group.
        holding, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            holding.set()
            release.wait(GUARD)

        held = asyncio.ensure_future(db.write(hold))
        assert await asyncio.to_thread(holding.wait, GUARD)
        published: list[int] = []

        def insert(n: int) -> Callable[[sqlite3.Connection], int]:
            def run(conn: sqlite3.Connection) -> int:
                return conn.execute("INSERT INTO t VALUES (?)", (n,)).rowcount

            return run

        def publish(n: int) -> Callable[[int], None]:
            def after_commit(rowcount: int) -> None:
                if n == 2:
                    raise RuntimeError("publishing failed")
                published.append(n)

            return after_commit

        group = [
            asyncio.ensure_future(db.write(insert(n), after_commit=publish(n))) for n in range(5)
        ]
        release.set()
        await asyncio.wait_for(held, GUARD)
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), GUARD)

        assert outcomes[:2] == [1, 1] and outcomes[3:] == [1, 1]
        assert published == [0, 1, 3, 4]
        # Its change was committed: the caller is told so, not that it failed.
        assert isinstance(outcomes[2], database.DatabaseFailed)
        assert "committed" in str(outcomes[2])
        with closing(sqlite3.connect(short_tmp / "group.db")) as conn:
            rows = conn.execute("SELECT n FROM t ORDER BY n").fetchall()
        assert rows == [(0,), (1,), (2,), (3,), (4,)]
        # Watchers missed an event: the database reports itself failed and takes no more calls.
        failure = await asyncio.wait_for(db.failed(), GUARD)
        assert isinstance(failure, database.DatabaseFailed)
        with pytest.raises(database.DatabaseFailed, match="database failed"):
            await asyncio.wait_for(db.write(insert(5)), GUARD)
    finally:
        await asyncio.wait_for(db.close(), GUARD)
