"""The PostgreSQL backend: one database shared by any number of daemons.

The tables and rows are the SQLite backend's (`rows`); what differs is how
several writers on several daemons keep the promises of `TaskStore`:

- **seq in commit order.** A sequence would hand out numbers in the order
  transactions ask, not the order they commit: a watcher could read 101, move
  its cursor, and never see 100 committed a moment later. Events get their seq
  from a one-row counter (`seq_counter`) taken last in the writing
  transaction, right before COMMIT: the row lock makes the next writer wait
  until this one has committed, so numbers are handed out in commit order, and
  without gaps. A daemon's writes share a transaction (`pgdb` group commit),
  so the counter is turned once per group, not once per write.
- **Claims** take the oldest pending task `FOR NO KEY UPDATE SKIP LOCKED`:
  a task another daemon is claiming is passed over, never waited for; the
  lease token fences later calls as on SQLite.
- **Expiry** selects due tasks `SKIP LOCKED` and decides on the row as it is
  under the lock: every daemon's reaper may try, one changes each task.
- **Idempotency and the open-task cap** are checked under a per-creator
  advisory lock, so two daemons cannot both pass the check and both insert.
  Open tasks are counted in `open_counts`, one row per creator and daemon,
  which only that daemon writes: keeping the count costs no daemon a wait.
- **Time** is the database's clock (`pgdb.DbClock`), whichever daemon writes.
- **Lease timers.** Every daemon's timer hears of leases and deadlines from
  the events it publishes, its own and the others'. A heartbeat records no
  event, so one that shortens a lease NOTIFYs its new end (`due:US`): should
  its daemon die, another ends the lease on time, not at its old end.
- **Fan-out.** Each commit NOTIFYs the seq it reached (a number, never a
  payload). Every daemon LISTENs, reads the events after the last one it
  published from the table, and publishes them in seq order (its own commits
  without the read when nothing came in between). After every (re)connect of
  the listening connection it reads from its last seq again, so a missed
  notification loses nothing.
- **Agents** are held in memory by each daemon, as on SQLite. Every change
  bumps the agent's `version` and NOTIFYs; each daemon re-reads the agents
  when notified and every `AGENT_RECHECK_S` in any case, and refuses to
  authenticate (UNAVAILABLE) once it has not managed to for `AGENT_STALE_S`:
  a revocation or rotation takes effect everywhere within milliseconds, and
  within `AGENT_STALE_S` whatever happens to the notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import psycopg
from legato.server import access, limits
from legato.server.errors import AlreadyExists, InvalidArgument, NotFound
from legato.server.model import (
    EVENT_OVERHEAD,
    FIELD_OVERHEAD,
    TASK_OVERHEAD,
    AgentRecord,
    Clock,
    Event,
    EventType,
    OutputChunk,
    Role,
    Status,
    TaskRecord,
    slim,
    utf8_size,
)
from legato.server.store import (
    MAX_DEPTH,
    DatabaseFailed,
    Decide,
    Durability,
    TaskPage,
    TaskQuery,
)
from legato.server.store.pgdb import (
    BeforeCommit,
    Contended,
    Listener,
    PgDatabase,
    Tx,
)
from legato.server.store.rows import (
    AGENT_COLUMNS,
    TASK_COLUMNS,
    agent_from_row,
    check_open_count,
    event_columns,
    event_from_row,
    prefixed,
    repeat_of,
    state_json,
    task_from_row,
    task_values,
)
from legato.server.store.supervision import Batch
from psycopg import conninfo

T = TypeVar("T")

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# The advisory lock migrations hold, so daemons starting at once migrate one by one.
MIGRATION_LOCK = int.from_bytes(b"legato-m", "big", signed=True)
# How often each daemon re-reads the agents even when no notification came...
AGENT_RECHECK_S = 1.0
# ...and how old its last successful re-read may be before it refuses keys.
AGENT_STALE_S = 3.0
# A notification on the events channel that is not a seq: "due:MICROSECONDS",
# a lease that ends then (shortened by a heartbeat, which records no event).
DUE_PREFIX = "due:"
# Events one catch-up read brings, in count and in bytes (`Event.size`).
CATCH_UP_BATCH = 500
CATCH_UP_BYTES = 4 * 1024 * 1024
# Tasks one expiry transaction ends at most; the reaper comes back for the rest.
EXPIRE_BATCH = 1000
OPEN = (Status.PENDING, Status.CLAIMED, Status.INPUT_REQUIRED)

SCHEMA = [
    """CREATE TABLE tasks (
    rowid            bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               text    NOT NULL UNIQUE,
    content          text    NOT NULL,
    labels           text    NOT NULL,
    context          bytea   NOT NULL,
    created_by       text    NOT NULL,
    created_at       bigint  NOT NULL,
    max_attempts     integer NOT NULL,
    parent_id        text    NOT NULL,
    root_id          text    NOT NULL,
    idempotency_key  text    NOT NULL,
    status           integer NOT NULL,
    result           bytea   NOT NULL,
    error            text    NOT NULL,
    claimed_by       text    NOT NULL,
    attempt          integer NOT NULL,
    version          integer NOT NULL,
    updated_at       bigint  NOT NULL,
    lease_token      text    NOT NULL,
    lease_expires_at bigint,
    lease_us         bigint  NOT NULL,
    depth            integer NOT NULL,
    deadline         bigint,
    output_size      integer NOT NULL,
    question         text    NOT NULL,
    answer           text    NOT NULL,
    released         integer NOT NULL,
    claim_seq        bigint  NOT NULL
)""",
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks (created_by, idempotency_key) "
    "WHERE idempotency_key != ''",
    "CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 2",
    "CREATE INDEX tasks_parent ON tasks (parent_id, rowid) WHERE parent_id != ''",
    "CREATE INDEX tasks_created_by ON tasks (created_by, rowid)",
    "CREATE INDEX tasks_claimed_by ON tasks (claimed_by, rowid) WHERE claimed_by != ''",
    "CREATE INDEX tasks_deadline ON tasks (deadline) "
    "WHERE deadline IS NOT NULL AND status IN (1, 2, 6)",
    """CREATE TABLE task_labels (
    label      text    NOT NULL,
    task_rowid bigint  NOT NULL,
    pending    boolean NOT NULL,
    PRIMARY KEY (label, task_rowid)
)""",
    "CREATE INDEX task_labels_pending ON task_labels (label, task_rowid) WHERE pending",
    "CREATE INDEX task_labels_task ON task_labels (task_rowid)",
    """CREATE TABLE events (
    seq        bigint  PRIMARY KEY,
    task_rowid bigint  NOT NULL,
    type       integer NOT NULL,
    actor      text    NOT NULL,
    at         bigint  NOT NULL,
    attempt    integer NOT NULL,
    state      text    NOT NULL
)""",
    "CREATE INDEX events_task ON events (task_rowid, seq)",
    "CREATE INDEX events_output ON events (task_rowid, attempt, seq) WHERE type = 8",
    # The last seq handed out: taken last in each writing transaction (see above).
    """CREATE TABLE seq_counter (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    last bigint  NOT NULL
)""",
    "INSERT INTO seq_counter (last) VALUES (0)",
    # Open (pending, claimed, input-required) tasks per creator, for the cap: the
    # sum of one row per daemon (`shard`), each written by that daemon's writer
    # alone, so keeping it exact makes no daemon wait for another.
    """CREATE TABLE open_counts (
    created_by text   NOT NULL,
    shard      bigint NOT NULL,
    n          bigint NOT NULL,
    PRIMARY KEY (created_by, shard)
)""",
    """CREATE TABLE agents (
    name         text    PRIMARY KEY,
    labels       text    NOT NULL,
    role         integer NOT NULL,
    created_at   bigint  NOT NULL,
    key_id       text    NOT NULL UNIQUE,
    key_hash     text    NOT NULL,
    last_seen_at bigint,
    revoked      integer NOT NULL,
    version      bigint  NOT NULL DEFAULT 1
)""",
]

_SELECT_TASK = f"SELECT rowid, {TASK_COLUMNS} FROM tasks"
_EMPTY_BLOB = "''::bytea"
_SELECT_EVENT = (
    f"SELECT e.seq, e.type, e.actor, e.at, e.state, t.rowid, {event_columns(_EMPTY_BLOB)} "
    "FROM events e JOIN tasks t ON t.rowid = e.task_rowid"
)

# A task's wire size (`model.task_size`, no output) from its lengths: phase one
# of a page read picks the rows that fit before any blob is fetched.
_TASK_SIZES = (
    "tasks.rowid, octet_length(tasks.id) + octet_length(tasks.content) + "
    "octet_length(tasks.error) + octet_length(tasks.created_by) + "
    "octet_length(tasks.claimed_by) + octet_length(tasks.parent_id) + "
    "octet_length(tasks.root_id) + octet_length(tasks.question) + "
    "octet_length(tasks.answer) + octet_length(tasks.context) + octet_length(tasks.result), "
    "tasks.labels"
)
# An upper bound of an event's `Event.size` from its lengths, likewise.
_EVENT_SIZE = (
    f"{EVENT_OVERHEAD} + 4 * char_length(e.state) + CASE WHEN e.type = {int(EventType.CREATED)} "
    "THEN 4 * char_length(t.content) + octet_length(t.context) ELSE 0 END + "
    f"CASE WHEN e.type = {int(EventType.COMPLETED)} THEN octet_length(t.result) ELSE 0 END"
)

# The oldest claimable task of one label: an ordered walk of the pending index
# that stops at the first task no other transaction holds.
_CLAIM_ONE = (
    f"SELECT tasks.rowid, {prefixed('tasks')} FROM task_labels l "
    "JOIN tasks ON tasks.rowid = l.task_rowid "
    "WHERE l.pending AND l.label = %s AND tasks.status = 1 "
    "ORDER BY l.task_rowid LIMIT 1 FOR NO KEY UPDATE OF tasks SKIP LOCKED"
)
# Of several labels: the oldest of the first few pending tasks of each (an
# index range per label; `label = ANY(...)` would read every pending task and
# sort them)...
CLAIM_CANDIDATES = 32
_CLAIM_NEAR = (
    f"SELECT tasks.rowid, {prefixed('tasks')} FROM tasks WHERE tasks.rowid IN ("
    "SELECT c.task_rowid FROM unnest(%s::text[]) AS wanted(label), LATERAL ("
    "SELECT l.task_rowid FROM task_labels l WHERE l.pending AND l.label = wanted.label "
    f"ORDER BY l.task_rowid LIMIT {CLAIM_CANDIDATES}) c) AND tasks.status = 1 "
    "ORDER BY tasks.rowid LIMIT 1 FOR NO KEY UPDATE OF tasks SKIP LOCKED"
)
# ...and, when all of those are being taken, any of them.
_CLAIM_ANY = (
    f"SELECT tasks.rowid, {prefixed('tasks')} FROM task_labels l "
    "JOIN tasks ON tasks.rowid = l.task_rowid "
    "WHERE l.pending AND l.label = ANY(%s) AND tasks.status = 1 "
    "ORDER BY l.task_rowid LIMIT 1 FOR NO KEY UPDATE OF tasks SKIP LOCKED"
)

# The last statement of every transaction that records events (but a create
# alone, which does the same itself, `_guarded_insert`): turns the
# counter (its row lock is held to COMMIT, so seq follows commit order), inserts
# the events with their numbers and notifies the seq reached.
_TAKE_SEQ = (
    "WITH c AS (UPDATE seq_counter SET last = last + %(n)s RETURNING last), "
    "e AS (INSERT INTO events (seq, task_rowid, type, actor, at, attempt, state) "
    "SELECT c.last - %(n)s + u.o, u.r, u.ty, u.a, u.at, u.att, u.s FROM c, "
    "unnest(%(r)s::bigint[], %(ty)s::int[], %(a)s::text[], %(at)s::bigint[], %(att)s::int[], "
    "%(s)s::text[]) WITH ORDINALITY AS u(r, ty, a, at, att, s, o)) "
    "SELECT last, pg_notify(%(channel)s, last::text) FROM c"
)


def _column_types() -> list[str]:
    """The types of `TASK_COLUMNS`, from the table's definition: an INSERT ... SELECT
    of parameters must say them (an untyped NULL would be text)."""
    types = dict(re.findall(r"^\s+(\w+)\s+(\w+)", SCHEMA[0], re.MULTILINE))
    return [types[column.strip()] for column in TASK_COLUMNS.split(",")]


def _guarded_insert(waits: bool) -> str:
    """A create without a parent in one statement: the task with the same
    idempotency key, the creator's open count, and the insert of the task, its
    labels and its count, made only if neither stops it. Inside a group (no
    waiting) the insert also asks for the creator's lock, which it holds
    already if the statement before got it."""
    lock = "" if waits else " AND pg_try_advisory_xact_lock(%(lock)s)"
    # Alone in its transaction the create is its last statement before COMMIT:
    # it takes the event counter itself (see `_TAKE_SEQ`), one statement fewer
    # (measured: ~0.3 ms of a 1.4 ms create). The counter's lock is then held
    # across the round trip that brings the row back, not only to COMMIT's flush.
    numbered, seq = "", "NULL, NULL"
    if waits:
        numbered = (
            ", s AS (UPDATE seq_counter SET last = last + 1 WHERE EXISTS (SELECT 1 FROM t) "
            "RETURNING last), "
            "e AS (INSERT INTO events (seq, task_rowid, type, actor, at, attempt, state) "
            "SELECT s.last, t.rowid, %(ty)s, %(by)s, %(at)s, %(att)s, %(state)s FROM s, t)"
        )
        seq = "(SELECT last FROM s), (SELECT pg_notify(%(channel)s, last::text) FROM s)"
    placeholders = ", ".join(f"%(v{i})s::{t}" for i, t in enumerate(_column_types()))
    return (
        "WITH k AS (SELECT rowid, "
        f"{TASK_COLUMNS} FROM tasks WHERE created_by = %(by)s AND idempotency_key = %(key)s "
        "AND %(key)s <> ''), "
        "c AS (SELECT COALESCE(sum(n), 0) AS n FROM open_counts WHERE created_by = %(by)s), "
        f"t AS (INSERT INTO tasks ({TASK_COLUMNS}) SELECT {placeholders} "
        "WHERE NOT EXISTS (SELECT 1 FROM k) "
        "AND (%(max)s::bigint IS NULL OR (SELECT n FROM c) < %(max)s::bigint)"
        f"{lock} ON CONFLICT DO NOTHING RETURNING rowid), "
        "l AS (INSERT INTO task_labels (label, task_rowid, pending) "
        "SELECT label, t.rowid, %(pending)s FROM t, unnest(%(labels)s::text[]) AS label), "
        "o AS (INSERT INTO open_counts (created_by, shard, n) SELECT %(by)s, %(shard)s, 1 FROM t "
        "ON CONFLICT (created_by, shard) DO UPDATE SET n = open_counts.n + 1)"
        f"{numbered} SELECT (SELECT rowid FROM t), (SELECT n FROM c), {seq}, k.* "
        "FROM (VALUES (1)) AS one(x) LEFT JOIN k ON true"
    )


def _insert_many() -> str:
    """Tasks without a parent, one per element of the column arrays, inserted
    only if every creator stays within its cap (`max`, NULL: no cap) with all
    of them and no idempotency key was used before: all or none (a key used
    twice among them is a conflict, and they go one by one)."""
    types = _column_types()
    arrays = ", ".join(f"%(c{i})s::{t}[]" for i, t in enumerate(types))
    names = ", ".join(f"j.{c.strip()}" for c in TASK_COLUMNS.split(","))
    return (
        f"WITH j AS (SELECT * FROM unnest({arrays}, %(max)s::bigint[], %(pending)s::boolean[]) "
        f"WITH ORDINALITY AS j({TASK_COLUMNS}, max_open, pending, o)), "
        "w AS (SELECT created_by, count(*) AS k, min(max_open) AS max_open FROM j "
        "GROUP BY created_by), "
        "ok AS (SELECT COALESCE(bool_and(w.max_open IS NULL OR w.k + COALESCE((SELECT sum(n) "
        "FROM open_counts c WHERE c.created_by = w.created_by), 0) <= w.max_open), true) "
        "AND NOT EXISTS (SELECT 1 FROM j JOIN tasks x ON x.created_by = j.created_by "
        "AND x.idempotency_key = j.idempotency_key AND x.idempotency_key <> '') AS ok "
        "FROM w), "
        f"t AS (INSERT INTO tasks ({TASK_COLUMNS}) SELECT {names} FROM j "
        "WHERE (SELECT ok FROM ok) ORDER BY j.o ON CONFLICT DO NOTHING RETURNING rowid, id), "
        "l AS (INSERT INTO task_labels (label, task_rowid, pending) "
        "SELECT label, t.rowid, j.pending FROM t JOIN j ON j.id = t.id, "
        "json_array_elements_text(j.labels::json) AS label), "
        "o AS (INSERT INTO open_counts (created_by, shard, n) "
        "SELECT j.created_by, %(shard)s, count(*) FROM t JOIN j ON j.id = t.id "
        "GROUP BY j.created_by "
        "ON CONFLICT (created_by, shard) DO UPDATE SET n = open_counts.n + excluded.n) "
        "SELECT id, rowid FROM t"
    )


_INSERT_MANY = _insert_many()
# With the creator, the `Batch` key of creates that `_create_many` makes together.
_CREATE_MANY = "create"

# By whether the statement may wait (`Tx.waits`).
_GUARDED_INSERT = {waits: _guarded_insert(waits) for waits in (False, True)}


@dataclass(slots=True)
class _Pending:
    """An event written in a transaction, its seq given right before COMMIT."""

    rowid: int
    event: Event
    state: str


Written = tuple[T, list[_Pending]]


def _where(url: str) -> str:
    """The server and database of `url`, without user or password."""
    try:
        info = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable URL)"
    host = info.get("host") or "localhost"
    return f"postgresql://{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def _lock_key(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _channels(schema: str) -> tuple[str, str]:
    # Per schema, so deployments that share a database in different schemas
    # (the test suite's, each test in its own) do not hear each other.
    return f"legato.{schema}.events", f"legato.{schema}.agents"


def _migrate(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS legato_schema (one boolean PRIMARY KEY DEFAULT true "
            "CHECK (one), version integer NOT NULL)"
        )
        row = conn.execute("SELECT version FROM legato_schema").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database was written by a newer legato (schema {version}, this one reads "
                f"up to {SCHEMA_VERSION}); upgrade legato"
            )
        if version == 0:
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO legato_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            log.info("created legato's tables (schema %d)", SCHEMA_VERSION)


def _before_commit(channel: Callable[[], str]) -> BeforeCommit:
    def take_seq(conn: psycopg.Connection[Any], outcomes: list[Any]) -> Callable[[], None]:
        # Not those a write alone numbered itself (its seq is set already).
        pending = [p for outcome in outcomes for p in outcome[1] if p.event.seq == 0]
        if not pending:
            return lambda: None
        n = len(pending)
        cursor = conn.execute(
            _TAKE_SEQ,
            {
                "n": n,
                "r": [p.rowid for p in pending],
                "ty": [int(p.event.type) for p in pending],
                "a": [p.event.actor for p in pending],
                "at": [p.event.at for p in pending],
                "att": [p.event.task.attempt for p in pending],
                "s": [p.state for p in pending],
                "channel": channel(),
            },
        )

        def numbered() -> None:
            row = cursor.fetchone()
            assert row is not None
            first = int(row[0]) - n + 1
            for i, p in enumerate(pending):
                p.event = replace(p.event, seq=first + i)

        return numbered

    return take_seq


class PostgresStore:
    """The task store on a PostgreSQL database (`TaskStore`), shared with other daemons."""

    def __init__(self, db: PgDatabase, schema: str, published: int):
        self._db = db
        self.schema = schema
        self.events_channel, self.agents_channel = _channels(schema)
        self.on_commit: Callable[[list[Event]], None] = lambda events: None
        self.on_writable: Callable[[bool], None] = lambda writable: None
        self.on_due: Callable[[int], None] = lambda when: None
        db.on_connection = lambda connected: self.on_writable(connected)
        # The last seq handed to `on_commit`: events go out in seq order, each once.
        self._published = published
        self._wanted = published
        self._catching_up: asyncio.Task[None] | None = None
        self._until: dict[int, list[asyncio.Future[None]]] = {}
        # The highest seq this daemon's writer has committed (set on its thread).
        self._committed_high = published
        db.committed = self._committed_on_writer
        self._agents = PostgresAgentStore(self)
        # This daemon's rows of `open_counts`, new at each start.
        self._shard = secrets.randbits(63)
        self._listener = Listener(
            db,
            [self.events_channel, self.agents_channel],
            notified=self._notified,
            connected=self._reconnected,
        )

    @classmethod
    async def open(cls, url: str, *, durability: Durability = Durability.NORMAL) -> PostgresStore:
        """Connects to `url`, creating or migrating legato's tables (one daemon at a
        time: an advisory lock)."""
        holder: list[str] = []
        try:
            db = await PgDatabase.open(
                url,
                durability=durability,
                before_commit=_before_commit(lambda: holder[0]),
                prepare=_migrate,
            )
        except psycopg.OperationalError as exc:
            # An OSError, as a port that cannot be bound: `legato serve` says so in a line.
            raise OSError(f"cannot use the database at {_where(url)}: {exc}".strip()) from exc
        try:

            def where(conn: psycopg.Connection[Any]) -> tuple[str, int]:
                row = conn.execute(
                    "SELECT current_schema(), (SELECT last FROM seq_counter)"
                ).fetchone()
                assert row is not None
                return str(row[0]), int(row[1])

            schema, published = await db.read(where)
            holder.append(_channels(schema)[0])
            store = cls(db, schema, published)
            await store._agents.load()
        except BaseException:
            await db.close()
            raise
        return store

    # -- the TaskStore plumbing -------------------------------------------------------

    @property
    def agents(self) -> PostgresAgentStore:
        return self._agents

    @property
    def clock(self) -> Clock:
        return self._db.clock

    @property
    def shared(self) -> bool:
        return True

    @property
    def description(self) -> str:
        return f"{_where(self._db.url)} (schema {self.schema})"

    @property
    def listener(self) -> Listener:
        return self._listener

    @property
    def failure(self) -> DatabaseFailed | None:
        return self._db.failure

    async def failed(self) -> DatabaseFailed:
        return await self._db.failed()

    def start(self) -> None:
        self._listener.start()
        self._agents.start()

    async def close(self) -> None:
        await self._listener.stop()
        await self._agents.stop()
        if self._catching_up is not None:
            self._catching_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._catching_up
        self._release_waiters(RuntimeError("the database is closed"))
        await self._db.close()

    # -- publishing in seq order ---------------------------------------------------------

    def _notified(self, channel: str, payload: str) -> None:
        if channel == self.events_channel:
            with contextlib.suppress(ValueError):
                if payload.startswith(DUE_PREFIX):
                    self.on_due(int(payload.removeprefix(DUE_PREFIX)))
                else:
                    self._announced(int(payload))
        elif channel == self.agents_channel:
            self._agents.poke()

    def _committed_on_writer(self, outcomes: list[Any]) -> None:
        seqs = [p.event.seq for outcome in outcomes for p in outcome[1]]
        if seqs:
            self._committed_high = max(self._committed_high, *seqs)

    def _announced(self, seq: int) -> None:
        if seq <= self._committed_high:
            # This daemon's own commit, or one before it: the delivery of its
            # own commit publishes it, or reads what came in between first.
            return
        self._want(seq)

    async def _reconnected(self) -> None:
        # Whatever committed while nobody listened: read from the last seq on.
        self._want(await self.cursor())
        self._agents.poke()

    def _committed_here(self, pending: list[_Pending]) -> None:
        events = [p.event for p in pending]
        if events[-1].seq <= self._published:
            return  # its notification came first, and a read published it
        if events[0].seq == self._published + 1:
            self._publish(events)  # nothing came in between: no read needed
        else:
            self._want(events[-1].seq)

    def _publish(self, events: list[Event]) -> None:
        self.on_commit(events)
        self._published = events[-1].seq
        for seq in [s for s in self._until if s <= self._published]:
            for future in self._until.pop(seq):
                if not future.done():
                    future.set_result(None)

    def _want(self, seq: int) -> None:
        if seq > self._wanted:
            self._wanted = seq
        if self._wanted > self._published and self._catching_up is None:
            self._catching_up = asyncio.get_running_loop().create_task(
                self._catch_up(), name="legato-pg-catch-up"
            )

    async def _catch_up(self) -> None:
        delay = 0.05
        try:
            while self._wanted > self._published:
                after = self._published
                try:
                    batch, _ = await self._db.read(functools.partial(_events_after, after))
                except DatabaseFailed:
                    return
                except Exception as exc:
                    log.warning("reading events to publish failed (%s); retrying", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                # Published meanwhile by this daemon's own commits: not twice.
                fresh = [event for event in batch if event.seq > self._published]
                if fresh:
                    self._publish(fresh)
                elif not batch and self._published == after:
                    # Announced (NOTIFY is sent at commit) but not readable yet:
                    # cannot happen; never spin on it.
                    log.warning("seq %d was announced but is not stored yet", self._wanted)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self._db.fail(f"publishing events raised {type(exc).__name__}: {exc}", exc)
            raise
        finally:
            self._catching_up = None

    async def _until_published(self, seq: int) -> None:
        if seq <= self._published:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._until.setdefault(seq, []).append(future)
        failed: asyncio.Future[Any] = asyncio.ensure_future(self._db.failed())
        try:
            await asyncio.wait((future, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
        if not future.done():
            # Committed, but watchers here may not have it: as on SQLite, say so.
            raise DatabaseFailed("the database failed before this change was published")

    def _release_waiters(self, exc: Exception) -> None:
        for futures in self._until.values():
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        self._until.clear()

    async def _write(self, fn: Callable[[Tx], Written[T]], batch: Batch[Tx] | None = None) -> T:
        def publish(outcome: Written[T]) -> None:
            if outcome[1]:
                self._committed_here(outcome[1])

        value, pending = await self._db.write(fn, after_commit=publish, batch=batch)
        if pending:
            await self._until_published(pending[-1].event.seq)
        return value

    # -- writes ---------------------------------------------------------------------------

    async def create_task(
        self,
        task: TaskRecord,
        *,
        max_open: int | None = None,
        parent_check: Callable[[TaskRecord], None] | None = None,
    ) -> tuple[TaskRecord, bool]:
        creator_lock = _lock_key(self.schema, "creator", task.created_by)

        def create(tx: Tx) -> Written[tuple[TaskRecord, bool]]:
            if task.parent_id:
                return self._create_child(tx, task, max_open, parent_check, creator_lock)
            conn = tx.conn
            new = replace(task, root_id=task.id)
            event = _pending(0, new, EventType.CREATED, new.created_by)
            # One create per creator at a time across daemons: the idempotency
            # check and the cap count hold until this one commits. The lock, then
            # one statement that checks and inserts (its snapshot is taken once
            # the lock is held), are sent together: one round trip.
            locked = conn.execute(tx.advisory_sql(), (creator_lock,))
            guarded = conn.execute(
                _GUARDED_INSERT[tx.waits],
                {
                    **{
                        f"v{i}": value
                        for i, value in enumerate(task_values(replace(task, root_id=task.id)))
                    },
                    "by": task.created_by,
                    "key": task.idempotency_key,
                    "max": max_open,
                    "lock": creator_lock,
                    "pending": task.status is Status.PENDING,
                    "labels": list(task.labels),
                    "shard": self._shard,
                    "ty": int(EventType.CREATED),
                    "at": event.event.at,
                    "att": event.event.task.attempt,
                    "state": event.state,
                    "channel": self.events_channel,
                },
            )
            row = tx.fetched(guarded.fetchone)
            tx.got_advisory(locked)
            assert row is not None
            rowid, open_count, seq, original_row = row[0], int(row[1]), row[2], row[4:]
            if original_row[0] is not None:
                return (repeat_of(task_from_row(original_row[1:]), task), False), []
            if max_open is not None:
                check_open_count(task.created_by, open_count, max_open)
            if rowid is None:
                # Neither the key nor the cap: a conflict the lock did not cover
                # (taken inside the statement, not before it). Alone it waits.
                if tx.waits:
                    raise AlreadyExists(f"task id {task.id} is taken; retry")
                raise Contended("the creator's lock was taken during the insert")
            event.rowid = int(rowid)
            if seq is not None:  # numbered by the statement: `take_seq` passes it over
                event.event = replace(event.event, seq=int(seq))
            return (new, True), [event]

        batch = None
        if not task.parent_id:
            # By creator, as on SQLite: one at its cap or retrying a create sends
            # only its own set one by one.
            batch = Batch((_CREATE_MANY, task.created_by), (task, max_open), self._create_many)
        return await self._write(create, batch)

    def _create_many(
        self, tx: Tx, items: list[tuple[TaskRecord, int | None]]
    ) -> list[Written[tuple[TaskRecord, bool]]]:
        """Creates several tasks without a parent in two statements: the
        creators' locks, then one guarded insert of them all. `Contended` (the
        set then runs one by one) if a lock is held elsewhere, a creator's cap
        would be passed or an idempotency key was used before."""
        conn = tx.conn
        tasks = [replace(task, root_id=task.id) for task, _ in items]
        creators = sorted({task.created_by for task in tasks})
        locked = conn.execute(
            "SELECT bool_and(pg_try_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k",
            ([_lock_key(self.schema, "creator", creator) for creator in creators],),
        )
        columns = list(zip(*(task_values(task) for task in tasks), strict=True))
        params: dict[str, Any] = {f"c{i}": list(column) for i, column in enumerate(columns)}
        params |= {
            "max": [max_open for _, max_open in items],
            "pending": [task.status is Status.PENDING for task in tasks],
            "shard": self._shard,
        }
        rows = tx.fetched(conn.execute(_INSERT_MANY, params).fetchall)
        row = tx.fetched(locked.fetchone)
        if row is None or not row[0]:
            raise Contended("a creator's lock is held by another transaction")
        if len(rows) != len(tasks):
            raise Contended("a cap, a key used before, or a taken id: one by one")
        rowids = {str(task_id): int(rowid) for task_id, rowid in rows}
        return [
            (
                (task, True),
                [_pending(rowids[task.id], task, EventType.CREATED, task.created_by)],
            )
            for task in tasks
        ]

    def _create_child(
        self,
        tx: Tx,
        task: TaskRecord,
        max_open: int | None,
        parent_check: Callable[[TaskRecord], None] | None,
        creator_lock: int,
    ) -> Written[tuple[TaskRecord, bool]]:
        """A create under a parent: the parent's row decides the child's root and depth."""
        conn = tx.conn
        # As in `create_task`, and the parent FOR SHARE: a cancel of the parent's
        # tree (which locks it for update) waits for this child, and then sees it.
        locked = conn.execute(tx.advisory_sql(), (creator_lock,))
        same_key = (
            conn.execute(
                f"{_SELECT_TASK} WHERE created_by = %s AND idempotency_key = %s",
                (task.created_by, task.idempotency_key),
            )
            if task.idempotency_key
            else None
        )
        open_tasks = (
            conn.execute(
                "SELECT COALESCE(sum(n), 0) FROM open_counts WHERE created_by = %s",
                (task.created_by,),
            )
            if max_open is not None
            else None
        )
        parent_row = conn.execute(
            f"{_SELECT_TASK} WHERE id = %s FOR SHARE{tx.nowait}", (task.parent_id,)
        )
        tx.got_advisory(locked)
        if same_key is not None:
            row = tx.fetched(same_key.fetchone)
            if row is not None:
                return (repeat_of(task_from_row(row[1:]), task), False), []
        if open_tasks is not None and max_open is not None:
            row = tx.fetched(open_tasks.fetchone)
            check_open_count(task.created_by, 0 if row is None else int(row[0]), max_open)
        row = tx.fetched(parent_row.fetchone)
        if row is None:
            raise NotFound(access.parent_not_found(task.parent_id))
        parent = task_from_row(row[1:])
        if parent_check is not None:
            parent_check(parent)
        if parent.depth + 1 > MAX_DEPTH:
            raise InvalidArgument(
                f"parent_id {parent.id} is at depth {parent.depth}: delegation chains "
                f"are at most {MAX_DEPTH} levels below their root"
            )
        new = replace(task, root_id=parent.root_id, depth=parent.depth + 1)
        rowid = _insert_task(conn, new, self._shard)
        return (new, True), [_pending(rowid, new, EventType.CREATED, new.created_by)]

    async def update(self, task_id: str, decide: Decide, *, actor: str) -> TaskRecord:
        def update(tx: Tx) -> Written[TaskRecord]:
            loaded = _lock(tx, "id = %s", (task_id,))
            if loaded is None:
                raise NotFound(f"task {task_id!r} not found")
            return _apply(
                tx.conn, *loaded, decide, actor, self._shard, due_channel=self.events_channel
            )

        return await self._write(update)

    async def update_tree(
        self, task_id: str, decide: Decide, decide_descendant: Decide, *, actor: str
    ) -> TaskRecord:
        def update(tx: Tx) -> Written[TaskRecord]:
            loaded = _lock(tx, "id = %s", (task_id,))
            if loaded is None:
                raise NotFound(f"task {task_id!r} not found")
            task, pending = _apply(tx.conn, *loaded, decide, actor, self._shard)
            rows = tx.locked_all(
                "WITH RECURSIVE tree(id) AS (SELECT id FROM tasks WHERE parent_id = %s "
                "AND parent_id != '' UNION ALL SELECT t.id FROM tasks t JOIN tree "
                "ON t.parent_id = tree.id AND t.parent_id != '') "
                f"{_SELECT_TASK} WHERE id IN (SELECT id FROM tree) ORDER BY rowid "
                f"FOR NO KEY UPDATE{tx.nowait}",
                (task_id,),
            )
            for row in rows:
                pending.extend(
                    _apply(
                        tx.conn,
                        row[0],
                        task_from_row(row[1:]),
                        decide_descendant,
                        actor,
                        self._shard,
                    )[1]
                )
            return task, pending

        return await self._write(update)

    async def claim_next(
        self, labels: Sequence[str], decide: Decide, *, actor: str
    ) -> TaskRecord | None:
        def claim(tx: Tx) -> Written[TaskRecord | None]:
            # SKIP LOCKED: a task another daemon is taking right now is passed
            # over, not waited for. `status = 1` on the task row is what a
            # concurrent commit is re-checked against.
            row = tx.conn.execute(
                _CLAIM_ONE if len(labels) == 1 else _CLAIM_NEAR,
                (labels[0] if len(labels) == 1 else list(labels),),
            ).fetchone()
            if row is None and len(labels) > 1:
                # Every candidate near the head of the labels was being taken
                # elsewhere: look further, however far that is.
                row = tx.conn.execute(_CLAIM_ANY, (list(labels),)).fetchone()
            if row is None:
                return None, []
            return _apply(tx.conn, row[0], task_from_row(row[1:]), decide, actor, self._shard)

        return await self._write(claim)

    async def expire_due(self, now: int, decide: Decide, *, actor: str) -> int:
        def expire(tx: Tx) -> Written[int]:
            rows = tx.conn.execute(
                f"{_SELECT_TASK} WHERE (status = 2 AND lease_expires_at <= %(now)s) "
                "OR (deadline <= %(now)s AND deadline IS NOT NULL AND status IN (1, 2, 6)) "
                "LIMIT %(batch)s FOR NO KEY UPDATE SKIP LOCKED",
                {"now": now, "batch": EXPIRE_BATCH},
            ).fetchall()
            pending: list[_Pending] = []
            for row in rows:
                pending.extend(
                    _apply(tx.conn, row[0], task_from_row(row[1:]), decide, actor, self._shard)[1]
                )
            return len(pending), pending

        return await self._write(expire)

    # -- reads ----------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def get(conn: psycopg.Connection[Any]) -> TaskRecord | None:
            row = conn.execute(f"{_SELECT_TASK} WHERE id = %s", (task_id,)).fetchone()
            return None if row is None else task_from_row(row[1:])

        return await self._db.read(get)

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        sql, params = list_sql(query)

        def list_page(conn: psycopg.Connection[Any]) -> TaskPage:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                row = conn.execute("SELECT last FROM seq_counter").fetchone()
                assert row is not None
                tasks, next_position = _page_within(conn, sql, params, query.limit, query.max_bytes)
            return TaskPage(tasks=tasks, next_position=next_position, cursor=int(row[0]))

        return await self._db.read(list_page)

    async def events_after(
        self,
        after_seq: int,
        *,
        labels: Sequence[str],
        task_ids: Sequence[str],
        limit: int,
        max_bytes: int,
    ) -> tuple[list[Event], bool]:
        of_ids = "e.task_rowid IN (SELECT rowid FROM tasks WHERE id = ANY(%s))"
        of_labels = (
            "EXISTS (SELECT 1 FROM task_labels l WHERE l.task_rowid = e.task_rowid "
            "AND l.label = ANY(%s))"
        )
        params: list[Any]
        if labels and task_ids:
            match, params = f"({of_labels} OR {of_ids})", [list(labels), list(task_ids)]
        elif labels:
            match, params = of_labels, [list(labels)]
        elif task_ids:
            match, params = of_ids, [list(task_ids)]
        else:  # every task: the caller's view is applied to what this returns
            match, params = "true", []
        return await self._db.read(
            lambda conn: _read_events(
                conn, f"e.seq > %s AND {match}", [after_seq, *params], limit, max_bytes
            )
        )

    async def task_events(
        self, task_id: str, *, after_seq: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], bool]:
        return await self._db.read(
            lambda conn: _read_events(
                conn,
                "e.task_rowid = (SELECT rowid FROM tasks WHERE id = %s) AND e.seq > %s",
                [task_id, after_seq],
                limit,
                max_bytes,
            )
        )

    async def held_by(self, agent: str) -> list[str]:
        def read(conn: psycopg.Connection[Any]) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM tasks WHERE claimed_by = %s AND claimed_by != '' "
                "AND status IN (2, 6) ORDER BY rowid",
                (agent,),
            )
            return [task_id for (task_id,) in rows]

        return await self._db.read(read)

    async def cursor(self) -> int:
        def read(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT last FROM seq_counter").fetchone()
            assert row is not None
            return int(row[0])

        return await self._db.read(read)

    async def next_due(self) -> int | None:
        def read(conn: psycopg.Connection[Any]) -> int | None:
            row = conn.execute(
                "SELECT MIN(due) FROM ("
                "SELECT MIN(lease_expires_at) AS due FROM tasks WHERE status = 2 "
                "UNION ALL SELECT MIN(deadline) FROM tasks "
                "WHERE deadline IS NOT NULL AND status IN (1, 2, 6)) due"
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._db.read(read)

    async def task_output(self, task: TaskRecord) -> str:
        """The output of the task's current attempt as `task` was read, up to its
        `output_size`."""

        def read(conn: psycopg.Connection[Any]) -> str:
            # The attempt's own chunks, by the output index: earlier attempts'
            # output is never read.
            rows = conn.execute(
                "SELECT state FROM events WHERE task_rowid = "
                "(SELECT rowid FROM tasks WHERE id = %s) AND type = 8 AND attempt = %s "
                "ORDER BY seq",
                (task.id, task.attempt),
            )
            text = "".join(json.loads(state)["chunk"][1] for (state,) in rows)
            # A second read: chunks committed since the task was read come after
            # its output_size bytes and are cut off, so output and size agree.
            data = text.encode("utf-8", "surrogatepass")
            if len(data) <= task.output_size:
                return text
            return data[: task.output_size].decode("utf-8", "surrogatepass")

        return await self._db.read(read)

    async def subtree(
        self,
        task_id: str,
        *,
        visible_to: AgentRecord | None = None,
        after_position: int = 0,
        limit: int = limits.DEFAULT_PAGE_SIZE,
        max_bytes: int = limits.PAGE_BUDGET_BYTES,
    ) -> tuple[list[TaskRecord], int | None]:
        sql, params = subtree_sql(task_id, visible_to, after_position, limit)

        def read(conn: psycopg.Connection[Any]) -> tuple[list[TaskRecord], int | None]:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return _page_within(conn, sql, params, limit, max_bytes)

        return await self._db.read(read)


# -- the SQL of writes ---------------------------------------------------------------------


def _lock(tx: Tx, where: str, params: tuple[Any, ...]) -> tuple[int, TaskRecord] | None:
    row = tx.locked_one(f"{_SELECT_TASK} WHERE {where} FOR NO KEY UPDATE{tx.nowait}", params)
    return None if row is None else (row[0], task_from_row(row[1:]))


def _insert_task(conn: psycopg.Connection[Any], task: TaskRecord, shard: int) -> int:
    """Inserts the task, its label rows, and counts it open: one statement."""
    row = conn.execute(
        f"WITH t AS (INSERT INTO tasks ({TASK_COLUMNS}) VALUES "
        f"({', '.join(['%s'] * 27)}) RETURNING rowid), "
        "l AS (INSERT INTO task_labels (label, task_rowid, pending) "
        "SELECT label, t.rowid, %s FROM t, unnest(%s::text[]) AS label), "
        "o AS (INSERT INTO open_counts (created_by, shard, n) VALUES (%s, %s, 1) "
        "ON CONFLICT (created_by, shard) DO UPDATE SET n = open_counts.n + 1) "
        "SELECT rowid FROM t",
        (
            *task_values(task),
            task.status is Status.PENDING,
            list(task.labels),
            task.created_by,
            shard,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _pending(
    rowid: int,
    task: TaskRecord,
    event_type: EventType,
    actor: str,
    chunk: OutputChunk | None = None,
) -> _Pending:
    carried = slim(task, event_type)
    event = Event(
        seq=0, type=event_type, task=carried, actor=actor, at=task.updated_at, chunk=chunk
    )
    return _Pending(rowid, event, state_json(carried, chunk))


def _count_open(conn: psycopg.Connection[Any], creator: str, shard: int, delta: int) -> None:
    conn.execute(
        "INSERT INTO open_counts (created_by, shard, n) VALUES (%s, %s, %s) "
        "ON CONFLICT (created_by, shard) DO UPDATE SET n = open_counts.n + excluded.n",
        (creator, shard, delta),
    )


def _apply(
    conn: psycopg.Connection[Any],
    rowid: int,
    task: TaskRecord,
    decide: Decide,
    actor: str,
    shard: int,
    *,
    due_channel: str = "",
) -> Written[TaskRecord]:
    change = decide(task)
    if change is None:
        return task, []
    new = change.task
    if change.type is None:  # a heartbeat: only the lease moves
        conn.execute(
            "UPDATE tasks SET lease_expires_at = %s, lease_us = %s WHERE rowid = %s",
            (new.lease_expires_at, new.lease_us, rowid),
        )
        shortened = (
            new.lease_expires_at is not None
            and task.lease_expires_at is not None
            and new.lease_expires_at < task.lease_expires_at
        )
        if due_channel and shortened:
            # No event tells the other daemons' lease timers, which were set for
            # the lease's old end: should this daemon die, they must end it on time.
            conn.execute(
                "SELECT pg_notify(%s, %s)", (due_channel, f"{DUE_PREFIX}{new.lease_expires_at}")
            )
        return new, []
    conn.execute(
        "UPDATE tasks SET status = %s, result = %s, error = %s, claimed_by = %s, attempt = %s, "
        "version = %s, updated_at = %s, lease_token = %s, lease_expires_at = %s, lease_us = %s, "
        "output_size = %s, question = %s, answer = %s, released = %s WHERE rowid = %s",
        (
            int(new.status), new.result, new.error, new.claimed_by, new.attempt, new.version,
            new.updated_at, new.lease_token, new.lease_expires_at, new.lease_us,
            new.output_size, new.question, new.answer, new.released, rowid,
        ),
    )  # fmt: skip
    was_pending, is_pending = task.status is Status.PENDING, new.status is Status.PENDING
    if was_pending != is_pending:
        conn.execute(
            "UPDATE task_labels SET pending = %s WHERE task_rowid = %s AND label = ANY(%s)",
            (is_pending, rowid, list(new.labels)),
        )
    if task.status in OPEN and new.status not in OPEN:
        _count_open(conn, new.created_by, shard, -1)
    return new, [_pending(rowid, new, change.type, actor, change.chunk)]


# -- the SQL of reads ----------------------------------------------------------------------


def _read_events(
    conn: psycopg.Connection[Any], where: str, params: list[Any], limit: int, max_bytes: int
) -> tuple[list[Event], bool]:
    """At most `limit` events matching `where`, in seq order, whose sizes add up to
    at most `max_bytes` (at least one), and whether more follow.

    One statement (one snapshot, one round trip): the seqs and sizes of the
    candidates first, then the rows of those that fit, so no blob past the
    budget is ever fetched.
    """
    # Each task joined by a LATERAL lookup of its primary key (LIMIT 1 keeps the
    # planner from flattening it): statistics that lag behind a table growing
    # from empty would otherwise make it hash-join the whole of `tasks`.
    rows = conn.execute(
        f"WITH c AS MATERIALIZED (SELECT e.seq, {_EVENT_SIZE} AS size FROM events e "
        "CROSS JOIN LATERAL (SELECT t.content, t.context, t.result FROM tasks t "
        f"WHERE t.rowid = e.task_rowid LIMIT 1) t WHERE {where} ORDER BY e.seq LIMIT %s), "
        "r AS MATERIALIZED (SELECT seq, sum(size) OVER (ORDER BY seq) AS running, "
        "row_number() OVER (ORDER BY seq) AS n FROM c) "
        "SELECT (SELECT count(*) FROM c), x.* FROM r CROSS JOIN LATERAL ("
        f"{_SELECT_EVENT} WHERE e.seq = r.seq LIMIT 1) x "
        "WHERE (r.n = 1 OR r.running <= %s) AND r.n <= %s ORDER BY r.seq",
        [*params, limit + 1, max_bytes, limit],
    ).fetchall()
    if not rows:
        return [], False
    candidates = int(rows[0][0])
    return [event_from_row(row[1:]) for row in rows], candidates > len(rows)


def _events_after(after: int, conn: psycopg.Connection[Any]) -> tuple[list[Event], bool]:
    """Every event after `after`: what a daemon publishes next."""
    return _read_events(conn, "e.seq > %s", [after], CATCH_UP_BATCH, CATCH_UP_BYTES)


def _fitting(sizes: Sequence[Sequence[Any]], limit: int, max_bytes: int) -> tuple[list[int], bool]:
    chosen: list[int] = []
    total = 0
    for key, size in sizes:
        if len(chosen) == limit:
            return chosen, True
        total += int(size)
        if chosen and total > max_bytes:
            return chosen, True
        chosen.append(int(key))
    return chosen, False


def _task_size(lengths: int, labels: str) -> int:
    """`model.task_size` (no output) from a task's summed lengths (`_TASK_SIZES`)."""
    label_bytes = sum(utf8_size(label) + FIELD_OVERHEAD for label in json.loads(labels))
    # Ten texts (the output among them, empty here) and two blobs, each framed.
    return TASK_OVERHEAD + lengths + 10 * FIELD_OVERHEAD + label_bytes + 2 * FIELD_OVERHEAD


def _page_within(
    conn: psycopg.Connection[Any], sql: str, params: list[Any], limit: int, max_bytes: int
) -> tuple[list[TaskRecord], int | None]:
    """At most `limit` tasks of a listing query (rowid, size columns of `_TASK_SIZES`,
    at most `limit + 1` rows) whose sizes add up to at most `max_bytes` (at least
    one), and the rowid of the last when more follow. Call inside a transaction."""
    sizes = [
        (rowid, _task_size(int(lengths), labels))
        for rowid, lengths, labels in conn.execute(sql, params).fetchall()
    ]
    chosen, more = _fitting(sizes, limit, max_bytes)
    if not chosen:
        return [], None
    rows = conn.execute(f"{_SELECT_TASK} WHERE rowid = ANY(%s) ORDER BY rowid", (chosen,))
    tasks = [task_from_row(row[1:]) for row in rows]
    return tasks, chosen[-1] if more else None


def _sees(agent: AgentRecord) -> tuple[str, list[Any]]:
    """`access.sees` for a row of `tasks`, as SQL."""
    sql = (
        "(tasks.created_by = %s OR tasks.claimed_by = %s OR EXISTS (SELECT 1 FROM "
        "task_labels v WHERE v.task_rowid = tasks.rowid AND v.label = ANY(%s)))"
    )
    return sql, [agent.name, agent.name, list(agent.labels)]


def _visible_rowids(agent: AgentRecord, query: TaskQuery) -> tuple[str, list[Any]]:
    """The rowids of the first tasks after `query.after_position` that `agent`
    sees: one index range per reason to see a task, each cut at the page size,
    merged. Its cost follows what the agent sees, not the history."""
    statuses = [int(s) for s in query.statuses]
    on_status = " AND tasks.status = ANY(%s)" if statuses else ""
    status_params: list[Any] = [statuses] if statuses else []
    after, cut = query.after_position, query.limit + 1
    arms: list[tuple[str, list[Any]]] = [
        (
            f"SELECT tasks.rowid FROM tasks WHERE tasks.created_by = %s AND tasks.rowid > %s"
            f"{on_status} ORDER BY tasks.rowid LIMIT %s",
            [agent.name, after, *status_params, cut],
        ),
        (
            "SELECT tasks.rowid FROM tasks WHERE tasks.claimed_by = %s "
            f"AND tasks.claimed_by != '' AND tasks.rowid > %s{on_status} "
            "ORDER BY tasks.rowid LIMIT %s",
            [agent.name, after, *status_params, cut],
        ),
    ]
    only_pending = set(query.statuses) == {Status.PENDING}
    for label in agent.labels:
        if only_pending:
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l WHERE l.label = %s AND l.pending "
                    "AND l.task_rowid > %s ORDER BY l.task_rowid LIMIT %s",
                    [label, after, cut],
                )
            )
        elif statuses:
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l JOIN tasks ON tasks.rowid = "
                    f"l.task_rowid WHERE l.label = %s AND l.task_rowid > %s{on_status} "
                    "ORDER BY l.task_rowid LIMIT %s",
                    [label, after, *status_params, cut],
                )
            )
        else:
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l WHERE l.label = %s "
                    "AND l.task_rowid > %s ORDER BY l.task_rowid LIMIT %s",
                    [label, after, cut],
                )
            )
    sql = " UNION ".join(f"({arm})" for arm, _ in arms) + " ORDER BY 1 LIMIT %s"
    return sql, [*(p for _, arm_params in arms for p in arm_params), cut]


def list_sql(query: TaskQuery) -> tuple[str, list[Any]]:
    """The SELECT of a listing page's sizes (`_TASK_SIZES`) in rowid order, at
    most `query.limit + 1` rows."""
    if not query.labels and not query.parent_id and query.visible_to is not None:
        visible, params = _visible_rowids(query.visible_to, query)
        return (
            f"SELECT {_TASK_SIZES} FROM tasks WHERE tasks.rowid IN ({visible}) "
            "ORDER BY tasks.rowid",
            params,
        )
    where: list[str] = ["tasks.rowid > %s"]
    params = [query.after_position]
    if query.labels:
        only_pending = set(query.statuses) == {Status.PENDING}
        pending = " AND l.pending" if only_pending else ""
        where.append(
            "tasks.rowid IN (SELECT l.task_rowid FROM task_labels l WHERE l.label = ANY(%s) "
            f"AND l.task_rowid > %s{pending})"
        )
        params.extend([list(query.labels), query.after_position])
    if query.parent_id:
        where.append("tasks.parent_id = %s AND tasks.parent_id != ''")
        params.append(query.parent_id)
    if query.statuses:
        where.append("tasks.status = ANY(%s)")
        params.append([int(s) for s in query.statuses])
    if query.visible_to is not None:
        sees, sees_params = _sees(query.visible_to)
        where.append(sees)
        params.extend(sees_params)
    params.append(query.limit + 1)
    return (
        f"SELECT {_TASK_SIZES} FROM tasks WHERE {' AND '.join(where)} "
        "ORDER BY tasks.rowid LIMIT %s",
        params,
    )


def subtree_sql(
    task_id: str, visible_to: AgentRecord | None, after_position: int, limit: int
) -> tuple[str, list[Any]]:
    """The SELECT of a subtree page's sizes (`_TASK_SIZES`) in rowid order, at
    most `limit + 1` rows."""
    where, params = ["tasks.rowid > %s"], [task_id, after_position]
    if visible_to is not None:
        sees, sees_params = _sees(visible_to)
        where.append(sees)
        params.extend(sees_params)
    return (
        "WITH RECURSIVE tree(rowid, id) AS (SELECT rowid, id FROM tasks WHERE id = %s "
        "UNION ALL SELECT t.rowid, t.id FROM tree JOIN tasks t "
        "ON t.parent_id = tree.id AND t.parent_id != '') "
        f"SELECT {_TASK_SIZES} FROM tasks "
        f"WHERE tasks.rowid IN (SELECT rowid FROM tree) AND {' AND '.join(where)} "
        "ORDER BY tasks.rowid LIMIT %s",
        [*params, limit + 1],
    )


# -- agents -----------------------------------------------------------------------------------

_AGENT_RETURNING = f"RETURNING {AGENT_COLUMNS}, version"


def _agent_values(agent: AgentRecord) -> tuple[Any, ...]:
    return (
        agent.name, json.dumps(list(agent.labels)), int(agent.role), agent.created_at,
        agent.key_id, agent.key_hash, agent.last_seen_at, int(agent.revoked),
    )  # fmt: skip


class PostgresAgentStore:
    """The `agents` table on the shared database (`store.AgentStore`).

    Other daemons change agents too: each change bumps `version` and
    NOTIFYs; `on_changed` gets every agent whose stored version is at least
    the one this daemon last saw, after its own changes (with the row as
    committed, before `applied`) and after every re-read.
    """

    def __init__(self, store: PostgresStore):
        self._db = store._db
        self._channel = store.agents_channel
        self.on_changed: Callable[[AgentRecord], None] = lambda agent: None
        self._versions: dict[str, int] = {}
        self._synced_at = time.monotonic()
        self._refreshing: asyncio.Task[None] | None = None
        self._again = False
        self._periodic: asyncio.Task[None] | None = None
        # How many re-reads ran (a test waits on it).
        self.refreshes = 0

    def fresh(self) -> bool:
        return time.monotonic() - self._synced_at < AGENT_STALE_S

    async def load(self) -> None:
        """Reads every agent once, before the daemon serves."""
        await self._refresh_once(announce=False)

    def start(self) -> None:
        self._periodic = asyncio.get_running_loop().create_task(
            self._recheck(), name="legato-pg-agents"
        )

    async def stop(self) -> None:
        for task in (self._periodic, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._refreshing = None

    def poke(self) -> None:
        """Re-reads the agents soon (another daemon changed one)."""
        if self._refreshing is not None:
            self._again = True
            return
        self._refreshing = asyncio.get_running_loop().create_task(
            self._refresh(), name="legato-pg-agents-refresh"
        )

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(AGENT_RECHECK_S)
            self.poke()

    async def _refresh(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._refresh_once(announce=True)
                except Exception as exc:
                    log.warning("re-reading the agents failed: %s", exc)
                if not self._again:
                    return
        finally:
            self._refreshing = None

    async def _refresh_once(self, *, announce: bool) -> None:
        started = time.monotonic()

        def read(conn: psycopg.Connection[Any]) -> list[tuple[AgentRecord, int]]:
            rows = conn.execute(
                f"SELECT {AGENT_COLUMNS}, version FROM agents ORDER BY created_at, name"
            ).fetchall()
            return [(agent_from_row(row), int(row[8])) for row in rows]

        for agent, version in await self._db.read(read):
            if version >= self._versions.get(agent.name, 0):
                self._versions[agent.name] = version
                if announce:
                    self.on_changed(agent)
        self._synced_at = max(self._synced_at, started)
        self.refreshes += 1

    async def by_key_id(self, key_id: str) -> AgentRecord | None:
        def read(conn: psycopg.Connection[Any]) -> tuple[AgentRecord, int] | None:
            row = conn.execute(
                f"SELECT {AGENT_COLUMNS}, version FROM agents WHERE key_id = %s", (key_id,)
            ).fetchone()
            return None if row is None else (agent_from_row(row), int(row[8]))

        found = await self._db.read(read)
        if found is None:
            return None
        agent, version = found
        if version < self._versions.get(agent.name, 0):
            return None  # memory is newer than this read
        self._versions[agent.name] = version
        return agent

    async def all(self) -> list[AgentRecord]:
        def read(conn: psycopg.Connection[Any]) -> list[AgentRecord]:
            rows = conn.execute(
                f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at, name"
            ).fetchall()
            return [agent_from_row(row) for row in rows]

        return await self._db.read(read)

    def _stored(self, row: Sequence[Any] | None, applied: Callable[[], object]) -> None:
        if row is None:
            return
        agent, version = agent_from_row(row), int(row[8])
        if version >= self._versions.get(agent.name, 0):
            self._versions[agent.name] = version
            self.on_changed(agent)
        applied()

    def _notify(self, conn: psycopg.Connection[Any], name: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, name))

    async def insert(self, agent: AgentRecord, *, applied: Callable[[], object]) -> None:
        def insert(tx: Tx) -> Written[Sequence[Any] | None]:
            row = tx.conn.execute(
                f"INSERT INTO agents ({AGENT_COLUMNS}) VALUES "
                f"(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING {_AGENT_RETURNING}",
                _agent_values(agent),
            ).fetchone()
            if row is None:
                raise AlreadyExists(
                    f"an agent named {agent.name!r} already exists (names are never reused, "
                    "even after revocation); choose another name"
                )
            self._notify(tx.conn, agent.name)
            return row, []

        await self._db.write(insert, after_commit=lambda out: self._stored(out[0], applied))

    async def set_key(
        self, name: str, key_id: str, key_hash: str, *, applied: Callable[[], object]
    ) -> bool:
        return await self._update_live(
            name, "key_id = %s, key_hash = %s", (key_id, key_hash), applied
        )

    async def set_labels_role(
        self,
        name: str,
        *,
        labels: Sequence[str] | None,
        role: Role | None,
        applied: Callable[[], object],
    ) -> bool:
        return await self._update_live(
            name,
            "labels = COALESCE(%s::text, labels), role = COALESCE(%s::integer, role)",
            (
                None if labels is None else json.dumps(list(labels)),
                None if role is None else int(role),
            ),
            applied,
        )

    async def revoke(self, name: str, *, applied: Callable[[], object]) -> bool:
        return await self._update_live(name, "revoked = 1", (), applied)

    async def reinstate_admin(self, name: str, *, applied: Callable[[], object]) -> None:
        await self._update(
            name, "revoked = 0, role = %s", (int(Role.ADMIN),), applied, live_only=False
        )

    async def touch_last_seen(self, name: str, at: int) -> None:
        def touch(tx: Tx) -> Written[None]:
            # Bookkeeping, not a change other daemons must hear of: no version, no NOTIFY.
            tx.conn.execute(
                "UPDATE agents SET last_seen_at = %s "
                "WHERE name = %s AND (last_seen_at IS NULL OR last_seen_at < %s)",
                (at, name, at),
            )
            return None, []

        await self._db.write(touch)

    async def _update_live(
        self, name: str, assignments: str, params: tuple[Any, ...], applied: Callable[[], object]
    ) -> bool:
        return await self._update(name, assignments, params, applied, live_only=True)

    async def _update(
        self,
        name: str,
        assignments: str,
        params: tuple[Any, ...],
        applied: Callable[[], object],
        *,
        live_only: bool,
    ) -> bool:
        live = " AND revoked = 0" if live_only else ""

        def update(tx: Tx) -> Written[Sequence[Any] | None]:
            row = tx.conn.execute(
                f"UPDATE agents SET {assignments}, version = version + 1 "
                f"WHERE name = %s{live} {_AGENT_RETURNING}",
                (*params, name),
            ).fetchone()
            if row is not None:
                self._notify(tx.conn, name)
            return row, []

        row, _ = await self._db.write(
            update, after_commit=lambda out: self._stored(out[0], applied)
        )
        return row is not None
