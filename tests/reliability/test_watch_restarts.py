"""Watchers through restarts: resumed streams deliver exactly the event log, in order, once.

Injected: the daemon is restarted again and again, alternately with SIGKILL
and SIGTERM, while producers create tasks and a finisher claims and completes
them. Each watcher reconnects from the last seq it received whenever its
stream drops. Checked: every watcher received exactly the stored events of its
label after its starting point, in seq order, none missed and none twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest

from reliability.conftest import MakeDaemon
from reliability.harness import create_agent, record, scale
from reliability.invariants import assert_sound, event_log
from reliability.load import Producer, Watcher, finish, progressed

RESTARTS = scale(8, 80)
WATCHERS = scale(8, 24)
PRODUCERS = 3
LABEL = "@watched"
# Each restart comes this long (uniformly drawn) after the previous daemon acknowledged a create.
RESTART_AFTER = (0.05, 0.4)


pytestmark = pytest.mark.timeout(scale(120, 1200))


async def test_resumed_watchers_receive_exactly_the_event_log_across_restarts(
    make_daemon: MakeDaemon,
) -> None:
    began = time.monotonic()
    # Past 1000 open tasks a writer would be refused: the cap is not under test here.
    daemon = make_daemon(args=["--max-open-tasks", "1000000"])
    await daemon.start()
    watcher_key = await create_agent(daemon, "watcher", [LABEL])
    progress = asyncio.Event()
    producers = [
        Producer(f"w{n}", await create_agent(daemon, f"writer{n}", [LABEL]), LABEL, progress)
        for n in range(PRODUCERS)
    ]
    finisher_key = await create_agent(daemon, "finisher", [LABEL])
    stop = asyncio.Event()
    finished: Counter[str] = Counter()
    load = [asyncio.create_task(p.run(daemon.address, stop)) for p in producers]
    load.append(asyncio.create_task(finish(daemon.address, finisher_key, LABEL, stop, finished)))
    # Half the watchers follow from the beginning, half join later from a seq in between.
    watchers = [Watcher(LABEL, 0) for _ in range(WATCHERS // 2)]
    following = [asyncio.create_task(w.run(daemon.address, watcher_key)) for w in watchers]
    rng = random.Random()
    kills = terminations = 0
    try:
        for restart in range(RESTARTS):
            progress.clear()
            await progressed(progress, load, 30)
            await asyncio.sleep(rng.uniform(*RESTART_AFTER))  # the fault injection
            if restart % 2:
                code, _, _ = await daemon.terminate(daemon.grace + 5)
                assert code == 0, daemon.log_tail()
                terminations += 1
            else:
                await daemon.kill()
                kills += 1
            await daemon.start()
            if restart == RESTARTS // 2:
                for _ in range(WATCHERS - len(watchers)):
                    watcher = Watcher(LABEL, rng.choice(event_log(daemon.db_path))[0])
                    watchers.append(watcher)
                    following.append(asyncio.create_task(watcher.run(daemon.address, watcher_key)))
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 60)
        log = event_log(daemon.db_path)
        for watcher in watchers:
            watcher.wait_for(log[-1][0])
        caught_up = asyncio.gather(*(w.caught_up.wait() for w in watchers))
        either: list[asyncio.Future[Any]] = [caught_up, *following]
        await asyncio.wait(either, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for task in following:
            if task.done():
                task.result()  # a watcher failed: raise why
        assert caught_up.done(), "some watchers never reached the last stored seq"
    finally:
        for task in [*load, *following]:
            task.cancel()
        await asyncio.gather(*following, return_exceptions=True)
    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0, daemon.log_tail()

    report = assert_sound(daemon.db_path)
    mismatched = []
    for number, watcher in enumerate(watchers):
        expected = [event for event in log if event[0] > watcher.after_seq]
        if watcher.received != expected:
            missing = sorted(set(expected) - set(watcher.received))
            extra = sorted(set(watcher.received) - set(expected))
            repeated = [e for e, n in Counter(watcher.received).items() if n > 1]
            mismatched.append(
                f"watcher {number} from seq {watcher.after_seq}: {len(missing)} missed "
                f"{missing[:3]}, {len(extra)} not in the log {extra[:3]}, {len(repeated)} twice"
            )
    record(
        "watch_restarts",
        {
            "restarts": RESTARTS,
            "kills": kills,
            "sigterms": terminations,
            "watchers": WATCHERS,
            "reconnects": sum(w.reconnects for w in watchers),
            "events_in_log": len(log),
            "events_delivered": sum(len(w.received) for w in watchers),
            "watchers_with_exact_log": WATCHERS - len(mismatched),
            "tasks_completed_meanwhile": finished["completed"],
            **report.figures(),
            "seconds": round(time.monotonic() - began, 1),
        },
    )
    assert mismatched == [], "\n".join(mismatched)
