"""The storage seam: what the task manager and the agent registry need of a database.

Two backends implement it: `sqlite` (one file in the data dir, one writer
thread, the default) and `postgres` (one database shared by any number of
daemons). Both keep the same tables, rows and events (`rows`), so the state
machine (`lifecycle`) and the rules (`access`, `limits`) above them are shared
and pure: a store only loads a task, hands it to a `decide` function inside its
write transaction and records the `Change` that function returns.

What a backend promises, whichever it is:

- Every write is one transaction; its events are published (`on_commit`) once
  it is committed, in `seq` order, before its caller is answered.
- `seq` grows in commit order: a watcher that has read up to `seq` N never
  later finds an event below N.
- A claim takes a task no other claim holds; an expiry is recorded once.
- A failed database fails as a whole (`failed`): every pending call is
  answered, and the daemon stops to be restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import grpc
from legato.server import limits
from legato.server.errors import DomainError
from legato.server.model import AgentRecord, Change, Clock, Event, Role, Status, TaskRecord

Decide = Callable[[TaskRecord], Change | None]

# How deep delegation chains may go: a root task is depth 0.
MAX_DEPTH = 8


class Durability(StrEnum):
    """How far a commit is synced before it is acknowledged.

    NORMAL survives a crash or `kill -9` of the daemon; FULL also survives an
    operating system crash or power loss, at the cost of a sync per commit.
    """

    NORMAL = "normal"
    FULL = "full"


class DatabaseFailed(DomainError):
    """The database stopped serving: one of its threads died, or a post-commit
    callback raised. The daemon stops, to be restarted.

    UNAVAILABLE, like a daemon that is down: the caller does not know whether
    its call took effect and retries once the daemon is back (a create with
    the same idempotency key is answered with the task it made, if it did).
    """

    code = grpc.StatusCode.UNAVAILABLE
    _explanation = (
        "the daemon's database failed ({reason}) and the daemon is stopping; retry once it is back"
    )

    def __init__(self, reason: str) -> None:
        super().__init__(self._explanation.format(reason=reason))
        self.reason = reason


class CommittedUnpublished(DatabaseFailed):
    """The caller's change was committed, but the post-commit callback that
    publishes it raised, and the database failed with it.

    Unlike the other `DomainError`s, something was changed: the message says
    so. It is an error all the same, since watchers, waiting claims and lease
    timers did not hear of the change, and the daemon is stopping; to the
    caller it is the familiar case of a daemon that died after its commit,
    before its answer.
    """

    _explanation = (
        "the change was committed, but the daemon's database failed right after ({reason}) "
        "and the daemon is stopping; the change stands: read it back once the daemon is "
        "back before repeating it"
    )


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """Filters of a task listing; empty sequences mean no filter."""

    labels: Sequence[str] = ()
    statuses: Sequence[Status] = ()
    parent_id: str = ""
    limit: int = 100
    after_position: int = 0
    # Only tasks this agent sees (created, claimed, or carrying one of its
    # labels); None for no such restriction (admins).
    visible_to: AgentRecord | None = None
    # A page ends before its tasks' sizes (`model.task_size`) would pass this,
    # holding at least one task whatever its size.
    max_bytes: int = limits.PAGE_BUDGET_BYTES


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[TaskRecord]
    # Position of the last task on the page when more may follow, else None.
    next_position: int | None
    # The event seq the listing is consistent with.
    cursor: int


class AgentStore(Protocol):
    """The `agents` table.

    Each change is an UPDATE of the columns it changes, never a write of a whole
    record held in memory: a record read before another change was written
    would undo that change on disk (a key rotation, a revocation). Changes of a
    live agent match only while it is not revoked, so one racing a revocation
    cannot bring the agent back; they return whether they matched.

    `applied` runs on the event loop once the change is committed, in commit
    order across this daemon's writes: the place to update what the caller
    holds in memory, so that it follows the same order as the disk.
    """

    # Called on the event loop with an agent as stored, when another daemon
    # (or anything but this one's own `applied` path) changed it.
    on_changed: Callable[[AgentRecord], None]

    def fresh(self) -> bool:
        """Whether the agents held in memory are known to be current: False once
        changes made elsewhere may have gone unheard for longer than the bound."""
        ...

    async def all(self) -> list[AgentRecord]: ...

    async def by_key_id(self, key_id: str) -> AgentRecord | None:
        """The agent as stored holding this key id, when it may be missing from
        memory (made or given a new key through another daemon a moment ago);
        None otherwise, without asking the database."""
        ...

    async def insert(self, agent: AgentRecord, *, applied: Callable[[], object]) -> None: ...

    async def set_key(
        self, name: str, key_id: str, key_hash: str, *, applied: Callable[[], object]
    ) -> bool:
        """Replaces a live agent's key."""
        ...

    async def set_labels_role(
        self,
        name: str,
        *,
        labels: Sequence[str] | None,
        role: Role | None,
        applied: Callable[[], object],
    ) -> bool:
        """Replaces a live agent's labels, role, or both (None: left as it is)."""
        ...

    async def revoke(self, name: str, *, applied: Callable[[], object]) -> bool:
        """Revokes a live agent, for good."""
        ...

    async def reinstate_admin(self, name: str, *, applied: Callable[[], object]) -> None:
        """Makes `name` a live admin again, revoked or not (the admin bootstrap only)."""
        ...

    async def touch_last_seen(self, name: str, at: int) -> None:
        """Records that the agent made a call at `at`; never moves last_seen_at back."""
        ...


class TaskStore(Protocol):
    """The persistent task store. Every method is one transaction."""

    # Called on the event loop with committed events, in seq order, each once:
    # this daemon's and, on a shared database, every other daemon's.
    on_commit: Callable[[list[Event]], None]
    # Called on the event loop with False when the store cannot write for a
    # while (its connection to a database server broke and it is reconnecting)
    # and with True once it can again: the daemon's health follows it.
    on_writable: Callable[[bool], None]
    # Called on the event loop with a time (microseconds) when something may
    # fall due then that no event announced: another daemon's heartbeat that
    # shortened a lease. The lease timer must look again by then.
    on_due: Callable[[int], None]

    @property
    def agents(self) -> AgentStore:
        """The agents, on the same database."""
        ...

    @property
    def clock(self) -> Clock:
        """The clock that leases and deadlines are measured on (microseconds)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other daemons may serve the same database."""
        ...

    @property
    def description(self) -> str:
        """Where the data is, for the ready line and the log (no secrets)."""
        ...

    @property
    def failure(self) -> DatabaseFailed | None:
        """Why the database failed, or None while it has not."""
        ...

    async def failed(self) -> DatabaseFailed:
        """Waits until the database fails and returns why; on a clean close it never does."""
        ...

    def start(self) -> None:
        """Starts publishing (`on_commit` is set by then)."""
        ...

    async def close(self) -> None: ...

    # -- writes ---------------------------------------------------------------------

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
        ...

    async def update(self, task_id: str, decide: Decide, *, actor: str) -> TaskRecord:
        """Applies `decide` to the stored task and records the change it returns.

        `decide` returning None leaves the task as it is. NOT_FOUND if no such task.
        """
        ...

    async def update_tree(
        self, task_id: str, decide: Decide, decide_descendant: Decide, *, actor: str
    ) -> TaskRecord:
        """`update` of one task and, in the same transaction, of each of its descendants."""
        ...

    async def claim_next(
        self, labels: Sequence[str], decide: Decide, *, actor: str
    ) -> TaskRecord | None:
        """Claims the oldest pending task carrying any of `labels` that no other
        claim holds, if there is one."""
        ...

    async def expire_due(self, now: int, decide: Decide, *, actor: str) -> int:
        """Applies `decide` to tasks whose lease ended or deadline passed by `now`;
        how many changed. Several daemons may call it at once: each change is
        made once."""
        ...

    # -- reads ----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def list_tasks(self, query: TaskQuery) -> TaskPage:
        """One page of tasks, oldest first, with the event cursor of the same snapshot."""
        ...

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
        order, and whether more follow; at most `limit` and, past the first,
        at most `max_bytes` of them."""
        ...

    async def task_events(
        self, task_id: str, *, after_seq: int, limit: int, max_bytes: int
    ) -> tuple[list[Event], bool]:
        """The stored events of one task with seq > `after_seq`, oldest first, and
        whether more follow (bounded like `events_after`)."""
        ...

    async def held_by(self, agent: str) -> list[str]:
        """The ids of the tasks `agent` holds now (CLAIMED or INPUT_REQUIRED)."""
        ...

    async def cursor(self) -> int:
        """The seq of the latest committed event (0 before the first)."""
        ...

    async def next_due(self) -> int | None:
        """When the earliest lease ends or deadline passes, or None if nothing is due."""
        ...

    async def task_output(self, task: TaskRecord) -> str:
        """The output of the task's current attempt."""
        ...

    async def subtree(
        self,
        task_id: str,
        *,
        visible_to: AgentRecord | None = None,
        after_position: int = 0,
        limit: int = limits.DEFAULT_PAGE_SIZE,
        max_bytes: int = limits.PAGE_BUDGET_BYTES,
    ) -> tuple[list[TaskRecord], int | None]:
        """A page of the task and its descendants the viewer sees, each after its
        parent, and the position of the page's last task when more may follow."""
        ...


def is_postgres_url(database: str) -> bool:
    """Whether `database` names a PostgreSQL database (`postgresql://` or `postgres://`)."""
    return database.startswith(("postgresql://", "postgres://"))


async def open_store(
    *, database: str, sqlite_path: Path, durability: Durability = Durability.NORMAL
) -> TaskStore:
    """Opens (creating and migrating if needed) the store `database` names: a
    PostgreSQL URL, or "" for the SQLite file at `sqlite_path`."""
    if not database:
        from legato.server.store.sqlite import SqliteStore

        return await SqliteStore.open(sqlite_path, durability=durability)
    if is_postgres_url(database):
        from legato.server.store.postgres import PostgresStore

        return await PostgresStore.open(database, durability=durability)
    raise ValueError(
        f"--database {database.split('://', 1)[0]}://...: not a database legato knows; "
        "give a postgresql://USER@HOST:PORT/DB URL, or leave it out for the SQLite file "
        "in the data dir"
    )
