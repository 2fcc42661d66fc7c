"""Supervision: a daemon whose database fails says so and stops; it never hangs while SERVING.

Injected with the database's test hook (`LEGATO_INJECT_FAULT`, see `legato.server.db`):
the writer thread dies, the checkpoint thread dies, a post-commit callback
raises. Checked: every call in flight and every call after gets UNAVAILABLE
promptly (a bounded wait on the call itself), health turns NOT_SERVING,
`legato serve` exits with status 3 and logs why with the traceback, and the
database a restarted daemon opens holds every acknowledged write.

Health and the calls after the failure are checked on a daemon in the test's
own process, which nothing stops: a `legato serve` that has begun to stop
takes no new calls at all, health checks included.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from legato.client import AsyncClient
from legato.client.errors import UnavailableError
from legato.server import db as database
from legato.server.daemon import Config, Daemon
from legato.server.db import FAULT_ENV, Database
from legato.v1 import tasks_pb2

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, Raw, create_agent, health_status
from reliability.invariants import assert_sound

# The exit status of `legato serve` when its database failed.
EXIT_DATABASE_FAILED = 3
# How a stopping daemon answers a call: UNAVAILABLE once the call reached it; a
# call gRPC had received but not yet handed over when the server began to stop
# is CANCELLED by gRPC itself (grpc/grpc#41785), as on any graceful stop.
REFUSED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# The longest any call or event may take here; a hang shows as a failed wait.
GUARD = 10.0
PRODUCERS = 8
LABEL = "@supervised"

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Producer:
    """Creates tasks on `LABEL` back to back until a create fails; keeps what was acknowledged."""

    name: str
    acknowledged: list[str] = field(default_factory=list)  # contents, one per acknowledged task
    failure: grpc.aio.AioRpcError | None = None
    failed_content: str = ""

    async def run(self, raw: Raw) -> None:
        for n in range(100_000):
            content = f"{self.name}-{n}"
            try:
                await raw.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(
                        content=content, labels=[LABEL], idempotency_key=content
                    ),
                    metadata=raw.metadata,
                    timeout=GUARD,
                )
            except grpc.aio.AioRpcError as exc:
                self.failure, self.failed_content = exc, content
                return
            self.acknowledged.append(content)


def assert_all_refused(producers: list[Producer]) -> list[str]:
    """Each producer's last create was refused as a stopping daemon refuses; their details."""
    details = []
    for producer in producers:
        assert producer.failure is not None
        assert producer.failure.code() in REFUSED, producer.failure
        details.append(producer.failure.details() or "")
    return details


async def produce_until_failure(
    daemon: DaemonProcess, key: str, count: int = PRODUCERS
) -> list[Producer]:
    """Runs `count` producers until each saw a create fail (at most GUARD seconds in all)."""
    producers = [Producer(f"p{n}") for n in range(count)]
    async with Raw(daemon.address, key) as raw:
        await asyncio.wait_for(asyncio.gather(*(p.run(raw) for p in producers)), GUARD)
    return producers


async def assert_acknowledged_creates_survived(
    daemon: DaemonProcess, key: str, producers: list[Producer]
) -> None:
    """Restarts the daemon without the fault: sound database, every acknowledged task in it."""
    assert_sound(daemon.db_path)
    await daemon.start()
    stored: set[str] = set()
    async with AsyncClient(daemon.address, api_key=key, timeout=GUARD) as client:
        token = ""
        while True:
            page = await client.list_tasks(page_size=1000, page_token=token)
            stored.update(task.content for task in page.tasks)
            token = page.next_page_token
            if not token:
                break
    for producer in producers:
        assert set(producer.acknowledged) <= stored


# -- the writer thread dies ---------------------------------------------------------------


async def test_writer_thread_death_fails_every_call_and_legato_serve_exits_non_zero(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dies instead of committing its 41st group: mid-way through the creates below.
    monkeypatch.setenv(FAULT_ENV, "writer:40")
    daemon = make_daemon(grace=2.0, args=["--max-open-tasks", "100000"])
    await daemon.start()
    key = await create_agent(daemon, "producer", [LABEL])

    producers = await produce_until_failure(daemon, key)

    # The creates in flight when the writer died were answered, not left hanging; those it
    # held or had queued say why.
    assert any("database failed" in details for details in assert_all_refused(producers))

    assert daemon.process is not None
    code = await asyncio.wait_for(daemon.process.wait(), daemon.grace + GUARD)
    assert code == EXIT_DATABASE_FAILED, daemon.log_tail()
    log = daemon.log_tail(200)
    assert "the database failed: its writer thread died" in log
    assert "Traceback" in log and "InjectedFailure" in log
    assert "legato: the daemon stopped because its database failed" in log

    monkeypatch.delenv(FAULT_ENV)
    await assert_acknowledged_creates_survived(daemon, key, producers)


async def create_until_refused(client: AsyncClient) -> UnavailableError:
    """Creates tasks one by one until one is refused UNAVAILABLE (at most 1,000)."""
    for n in range(1000):
        try:
            await asyncio.wait_for(client.create_task(f"t{n}", labels=[LABEL]), GUARD)
        except UnavailableError as exc:
            return exc
    raise AssertionError("1,000 creates acknowledged: the fault never came")


async def stream_end(
    call: grpc.aio.UnaryStreamCall[tasks_pb2.WatchTasksRequest, tasks_pb2.TaskEvent],
) -> grpc.aio.AioRpcError:
    """Reads the stream to its end, which must be an error; the error."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the stream ended without an error")


@pytest.mark.sqlite_only(
    "arms LEGATO_INJECT_FAULT, a hook into the SQLite writer and checkpoint threads; "
    "the PostgreSQL writer is supervised alike, its loss tested in test_multi_daemon"
)
@pytest.mark.parametrize(
    "fault",
    [
        # Starting, the agents, their first calls and the first task take fewer commits.
        "writer:20",
        # The first checkpoint comes after CHECKPOINT_EVERY (500) commits.
        "checkpoint:0",
    ],
)
async def test_once_a_database_thread_died_no_caller_waits_and_health_says_so(
    config: Config, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """In one process with the daemon: nothing waits on the dead thread, new calls fail fast."""
    monkeypatch.setenv(FAULT_ENV, fault)
    async with Daemon(replace(config, max_open_tasks=100_000)) as daemon:
        admin_key = daemon.admin_key_path.read_text().strip()
        async with AsyncClient(config.address, api_key=admin_key, timeout=GUARD) as admin:
            _, worker_key = await admin.create_agent("worker", labels=["@idle"])
            _, coder_key = await admin.create_agent("coder", labels=[LABEL])
        async with (
            AsyncClient(config.address, api_key=worker_key, timeout=GUARD) as worker,
            AsyncClient(config.address, api_key=coder_key, timeout=GUARD) as coder,
            Raw(config.address, coder_key) as raw,
        ):
            created = await coder.create_task("before", labels=[LABEL])
            claim = asyncio.ensure_future(worker.claim(["@idle"], wait=60))
            watch = raw.tasks.WatchTasks(
                tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=0), metadata=raw.metadata
            )
            backlog = await asyncio.wait_for(watch.read(), GUARD)
            assert isinstance(backlog, tasks_pb2.TaskEvent) and backlog.task.id == created.id

            refused = await create_until_refused(coder)
            assert "database failed" in str(refused)

            failure = await asyncio.wait_for(daemon.failed(), GUARD)
            assert isinstance(failure, database.DatabaseFailed)
            assert await health_status(config.address) == NOT_SERVING
            # Waiting callers are let go: the long-poll claim and the watch stream.
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(claim, GUARD)
            ended = await asyncio.wait_for(stream_end(watch), GUARD)
            assert ended.code() == grpc.StatusCode.UNAVAILABLE
            # New calls, writes and reads, fail fast with the reason.
            new_calls: list[Callable[[], Awaitable[object]]] = [
                lambda: coder.create_task("after", labels=[LABEL]),
                lambda: coder.get_task(created.id),
                lambda: worker.claim(["@idle"], wait=60),
            ]
            for call in new_calls:
                with pytest.raises(UnavailableError, match="database failed"):
                    await asyncio.wait_for(call(), GUARD)


# -- a post-commit callback raises --------------------------------------------------------


async def test_a_raising_after_commit_callback_does_not_strand_its_group(short_tmp: Path) -> None:
    db = Database(short_tmp / "group.db")
    try:
        await db.write(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
        # Hold the writer inside a transaction so that the next writes queue up and are
        # committed together, as one group.
        holding, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            holding.set()
            release.wait(GUARD)

        held = asyncio.ensure_future(db.write(hold))
        assert await asyncio.to_thread(holding.wait, GUARD)
        published: list[int] = []

        def insert(n: int) -> Callable[[sqlite3.Connection], int]:
            def run(conn: sqlite3.Connection) -> int:
                return conn.execute("INSERT INTO t VALUES (?)", (n,)).rowcount

            return run

        def publish(n: int) -> Callable[[int], None]:
            def after_commit(rowcount: int) -> None:
                if n == 2:
                    raise RuntimeError("publishing failed")
                published.append(n)

            return after_commit

        group = [
            asyncio.ensure_future(db.write(insert(n), after_commit=publish(n))) for n in range(5)
        ]
        release.set()
        await asyncio.wait_for(held, GUARD)
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), GUARD)

        assert outcomes[:2] == [1, 1] and outcomes[3:] == [1, 1]
        assert published == [0, 1, 3, 4]
        # Its change was committed: the caller is told so, not that it failed.
        assert isinstance(outcomes[2], database.DatabaseFailed)
        assert "committed" in str(outcomes[2])
        with closing(sqlite3.connect(short_tmp / "group.db")) as conn:
            rows = conn.execute("SELECT n FROM t ORDER BY n").fetchall()
        assert rows == [(0,), (1,), (2,), (3,), (4,)]
        # Watchers missed an event: the database reports itself failed and takes no more calls.
        failure = await asyncio.wait_for(db.failed(), GUARD)
        assert isinstance(failure, database.DatabaseFailed)
        with pytest.raises(database.DatabaseFailed, match="database failed"):
            await asyncio.wait_for(db.write(insert(5)), GUARD)
    finally:
        await asyncio.wait_for(db.close(), GUARD)


async def test_a_failed_publish_is_answered_as_committed_and_the_daemon_exits_non_zero(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "after_commit:30")
    daemon = make_daemon(grace=2.0, args=["--max-open-tasks", "100000"])
    await daemon.start()
    key = await create_agent(daemon, "producer", [LABEL])

    producers = await produce_until_failure(daemon, key)

    unpublished = [p for p in producers if p.failure and "committed" in (p.failure.details() or "")]
    assert len(unpublished) == 1, [p.failure for p in producers]
    assert unpublished[0].failure is not None
    assert unpublished[0].failure.code() == grpc.StatusCode.UNAVAILABLE
    assert_all_refused(producers)
    assert daemon.process is not None
    code = await asyncio.wait_for(daemon.process.wait(), daemon.grace + GUARD)
    assert code == EXIT_DATABASE_FAILED, daemon.log_tail()
    assert "the database failed: a post-commit callback raised" in daemon.log_tail(200)

    monkeypatch.delenv(FAULT_ENV)
    # The create answered "committed" is stored like the acknowledged ones.
    unpublished[0].acknowledged.append(unpublished[0].failed_content)
    await assert_acknowledged_creates_survived(daemon, key, producers)


# -- the checkpoint thread dies -----------------------------------------------------------


async def test_checkpoint_thread_death_is_noticed(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first checkpoint comes after CHECKPOINT_EVERY (500) commits; few producers
    # make small groups, so that takes fewer creates.
    monkeypatch.setenv(FAULT_ENV, "checkpoint:0")
    daemon = make_daemon(grace=2.0, args=["--max-open-tasks", "100000"])
    await daemon.start()
    key = await create_agent(daemon, "producer", [LABEL])

    producers = await produce_until_failure(daemon, key, count=2)

    assert_all_refused(producers)
    assert daemon.process is not None
    code = await asyncio.wait_for(daemon.process.wait(), daemon.grace + GUARD)
    assert code == EXIT_DATABASE_FAILED, daemon.log_tail()
    log = daemon.log_tail(200)
    assert "the database failed: its checkpoint thread died" in log and "Traceback" in log

    monkeypatch.delenv(FAULT_ENV)
    await assert_acknowledged_creates_survived(daemon, key, producers)
