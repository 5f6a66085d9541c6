"""Reading task records: check_task_status (``get``, ``get_quick``), list_active_tasks (``list``), a group's tasks."""

from __future__ import annotations

import itertools
import logging
import os

from pydantic import ValidationError

from . import worktrees
from .errors import CCTasksError, CorruptRecordError, GitError, InvalidOptionsError, TaskNotFoundError
from .ids import HOST, TASK_ID_RE, validate_task_id
from .manager_base import ManagerBase
from .models import Listing, TaskOptions, TaskRecord, TaskStatus, WorktreeInfo

log = logging.getLogger("cc_tasks")


def elsewhere(wt: WorktreeInfo) -> bool:
    """Whether a task's worktree is on another machine (a worker elsewhere ran it, on a remote backend)."""
    return bool(wt.host) and wt.host != HOST


def _lacks_changes(r: TaskRecord) -> bool:
    """A finished worktree task whose record has no ``changes`` though its worktree is there (a stat)."""
    wt = r.worktree
    return (
        r.status.terminal
        and r.changes is None
        and wt is not None
        and wt.base_commit is not None
        and not elsewhere(wt)
        and os.path.isdir(wt.path)
    )


class RecordsMixin(ManagerBase):
    """A task's record (its queue place, its worktree's changes filled in), pages of records, a group's ids."""

    def get(self, task_id: str) -> TaskRecord:
        """The task's record (a lost worker's task is requeued or failed first); a queued task learns its place."""
        record = self.store.read(validate_task_id(task_id))
        if record.status == TaskStatus.QUEUED:
            record = record.model_copy(
                update={"queue_position": self.store.queue_position(task_id), "queue_note": self._queue_note(record)}
            )
        if _lacks_changes(record):
            record = self._fill_changes(record)
        return record

    def _fill_changes(self, r: TaskRecord) -> TaskRecord:
        """A finished worktree task's ``changes`` when its supervisor could not write them (worker lost, git
        failed): computed now, and kept in the record."""
        try:
            changes = worktrees.changes(r.worktree)
        except GitError as e:
            log.warning("task %s: reading its worktree's changes: %s", r.task_id, e)
            return r
        if changes is None:
            return r
        try:
            return self.store.annotate(r.task_id, changes=changes)
        except CCTasksError:
            return r.model_copy(update={"changes": changes})

    def _queue_note(self, r: TaskRecord) -> str | None:
        """A queued task with labels that no live worker has says so (the store's own worker has none); on
        NATS, also what the workers that passed it over said (no such cwd, missing labels)."""
        if r.runner != "claude":
            return None
        if r.blocked_by == "budget" and r.blocked_reason:  # (which budget, and how to raise it)
            return r.blocked_reason
        workers = self.store.workers()
        if self.remote and not workers:
            return "no worker is running on this backend: start one with `cc-tasks worker --backend URL`"
        said = self.store.queue_note(r.task_id)  # (what the workers that passed it over said)
        if not r.labels or any(set(r.labels) <= set(w.labels) for w in workers):
            return f"passed over: {said}" if said else None
        flags = " ".join(f"--label {label}" for label in r.labels)
        seen = ", ".join(f"{w.worker_id} on {w.host} {w.labels}" for w in workers[:5]) or "none"
        return (
            f"no running worker has all of its labels {r.labels} (workers: {seen}): start one with "
            f"`cc-tasks worker {flags}`" + (f"; passed over: {said}" if said else "")
        )

    def get_quick(self, task_id: str) -> TaskRecord | None:
        """``get`` when it needs no slow work (a finished task, or a running one whose worker lives); None when
        the caller should use ``get`` off the event loop (a lost worker's tree to stop, a queue position)."""
        r = self.store.load(validate_task_id(task_id))
        if r.status.terminal:
            return None if _lacks_changes(r) else r
        if r.status == TaskStatus.RUNNING and r.lease is not None and self.store.lease_alive(r.lease):
            return r
        return None

    def _peek(self, task_id: str, copy: bool = True) -> TaskRecord:
        """``get`` for pollers: from the cache of records (with ``copy=False`` not to be changed)."""
        r = self.store.read(validate_task_id(task_id), cached=True)
        return r.model_copy() if copy else r

    def list(
        self,
        include_finished: bool = False,
        limit: int = 50,
        status: TaskStatus | None = None,
        cursor: str | None = None,
        group: str | None = None,
    ) -> Listing:
        """Tasks newest first (ids sort by creation time); with ``cursor`` (a task id: the last one of the
        previous page), only those older than it."""
        limit = max(1, min(int(limit), 500))
        if cursor is not None and not TASK_ID_RE.fullmatch(cursor):
            raise InvalidOptionsError(
                f"cursor {cursor[:80]!r} is not one list_active_tasks returned: pass its next_cursor, or no cursor"
            )
        records: list[TaskRecord] = []
        unreadable: list[str] = []
        more = False
        ids = self.store.list_ids(include_finished=include_finished or bool(status and status.terminal))
        if cursor is not None:
            ids = itertools.dropwhile(lambda t: t >= cursor, ids)
        for task_id in ids:
            try:
                r = self.store.read(task_id)
            except TaskNotFoundError:
                continue
            except CorruptRecordError:
                unreadable.append(task_id)
                continue
            if not include_finished and r.status.terminal:
                continue
            if status is not None and r.status != status:
                continue
            if group is not None and r.group != group:
                continue
            if len(records) == limit:
                more = True
                break
            records.append(r)
        return Listing(tasks=records, more=more, unreadable=unreadable[:50])

    def group_ids(self, group: str, include_finished: bool = True) -> list[str]:
        """The group's tasks, newest first."""
        try:
            TaskOptions(prompt="x", group=group)
        except ValidationError as e:
            raise InvalidOptionsError(e.errors()[0]["msg"]) from None
        out = []
        for t in self.store.list_ids(include_finished=include_finished):
            try:
                if self.store.read(t, cached=True).group == group:
                    out.append(t)
            except CCTasksError:
                continue
        return out
