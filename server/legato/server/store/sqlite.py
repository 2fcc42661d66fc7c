"""The SQLite backend: one database file in the data dir, written by one thread.

Tasks live in `tasks`; their labels in `task_labels`, where `pending = 1` marks
the rows of tasks waiting to be claimed (a partial index makes "oldest pending
task with one of these labels" an index seek however long the history). Each
change appends one row to `events`, whose `seq` is the watch cursor: one
writer thread commits (`db.Database`), so AUTOINCREMENT order is commit order.

Rows are kept as `rows` describes. The state rules are not here: callers pass
a `decide` function (see `lifecycle`) that runs inside the write transaction on
the task as stored.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from legato.server import access, limits
from legato.server.db import Database
from legato.server.errors import AlreadyExists, InvalidArgument, NotFound
from legato.server.model import (
    AgentRecord,
    Clock,
    Event,
    EventType,
    OutputChunk,
    Role,
    Status,
    TaskRecord,
    slim,
    system_clock,
    task_size,
)
from legato.server.store import (
    MAX_DEPTH,
    DatabaseFailed,
    Decide,
    Durability,
    TaskPage,
    TaskQuery,
)
from legato.server.store.rows import (
    AGENT_COLUMNS,
    TASK_COLUMNS,
    agent_from_row,
    agent_row,
    check_open_count,
    event_columns,
    events_within,
    prefixed,
    repeat_of,
    state_json,
    task_from_row,
    task_values,
)
from legato.server.store.supervision import Batch, BatchDeclined

T = TypeVar("T")

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    rowid            INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    content          TEXT    NOT NULL,
    labels           TEXT    NOT NULL,
    context          BLOB    NOT NULL,
    created_by       TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    parent_id        TEXT    NOT NULL,
    root_id          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    status           INTEGER NOT NULL,
    result           BLOB    NOT NULL,
    error            TEXT    NOT NULL,
    claimed_by       TEXT    NOT NULL,
    attempt          INTEGER NOT NULL,
    version          INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    lease_token      TEXT    NOT NULL,
    lease_expires_at INTEGER,
    lease_us         INTEGER NOT NULL,
    depth            INTEGER NOT NULL,
    deadline         INTEGER,
    output_size      INTEGER NOT NULL,
    question         TEXT    NOT NULL,
    answer           TEXT    NOT NULL,
    released         INTEGER NOT NULL DEFAULT 0,
    claim_seq        INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (created_by, idempotency_key) WHERE idempotency_key != '';
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (lease_expires_at) WHERE status = 2;
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks (parent_id) WHERE parent_id != '';
-- What an agent sees, besides its labels' tasks (task_labels): the tasks it
-- created and those it claimed, each in rowid order within a name, so its
-- listing is a merge of index ranges, not a walk of the whole history.
CREATE INDEX IF NOT EXISTS tasks_created_by ON tasks (created_by);
CREATE INDEX IF NOT EXISTS tasks_claimed_by ON tasks (claimed_by) WHERE claimed_by != '';
CREATE INDEX IF NOT EXISTS tasks_deadline
    ON tasks (deadline) WHERE deadline IS NOT NULL AND status IN (1, 2, 6);

CREATE TABLE IF NOT EXISTS task_labels (
    label     TEXT    NOT NULL,
    task_rowid INTEGER NOT NULL REFERENCES tasks (rowid),
    pending   INTEGER NOT NULL,
    PRIMARY KEY (label, task_rowid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS task_labels_pending
    ON task_labels (label, task_rowid) WHERE pending = 1;

CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_rowid INTEGER NOT NULL REFERENCES tasks (rowid),
    type       INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    state      TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events (task_rowid, seq);

-- How many unfinished tasks each agent created, for the per-agent cap. Kept by
-- triggers in the same transaction as the change, so it is exact even when a
-- grouped write rolls back to its savepoint, and reading it costs one lookup.
CREATE TABLE IF NOT EXISTS open_tasks (
    created_by TEXT PRIMARY KEY,
    n          INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS open_tasks_on_insert AFTER INSERT ON tasks
WHEN NEW.status IN (1, 2, 6) BEGIN
    INSERT INTO open_tasks (created_by, n) VALUES (NEW.created_by, 1)
    ON CONFLICT (created_by) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS open_tasks_on_finish AFTER UPDATE OF status ON tasks
WHEN OLD.status IN (1, 2, 6) AND NEW.status NOT IN (1, 2, 6) BEGIN
    UPDATE open_tasks SET n = n - 1 WHERE created_by = NEW.created_by;
END;

CREATE TABLE IF NOT EXISTS agents (
    name         TEXT    PRIMARY KEY,
    labels       TEXT    NOT NULL,
    role         INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    key_id       TEXT    NOT NULL UNIQUE,
    key_hash     TEXT    NOT NULL,
    last_seen_at INTEGER,
    revoked      INTEGER NOT NULL
);
"""

_SELECT_TASK = f"SELECT rowid, {TASK_COLUMNS} FROM tasks"


def _in(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


class SqliteStore:
    """The task store on a SQLite file (`TaskStore`). Every method is one transaction."""

    def __init__(self, db: Database, *, clock: Clock = system_clock):
        self._db = db
        self._clock = clock
        # Called on the event loop with the events of each commit, in seq order.
        self.on_commit: Callable[[list[Event]], None] = lambda events: None
        # Never called: a local file has no connection to lose.
        self.on_writable: Callable[[bool], None] = lambda writable: None
        # Never called: this daemon's own heartbeats tell its lease timer.
        self.on_due: Callable[[int], None] = lambda when: None
        self._agents = SqliteAgentStore(self)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        durability: Durability = Durability.NORMAL,
    ) -> SqliteStore:
        """Opens (creating if needed) the database at `path`."""
        db = Database.open(path, durability=durability)
        try:
            await db.write(_migrate)
        except BaseException:
            await db.close()
            raise
        return cls(db)

    @property
    def path(self) -> Path:
        return self._db.path

    @property
    def agents(self) -> SqliteAgentStore:
        return self._agents

    @property
    def clock(self) -> Clock:
        # One daemon on one machine: its own clock is the only one.
        return self._clock

    @property
    def shared(self) -> bool:
        # The data dir's lock keeps any other daemon off this file.
        return False

    @property
    def description(self) -> str:
        return str(self.path)

    def start(self) -> None:
        """Nothing to start: each commit publishes its own events (see `_write`)."""

    async def close(self) -> None:
        await self._db.close()

    @property
    def failure(self) -> DatabaseFailed | None:
        """Why the database failed, or None while it has not (see `Database.failed`)."""
        return self._db.failure

    async def failed(self) -> DatabaseFailed:
        """Waits until the database fails and returns why."""
        return await self._db.failed()

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection], tuple[T, list[Event]]],
        batch: Batch[sqlite3.Connection] | None = None,
    ) -> T:
        def publish(outcome: tuple[T, list[Event]]) -> None:
            if outcome[1]:
                self.on_commit(outcome[1])

        value, _ = await self._db.write(fn, after_commit=publish, batch=batch)
        return value

    # -- writes -----------------------------------------------------------------

    async def create_task(
        self,
        task: TaskRecord,
        *,
        max_open: int | None = None,
        parent_check: Callable[[TaskRecord], None] | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Inserts `task`, or returns the original for a repeated idempotency key.

        Returns the stored task and whether it was created now. The parent must
        exist (and pass `parent_check`); the root is taken from it. With
        `max_open`, RESOURCE_EXHAUSTED if the creator already has that many
        pending or claimed tasks.
        """

        def create(conn: sqlite3.Connection) -> tuple[tuple[TaskRecord, bool], list[Event]]:
            if task.idempotency_key:
                row = conn.execute(
                    f"{_SELECT_TASK} WHERE created_by = ? AND idempotency_key = ?",
                    (task.created_by, task.idempotency_key),
                ).fetchone()
                if row is not None:
                    return (repeat_of(task_from_row(row[1:]), task), False), []
            if max_open is not None:
                row = conn.execute(
                    "SELECT n FROM open_tasks WHERE created_by = ?", (task.created_by,)
                ).fetchone()
                check_open_count(task.created_by, 0 if row is None else row[0], max_open)
            new = replace(task, root_id=task.id)
            if task.parent_id:
                loaded = _load(conn, "id = ?", (task.parent_id,))
                if loaded is None:
                    raise NotFound(access.parent_not_found(task.parent_id))
                parent = loaded[1]
                if parent_check is not None:
                    parent_check(parent)
                if parent.depth + 1 > MAX_DEPTH:
                    raise InvalidArgument(
                        f"parent_id {parent.id} is at depth {parent.depth}: delegation chains "
                        f"are at most {MAX_DEPTH} levels below their root"
                    )
                new = replace(task, root_id=parent.root_id, depth=parent.depth + 1)
            rowid = _insert_task(conn, new)
            return (new, True), [_append_event(conn, rowid, new, EventType.CREATED, new.created_by)]

        batch = None
        if not task.parent_id:
            # By creator: one at its cap or retrying a create sends only its own
            # set one by one.
            batch = Batch((_CREATE_MANY, task.created_by), (task, max_open), _create_many)
        return await self._write(create, batch)

    async def update(self, task_id: str, decide: Decide, *, actor: str) -> TaskRecord:
        """Applies `decide` to the stored task and records the change it returns.

        `decide` returning None leaves the task as it is. NOT_FOUND if no such task.
        """

        def update(conn: sqlite3.Connection) -> tuple[TaskRecord, list[Event]]:
            loaded = _load(conn, "id = ?", (task_id,))
            if loaded is None:
                raise NotFound(f"task {task_id!r} not found")
            return _apply(conn, *loaded, decide, actor)

        return await self._write(update)

    async def update_tree(
        self, task_id: str, decide: Decide, decide_descendant: Decide, *, actor: str
    ) -> TaskRecord:
        """`update` of one task and, in the same transaction, of each of its descendants."""

        def update(conn: sqlite3.Connection) -> tuple[TaskRecord, list[Event]]:
            loaded = _load(conn, "id = ?", (task_id,))
            if loaded is None:
                raise NotFound(f"task {task_id!r} not found")
            task, events = _apply(conn, *loaded, decide, actor)
            rows = conn.execute(
                "WITH RECURSIVE tree(id) AS (SELECT id FROM tasks WHERE parent_id = ? UNION ALL "
                "SELECT t.id FROM tasks t JOIN tree ON t.parent_id = tree.id) "
                f"{_SELECT_TASK} WHERE id IN (SELECT id FROM tree) ORDER BY rowid",
                (task_id,),
            ).fetchall()
            for row in rows:
                events.extend(
                    _apply(conn, row[0], task_from_row(row[1:]), decide_descendant, actor)[1]
                )
            return task, events

        return await self._write(update)

    async def claim_next(
        self, labels: Sequence[str], decide: Decide, *, actor: str
    ) -> TaskRecord | None:
        """Claims the oldest pending task carrying any of `labels`, if there is one."""

        def claim(conn: sqlite3.Connection) -> tuple[TaskRecord | None, list[Event]]:
            row = conn.execute(
                # Without INDEXED BY the planner may walk the primary key, i.e.
                # every task that ever had the label, instead of the pending ones.
                "SELECT task_rowid FROM task_labels INDEXED BY task_labels_pending "
                f"WHERE pending = 1 AND label IN ({_in(labels)}) ORDER BY task_rowid LIMIT 1",
                tuple(labels),
            ).fetchone()
            if row is None:
                return None, []
            loaded = _load(conn, "rowid = ?", (row[0],))
            assert loaded is not None  # task_labels rows always have their task
            return _apply(conn, *loaded, decide, actor)

        return await self._write(claim)

    async def expire_due(self, now: int, decide: Decide, *, actor: str) -> int:
        """Applies `decide` to every task whose lease ended or deadline passed by `now`."""

        def expire(conn: sqlite3.Connection) -> tuple[int, list[Event]]:
            rows = conn.execute(
                f"{_SELECT_TASK} INDEXED BY tasks_lease WHERE status = 2 AND lease_expires_at <= ? "
                f"UNION {_SELECT_TASK} INDEXED BY tasks_deadline "
                "WHERE deadline <= ? AND status IN (1, 2, 6)",
                (now, now),
            ).fetchall()
            events: list[Event] = []
            for row in rows:
                _, changed = _apply(conn, row[0], task_from_row(row[1:]), decide, actor)
                events.extend(changed)
            return len(events), events

        return await self._write(expire)

    # -- reads ------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def get(conn: sqlite3.Connection) -> TaskRecord | None:
            loaded = _load(conn, "id = ?", (task_id,))
            return None if loaded is None else loaded[1]

        return await self._db.read_on_loop(get)

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """One page of tasks, oldest first, with the event cursor of the same snapshot."""
        sql, params = list_sql(query)

        def list_page(conn: sqlite3.Connection) -> TaskPage:
            conn.execute("BEGIN")
            cursor = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            tasks, next_position = _page_within(conn, sql, params, query.limit, query.max_bytes)
            conn.execute("COMMIT")
            return TaskPage(tasks=tasks, next_position=next_position, cursor=cursor)

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
        """Stored events with seq > `after_seq` of tasks matching the filter, in seq
        order, and whether more follow.

        At most `limit` events, and fewer once their sizes pass `max_bytes` (at
        least one, whatever its size).
        """

        def read(conn: sqlite3.Connection) -> tuple[list[Event], bool]:
            of_ids = f"e.task_rowid IN (SELECT rowid FROM tasks WHERE id IN ({_in(task_ids)}))"
            of_labels = (
                "EXISTS (SELECT 1 FROM task_labels l WHERE l.task_rowid = e.task_rowid "
                f"AND l.label IN ({_in(labels)}))"
            )
            if labels and task_ids:
                match, params = f"({of_labels} OR {of_ids})", [*labels, *task_ids]
            elif labels:
                match, params = of_labels, list(labels)
            elif task_ids:
                match, params = of_ids, list(task_ids)
            else:  # every task: the caller's view is applied to what this returns
                match, params = "1", []
            rows = conn.execute(
                f"{_SELECT_EVENT} WHERE e.seq > ? AND {match} ORDER BY e.seq LIMIT ?",
                [after_seq, *params, limit + 1],
            )
            return events_within(rows, limit, max_bytes)

        return await self._db.read(read)

    async def task_events(
        self, task_id: str, *, after_seq: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], bool]:
        """The stored events of one task with seq > `after_seq`, oldest first, and
        whether more follow (bounded like `events_after`)."""

        def read(conn: sqlite3.Connection) -> tuple[list[Event], bool]:
            rows = conn.execute(
                f"{_SELECT_EVENT} WHERE t.id = ? AND e.seq > ? ORDER BY e.seq LIMIT ?",
                (task_id, after_seq, limit + 1),
            )
            return events_within(rows, limit, max_bytes)

        return await self._db.read(read)

    async def held_by(self, agent: str) -> list[str]:
        """The ids of the tasks `agent` holds now (CLAIMED or INPUT_REQUIRED)."""

        def read(conn: sqlite3.Connection) -> list[str]:
            # `claimed_by != ''` repeats the partial index's condition, so the
            # planner may use it for a bound parameter.
            rows = conn.execute(
                "SELECT id FROM tasks INDEXED BY tasks_claimed_by "
                "WHERE claimed_by = ? AND claimed_by != '' AND status IN (2, 6)",
                (agent,),
            )
            return [task_id for (task_id,) in rows]

        return await self._db.read(read)

    async def cursor(self) -> int:
        """The seq of the latest event (0 before the first): one index lookup."""

        def read(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

        return await self._db.read(read)

    async def next_due(self) -> int | None:
        """When the earliest lease ends or deadline passes, or None if nothing is due."""

        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT MIN(due) FROM ("
                "SELECT MIN(lease_expires_at) AS due FROM tasks WHERE status = 2 "
                "UNION ALL SELECT MIN(deadline) FROM tasks "
                "WHERE deadline IS NOT NULL AND status IN (1, 2, 6))"
            ).fetchone()
            return None if row[0] is None else int(row[0])

        return await self._db.read(read)

    async def task_output(self, task: TaskRecord) -> str:
        """The output of the task's current attempt as `task` was read: its OUTPUT
        chunks since its claim, up to its `output_size`."""

        def read(conn: sqlite3.Connection) -> str:
            # From the attempt's CLAIMED event on, by the (task_rowid, seq)
            # index: earlier attempts' output is never read.
            rows = conn.execute(
                "SELECT e.state FROM events e WHERE e.task_rowid = "
                "(SELECT rowid FROM tasks WHERE id = ?) AND e.seq > ? AND e.type = ? "
                "ORDER BY e.seq",
                (task.id, task.claim_seq, int(EventType.OUTPUT)),
            )
            text = "".join(json.loads(state)["chunk"][1] for (state,) in rows)
            # This is a second read: chunks (or a new attempt) committed since the
            # task was read come after its output_size bytes, and are cut off, so
            # the output and the size always agree.
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
        """A page of the task and its descendants, each after its parent (rowid
        order: a child is created after its parent), and the position of the
        page's last task when more may follow (else None).

        Only the tasks `visible_to` sees, filtered before the page is cut, so
        every page but the last is full and no position is a hidden task's.
        Bounded like `list_tasks`.
        """
        sql, params = subtree_sql(task_id, visible_to, after_position, limit)

        def read(conn: sqlite3.Connection) -> tuple[list[TaskRecord], int | None]:
            return _page_within(conn, sql, params, limit, max_bytes)

        return await self._db.read(read)


def _sees(agent: AgentRecord) -> tuple[str, list[Any]]:
    """`access.sees` for a row of `tasks`, as SQL: for filtering rows an index chose."""
    sql = (
        "(tasks.created_by = ? OR tasks.claimed_by = ? OR EXISTS (SELECT 1 FROM "
        "task_labels v WHERE v.task_rowid = tasks.rowid AND v.label IN "
        f"({_in(agent.labels)})))"
    )
    return sql, [agent.name, agent.name, *agent.labels]


def _visible_rowids(agent: AgentRecord, query: TaskQuery) -> tuple[str, list[Any]]:
    """The rowids of the first tasks after `query.after_position` that `agent`
    sees, in rowid order, as one compound SELECT.

    One index range per reason to see a task (created it, claimed it, carries
    one of its labels), each already in rowid order, merged by UNION with the
    LIMIT on top: SQLite stops reading every range once the page is full. So
    the cost follows what the agent sees, not the history. INDEXED BY, because
    without statistics the planner may prefer walking the rowids of every task.
    """
    statuses = [int(s) for s in query.statuses]
    on_status = f" AND tasks.status IN ({_in(statuses)})" if statuses else ""
    after = query.after_position
    arms = [
        (
            "SELECT tasks.rowid FROM tasks INDEXED BY tasks_created_by "
            f"WHERE tasks.created_by = ? AND tasks.rowid > ?{on_status}",
            [agent.name, after, *statuses],
        ),
        (
            "SELECT tasks.rowid FROM tasks INDEXED BY tasks_claimed_by WHERE tasks.claimed_by = ? "
            f"AND tasks.claimed_by != '' AND tasks.rowid > ?{on_status}",
            [agent.name, after, *statuses],
        ),
    ]
    only_pending = set(query.statuses) == {Status.PENDING}
    for label in agent.labels:
        if only_pending:  # the pending index alone answers: no task row to read
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l INDEXED BY task_labels_pending "
                    "WHERE l.label = ? AND l.pending = 1 AND l.task_rowid > ?",
                    [label, after],
                )
            )
        elif statuses:  # CROSS JOIN: the label's range stays the outer loop, in rowid order
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l CROSS JOIN tasks ON tasks.rowid = "
                    f"l.task_rowid WHERE l.label = ? AND l.task_rowid > ?{on_status}",
                    [label, after, *statuses],
                )
            )
        else:
            arms.append(
                (
                    "SELECT l.task_rowid FROM task_labels l WHERE l.label = ? AND l.task_rowid > ?",
                    [label, after],
                )
            )
    sql = " UNION ".join(arm for arm, _ in arms) + " ORDER BY 1 LIMIT ?"
    return sql, [*(p for _, arm_params in arms for p in arm_params), query.limit + 1]


def list_sql(query: TaskQuery) -> tuple[str, list[Any]]:
    """The SELECT of a listing page: (rowid, task columns) in rowid order, at
    most `query.limit + 1` rows."""
    where: list[str]
    params: list[Any]
    if not query.labels and not query.parent_id and query.visible_to is not None:
        visible, params = _visible_rowids(query.visible_to, query)
        return (
            f"SELECT tasks.rowid, {prefixed('tasks')} FROM tasks "
            f"WHERE tasks.rowid IN ({visible}) ORDER BY tasks.rowid",
            params,
        )
    if query.labels:
        # Walk the labels' own index ranges in task order, so a page costs
        # what the label holds, not the whole history; the pending index
        # when only PENDING tasks are asked for.
        only_pending = set(query.statuses) == {Status.PENDING}
        source = (
            "FROM task_labels l "
            + ("INDEXED BY task_labels_pending " if only_pending else "")
            + "JOIN tasks ON tasks.rowid = l.task_rowid"
        )
        where = [f"l.label IN ({_in(query.labels)})", "l.task_rowid > ?"]
        params = [*query.labels, query.after_position]
        if only_pending:
            where.append("l.pending = 1")
        distinct = "DISTINCT " if len(query.labels) > 1 else ""
        order = "l.task_rowid" if not distinct else "tasks.rowid"
    elif query.parent_id:
        # The children of one task, by the parent index (partial: it needs
        # the `!= ''` to apply), in rowid order.
        source, distinct, order = "FROM tasks INDEXED BY tasks_parent", "", "tasks.rowid"
        where = ["tasks.parent_id != ''", "tasks.rowid > ?"]
        params = [query.after_position]
    else:
        source, distinct, order = "FROM tasks", "", "tasks.rowid"
        where, params = ["tasks.rowid > ?"], [query.after_position]
    if query.statuses:
        where.append(f"tasks.status IN ({_in(query.statuses)})")
        params.extend(int(s) for s in query.statuses)
    if query.parent_id:
        where.append("tasks.parent_id = ?")
        params.append(query.parent_id)
    if query.visible_to is not None:
        sees, sees_params = _sees(query.visible_to)
        where.append(sees)
        params.extend(sees_params)
    params.append(query.limit + 1)
    return (
        f"SELECT {distinct}tasks.rowid, {prefixed('tasks')} {source} "
        f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
        params,
    )


def subtree_sql(
    task_id: str, visible_to: AgentRecord | None, after_position: int, limit: int
) -> tuple[str, list[Any]]:
    """The SELECT of a page of a subtree: (rowid, task columns) in rowid order,
    at most `limit + 1` rows."""
    # The recursive step by the parent index (partial: it needs the `!= ''`
    # to apply; without, SQLite builds an automatic index of every task each time).
    where, params = ["tasks.rowid > ?"], [task_id, after_position]
    if visible_to is not None:
        sees, sees_params = _sees(visible_to)
        where.append(sees)
        params.extend(sees_params)
    return (
        "WITH RECURSIVE tree(rowid, id) AS (SELECT rowid, id FROM tasks WHERE id = ? "
        "UNION ALL SELECT t.rowid, t.id FROM tree JOIN tasks t INDEXED BY tasks_parent "
        "ON t.parent_id = tree.id AND t.parent_id != '') "
        f"SELECT tasks.rowid, {prefixed('tasks')} FROM tasks "
        f"WHERE tasks.rowid IN (SELECT rowid FROM tree) AND {' AND '.join(where)} "
        "ORDER BY tasks.rowid LIMIT ?",
        [*params, limit + 1],
    )


def _page_within(
    conn: sqlite3.Connection, sql: str, params: list[Any], limit: int, max_bytes: int
) -> tuple[list[TaskRecord], int | None]:
    """At most `limit` tasks of a query (of at most `limit + 1` rows) whose sizes
    add up to at most `max_bytes` (at least one), and the rowid of the last when
    more follow.

    Row by row, so a page of large tasks reads one task past its end, not `limit`.
    """
    rows = conn.execute(sql, params)
    tasks: list[TaskRecord] = []
    total, last, more = 0, 0, False
    try:
        for row in rows:
            if len(tasks) == limit:
                more = True
                break
            task = task_from_row(row[1:])
            total += task_size(task)
            if tasks and total > max_bytes:
                more = True
                break
            tasks.append(task)
            last = row[0]
    finally:
        rows.close()
    return tasks, last if more else None


class SqliteAgentStore:
    """The `agents` table, on the same database as the tasks (`store.AgentStore`).

    Each change is an UPDATE of the columns it changes, never a write of a whole
    record held in memory: a record read before another change was written
    would undo that change on disk (a key rotation, a revocation). Changes of a
    live agent match only while it is not revoked, so one racing a revocation
    cannot bring the agent back; they return whether they matched.

    `applied` runs on the event loop once the change is committed, in commit
    order across all writes (see `Database.write`): the place to update what
    the caller holds in memory, so that it follows the same order as the disk.
    """

    def __init__(self, store: SqliteStore):
        self._db = store._db
        self.on_changed: Callable[[AgentRecord], None] = lambda agent: None

    def fresh(self) -> bool:
        """Always: every change of these agents is made through this daemon."""
        return True

    async def by_key_id(self, key_id: str) -> AgentRecord | None:
        """None: every agent of this database is in memory already."""
        return None

    async def all(self) -> list[AgentRecord]:
        def read(conn: sqlite3.Connection) -> list[AgentRecord]:
            rows = conn.execute(f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at")
            return [agent_from_row(r) for r in rows]

        return await self._db.read(read)

    async def insert(self, agent: AgentRecord, *, applied: Callable[[], object]) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM agents WHERE name = ?", (agent.name,)).fetchone():
                raise AlreadyExists(
                    f"an agent named {agent.name!r} already exists (names are never reused, "
                    "even after revocation); choose another name"
                )
            conn.execute(
                f"INSERT INTO agents ({AGENT_COLUMNS}) VALUES ({_in(range(8))})",
                agent_row(agent),
            )

        await self._db.write(insert, after_commit=_calling(applied))

    async def set_key(
        self, name: str, key_id: str, key_hash: str, *, applied: Callable[[], object]
    ) -> bool:
        """Replaces a live agent's key."""
        return await self._update_live(
            name, "key_id = ?, key_hash = ?", (key_id, key_hash), applied
        )

    async def set_labels_role(
        self,
        name: str,
        *,
        labels: Sequence[str] | None,
        role: Role | None,
        applied: Callable[[], object],
    ) -> bool:
        """Replaces a live agent's labels, role, or both (None: left as it is)."""
        return await self._update_live(
            name,
            "labels = COALESCE(?, labels), role = COALESCE(?, role)",
            (
                None if labels is None else json.dumps(list(labels)),
                None if role is None else int(role),
            ),
            applied,
        )

    async def revoke(self, name: str, *, applied: Callable[[], object]) -> bool:
        """Revokes a live agent, for good."""
        return await self._update_live(name, "revoked = 1", (), applied)

    async def reinstate_admin(self, name: str, *, applied: Callable[[], object]) -> None:
        """Makes `name` a live admin again, revoked or not (the admin bootstrap only)."""

        def reinstate(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE agents SET revoked = 0, role = ? WHERE name = ?", (int(Role.ADMIN), name)
            )

        await self._db.write(reinstate, after_commit=_calling(applied))

    async def touch_last_seen(self, name: str, at: int) -> None:
        """Records that the agent made a call at `at`; never moves last_seen_at back."""

        def touch(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE agents SET last_seen_at = ? "
                "WHERE name = ? AND (last_seen_at IS NULL OR last_seen_at < ?)",
                (at, name, at),
            )

        await self._db.write(touch)

    async def _update_live(
        self, name: str, assignments: str, params: tuple[Any, ...], applied: Callable[[], object]
    ) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                f"UPDATE agents SET {assignments} WHERE name = ? AND revoked = 0", (*params, name)
            )
            return cursor.rowcount == 1

        def after_commit(matched: bool) -> None:
            if matched:
                applied()

        return await self._db.write(update, after_commit=after_commit)


def _calling(applied: Callable[[], object]) -> Callable[[object], None]:
    def after_commit(_: object) -> None:
        applied()

    return after_commit


_EMPTY_BLOB = "x''"
_SELECT_EVENT = (
    f"SELECT e.seq, e.type, e.actor, e.at, e.state, t.rowid, {event_columns(_EMPTY_BLOB)} "
    "FROM events e JOIN tasks t ON t.rowid = e.task_rowid"
)


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database was written by a newer legato (schema {version}, this one reads "
            f"up to {SCHEMA_VERSION}); upgrade legato"
        )
    if version == 1:
        _migrate_from_1(conn)
    for statement in _statements(SCHEMA):
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _migrate_from_1(conn: sqlite3.Connection) -> None:
    """Schema 2: released attempts, each attempt's own output, no heartbeat events."""
    conn.execute("ALTER TABLE tasks ADD COLUMN released INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE tasks ADD COLUMN claim_seq INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "UPDATE tasks SET claim_seq = COALESCE((SELECT MAX(seq) FROM events "
        f"WHERE task_rowid = tasks.rowid AND type = {int(EventType.CLAIMED)}), 0)"
    )
    conn.execute("DELETE FROM events WHERE type = 3")  # HEARTBEAT, no longer an event


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (trigger bodies hold `;` of their own).

    Not `executescript`: it commits first, and this runs inside a write transaction.
    """
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        raise ValueError(f"incomplete statement in the schema: {pending[:80]!r}")
    return statements


def _load(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...]
) -> tuple[int, TaskRecord] | None:
    row = conn.execute(f"{_SELECT_TASK} WHERE {where}", params).fetchone()
    return None if row is None else (row[0], task_from_row(row[1:]))


# With the creator, the `Batch` key of creates that `_create_many` makes together.
_CREATE_MANY = "create"


class _OneByOne(BatchDeclined):
    """A set of creates `_create_many` cannot make whole: each runs on its own."""


def _create_many(
    conn: sqlite3.Connection, items: list[tuple[TaskRecord, int | None]]
) -> list[tuple[tuple[TaskRecord, bool], list[Event]]]:
    """Creates several tasks without a parent in four statements, whatever
    their number: the creators' open counts, then one multi-row INSERT each
    into tasks, task_labels and events.

    Each statement costs a hand-over of the GIL on the writer thread (the
    sqlite3 module releases it around every step), so one per create was the
    writer's main cost. A repeated idempotency key fails the tasks INSERT (its
    unique index) and a creator's cap the count check: both `_OneByOne`, and
    each create then runs alone, which answers it as a single create would.
    MAX_GROUP bounds the parameters of each statement (27 per task, 3 per
    label, 5 per event) far below SQLite's limit of 32,766.
    """
    tasks = [replace(task, root_id=task.id) for task, _ in items]
    wanted: dict[str, int] = {}
    for task in tasks:
        wanted[task.created_by] = wanted.get(task.created_by, 0) + 1
    caps: dict[str, int] = {}
    for task, cap in items:
        if cap is not None:
            caps[task.created_by] = min(cap, caps.get(task.created_by, cap))
    if caps:
        creators = list(caps)
        open_now = dict(
            conn.execute(
                f"SELECT created_by, n FROM open_tasks WHERE created_by IN ({_in(creators)})",
                creators,
            ).fetchall()
        )
        if any(open_now.get(c, 0) + wanted[c] > cap for c, cap in caps.items()):
            raise _OneByOne("a creator's cap would be passed")
    try:
        last_rowid = conn.execute(
            f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES "
            + ", ".join([f"({_in(range(27))})"] * len(tasks)),
            [value for task in tasks for value in task_values(task)],
        ).lastrowid
    except sqlite3.IntegrityError as exc:  # an idempotency key used before
        raise _OneByOne(str(exc)) from exc
    assert last_rowid is not None
    # One statement inserts its rows in order, each with rowid max + 1.
    rowids = range(last_rowid - len(tasks) + 1, last_rowid + 1)
    labels = [
        (label, rowid, int(task.status is Status.PENDING))
        for task, rowid in zip(tasks, rowids, strict=True)
        for label in task.labels
    ]
    if labels:
        conn.execute(
            "INSERT INTO task_labels (label, task_rowid, pending) VALUES "
            + ", ".join(["(?, ?, ?)"] * len(labels)),
            [value for row in labels for value in row],
        )
    carried = [slim(task, EventType.CREATED) for task in tasks]
    last_seq = conn.execute(
        "INSERT INTO events (task_rowid, type, actor, at, state) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?)"] * len(tasks)),
        [
            value
            for task, rowid, slimmed in zip(tasks, rowids, carried, strict=True)
            for value in (
                rowid,
                int(EventType.CREATED),
                task.created_by,
                task.updated_at,
                state_json(slimmed, None),
            )
        ],
    ).lastrowid
    assert last_seq is not None
    first_seq = last_seq - len(tasks) + 1
    return [
        (
            (task, True),
            [
                Event(
                    seq=first_seq + n,
                    type=EventType.CREATED,
                    task=slimmed,
                    actor=task.created_by,
                    at=task.updated_at,
                )
            ],
        )
        for n, (task, slimmed) in enumerate(zip(tasks, carried, strict=True))
    ]


def _insert_task(conn: sqlite3.Connection, task: TaskRecord) -> int:
    cursor = conn.execute(
        f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({_in(range(27))})", task_values(task)
    )
    rowid = cursor.lastrowid
    assert rowid is not None
    pending = int(task.status is Status.PENDING)
    conn.executemany(
        "INSERT INTO task_labels (label, task_rowid, pending) VALUES (?, ?, ?)",
        [(label, rowid, pending) for label in task.labels],
    )
    return rowid


def _apply(
    conn: sqlite3.Connection, rowid: int, task: TaskRecord, decide: Decide, actor: str
) -> tuple[TaskRecord, list[Event]]:
    change = decide(task)
    if change is None:
        return task, []
    new = change.task
    if change.type is None:  # a heartbeat: only the lease moves
        conn.execute(
            "UPDATE tasks SET lease_expires_at = ?, lease_us = ? WHERE rowid = ?",
            (new.lease_expires_at, new.lease_us, rowid),
        )
        return new, []
    # The event first: a claim's own seq is where its attempt's output begins.
    event = _append_event(conn, rowid, new, change.type, actor, change.chunk)
    if change.type is EventType.CLAIMED:
        new = replace(new, claim_seq=event.seq)
    conn.execute(
        "UPDATE tasks SET status = ?, result = ?, error = ?, claimed_by = ?, attempt = ?, "
        "version = ?, updated_at = ?, lease_token = ?, lease_expires_at = ?, lease_us = ?, "
        "output_size = ?, question = ?, answer = ?, released = ?, claim_seq = ? WHERE rowid = ?",
        (
            int(new.status), new.result, new.error, new.claimed_by, new.attempt, new.version,
            new.updated_at, new.lease_token, new.lease_expires_at, new.lease_us,
            new.output_size, new.question, new.answer, new.released, new.claim_seq, rowid,
        ),
    )  # fmt: skip
    was_pending, is_pending = task.status is Status.PENDING, new.status is Status.PENDING
    if was_pending != is_pending:
        # By the whole primary key (label, task_rowid): by task_rowid alone this
        # would scan every label row of the history.
        conn.executemany(
            "UPDATE task_labels SET pending = ? WHERE label = ? AND task_rowid = ?",
            [(int(is_pending), label, rowid) for label in new.labels],
        )
    return new, [event]


def _append_event(
    conn: sqlite3.Connection,
    rowid: int,
    task: TaskRecord,
    event_type: EventType,
    actor: str,
    chunk: OutputChunk | None = None,
) -> Event:
    carried = slim(task, event_type)
    cursor = conn.execute(
        "INSERT INTO events (task_rowid, type, actor, at, state) VALUES (?, ?, ?, ?, ?)",
        (rowid, int(event_type), actor, task.updated_at, state_json(carried, chunk)),
    )
    seq = cursor.lastrowid
    assert seq is not None
    return Event(
        seq=seq, type=event_type, task=carried, actor=actor, at=task.updated_at, chunk=chunk
    )
