"""The requests every section sends, built once so legato and its ceilings see the same bytes.

A benchmark task looks like a real delegation: 256 characters of content, one
label and a small structured context; a completed one carries a small sourced
result.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from legato.v1 import tasks_pb2

# The label the benchmark's worker agent holds and every benchmark task carries.
LABEL = "@bench"
# A label no agent claims from: pending tasks there stay pending for listings.
LISTED_LABEL = "@listed"
CREATOR = "creator"
WORKER = "worker"
# An agent that sees only the few tasks it created, none of the history: its
# listing must cost what it sees, not what is stored.
OBSERVER = "observer"
OBSERVER_LABEL = "@observer"
OBSERVER_TASKS = 5
CONTENT_CHARS = 256
CONTEXT: dict[str, Any] = {
    "api": "anthropic",
    "need": "requests per minute, with a source",
    "tier": 1,
}
RESULT: dict[str, Any] = {"rpm": 500, "source": "https://docs.example/limits"}
_FILLER = (
    "What is the current requests-per-minute limit of the Tier 1 plan? Cite the page it "
    "comes from and say when that page was last updated. "
)


def content(tag: str) -> str:
    """`tag` followed by filler, exactly CONTENT_CHARS long, so every request has one size."""
    text = tag + _FILLER * (CONTENT_CHARS // len(_FILLER) + 1)
    return text[:CONTENT_CHARS]


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def struct_bytes(value: dict[str, Any]) -> bytes:
    """A Struct serialized as the daemon stores it (deterministically)."""
    return struct(value).SerializeToString(deterministic=True)


def create_request(tag: str = "bench:", label: str = LABEL) -> bytes:
    return tasks_pb2.CreateTaskRequest(
        content=content(tag), labels=[label], context=struct(CONTEXT)
    ).SerializeToString()


def delivery_request(key: int) -> bytes:
    """A CreateTask request whose content names measurement `key` (negative: warm-up)."""
    return create_request(f"m:{key}:")


def delivery_key(text: str) -> int | None:
    """The measurement key `delivery_request` put in a task's content, if any."""
    if not text.startswith("m:"):
        return None
    end = text.find(":", 2)
    return int(text[2:end]) if end > 2 else None


def get_request(task_id: str) -> bytes:
    return tasks_pb2.GetTaskRequest(id=task_id).SerializeToString()


def claim_request(label: str = LABEL, lease_s: int = 600) -> bytes:
    return tasks_pb2.ClaimTaskRequest(
        labels=[label], lease=duration_pb2.Duration(seconds=lease_s)
    ).SerializeToString()


def list_request(*, label: str = "", pending_only: bool = False, page_size: int = 100) -> bytes:
    return tasks_pb2.ListTasksRequest(
        labels=[label] if label else [],
        statuses=[tasks_pb2.TASK_STATUS_PENDING] if pending_only else [],
        page_size=page_size,
    ).SerializeToString()


def watch_request(label: str = LABEL) -> bytes:
    return tasks_pb2.WatchTasksRequest(labels=[label]).SerializeToString()
