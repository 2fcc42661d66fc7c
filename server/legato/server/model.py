"""The daemon's domain records: tasks and the events that change them.

Structured blobs (`context`, `result`) stay serialized `google.protobuf.Struct`
bytes here: the daemon stores and forwards them without looking inside.
Times are integer microseconds since the Unix epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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
    HEARTBEAT = 3
    COMPLETED = 4
    FAILED = 5
    CANCELED = 6
    REQUEUED = 7
    OUTPUT = 8
    INPUT_REQUESTED = 9
    INPUT_PROVIDED = 10


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


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of a task's output; `offset` counts UTF-8 bytes."""

    offset: int
    text: str


class Change(NamedTuple):
    """What a state-machine step decided: the task after it, and what to record."""

    task: TaskRecord
    type: EventType
    chunk: OutputChunk | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One committed change: the task as it is after it."""

    seq: int
    type: EventType
    task: TaskRecord
    actor: str
    at: int
    chunk: OutputChunk | None = None


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
