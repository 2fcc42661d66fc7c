"""Task operations: validate, apply the state machine in the store, publish.

This is the layer the RPC handlers call. It knows no protobuf: it takes and
returns domain records, and raises `DomainError`s the service turns into
status codes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Coroutine, Sequence
from pathlib import Path
from typing import Any

from legato.server import access, lifecycle, limits
from legato.server.agents import AgentRegistry
from legato.server.errors import InvalidArgument, NotFound
from legato.server.events import DEFAULT_BUFFER, EventBus
from legato.server.leases import LeaseReaper
from legato.server.model import (
    DAEMON_ACTOR,
    AgentRecord,
    Change,
    Clock,
    Event,
    EventType,
    OutputChunk,
    Status,
    TaskRecord,
)
from legato.server.store import Durability, TaskQuery, TaskStore, open_store
from legato.server.waiters import ClaimWaiters

log = logging.getLogger(__name__)

BACKLOG_BATCH = 500
# A replay batch is held in memory while it is sent: bound it in bytes too.
BACKLOG_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_OPEN_TASKS = 1000
MAX_CLAIM_WAIT_US = 60 * 1_000_000
MAX_CHUNK_BYTES = 64 * 1024


# Events after which a task is PENDING and may wake a waiting claim.
CLAIMABLE_AGAIN = frozenset({EventType.CREATED, EventType.REQUEUED, EventType.RELEASED})


# The URL-safe base64 alphabet, and the same 64 characters in ASCII order.
_SORTABLE = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz",
)


def new_task_id() -> str:
    """`t_` and 24 URL-safe characters: the creation time in milliseconds
    (8 characters), then 96 random bits, encoded so that ids of different
    milliseconds sort by time in bytewise order (SQLite's; a PostgreSQL column
    under a locale's collation orders them less strictly).

    Random ids put every create on its own leaf of the id index, a page of the
    WAL each; ids made one after the other share the index's last leaf. On a
    history of 200,000 tasks, 32 creates a transaction (`python -m bench.ids`):
    2.13 against 3.26 WAL frames and 0.87x the writer's time per create; with
    the clients' time-ordered idempotency keys too, 0.95 frames and 0.64x.
    """
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + secrets.token_bytes(12)
    return "t_" + base64.urlsafe_b64encode(raw).translate(_SORTABLE).decode()


def new_lease_token() -> str:
    return "l_" + secrets.token_urlsafe(24)


def _encode_page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        # SQLite integers are signed 64-bit: a larger "position" was never issued.
        if raw.startswith("p") and raw[1:].isdigit() and int(raw[1:]) < 2**63:
            return int(raw[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument("page_token is not one this daemon issued; pass next_page_token as given")


class TaskManager:
    """The daemon's task operations over a store, an event bus and the lease reaper.

    Every operation acts for a `caller` and only within its view (see `access`).
    """

    def __init__(
        self,
        store: TaskStore,
        bus: EventBus,
        agents: AgentRegistry,
        clock: Clock,
        max_open_tasks: int = DEFAULT_MAX_OPEN_TASKS,
    ):
        self._store = store
        self.bus = bus
        self.agents = agents
        self._clock = clock
        self._max_open_tasks = max_open_tasks
        self._reaper = LeaseReaper(expire=self._expire_due, next_expiry=store.next_due, clock=clock)
        self._waiters = ClaimWaiters()

        def key_invalidated(name: str) -> None:
            bus.end_owner(name)
            self._waiters.nudge_owner(name)

        agents.on_key_invalidated = key_invalidated
        agents.on_revoked = self._release_held_by
        agents.on_access_changed = self._waiters.nudge_owner
        # How often a claim looked for a task: long-polling workers must not drive it up.
        self.claim_attempts = 0
        # Releases of claims whose callers went away; awaited on close.
        self._background: set[asyncio.Future[None]] = set()
        store.on_commit = self._committed
        store.on_due = self._reaper.due_at

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        database: str = "",
        durability: Durability = Durability.NORMAL,
        clock: Clock | None = None,
        watch_buffer: int = DEFAULT_BUFFER,
        max_open_tasks: int = DEFAULT_MAX_OPEN_TASKS,
    ) -> TaskManager:
        """Opens the store (`database`, or the SQLite file at `path` when it is "")
        and starts publishing its events and ending expired leases.

        `clock` defaults to the store's: the database's own on a shared one.
        """
        store = await open_store(database=database, sqlite_path=path, durability=durability)
        clock = clock or store.clock
        try:
            agents = await AgentRegistry.open(store.agents, clock)
        except BaseException:
            await store.close()
            raise
        manager = cls(store, EventBus(watch_buffer), agents, clock, max_open_tasks)
        store.start()
        manager._reaper.start()
        return manager

    def end_waits(self) -> None:
        """Ends watch streams and long-poll claims, now and for good: the daemon is stopping.

        Waiting claims return empty at once; left waiting, each would hold up
        the server's drain for the whole grace period.
        """
        self.bus.close()
        self._waiters.close()

    async def close(self) -> None:
        """Ends watch streams and claim waits, finishes pending releases, stops the
        reaper, closes the database."""
        self.end_waits()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._reaper.stop()
        await self.agents.flush()
        await self._store.close()

    @property
    def store(self) -> TaskStore:
        return self._store

    def _committed(self, events: list[Event]) -> None:
        self.bus.publish(events)
        for event in events:
            task = event.task
            if task.status is Status.CLAIMED and task.lease_expires_at is not None:
                self._reaper.due_at(task.lease_expires_at)
            if event.type is EventType.CREATED and task.deadline is not None:
                self._reaper.due_at(task.deadline)
            if task.status is Status.PENDING and event.type in CLAIMABLE_AGAIN:
                self._waiters.wake_one(task.labels)

    async def _expire_due(self, now: int) -> int:
        return await self._store.expire_due(
            now, lambda task: lifecycle.expire(task, now=now), actor=DAEMON_ACTOR
        )

    async def _visible_task(self, task_id: str, caller: AgentRecord) -> TaskRecord:
        task = await self._store.get_task(limits.check_id("id", task_id))
        if task is None:
            raise NotFound(f"task {task_id!r} not found")
        access.require_visible(caller, task)
        return task

    # -- operations ---------------------------------------------------------------

    async def create(
        self,
        *,
        content: str,
        labels: Sequence[str],
        context: bytes,
        caller: AgentRecord,
        parent_id: str = "",
        idempotency_key: str = "",
        max_attempts: int = 0,
        deadline: int | None = None,
    ) -> tuple[TaskRecord, bool, list[str]]:
        """Creates a task for `caller`.

        Returns it, whether it is new (False: an idempotent repeat) and warnings
        for the creator, e.g. labels no agent holds yet.
        """
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise InvalidArgument("deadline is in the past; give a time the task can still meet")
        task = TaskRecord(
            id=new_task_id(),
            deadline=deadline,
            content=limits.check_text("content", content, limits.MAX_CONTENT_BYTES, required=True),
            labels=limits.check_labels("labels", labels, required=True),
            context=limits.check_blob("context", context),
            created_by=caller.name,
            created_at=now,
            updated_at=now,
            max_attempts=limits.check_max_attempts(max_attempts),
            parent_id=limits.check_id("parent_id", parent_id, required=False),
            idempotency_key=limits.check_text(
                "idempotency_key", idempotency_key, limits.MAX_IDEMPOTENCY_KEY
            ),
        )
        stored, created = await self._store.create_task(
            task,
            max_open=self._max_open_tasks,
            parent_check=lambda parent: access.require_can_delegate_under(caller, parent),
        )
        warnings = [
            f"no agent holds {label} yet: the task waits until an admin gives the label to "
            f"one (`legato agent add NAME --label {label}`); check the spelling"
            for label in stored.labels
            if not self.agents.label_held(label)
        ]
        return stored, created, warnings

    async def get(self, task_id: str, *, caller: AgentRecord) -> tuple[TaskRecord, str]:
        """A task in the caller's view, and its output so far."""
        task = await self._visible_task(task_id, caller)
        output = await self._store.task_output(task) if task.output_size else ""
        return task, output

    async def tree(
        self, task_id: str, *, caller: AgentRecord, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[TaskRecord], str]:
        """A page of the task and the descendants the caller sees, each after its
        parent, and the token of the next page ("" if none)."""
        limit = limits.check_page_size(page_size)
        after_position = _decode_page_token(page_token)
        await self._visible_task(task_id, caller)
        tasks, next_position = await self._store.subtree(
            task_id,
            visible_to=None if caller.admin else caller,
            after_position=after_position,
            limit=limit,
            max_bytes=limits.PAGE_BUDGET_BYTES,
        )
        return tasks, "" if next_position is None else _encode_page_token(next_position)

    async def history(
        self, task_id: str, *, caller: AgentRecord, after_seq: int, page_size: int
    ) -> tuple[list[Event], int]:
        """The stored events of one task and the after_seq of the next page (0: none)."""
        await self._visible_task(task_id, caller)
        if after_seq < 0:
            raise InvalidArgument(f"after_seq must be 0 or more; got {after_seq}")
        events, more = await self._store.task_events(
            task_id,
            after_seq=after_seq,
            limit=limits.check_page_size(page_size),
            max_bytes=limits.PAGE_BUDGET_BYTES,
        )
        return events, events[-1].seq if more else 0

    async def list(
        self,
        *,
        caller: AgentRecord,
        labels: Sequence[str] = (),
        statuses: Sequence[Status] = (),
        parent_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[TaskRecord], str, int]:
        """One page of tasks, the token of the next page ("" if none) and the event cursor."""
        page = await self._store.list_tasks(
            TaskQuery(
                labels=limits.check_labels("labels", labels, required=False),
                statuses=statuses,
                parent_id=limits.check_id("parent_id", parent_id, required=False),
                limit=limits.check_page_size(page_size),
                after_position=_decode_page_token(page_token),
                visible_to=None if caller.admin else caller,
                max_bytes=limits.PAGE_BUDGET_BYTES,
            )
        )
        next_token = "" if page.next_position is None else _encode_page_token(page.next_position)
        return page.tasks, next_token, page.cursor

    async def claim(
        self,
        *,
        labels: Sequence[str],
        task_id: str,
        lease_us: int | None,
        caller: AgentRecord,
        wait_us: int | None = None,
    ) -> TaskRecord | None:
        """Claims the task `task_id`, or the oldest pending one with any of `labels`
        (default: any of the caller's labels), waiting up to `wait_us` for one.

        The claim acts for the caller as it is when it takes a task, not as it
        was when the call began: UNAUTHENTICATED once the caller is revoked or
        its key rotated; a wait for given labels ends PERMISSION_DENIED once the
        caller no longer holds them all, and a wait for all of its labels waits
        on the labels it holds now.
        """
        lease = limits.check_lease("lease", lease_us) or limits.DEFAULT_LEASE_US
        checked_labels = limits.check_labels("labels", labels, required=False)
        name = caller.name
        if wait_us is not None and not 0 <= wait_us <= MAX_CLAIM_WAIT_US:
            raise InvalidArgument(f"wait must be 0 to 60 s; got {wait_us / 1e6:g} s")
        current = self.agents.live(caller)
        if task_id:
            if wait_us:
                raise InvalidArgument("wait applies to claims by labels, not by id")

            def decide_by_id(task: TaskRecord) -> Change:
                # Inside the transaction, with the caller as it is at this moment.
                now_caller = self.agents.current(caller)
                access.require_claimable(now_caller, task)
                self.agents.live(caller)
                return lifecycle.claim(
                    task,
                    actor=name,
                    lease_token=new_lease_token(),
                    lease_us=lease,
                    now=self._clock(),
                )

            return await self._claim_or_release(
                self._store.update(limits.check_id("id", task_id), decide_by_id, actor=name), name
            )

        from_labels = access.claim_labels(current, checked_labels)

        def decide(task: TaskRecord) -> Change:
            # Inside the transaction, with the caller as it is at this moment: its
            # labels may have changed since it chose the labels to look under.
            access.require_holds_label(self.agents.live(caller), task, from_labels)
            return lifecycle.claim(
                task, actor=name, lease_token=new_lease_token(), lease_us=lease, now=self._clock()
            )

        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + (wait_us or 0) / 1e6
        while True:
            # Registered before the first look, so a task created in between wakes it.
            with self._waiters.register(name, from_labels) as waiter:
                while True:
                    # Also after each wake-up or nudge: the caller may have changed.
                    now_labels = access.claim_labels(self.agents.live(caller), checked_labels)
                    if now_labels != from_labels:
                        break  # to wait under the labels it holds now
                    waiter.rearm()
                    self.claim_attempts += 1
                    task = await self._claim_or_release(
                        self._store.claim_next(from_labels, decide, actor=name), name
                    )
                    if task is not None or self._waiters.closed:
                        return task
                    left = give_up_at - loop.time()
                    if left <= 0 or not await waiter.wait(left):
                        return None
            from_labels = now_labels

    async def _claim_or_release(
        self, write: Coroutine[Any, Any, TaskRecord | None], actor: str
    ) -> TaskRecord | None:
        """Runs a claim's write; a claim that commits after its caller went away
        (deadline, disconnect) is released, not left to burn an attempt."""
        claiming = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            claiming.add_done_callback(lambda done: self._release_abandoned(done, actor))
            raise

    def _release_abandoned(self, done: asyncio.Future[TaskRecord | None], actor: str) -> None:
        if done.cancelled() or done.exception() is not None or done.result() is None:
            return
        claimed = done.result()
        assert claimed is not None
        reason = f"the claim by {actor} committed after its caller had gone away"

        def decide(task: TaskRecord) -> Change | None:
            if task.lease_token != claimed.lease_token:
                return None  # ended meanwhile (expired, canceled): nothing to hand back
            return lifecycle.release(
                task, lease_token=claimed.lease_token, reason=reason, now=self._clock()
            )

        async def release() -> None:
            try:
                await self._store.update(claimed.id, decide, actor=actor)
            except Exception:
                log.exception("could not release abandoned claim of %s", claimed.id)

        background = asyncio.ensure_future(release())
        self._background.add(background)
        background.add_done_callback(self._background.discard)

    async def _release_held_by(self, name: str) -> None:
        """Hands back what a revoked agent held: it can never finish it, and
        waiting out a lease (up to 24 h) would stall the task for nothing."""
        reason = f"agent {name} was revoked while it held the task"

        def decide(task: TaskRecord) -> Change | None:
            if task.claimed_by != name or task.status not in lifecycle.WORKING:
                return None  # finished or moved on meanwhile
            return lifecycle.release(
                task, lease_token=task.lease_token, reason=reason, now=self._clock()
            )

        for task_id in await self._store.held_by(name):
            await self._store.update(task_id, decide, actor=DAEMON_ACTOR)

    async def heartbeat(
        self, *, task_id: str, lease_token: str, lease_us: int | None, caller: AgentRecord
    ) -> tuple[TaskRecord, bool]:
        """Extends a lease; returns the task and whether it was canceled meanwhile."""
        lease = limits.check_lease("lease", lease_us)
        now = self._clock()

        def decide(task: TaskRecord) -> Change | None:
            access.require_visible(caller, task)
            if lifecycle.ended_under(task, lease_token):
                access.require_claimant(caller, task, "heartbeat")
                return None
            change = lifecycle.heartbeat(task, lease_token=lease_token, lease_us=lease, now=now)
            access.require_claimant(caller, task, "heartbeat")
            return change

        task = await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)
        if task.status is Status.CLAIMED and task.lease_expires_at is not None:
            # A heartbeat records no event, so the commit does not tell the
            # reaper; a shortened lease must still end on time.
            self._reaper.due_at(task.lease_expires_at)
        return task, task.status.terminal

    async def complete(
        self, *, task_id: str, lease_token: str, result: bytes, caller: AgentRecord
    ) -> TaskRecord:
        limits.check_blob("result", result)
        now = self._clock()

        def decide(task: TaskRecord) -> Change | None:
            access.require_visible(caller, task)
            change = lifecycle.complete(task, lease_token=lease_token, result=result, now=now)
            access.require_claimant(caller, task, "complete")
            return change

        return await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)

    async def fail(
        self, *, task_id: str, lease_token: str, error: str, retryable: bool, caller: AgentRecord
    ) -> TaskRecord:
        limits.check_text("error", error, limits.MAX_TEXT_BYTES, required=True)
        now = self._clock()

        def decide(task: TaskRecord) -> Change:
            access.require_visible(caller, task)
            change = lifecycle.fail(
                task, lease_token=lease_token, error=error, retryable=retryable, now=now
            )
            access.require_claimant(caller, task, "fail")
            return change

        return await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)

    async def release(
        self, *, task_id: str, lease_token: str, reason: str, caller: AgentRecord
    ) -> TaskRecord:
        """Hands a claimed task back to PENDING; the attempt does not count."""
        limits.check_text("reason", reason, limits.MAX_TEXT_BYTES)
        now = self._clock()

        def decide(task: TaskRecord) -> Change:
            access.require_visible(caller, task)
            change = lifecycle.release(task, lease_token=lease_token, reason=reason, now=now)
            access.require_claimant(caller, task, "release")
            return change

        return await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)

    async def cursor(self) -> int:
        """The seq of the latest event: watching from it misses nothing from now on."""
        return await self._store.cursor()

    async def cancel(
        self, *, task_id: str, reason: str, caller: AgentRecord, keep_children: bool = False
    ) -> TaskRecord:
        """Cancels a task and, unless `keep_children`, its unfinished descendants."""
        limits.check_text("reason", reason, limits.MAX_TEXT_BYTES)
        now = self._clock()
        checked_id = limits.check_id("id", task_id)

        def decide(task: TaskRecord) -> Change:
            access.require_can_cancel(caller, task)
            return lifecycle.cancel(task, reason=reason, now=now)

        if keep_children:
            return await self._store.update(checked_id, decide, actor=caller.name)
        because = f"canceled with its ancestor task {task_id}" + (f": {reason}" if reason else "")

        def decide_descendant(task: TaskRecord) -> Change | None:
            return None if task.status.terminal else lifecycle.cancel(task, reason=because, now=now)

        return await self._store.update_tree(
            checked_id, decide, decide_descendant, actor=caller.name
        )

    async def append_output(
        self, *, task_id: str, lease_token: str, text: str, caller: AgentRecord
    ) -> OutputChunk:
        """Appends a chunk of output; returns it with its offset."""
        # Blank chunks are real output (a newline token); only empty ones are not.
        if not text:
            raise InvalidArgument("text is empty; append at least one character")
        limits.check_text("text", text, MAX_CHUNK_BYTES)
        now = self._clock()
        chunk: list[OutputChunk] = []

        def decide(task: TaskRecord) -> Change:
            access.require_visible(caller, task)
            change = lifecycle.append_output(task, lease_token=lease_token, text=text, now=now)
            access.require_claimant(caller, task, "write output for")
            assert change.chunk is not None
            chunk.append(change.chunk)
            return change

        await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)
        return chunk[0]

    async def request_input(
        self, *, task_id: str, lease_token: str, question: str, caller: AgentRecord
    ) -> TaskRecord:
        limits.check_text("question", question, limits.MAX_TEXT_BYTES, required=True)
        now = self._clock()

        def decide(task: TaskRecord) -> Change:
            access.require_visible(caller, task)
            change = lifecycle.request_input(
                task, lease_token=lease_token, question=question, now=now
            )
            access.require_claimant(caller, task, "ask about")
            return change

        return await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)

    async def provide_input(self, *, task_id: str, answer: str, caller: AgentRecord) -> TaskRecord:
        limits.check_text("answer", answer, limits.MAX_TEXT_BYTES, required=True)
        now = self._clock()

        def decide(task: TaskRecord) -> Change:
            access.require_can_answer(caller, task)
            return lifecycle.provide_input(task, answer=answer, now=now)

        return await self._store.update(limits.check_id("id", task_id), decide, actor=caller.name)

    async def watch(
        self,
        *,
        labels: Sequence[str],
        task_ids: Sequence[str],
        after_seq: int | None,
        caller: AgentRecord,
    ) -> AsyncGenerator[Event, None]:
        """Events of the matching tasks in the caller's view, in seq order: stored
        ones after `after_seq`, then live.

        Subscribes before reading the backlog, so an event committed meanwhile is
        in one or the other (or both: the live copy is dropped by its seq).
        Raises `SubscriptionOverflow` if the consumer falls too far behind, and
        `SubscriptionRevoked` if the caller's key stops working.
        """
        checked_labels = limits.check_labels("labels", labels, required=False)
        if len(task_ids) > limits.MAX_WATCH_TASK_IDS:
            raise InvalidArgument(
                f"task_ids has {len(task_ids)} ids; the limit is {limits.MAX_WATCH_TASK_IDS}"
            )
        ids = [limits.check_id("task_ids", task_id) for task_id in task_ids]
        if after_seq is not None and after_seq < 0:
            raise InvalidArgument(f"after_seq must be 0 or more; got {after_seq}")
        # Task ids come from the daemon: one that does not exist, or that the caller
        # does not see, would wait forever. Say so, as GetTask would.
        # All at once, not one read after another: up to 1000 ids.
        found = await asyncio.gather(*(self._store.get_task(i) for i in dict.fromkeys(ids)))
        for task_id, task in zip(dict.fromkeys(ids), found, strict=True):
            if task is None or not access.sees(caller, task):
                raise NotFound(f"task {task_id!r} not found")

        def visible(event: Event) -> bool:
            # The caller's labels and role as they are now, not as they were
            # when the stream opened.
            return access.sees(self.agents.current(caller), event.task)

        sub = self.bus.subscribe(checked_labels, ids, owner=caller.name, accepts=visible)
        try:
            last = after_seq
            more = last is not None
            while more and last is not None:
                batch, more = await self._store.events_after(
                    last,
                    labels=checked_labels,
                    task_ids=ids,
                    limit=BACKLOG_BATCH,
                    max_bytes=BACKLOG_BATCH_BYTES,
                )
                for event in batch:
                    if visible(event):
                        yield event
                    last = event.seq
            while True:
                event = await sub.get()
                if last is not None and event.seq <= last:
                    continue
                yield event
                last = event.seq
        finally:
            self.bus.unsubscribe(sub)
