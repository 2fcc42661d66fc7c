"""Graceful restart under load: SIGTERM while 200 watchers and 8 writers are active.

Injected: SIGTERM to the daemon once all 200 watch streams are live (each has
received an event from this daemon) and the 8 writers are creating tasks;
then a restart, and again in the long form. Checked: the daemon exits with
code 0 within its grace period + 1 s, saying `legato stopped`; it ends the
watch streams itself (UNAVAILABLE, so clients resume); every write
acknowledged before the restart is stored after it, exactly once; and the
watchers, resumed from their last seq, hold exactly the event log.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import closing
from typing import Any

import pytest

from reliability.conftest import MakeDaemon
from reliability.harness import create_agent, record, scale
from reliability.invariants import assert_sound, connect_readonly, event_log
from reliability.load import Producer, Watcher, progressed

WATCHERS = 200
WRITERS = 8
ROUNDS = scale(2, 16)
GRACE = 3.0
LABEL = "@graceful"
GUARD = 30.0

pytestmark = pytest.mark.timeout(scale(120, 900))


async def test_sigterm_under_load_exits_cleanly_in_the_grace_and_keeps_every_write(
    make_daemon: MakeDaemon,
) -> None:
    began = time.monotonic()
    daemon = make_daemon(grace=GRACE, args=["--max-open-tasks", "1000000"])
    await daemon.start()
    watcher_key = await create_agent(daemon, "watcher", [LABEL])
    progress = asyncio.Event()
    writers = [
        Producer(f"g{n}", await create_agent(daemon, f"writer{n}", [LABEL]), LABEL, progress)
        for n in range(WRITERS)
    ]
    watchers = [Watcher(LABEL, 0) for _ in range(WATCHERS)]
    stop = asyncio.Event()
    writing = [asyncio.create_task(w.run(daemon.address, stop)) for w in writers]
    following = [asyncio.create_task(w.run(daemon.address, watcher_key)) for w in watchers]
    exits: list[dict[str, Any]] = []
    try:
        for _ in range(ROUNDS):
            # Active: every watcher got an event from this daemon, the writers are acknowledged.
            progress.clear()
            for watcher in watchers:
                watcher.fresh.clear()
            await progressed(progress, writing, GUARD)
            await asyncio.wait_for(asyncio.gather(*(w.fresh.wait() for w in watchers)), GUARD)
            acknowledged_before = sum(len(w.acknowledged) for w in writers)
            code, seconds, said = await daemon.terminate(GRACE + 5)
            exits.append(
                {
                    "code": code,
                    "seconds": round(seconds, 2),
                    "said": said[-1:],
                    "acknowledged_before": acknowledged_before,
                }
            )
            assert code == 0, daemon.log_tail()
            assert seconds <= GRACE + 1, f"exit took {seconds:.2f} s, grace {GRACE} s"
            assert said[-1:] == ["legato stopped"], said
            await daemon.start()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writing), GUARD)
        log = event_log(daemon.db_path)
        for watcher in watchers:
            watcher.wait_for(log[-1][0])
        await asyncio.wait_for(asyncio.gather(*(w.caught_up.wait() for w in watchers)), GUARD)
    finally:
        for task in [*writing, *following]:
            task.cancel()
        results = await asyncio.gather(*following, return_exceptions=True)
    failed = [r for r in results if not isinstance(r, asyncio.CancelledError)]
    assert failed == [], failed[:3]
    code, _, _ = await daemon.terminate(GRACE + 5)
    assert code == 0, daemon.log_tail()

    report = assert_sound(daemon.db_path)
    with closing(connect_readonly(daemon.db_path)) as db:
        stored = Counter(content for (content,) in db.execute("SELECT content FROM tasks"))
    acknowledged = {k: v for w in writers for k, v in w.acknowledged.items()}
    lost = [key for key in acknowledged if stored[key] == 0]
    duplicated = [key for key, n in stored.items() if n > 1]
    inexact = [n for n, w in enumerate(watchers) if w.received != log]
    stream_ends = sum((w.ended_with for w in watchers), Counter[str]())
    record(
        "graceful_restart",
        {
            "rounds": ROUNDS,
            "watchers": WATCHERS,
            "writers": WRITERS,
            "grace_seconds": GRACE,
            "exits": exits,
            "slowest_exit_seconds": max(e["seconds"] for e in exits),
            "acknowledged": len(acknowledged),
            "replies_lost_to_sigterm": sum(w.replies_lost for w in writers),
            # Creates whose reply never came although they committed: a drain would answer them.
            "commits_found_by_retry": sum(w.found_by_retry for w in writers),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "watch_streams_ended_by_daemon": dict(stream_ends),
            "watchers_with_exact_log": WATCHERS - len(inexact),
            "events_in_log": len(log),
            **report.figures(),
            "seconds": round(time.monotonic() - began, 1),
        },
    )
    assert lost == [] and duplicated == [], (lost[:5], duplicated[:5])
    assert inexact == [], f"{len(inexact)} watchers did not hold exactly the event log"
    assert set(stream_ends) <= {"UNAVAILABLE"}, stream_ends
