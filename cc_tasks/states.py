"""The task lifecycle: statuses and every allowed change between them, in one table (a leaf module)."""

from __future__ import annotations

from enum import Enum

from .errors import InvalidTransitionError


class TaskStatus(str, Enum):
    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


#: Every allowed status change. waiting: its dependencies have not all completed yet; skipped: one of them
#: did not complete. running -> queued: its worker was lost before the attempt used a tool, and attempts
#: remain (the task goes back to the queue as a new attempt).
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.WAITING: frozenset({TaskStatus.QUEUED, TaskStatus.SKIPPED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.QUEUED, TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.TIMEOUT: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    TaskStatus.SKIPPED: frozenset(),
}
ACTIVE_STATUSES = frozenset(s for s in TaskStatus if not s.terminal)
#: Statuses of a dependency that make its dependents skip.
DEP_FAILED = frozenset({TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED, TaskStatus.SKIPPED})


def check_transition(old: TaskStatus, new: TaskStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransitionError(f"a task cannot go from {old.value} to {new.value}")
