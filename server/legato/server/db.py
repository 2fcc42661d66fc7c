"""SQLite access on dedicated threads, one whole transaction per hop.

Every write is a function run on the single writer thread inside
`BEGIN IMMEDIATE ... COMMIT`; the awaiting coroutine gets its answer only after
COMMIT. Writes that queue up while a commit is under way are committed
together (group commit): each runs inside its own SAVEPOINT, so one that raises
is rolled back alone, and all of them share one COMMIT and one sync. Writes of
one kind that say how (`Batch`: the creates) are made together, a few
statements for the whole set instead of a few per write, in one savepoint, all
or none; if the set cannot be made whole, each runs on its own as any other.

Running whole transactions as one function is what makes the usual asyncio
SQLite traps impossible here: no two coroutines interleave statements inside
one transaction, and cancelling a caller cannot leave a transaction open (the
function runs to COMMIT or ROLLBACK on its thread whatever the caller does).
Reads run on their own connections and threads, so they never wait behind a
write's sync, and WAL gives each read a consistent snapshot. A read of one row
by key is the exception (`read_on_loop`): it runs on the event loop, where it
costs less than the hop to a thread and back.

The threads are supervised: if one dies (or a post-commit callback raises),
the database fails as a whole. Every call waiting on it is answered with
`DatabaseFailed`, every later call gets it at once, and `failed()` tells the
daemon, which stops serving so that it is restarted; no caller is left waiting
on a thread that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Generic, TypeVar

from legato.server.store import CommittedUnpublished, DatabaseFailed, Durability
from legato.server.store.supervision import (
    Batch,
    BatchDeclined,
    Supervised,
    run_set,
    write_sets,
)

T = TypeVar("T")

# Defined with the storage seam, where both backends find them; named here too,
# where the supervision that raises them lives.
__all__ = ["CommittedUnpublished", "Database", "DatabaseFailed", "Durability", "InjectedFault"]

log = logging.getLogger(__name__)

# How many queued writes may share one transaction. Bounds the latency a write
# adds to the others of its group.
MAX_GROUP = 256
# Commits between two WAL checkpoints. SQLite's own automatic checkpoint runs
# inside the commit that crosses its threshold and stalls every caller waiting
# on that commit (it showed as the p99 tail of a single create); checkpoints run
# on their own thread and connection instead, which writers do not wait for.
CHECKPOINT_EVERY = 500
# How long the writer waits for more writes before a commit, only while writes
# arrive concurrently (the last commit carried more than one). Measured in the
# CreateTask ladder at 32 in flight: 1 ms raised writes per commit from about
# 2 to about 7 and cut server CPU per create by ~110 us (~1.2x the calls/s);
# a lone caller never waits.
GATHER_SECONDS = 0.001


# The test hook that makes one part of a real daemon's database fail on purpose;
# see `InjectedFault.from_env`.
FAULT_ENV = "LEGATO_INJECT_FAULT"


class FaultPart(StrEnum):
    """The parts of the database a test can make fail."""

    WRITER = "writer"
    CHECKPOINT = "checkpoint"
    AFTER_COMMIT = "after_commit"


@dataclass(frozen=True)
class InjectedFault:
    """A test hook: `part` fails once, after it has worked `after` times.

    `writer`: the writer thread raises instead of committing its next group
    once it has committed `after` groups. `checkpoint`: the checkpoint thread
    raises instead of running its checkpoint number `after + 1`. `after_commit`:
    the post-commit callback of the write number `after + 1` that has one raises,
    after that write committed.

    No real fault was found that makes these threads die (every error SQLite
    raises is handed to the callers), so the tests that prove the daemon
    survives such a death arm this instead.
    """

    part: FaultPart
    after: int

    @classmethod
    def from_env(cls) -> InjectedFault | None:
        """The fault `LEGATO_INJECT_FAULT=PART:N` asks for (e.g. `writer:40`), if any."""
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return None
        part, _, after = spec.partition(":")
        try:
            return cls(FaultPart(part), int(after))
        except ValueError:
            raise ValueError(
                f"{FAULT_ENV}={spec!r}: expected PART:N with PART one of "
                f"{', '.join(FaultPart)} and N a number of successes before the fault"
            ) from None


class InjectedFailure(Exception):
    """What an `InjectedFault` raises."""


@dataclass
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    after_commit: Callable[[T], None] | None = None
    batch: Batch[sqlite3.Connection] | None = None
    outcome: T | None = None
    error: BaseException | None = field(default=None)


def connect(path: Path, durability: Durability, *, readonly: bool = False) -> sqlite3.Connection:
    """Opens a connection configured for the daemon (WAL, autocommit mode).

    `isolation_level=None` stops the sqlite3 module from opening implicit
    DEFERRED transactions: a deferred transaction that reads then writes gets
    SQLITE_BUSY at once instead of waiting, so writers issue `BEGIN IMMEDIATE`.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {durability.value.upper()}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # see CHECKPOINT_EVERY
    return conn


class Database(Supervised):
    """A SQLite database file served by one writer thread and a few reader threads."""

    def __init__(self, path: Path, *, durability: Durability = Durability.NORMAL, readers: int = 2):
        self.path = path
        self.durability = durability
        self._loop = asyncio.get_running_loop()
        self._writes: SimpleQueue[_Job[Any] | None] = SimpleQueue()
        self._reads: SimpleQueue[_Job[Any] | None] = SimpleQueue()
        # Create the file under a private umask: the database, its WAL and SHM
        # hold every task and must be readable by the owner only.
        old_umask = os.umask(0o077)
        try:
            self._writer_conn = connect(path, durability)
            self._reader_conns = [connect(path, durability, readonly=True) for _ in range(readers)]
            self._checkpoint_conn = connect(path, durability)
            self._loop_conn = connect(path, durability, readonly=True)
            # Never wait for a lock on the loop: a busy read moves to a thread.
            self._loop_conn.execute("PRAGMA busy_timeout = 0")
        finally:
            os.umask(old_umask)
        self._checkpoint_due = threading.Event()
        self._stopping = False
        self._closed = False
        self._failure: DatabaseFailed | None = None
        self._failed: asyncio.Future[DatabaseFailed] = self._loop.create_future()
        # Closed or failed: one flag, so a call pays a single check for both.
        self._refusing = False
        self._threads = [
            threading.Thread(target=self._writer, name="legato-db-writer", daemon=True),
            threading.Thread(target=self._checkpointer, name="legato-db-checkpoint", daemon=True),
            *(
                threading.Thread(
                    target=self._reader, args=(c,), name="legato-db-reader", daemon=True
                )
                for c in self._reader_conns
            ),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        durability: Durability = Durability.NORMAL,
        fault: InjectedFault | None = None,
    ) -> Database:
        """Opens the database at `path`; with `fault` (default: from LEGATO_INJECT_FAULT),
        one whose `fault.part` fails on purpose, for tests."""
        fault = fault or InjectedFault.from_env()
        if fault is None:
            return cls(path, durability=durability)
        log.warning("test hook %s armed: the database will fail on purpose (%s)", FAULT_ENV, fault)
        return _FaultyDatabase(path, fault, durability=durability)

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        after_commit: Callable[[T], None] | None = None,
        batch: Batch[sqlite3.Connection] | None = None,
    ) -> T:
        """Runs `fn` in a write transaction and returns its value once committed.

        `after_commit` runs on the event loop right after the commit, in commit
        order across all writes, before any caller is answered: the place to
        publish what the write changed. With `batch`, the write may be made
        together with like writes of its group, by `batch.run`, instead of by `fn`.
        """
        return await self._submit(self._writes, fn, after_commit, batch)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn` on a reader connection; it may open its own read transaction."""
        return await self._submit(self._reads, fn, None, None)

    async def read_on_loop(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `fn` on the event loop itself; for reads of a row or two by key.

        GetTask at 32 in flight spent about 15 % less server CPU per call this
        way (`python -m bench.ab`, BENCHMARKS.md): the hop to a reader thread
        and back (two wake-ups, the GIL handed over twice) costs more than an
        indexed lookup. WAL readers take no lock a writer holds, so the read
        never waits for a commit; the rare lock it would wait for (another
        process holding the file exclusively, WAL recovery) makes it fall back
        to a reader thread instead of stalling the loop. `fn` must be bounded:
        a read of one task costs at most what serializing that task costs.
        """
        if self._refusing:
            raise self._refusal()
        conn = self._loop_conn
        try:
            return fn(conn)
        except sqlite3.OperationalError as exc:
            # The primary code: WAL recovery is SQLITE_BUSY_RECOVERY, say.
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return await self.read(fn)

    async def _submit(
        self,
        queue: SimpleQueue[_Job[Any] | None],
        fn: Callable[[sqlite3.Connection], T],
        after_commit: Callable[[T], None] | None,
        batch: Batch[sqlite3.Connection] | None,
    ) -> T:
        if self._refusing:
            raise self._refusal()
        future: asyncio.Future[T] = self._loop.create_future()
        queue.put(_Job(fn, future, after_commit, batch))
        return await future

    def _gather(self, group: list[_Job[Any]]) -> bool:
        """Adds queued writes to `group` (up to MAX_GROUP); True if told to stop."""
        while len(group) < MAX_GROUP:
            try:
                job = self._writes.get_nowait()
            except Empty:
                return False
            if job is None:
                return True
            group.append(job)
        return False

    def _writer(self) -> None:
        conn = self._writer_conn
        commits = 0
        # The group in hand when the thread dies is answered by `_fail`; kept in a
        # local the loop assigns anyway, so supervision costs a commit nothing.
        group: list[_Job[Any]] = []
        previous = 0  # how many writes the last commit carried
        try:
            while True:
                first = self._writes.get()
                if first is None:
                    break
                group = [first]
                stop = self._gather(group)
                if not stop and previous > 1 and self._writes.empty():
                    # Writes are arriving concurrently but none is queued yet:
                    # a moment's wait lets the next few share this commit (and
                    # its sync). A lone writer (previous == 1) never waits.
                    time.sleep(GATHER_SECONDS)
                    stop = self._gather(group)
                previous = len(group)
                self._commit_group(conn, group)
                commits += 1
                if commits % CHECKPOINT_EVERY == 0:
                    self._checkpoint_due.set()
                if stop:
                    break
            conn.close()
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()  # rolls back a transaction the writer died in
            self._died("writer", exc, group)
        finally:
            self._stopping = True
            self._checkpoint_due.set()

    def _checkpointer(self) -> None:
        conn = self._checkpoint_conn
        try:
            while True:
                self._checkpoint_due.wait()
                self._checkpoint_due.clear()
                if self._stopping:
                    break
                self._checkpoint(conn)
            # The writer is done: fold the whole WAL back and truncate it, so the
            # database file alone is complete after a clean stop.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            # Nobody waits on this thread, but without it the WAL grows without
            # end: the daemon must stop and be restarted all the same.
            self._died("checkpoint", exc, ())

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        # PASSIVE: copies what it can without blocking readers or the writer.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> None:
        done: list[_Job[Any]] = []  # in the order they were written: seq order
        try:
            conn.execute("BEGIN IMMEDIATE")
            write_set = functools.partial(self._write_set, conn)
            for job in write_sets(group, done, write_set):
                done.append(job)
                conn.execute("SAVEPOINT job")
                try:
                    job.outcome = job.fn(conn)
                except BaseException as exc:  # handed to the caller
                    conn.execute("ROLLBACK TO job")
                    job.error = exc
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except BaseException as exc:  # nothing of the group committed
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in group:
                job.outcome, job.error = None, exc
            done = group
        self._loop.call_soon_threadsafe(self._deliver, done)

    @staticmethod
    def _write_set(
        conn: sqlite3.Connection, batch: Batch[sqlite3.Connection], jobs: list[_Job[Any]]
    ) -> list[Any] | None:
        """One set of `write_sets`, in its savepoint; None: each write runs alone."""
        conn.execute("SAVEPOINT batch")
        try:
            outcomes = run_set(batch, conn, jobs)
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite ended the transaction itself (disk full, I/O): the group fails
            if not isinstance(exc, BatchDeclined):
                log.warning(
                    "a set of %d writes failed together; running them one by one",
                    len(jobs),
                    exc_info=exc,
                )
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
            return None
        conn.execute("RELEASE batch")
        return outcomes

    def _reader(self, conn: sqlite3.Connection) -> None:
        job: _Job[Any] | None = None
        try:
            while True:
                job = self._reads.get()
                if job is None:
                    break
                try:
                    job.outcome = job.fn(conn)
                except BaseException as exc:  # handed to the caller
                    job.error = exc
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                self._loop.call_soon_threadsafe(self._deliver, [job])
            conn.close()
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._died("reader", exc, () if job is None else (job,))

    def _queues(self) -> Sequence[SimpleQueue[Any]]:
        return (self._writes, self._reads)

    async def close(self) -> None:
        """Finishes queued work, then closes every connection."""
        if self._closed:
            return
        self._closed = True
        self._refusing = True
        self._writes.put(None)
        for _ in self._reader_conns:
            self._reads.put(None)
        await asyncio.to_thread(self._join)
        self._loop_conn.close()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()


class _FaultyDatabase(Database):
    """A `Database` whose part `fault.part` fails once, after `fault.after` successes.

    A subclass rather than a check in the real code paths: the writer's
    per-commit work stays what it is when no fault is armed.
    """

    def __init__(self, path: Path, fault: InjectedFault, *, durability: Durability):
        # Before the threads start: they may reach the fault at once.
        self._fault = fault
        self._successes = itertools.count()
        super().__init__(path, durability=durability)

    def _trip(self, part: FaultPart) -> None:
        if self._fault.part is part and next(self._successes) == self._fault.after:
            raise InjectedFailure(f"{FAULT_ENV}={part}:{self._fault.after}: the injected fault")

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> None:
        self._trip(FaultPart.WRITER)
        super()._commit_group(conn, group)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        self._trip(FaultPart.CHECKPOINT)
        super()._checkpoint(conn)

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        after_commit: Callable[[T], None] | None = None,
        batch: Batch[sqlite3.Connection] | None = None,
    ) -> T:
        if after_commit is None or self._fault.part is not FaultPart.AFTER_COMMIT:
            return await super().write(fn, after_commit=after_commit, batch=batch)
        publish = after_commit

        def publish_or_fail(outcome: T) -> None:
            self._trip(FaultPart.AFTER_COMMIT)
            publish(outcome)

        return await super().write(fn, after_commit=publish_or_fail, batch=batch)
