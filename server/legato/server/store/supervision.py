"""What the database threads of both backends share (`db.Database` for SQLite,
`store.pgdb.PgDatabase` for PostgreSQL): answering a committed group, and what
follows once a thread dies — the database has failed, and no call waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Generic, Protocol, TypeVar

from legato.server.store import CommittedUnpublished, DatabaseFailed

log = logging.getLogger(__name__)


C = TypeVar("C")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Batch(Generic[C]):
    """How a write can share one statement with like writes of its group.

    `run(conn, items)` writes the `item` of each of several writes with the
    same `key` at once and returns their outcomes in order. It is all or
    nothing: if it raises (whatever the cause), what it wrote is rolled back
    and each write runs on its own (its `fn`), which gives each its own answer.
    """

    key: object
    item: Any
    run: Callable[[C, list[Any]], list[Any]]


class BatchDeclined(Exception):
    """Raised by a `Batch.run` for a set it will not write whole (a key used
    before, a cap): each write then runs alone, as expected, without a warning."""


class _Batched(Protocol):
    @property
    def batch(self) -> Batch[Any] | None: ...

    outcome: Any


J = TypeVar("J", bound=_Batched)


def write_sets(
    group: Sequence[J], done: list[J], write_set: Callable[[Batch[Any], list[J]], list[Any] | None]
) -> list[J]:
    """Writes together the group's writes that share a `Batch` key, each set by
    `write_set` (in its savepoint; None if the set could not be made whole),
    and adds them to `done`; returns the writes left to run one by one (their
    set failed, or they have no set), in their order.

    The writes of a set commit before the writes left, in the same
    transaction: their order within the group is not their callers' order,
    as it is not for callers that were waiting at the same moment anyway.
    """
    together, left = batch_sets(group)
    failed: list[J] = []
    for jobs in together:
        batch = jobs[0].batch
        assert batch is not None
        outcomes = write_set(batch, jobs)
        if outcomes is None:
            failed.extend(jobs)
            continue
        for job, outcome in zip(jobs, outcomes, strict=True):
            job.outcome = outcome
        done.extend(jobs)
    # `left` is in the group's order already: only a failed set needs sorting in.
    return _in_order(group, [*left, *failed]) if failed else left


def batch_sets(group: Sequence[J]) -> tuple[list[list[J]], list[J]]:
    """The sets of two or more writes of `group` that share a `Batch` key, and
    the writes left to run one by one, in their order."""
    sets: dict[object, list[J]] = {}
    for job in group:
        if job.batch is not None:
            sets.setdefault(job.batch.key, []).append(job)
    together = [jobs for jobs in sets.values() if len(jobs) > 1]
    batched = {id(job) for jobs in together for job in jobs}
    return together, [job for job in group if id(job) not in batched]


def run_set(batch: Batch[C], conn: C, jobs: Sequence[J]) -> list[Any]:
    """`batch.run` on the items of `jobs`; raises if it does not answer each
    (inside the set's savepoint, so that the set then runs one by one)."""
    outcomes = batch.run(conn, [job.batch.item for job in jobs if job.batch is not None])
    if len(outcomes) != len(jobs):
        raise RuntimeError(f"{len(outcomes)} outcomes for {len(jobs)} writes")
    return outcomes


def _in_order(group: Sequence[J], jobs: Iterable[J]) -> list[J]:
    """`jobs` (writes of `group`) in the order they have in `group`."""
    position = {id(job): n for n, job in enumerate(group)}
    return sorted(jobs, key=lambda job: position[id(job)])


class Job(Protocol):
    """One call waiting on a database thread (each backend has its own shape)."""

    future: asyncio.Future[Any]
    after_commit: Callable[[Any], None] | None
    outcome: Any
    error: BaseException | None


class Supervised:
    """Mixin of both databases. Their constructors set `_loop`, `_failure = None`,
    `_failed` (a future of the loop) and `_refusing = False`; `_queues` names the
    queues their threads take calls from."""

    _loop: asyncio.AbstractEventLoop
    _failure: DatabaseFailed | None
    _failed: asyncio.Future[DatabaseFailed]
    _refusing: bool

    def _queues(self) -> Sequence[SimpleQueue[Any]]:
        raise NotImplementedError

    @property
    def failure(self) -> DatabaseFailed | None:
        """Why the database failed, or None while it has not."""
        return self._failure

    async def failed(self) -> DatabaseFailed:
        """Waits until the database fails and returns why; on a clean close it never does."""
        return await asyncio.shield(self._failed)

    def _deliver(self, group: Sequence[Job]) -> None:
        """On the loop, after the group committed: publishes, then answers each call."""
        unpublished: BaseException | None = None
        for job in group:
            if job.error is None and job.after_commit is not None:
                # Each callback on its own: the rest of the group committed too,
                # and is still published and answered.
                try:
                    job.after_commit(job.outcome)
                except BaseException as exc:
                    unpublished = unpublished or exc
                    job.error = CommittedUnpublished(f"publishing it raised {describe(exc)}")
        if unpublished is not None:
            # Watchers missed an event: the daemon can no longer be trusted to
            # tell them, so it fails (before answering, so that health says so first).
            self._fail(f"a post-commit callback raised {describe(unpublished)}", unpublished, ())
        for job in group:
            if job.future.done():  # the caller was cancelled; the write stands
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.outcome)

    def _died(self, role: str, exc: BaseException, in_hand: Sequence[Job]) -> None:
        # On the dying thread: the loop owns the futures, so it does the rest. It
        # runs after any delivery this thread scheduled before, so a job it had
        # already answered is left as it is.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(
                self._fail, f"its {role} thread died: {describe(exc)}", exc, list(in_hand)
            )

    def _fail(self, reason: str, exc: BaseException, in_hand: Iterable[Job]) -> None:
        """Fails the database, on the loop: answers every call waiting on it."""
        if self._failure is None:
            log.error(
                "the database failed: %s; answering every pending call UNAVAILABLE, "
                "the daemon stops",
                reason,
                exc_info=exc,
            )
            self._failure = DatabaseFailed(reason)
            self._refusing = True
            self._failed.set_result(self._failure)
        else:
            log.error("the database failed again: %s", reason, exc_info=exc)
        for job in in_hand:
            self._refuse(job)
        # Calls queued but not taken: a dead thread will never take them. A live
        # one may race us for them, which is fine: each job is taken once.
        for queue in self._queues():
            stops = 0
            while True:
                try:
                    queued = queue.get_nowait()
                except Empty:
                    break
                if queued is None:
                    stops += 1
                else:
                    self._refuse(queued)
            for _ in range(stops):  # close()'s, for the threads still alive
                queue.put(None)

    def _refusal(self) -> Exception:
        # A new exception for every caller: one shared instance would collect
        # the traceback of each task it is raised in.
        if self._failure is not None:
            return DatabaseFailed(self._failure.reason)
        return RuntimeError("the database is closed")

    def _refuse(self, job: Job) -> None:
        if not job.future.done():
            job.future.set_exception(self._refusal())
