"""PostgreSQL access for one daemon: a writer thread with group commit, pooled
readers, a listening connection, and the database's clock.

Writes follow the SQLite backend's `db.Database`: each is a function run on
the daemon's single writer thread, inside a transaction on the writer's own
connection, and the awaiting coroutine is answered after COMMIT. Writes that
queue up meanwhile share one transaction, each in its own SAVEPOINT (group
commit), so a busy daemon pays one commit, one sync and one turn of the event
counter (see `postgres`) for many writes. Writes of one kind that say how
(`Batch`: the creates) are made together in one statement, in one savepoint,
all or none; if that statement cannot make them all, each runs on its own as
any other write. Cancelling a caller cannot leave a
transaction open: the thread runs it to COMMIT or ROLLBACK whatever the caller
does.

Unlike SQLite, other daemons write the same tables at the same time. A write
inside a group never waits for a lock another transaction holds: it asks
with NOWAIT (`Tx.waits` False); if the lock is taken it raises `Contended`, is
rolled back to its savepoint, and runs again alone right after the group
commits, where it may wait. A transaction that waits then holds only its own
write's locks, so groups of several writes on several daemons cannot wait for
each other in a cycle.

Reads run on a small thread pool with connections from `psycopg_pool` (which
checks and replaces broken ones), so they never queue behind a write's commit.

When the writer's connection breaks (the server restarted, the backend was
terminated, the network dropped), the writer reconnects: the writes it held
are answered UNAVAILABLE (`ConnectionLost`: they may or may not have
committed), the writes queued behind them wait, and the daemon says
NOT_SERVING (`on_connection`) until the writer is connected again. An idle
writer notices a broken connection within `IDLE_CHECK_S`, so the daemon does
not say SERVING for long over a connection it could not write on. If the
server cannot be reached again within `RECONNECT_S`, the database fails.

The writer is supervised as in `db.Database`: if its thread dies (it could not
reconnect, say) or a post-commit callback raises, the database fails as a
whole, every waiting call is answered, and the daemon stops (exit 3) to be
restarted by its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, Generic, TypeVar

import grpc
import psycopg
import psycopg_pool
from legato.server.errors import DomainError
from legato.server.store import DatabaseFailed, Durability
from legato.server.store.supervision import Batch, Supervised, describe, run_set, write_sets

T = TypeVar("T")

log = logging.getLogger(__name__)

# How many queued writes may share one transaction (as in `db.MAX_GROUP`).
MAX_GROUP = 256
# Connections for reads, each on its own thread.
READERS = 4
# How often the offset to the database's clock is measured again.
CLOCK_SYNC_S = 10.0
# The longest a write alone waits for a row lock held elsewhere. The writer
# thread waits with it, so the daemon's other writes wait too: other daemons
# hold their locks for a commit's time, but a session left open by hand
# must not stall this daemon for longer than this.
LOCK_TIMEOUT = "5s"
# The listening connection's reconnect backoff, first and longest.
LISTEN_RETRY_S = (0.05, 2.0)
# How long the writer tries to connect again after its connection broke before
# the database fails and the daemon stops; and its backoff, first and longest.
# Long enough for a server restart or a failover; `RECONNECT_ENV` overrides it.
RECONNECT_S = 30.0
RECONNECT_RETRY_S = (0.05, 1.0)
RECONNECT_ENV = "LEGATO_PG_RECONNECT_SECONDS"
# How often an idle writer looks at its connection (a local poll, no round trip).
IDLE_CHECK_S = 0.5


class Contended(Exception):
    """A write inside a group met a lock another transaction holds; it runs again alone."""


class LockBusy(DomainError):
    """A write waited `LOCK_TIMEOUT` for a row another transaction holds; nothing was changed."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__(
            "the task is held by another transaction on the database for too long; nothing "
            "was changed: retry"
        )


class ConnectionLost(DomainError):
    """The writer's connection broke while it held this write; it reconnects.

    UNAVAILABLE: the write may or may not have been committed (the COMMIT may
    have reached the server just before the connection broke), as with a
    daemon that died after its commit and before its answer.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            f"the connection to the database broke while this change was being written "
            f"({type(exc).__name__}: {exc}); it may or may not have been made: read it back, "
            "or retry (a create with the same idempotency key is answered with the task it "
            "made, if it did)"
        )


class _Broken(Exception):
    """The writer's connection broke: `in_hand` are the writes not answered yet."""

    def __init__(self, cause: BaseException, in_hand: list[_Job[Any]]):
        super().__init__(str(cause))
        self.cause = cause
        self.in_hand = in_hand


class DatabaseUnavailable(DomainError):
    """A read could not reach the database; nothing was changed."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, exc: BaseException) -> None:
        super().__init__(
            f"the database did not answer ({type(exc).__name__}: {exc}); nothing was changed: retry"
        )


@dataclass(frozen=True, slots=True)
class Tx:
    """The transaction a write runs in: its connection (in pipeline mode), and
    whether it may wait for locks.

    In pipeline mode a statement is sent when a result is first fetched, with
    every statement queued before it, in one round trip: a write queues what
    it can before it fetches (`fetched`).
    """

    conn: psycopg.Connection[Any]
    waits: bool

    @property
    def nowait(self) -> str:
        """What to append to a locking clause: "NOWAIT" inside a group, else ""."""
        return "" if self.waits else " NOWAIT"

    def advisory_sql(self) -> str:
        """The statement that takes a transaction-scoped advisory lock (one
        parameter, the key); inside a group it tries, answering whether it got it."""
        if self.waits:
            return "SELECT true FROM pg_advisory_xact_lock(%s)"
        return "SELECT pg_try_advisory_xact_lock(%s)"

    def fetched(self, fetch: Callable[[], T]) -> T:
        """Runs `fetch` (which sends what is queued); `Contended` if, inside a
        group, a lock was held elsewhere; `LockBusy` if, alone, it waited
        longer than `LOCK_TIMEOUT`."""
        try:
            return fetch()
        except psycopg.errors.LockNotAvailable as exc:
            if self.waits:
                raise LockBusy() from exc
            raise Contended(str(exc)) from exc

    def locked_one(self, sql: str, params: Sequence[Any]) -> Any:
        """The row of a locking SELECT (its clause ends in `self.nowait`), or None."""
        return self.fetched(self.conn.execute(sql, params).fetchone)

    def locked_all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of a locking SELECT (its clause ends in `self.nowait`)."""
        return self.fetched(self.conn.execute(sql, params).fetchall)

    def got_advisory(self, cursor: psycopg.Cursor[Any]) -> None:
        """Checks the answer of `advisory_sql`: `Contended` if the lock was not had."""
        row = self.fetched(cursor.fetchone)
        if row is None or not row[0]:
            raise Contended("an advisory lock is held by another transaction")


# See `PgDatabase`.
BeforeCommit = Callable[[psycopg.Connection[Any], list[Any]], Callable[[], None]]


def _awaiting(pipeline: psycopg.Pipeline) -> bool:
    """Whether statements were sent or queued whose results are not in yet."""
    commands = getattr(pipeline, "command_queue", None)
    results = getattr(pipeline, "result_queue", None)
    if commands is None or results is None:  # another psycopg: be safe
        return True
    return bool(commands) or bool(results)


@dataclass
class _Job(Generic[T]):
    fn: Callable[[Tx], T]
    future: asyncio.Future[T]
    after_commit: Callable[[T], None] | None = None
    batch: Batch[Tx] | None = None
    outcome: T | None = None
    error: BaseException | None = field(default=None)


class DbClock:
    """The database's clock (`clock_timestamp()`), in microseconds, read locally.

    Leases and deadlines are written by one daemon and checked by another:
    they must be measured on one clock, the database's. Asking it on every
    call would cost a round trip, so the offset between this process's
    monotonic clock and the database's is measured (at the smallest round trip
    of a few tries) on connect and every `CLOCK_SYNC_S`; a step of the local
    wall clock changes nothing. Never goes back.
    """

    def __init__(self) -> None:
        self._offset_us = time.time_ns() // 1000 - time.monotonic_ns() // 1000
        self._last = 0
        self.uncertainty_us = 0

    def __call__(self) -> int:
        now = time.monotonic_ns() // 1000 + self._offset_us
        if now <= self._last:
            return self._last
        self._last = now
        return now

    def measure(self, conn: psycopg.Connection[Any], tries: int = 5) -> None:
        best: tuple[int, int] | None = None
        for _ in range(tries):
            before = time.monotonic_ns() // 1000
            row = conn.execute(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
            ).fetchone()
            after = time.monotonic_ns() // 1000
            assert row is not None
            round_trip = after - before
            offset = int(row[0]) - (before + after) // 2
            if best is None or round_trip < best[0]:
                best = (round_trip, offset)
        assert best is not None
        self.uncertainty_us = best[0] // 2
        self._offset_us = best[1]


class PgDatabase(Supervised):
    """A PostgreSQL database as one daemon uses it (see the module docstring).

    `before_commit` runs on the writer thread inside each transaction, after
    its writes and before COMMIT, with the outcomes of the writes that
    succeeded, in order: the place to take what must be taken last (the event
    counter). It queues its statements and returns what fetches their
    results, which runs once COMMIT is queued behind them: one round trip.
    """

    def __init__(
        self,
        url: str,
        writer: psycopg.Connection[Any],
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]],
        clock: DbClock,
        before_commit: BeforeCommit,
        *,
        durability: Durability = Durability.NORMAL,
        reconnect_s: float = RECONNECT_S,
    ):
        # Called on the writer thread with the outcomes of the writes of each
        # transaction once its COMMIT succeeded, before they are delivered.
        self.committed: Callable[[list[Any]], None] = lambda outcomes: None
        # Called on the event loop with False when the writer's connection broke
        # and with True once it is connected again.
        self.on_connection: Callable[[bool], None] = lambda connected: None
        self.url = url
        self.clock = clock
        self.durability = durability
        self._loop = asyncio.get_running_loop()
        self._writer_conn = writer
        self.writer_connects = 1
        self._reconnect_s = reconnect_s
        # Set by `close`: a writer trying to reconnect gives up at once.
        self._closing = threading.Event()
        self._pool = pool
        self._before_commit = before_commit
        self._writes: SimpleQueue[_Job[Any] | None] = SimpleQueue()
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="legato-pg-reader")
        self._closed = False
        self._refusing = False
        self._failure: DatabaseFailed | None = None
        self._failed: asyncio.Future[DatabaseFailed] = self._loop.create_future()
        self._thread = threading.Thread(target=self._writer, name="legato-pg-writer", daemon=True)
        self._thread.start()
        self._clock_sync = self._loop.create_task(self._sync_clock(), name="legato-pg-clock")

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        durability: Durability,
        before_commit: BeforeCommit,
        prepare: Callable[[psycopg.Connection[Any]], None] = lambda conn: None,
    ) -> PgDatabase:
        """Connects, runs `prepare` (the migration) on the writer connection, opens the readers."""
        reconnect_s = _reconnect_seconds()  # a bad setting is refused before connecting

        def connect() -> tuple[psycopg.Connection[Any], DbClock]:
            writer = _connect_writer(url, durability)
            try:
                prepare(writer)
                clock = DbClock()
                clock.measure(writer)
            except BaseException:
                writer.close()
                raise
            return writer, clock

        writer, clock = await asyncio.to_thread(connect)
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=READERS,
            kwargs={"autocommit": True, "application_name": f"legato-reader-{os.getpid()}"},
            open=False,
            name="legato-readers",
        )
        try:
            await asyncio.to_thread(pool.open, wait=True, timeout=30.0)
        except BaseException:
            writer.close()
            await asyncio.to_thread(pool.close)
            raise
        return cls(
            url, writer, pool, clock, before_commit, durability=durability, reconnect_s=reconnect_s
        )

    # -- the calls ------------------------------------------------------------------

    async def write(
        self,
        fn: Callable[[Tx], T],
        *,
        after_commit: Callable[[T], None] | None = None,
        batch: Batch[Tx] | None = None,
    ) -> T:
        """Runs `fn` in a write transaction and returns its value once committed.

        `after_commit` runs on the event loop right after the commit, in commit
        order across this daemon's writes, before any caller is answered.
        With `batch`, the write may be made together with like writes queued
        beside it, in one statement (`Batch`), instead of by `fn`.
        """
        if self._refusing:
            raise self._refusal()
        future: asyncio.Future[T] = self._loop.create_future()
        self._writes.put(_Job(fn, future, after_commit, batch))
        return await future

    async def read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Runs `fn` on a pooled reader connection (autocommit: it may open its own
        transaction). UNAVAILABLE if the database cannot be reached."""
        if self._refusing:
            raise self._refusal()
        return await self._loop.run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        try:
            with self._pool.connection() as conn:
                return fn(conn)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc

    def connect(self, **kwargs: Any) -> Awaitable[psycopg.AsyncConnection[Any]]:
        """A new asyncio connection of its own (the listening one)."""
        return psycopg.AsyncConnection.connect(self.url, autocommit=True, **kwargs)

    def fail(self, reason: str, exc: BaseException) -> None:
        """Fails the database from the loop (a part above it cannot go on)."""
        self._fail(reason, exc, ())

    # -- the writer thread ----------------------------------------------------------

    def _writer(self) -> None:
        group: list[_Job[Any]] = []
        try:
            while True:
                try:
                    first = self._writes.get(timeout=IDLE_CHECK_S)
                except Empty:
                    if _lost(self._writer_conn):
                        self._reconnect(ConnectionError("the idle connection was closed"))
                    continue
                if first is None:
                    break
                group = [first]
                stop = False
                while len(group) < MAX_GROUP:
                    try:
                        job = self._writes.get_nowait()
                    except Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    group.append(job)
                if _lost(self._writer_conn):
                    # Noticed before anything of the group was sent: it waits
                    # for the new connection instead of failing.
                    self._reconnect(ConnectionError("the connection was closed"))
                try:
                    self._run_group(group)
                except _Broken as broken:
                    self._answer(broken.in_hand, ConnectionLost(broken.cause))
                    group = []
                    self._reconnect(broken.cause)
                if stop:
                    break
            self._writer_conn.close()
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                self._writer_conn.close()  # the server rolls back a transaction the writer died in
            self._died("writer", exc, group)

    def _run_group(self, group: list[_Job[Any]]) -> None:
        """Commits the group, then alone each write that met a lock inside it;
        `_Broken` with the writes not answered if the connection broke."""
        conn = self._writer_conn
        try:
            deferred = self._commit_group(conn, group, waits=False)
        except BaseException as exc:
            if _is_broken(conn, exc):
                raise _Broken(exc, group) from exc
            raise
        for n, alone in enumerate(deferred):
            try:
                self._commit_group(conn, [alone], waits=True)
            except BaseException as exc:
                if _is_broken(conn, exc):
                    raise _Broken(exc, deferred[n:]) from exc
                raise

    def _answer(self, jobs: list[_Job[Any]], error: BaseException) -> None:
        for job in jobs:
            job.outcome, job.error = None, error
        self._loop.call_soon_threadsafe(self._deliver, jobs)

    def _reconnect(self, cause: BaseException) -> None:
        """Connects the writer again, retrying for up to `RECONNECT_S`; raises (and
        the database fails) if it cannot, or if the database is being closed."""
        log.warning("the writer's connection to the database broke (%s); reconnecting", cause)
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self.on_connection, False)
        with contextlib.suppress(psycopg.Error):
            self._writer_conn.close()
        give_up_at = time.monotonic() + self._reconnect_s
        delay = RECONNECT_RETRY_S[0]
        while True:
            if self._closing.is_set():
                raise ConnectionError(f"closed while reconnecting after: {describe(cause)}")
            try:
                self._writer_conn = _connect_writer(self.url, self.durability)
                break
            except psycopg.OperationalError as exc:
                left = give_up_at - time.monotonic()
                if left <= 0:
                    raise ConnectionError(
                        f"could not reconnect within {self._reconnect_s:g} s after "
                        f"{describe(cause)}; last try: {describe(exc)}"
                    ) from exc
                self._closing.wait(min(delay, left))
                delay = min(delay * 2, RECONNECT_RETRY_S[1])
        self.writer_connects += 1
        log.warning("the writer is connected to the database again")
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.on_connection, True)

    def _commit_group(
        self, conn: psycopg.Connection[Any], group: list[_Job[Any]], *, waits: bool
    ) -> list[_Job[Any]]:
        """Commits the group; returns the writes that must run again alone."""
        savepoints = len(group) > 1
        # A write alone holds no one else's locks: it may wait for them.
        tx = Tx(conn, waits or not savepoints)
        deferred: list[_Job[Any]] = []
        done: list[_Job[Any]] = []
        finish: Callable[[], None] | None = None
        succeeded: list[Any] = []
        try:
            with conn.pipeline() as pipeline:
                conn.execute("BEGIN")
                alone = group
                if savepoints:
                    write_set = functools.partial(self._write_set, conn, pipeline, tx)
                    alone = write_sets(group, done, write_set)
                for job in alone:
                    if savepoints:
                        conn.execute("SAVEPOINT job")
                    try:
                        job.outcome = job.fn(tx)
                        if savepoints and _awaiting(pipeline):
                            # What the write queued last fails here, if it
                            # does, and not in the next write. (A write whose
                            # last statement was fetched has nothing left to
                            # fail: the server runs statements in order.)
                            pipeline.sync()
                    except Contended:
                        self._resync(pipeline)
                        if not savepoints:
                            conn.execute("ROLLBACK")
                            return [job]
                        conn.execute("ROLLBACK TO job")
                        deferred.append(job)
                        continue
                    except BaseException as exc:  # handed to the caller
                        self._check_connection(conn, exc)
                        job.error = exc
                        self._resync(pipeline)
                        if not savepoints:
                            conn.execute("ROLLBACK")
                            done.append(job)
                            break
                        conn.execute("ROLLBACK TO job")
                    if savepoints:
                        conn.execute("RELEASE job")
                    done.append(job)
                else:
                    succeeded = [job.outcome for job in done if job.error is None]
                    if succeeded:
                        finish = self._before_commit(conn, succeeded)
                    conn.execute("COMMIT")
                # Leaving the pipeline syncs: the counter's statement, COMMIT and
                # the sync go out together, and their answers come back in one
                # round trip (an error in either is raised here).
            if finish is not None:
                finish()  # its results are in: no round trip
                self.committed(succeeded)
        except BaseException as exc:  # nothing of the group committed
            self._check_connection(conn, exc)
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            for job in done:
                job.outcome, job.error = None, exc
        self._loop.call_soon_threadsafe(self._deliver, done)
        return deferred

    def _write_set(
        self,
        conn: psycopg.Connection[Any],
        pipeline: psycopg.Pipeline,
        tx: Tx,
        batch: Batch[Tx],
        jobs: list[_Job[Any]],
    ) -> list[Any] | None:
        """One set of `write_sets`, in its savepoint; None: each write runs alone."""
        conn.execute("SAVEPOINT batch")
        try:
            outcomes = run_set(batch, tx, jobs)
            if _awaiting(pipeline):
                pipeline.sync()
        except BaseException as exc:
            self._check_connection(conn, exc)
            self._resync(pipeline)
            conn.execute("ROLLBACK TO batch")
            return None
        conn.execute("RELEASE batch")
        return outcomes

    @staticmethod
    def _resync(pipeline: psycopg.Pipeline) -> None:
        # After an error the server skips what follows until the next sync
        # point: reach it, whatever was queued, before rolling back.
        with contextlib.suppress(psycopg.errors.PipelineAborted, psycopg.DatabaseError):
            pipeline.sync()

    @staticmethod
    def _check_connection(conn: psycopg.Connection[Any], exc: BaseException) -> None:
        # A write's own error leaves the connection usable and goes to its
        # caller; a broken connection (the server went away) is the writer's
        # to handle (`_run_group`), as is anything that is not an Exception.
        if _is_broken(conn, exc) or not isinstance(exc, Exception):
            raise exc

    def _queues(self) -> Sequence[SimpleQueue[Any]]:
        return (self._writes,)

    # -- the clock --------------------------------------------------------------------

    async def _sync_clock(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_SYNC_S)
            try:
                await self.read(self.clock.measure)
            except Exception as exc:  # the next try will do; the offset holds meanwhile
                log.warning("could not read the database's clock: %s", describe(exc))

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Finishes queued writes, then closes every connection."""
        if self._closed:
            return
        self._closed = True
        self._refusing = True
        self._closing.set()
        self._clock_sync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._clock_sync
        self._writes.put(None)
        await asyncio.to_thread(self._thread.join)
        self._readers.shutdown(wait=False)
        await asyncio.to_thread(self._pool.close)


def _connect_writer(url: str, durability: Durability) -> psycopg.Connection[Any]:
    writer = psycopg.connect(url, autocommit=True, application_name=f"legato-writer-{os.getpid()}")
    try:
        writer.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        if durability is Durability.FULL:
            # The server's own setting otherwise (on, by default: a
            # commit is flushed before it is acknowledged).
            writer.execute("SET synchronous_commit = on")
    except BaseException:
        writer.close()
        raise
    return writer


def _reconnect_seconds() -> float:
    spec = os.environ.get(RECONNECT_ENV, "").strip()
    if not spec:
        return RECONNECT_S
    try:
        return max(0.0, float(spec))
    except ValueError:
        raise ValueError(f"{RECONNECT_ENV}={spec!r}: expected a number of seconds") from None


def _is_broken(conn: psycopg.Connection[Any], exc: BaseException) -> bool:
    """Whether `exc` came with the connection itself gone (not a write's own error).

    A terminated backend first sends its FATAL error as an ordinary result:
    psycopg raises it (AdminShutdown) before it reads the EOF behind it and
    marks the connection broken, and in pipeline mode the next step fails
    with an error of its own and no SQLSTATE. Both mean the connection is
    done for, as do the SQLSTATE classes 08 (connection exception) and 57P
    (operator intervention: shutdown, crash, restart).
    """
    if not isinstance(exc, Exception):
        return False
    if conn.broken or conn.closed:
        return True
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, psycopg.Error):
            state = error.sqlstate
            if state is None and isinstance(error, psycopg.OperationalError):
                return True
            if state is not None and (state.startswith("08") or state.startswith("57P")):
                return True
        error = error.__cause__ or error.__context__
    return False


def _lost(conn: psycopg.Connection[Any]) -> bool:
    """Whether the writer's idle connection is gone, looked at without a round trip.

    Between transactions the server sends nothing unasked but its goodbye (a
    FATAL error, then EOF, when the backend is terminated or the server shuts
    down): a readable socket is then asked once, to tell that from a notice.
    """
    if conn.broken or conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        return True
    return False


class Listener:
    """A dedicated connection LISTENing on `channels`, reconnecting when it breaks.

    NOTIFY reaches only the connections listening when it commits: after every
    (re)connect, `connected` is awaited (once LISTEN holds), so that whatever
    was missed meanwhile is read back from the tables. Notifications carry
    only a cursor or a name; `notified(channel, payload)` is called for each.
    """

    def __init__(
        self,
        db: PgDatabase,
        channels: Sequence[str],
        *,
        notified: Callable[[str, str], None],
        connected: Callable[[], Awaitable[None]],
    ):
        self._db = db
        self._channels = list(channels)
        self._notified = notified
        self._connected = connected
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self.backend_pid = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="legato-pg-listen")

    async def _run(self) -> None:
        delay = LISTEN_RETRY_S[0]
        while True:
            try:
                conn = await self._db.connect(application_name=f"legato-listener-{os.getpid()}")
            except psycopg.OperationalError as exc:
                log.warning("cannot connect to listen (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_S[1])
                continue
            try:
                async with conn:
                    for channel in self._channels:
                        await conn.execute(f'LISTEN "{channel}"')
                    self.backend_pid = conn.info.backend_pid
                    self.connects += 1
                    await self._connected()
                    delay = LISTEN_RETRY_S[0]
                    async for notify in conn.notifies():
                        self._notified(notify.channel, notify.payload)
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                log.warning("the listening connection broke (%s); reconnecting", exc)
            except Exception:
                log.exception("listening failed; reconnecting")
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_S[1])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
