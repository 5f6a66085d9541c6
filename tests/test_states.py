"""The task lifecycle: one table of transitions."""

import pytest

from cc_tasks.errors import InvalidTransitionError
from cc_tasks.states import TRANSITIONS, TaskStatus, check_transition


def test_lifecycle_is_written_in_one_place():
    assert TRANSITIONS[TaskStatus.WAITING] == {
        TaskStatus.QUEUED,
        TaskStatus.SKIPPED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
    assert TRANSITIONS[TaskStatus.QUEUED] == {TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED}
    assert TRANSITIONS[TaskStatus.RUNNING] == {
        TaskStatus.QUEUED,  # its worker was lost before the attempt used a tool: a new attempt
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.TIMEOUT,
        TaskStatus.CANCELLED,
    }
    terminal = {s for s in TaskStatus if s.terminal}
    assert terminal == {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.TIMEOUT,
        TaskStatus.CANCELLED,
        TaskStatus.SKIPPED,
    }
    check_transition(TaskStatus.QUEUED, TaskStatus.RUNNING)
    with pytest.raises(InvalidTransitionError, match="completed to running"):
        check_transition(TaskStatus.COMPLETED, TaskStatus.RUNNING)
    with pytest.raises(InvalidTransitionError):
        check_transition(TaskStatus.QUEUED, TaskStatus.COMPLETED)
