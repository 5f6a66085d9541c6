"""Stopping and deleting tasks: cancel_task (``cancel``, ``cancel_group``) and cleanup_task (``cleanup``)."""

from __future__ import annotations

import logging
import time

from .errors import CorruptRecordError, InvalidOptionsError, TaskNotFoundError
from .ids import validate_task_id
from .models import CleanupResult, GroupCancelled, TaskRecord, TaskStatus
from .worktree_tools import WorktreeMixin

log = logging.getLogger("cc_tasks")
#: How long cancel waits for a supervisor to stop its task before stopping it itself.
CANCEL_WAIT = 15.0


class StopMixin(WorktreeMixin):
    """Cancel a task (its whole process tree) or a group's; delete a task, with its worktree."""

    def cancel(self, task_id: str) -> TaskRecord:
        """Stop the task's whole process tree; the record stays with status ``cancelled``. A task that has not
        started is cancelled at once; a running one by its worker's supervisor (nudged; it also looks every
        0.25 s), or, if that worker does not end it within CANCEL_WAIT, here."""
        record = self.store.request_cancel(validate_task_id(task_id))
        if record.status.terminal:
            return record
        self.nudge()
        deadline = time.monotonic() + CANCEL_WAIT
        while time.monotonic() < deadline:
            record = self.store.read(task_id)  # (a lost worker's task ends cancelled here)
            if record.status.terminal:
                return record
            time.sleep(0.005)
        return self.store.force_cancel(
            task_id, f"cancelled: its worker did not stop it within {CANCEL_WAIT:g}s; its process tree was stopped"
        )

    def cleanup(self, task_id: str, keep_branch: bool = False) -> CleanupResult:
        """Stop the task if it still runs, then delete it. A task whose record is unreadable is deleted too
        (its processes, found by the task id in their environment, are stopped first). A worktree task's
        worktree is removed, and its branch unless it was merged or ``keep_branch``."""
        try:
            record = self.get(task_id)
        except CorruptRecordError:
            self.store.purge(task_id)
            log.info("cleaned up task %s (its record was unreadable)", task_id)
            return CleanupResult(task_id=task_id, deleted=True, was_status=None)
        was: TaskStatus | None = record.status
        if not was.terminal:
            self.cancel(task_id)
        removal = self._remove_worktree(record, keep_branch) if record.worktree else {}
        self.store.delete(task_id)
        log.info("cleaned up task %s (was %s)", task_id, was.value if was else "unreadable")
        return CleanupResult(task_id=task_id, deleted=True, was_status=was, **removal)

    def cancel_group(self, group: str) -> GroupCancelled:
        members = self.group_ids(group)  # (one scan of the store: every task of the group, finished or not)
        if not members:
            raise InvalidOptionsError(f"group {group!r} has no tasks (list_active_tasks shows the groups in use)")
        cancelled = []
        for t in members:
            try:
                if (
                    not self.store.read(t, cached=True).status.terminal
                    and self.cancel(t).status == TaskStatus.CANCELLED
                ):
                    cancelled.append(t)
            except TaskNotFoundError:
                continue
        return GroupCancelled(group=group, cancelled=cancelled, count=len(cancelled))
