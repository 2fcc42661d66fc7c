"""What must hold of a legato database whatever happened to the daemon.

The database is opened read-only, the way an operator would inspect it, and
the event log is replayed through the task state machine:

- `PRAGMA integrity_check` is ok and no foreign key dangles;
- every event row references an existing task, and every task starts with CREATED;
- `seq` is strictly increasing and each task's events carry its versions 1, 2, 3, ...;
- each task's events are a legal path PENDING -> CLAIMED -> ... (no change after
  a terminal state, attempts grow only on REQUEUED and RELEASED, and the counted ones (all but
  the released) never pass max_attempts);
- the task row is where its last event left it;
- `task_labels` holds exactly each task's labels, flagged pending iff the task is.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# legato.v1.TaskStatus
PENDING, CLAIMED, DONE, FAILED, CANCELED, INPUT_REQUIRED = 1, 2, 3, 4, 5, 6
TERMINAL = frozenset({DONE, FAILED, CANCELED})
STATUS_NAMES = {
    PENDING: "PENDING", CLAIMED: "CLAIMED", DONE: "DONE", FAILED: "FAILED",
    CANCELED: "CANCELED", INPUT_REQUIRED: "INPUT_REQUIRED",
}  # fmt: skip

# legato.v1.TaskEventType (3 was HEARTBEAT: heartbeats record no event)
CREATED, CLAIMED_EVENT = 1, 2
(COMPLETED, FAILED_EVENT, CANCELED_EVENT, REQUEUED, OUTPUT, INPUT_REQUESTED, INPUT_PROVIDED,
 RELEASED) = range(4, 12)  # fmt: skip
EVENT_NAMES = {
    CREATED: "CREATED", CLAIMED_EVENT: "CLAIMED",
    COMPLETED: "COMPLETED", FAILED_EVENT: "FAILED", CANCELED_EVENT: "CANCELED",
    REQUEUED: "REQUEUED", OUTPUT: "OUTPUT", INPUT_REQUESTED: "INPUT_REQUESTED",
    INPUT_PROVIDED: "INPUT_PROVIDED", RELEASED: "RELEASED",
}  # fmt: skip
ENDS_A_CLAIM = frozenset({COMPLETED, FAILED_EVENT, CANCELED_EVENT, REQUEUED, RELEASED})

# event type -> {status before: status after}; None before: the task's first event.
LEGAL: dict[int, dict[int | None, int]] = {
    CREATED: {None: PENDING},
    CLAIMED_EVENT: {PENDING: CLAIMED},
    OUTPUT: {CLAIMED: CLAIMED, INPUT_REQUIRED: INPUT_REQUIRED},
    INPUT_REQUESTED: {CLAIMED: INPUT_REQUIRED},
    INPUT_PROVIDED: {INPUT_REQUIRED: CLAIMED},
    COMPLETED: {CLAIMED: DONE, INPUT_REQUIRED: DONE},
    # A passed deadline fails a task in any unfinished state.
    FAILED_EVENT: {PENDING: FAILED, CLAIMED: FAILED, INPUT_REQUIRED: FAILED},
    REQUEUED: {CLAIMED: PENDING, INPUT_REQUIRED: PENDING},
    RELEASED: {CLAIMED: PENDING, INPUT_REQUIRED: PENDING},
    CANCELED_EVENT: {PENDING: CANCELED, CLAIMED: CANCELED, INPUT_REQUIRED: CANCELED},
}


@dataclass(frozen=True)
class TaskRow:
    rowid: int
    id: str
    content: str
    labels: tuple[str, ...]
    created_by: str
    idempotency_key: str
    status: int
    attempt: int
    max_attempts: int
    version: int
    claimed_by: str


@dataclass(frozen=True)
class EventRow:
    seq: int
    task_rowid: int
    type: int
    actor: str
    at: int
    state: dict[str, Any]

    @property
    def status(self) -> int:
        return int(self.state["status"])


@dataclass
class Snapshot:
    """Everything in the database that the invariants speak about, read in one transaction."""

    tasks: dict[int, TaskRow]
    events: list[EventRow]
    labels: dict[int, dict[str, int]]  # task rowid -> label -> pending flag
    integrity: list[str]
    foreign_key_violations: list[tuple[Any, ...]]
    by_task: dict[int, list[EventRow]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grouped: defaultdict[int, list[EventRow]] = defaultdict(list)
        for event in self.events:
            grouped[event.task_rowid].append(event)
        self.by_task = dict(grouped)

    def task_by_id(self) -> dict[str, TaskRow]:
        return {task.id: task for task in self.tasks.values()}


def connect_readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def read_snapshot(path: Path) -> Snapshot:
    """Reads the database at `path` read-only, in one read transaction."""
    with closing(connect_readonly(path)) as db:
        db.execute("BEGIN")
        integrity = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
        foreign = [tuple(row) for row in db.execute("PRAGMA foreign_key_check")]
        tasks = {
            int(row[0]): TaskRow(
                rowid=int(row[0]),
                id=row[1],
                content=row[2],
                labels=tuple(json.loads(row[3])),
                created_by=row[4],
                idempotency_key=row[5],
                status=int(row[6]),
                attempt=int(row[7]),
                max_attempts=int(row[8]),
                version=int(row[9]),
                claimed_by=row[10],
            )
            for row in db.execute(
                "SELECT rowid, id, content, labels, created_by, idempotency_key, status, "
                "attempt, max_attempts, version, claimed_by FROM tasks"
            )
        }
        events = [
            EventRow(int(s), int(r), int(t), a, int(at), json.loads(state))
            for s, r, t, a, at, state in db.execute(
                "SELECT seq, task_rowid, type, actor, at, state FROM events ORDER BY seq"
            )
        ]
        labels: defaultdict[int, dict[str, int]] = defaultdict(dict)
        for label, rowid, pending in db.execute(
            "SELECT label, task_rowid, pending FROM task_labels"
        ):
            labels[int(rowid)][label] = int(pending)
        db.execute("COMMIT")
    return Snapshot(tasks, events, dict(labels), integrity, foreign)


@dataclass
class Report:
    """What the invariants found: counts to record, and every violation."""

    tasks: int = 0
    events: int = 0
    seq_holes: int = 0
    orphan_events: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "events": self.events,
            "seq_holes": self.seq_holes,
            "orphan_events": self.orphan_events,
            "statuses": self.statuses,
            "invariant_violations": len(self.violations),
        }


def check(snapshot: Snapshot) -> Report:
    """Checks every invariant of the module docstring; returns what it found."""
    report = Report(tasks=len(snapshot.tasks), events=len(snapshot.events))
    bad = report.violations
    if snapshot.integrity != ["ok"]:
        bad.append(f"integrity_check: {snapshot.integrity[:5]}")
    if snapshot.foreign_key_violations:
        bad.append(f"foreign_key_check: {snapshot.foreign_key_violations[:5]}")

    previous = 0
    for event in snapshot.events:
        if event.seq <= previous:
            bad.append(f"seq {event.seq} after {previous}: not strictly increasing")
        elif previous and event.seq != previous + 1:
            report.seq_holes += 1
        previous = event.seq
    orphans = [e.seq for e in snapshot.events if e.task_rowid not in snapshot.tasks]
    report.orphan_events = len(orphans)
    if orphans:
        bad.append(f"{len(orphans)} events reference no task, e.g. seq {orphans[:5]}")

    for rowid, task in snapshot.tasks.items():
        bad.extend(_check_task(task, snapshot.by_task.get(rowid, []), snapshot.labels.get(rowid)))
    report.statuses = dict(
        sorted(
            Counter(
                STATUS_NAMES.get(t.status, str(t.status)) for t in snapshot.tasks.values()
            ).items()
        )
    )
    return report


def _check_task(task: TaskRow, events: list[EventRow], labels: dict[str, int] | None) -> list[str]:
    bad: list[str] = []
    where = f"task {task.id}"
    if not events:
        return [f"{where} has no events"]
    status: int | None = None
    attempt, released = 1, 0
    for number, event in enumerate(events, start=1):
        name = EVENT_NAMES.get(event.type, str(event.type))
        allowed = LEGAL.get(event.type, {})
        expected = allowed.get(status)
        if expected is None or event.status != expected:
            before = "nothing" if status is None else STATUS_NAMES.get(status, str(status))
            after = STATUS_NAMES.get(event.status, str(event.status))
            bad.append(f"{where}: seq {event.seq} {name} took it from {before} to {after}")
        if int(event.state["version"]) != number:
            bad.append(
                f"{where}: seq {event.seq} carries version {event.state['version']}, "
                f"expected {number} (a version skipped or repeated)"
            )
        new_attempt = int(event.state["attempt"])
        new_released = int(event.state.get("released", 0))
        if new_attempt != attempt + (event.type in (REQUEUED, RELEASED)):
            bad.append(f"{where}: seq {event.seq} {name} moved attempt {attempt}->{new_attempt}")
        if new_released != released + (event.type == RELEASED):
            bad.append(f"{where}: seq {event.seq} {name} moved released {released}->{new_released}")
        if new_attempt - new_released > task.max_attempts:
            bad.append(
                f"{where}: attempt {new_attempt} ({new_released} released) of max "
                f"{task.max_attempts}"
            )
        status, attempt, released = event.status, new_attempt, new_released
    if task.status != status or task.version != len(events) or task.attempt != attempt:
        bad.append(
            f"{where}: row says {STATUS_NAMES.get(task.status)} v{task.version} attempt "
            f"{task.attempt}, its events end at {STATUS_NAMES.get(status or 0)} v{len(events)} "
            f"attempt {attempt}"
        )
    pending = int(task.status == PENDING)
    expected_labels = dict.fromkeys(task.labels, pending)
    if labels != expected_labels:
        bad.append(
            f"{where} ({STATUS_NAMES.get(task.status)}): task_labels {labels}, "
            f"expected {expected_labels}"
        )
    return bad


def event_log(path: Path) -> list[tuple[int, int, str]]:
    """Every stored event as (seq, event type, task id), in seq order."""
    with closing(connect_readonly(path)) as db:
        rows = db.execute(
            "SELECT e.seq, e.type, t.id FROM events e JOIN tasks t ON t.rowid = e.task_rowid "
            "ORDER BY e.seq"
        ).fetchall()
    return [(int(seq), int(kind), str(task_id)) for seq, kind, task_id in rows]


def assert_sound(path: Path) -> Report:
    """Checks the database at `path`; fails the test listing the first violations."""
    report = check(read_snapshot(path))
    assert not report.violations, (
        f"{len(report.violations)} invariant violations in {path}:\n"
        + "\n".join(report.violations[:30])
    )
    return report
