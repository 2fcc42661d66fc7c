"""The daemon's domain records: tasks and the events that change them.

Structured blobs (`context`, `result`) stay serialized `google.protobuf.Struct`
bytes here: the daemon stores and forwards them without looking inside.
Times are integer microseconds since the Unix epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import NamedTuple

Clock = Callable[[], int]


def system_clock() -> int:
    """Microseconds since the Unix epoch."""
    return time.time_ns() // 1000


class Status(IntEnum):
    """Task states; values match `legato.v1.TaskStatus`."""

    PENDING = 1
    CLAIMED = 2
    DONE = 3
    FAILED = 4
    CANCELED = 5
    INPUT_REQUIRED = 6

    @property
    def terminal(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELED)


class EventType(IntEnum):
    """Kinds of change; values match `legato.v1.TaskEventType`."""

    CREATED = 1
    CLAIMED = 2
    # 3 was HEARTBEAT: heartbeats extend the lease in place and record no event.
    COMPLETED = 4
    FAILED = 5
    CANCELED = 6
    REQUEUED = 7
    OUTPUT = 8
    INPUT_REQUESTED = 9
    INPUT_PROVIDED = 10
    RELEASED = 11


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored, including the daemon-private lease fields."""

    id: str
    content: str
    labels: tuple[str, ...]
    context: bytes
    created_by: str
    created_at: int
    max_attempts: int
    parent_id: str = ""
    root_id: str = ""
    idempotency_key: str = ""
    status: Status = Status.PENDING
    result: bytes = b""
    error: str = ""
    claimed_by: str = ""
    attempt: int = 1
    version: int = 1
    updated_at: int = 0
    lease_token: str = ""
    lease_expires_at: int | None = None
    lease_us: int = 0
    depth: int = 0
    deadline: int | None = None
    output_size: int = 0
    question: str = ""
    answer: str = ""
    # Attempts handed back with ReleaseTask: they do not count against max_attempts.
    released: int = 0
    # The seq of the CLAIMED event of the current attempt: its output is the
    # OUTPUT events after it (daemon-private).
    claim_seq: int = 0

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against `max_attempts`: all but the released ones."""
        return self.attempt - self.released


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of an attempt's output; `offset` counts UTF-8 bytes from the attempt's start."""

    offset: int
    text: str
    attempt: int


class Change(NamedTuple):
    """What a state-machine step decided: the task after it, and what to record.

    `type` None stores the task without recording an event (a heartbeat only
    moves the lease).
    """

    task: TaskRecord
    type: EventType | None
    chunk: OutputChunk | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One committed change: the task as it is after it.

    `task` is slim (see `slim`): the blobs an event does not carry are left out,
    so buffered events cost what changed, not a copy of the task's context.
    """

    seq: int
    type: EventType
    task: TaskRecord
    actor: str
    at: int
    chunk: OutputChunk | None = None

    @property
    def size(self) -> int:
        """An upper bound of the event's bytes on the wire, for byte-bounded buffers."""
        task = self.task
        text = len(task.content) * 4 + len(task.error) * 4 + len(task.question) * 4
        text += len(task.answer) * 4 + (len(self.chunk.text) * 4 if self.chunk else 0)
        return EVENT_OVERHEAD + text + len(task.context) + len(task.result)


# Ids, labels, numbers and times of an event on the wire, bounded above.
EVENT_OVERHEAD = 2048

# A task's numbers and times on the wire (7 integers of at most 12 bytes with
# their tags, 4 timestamps of at most 24) and its own frame in a response,
# bounded above.
TASK_OVERHEAD = 256
# What each string or blob field adds to its bytes: a tag (at most 2 bytes)
# and a length (at most 5).
FIELD_OVERHEAD = 8


def utf8_size(text: str) -> int:
    """The UTF-8 bytes of `text`; without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def task_size(task: TaskRecord, output: str = "") -> int:
    """An upper bound of the task's bytes on the wire as a response carries it
    (with `output`, as GetTask does), for pages bounded in bytes.

    Blobs count as stored: they are deterministic serializations, which the
    wire form repeats byte for byte.
    """
    texts = (
        task.id, task.content, task.error, task.created_by, task.claimed_by, task.parent_id,
        task.root_id, task.question, task.answer, output, *task.labels,
    )  # fmt: skip
    size = TASK_OVERHEAD + sum(utf8_size(text) + FIELD_OVERHEAD for text in texts)
    return size + len(task.context) + len(task.result) + 2 * FIELD_OVERHEAD


# The texts and blobs each kind of event carries: exactly those its change may
# alter (see `lifecycle`), so folding events onto the CREATED task rebuilds the
# stored one. Ids, labels, status, attempt, claimant, sizes and times ride on
# every event: they are small.
CARRIES: dict[EventType, frozenset[str]] = {
    EventType.CLAIMED: frozenset({"question", "answer"}),
    EventType.COMPLETED: frozenset({"result", "error"}),
    EventType.FAILED: frozenset({"error"}),
    EventType.CANCELED: frozenset({"error"}),
    EventType.REQUEUED: frozenset({"error"}),
    EventType.RELEASED: frozenset({"error"}),
    EventType.OUTPUT: frozenset(),
    EventType.INPUT_REQUESTED: frozenset({"question", "answer"}),
    EventType.INPUT_PROVIDED: frozenset({"question", "answer"}),
}


def slim(task: TaskRecord, event_type: EventType) -> TaskRecord:
    """The task as an event of `event_type` carries it: whole on CREATED,
    otherwise without the texts and blobs that event did not change (`CARRIES`)."""
    if event_type is EventType.CREATED:
        return task
    carries = CARRIES[event_type]
    return replace(
        task,
        content="",
        context=b"",
        result=task.result if "result" in carries else b"",
        error=task.error if "error" in carries else "",
        question=task.question if "question" in carries else "",
        answer=task.answer if "answer" in carries else "",
    )


# The actor recorded for changes the daemon makes on its own (lease expiry).
DAEMON_ACTOR = "legato"


class Role(IntEnum):
    """Agent roles; values match `legato.v1.Role`."""

    ADMIN = 1
    AGENT = 2


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent as stored. Its API key is kept only as `key_hash` (SHA-256)."""

    name: str
    labels: tuple[str, ...]
    role: Role
    created_at: int
    key_id: str
    key_hash: str
    last_seen_at: int | None = None
    revoked: bool = False

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def labels_set(self) -> frozenset[str]:
        return frozenset(self.labels)
