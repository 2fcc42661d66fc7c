"""Crash loop: producers create tasks while the daemon is killed with SIGKILL, round after round.

Injected: `kill -9` of the daemon at a random moment while N producers create
tasks with idempotency keys; a create whose reply was lost is retried with the
same key until it is acknowledged. Checked afterwards: every acknowledged task
is stored exactly once (lost = 0, duplicated = 0), the database passes
`integrity_check` and the invariants of `invariants.py`, and a watcher resuming
from any seq (in particular from the last seq that survived each kill) gets
exactly the stored events after it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from contextlib import closing

import pytest
from legato.v1 import tasks_pb2

from reliability.conftest import MakeDaemon
from reliability.harness import DaemonProcess, Raw, create_agent, record, scale
from reliability.invariants import assert_sound, connect_readonly
from reliability.load import CALL_TIMEOUT, Producer, finish, progressed

ROUNDS = scale(12, 150)
PRODUCERS = scale(4, 8)
LABEL = "@crash"
# The kill comes this long (uniformly drawn) after the round's first acknowledged create.
KILL_AFTER = (0.0, 0.35)
# Resumed watch streams compared with the log: this many events after each resume point.
RESUME_WINDOW = 200
# An open task count the producers never reach: the per-agent cap is not under test here.
NO_CAP = ["--max-open-tasks", "10000000"]

pytestmark = pytest.mark.timeout(scale(120, 1200))


async def watched_after(raw: Raw, after_seq: int, count: int) -> list[int]:
    """The seqs of the first `count` events a watcher resuming at `after_seq` receives."""
    call = raw.tasks.WatchTasks(
        tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=after_seq), metadata=raw.metadata
    )
    seqs: list[int] = []
    try:
        while len(seqs) < count:
            message = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
            assert isinstance(message, tasks_pb2.TaskEvent), f"stream ended: {message!r}"
            seqs.append(message.seq)
    finally:
        call.cancel()
    return seqs


def stored_seqs(daemon: DaemonProcess) -> list[int]:
    with closing(connect_readonly(daemon.db_path)) as db:
        return [int(row[0]) for row in db.execute("SELECT seq FROM events ORDER BY seq")]


async def test_no_acknowledged_create_is_lost_or_duplicated_across_kill_9_rounds(
    make_daemon: MakeDaemon,
) -> None:
    began = time.monotonic()
    daemon = make_daemon(args=NO_CAP)
    await daemon.start()
    keys = [await create_agent(daemon, f"producer{n}", [LABEL]) for n in range(PRODUCERS)]
    finisher_key = await create_agent(daemon, "finisher", [LABEL])
    finished: Counter[str] = Counter()
    progress = asyncio.Event()
    producers = [Producer(f"p{n}", key, LABEL, progress) for n, key in enumerate(keys)]
    stop = asyncio.Event()
    running = [asyncio.create_task(p.run(daemon.address, stop)) for p in producers]
    running.append(asyncio.create_task(finish(daemon.address, finisher_key, LABEL, stop, finished)))
    rng = random.Random()
    # The last seq that survived each kill: where watchers of the dead daemon resume.
    resume_points: list[int] = []
    try:
        for _ in range(ROUNDS):
            progress.clear()
            await progressed(progress, running, 30)  # this daemon acknowledged a create
            await asyncio.sleep(rng.uniform(*KILL_AFTER))  # the fault injection: a random moment
            await daemon.kill()
            await daemon.start()
            resume_points.append(stored_seqs(daemon)[-1])
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 60)
    finally:
        for task in running:
            task.cancel()

    acknowledged = {k: v for p in producers for k, v in p.acknowledged.items()}
    stored = stored_seqs(daemon)
    checks = sorted({0, *resume_points, *rng.sample(stored, min(len(stored), 10))} - {stored[-1]})
    async with Raw(daemon.address, daemon.admin_key) as admin:
        everything = await watched_after(admin, 0, len(stored))
        assert everything == stored, "a watcher from seq 0 did not get exactly the stored log"
        for after_seq in checks:
            expected = [s for s in stored if s > after_seq][:RESUME_WINDOW]
            got = await watched_after(admin, after_seq, len(expected))
            assert got == expected, f"a watcher resuming after seq {after_seq} got another log"
    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0, daemon.log_tail()

    report = assert_sound(daemon.db_path)
    with closing(connect_readonly(daemon.db_path)) as db:
        rows = db.execute("SELECT id, content FROM tasks").fetchall()
    copies = Counter(content for _, content in rows)
    stored_ids = {content: task_id for task_id, content in rows}
    lost = sorted(k for k, task_id in acknowledged.items() if stored_ids.get(k) != task_id)
    duplicated = sorted(k for k, n in copies.items() if n > 1)
    figures = {
        "rounds": ROUNDS,
        "producers": PRODUCERS,
        "kills": daemon.kills,
        "creates_sent": sum(p.sent for p in producers),
        "acknowledged": len(acknowledged),
        "tasks_stored": len(rows),
        "replies_lost_to_kills": sum(p.replies_lost for p in producers),
        "commits_found_by_retry": sum(p.found_by_retry for p in producers),
        "tasks_completed_meanwhile": finished["completed"],
        "claims_or_completions_interrupted": finished["interrupted"],
        "lost": len(lost),
        "duplicated": len(duplicated),
        "watch_resume_points_checked": len(checks) + 1,
        "integrity_check": "ok",
        **report.figures(),
        "seconds": round(time.monotonic() - began, 1),
    }
    record("crash_loop", figures)
    assert lost == [], f"acknowledged but lost: {lost[:10]}"
    assert duplicated == [], f"stored more than once: {duplicated[:10]}"
    assert len(rows) == len(acknowledged)  # every create in doubt was retried to an answer
