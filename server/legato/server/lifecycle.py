"""The task state machine: the one place that decides which change is legal.

    PENDING --claim--> CLAIMED --complete--> DONE
       |                |  ^ |---fail------> FAILED    (or PENDING while attempts remain
       |     ask back   v  | answer                     and the failure is retryable)
       |           INPUT_REQUIRED             (lease paused while the creator answers)
       |                |---lease ends-----> PENDING   (attempt + 1; FAILED after max_attempts)
       |                |---release--------> PENDING   (attempt + 1, not counted)
       +---cancel-------+---cancel---------> CANCELED
    any unfinished state --deadline passes--> FAILED

Terminal states never change. Every function is pure: it takes the task as
stored and returns the `Change` to record, or raises a `DomainError` that says
why the change is refused.
"""

from __future__ import annotations

import hmac
from dataclasses import replace
from datetime import UTC, datetime

from legato.server.errors import FailedPrecondition, ResourceExhausted
from legato.server.model import Change, EventType, OutputChunk, Status, TaskRecord

# Chunks a claimant appends add up to at most this much output per task.
MAX_OUTPUT_BYTES = 1024 * 1024

WORKING = (Status.CLAIMED, Status.INPUT_REQUIRED)


def _changed(task: TaskRecord, now: int, **fields: object) -> TaskRecord:
    return replace(task, version=task.version + 1, updated_at=now, **fields)  # type: ignore[arg-type]


def _holds(task: TaskRecord, lease_token: str) -> bool:
    return bool(task.lease_token) and hmac.compare_digest(
        task.lease_token.encode(), lease_token.encode()
    )


def _require_lease(
    task: TaskRecord, lease_token: str, now: int, action: str, allowed: tuple[Status, ...] = WORKING
) -> None:
    if task.status not in allowed:
        states = " or ".join(s.name for s in allowed)
        raise FailedPrecondition(
            f"task {task.id} is {task.status.name}; only {states} tasks can be {action}"
        )
    if not _holds(task, lease_token):
        # A wrong token and one of an ended claim look the same here (only the
        # current token is stored), so say what is known and both next steps.
        raise FailedPrecondition(
            f"lease_token is not the current lease token of task {task.id} (attempt "
            f"{task.attempt}, claimed by {task.claimed_by or 'nobody'}): pass the token "
            "ClaimTask returned; if it came from an earlier claim of yours, that claim has "
            "ended and the task is another attempt's now"
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
        question="",
        answer="",
        # Why the last attempt ended (released, lease expired, a retryable failure)
        # is in that attempt's event; left here, it reads as this attempt's error.
        error="",
    )
    return Change(claimed, EventType.CLAIMED)


def heartbeat(
    task: TaskRecord, *, lease_token: str, lease_us: int | None, now: int
) -> Change | None:
    """Extends the lease of a CLAIMED task, by `lease_us` or the claim's own length.

    While the task waits for an answer (INPUT_REQUIRED) its lease is paused and
    a heartbeat changes nothing.
    """
    _require_lease(task, lease_token, now, "heartbeated")
    if task.status is Status.INPUT_REQUIRED:
        return None
    length = lease_us if lease_us is not None else task.lease_us
    # Lease bookkeeping, not a change anyone watches: no event, no new version,
    # so a long task's history and its watchers' streams do not fill with heartbeats.
    extended = replace(task, lease_expires_at=now + length, lease_us=length)
    return Change(extended, None)


def ended_under(task: TaskRecord, lease_token: str) -> bool:
    """Whether someone else ended the task (a cancel, its deadline) under this claim.

    Such a heartbeat is answered with `cancel_requested` instead of an error,
    so the worker learns why it should stop. Endings of the claimant's own
    doing (complete, fail) and expired leases clear the token, so they do not
    count.
    """
    return task.status in (Status.CANCELED, Status.FAILED) and _holds(task, lease_token)


def complete(task: TaskRecord, *, lease_token: str, result: bytes, now: int) -> Change | None:
    """CLAIMED (or INPUT_REQUIRED) → DONE with the worker's result.

    A repeat of the call that completed the task (the same claim's token, the
    same result), sent again because its reply was lost, changes nothing and is
    answered with the DONE task: the worker cannot tell a lost reply from a
    lost request, so it must be able to ask again.
    """
    if task.status is Status.DONE and _holds(task, lease_token):
        if task.result == result:  # both serialized deterministically
            return None
        raise FailedPrecondition(
            f"task {task.id} is DONE already, completed under this claim with another "
            "result; a task is completed once"
        )
    _require_lease(task, lease_token, now, "completed")
    done = _changed(task, now, status=Status.DONE, result=result, error="", lease_expires_at=None)
    return Change(done, EventType.COMPLETED)


def _back_to_pending(task: TaskRecord, now: int, **fields: object) -> TaskRecord:
    # A new attempt number, so each attempt's output stands on its own.
    return _changed(
        task,
        now,
        status=Status.PENDING,
        attempt=task.attempt + 1,
        lease_token="",
        lease_expires_at=None,
        output_size=0,
        **fields,
    )


def _requeue_or_fail(task: TaskRecord, error: str, now: int) -> Change:
    if task.counted_attempts < task.max_attempts:
        return Change(_back_to_pending(task, now, error=error), EventType.REQUEUED)
    failed = _changed(
        task, now, status=Status.FAILED, error=error, lease_token="", lease_expires_at=None
    )
    return Change(failed, EventType.FAILED)


def fail(task: TaskRecord, *, lease_token: str, error: str, retryable: bool, now: int) -> Change:
    """CLAIMED → FAILED, or back to PENDING when retryable and attempts remain."""
    _require_lease(task, lease_token, now, "failed")
    if retryable:
        return _requeue_or_fail(task, error, now)
    failed = _changed(
        task, now, status=Status.FAILED, error=error, lease_token="", lease_expires_at=None
    )
    return Change(failed, EventType.FAILED)


def release(task: TaskRecord, *, lease_token: str, reason: str, now: int) -> Change:
    """CLAIMED (or INPUT_REQUIRED) → PENDING, handed back by its claimant.

    The attempt does not count against `max_attempts`: a worker stopping or a
    bridge restarting is no failure of the task.
    """
    _require_lease(task, lease_token, now, "released")
    why = reason or f"released by {task.claimed_by}"
    released = _back_to_pending(task, now, error=why, released=task.released + 1)
    return Change(released, EventType.RELEASED)


def append_output(task: TaskRecord, *, lease_token: str, text: str, now: int) -> Change:
    """Adds a chunk to the claimant's output."""
    _require_lease(task, lease_token, now, "given output")
    size = len(text.encode("utf-8", "surrogatepass"))
    if task.output_size + size > MAX_OUTPUT_BYTES:
        raise ResourceExhausted(
            f"task {task.id} has {task.output_size} bytes of output; {size} more would pass "
            f"the limit of {MAX_OUTPUT_BYTES} bytes: put the rest in the result"
        )
    grown = _changed(task, now, output_size=task.output_size + size)
    return Change(grown, EventType.OUTPUT, OutputChunk(task.output_size, text, task.attempt))


def request_input(task: TaskRecord, *, lease_token: str, question: str, now: int) -> Change:
    """CLAIMED → INPUT_REQUIRED: the claimant asks, its lease clock stops."""
    _require_lease(task, lease_token, now, "asked a question", allowed=(Status.CLAIMED,))
    asking = _changed(
        task,
        now,
        status=Status.INPUT_REQUIRED,
        question=question,
        answer="",
        lease_expires_at=None,
    )
    return Change(asking, EventType.INPUT_REQUESTED)


def provide_input(task: TaskRecord, *, answer: str, now: int) -> Change:
    """INPUT_REQUIRED → CLAIMED for the same claimant, with a fresh lease."""
    if task.status is not Status.INPUT_REQUIRED:
        raise FailedPrecondition(
            f"task {task.id} is {task.status.name}; only an INPUT_REQUIRED task can be "
            "answered (nothing was asked, or it was answered already)"
        )
    answered = _changed(
        task, now, status=Status.CLAIMED, answer=answer, lease_expires_at=now + task.lease_us
    )
    return Change(answered, EventType.INPUT_PROVIDED)


def _when(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")


def expire(task: TaskRecord, *, now: int) -> Change | None:
    """Ends what ran out: a passed deadline fails the task; an ended lease requeues it
    (or fails it after the last attempt)."""
    if task.status.terminal:
        return None
    if task.deadline is not None and task.deadline <= now:
        reason = f"deadline passed at {_when(task.deadline)} before the task finished"
        failed = _changed(task, now, status=Status.FAILED, error=reason, lease_expires_at=None)
        return Change(failed, EventType.FAILED)
    if task.status is not Status.CLAIMED or task.lease_expires_at is None:
        return None
    if task.lease_expires_at > now:
        return None
    reason = (
        f"lease of {task.claimed_by or 'the claimant'} expired on attempt "
        f"{task.counted_attempts} of {task.max_attempts}"
    )
    return _requeue_or_fail(task, reason, now)


def cancel(task: TaskRecord, *, reason: str, now: int) -> Change:
    """Any unfinished state → CANCELED; a claimant learns it on its next heartbeat."""
    if task.status.terminal:
        raise FailedPrecondition(
            f"task {task.id} is already {task.status.name}; only unfinished tasks can be canceled"
        )
    canceled = _changed(
        task, now, status=Status.CANCELED, error=reason or "canceled", lease_expires_at=None
    )
    return Change(canceled, EventType.CANCELED)
