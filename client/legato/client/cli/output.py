"""How the `legato` command shows tasks, events and agents: text for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from legato.client.models import Agent, Role, Task, TaskEvent, TaskStatus


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, TaskStatus | Role):
        return value.value
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dump(value: Any) -> str:
    """`value` as one line of JSON; times as ISO 8601, enums as their values."""
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def task_json(task: Task) -> dict[str, Any]:
    return asdict(task)


def agent_json(agent: Agent) -> dict[str, Any]:
    return asdict(agent)


def agent_line(agent: Agent) -> str:
    seen = agent.last_seen_at.isoformat(timespec="minutes") if agent.last_seen_at else "never"
    state = "  REVOKED" if agent.revoked else ""
    labels = " ".join(agent.labels) or "(no labels)"
    return f"{agent.name:<20} {agent.role.value:<6} {labels}  last seen {seen}{state}"


def event_json(event: TaskEvent) -> dict[str, Any]:
    """An event for scripts; `task` is the event's delta (see TaskEvent.task in the contract)."""
    document: dict[str, Any] = {
        "seq": event.seq,
        "type": event.type.value,
        "actor": event.actor,
        "time": event.time,
        "task": task_json(event.task),
    }
    if event.output is not None:
        document["output"] = {
            "attempt": event.output.attempt,
            "offset": event.output.offset,
            "text": event.output.text,
        }
    return document


def task_line(task: Task, *, claimant: bool = True) -> str:
    """One line of `task`; `claimant=False` leaves out who claimed it (an event's line
    says who acted instead)."""
    parts = [
        task.id,
        task.status.value,
        " ".join(task.labels),
        # As the daemon counts toward max_attempts: handed-back attempts do not count.
        f"attempt {task.attempt - task.released}/{task.max_attempts}",
    ]
    if claimant and task.claimed_by and task.status is TaskStatus.CLAIMED:
        parts.append(f"claimed by {task.claimed_by}")
    return "  ".join(parts)


def age(since: datetime, now: datetime | None = None) -> str:
    """How long ago, in the largest unit that fits: `42s`, `5m`, `3h`, `2d`."""
    seconds = max(0, int(((now or datetime.now(UTC)) - since).total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def first_line(text: str, width: int) -> str:
    """The text's first line with its spaces folded, cut to `width` with an ellipsis."""
    lines = text.strip().splitlines()
    line = " ".join(lines[0].split()) if lines else ""
    if len(lines) > 1:
        line += " …"
    return line if len(line) <= width else line[: width - 1] + "…"


TASK_COLUMNS = ("ID", "STATUS", "AGE", "CREATOR", "LABELS", "CONTENT")


def task_table(tasks: Sequence[Task], now: datetime | None = None) -> list[str]:
    """`legato task list`: one row a task, columns sized to what they hold."""
    rows = [
        (
            task.id,
            task.status.value,
            age(task.created_at, now),
            task.created_by,
            " ".join(task.labels),
            first_line(task.content, 60),
        )
        for task in tasks
    ]
    widths = [max(len(row[n]) for row in [TASK_COLUMNS, *rows]) for n in range(5)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        + "  "
        + row[5]
        for row in [TASK_COLUMNS, *rows]
    ]


def task_text(task: Task) -> str:
    lines = [task_line(task), f"  content:    {task.content}"]
    if task.context:
        lines.append(f"  context:    {dump(task.context)}")
    if task.result is not None:
        lines.append(f"  result:     {dump(task.result)}")
    if task.error and task.status in (TaskStatus.FAILED, TaskStatus.CANCELED):
        lines.append(f"  error:      {task.error}")
    elif task.error and task.status is TaskStatus.PENDING:
        lines.append(f"  requeued:   {task.error}")  # why its last attempt ended
    if task.question:
        lines.append(f"  question:   {task.question}")
    if task.answer:
        lines.append(f"  answer:     {task.answer}")
    if task.output_size:
        lines.append(f"  output:     {task.output_size} bytes (`legato task tail {task.id}`)")
    lines.append(f"  created by: {task.created_by} at {task.created_at.isoformat()}")
    if task.parent_id:
        lines.append(f"  parent:     {task.parent_id} (root {task.root_id}, depth {task.depth})")
    if task.deadline is not None:
        lines.append(f"  deadline:   {task.deadline.isoformat()}")
    if task.lease_expires_at is not None:
        lines.append(f"  lease ends: {task.lease_expires_at.isoformat()}")
    return "\n".join(lines)


def _tree_node(task: Task) -> str:
    claimed = f"claimed by {task.claimed_by}" if task.claimed_by else "unclaimed"
    content = " ".join(task.content.split())
    if len(content) > 50:
        content = content[:49] + "…"
    return f"{task.id}  {task.status.value}  {' '.join(task.labels)}  {claimed}  {content!r}"


def tree_lines(tasks: Sequence[Task]) -> list[str]:
    """A task tree (as `get_task_tree` returns it) drawn one task a line, children indented.

    The daemon lists tasks in creation order, which is not depth-first: a
    grandchild can come after its uncle. Drawing walks the tree instead.
    """
    ids = {task.id for task in tasks}
    children: dict[str, list[Task]] = {}
    tops: list[Task] = []  # the asked task, and any whose parent is outside the caller's view
    for task in tasks:
        if task.parent_id in ids:
            children.setdefault(task.parent_id, []).append(task)
        else:
            tops.append(task)
    lines: list[str] = []

    def walk(task: Task, prefix: str, branch: str, below: str) -> None:
        lines.append(prefix + branch + _tree_node(task))
        kids = children.get(task.id, [])
        for n, kid in enumerate(kids):
            last = n == len(kids) - 1
            walk(kid, prefix + below, "└─ " if last else "├─ ", "   " if last else "│  ")

    for top in tops:
        walk(top, "", "", "")
    return lines


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"legato: {what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"legato: {what} must be a JSON object, e.g. '{{\"answer\": 42}}'")
    return value


def read_arg(text: str) -> str:
    """`-` reads standard input; `@path` reads a file; anything else is literal."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@") and Path(text[1:]).is_file():
        return Path(text[1:]).read_text()
    return text


class Output:
    """Where a command's results go: text or, with `--json`, one JSON document a line."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def task(self, task: Task) -> None:
        print(dump(task_json(task)) if self.as_json else task_text(task))

    def event(self, event: TaskEvent) -> None:
        if self.as_json:
            print(dump(event_json(event)), flush=True)
        else:
            line = f"{event.seq:>6}  {event.type.value:<9}  {task_line(event.task, claimant=False)}"
            print(f"{line}  by {event.actor}", flush=True)

    def agent(self, agent: Agent) -> None:
        print(dump(agent_json(agent)) if self.as_json else agent_line(agent))
