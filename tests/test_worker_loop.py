"""Work loops that outlive the ordinary endings of a job.

A task canceled by its creator, failed at its deadline, or whose lease ran out
interrupts the handler working on it (the asyncio face cancels the handler's
task; the blocking face raises `JobInterruptedError` from the job's calls and
sets `job.interrupted`); the loop logs it on `legato.client` and takes the next
task. A daemon restart in the middle of a job is ridden out by the background
heartbeats. Closing a blocking client stops its heartbeat threads.

Every scenario runs against a real daemon. The tests wait for the handler's
own signals, the daemon's events and the client's log records, never on a
clock of their own; leases are short only where time is the subject.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import next_event, watch_task
from legato.client import (
    AsyncClient,
    AsyncJob,
    Client,
    EventType,
    Job,
    JobInterruptedError,
    Task,
    TaskFailedError,
    TaskStatus,
)
from legato.client.errors import UnauthenticatedError
from legato.server.daemon import Config, Daemon
from reliability.harness import DaemonProcess, create_agent

# The most any single wait may take before the test is failed instead of hanging.
GUARD = 10.0
# A lease whose heartbeats (a third of it apart) never come during a test: what
# the worker learns, it learns from its watch of the task.
LONG_LEASE = 120.0
# Long enough to span a daemon restart and the channel's reconnect, short
# enough that heartbeats come every second.
RESTART_LEASE = 3.0
# A worker's lease when a test takes it away: heartbeats every half second
# find out. (A heartbeat records no event, so no watch would tell.)
LOST_LEASE = 1.5
# How long a stopped worker may take to stop.
STOP_GUARD = 5.0
HOLD = "hold this job until something ends it"
LEGATO = Path(sys.executable).with_name("legato")


# -- the client's log, as the tests see it ---------------------------------------------


class ClientLog(logging.Handler):
    """Records of the `legato.client` logger, and a way to wait for one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self._loop = loop
        self.records: list[logging.LogRecord] = []
        self._waiting: list[tuple[tuple[str, ...], asyncio.Future[logging.LogRecord]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Heartbeat threads log too: hand the record to the test's loop.
        self._loop.call_soon_threadsafe(self._add, record)

    def _add(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for words, future in self._waiting:
            if not future.done() and _says(record, words):
                future.set_result(record)

    async def wait_for(self, *words: str) -> logging.LogRecord:
        """The first record whose message holds every one of `words`, waiting if need be."""
        for record in self.records:
            if _says(record, words):
                return record
        future: asyncio.Future[logging.LogRecord] = self._loop.create_future()
        self._waiting.append((words, future))
        try:
            return await asyncio.wait_for(future, GUARD)
        except TimeoutError:
            said = "\n".join(r.getMessage() for r in self.records)
            raise AssertionError(
                f"no log record with {words} within {GUARD} s; got:\n{said}"
            ) from None


def _says(record: logging.LogRecord, words: tuple[str, ...]) -> bool:
    message = record.getMessage()
    return all(word in message for word in words)


@pytest.fixture
async def client_log() -> AsyncIterator[ClientLog]:
    logger = logging.getLogger("legato.client")
    handler = ClientLog(asyncio.get_running_loop())
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


# -- a daemon that can be restarted on the same data dir and socket --------------------


class RestartableDaemon:
    """An in-process daemon the test stops and starts again on the same files."""

    def __init__(self, config: Config):
        self.config = config
        self._running: Daemon | None = None

    @property
    def address(self) -> str:
        return self.config.address

    @property
    def admin_key(self) -> str:
        return (self.config.data_dir / "admin.key").read_text().strip()

    async def start(self) -> None:
        assert self._running is None, "already running"
        daemon = Daemon(self.config)
        await daemon.start()
        self._running = daemon

    async def stop(self) -> None:
        assert self._running is not None, "not running"
        daemon, self._running = self._running, None
        await daemon.stop()

    async def agent(self, name: str) -> str:
        """Creates agent `name` holding `@name`; its key."""
        async with AsyncClient(self.address, api_key=self.admin_key, timeout=GUARD) as admin:
            _, key = await admin.create_agent(name, labels=[f"@{name}"])
        return key


@pytest.fixture
async def restartable(config: Config) -> AsyncIterator[RestartableDaemon]:
    daemon = RestartableDaemon(config)
    await daemon.start()
    yield daemon
    if daemon._running is not None:
        await daemon.stop()


# -- helpers ---------------------------------------------------------------------------


async def signalled(event: asyncio.Event | threading.Event, what: str) -> None:
    """Waits for `event` (set on the loop or in a thread), failing the test after GUARD."""
    if isinstance(event, asyncio.Event):
        waited = await asyncio.wait_for(event.wait(), GUARD)
        assert waited
        return
    assert await asyncio.to_thread(event.wait, GUARD), f"{what} did not happen within {GUARD} s"


@asynccontextmanager
async def async_worker(run: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Runs `run_worker` as a task for the block; then stops it by cancelling it.

    If the worker ended before that, its exception is what the test fails with.
    """
    worker = asyncio.create_task(run)
    try:
        yield worker
        assert not worker.done(), "run_worker ended while there was still work to do"
    finally:
        if worker.done() and not worker.cancelled():
            worker.result()  # raises what ended it
        worker.cancel()
        done, _ = await asyncio.wait([worker], timeout=STOP_GUARD)
        assert worker in done, "run_worker did not stop when cancelled"


@asynccontextmanager
async def sync_worker(
    client: Client, handler: Callable[[Job], dict[str, Any]], label: str, lease: float
) -> AsyncIterator[asyncio.Task[None]]:
    """Runs the blocking `run_worker` in a thread for the block; then stops it by
    closing its client, which ends the loop with RuntimeError."""
    worker = asyncio.create_task(
        asyncio.to_thread(client.run_worker, handler, [label], lease=lease, wait=GUARD)
    )
    try:
        yield worker
        assert not worker.done(), "run_worker ended while there was still work to do"
    finally:
        if worker.done():
            worker.result()  # raises what ended it
        client.close()
        done, _ = await asyncio.wait([worker], timeout=STOP_GUARD)
        assert worker in done, "run_worker did not stop when its client was closed"
        with pytest.raises(RuntimeError, match="closed"):
            worker.result()


Handler = Callable[[AsyncJob], Awaitable[dict[str, Any]]]


def holding(interrupted: asyncio.Event, started: asyncio.Event) -> Handler:
    """A handler that holds a HOLD job until it is cancelled, and answers the others."""

    async def handle(job: AsyncJob) -> dict[str, Any]:
        if job.task.content == HOLD and job.task.attempt == 1:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                interrupted.set()
                raise
        return {"answered": job.task.content, "attempt": job.task.attempt}

    return handle


def holding_sync(interrupted: threading.Event, started: threading.Event) -> Callable[[Job], Any]:
    """The blocking twin of `holding`: waits for `job.interrupted`, then finds its
    next call to the daemon refused with JobInterruptedError."""

    def handle(job: Job) -> dict[str, Any]:
        if job.task.content == HOLD and job.task.attempt == 1:
            started.set()
            assert job.wait_interrupted(GUARD), "the job was not interrupted"
            try:
                job.write("still working?")
            except JobInterruptedError:
                interrupted.set()
                raise
            raise AssertionError("write() on an interrupted job went through")
        return {"answered": job.task.content, "attempt": job.task.attempt}

    return handle


# -- the asyncio face ------------------------------------------------------------------


async def test_creator_cancels_the_running_job_and_the_worker_takes_the_next_task(
    coder: AsyncClient, researcher: AsyncClient, client_log: ClientLog
) -> None:
    started, interrupted = asyncio.Event(), asyncio.Event()
    run = researcher.run_worker(
        holding(interrupted, started), ["@researcher"], lease=LONG_LEASE, wait=GUARD
    )
    async with async_worker(run):
        held = await coder.delegate("@researcher", HOLD)
        await signalled(started, "the handler starting")
        await held.cancel("not needed any more")
        # Heartbeats are 40 s apart: the handler is cancelled on the watch's news.
        await signalled(interrupted, "the handler's cancellation")

        following = await coder.delegate("@researcher", "the next one")
        task = await following.result(timeout=GUARD)
        assert task.result == {"answered": "the next one", "attempt": 1}

    record = await client_log.wait_for(held.id, "canceled", "not needed any more")
    assert record.levelno == logging.INFO
    after = await coder.get_task(held.id)
    assert (after.status, after.error) == (TaskStatus.CANCELED, "not needed any more")


async def test_deadline_passes_while_the_handler_runs_and_the_worker_takes_the_next_task(
    coder: AsyncClient, researcher: AsyncClient, client_log: ClientLog
) -> None:
    started, interrupted = asyncio.Event(), asyncio.Event()
    run = researcher.run_worker(
        holding(interrupted, started), ["@researcher"], lease=LONG_LEASE, wait=GUARD
    )
    async with async_worker(run):
        # The worker already waits on a long-poll claim: it gets the task at once.
        late = await coder.delegate("@researcher", HOLD, deadline=timedelta(seconds=1))
        await signalled(started, "the handler starting")
        await signalled(interrupted, "the handler's cancellation")

        following = await coder.delegate("@researcher", "the next one")
        assert (await following.result(timeout=GUARD)).status is TaskStatus.DONE

    await client_log.wait_for(late.id, "failed", "deadline")
    assert (await coder.get_task(late.id)).status is TaskStatus.FAILED


async def test_lease_runs_out_between_heartbeats_and_the_worker_goes_on(
    daemon: Daemon,
    coder: AsyncClient,
    agent_key: Callable[..., Awaitable[str]],
    client_log: ClientLog,
) -> None:
    """The lease runs out under the handler: another client of the same agent
    cut it to 50 ms. The worker's next heartbeat is refused; it cancels the
    handler, and claims the task's next attempt once the daemon requeues it."""
    key = await agent_key("helper")
    started, interrupted = asyncio.Event(), asyncio.Event()
    tokens: list[str] = []
    inner = holding(interrupted, started)

    async def handle(job: AsyncJob) -> dict[str, Any]:
        tokens.append(job.lease_token)
        return await inner(job)

    async with (
        AsyncClient(daemon.config.address, api_key=key, timeout=GUARD) as helper,
        AsyncClient(daemon.config.address, api_key=key, timeout=GUARD) as elsewhere,
    ):
        run = helper.run_worker(handle, ["@helper"], lease=LOST_LEASE, wait=GUARD)
        async with async_worker(run):
            held = await coder.delegate("@helper", HOLD)
            await signalled(started, "the handler starting")
            await elsewhere.heartbeat(held.id, tokens[0], lease=0.05)
            await signalled(interrupted, "the handler's cancellation")
            task = await held.result(timeout=GUARD)
            assert task.result == {"answered": HOLD, "attempt": 2}

    await client_log.wait_for(held.id, "lost")


async def test_lease_runs_out_while_the_daemon_is_down_and_the_worker_goes_on_after_it(
    restartable: RestartableDaemon, client_log: ClientLog
) -> None:
    """Heartbeats keep trying while the daemon is away, but only until the lease
    would have ended: then the handler is interrupted. Once the daemon is back
    it requeues the task, and the same worker does its next attempt."""
    key = await restartable.agent("helper")
    started, interrupted = asyncio.Event(), asyncio.Event()
    async with (
        AsyncClient(restartable.address, api_key=key, timeout=GUARD) as helper,
        AsyncClient(restartable.address, api_key=restartable.admin_key, timeout=GUARD) as admin,
    ):
        run = helper.run_worker(holding(interrupted, started), ["@helper"], lease=1.0, wait=GUARD)
        async with async_worker(run):
            held = await admin.delegate("@helper", HOLD)
            await signalled(started, "the handler starting")
            await restartable.stop()
            await signalled(interrupted, "the handler's cancellation")
            await client_log.wait_for(held.id, "lease", "ran out")
            await restartable.start()
            task = await held.result(timeout=GUARD)
            assert task.result == {"answered": HOLD, "attempt": 2}


async def test_daemon_restart_under_a_running_handler_is_ridden_out_by_its_heartbeats(
    restartable: RestartableDaemon, client_log: ClientLog
) -> None:
    key = await restartable.agent("helper")
    started, finish = asyncio.Event(), asyncio.Event()

    async def handle(job: AsyncJob) -> dict[str, Any]:
        started.set()
        await finish.wait()
        return {"attempt": job.task.attempt}

    async with (
        AsyncClient(restartable.address, api_key=key, timeout=GUARD) as helper,
        AsyncClient(restartable.address, api_key=restartable.admin_key, timeout=GUARD) as admin,
    ):
        run = helper.run_worker(handle, ["@helper"], lease=RESTART_LEASE, wait=GUARD)
        async with async_worker(run):
            handle_ = await admin.delegate("@helper", "outlive a restart")
            await signalled(started, "the handler starting")
            await restartable.stop()
            await client_log.wait_for(handle_.id, "heartbeat", "UNAVAILABLE")
            restarting_at = datetime.now(UTC)
            await restartable.start()
            await client_log.wait_for(handle_.id, "heartbeats", "resumed")
            # A lease ending this late was renewed by a heartbeat after the restart.
            lease_end = (await admin.get_task(handle_.id)).lease_expires_at
            assert lease_end is not None
            assert lease_end > restarting_at + timedelta(seconds=RESTART_LEASE)
            finish.set()
            task = await handle_.result(timeout=GUARD)

    assert (task.status, task.result, task.attempt) == (TaskStatus.DONE, {"attempt": 1}, 1)


async def test_heartbeats_that_time_out_while_the_daemon_stalls_resume_when_it_answers(
    short_tmp: Path, client_log: ClientLog
) -> None:
    """A daemon that stops answering (SIGSTOP) makes heartbeats time out
    (DEADLINE_EXCEEDED); they keep trying, and once it answers again the
    lease is renewed and the job completes on its first attempt."""
    daemon = DaemonProcess(short_tmp)
    await daemon.start()
    started, finish = asyncio.Event(), asyncio.Event()

    async def handle(job: AsyncJob) -> dict[str, Any]:
        started.set()
        await finish.wait()
        return {"attempt": job.task.attempt}

    try:
        key = await create_agent(daemon, "helper", ["@helper"])
        async with (
            # Heartbeats give up on a call after half a second, a sixth of the lease.
            AsyncClient(daemon.address, api_key=key, timeout=0.5) as helper,
            AsyncClient(daemon.address, api_key=daemon.admin_key, timeout=GUARD) as admin,
        ):
            run = helper.run_worker(handle, ["@helper"], lease=RESTART_LEASE, wait=GUARD)
            async with async_worker(run):
                handle_ = await admin.delegate("@helper", "outlive a stall")
                await signalled(started, "the handler starting")
                os.kill(daemon.pid, signal.SIGSTOP)
                try:
                    await client_log.wait_for(handle_.id, "heartbeat", "DEADLINE_EXCEEDED")
                finally:
                    os.kill(daemon.pid, signal.SIGCONT)
                await client_log.wait_for(handle_.id, "heartbeats", "resumed")
                finish.set()
                task = await handle_.result(timeout=GUARD)
    finally:
        await daemon.close()

    assert (task.status, task.result, task.attempt) == (TaskStatus.DONE, {"attempt": 1}, 1)


async def test_a_result_that_is_not_json_fails_that_task_and_the_worker_goes_on(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    async def handle(job: AsyncJob) -> dict[str, Any]:
        if job.task.content == "when?":
            return {"when": datetime.now(UTC)}  # not a JSON value
        return {"answered": job.task.content}

    run = researcher.run_worker(handle, ["@researcher"], lease=LONG_LEASE, wait=GUARD)
    async with async_worker(run):
        bad = await coder.delegate("@researcher", "when?")
        with pytest.raises(TaskFailedError, match="result was refused") as raised:
            await bad.result(timeout=GUARD)
        assert raised.value.task.attempt == 1
        following = await coder.delegate("@researcher", "the next one")
        assert (await following.result(timeout=GUARD)).result == {"answered": "the next one"}


async def test_revoking_the_agent_ends_its_worker(
    coder: AsyncClient, researcher: AsyncClient, admin: AsyncClient, client_log: ClientLog
) -> None:
    """A revoked key works for no task: the running handler is cancelled and the
    loop ends with UnauthenticatedError instead of waiting for a next task."""
    started, interrupted = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(
        researcher.run_worker(
            holding(interrupted, started), ["@researcher"], lease=LONG_LEASE, wait=GUARD
        )
    )
    try:
        held = await coder.delegate("@researcher", HOLD)
        await signalled(started, "the handler starting")
        await admin.revoke_agent("researcher")
        await signalled(interrupted, "the handler's cancellation")
        with pytest.raises(UnauthenticatedError):
            await asyncio.wait_for(worker, GUARD)
    finally:
        worker.cancel()
        await asyncio.wait([worker], timeout=STOP_GUARD)
    await client_log.wait_for(held.id, "lost", "UNAUTHENTICATED")


async def test_a_task_handed_back_three_times_is_pending_with_its_attempts_unused(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    handle = await coder.create_task("hand me back", labels=["@researcher"], max_attempts=2)
    async with aclosing(watch_task(coder, handle.id)) as events:
        for round_number in range(1, 4):
            jobs = researcher.work(["@researcher"], lease=LONG_LEASE, wait=GUARD)
            async with aclosing(jobs):
                async for job in jobs:
                    assert job.id == handle.id
                    break  # the loop moves on with the job unfinished: it is handed back
            released = await next_event(events, EventType.RELEASED)
            assert released.actor == "researcher"
            assert (released.task.status, released.task.released) == (
                TaskStatus.PENDING,
                round_number,
            )

    task = await coder.get_task(handle.id)
    assert (task.status, task.attempt, task.released) == (TaskStatus.PENDING, 4, 3)
    assert "stopped before finishing" in task.error
    fourth = await researcher.claim(task_id=handle.id, lease=LONG_LEASE)
    assert fourth is not None
    assert (await fourth.complete({"done": True})).status is TaskStatus.DONE


async def test_a_handler_that_asks_the_creator_still_has_its_whole_task(
    coder: AsyncClient, researcher: AsyncClient
) -> None:
    """Watched events carry only what changed; the job folds the answer into
    the task it has, so the content and context are still there after `ask`."""

    async def handle(job: AsyncJob) -> dict[str, Any]:
        answer = await job.ask("which tier?", timeout=GUARD)
        return {"content": job.task.content, "context": job.task.context, "answer": answer}

    run = researcher.run_worker(handle, ["@researcher"], lease=LONG_LEASE, wait=GUARD)
    async with async_worker(run):
        handle_ = await coder.delegate("@researcher", "current RPM?", context={"api": "x"})
        async with aclosing(watch_task(coder, handle_.id)) as events:
            await next_event(events, EventType.INPUT_REQUESTED)
        await handle_.answer("tier 1")
        task = await handle_.result(timeout=GUARD)

    assert task.result == {"content": "current RPM?", "context": {"api": "x"}, "answer": "tier 1"}


# -- the blocking face -----------------------------------------------------------------


@pytest.fixture
async def blocking_helper(daemon: Daemon, agent_key: Callable[..., Awaitable[str]]) -> Client:
    """A blocking client of agent `helper` (@helper); the test's worker closes it."""
    key = await agent_key("helper")
    return Client(daemon.config.address, api_key=key, timeout=GUARD)


async def test_blocking_worker_sees_the_creator_cancel_and_takes_the_next_task(
    coder: AsyncClient, blocking_helper: Client, client_log: ClientLog
) -> None:
    started, interrupted = threading.Event(), threading.Event()
    async with sync_worker(
        blocking_helper, holding_sync(interrupted, started), "@helper", LONG_LEASE
    ):
        held = await coder.delegate("@helper", HOLD)
        await signalled(started, "the handler starting")
        await held.cancel("not needed any more")
        await signalled(interrupted, "write() refusing with JobInterruptedError")

        following = await coder.delegate("@helper", "the next one")
        task = await following.result(timeout=GUARD)
        assert task.result == {"answered": "the next one", "attempt": 1}

    await client_log.wait_for(held.id, "canceled", "not needed any more")


async def test_blocking_worker_sees_the_deadline_pass_and_takes_the_next_task(
    coder: AsyncClient, blocking_helper: Client, client_log: ClientLog
) -> None:
    started, interrupted = threading.Event(), threading.Event()
    async with sync_worker(
        blocking_helper, holding_sync(interrupted, started), "@helper", LONG_LEASE
    ):
        late = await coder.delegate("@helper", HOLD, deadline=timedelta(seconds=1))
        await signalled(started, "the handler starting")
        await signalled(interrupted, "write() refusing with JobInterruptedError")

        following = await coder.delegate("@helper", "the next one")
        assert (await following.result(timeout=GUARD)).status is TaskStatus.DONE

    await client_log.wait_for(late.id, "failed", "deadline")


async def test_blocking_worker_whose_lease_runs_out_goes_on_to_the_next_attempt(
    daemon: Daemon,
    coder: AsyncClient,
    agent_key: Callable[..., Awaitable[str]],
    client_log: ClientLog,
) -> None:
    key = await agent_key("helper")
    started, interrupted = threading.Event(), threading.Event()
    tokens: list[str] = []
    inner = holding_sync(interrupted, started)

    def handle(job: Job) -> dict[str, Any]:
        tokens.append(job.lease_token)
        result: dict[str, Any] = inner(job)
        return result

    helper = Client(daemon.config.address, api_key=key, timeout=GUARD)
    async with (
        AsyncClient(daemon.config.address, api_key=key, timeout=GUARD) as elsewhere,
        sync_worker(helper, handle, "@helper", LOST_LEASE),
    ):
        held = await coder.delegate("@helper", HOLD)
        await signalled(started, "the handler starting")
        await elsewhere.heartbeat(held.id, tokens[0], lease=0.05)
        await signalled(interrupted, "write() refusing with JobInterruptedError")
        task = await held.result(timeout=GUARD)
        assert task.result == {"answered": HOLD, "attempt": 2}

    await client_log.wait_for(held.id, "lost")


async def test_blocking_worker_rides_out_a_daemon_restart_under_its_handler(
    restartable: RestartableDaemon, client_log: ClientLog
) -> None:
    key = await restartable.agent("helper")
    started, finish = threading.Event(), threading.Event()

    def handle(job: Job) -> dict[str, Any]:
        started.set()
        assert finish.wait(GUARD)
        return {"attempt": job.task.attempt}

    helper = Client(restartable.address, api_key=key, timeout=GUARD)
    async with (
        AsyncClient(restartable.address, api_key=restartable.admin_key) as admin,
        sync_worker(helper, handle, "@helper", RESTART_LEASE),
    ):
        handle_ = await admin.delegate("@helper", "outlive a restart")
        await signalled(started, "the handler starting")
        await restartable.stop()
        await client_log.wait_for(handle_.id, "heartbeat", "UNAVAILABLE")
        restarting_at = datetime.now(UTC)
        await restartable.start()
        await client_log.wait_for(handle_.id, "heartbeats", "resumed")
        lease_end = (await admin.get_task(handle_.id)).lease_expires_at
        assert lease_end is not None
        assert lease_end > restarting_at + timedelta(seconds=RESTART_LEASE)
        finish.set()
        task = await handle_.result(timeout=GUARD)

    assert (task.status, task.result, task.attempt) == (TaskStatus.DONE, {"attempt": 1}, 1)


async def test_a_blocking_handler_that_asks_the_creator_still_has_its_whole_task(
    coder: AsyncClient, blocking_helper: Client
) -> None:
    def handle(job: Job) -> dict[str, Any]:
        answer = job.ask("which tier?", timeout=GUARD)
        return {"content": job.task.content, "context": job.task.context, "answer": answer}

    async with sync_worker(blocking_helper, handle, "@helper", LONG_LEASE):
        handle_ = await coder.delegate("@helper", "current RPM?", context={"api": "x"})
        async with aclosing(watch_task(coder, handle_.id)) as events:
            await next_event(events, EventType.INPUT_REQUESTED)
        await handle_.answer("tier 1")
        task = await handle_.result(timeout=GUARD)

    assert task.result == {"content": "current RPM?", "context": {"api": "x"}, "answer": "tier 1"}


async def test_a_blocking_job_released_three_times_is_pending_with_its_attempts_unused(
    coder: AsyncClient, blocking_helper: Client
) -> None:
    handle = await coder.create_task("hand me back", labels=["@helper"], max_attempts=2)

    def hand_back_three_times() -> list[Task]:
        with blocking_helper:
            released = []
            for _ in range(3):
                job = blocking_helper.claim(["@helper"], lease=LONG_LEASE, wait=GUARD)
                assert job is not None and job.id == handle.id
                released.append(job.release("not this time"))
            return released

    released = await asyncio.to_thread(hand_back_three_times)
    assert [(t.status, t.released) for t in released] == [
        (TaskStatus.PENDING, 1),
        (TaskStatus.PENDING, 2),
        (TaskStatus.PENDING, 3),
    ]
    task = await coder.get_task(handle.id)
    assert (task.status, task.attempt, task.error) == (TaskStatus.PENDING, 4, "not this time")


async def test_closing_a_blocking_client_stops_the_heartbeats_of_its_jobs(
    coder: AsyncClient, blocking_helper: Client
) -> None:
    await coder.delegate("@helper", HOLD)

    def claim_then_close() -> tuple[list[threading.Thread], list[threading.Thread]]:
        before = set(threading.enumerate())
        jobs = blocking_helper.work(["@helper"], lease=LONG_LEASE, wait=GUARD)
        next(jobs)
        started = [t for t in threading.enumerate() if t not in before]
        blocking_helper.close()
        still_alive = [t for t in started if t.is_alive()]
        # The hand-back cannot reach the daemon any more: the lease runs out instead.
        jobs.close()
        return started, still_alive

    started, still_alive = await asyncio.to_thread(claim_then_close)
    assert started, "the job started no background thread"
    assert still_alive == []


# -- legato work -----------------------------------------------------------------------


async def test_legato_work_stops_a_canceled_command_at_once_and_runs_the_next_task(
    daemon: Daemon, agent_key: Callable[..., Awaitable[str]], coder: AsyncClient
) -> None:
    """With the default lease, heartbeats are 20 s apart: the cancel reaches the
    worker through its watch of the task, and the worker goes on."""
    key = await agent_key("shell")
    script = (
        'read line; case "$line" in hold*) echo started; exec sleep 60;; esac; echo "did $line"'
    )
    env = {**os.environ, "LEGATO_ADDRESS": daemon.config.address, "LEGATO_AGENT_KEY": key}
    worker = await asyncio.create_subprocess_exec(
        str(LEGATO), "work", "@shell", "--", "sh", "-c", script,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        held = await coder.delegate("@shell", HOLD)
        async with aclosing(watch_task(coder, held.id)) as events:
            started = await next_event(events, EventType.OUTPUT)
            assert started.output is not None and started.output.text == "started\n"
        await held.cancel("not needed any more")

        following = await coder.delegate("@shell", "the next one")
        task = await following.result(timeout=GUARD)
        assert task.result == {"output": "did the next one\n", "exit_code": 0}
        assert worker.returncode is None  # still working
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGINT)
        assert worker.stderr is not None
        stderr = (await asyncio.wait_for(worker.stderr.read(), GUARD)).decode()
        await asyncio.wait_for(worker.wait(), GUARD)
    assert f"canceled {held.id}" in stderr, stderr
