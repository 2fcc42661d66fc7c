"""Task operations: validate, apply the state machine in the store, publish.

This is the layer the RPC handlers call. It knows no protobuf: it takes and
returns domain records, and raises `DomainError`s the service turns into
status codes.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from legato.server import lifecycle, limits
from legato.server.db import Durability
from legato.server.errors import InvalidArgument, NotFound
from legato.server.events import DEFAULT_BUFFER, EventBus
from legato.server.leases import LeaseReaper
from legato.server.model import DAEMON_ACTOR, Clock, Event, Status, TaskRecord, system_clock
from legato.server.store import Store, TaskQuery

BACKLOG_BATCH = 500


def new_task_id() -> str:
    return "t_" + secrets.token_urlsafe(16)


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
    """The daemon's task operations over a store, an event bus and the lease reaper."""

    def __init__(self, store: Store, bus: EventBus, clock: Clock):
        self._store = store
        self.bus = bus
        self._clock = clock
        self._reaper = LeaseReaper(
            expire=self._expire_leases, next_expiry=store.next_lease_expiry, clock=clock
        )
        store.on_commit = self._committed

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        durability: Durability = Durability.NORMAL,
        clock: Clock = system_clock,
        watch_buffer: int = DEFAULT_BUFFER,
    ) -> TaskManager:
        """Opens the database at `path` and starts ending expired leases."""
        store = await Store.open(path, durability=durability)
        manager = cls(store, EventBus(watch_buffer), clock)
        manager._reaper.start()
        return manager

    async def close(self) -> None:
        """Ends watch streams, stops the reaper and closes the database."""
        self.bus.close()
        await self._reaper.stop()
        await self._store.close()

    @property
    def store(self) -> Store:
        return self._store

    def _committed(self, events: list[Event]) -> None:
        self.bus.publish(events)
        for event in events:
            if event.task.status is Status.CLAIMED and event.task.lease_expires_at is not None:
                self._reaper.lease_set(event.task.lease_expires_at)

    async def _expire_leases(self, now: int) -> int:
        return await self._store.expire_leases(
            now, lambda task: lifecycle.expire(task, now=now), actor=DAEMON_ACTOR
        )

    # -- operations ---------------------------------------------------------------

    async def create(
        self,
        *,
        content: str,
        labels: Sequence[str],
        context: bytes,
        actor: str,
        parent_id: str = "",
        idempotency_key: str = "",
        max_attempts: int = 0,
    ) -> tuple[TaskRecord, bool]:
        """Creates a task; returns it and whether it is new (False: idempotent repeat)."""
        now = self._clock()
        task = TaskRecord(
            id=new_task_id(),
            content=limits.check_text("content", content, limits.MAX_CONTENT_BYTES, required=True),
            labels=limits.check_labels("labels", labels, required=True),
            context=limits.check_blob("context", context),
            created_by=actor,
            created_at=now,
            updated_at=now,
            max_attempts=limits.check_max_attempts(max_attempts),
            parent_id=limits.check_id("parent_id", parent_id, required=False),
            idempotency_key=limits.check_text(
                "idempotency_key", idempotency_key, limits.MAX_IDEMPOTENCY_KEY
            ),
        )
        return await self._store.create_task(task)

    async def get(self, task_id: str) -> TaskRecord:
        task = await self._store.get_task(limits.check_id("id", task_id))
        if task is None:
            raise NotFound(f"task {task_id!r} not found")
        return task

    async def list(
        self,
        *,
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
            )
        )
        next_token = "" if page.next_position is None else _encode_page_token(page.next_position)
        return page.tasks, next_token, page.cursor

    async def claim(
        self, *, labels: Sequence[str], task_id: str, lease_us: int | None, actor: str
    ) -> TaskRecord | None:
        """Claims the task `task_id`, or the oldest pending one with any of `labels`."""
        lease = limits.check_lease("lease", lease_us) or limits.DEFAULT_LEASE_US
        checked_labels = limits.check_labels("labels", labels, required=not task_id)
        token, now = new_lease_token(), self._clock()

        def decide(task: TaskRecord) -> lifecycle.Change:
            return lifecycle.claim(task, actor=actor, lease_token=token, lease_us=lease, now=now)

        if task_id:
            return await self._store.update(limits.check_id("id", task_id), decide, actor=actor)
        return await self._store.claim_next(checked_labels, decide, actor=actor)

    async def heartbeat(
        self, *, task_id: str, lease_token: str, lease_us: int | None, actor: str
    ) -> tuple[TaskRecord, bool]:
        """Extends a lease; returns the task and whether it was canceled meanwhile."""
        lease = limits.check_lease("lease", lease_us)
        now = self._clock()

        def decide(task: TaskRecord) -> lifecycle.Change | None:
            if lifecycle.holds_canceled_claim(task, lease_token):
                return None
            return lifecycle.heartbeat(task, lease_token=lease_token, lease_us=lease, now=now)

        task = await self._store.update(limits.check_id("id", task_id), decide, actor=actor)
        return task, task.status is Status.CANCELED

    async def complete(
        self, *, task_id: str, lease_token: str, result: bytes, actor: str
    ) -> TaskRecord:
        limits.check_blob("result", result)
        now = self._clock()
        return await self._store.update(
            limits.check_id("id", task_id),
            lambda task: lifecycle.complete(task, lease_token=lease_token, result=result, now=now),
            actor=actor,
        )

    async def fail(
        self, *, task_id: str, lease_token: str, error: str, retryable: bool, actor: str
    ) -> TaskRecord:
        limits.check_text("error", error, limits.MAX_TEXT_BYTES, required=True)
        now = self._clock()
        return await self._store.update(
            limits.check_id("id", task_id),
            lambda task: lifecycle.fail(
                task, lease_token=lease_token, error=error, retryable=retryable, now=now
            ),
            actor=actor,
        )

    async def cancel(self, *, task_id: str, reason: str, actor: str) -> TaskRecord:
        limits.check_text("reason", reason, limits.MAX_TEXT_BYTES)
        now = self._clock()
        return await self._store.update(
            limits.check_id("id", task_id),
            lambda task: lifecycle.cancel(task, reason=reason, now=now),
            actor=actor,
        )

    async def watch(
        self, *, labels: Sequence[str], task_ids: Sequence[str], after_seq: int | None
    ) -> AsyncGenerator[Event, None]:
        """Events of the matching tasks in seq order: stored ones after `after_seq`, then live.

        Subscribes before reading the backlog, so an event committed meanwhile is
        in one or the other (or both: the live copy is dropped by its seq).
        Raises `SubscriptionOverflow` if the consumer falls too far behind.
        """
        checked_labels = limits.check_labels("labels", labels, required=False)
        if len(task_ids) > limits.MAX_WATCH_TASK_IDS:
            raise InvalidArgument(
                f"task_ids has {len(task_ids)} ids; the limit is {limits.MAX_WATCH_TASK_IDS}"
            )
        ids = [limits.check_id("task_ids", task_id) for task_id in task_ids]
        if not checked_labels and not ids:
            raise InvalidArgument("give labels or task_ids to watch")
        if after_seq is not None and after_seq < 0:
            raise InvalidArgument(f"after_seq must be 0 or more; got {after_seq}")
        sub = self.bus.subscribe(checked_labels, ids)
        try:
            last = after_seq
            while last is not None:
                batch = await self._store.events_after(
                    last, labels=checked_labels, task_ids=ids, limit=BACKLOG_BATCH
                )
                for event in batch:
                    yield event
                    last = event.seq
                if len(batch) < BACKLOG_BATCH:
                    break
            while True:
                event = await sub.get()
                if last is not None and event.seq <= last:
                    continue
                yield event
                last = event.seq
        finally:
            self.bus.unsubscribe(sub)
