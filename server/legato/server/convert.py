"""Conversions between domain records and `legato.v1` messages."""

from __future__ import annotations

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from legato.server.errors import InvalidArgument
from legato.server.model import AgentRecord, Event, Role, Status, TaskRecord
from legato.v1 import agents_pb2, tasks_pb2


def struct_bytes(
    message: tasks_pb2.CreateTaskRequest | tasks_pb2.CompleteTaskRequest, field: str
) -> bytes:
    """A Struct field serialized deterministically, or b'' when unset.

    Deterministic, so that the same blob always has the same bytes: idempotent
    retries compare them.
    """
    if not message.HasField(field):  # type: ignore[arg-type]
        return b""
    blob: struct_pb2.Struct = getattr(message, field)
    return blob.SerializeToString(deterministic=True)


def duration_us(message: object, field: str) -> int | None:
    """A Duration field in microseconds, or None when unset; INVALID_ARGUMENT if malformed."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    value: duration_pb2.Duration = getattr(message, field)
    mixed_signs = (value.seconds < 0 < value.nanos) or (value.nanos < 0 < value.seconds)
    if mixed_signs or not -999_999_999 <= value.nanos <= 999_999_999:
        raise InvalidArgument(
            f"{field} is not a valid Duration (seconds={value.seconds}, nanos={value.nanos}): "
            "nanos must be within ±999,999,999 and have the sign of seconds"
        )
    microseconds: int = value.ToMicroseconds()
    return microseconds


def statuses(values: list[int]) -> list[Status]:
    try:
        return [Status(v) for v in values]
    except ValueError:
        raise InvalidArgument(
            f"statuses has an unknown value among {values}; use TASK_STATUS_PENDING .. "
            "TASK_STATUS_CANCELED"
        ) from None


def task_proto(task: TaskRecord) -> tasks_pb2.Task:
    message = tasks_pb2.Task(
        id=task.id,
        content=task.content,
        labels=task.labels,
        status=int(task.status),  # type: ignore[arg-type]
        error=task.error,
        created_by=task.created_by,
        claimed_by=task.claimed_by,
        parent_id=task.parent_id,
        root_id=task.root_id,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        version=task.version,
        depth=task.depth,
        output_size=task.output_size,
        question=task.question,
        answer=task.answer,
        released=task.released,
    )
    if task.context:
        message.context.MergeFromString(task.context)
    if task.result:
        message.result.MergeFromString(task.result)
    message.created_at.FromMicroseconds(task.created_at)
    message.updated_at.FromMicroseconds(task.updated_at)
    if task.lease_expires_at is not None and task.status is Status.CLAIMED:
        message.lease_expires_at.FromMicroseconds(task.lease_expires_at)
    if task.deadline is not None:
        message.deadline.FromMicroseconds(task.deadline)
    return message


def event_proto(event: Event) -> tasks_pb2.TaskEvent:
    """An event on the wire; its task is already slim (`model.slim`): what changed."""
    message = tasks_pb2.TaskEvent(
        seq=event.seq,
        type=int(event.type),  # type: ignore[arg-type]
        task=task_proto(event.task),
        actor=event.actor,
    )
    message.time.FromMicroseconds(event.at)
    if event.chunk is not None:
        message.output.offset = event.chunk.offset
        message.output.text = event.chunk.text
        message.output.attempt = event.chunk.attempt
    return message


def timestamp_us(message: object, field: str) -> int | None:
    """A Timestamp field in microseconds, or None when unset; INVALID_ARGUMENT if malformed."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    # The Timestamp range: years 1 to 9999, nanos 0 to 999,999,999.
    if not (-62135596800 <= value.seconds <= 253402300799 and 0 <= value.nanos <= 999_999_999):
        raise InvalidArgument(
            f"{field} is not a valid Timestamp (seconds={value.seconds}, nanos={value.nanos}): "
            "it must fall in years 1 to 9999, with nanos 0 to 999,999,999"
        )
    microseconds: int = value.ToMicroseconds()
    return microseconds


def agent_proto(agent: AgentRecord) -> agents_pb2.Agent:
    message = agents_pb2.Agent(
        name=agent.name,
        labels=agent.labels,
        role=int(agent.role),  # type: ignore[arg-type]
        revoked=agent.revoked,
    )
    message.created_at.FromMicroseconds(agent.created_at)
    if agent.last_seen_at is not None:
        message.last_seen_at.FromMicroseconds(agent.last_seen_at)
    return message


def role(value: int, *, default: Role | None) -> Role | None:
    if value == 0:
        return default
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(f"role {value} is unknown; use ROLE_ADMIN or ROLE_AGENT") from None
