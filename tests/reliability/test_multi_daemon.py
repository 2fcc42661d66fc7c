"""Several daemons, one truth: three `legato serve --database URL` processes on one
PostgreSQL database, each with its own data dir and socket.

Each test starts daemons A, B and C as real processes on a schema of its own
(the `pg_url` fixture) and drives them through raw stubs, as clients of
different daemons would. What it checks is read back from the database
itself: the stored log is the truth every watcher on every daemon must see,
exactly, in seq order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import grpc
import psycopg
import pytest
from conftest import server_url
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from legato.server.store.pgdb import RECONNECT_ENV
from legato.server.store.postgres import AGENT_STALE_S
from legato.v1 import agents_pb2, tasks_pb2
from psycopg import conninfo

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, Raw, health_status, record, scale
from reliability.load import CALL_TIMEOUT, Logged, Producer, Watcher, finish, progressed

pytestmark = pytest.mark.timeout(scale(180, 1200))

LABEL = "@team"
NO_CAP = ["--max-open-tasks", "10000000"]


async def three_daemons(make_daemon: MakeDaemon, url: str) -> list[DaemonProcess]:
    """A, then B and C joining the database A created (at once, as a team would)."""
    first = make_daemon(name="a", database=url, args=NO_CAP)
    await first.start()
    joining = [make_daemon(name=n, database=url, args=NO_CAP) for n in ("b", "c")]
    await asyncio.gather(*(d.start() for d in joining))
    # The joiners found the admin A made and wrote no key of their own.
    assert all(d.admin_key == "" for d in joining)
    for daemon in joining:
        daemon.admin_key = first.admin_key
    return [first, *joining]


def stored_log(url: str, label: str | None = LABEL) -> list[Logged]:
    """The events as stored (of tasks carrying `label`; None: all), in seq order."""
    sql = "SELECT e.seq, e.type, t.id FROM events e JOIN tasks t ON t.rowid = e.task_rowid"
    params: tuple[str, ...] = ()
    if label is not None:
        sql += " JOIN task_labels l ON l.task_rowid = e.task_rowid WHERE l.label = %s"
        params = (label,)
    with psycopg.connect(url) as conn:
        rows = conn.execute(sql + " ORDER BY e.seq", params).fetchall()
    return [(int(seq), int(kind), str(task_id)) for seq, kind, task_id in rows]


async def add_agent(daemon: DaemonProcess, name: str, labels: Sequence[str] = (LABEL,)) -> str:
    async with Raw(daemon.address, daemon.admin_key) as admin:
        response = await admin.agents.CreateAgent(
            agents_pb2.CreateAgentRequest(name=name, labels=list(labels)),
            metadata=admin.metadata,
            timeout=CALL_TIMEOUT,
        )
    return response.api_key


async def create(raw: Raw, content: str, label: str = LABEL) -> tasks_pb2.Task:
    return await raw.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(content=content, labels=[label]),
        metadata=raw.metadata,
        timeout=CALL_TIMEOUT,
    )


async def cursor(raw: Raw) -> int:
    response = await raw.tasks.GetCursor(
        tasks_pb2.GetCursorRequest(), metadata=raw.metadata, timeout=CALL_TIMEOUT
    )
    return int(response.cursor)


async def follow(watchers: list[Watcher], seq: int, timeout: float = 30.0) -> None:
    """Returns once every watcher has received the event `seq`."""
    for watcher in watchers:
        watcher.caught_up.clear()
        watcher.wait_for(seq)
    await asyncio.wait_for(asyncio.gather(*(w.caught_up.wait() for w in watchers)), timeout)


@pytest.fixture
async def watching() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Watcher tasks a test starts; cancelled at teardown."""
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_create_on_a_reaches_watchers_on_b_and_c_as_exactly_the_stored_log(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    a, b, c = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "writer")
    async with Raw(a.address, key) as writer:
        for n in range(5):
            await create(writer, f"before the watch {n}")
        start = await cursor(writer)
        watchers = [Watcher(LABEL, after_seq) for after_seq in (0, start, start)]
        for watcher, daemon in zip(watchers, (a, b, c), strict=True):
            watching.append(asyncio.create_task(watcher.run(daemon.address, key)))
        for n in range(60):
            task = await create(writer, f"after the watch {n}")
            if n % 3 == 0:
                claimed = await writer.tasks.ClaimTask(
                    tasks_pb2.ClaimTaskRequest(id=task.id), metadata=writer.metadata
                )
                await writer.tasks.CompleteTask(
                    tasks_pb2.CompleteTaskRequest(id=task.id, lease_token=claimed.lease_token),
                    metadata=writer.metadata,
                )
        log = stored_log(pg_url)
        await follow(watchers, log[-1][0])
    assert watchers[0].received == log  # from seq 0, on A
    for watcher in watchers[1:]:  # from the cursor, on B and on C
        assert watcher.received == [e for e in log if e[0] > start]
    assert len(log) == 65 + 2 * 20


async def test_concurrent_writers_on_three_daemons_never_make_a_watcher_skip_a_seq(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    """The out-of-order commit trap: with seq from a sequence, a transaction that
    took 100 and commits after the one that took 101 is skipped by a watcher that
    read 101. Here 24 writers on three daemons commit at once for a while; every
    watcher on every daemon, live from the start, must see every seq, in order."""
    daemons = await three_daemons(make_daemon, pg_url)
    writers_per_daemon = 8
    per_writer = scale(25, 200)
    keys = [await add_agent(daemons[0], f"w{n}") for n in range(3 * writers_per_daemon)]
    watcher_key = await add_agent(daemons[0], "watcher")
    async with Raw(daemons[0].address, watcher_key) as probe:
        start = await cursor(probe)
    watchers = [Watcher(LABEL, start) for _ in daemons]
    for watcher, daemon in zip(watchers, daemons, strict=True):
        watching.append(asyncio.create_task(watcher.run(daemon.address, watcher_key)))

    async def write(daemon: DaemonProcess, key: str, name: str) -> None:
        async with Raw(daemon.address, key) as raw:
            for n in range(per_writer):
                await create(raw, f"{name} {n}")

    began = time.monotonic()
    await asyncio.gather(
        *(
            write(daemons[n % 3], key, f"writer {n}")
            for n, key in enumerate(keys)  # writers 0, 3, 6, ... on A; 1, 4, ... on B
        )
    )
    seconds = time.monotonic() - began
    log = stored_log(pg_url, label=None)
    written = [e for e in log if e[0] > start]
    assert [e[0] for e in written] == list(range(start + 1, start + 1 + len(keys) * per_writer))
    await follow(watchers, written[-1][0])
    for watcher in watchers:
        assert watcher.received == written, "a watcher's log differs from the stored one"
    record(
        "multi_daemon_seq_order",
        {
            "daemons": 3,
            "writers": len(keys),
            "creates": len(written),
            "creates_per_second": round(len(written) / seconds),
            "watchers": len(watchers),
            "seqs_skipped": 0,
        },
    )


async def test_eight_workers_over_three_daemons_claim_each_of_500_tasks_once(
    make_daemon: MakeDaemon, pg_url: str
) -> None:
    daemons = await three_daemons(make_daemon, pg_url)
    total = 500
    creator = await add_agent(daemons[0], "creator")
    async with Raw(daemons[0].address, creator) as raw:
        for batch in range(0, total, 50):
            await asyncio.gather(*(create(raw, f"job {n}") for n in range(batch, batch + 50)))
    worker_keys = [await add_agent(daemons[0], f"worker{n}") for n in range(8)]
    claimed: Counter[str] = Counter()
    by_daemon: Counter[str] = Counter()
    lock = asyncio.Lock()
    remaining = [total]

    async def work(daemon: DaemonProcess, key: str) -> None:
        request = tasks_pb2.ClaimTaskRequest(
            labels=[LABEL], lease=duration_pb2.Duration(seconds=60)
        )
        async with Raw(daemon.address, key) as raw:
            while True:
                response = await raw.tasks.ClaimTask(
                    request, metadata=raw.metadata, timeout=CALL_TIMEOUT
                )
                if not response.HasField("task"):
                    return  # nothing left unclaimed anywhere
                await raw.tasks.CompleteTask(
                    tasks_pb2.CompleteTaskRequest(
                        id=response.task.id, lease_token=response.lease_token
                    ),
                    metadata=raw.metadata,
                    timeout=CALL_TIMEOUT,
                )
                async with lock:
                    claimed[response.task.id] += 1
                    by_daemon[daemon.root.name] += 1
                    remaining[0] -= 1

    began = time.monotonic()
    await asyncio.gather(*(work(daemons[n % 3], key) for n, key in enumerate(worker_keys)))
    seconds = time.monotonic() - began
    assert len(claimed) == total and set(claimed.values()) == {1}
    log = stored_log(pg_url)
    claims = Counter(
        task_id for _, kind, task_id in log if kind == tasks_pb2.TASK_EVENT_TYPE_CLAIMED
    )
    assert len(claims) == total and set(claims.values()) == {1}
    assert all(by_daemon[d.root.name] > 0 for d in daemons), by_daemon
    record(
        "multi_daemon_claims",
        {
            "daemons": 3,
            "workers": 8,
            "tasks": total,
            "claimed_once": len(claimed),
            "claimed_twice": 0,
            "claim_complete_per_second": round(total / seconds),
            "by_daemon": dict(by_daemon),
        },
    )


async def test_an_expired_lease_is_requeued_exactly_once_whichever_daemon_ends_it(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    a, b, c = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "sleepy")
    count = 20
    async with Raw(a.address, key) as raw:
        tasks = [await create(raw, f"forgotten {n}") for n in range(count)]
        start = await cursor(raw)
        watcher = Watcher(LABEL, start)
        watching.append(asyncio.create_task(watcher.run(c.address, key)))
        # Leases ending together: every daemon's reaper is due at the same moment.
        lease = duration_pb2.Duration(nanos=400_000_000)
        for task in tasks:
            await raw.tasks.ClaimTask(
                tasks_pb2.ClaimTaskRequest(id=task.id, lease=lease), metadata=raw.metadata
            )
    # The claimant's daemon dies: the other two must end the leases.
    await a.kill()
    ids = {t.id for t in tasks}

    def requeued() -> Counter[str]:
        return Counter(
            task_id
            for _, kind, task_id in watcher.received
            if kind == tasks_pb2.TASK_EVENT_TYPE_REQUEUED and task_id in ids
        )

    async def all_requeued() -> None:
        while len(requeued()) < count:
            watcher.fresh.clear()
            await watcher.fresh.wait()

    await asyncio.wait_for(all_requeued(), 20)
    # A late or second expiry would record a second REQUEUED: each reaper of B
    # and C has run by the time a write through it is answered and watched.
    async with Raw(b.address, key) as on_b, Raw(c.address, key) as on_c:
        await create(on_b, "after the requeues, via B")
        await create(on_c, "after the requeues, via C")
    log = stored_log(pg_url)
    await follow([watcher], log[-1][0])
    stored = Counter(
        task_id
        for _, kind, task_id in log
        if kind == tasks_pb2.TASK_EVENT_TYPE_REQUEUED and task_id in ids
    )
    assert stored == Counter(dict.fromkeys(ids, 1))
    assert requeued() == stored
    assert watcher.received == [e for e in log if e[0] > start]


async def test_a_lease_a_heartbeat_shortened_ends_on_time_when_its_daemon_dies(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    a, _, c = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "shortener")
    async with Raw(a.address, key) as raw:
        task = await create(raw, "claimed for long, then for a moment")
        start = await cursor(raw)
        watcher = Watcher(LABEL, start)
        watching.append(asyncio.create_task(watcher.run(c.address, key)))
        claimed = await raw.tasks.ClaimTask(
            tasks_pb2.ClaimTaskRequest(id=task.id, lease=duration_pb2.Duration(seconds=120)),
            metadata=raw.metadata,
        )
        # B and C hear of the claim and set their lease timers for 120 s from now.
        await follow([watcher], stored_log(pg_url)[-1][0])
        # Time is the subject here: each timer, once woken by the claim, reads
        # the earliest lease end from the table; a heartbeat that committed
        # before that read would be seen without being told. A second is far
        # more than such a read takes.
        await asyncio.sleep(1.0)
        # A heartbeat records no event: only A's own timer hears of the shorter lease...
        await raw.tasks.Heartbeat(
            tasks_pb2.HeartbeatRequest(
                id=task.id,
                lease_token=claimed.lease_token,
                lease=duration_pb2.Duration(nanos=300_000_000),
            ),
            metadata=raw.metadata,
        )
    # ...and A dies: B or C must end the lease in about 0.3 s, not in 120 s.
    await a.kill()

    async def requeued() -> None:
        while not any(
            kind == tasks_pb2.TASK_EVENT_TYPE_REQUEUED and task_id == task.id
            for _, kind, task_id in watcher.received
        ):
            watcher.fresh.clear()
            await watcher.fresh.wait()

    await asyncio.wait_for(requeued(), 15)
    kinds = [kind for _, kind, task_id in stored_log(pg_url) if task_id == task.id]
    assert kinds.count(tasks_pb2.TASK_EVENT_TYPE_REQUEUED) == 1


async def test_a_long_poll_claim_on_b_is_woken_by_a_create_on_a(
    make_daemon: MakeDaemon, pg_url: str
) -> None:
    a, b, _ = await three_daemons(make_daemon, pg_url)
    creator = await add_agent(a, "creator", ["@poll"])
    worker = await add_agent(a, "worker", ["@poll"])
    wait = 20.0
    rounds = 5
    latencies: list[float] = []
    async with Raw(a.address, creator) as on_a, Raw(b.address, worker) as on_b:
        for n in range(rounds):
            claim = asyncio.ensure_future(
                on_b.tasks.ClaimTask(
                    tasks_pb2.ClaimTaskRequest(
                        labels=["@poll"], wait=duration_pb2.Duration(seconds=int(wait))
                    ),
                    metadata=on_b.metadata,
                    timeout=wait + 10,
                )
            )
            # Answered on B, so the claim, sent first on B's channel, is being served.
            await on_b.agents.WhoAmI(agents_pb2.WhoAmIRequest(), metadata=on_b.metadata)
            sent = time.monotonic()
            task = await create(on_a, f"wake up {n}", "@poll")
            response = await claim
            latencies.append(time.monotonic() - sent)
            assert response.task.id == task.id
    # Not woken, each claim would have waited out its 20 s.
    assert max(latencies) < wait / 4, latencies


async def test_a_revocation_on_a_refuses_the_key_on_c_within_the_bound(
    make_daemon: MakeDaemon, pg_url: str
) -> None:
    a, _, c = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "leaver")
    async with Raw(c.address, key) as on_c, Raw(a.address, a.admin_key) as admin:
        await on_c.agents.WhoAmI(agents_pb2.WhoAmIRequest(), metadata=on_c.metadata)
        watch = on_c.tasks.WatchTasks(
            tasks_pb2.WatchTasksRequest(labels=[LABEL]), metadata=on_c.metadata
        )
        revoked_at = time.monotonic()
        await admin.agents.RevokeAgent(
            agents_pb2.RevokeAgentRequest(name="leaver"), metadata=admin.metadata
        )
        refused_after: float | None = None
        refusal: grpc.StatusCode | None = None
        while time.monotonic() - revoked_at < AGENT_STALE_S + 1:
            try:
                await on_c.agents.WhoAmI(
                    agents_pb2.WhoAmIRequest(), metadata=on_c.metadata, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                refused_after = time.monotonic() - revoked_at
                refusal = exc.code()
                break
        assert refusal is grpc.StatusCode.UNAUTHENTICATED
        assert refused_after is not None and refused_after < AGENT_STALE_S
        # The agent's open watch stream on C ends too.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), CALL_TIMEOUT)
        assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED
    record("multi_daemon_revocation", {"refused_on_another_daemon_after_ms": refused_after * 1e3})


async def test_kill_9_of_one_daemon_loses_nothing_the_others_acknowledged(
    make_daemon: MakeDaemon, pg_url: str
) -> None:
    """The crash loop of test_crash_loop, on a team: producers and finishers on all
    three daemons; one of them is killed with SIGKILL at a random moment and
    restarted, round after round, while the other two serve on."""
    began = time.monotonic()
    daemons = await three_daemons(make_daemon, pg_url)
    rounds = scale(6, 60)
    producers = []
    running: list[asyncio.Task[None]] = []
    finished: Counter[str] = Counter()
    progress = asyncio.Event()
    stop = asyncio.Event()
    for n in range(6):
        daemon = daemons[n % 3]
        key = await add_agent(daemons[0], f"producer{n}")
        producer = Producer(f"p{n}", key, LABEL, progress)
        producers.append(producer)
        running.append(asyncio.create_task(producer.run(daemon.address, stop)))
    for n, daemon in enumerate(daemons):
        key = await add_agent(daemons[0], f"finisher{n}")
        running.append(asyncio.create_task(finish(daemon.address, key, LABEL, stop, finished)))
    rng = random.Random()
    try:
        for round_number in range(rounds):
            victim = daemons[round_number % 3]
            progress.clear()
            await progressed(progress, running, 30)
            await asyncio.sleep(rng.uniform(0.0, 0.35))  # the fault injection: a random moment
            await victim.kill()
            await victim.start()
            victim.admin_key = victim.admin_key or daemons[0].admin_key
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 60)
    finally:
        for task in running:
            task.cancel()

    acknowledged = {k: v for p in producers for k, v in p.acknowledged.items()}
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id, content FROM tasks").fetchall()
        seqs = [int(s) for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq")]
    copies = Counter(content for _, content in rows)
    stored_ids = {content: task_id for task_id, content in rows}
    lost = sorted(k for k, task_id in acknowledged.items() if stored_ids.get(k) != task_id)
    duplicated = sorted(k for k, n in copies.items() if n > 1)
    assert seqs == list(range(1, len(seqs) + 1)), "the stored log has a gap or a repeat"
    # Every daemon, restarted or not, serves exactly the stored log from seq 0. A
    # claim lost in the last round still runs out its lease (2 s) meanwhile, and
    # its REQUEUED event may come after `log` was read: the watcher's events are
    # the stored log as it stands once the watcher has them, up to its last.
    log = stored_log(pg_url)
    for daemon in daemons:
        watcher = Watcher(LABEL, 0)
        watching = asyncio.create_task(watcher.run(daemon.address, daemons[0].admin_key))
        try:
            await follow([watcher], log[-1][0])
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        now_stored = stored_log(pg_url)
        assert watcher.received[: len(log)] == log
        assert watcher.received == now_stored[: len(watcher.received)]
    record(
        "multi_daemon_crash_loop",
        {
            "daemons": 3,
            "rounds": rounds,
            "kills": sum(d.kills for d in daemons),
            "producers": len(producers),
            "acknowledged": len(acknowledged),
            "tasks_stored": len(rows),
            "replies_lost_to_kills": sum(p.replies_lost for p in producers),
            "commits_found_by_retry": sum(p.found_by_retry for p in producers),
            "tasks_completed_meanwhile": finished["completed"],
            "lost": len(lost),
            "duplicated": len(duplicated),
            "seconds": round(time.monotonic() - began, 1),
        },
    )
    assert lost == [], f"acknowledged but lost: {lost[:10]}"
    assert duplicated == [], f"stored more than once: {duplicated[:10]}"
    assert len(rows) == len(acknowledged)


def terminate_backend(url: str, role: str, daemon: DaemonProcess) -> None:
    """Ends the server side of one of the daemon's connections, as a restart of the
    server or a dropped network would (roles: writer, listener, reader)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            # With a timeout, it returns once the backend is gone: what is
            # committed from then on, that connection never hears.
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) "
            "FROM pg_stat_activity WHERE application_name = %s",
            (f"legato-{role}-{daemon.pid}",),
        ).fetchone()
    assert row is not None and row[0] == 1, f"no {role} connection of {daemon.root.name}"


async def test_a_broken_listening_connection_reconnects_and_misses_nothing(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    a, b, _ = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "writer")
    async with Raw(a.address, key) as on_a:
        start = await cursor(on_a)
        watcher = Watcher(LABEL, start)
        watching.append(asyncio.create_task(watcher.run(b.address, key)))
        await create(on_a, "heard live")
        await follow([watcher], stored_log(pg_url)[-1][0])
        for round_number in range(3):
            # NOTIFYs sent while B's listener is gone reach nobody on B: B must
            # read them back from the table once it listens again.
            terminate_backend(pg_url, "listener", b)
            for n in range(10):
                await create(on_a, f"while B was deaf {round_number}.{n}")
            # Caught up only by reading the table after listening again, so B
            # listens again before the next round.
            await follow([watcher], stored_log(pg_url)[-1][0])
    assert watcher.received == [e for e in stored_log(pg_url) if e[0] > start]
    assert watcher.reconnects == 0  # the watch stream itself never noticed


def writer_connections(url: str, daemon: DaemonProcess) -> int:
    """How many writer connections the daemon has open on the server."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (f"legato-writer-{daemon.pid}",),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def reconnected(url: str, daemon: DaemonProcess, timeout: float = 10.0) -> None:
    """Returns once the daemon's writer is connected (again)."""
    give_up_at = time.monotonic() + timeout
    # The server tells no one of a new connection: look, every few milliseconds.
    while writer_connections(url, daemon) != 1:
        assert time.monotonic() < give_up_at, f"{daemon.root.name}'s writer did not reconnect"
        await asyncio.sleep(0.01)


def stored_ids(url: str) -> dict[str, str]:
    """Task content → task id, as stored (the producers' content is their idempotency key)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT content, id FROM tasks").fetchall()
    return {str(content): str(task_id) for content, task_id in rows}


async def test_a_writer_whose_connection_breaks_reconnects_and_loses_nothing_acknowledged(
    make_daemon: MakeDaemon, pg_url: str, watching: list[asyncio.Task[None]]
) -> None:
    a, b, _ = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "writer")
    async with Raw(a.address, key) as on_a:
        start = await cursor(on_a)
    watcher = Watcher(LABEL, start)
    watching.append(asyncio.create_task(watcher.run(b.address, key)))

    # An idle writer finds its connection gone before it sends the next write:
    # that write waits for the new connection and succeeds.
    terminate_backend(pg_url, "writer", b)
    async with Raw(b.address, key) as on_b:
        await create(on_b, "the first write after the break")

    # Under load, writes in flight when the connection breaks are answered
    # UNAVAILABLE (the producer retries them with their idempotency key), and
    # whatever was acknowledged is stored.
    producer = Producer("on-b", key, LABEL)
    stop = asyncio.Event()
    producing = asyncio.create_task(producer.run(b.address, stop))
    for _ in range(5):
        producer.progress.clear()
        await progressed(producer.progress, [producing], 30)
        # An acknowledgement may be of a write committed before the last
        # break: break the connection the writer made since, not none.
        await reconnected(pg_url, b)
        terminate_backend(pg_url, "writer", b)
    producer.progress.clear()
    await progressed(producer.progress, [producing], 30)
    stop.set()
    await asyncio.wait_for(producing, 60)

    stored = stored_ids(pg_url)
    lost = [k for k, task_id in producer.acknowledged.items() if stored.get(k) != task_id]
    assert lost == [], f"acknowledged but not stored: {lost[:10]}"
    assert b.running and writer_connections(pg_url, b) == 1
    assert await health_status(b.address) == health_pb2.HealthCheckResponse.SERVING
    # B's watchers heard every commit, also those whose COMMIT reached the
    # server just as the connection broke (their callers were told UNAVAILABLE).
    await follow([watcher], stored_log(pg_url)[-1][0])
    assert watcher.received == [e for e in stored_log(pg_url) if e[0] > start]


async def test_a_daemon_that_cannot_reconnect_its_writer_stops_with_exit_3_and_the_rest_serve(
    make_daemon: MakeDaemon, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RECONNECT_ENV, "1")
    a, b, _ = await three_daemons(make_daemon, pg_url)
    key = await add_agent(a, "writer")
    database = conninfo.conninfo_to_dict(pg_url)["dbname"]
    with psycopg.connect(server_url(), autocommit=True) as admin:
        # The server is there, but no new connection to the database is let in
        # (superusers included): B's writer cannot come back.
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            terminate_backend(server_url(), "writer", b)
            async with Raw(b.address, key) as on_b:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await create(on_b, "on a writer that cannot reconnect")
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert b.process is not None
            assert await asyncio.wait_for(b.process.wait(), 30) == 3  # EXIT_DATABASE_FAILED
            b.process = None
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    async with Raw(a.address, key) as on_a:
        await create(on_a, "A serves on")
