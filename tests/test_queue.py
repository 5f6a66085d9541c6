"""The claim order and the queue view a claimer keeps between claims."""

from datetime import timedelta

from cc_tasks.models import Lease, TaskRecord, utcnow
from cc_tasks.queue import QueueView, queue_order, ready
from cc_tasks.states import TaskStatus
from cc_tasks.store import new_task_id


def rec(priority=0, age=0.0, status=TaskStatus.QUEUED, leased=False) -> TaskRecord:
    t = new_task_id()
    return TaskRecord(
        task_id=t,
        cwd="/",
        timeout_seconds=1,
        priority=priority,
        status=status,
        created_at=utcnow() - timedelta(seconds=age),
        lease=Lease(task_id=t, worker="w-1-abcdef", epoch=1) if leased else None,
    )


def test_priority_first_then_oldest():
    old, new, high = rec(age=10), rec(age=1), rec(priority=3)
    assert sorted([new, high, old], key=queue_order) == [high, old, new]


def test_only_unleased_queued_tasks_are_ready():
    assert ready(rec())
    assert not ready(rec(leased=True))
    assert not ready(rec(status=TaskStatus.WAITING))
    assert not ready(rec(status=TaskStatus.RUNNING, leased=True))


def test_view_keeps_order_drops_taken_and_learns_new_ones():
    a, b, c = rec(age=3), rec(age=2), rec(age=1)
    running = rec(status=TaskStatus.RUNNING, leased=True)
    view = QueueView({r.task_id: r for r in (a, b, running)})
    assert view.first(5, skip=set()) == [a.task_id, b.task_id]
    assert view.others == {running.task_id}
    view.taken(a.task_id)
    view.note(c)
    urgent = rec(priority=9)
    view.note(urgent)
    assert view.first(5, skip=set()) == [urgent.task_id, b.task_id, c.task_id]
    assert view.first(1, skip={urgent.task_id}) == [b.task_id]
    assert view.position(c.task_id) == 3 and view.position(a.task_id) is None
    view.keep({c.task_id})  # the others ended or were deleted
    assert view.first(5, skip=set()) == [c.task_id]
