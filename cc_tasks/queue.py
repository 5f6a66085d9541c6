"""The order in which ready tasks are claimed, and a view of the queue that spares a claimer re-reading it.

Highest priority first, then oldest (ids sort by creation time). ``QueueView`` keeps the queued tasks in that
order between claims: a queued task's record changes only when a worker claims it or it is cancelled, and a
refused claim shows either; a fresh claim (a worker makes one a second) reads every record again.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from .models import TaskRecord
from .states import TaskStatus


def queue_order(r: TaskRecord) -> tuple:
    return (-r.priority, r.created_at, r.task_id)


def ready(r: TaskRecord) -> bool:
    """Queued and held by no worker: a worker may claim it."""
    return r.status == TaskStatus.QUEUED and r.lease is None


class QueueView:
    """``order`` holds the ready tasks of one runner (workers claim ``claude`` tasks, agents ``agent`` ones) in
    claim order, ``queued`` their ids, ``others`` the rest of the active ones (running, waiting, the other
    runner's)."""

    def __init__(self, records: Mapping[str, TaskRecord] | None = None, runner: str = "claude"):
        records = records or {}
        self.runner = runner
        ready_ones = [r for r in records.values() if self._mine(r)]
        self.order: list[tuple[tuple, str]] = sorted((queue_order(r), r.task_id) for r in ready_ones)
        self.queued: set[str] = {r.task_id for r in ready_ones}
        self.others: set[str] = {t for t, r in records.items() if not self._mine(r)}

    def _mine(self, r: TaskRecord) -> bool:
        return ready(r) and r.runner == self.runner

    def note(self, r: TaskRecord) -> None:
        if self._mine(r):
            if r.task_id not in self.queued:
                bisect.insort(self.order, (queue_order(r), r.task_id))
                self.queued.add(r.task_id)
            self.others.discard(r.task_id)
        else:  # its entry in ``order`` is dropped when reached
            self.queued.discard(r.task_id)
            self.others.add(r.task_id)

    def keep(self, ids: set[str]) -> None:
        self.queued &= ids
        self.others &= ids

    def taken(self, task_id: str) -> None:
        self.queued.discard(task_id)
        self.others.add(task_id)

    def first(self, n: int, skip: set[str]) -> list[str]:
        """Up to ``n`` queued tasks not in ``skip``, in claim order (entries of tasks no longer queued are
        dropped)."""
        out: list[str] = []
        i = 0
        while i < len(self.order) and len(out) < n:
            t = self.order[i][1]
            if t not in self.queued:
                del self.order[i]
                continue
            if t not in skip and t not in out:  # (a task queued again has a second entry until the first is reached)
                out.append(t)
            i += 1
        return out

    def position(self, task_id: str) -> int | None:
        """1 for the next task to be claimed (among all labels)."""
        n = 0
        for _, t in self.order:
            if t in self.queued:
                n += 1
                if t == task_id:
                    return n
        return None
