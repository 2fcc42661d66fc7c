"""What the web UI sends the browser: tasks, events and agents as JSON objects.

Two shapes of a task. The *summary* is what a list row needs (the small fields
and the first line of the request); the *full* task adds the request, context,
result, output and texts. Events are deltas, as in the contract (TaskEvent.task):
a field an event does not carry is left out of its JSON, so the page folds an
event with a plain `Object.assign` onto the task it holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from legato.client.models import CARRIES, Agent, EventType, Task, TaskEvent

JSON = dict[str, Any]

# A list row shows this much of the request's first line.
TITLE_CHARS = 200

# Every event carries these (TaskEvent.task in the contract).
_SMALL = (
    "id",
    "labels",
    "status",
    "created_by",
    "claimed_by",
    "parent_id",
    "root_id",
    "attempt",
    "max_attempts",
    "released",
    "version",
    "depth",
    "output_size",
    "created_at",
    "updated_at",
    "lease_expires_at",
    "deadline",
)
_TEXTS = ("content", "context", "result", "error", "question", "answer")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _time(value: datetime) -> str:
    # One width for every time, so the page can compare them as strings.
    return value.isoformat(timespec="microseconds")


def title(content: str) -> str:
    """The request's first non-blank line, cut to `TITLE_CHARS`."""
    line = next((line.strip() for line in content.splitlines() if line.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def current_output(task: Task) -> str:
    """The current attempt's output as of the task's `version`.

    GetTask reads the output after the task, so it may hold chunks appended
    since; they come again as events, so cut the text at `output_size`.
    """
    data = task.output.encode()
    if len(data) <= task.output_size:
        return task.output
    return data[: task.output_size].decode(errors="ignore")


def summary(task: Task) -> JSON:
    """A task as a list row needs it."""
    document = {name: _plain(getattr(task, name)) for name in _SMALL}
    document["title"] = title(task.content)
    return document


def full(task: Task) -> JSON:
    """A task with everything the task page shows."""
    document = summary(task)
    document.update({name: _plain(getattr(task, name)) for name in _TEXTS})
    document["output"] = current_output(task)
    return document


def event(change: TaskEvent, *, texts: bool, chunk_text: bool = True) -> JSON:
    """An event for the page; with `texts`, the texts its type carries and its output
    chunk's text (unless not `chunk_text`: a timeline needs only the chunk's size)."""
    task = change.task
    if change.type is EventType.CREATED:
        delta = full(task) if texts else summary(task)
        delta.pop("output", None)
    else:
        delta = {name: _plain(getattr(task, name)) for name in _SMALL}
        if texts:
            delta.update({name: _plain(getattr(task, name)) for name in CARRIES[change.type]})
    document: JSON = {
        "seq": change.seq,
        "type": change.type.value,
        "actor": change.actor,
        "time": _time(change.time),
        "task": delta,
    }
    if change.output is not None:
        chunk: JSON = {
            "attempt": change.output.attempt,
            "offset": change.output.offset,
            "size": len(change.output.text.encode()),
        }
        if texts and chunk_text:
            chunk["text"] = change.output.text
        document["output"] = chunk
    return document


def agent(who: Agent, holds: list[Task]) -> JSON:
    """An agent and the tasks it holds now."""
    return {
        "name": who.name,
        "labels": list(who.labels),
        "role": who.role.value,
        "created_at": _time(who.created_at),
        "last_seen_at": _time(who.last_seen_at) if who.last_seen_at else None,
        "revoked": who.revoked,
        "holds": [summary(task) for task in holds],
    }
