"""The middle rungs of the CreateTask ladder: servers between the bare echo and legato.

Each kind adds one thing to the kind before it, so that the ladder shows what
each costs (see `bench.ladder`):

- `wire`: the echo behind legato's own handler wrapping (`rpc.guard`: the
  real `auth.Authenticator` over a real `AgentRegistry` on a database of its
  own, the wire format, the error mapping); the request is parsed as a
  CreateTaskRequest, as legato parses it. Answers with legato's response bytes.
- `naive`: `wire` plus one INSERT of the task into a plain table, committed on
  its own: one `BEGIN IMMEDIATE; INSERT; COMMIT` per call on one shared
  connection, run on one database thread (WAL, synchronous NORMAL, SQLite's
  own automatic checkpoints). No group commit.
- `schema`: `naive` with legato's schema and legato's statements for a create
  (`store.SCHEMA`; the open-task count read, the tasks, task_labels and events
  rows, the trigger that counts open tasks), still one commit per call.
- `grouped`: `schema` with the commits made by legato's own `db.Database`
  (its writer thread, group commit, savepoints, off-thread checkpoints).

And, off the ladder, the measurement the issue quotes, for reference:

- `issue`: a bare grpc.aio server (no handler wrapping) on asyncio's own loop
  doing `await db.execute(INSERT)` then `await db.commit()` with aiosqlite on
  one shared connection. With many calls in flight, their statements share the
  connection's one implicit transaction, so a COMMIT often commits the INSERTs
  of other calls too: this kind counts how many commits really committed.

Run as `python -m bench.naive KIND --listen unix:PATH --payloads FILE --data-dir DIR`;
prints `ready KEY` on stdout once it serves, KEY being the API key to call it with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import signal
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

import grpc
from legato.server.agents import AgentRegistry
from legato.server.auth import Authenticator, current_agent
from legato.server.convert import struct_bytes
from legato.server.daemon import GRPC_OPTIONS
from legato.server.db import Database, Durability
from legato.server.limits import check_max_attempts
from legato.server.model import EventType, Role, TaskRecord, system_clock
from legato.server.rpc import Authenticate, guard
from legato.server.store import sqlite as store
from legato.server.store.sqlite import SqliteStore as Store
from legato.server.tasks import new_task_id
from legato.v1 import tasks_pb2

from bench.ceilings import read_payloads
from bench.payloads import CREATOR
from bench.procs import run_loop

T = TypeVar("T")
SERVICE = "legato.v1.TaskService"
METHOD = f"/{SERVICE}/CreateTask"
Context = grpc.aio.ServicerContext[Any, Any]
Handle = Callable[[tasks_pb2.CreateTaskRequest, Context], Awaitable[bytes]]


@dataclass(frozen=True)
class Kind:
    """What one rung's server does for a CreateTask."""

    # legato's handler wrapping (auth, wire format, errors), as in the daemon.
    guarded: bool
    # "none", "row" (one plain table) or "schema" (legato's).
    rows: str
    # "per-call" (one transaction per call on a thread), "grouped" (legato's
    # db.Database) or "aiosqlite" (execute + commit awaited on a shared connection).
    commits: str
    # "uvloop" (as the daemon, the echo and the load generators) or "asyncio".
    loop: str = "uvloop"


KINDS: dict[str, Kind] = {
    "wire": Kind(guarded=True, rows="none", commits="none"),
    "naive": Kind(guarded=True, rows="row", commits="per-call"),
    "schema": Kind(guarded=True, rows="schema", commits="per-call"),
    "grouped": Kind(guarded=True, rows="schema", commits="grouped"),
    "issue": Kind(guarded=False, rows="row", commits="aiosqlite", loop="asyncio"),
}

# The naive row: what a task minimally is.
ROW_TABLE = (
    "CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, content TEXT NOT NULL, "
    "labels TEXT NOT NULL, context BLOB NOT NULL, created_by TEXT NOT NULL, "
    "created_at INTEGER NOT NULL)"
)
ROW_INSERT = (
    "INSERT INTO tasks (id, content, labels, context, created_by, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def naive_connect(path: Path, *, foreign_keys: bool) -> sqlite3.Connection:
    """One connection in autocommit mode (transactions are explicit), WAL, NORMAL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    if foreign_keys:  # as legato's connections: task_labels and events reference tasks
        conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class OneCommitPerCall:
    """One database thread; each call is its own `BEGIN IMMEDIATE ... COMMIT` on it.

    What aiosqlite does with one hop per transaction instead of one per
    statement, and what legato's writer does with groups of one.
    """

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._jobs: SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = (
            SimpleQueue()
        )
        threading.Thread(target=self._serve, name="naive-db", daemon=True).start()

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, future))
        return await future

    def _serve(self) -> None:
        conn = self._conn
        while True:
            fn, future = self._jobs.get()
            try:
                conn.execute("BEGIN IMMEDIATE")
                outcome = fn(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                self._loop.call_soon_threadsafe(_settle, future, outcome, None)


def _settle(future: asyncio.Future[Any], outcome: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)


def task_of(request: tasks_pb2.CreateTaskRequest, creator: str) -> TaskRecord:
    """The task legato's create would store for `request` (no validation beyond that)."""
    now = system_clock()
    task_id = new_task_id()
    return TaskRecord(
        id=task_id,
        content=request.content,
        labels=tuple(request.labels),
        context=struct_bytes(request, "context"),
        created_by=creator,
        created_at=now,
        updated_at=now,
        max_attempts=check_max_attempts(request.max_attempts),
        root_id=task_id,
    )


def insert_row(task: TaskRecord) -> Callable[[sqlite3.Connection], None]:
    def insert(conn: sqlite3.Connection) -> None:
        conn.execute(
            ROW_INSERT,
            (
                task.id,
                task.content,
                json.dumps(list(task.labels)),
                task.context,
                task.created_by,
                task.created_at,
            ),
        )

    return insert


def insert_as_legato(task: TaskRecord) -> Callable[[sqlite3.Connection], None]:
    """legato's own statements for a create (`Store.create_task` without the
    idempotency and parent branches, which the benchmark's requests never take)."""

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("SELECT n FROM open_tasks WHERE created_by = ?", (task.created_by,)).fetchone()
        # The store's private helpers, on purpose: the very statements legato runs.
        rowid = store._insert_task(conn, task)
        store._append_event(conn, rowid, task, EventType.CREATED, task.created_by)

    return insert


async def open_registry(data_dir: Path) -> tuple[Store, AgentRegistry, str]:
    """A real agent registry on a database of its own, with the benchmark's creator in it."""
    agents_store = await Store.open(data_dir / "agents.db")
    registry = await AgentRegistry.open(agents_store.agents, system_clock)
    _, key = await registry.create(CREATOR, ["@creator"], Role.AGENT)
    return agents_store, registry, key


async def build_handle(kind: Kind, data_dir: Path, answer: bytes) -> tuple[Handle, list[Any]]:
    """The CreateTask behaviour of `kind`, and what to close at the end."""
    path = data_dir / "naive.db"
    closing: list[Any] = []

    def creator() -> str:
        return current_agent.get().name if kind.guarded else CREATOR

    if kind.rows == "none":

        async def wire(request: tasks_pb2.CreateTaskRequest, context: Context) -> bytes:
            return answer

        return wire, closing

    if kind.commits == "aiosqlite":
        aiosqlite: Any = importlib.import_module("aiosqlite")
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute(ROW_TABLE)
        await db.commit()
        closing.append(db)
        counts = {"calls": 0, "commits": 0}
        stats_file = data_dir / "commits.json"

        async def shared(request: tasks_pb2.CreateTaskRequest, context: Context) -> bytes:
            task = task_of(request, creator())
            row = (
                task.id,
                task.content,
                json.dumps(list(task.labels)),
                task.context,
                task.created_by,
                task.created_at,
            )
            await db.execute(ROW_INSERT, row)
            counts["calls"] += 1
            # A COMMIT commits only if a transaction is open: an earlier call's
            # COMMIT may already have committed this call's INSERT.
            if db.in_transaction:
                counts["commits"] += 1
            await db.commit()
            if counts["calls"] % 500 == 0:
                stats_file.write_text(json.dumps(counts))
            return answer

        return shared, closing

    insert = insert_row if kind.rows == "row" else insert_as_legato
    if kind.commits == "per-call":
        conn = naive_connect(path, foreign_keys=kind.rows == "schema")
        if kind.rows == "row":
            conn.execute(ROW_TABLE)
        else:
            conn.execute("BEGIN IMMEDIATE")
            store._migrate(conn)
            conn.execute("COMMIT")
        writer = OneCommitPerCall(conn)

        async def per_call(request: tasks_pb2.CreateTaskRequest, context: Context) -> bytes:
            await writer.transaction(insert(task_of(request, creator())))
            return answer

        return per_call, closing

    database = Database(path, durability=Durability.NORMAL)
    await database.write(store._migrate)
    closing.append(database)

    async def grouped(request: tasks_pb2.CreateTaskRequest, context: Context) -> bytes:
        await database.write(insert(task_of(request, creator())))
        return answer

    return grouped, closing


async def serve(kind: Kind, listen: str, answer: bytes, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (before serving)
    agents_store: Store | None = None
    key = "no-key-needed"
    authenticate: Authenticate | None = None
    if kind.guarded:
        agents_store, registry, key = await open_registry(data_dir)
        authenticate = Authenticator(registry)
    handle, closing = await build_handle(kind, data_dir, answer)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=tasks_pb2.CreateTaskRequest.FromString
    )
    if kind.guarded:  # wrapped once, as the daemon registers its methods
        handler = guard(handler, authenticate)
    handlers = {"CreateTask": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {key}", flush=True)
    await stop.wait()
    await server.stop(0)
    for resource in closing:
        with contextlib.suppress(Exception):
            await resource.close()
    if agents_store is not None:
        await agents_store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("kind", choices=list(KINDS))
    parser.add_argument("--listen", required=True, help="unix:PATH")
    parser.add_argument("--payloads", required=True, type=Path, help="JSON of probed responses")
    parser.add_argument("--data-dir", required=True, type=Path)
    args = parser.parse_args()
    kind = KINDS[args.kind]
    answer = read_payloads(args.payloads)["CreateTask"]
    main_coroutine = serve(kind, args.listen, answer, args.data_dir)
    if kind.loop == "uvloop":
        run_loop(main_coroutine)
    else:
        asyncio.run(main_coroutine)


if __name__ == "__main__":
    main()
