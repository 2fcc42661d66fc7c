"""The task state machine: the one place that decides which change is legal.

    PENDING --claim--> CLAIMED --complete--> DONE
       |                  |----fail--------> FAILED   (or PENDING while attempts remain
       |                  |                            and the failure is retryable)
       |                  |----lease ends--> PENDING  (attempt + 1; FAILED after max_attempts)
       +----cancel--------+----cancel------> CANCELED

Terminal states never change. Every function is pure: it takes the task as
stored and returns the task after the change with the event to record, or
raises a `DomainError` that says why the change is refused.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from legato.server.errors import FailedPrecondition
from legato.server.model import EventType, Status, TaskRecord

Change = tuple[TaskRecord, EventType]


def _changed(task: TaskRecord, now: int, **fields: object) -> TaskRecord:
    return replace(task, version=task.version + 1, updated_at=now, **fields)  # type: ignore[arg-type]


def _require_lease(task: TaskRecord, lease_token: str, now: int, action: str) -> None:
    if task.status is not Status.CLAIMED:
        raise FailedPrecondition(
            f"task {task.id} is {task.status.name}; only CLAIMED tasks can be {action}"
        )
    if not hmac.compare_digest(task.lease_token.encode(), lease_token.encode()):
        raise FailedPrecondition(
            f"lease_token does not hold task {task.id}: the claim it came from has ended "
            "(lease expired or task reclaimed); stop working on this task"
        )
    if task.lease_expires_at is not None and task.lease_expires_at <= now:
        raise FailedPrecondition(
            f"the lease on task {task.id} has expired; the task will be requeued, "
            "stop working on it"
        )


def claim(task: TaskRecord, *, actor: str, lease_token: str, lease_us: int, now: int) -> Change:
    """PENDING → CLAIMED under a fresh lease."""
    if task.status is not Status.PENDING:
        raise FailedPrecondition(
            f"task {task.id} is {task.status.name}; only PENDING tasks can be claimed"
        )
    claimed = _changed(
        task,
        now,
        status=Status.CLAIMED,
        claimed_by=actor,
        lease_token=lease_token,
        lease_expires_at=now + lease_us,
        lease_us=lease_us,
    )
    return claimed, EventType.CLAIMED


def heartbeat(task: TaskRecord, *, lease_token: str, lease_us: int | None, now: int) -> Change:
    """Extends the lease of a CLAIMED task, by `lease_us` or the claim's own length."""
    _require_lease(task, lease_token, now, "heartbeated")
    length = lease_us if lease_us is not None else task.lease_us
    return _changed(task, now, lease_expires_at=now + length, lease_us=length), EventType.HEARTBEAT


def holds_canceled_claim(task: TaskRecord, lease_token: str) -> bool:
    """Whether `lease_token` was the claim of a task canceled under it.

    Such a heartbeat is answered with `cancel_requested` instead of an error,
    so the worker learns why it should stop.
    """
    return (
        task.status is Status.CANCELED
        and bool(task.lease_token)
        and hmac.compare_digest(task.lease_token.encode(), lease_token.encode())
    )


def complete(task: TaskRecord, *, lease_token: str, result: bytes, now: int) -> Change:
    """CLAIMED → DONE with the worker's result."""
    _require_lease(task, lease_token, now, "completed")
    done = _changed(task, now, status=Status.DONE, result=result, error="", lease_expires_at=None)
    return done, EventType.COMPLETED


def _requeue_or_fail(task: TaskRecord, error: str, now: int) -> Change:
    if task.attempt < task.max_attempts:
        requeued = _changed(
            task,
            now,
            status=Status.PENDING,
            error=error,
            attempt=task.attempt + 1,
            lease_token="",
            lease_expires_at=None,
        )
        return requeued, EventType.REQUEUED
    failed = _changed(task, now, status=Status.FAILED, error=error, lease_expires_at=None)
    return failed, EventType.FAILED


def fail(task: TaskRecord, *, lease_token: str, error: str, retryable: bool, now: int) -> Change:
    """CLAIMED → FAILED, or back to PENDING when retryable and attempts remain."""
    _require_lease(task, lease_token, now, "failed")
    if retryable:
        return _requeue_or_fail(task, error, now)
    return _changed(
        task, now, status=Status.FAILED, error=error, lease_expires_at=None
    ), EventType.FAILED


def expire(task: TaskRecord, *, now: int) -> Change | None:
    """Ends a lease that ran out: requeue, or FAILED after the last attempt."""
    if task.status is not Status.CLAIMED or task.lease_expires_at is None:
        return None
    if task.lease_expires_at > now:
        return None
    reason = (
        f"lease of {task.claimed_by or 'the claimant'} expired on attempt "
        f"{task.attempt} of {task.max_attempts}"
    )
    return _requeue_or_fail(task, reason, now)


def cancel(task: TaskRecord, *, reason: str, now: int) -> Change:
    """PENDING or CLAIMED → CANCELED; the claimant learns it on its next heartbeat."""
    if task.status.terminal:
        raise FailedPrecondition(
            f"task {task.id} is already {task.status.name}; "
            "only PENDING or CLAIMED tasks can be canceled"
        )
    canceled = _changed(
        task, now, status=Status.CANCELED, error=reason or "canceled", lease_expires_at=None
    )
    return canceled, EventType.CANCELED
