"""What each piece of legato's work for one CreateTask costs, timed alone.

The ladder measures servers; this times the pieces of legato's own code a
CreateTask runs, each on its own with `timeit` (the best of several repeats,
per call), so that a candidate change can be given an expected gain in
microseconds. The pieces are legato's real functions on real records and a
real SQLite file (WAL, synchronous NORMAL), in the order a create runs them;
what grpc does around them (handler wrapping, (de)serialization hooks, the
sockets) is not here: the ladder's steps 1 and 2 measure that.

Run as `python -m bench.components [--scale F]`: prints a JSON list of [piece, thread, µs].
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from legato.server import limits
from legato.server.agents import AgentRegistry
from legato.server.auth import bearer_key
from legato.server.convert import struct_bytes, task_proto
from legato.server.db import Durability, connect
from legato.server.events import EventBus
from legato.server.model import EventType, Role, TaskRecord, slim, system_clock
from legato.server.store import rows
from legato.server.store import sqlite as store
from legato.server.store.sqlite import SqliteStore as Store
from legato.server.tasks import new_task_id
from legato.server.waiters import ClaimWaiters
from legato.v1 import tasks_pb2

from bench import payloads

GROUP = 32  # creates per transaction when timing the writer's statements


# How much of each count to run: 1 for the full run, less for the smoke run.
SCALE = [1.0]


def best_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Microseconds per call of `fn`: the best of `repeat` runs of `number` calls."""
    number = max(1, int(number * SCALE[0]))
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


class _Context:
    """What `bearer_key` reads of a grpc context: the call's metadata."""

    def __init__(self, key: str):
        self._metadata = (("authorization", f"Bearer {key}"), ("user-agent", "grpc-python"))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _validated(request: tasks_pb2.CreateTaskRequest, creator: str) -> TaskRecord:
    """`TaskManager.create` up to the store: its checks and the record (as in tasks.py)."""
    now = system_clock()
    return TaskRecord(
        id=new_task_id(),
        deadline=None,
        content=limits.check_text(
            "content", request.content, limits.MAX_CONTENT_BYTES, required=True
        ),
        labels=limits.check_labels("labels", list(request.labels), required=True),
        context=limits.check_blob("context", struct_bytes(request, "context")),
        created_by=creator,
        created_at=now,
        updated_at=now,
        max_attempts=limits.check_max_attempts(request.max_attempts),
        parent_id=limits.check_id("parent_id", request.parent_id, required=False),
        idempotency_key=limits.check_text(
            "idempotency_key", request.idempotency_key, limits.MAX_IDEMPOTENCY_KEY
        ),
    )


async def measure(directory: Path) -> list[tuple[str, str, float]]:
    found: list[tuple[str, str, float]] = []

    def add(piece: str, thread: str, us: float) -> None:
        found.append((piece, thread, us))

    raw = payloads.create_request()
    request = tasks_pb2.CreateTaskRequest.FromString(raw)
    agents_store = await Store.open(directory / "agents.db")
    try:
        registry = await AgentRegistry.open(agents_store.agents, system_clock)
        _, key = await registry.create(payloads.CREATOR, ["@creator"], Role.AGENT)
        await registry.create(payloads.WORKER, [payloads.LABEL], Role.AGENT)
        context = _Context(key)
        registry.authenticate(key)  # the once-a-minute last-seen write, out of the way
        await registry.flush()

        add(
            "parse the CreateTaskRequest",
            "loop",
            best_us(lambda: tasks_pb2.CreateTaskRequest.FromString(raw), 20_000),
        )
        add(
            "authenticate: bearer_key + AgentRegistry.authenticate",
            "loop",
            best_us(lambda: registry.authenticate(bearer_key(context)), 20_000),  # type: ignore[arg-type]
        )
        add(
            "struct_bytes(context), deterministic",
            "loop",
            best_us(lambda: struct_bytes(request, "context"), 20_000),
        )
        add(
            "validate + TaskRecord + new_task_id (tasks.create before the store)",
            "loop",
            best_us(lambda: _validated(request, payloads.CREATOR), 20_000),
        )
        task = _validated(request, payloads.CREATOR)
        add(
            "label_held warnings (3 agents)",
            "loop",
            best_us(lambda: [x for x in task.labels if not registry.label_held(x)], 50_000),
        )
        message = task_proto(task)
        add("task_proto: the Task answer built", "loop", best_us(lambda: task_proto(task), 20_000))
        add(
            "Task answer serialized",
            "loop",
            best_us(message.SerializeToString, 50_000),
        )
        bus, waiters = EventBus(), ClaimWaiters()
        event_task = replace(task, root_id=task.id)
        conn = connect(directory / "legato.db", Durability.NORMAL)
        conn.execute("BEGIN IMMEDIATE")
        store._migrate(conn)
        conn.execute("COMMIT")
        rowid = store._insert_task(conn, event_task)
        event = store._append_event(conn, rowid, event_task, EventType.CREATED, task.created_by)

        def committed() -> None:  # TaskManager._committed without watchers or waiting claims
            bus.publish([event])
            waiters.wake_one(event.task.labels)

        add("after commit: event bus + claim waiters (none)", "loop", best_us(committed, 50_000))
        add(
            "dataclasses.replace(task, root_id=...) (store.create_task)",
            "writer",
            best_us(lambda: replace(task, root_id=task.id), 50_000),
        )
        add(
            "_state_json(slim(task)) (the event row's JSON)",
            "writer",
            best_us(lambda: rows.state_json(slim(task, EventType.CREATED), None), 50_000),
        )
        add(
            "json.dumps(labels) (the tasks row's labels)",
            "writer",
            best_us(lambda: json.dumps(list(task.labels)), 50_000),
        )
        add(
            "the tasks INSERT's SQL text, built per call (store._insert_task)",
            "writer",
            best_us(
                lambda: f"INSERT INTO tasks ({rows.TASK_COLUMNS}) VALUES ({store._in(range(27))})",
                50_000,
            ),
        )

        def create_statements(c: sqlite3.Connection) -> None:
            fresh = replace(task, id=new_task_id(), root_id="")
            new = replace(fresh, root_id=fresh.id)
            c.execute("SELECT n FROM open_tasks WHERE created_by = ?", (new.created_by,)).fetchone()
            row = store._insert_task(c, new)
            store._append_event(c, row, new, EventType.CREATED, new.created_by)

        def grouped() -> None:
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(GROUP):
                conn.execute("SAVEPOINT job")
                create_statements(conn)
                conn.execute("RELEASE job")
            conn.execute("COMMIT")

        def one() -> None:
            conn.execute("BEGIN IMMEDIATE")
            create_statements(conn)
            conn.execute("COMMIT")

        add(
            f"create's statements, in a group of {GROUP} with savepoints (as the writer)",
            "writer",
            best_us(grouped, 20, repeat=5) / GROUP,
        )
        add(
            "create's statements, one transaction each (ladder step 4)",
            "writer",
            best_us(one, 300, repeat=5),
        )
        for part, us in statement_parts(conn, task, max(1, int(40 * SCALE[0]))):
            add(f"  of which, grouped: {part}", "writer", us)
        conn.close()
    finally:
        await agents_store.close()
    return found


def statement_parts(
    conn: sqlite3.Connection, task: TaskRecord, groups: int
) -> list[tuple[str, float]]:
    """The grouped writer's time per create, split by statement: the median over `groups`
    transactions of GROUP creates each, timed statement by statement with perf_counter."""
    parts = [
        "SAVEPOINT + RELEASE",
        "SELECT open_tasks",
        "_insert_task (tasks + task_labels)",
        "_append_event (events row)",
        "COMMIT, shared by the group",
    ]
    samples: dict[str, list[float]] = {part: [] for part in parts}
    clock = time.perf_counter
    for _ in range(groups):
        spent = dict.fromkeys(parts, 0.0)
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(GROUP):
            new = replace(task, id=new_task_id())
            new = replace(new, root_id=new.id)
            t0 = clock()
            conn.execute("SAVEPOINT job")
            t1 = clock()
            conn.execute(
                "SELECT n FROM open_tasks WHERE created_by = ?", (new.created_by,)
            ).fetchone()
            t2 = clock()
            row = store._insert_task(conn, new)
            t3 = clock()
            store._append_event(conn, row, new, EventType.CREATED, new.created_by)
            t4 = clock()
            conn.execute("RELEASE job")
            t5 = clock()
            spent["SAVEPOINT + RELEASE"] += (t1 - t0) + (t5 - t4)
            spent["SELECT open_tasks"] += t2 - t1
            spent["_insert_task (tasks + task_labels)"] += t3 - t2
            spent["_append_event (events row)"] += t4 - t3
        t6 = clock()
        conn.execute("COMMIT")
        spent["COMMIT, shared by the group"] += clock() - t6
        for part in parts:
            samples[part].append(spent[part] / GROUP * 1e6)
    return [(part, statistics.median(samples[part])) for part in parts]


def pieces(found: list[Any]) -> list[tuple[str, str, float]]:
    """The JSON `main` printed, typed."""
    return [(str(p), str(t), float(us)) for p, t, us in found]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.components")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the counts to run")
    SCALE[0] = parser.parse_args().scale
    with tempfile.TemporaryDirectory(prefix="legato-components-") as directory:
        found = asyncio.run(measure(Path(directory)))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
