"""Plain Python views of the `legato.v1` messages the client returns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from legato.client.errors import InexactValueError
from legato.v1 import agents_pb2, tasks_pb2

JSON = dict[str, Any]

# The largest integer a JSON number (a double) holds exactly, with all below it.
MAX_EXACT_INT = 2**53 - 1


class TaskStatus(StrEnum):
    """Where a task is in its life. DONE, FAILED and CANCELED are terminal."""

    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"
    # The claimant asked the creator a question (`Task.question`).
    INPUT_REQUIRED = "input_required"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED)

    @property
    def proto(self) -> tasks_pb2.TaskStatus.ValueType:
        return tasks_pb2.TaskStatus.Value(f"TASK_STATUS_{self.name}")


class EventType(StrEnum):
    """What changed in a `TaskEvent`."""

    CREATED = "created"
    CLAIMED = "claimed"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REQUEUED = "requeued"
    OUTPUT = "output"
    INPUT_REQUESTED = "input_requested"
    INPUT_PROVIDED = "input_provided"
    # The claimant handed the task back (`job.release()`); the attempt is not counted.
    RELEASED = "released"


def _plain(value: Any) -> Any:
    # Struct numbers are JSON doubles: an int sent comes back as a whole float,
    # and is given back as the int it was (JSON does not tell 2 from 2.0).
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(message: struct_pb2.Struct) -> JSON:
    return _plain(json_format.MessageToDict(message))  # type: ignore[no-any-return]


def dict_to_struct(value: Mapping[str, Any] | None, field: str) -> struct_pb2.Struct | None:
    """A JSON-like mapping as a Struct; TypeError names the field when it is not JSON."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a dict of JSON values, not {type(value).__name__}")
    _check_exact(value, field)
    message = struct_pb2.Struct()
    try:
        message.update(value)
    except (ValueError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"{field} must hold only JSON values (str, number, bool, None, list, dict): {exc}"
        ) from None
    return message


def _check_exact(value: Any, where: str) -> None:
    """Refuses numbers a double cannot carry exactly: they would be rounded, not refused."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) > MAX_EXACT_INT:
        raise InexactValueError(
            f"{where} is {value}, an integer beyond ±{MAX_EXACT_INT} (2**53 - 1): JSON "
            "numbers are doubles and would round it; send it as a string"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InexactValueError(f"{where} is {value}: JSON has no NaN or infinity")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_exact(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_exact(item, f"{where}[{index}]")


def _time(message: timestamp_pb2.Timestamp) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the daemon reported it."""

    id: str
    content: str
    labels: tuple[str, ...]
    context: JSON
    result: JSON | None
    status: TaskStatus
    error: str
    created_by: str
    claimed_by: str
    parent_id: str
    root_id: str
    attempt: int
    max_attempts: int
    version: int
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime | None
    depth: int = 0
    deadline: datetime | None = None
    # UTF-8 bytes of output so far; `output` holds it only on `get_task`.
    output_size: int = 0
    output: str = ""
    question: str = ""
    answer: str = ""
    # Only on a just-created task: e.g. that no agent holds one of its labels yet.
    warnings: tuple[str, ...] = ()
    # Attempts handed back with `release()`; they do not count against max_attempts.
    released: int = 0

    @classmethod
    def from_proto(cls, message: tasks_pb2.Task) -> Task:
        return cls(
            id=message.id,
            content=message.content,
            labels=tuple(message.labels),
            context=struct_to_dict(message.context),
            result=struct_to_dict(message.result) if message.HasField("result") else None,
            status=TaskStatus[
                tasks_pb2.TaskStatus.Name(message.status).removeprefix("TASK_STATUS_")
            ],
            error=message.error,
            created_by=message.created_by,
            claimed_by=message.claimed_by,
            parent_id=message.parent_id,
            root_id=message.root_id,
            attempt=message.attempt,
            max_attempts=message.max_attempts,
            version=message.version,
            created_at=_time(message.created_at),
            updated_at=_time(message.updated_at),
            lease_expires_at=(
                _time(message.lease_expires_at) if message.HasField("lease_expires_at") else None
            ),
            depth=message.depth,
            deadline=_time(message.deadline) if message.HasField("deadline") else None,
            output_size=message.output_size,
            output=message.output,
            question=message.question,
            answer=message.answer,
            warnings=tuple(message.warnings),
            released=message.released,
        )


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of an attempt's output; `offset` counts UTF-8 bytes from the
    start of that attempt's output."""

    offset: int
    text: str
    attempt: int = 1


# The texts and blobs each event type carries (the contract, TaskEvent.task):
# any other is left out of the event and keeps the value it had before.
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
_BLOBS = ("content", "context", "result", "error", "question", "answer")


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One change of a task; `seq` is the cursor to resume a watch from."""

    seq: int
    type: EventType
    task: Task
    actor: str
    time: datetime
    # Set on OUTPUT events.
    output: OutputChunk | None = None

    @classmethod
    def from_proto(cls, message: tasks_pb2.TaskEvent) -> TaskEvent:
        name = tasks_pb2.TaskEventType.Name(message.type).removeprefix("TASK_EVENT_TYPE_")
        return cls(
            seq=message.seq,
            type=EventType[name],
            task=Task.from_proto(message.task),
            actor=message.actor,
            time=_time(message.time),
            output=(
                OutputChunk(message.output.offset, message.output.text, message.output.attempt)
                if message.HasField("output")
                else None
            ),
        )

    def onto(self, before: Task | None) -> TaskEvent:
        """This event with its task made whole from the task as it was `before` it.

        Events carry only what their change may alter (`CARRIES`); the texts
        and blobs they leave out keep their earlier values. Folding a task's
        events from its CREATED one on rebuilds the task as the daemon stores it.
        """
        if before is None or self.type is EventType.CREATED:
            return self
        carried = CARRIES[self.type]
        kept = {name: getattr(before, name) for name in _BLOBS if name not in carried}
        return replace(self, task=replace(self.task, warnings=(), **kept))


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of `list_tasks`; pass `next_page_token` for the next ("" on the last)."""

    tasks: list[Task]
    next_page_token: str
    cursor: int


class Role(StrEnum):
    """What an agent may do: admins manage agents and see every task."""

    ADMIN = "admin"
    AGENT = "agent"

    @property
    def proto(self) -> agents_pb2.Role.ValueType:
        return agents_pb2.Role.Value(f"ROLE_{self.name}")


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent known to the daemon. Its key is never part of it."""

    name: str
    labels: tuple[str, ...]
    role: Role
    created_at: datetime
    last_seen_at: datetime | None
    revoked: bool

    @classmethod
    def from_proto(cls, message: agents_pb2.Agent) -> Agent:
        return cls(
            name=message.name,
            labels=tuple(message.labels),
            role=Role[agents_pb2.Role.Name(message.role).removeprefix("ROLE_")],
            created_at=_time(message.created_at),
            last_seen_at=_time(message.last_seen_at) if message.HasField("last_seen_at") else None,
            revoked=message.revoked,
        )
