"""Lease chaos: workers claim, crash, stall past their lease or finish, while the daemon dies too.

Injected: worker processes (`lease_worker.py`) that SIGKILL themselves while
holding a lease, stall past it and then try to complete with the stale token,
or fail retryably; the test also SIGKILLs random workers and, now and then,
the daemon. Checked: every task ends exactly once, DONE or FAILED after
max_attempts; no two claims of a task ever held valid leases at the same time
(from the event log: each claim's interval runs from its CLAIMED event to its
lease end or the event that ended it, and no two intervals overlap); every
completion sent with a stale token was refused (from what the workers logged).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from legato.v1 import tasks_pb2

from reliability.conftest import MakeDaemon
from reliability.harness import Raw, create_agent, record, scale
from reliability.invariants import (
    CLAIMED_EVENT,
    COMPLETED,
    DONE,
    ENDS_A_CLAIM,
    FAILED,
    TERMINAL,
    Snapshot,
    assert_sound,
    read_snapshot,
)

TASKS = scale(60, 1500)
WORKERS = scale(4, 8)
MAX_ATTEMPTS = 3
LEASE = 1.0  # seconds: short, so that stalls and crashes outlive it quickly
LABEL = "@lease"
# Between two faults the test waits this long (uniformly drawn), then kills a
# random worker, or every DAEMON_KILL_EVERY-th time the daemon.
FAULT_EVERY = (0.3, 1.5)
DAEMON_KILL_EVERY = 3
TIME_LIMIT = scale(80.0, 900.0)
WORKER_SCRIPT = Path(__file__).with_name("lease_worker.py")
RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
UNANSWERED = frozenset(code.name for code in RETRY_CODES)

pytestmark = pytest.mark.timeout(scale(120, 1200))


@dataclass
class Crew:
    """The worker processes, each respawned as soon as it dies, until `stop`."""

    address: str
    keys: list[str]
    log_dir: Path
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    processes: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    spawned: int = 0
    died: int = 0

    async def supervise(self, slot: int) -> None:
        env = {**os.environ, "LEGATO_AGENT_KEY": self.keys[slot]}
        while not self.stop.is_set():
            self.spawned += 1
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER_SCRIPT),
                self.address,
                LABEL,
                str(LEASE),
                str(self.log_dir / f"worker{slot}.jsonl"),
                str(random.getrandbits(32)),
                env=env,
                stderr=(self.log_dir / f"worker{slot}.err").open("ab"),
            )
            self.processes[slot] = process
            await process.wait()
            if not self.stop.is_set():
                self.died += 1

    def kill_one(self, rng: random.Random) -> None:
        process = self.processes.get(rng.randrange(len(self.keys)))
        if process is not None and process.returncode is None:
            process.kill()

    async def shut_down(self, supervisors: list[asyncio.Task[None]]) -> None:
        self.stop.set()
        for process in self.processes.values():
            if process.returncode is None:
                process.kill()
        await asyncio.wait_for(asyncio.gather(*supervisors), 20)


async def follow_until_all_end(address: str, key: str, total: int, ended: set[str]) -> None:
    """Watches the label from seq 0, resuming across restarts, until `total` tasks ended."""
    last = 0
    async with Raw(address, key) as raw:
        while len(ended) < total:
            call = raw.tasks.WatchTasks(
                tasks_pb2.WatchTasksRequest(labels=[LABEL], after_seq=last),
                metadata=raw.metadata,
                wait_for_ready=True,
            )
            try:
                async for event in call:
                    last = event.seq
                    if event.task.status in TERMINAL:
                        ended.add(event.task.id)
                        if len(ended) >= total:
                            break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_CODES:
                    raise AssertionError(f"watch: {exc.code()} {exc.details()}") from exc
            finally:
                call.cancel()


def read_worker_logs(log_dir: Path) -> list[dict[str, Any]]:
    notes: list[dict[str, Any]] = []
    for path in sorted(log_dir.glob("worker*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                notes.append(json.loads(line))
    return notes


@dataclass
class LeaseAudit:
    """What the event log says about leases."""

    claims: int = 0
    double_leases: list[str] = field(default_factory=list)
    completed_after_lease_end: list[str] = field(default_factory=list)


def lease_extensions(notes: list[dict[str, Any]]) -> dict[tuple[str, int], int | None]:
    """How far the workers' heartbeats extended each claim, by (task, attempt).

    Heartbeats record no event, so the workers' logs say it: None where a
    heartbeat got no answer (a daemon kill) and may or may not have extended it.
    """
    attempt_of = {n["token"]: n["attempt"] for n in notes if n["ev"] == "claimed"}
    extended: dict[tuple[str, int], int | None] = {}
    for note in notes:
        if note["ev"] != "heartbeat" or note["token"] not in attempt_of:
            continue
        key = (note["task"], attempt_of[note["token"]])
        if "expires" not in note:
            extended[key] = None
        elif key not in extended or extended[key] is not None:
            extended[key] = max(extended.get(key) or 0, int(note["expires"]))
    return extended


def audit_leases(snapshot: Snapshot, extended: dict[tuple[str, int], int | None]) -> LeaseAudit:
    """Each claim holds from its CLAIMED event until its lease end (as last extended by a
    heartbeat, from `lease_extensions`) or the event that ended it, whichever is first;
    no two may overlap."""
    audit = LeaseAudit()
    for rowid, events in snapshot.by_task.items():
        task_id = snapshot.tasks[rowid].id
        intervals: list[tuple[int, int, int]] = []  # (start, end, seq of the claim)
        start: int | None = None
        lease_end = 0
        claim_seq = 0
        lease_known = True
        for event in events:
            if event.type == CLAIMED_EVENT:
                if start is not None:  # claimed again before the previous claim ended
                    audit.double_leases.append(f"{task_id}: seq {event.seq} claimed a held task")
                start, lease_end, claim_seq = (
                    event.at,
                    int(event.state["lease_expires_at"]),
                    event.seq,
                )
                key = (task_id, int(event.state["attempt"]))
                lease_known = extended.get(key, 0) is not None
                lease_end = max(lease_end, extended.get(key) or 0)
                audit.claims += 1
            elif event.type in ENDS_A_CLAIM and start is not None:
                if event.type == COMPLETED and lease_known and event.at >= lease_end:
                    audit.completed_after_lease_end.append(f"{task_id}: seq {event.seq}")
                end = min(lease_end, event.at) if lease_known else event.at
                intervals.append((start, end, claim_seq))
                start = None
        if start is not None:
            intervals.append((start, lease_end, claim_seq))
        for (_, end, seq), (next_start, _, next_seq) in itertools.pairwise(intervals):
            if next_start < end:
                audit.double_leases.append(
                    f"{task_id}: claim seq {next_seq} began {end - next_start} us before "
                    f"claim seq {seq} ended"
                )
    return audit


async def test_leases_stay_exclusive_and_every_task_ends_once_under_chaos(
    make_daemon: MakeDaemon, workdir: Path
) -> None:
    began = time.monotonic()
    daemon = make_daemon(args=["--max-open-tasks", str(TASKS + 100)])
    await daemon.start()
    creator = await create_agent(daemon, "creator", [])
    keys = [await create_agent(daemon, f"worker{n}", [LABEL]) for n in range(WORKERS)]
    async with Raw(daemon.address, creator) as raw:
        for n in range(TASKS):
            await raw.tasks.CreateTask(
                tasks_pb2.CreateTaskRequest(
                    content=f"chaos task {n}", labels=[LABEL], max_attempts=MAX_ATTEMPTS
                ),
                metadata=raw.metadata,
                timeout=10,
            )
    log_dir = workdir / "workers"
    log_dir.mkdir()
    crew = Crew(daemon.address, keys, log_dir)
    supervisors = [asyncio.create_task(crew.supervise(slot)) for slot in range(WORKERS)]
    ended: set[str] = set()
    following = asyncio.create_task(
        follow_until_all_end(daemon.address, daemon.admin_key, TASKS, ended)
    )
    rng = random.Random()
    worker_kills = 0
    deadline = time.monotonic() + TIME_LIMIT
    try:
        # Bounded by TIME_LIMIT: at least FAULT_EVERY[0] seconds pass per fault.
        for fault in range(int(TIME_LIMIT / FAULT_EVERY[0]) + 1):
            if following.done() or time.monotonic() > deadline:
                break
            # The fault injection: a random pause, then a kill (the wait ends early when done).
            await asyncio.wait([following], timeout=rng.uniform(*FAULT_EVERY))
            if following.done():
                break
            if fault % DAEMON_KILL_EVERY == 1:
                await daemon.kill()
                await daemon.start()
            else:
                crew.kill_one(rng)
                worker_kills += 1
        assert following.done(), f"only {len(ended)} of {TASKS} tasks ended in {TIME_LIMIT} s"
        await following
    finally:
        following.cancel()
        await crew.shut_down(supervisors)
    code, _, _ = await daemon.terminate(daemon.grace + 5)
    assert code == 0, daemon.log_tail()

    report = assert_sound(daemon.db_path)
    snapshot = read_snapshot(daemon.db_path)
    notes = read_worker_logs(log_dir)
    audit = audit_leases(snapshot, lease_extensions(notes))
    finishes = [n for n in notes if n["ev"] == "finish"]
    # A stale completion the daemon died under got no answer (its retry, if the worker
    # lived, is another note): whether it was applied shows in the event log instead.
    stale_sent = [n for n in finishes if n["stale"]]
    stale = [n for n in stale_sent if n["code"] not in UNANSWERED]
    stale_accepted = [n for n in stale if n["code"] == "OK"]
    claimed_by_workers = Counter((n["task"], n["attempt"]) for n in notes if n["ev"] == "claimed")
    claimed_twice = [k for k, count in claimed_by_workers.items() if count > 1]

    # Every task ended exactly once: DONE, or FAILED on its last attempt.
    terminal_events = Counter(
        snapshot.tasks[e.task_rowid].id for e in snapshot.events if e.status in TERMINAL
    )
    not_ended: list[str] = []
    ended_twice: list[str] = []
    failed_early: list[str] = []
    for rowid, task in snapshot.tasks.items():
        if terminal_events[task.id] != 1:
            (not_ended if terminal_events[task.id] == 0 else ended_twice).append(task.id)
        claims = sum(e.type == CLAIMED_EVENT for e in snapshot.by_task[rowid])
        if task.status == FAILED and (task.attempt != MAX_ATTEMPTS or claims != MAX_ATTEMPTS):
            failed_early.append(f"{task.id}: attempt {task.attempt}, {claims} claims")
        assert task.status in (DONE, FAILED), f"{task.id} ended {task.status}"
    # A completion acknowledged to a worker is the one the log recorded.
    done_attempt = {
        snapshot.tasks[e.task_rowid].id: int(e.state["attempt"])
        for e in snapshot.events
        if e.type == COMPLETED
    }
    attempt_of_token = {n["token"]: n["attempt"] for n in notes if n["ev"] == "claimed"}
    acknowledged = [n for n in finishes if n["kind"] == "complete" and n["code"] == "OK"]
    misrecorded = [
        n["task"]
        for n in acknowledged
        if done_attempt.get(n["task"]) != attempt_of_token[n["token"]]
    ]

    figures = {
        "tasks": TASKS,
        "workers": WORKERS,
        "lease_seconds": LEASE,
        "max_attempts": MAX_ATTEMPTS,
        "daemon_kills": daemon.kills,
        "worker_kills_by_test": worker_kills,
        "worker_processes_died": crew.died,
        "worker_processes_spawned": crew.spawned,
        "claims": audit.claims,
        "worker_plans": dict(Counter(n["action"] for n in notes if n["ev"] == "claimed")),
        "done": sum(t.status == DONE for t in snapshot.tasks.values()),
        "failed_after_max_attempts": sum(t.status == FAILED for t in snapshot.tasks.values()),
        "double_leases": len(audit.double_leases) + len(claimed_twice),
        "completions_after_lease_end_accepted": len(audit.completed_after_lease_end),
        "completions_attempted": len(finishes),
        "stale_completions_sent": len(stale_sent),
        "stale_completions_answered": len(stale),
        "stale_completions_refused": len(stale) - len(stale_accepted),
        "stale_refusal_codes": dict(Counter(n["code"] for n in stale)),
        "stale_completions_unanswered": len(stale_sent) - len(stale),
        "tasks_not_ended": len(not_ended),
        "tasks_ended_twice": len(ended_twice),
        **report.figures(),
        "seconds": round(time.monotonic() - began, 1),
    }
    record("lease_chaos", figures)
    assert not_ended == [] and ended_twice == [], (not_ended[:5], ended_twice[:5])
    assert failed_early == [], failed_early[:5]
    assert audit.double_leases == [], audit.double_leases[:10]
    assert claimed_twice == [], f"claimed twice under one attempt: {claimed_twice[:5]}"
    assert audit.completed_after_lease_end == [], audit.completed_after_lease_end[:10]
    assert stale, "no worker ever completed with a stale token: the test injected nothing"
    assert stale_accepted == [], f"stale completions accepted: {stale_accepted[:5]}"
    assert {n["code"] for n in stale} <= {"FAILED_PRECONDITION"}, figures["stale_refusal_codes"]
    assert misrecorded == [], f"acknowledged completions missing from the log: {misrecorded[:5]}"
    assert daemon.kills >= 1, "the daemon was never killed: the test injected too little"
