"""Rows and records shared by the backends: both keep the same columns in the
same order, so a row reads back the same from either.

An event row stores only what a change can alter (status, claimant, attempt,
error, times) as JSON (`state_json`); the immutable parts (content, labels,
context) and the result, which is set once on the terminal DONE, are joined
from `tasks` when the event is read back (`event_from_row`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from legato.server.errors import AlreadyExists, ResourceExhausted
from legato.server.model import (
    AgentRecord,
    Event,
    EventType,
    OutputChunk,
    Role,
    Status,
    TaskRecord,
)

TASK_COLUMNS = (
    "id, content, labels, context, created_by, created_at, max_attempts, parent_id, root_id, "
    "idempotency_key, status, result, error, claimed_by, attempt, version, updated_at, "
    "lease_token, lease_expires_at, lease_us, depth, deadline, output_size, question, answer, "
    "released, claim_seq"
)


def task_from_row(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        id=row[0],
        content=row[1],
        labels=tuple(json.loads(row[2])),
        context=row[3],
        created_by=row[4],
        created_at=row[5],
        max_attempts=row[6],
        parent_id=row[7],
        root_id=row[8],
        idempotency_key=row[9],
        status=Status(row[10]),
        result=row[11],
        error=row[12],
        claimed_by=row[13],
        attempt=row[14],
        version=row[15],
        updated_at=row[16],
        lease_token=row[17],
        lease_expires_at=row[18],
        lease_us=row[19],
        depth=row[20],
        deadline=row[21],
        output_size=row[22],
        question=row[23],
        answer=row[24],
        released=row[25],
        claim_seq=row[26],
    )


def state_json(task: TaskRecord, chunk: OutputChunk | None) -> str:
    """What an event row keeps of the (slim) task: the fields a change can alter.

    Texts only when the event carries them (see `model.slim`): a long question
    is stored with the events that ask and answer it, not with every chunk after.
    """
    state: dict[str, Any] = {
        "status": int(task.status),
        "claimed_by": task.claimed_by,
        "attempt": task.attempt,
        "version": task.version,
        "updated_at": task.updated_at,
        "lease_expires_at": task.lease_expires_at,
        "output_size": task.output_size,
        "released": task.released,
    }
    for name in ("error", "question", "answer"):
        if value := getattr(task, name):
            state[name] = value
    if chunk is not None:
        state["chunk"] = [chunk.offset, chunk.text]
    return json.dumps(state, separators=(",", ":"))


def task_at_event(current: TaskRecord, state: str) -> tuple[TaskRecord, OutputChunk | None]:
    # `current` holds the blobs the event carries (see `_EVENT_SELECT`): the
    # result is written once, with the terminal DONE, so the stored one is the
    # one its COMPLETED event carried.
    fields = {**STATE_DEFAULTS, **json.loads(state)}
    status = Status(fields.pop("status"))
    chunk = fields.pop("chunk", None)
    task = replace(current, status=status, lease_token="", lease_us=0, claim_seq=0, **fields)
    return task, None if chunk is None else OutputChunk(chunk[0], chunk[1], task.attempt)


# Fields an event row may leave out (and `released`, which rows written
# before schema 2 do not have).
STATE_DEFAULTS = {"error": "", "question": "", "answer": "", "released": 0}


AGENT_COLUMNS = "name, labels, role, created_at, key_id, key_hash, last_seen_at, revoked"


def agent_row(agent: AgentRecord) -> tuple[Any, ...]:
    return (
        agent.name, json.dumps(list(agent.labels)), int(agent.role), agent.created_at,
        agent.key_id, agent.key_hash, agent.last_seen_at, int(agent.revoked),
    )  # fmt: skip


def agent_from_row(row: Sequence[Any]) -> AgentRecord:
    return AgentRecord(
        name=row[0],
        labels=tuple(json.loads(row[1])),
        role=Role(row[2]),
        created_at=row[3],
        key_id=row[4],
        key_hash=row[5],
        last_seen_at=row[6],
        revoked=bool(row[7]),
    )


def event_from_row(row: Sequence[Any]) -> Event:
    task, chunk = task_at_event(task_from_row(row[6:]), row[4])
    return Event(
        seq=row[0], type=EventType(row[1]), actor=row[2], at=row[3], task=task, chunk=chunk
    )


def events_within(
    rows: Iterable[Sequence[Any]], limit: int, max_bytes: int
) -> tuple[list[Event], bool]:
    """At most `limit` events of `rows` (queried with LIMIT limit + 1) whose sizes
    add up to at most `max_bytes` (at least one), and whether more follow."""
    events: list[Event] = []
    total = 0
    for row in rows:
        if len(events) == limit:
            return events, True
        event = event_from_row(row)
        total += event.size
        if events and total > max_bytes:
            return events, True
        events.append(event)
    return events, False


def prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in TASK_COLUMNS.split(","))


def same_request(original: TaskRecord, retry: TaskRecord) -> bool:
    return (
        original.content == retry.content
        and original.labels == retry.labels
        and original.context == retry.context
        and original.parent_id == retry.parent_id
        and original.max_attempts == retry.max_attempts
    )


def repeat_of(original: TaskRecord, task: TaskRecord) -> TaskRecord:
    """What a create of `task` with the idempotency key of the stored `original`
    answers: the original for the same request, ALREADY_EXISTS for another."""
    if same_request(original, task):
        return original
    raise AlreadyExists(
        f"idempotency_key {task.idempotency_key!r} was already used for a "
        f"different task ({original.id}); use a new key for a new task"
    )


def check_open_count(creator: str, open_count: int, max_open: int) -> None:
    """RESOURCE_EXHAUSTED if `creator`, with `open_count` tasks open, is at its cap."""
    if open_count >= max_open:
        raise ResourceExhausted(
            f"agent {creator!r} already has {open_count} open (pending or "
            f"claimed) tasks, the limit; wait for some to finish or cancel them"
        )


def task_values(task: TaskRecord) -> tuple[Any, ...]:
    """A task's values in `TASK_COLUMNS` order, for an INSERT."""
    return (
        task.id, task.content, json.dumps(list(task.labels)), task.context, task.created_by,
        task.created_at, task.max_attempts, task.parent_id, task.root_id,
        task.idempotency_key, int(task.status), task.result, task.error, task.claimed_by,
        task.attempt, task.version, task.updated_at, task.lease_token, task.lease_expires_at,
        task.lease_us, task.depth, task.deadline, task.output_size, task.question, task.answer,
        task.released, task.claim_seq,
    )  # fmt: skip


def event_columns(empty_blob: str) -> str:
    """The task columns of an event row joined with its task (`t`), `empty_blob`
    (the backend's literal of an empty blob) in place of the blobs it does not carry.

    The blobs only for the events that carry them (see `model.slim`), so a
    replay of many events of a task with a large context reads it once.
    """
    carried = {
        "content": f"CASE WHEN e.type = {int(EventType.CREATED)} THEN t.content ELSE '' END",
        "context": f"CASE WHEN e.type = {int(EventType.CREATED)} THEN t.context "
        f"ELSE {empty_blob} END",
        "result": f"CASE WHEN e.type = {int(EventType.COMPLETED)} THEN t.result "
        f"ELSE {empty_blob} END",
    }
    names = [c.strip() for c in TASK_COLUMNS.split(",")]
    return ", ".join(carried.get(name, f"t.{name}") for name in names)
