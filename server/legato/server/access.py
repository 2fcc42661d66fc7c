"""Who may see and do what with a task: the one place views are decided.

An agent sees the tasks it created, the tasks carrying one of its labels and
the tasks it claimed (the latest claimant); an admin sees everything. A task
outside the caller's view is NOT_FOUND, exactly as if it did not exist, so a
view never reveals another agent's work. Inside the view, an action the caller
may not take is PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Sequence

from legato.server.errors import NotFound, PermissionDenied
from legato.server.model import AgentRecord, TaskRecord


def sees(agent: AgentRecord, task: TaskRecord) -> bool:
    return (
        agent.admin
        or task.created_by == agent.name
        or task.claimed_by == agent.name
        or not agent.labels_set.isdisjoint(task.labels)
    )


def require_visible(agent: AgentRecord, task: TaskRecord) -> None:
    if not sees(agent, task):
        raise NotFound(f"task {task.id!r} not found")


def parent_not_found(parent_id: str) -> str:
    """What CreateTask answers for a parent_id it does not find or the caller does not see."""
    return f"parent_id {parent_id!r}: no such task"


def claim_labels(agent: AgentRecord, requested: Sequence[str]) -> tuple[str, ...]:
    """The labels a claim draws from: the requested ones, which the agent must
    hold, or all of the agent's labels when none are requested."""
    if not requested:
        if not agent.labels:
            raise PermissionDenied(
                f"agent {agent.name!r} holds no labels, so it has nothing to claim; an admin "
                f"can add one with `legato agent update {agent.name} --label @name`"
            )
        return agent.labels
    if not agent.admin:
        missing = [label for label in requested if label not in agent.labels_set]
        if missing:
            raise PermissionDenied(
                f"agent {agent.name!r} does not hold {', '.join(missing)}; it can claim only "
                f"from its labels ({', '.join(agent.labels) or 'none'})"
            )
    return tuple(requested)


def require_claimable(agent: AgentRecord, task: TaskRecord) -> None:
    """Claiming by id: the task must carry one of the agent's labels."""
    require_visible(agent, task)
    if not agent.admin and agent.labels_set.isdisjoint(task.labels):
        raise PermissionDenied(
            f"task {task.id} is for {', '.join(task.labels)}; agent {agent.name!r} holds none "
            "of these labels"
        )


def require_holds_label(agent: AgentRecord, task: TaskRecord, claimed_from: Sequence[str]) -> None:
    """Claiming by labels: the agent must still hold one of the task's labels.

    Checked as the task is taken, for a claim whose labels were chosen before
    the agent's labels changed. Names neither the task nor its labels: the
    agent may no longer see it.
    """
    if not agent.admin and agent.labels_set.isdisjoint(task.labels):
        dropped = [label for label in claimed_from if label not in agent.labels_set]
        raise PermissionDenied(
            f"agent {agent.name!r} does not hold {', '.join(dropped)} any more; claim again "
            f"from its labels ({', '.join(agent.labels) or 'none'})"
        )


def require_claimant(agent: AgentRecord, task: TaskRecord, action: str) -> None:
    """Heartbeat, complete and fail are for the current claimant only."""
    if task.claimed_by != agent.name:
        raise PermissionDenied(
            f"only the agent that claimed task {task.id} can {action} it; "
            f"agent {agent.name!r} did not"
        )


def require_can_cancel(agent: AgentRecord, task: TaskRecord) -> None:
    require_visible(agent, task)
    if not agent.admin and task.created_by != agent.name:
        raise PermissionDenied(
            f"only the creator of task {task.id} ({task.created_by}) or an admin can cancel it"
        )


def require_can_delegate_under(agent: AgentRecord, parent: TaskRecord) -> None:
    """Children are created by the parent's claimant (delegating further), its
    creator, or an admin."""
    if not sees(agent, parent):
        # The store's answer for a parent_id that does not exist: any other
        # answer would tell that this one does.
        raise NotFound(parent_not_found(parent.id))
    if not agent.admin and agent.name not in (parent.created_by, parent.claimed_by):
        raise PermissionDenied(
            f"only the claimant or the creator of task {parent.id} can create tasks under it"
        )


def require_can_answer(agent: AgentRecord, task: TaskRecord) -> None:
    require_visible(agent, task)
    if not agent.admin and task.created_by != agent.name:
        raise PermissionDenied(
            f"only the creator of task {task.id} ({task.created_by}) or an admin can answer "
            "its question"
        )
