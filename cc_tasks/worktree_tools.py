"""A worktree task's worktree: get_task_diff (``diff``), merge_task (``merge``), and its removal by cleanup_task."""

from __future__ import annotations

import logging

from . import worktrees
from .errors import CCTasksError, GitError, InvalidOptionsError, MergeRefusedError
from .ids import HOST
from .models import OUTPUT_PAGE_BYTES, DiffPage, MergeInfo, MergeResult, TaskRecord, TaskStatus, WorktreeInfo, clip
from .records import RecordsMixin, elsewhere
from .replies import fit_page, text_room, utf8_page

log = logging.getLogger("cc_tasks")


class WorktreeMixin(RecordsMixin):
    """A task's worktree: paged diff, merge into its original checkout, removal once no other task uses it."""

    def _worktree_of(self, record: TaskRecord, doing: str) -> WorktreeInfo:
        if record.worktree is None:
            raise InvalidOptionsError(
                f"task {record.task_id} did not run in a worktree of its own (option worktree): nothing to {doing}"
            )
        if record.worktree.base_commit is None:
            raise InvalidOptionsError(
                f"task {record.task_id} is {record.status.value} and has not started in its worktree: "
                f"nothing to {doing}"
            )
        if elsewhere(record.worktree):
            raise InvalidOptionsError(
                f"task {record.task_id}'s worktree is on {record.worktree.host} (the worker that ran it), not on "
                f"this machine ({HOST}): {doing} it with cc-tasks on {record.worktree.host}"
            )
        return record.worktree

    def diff(self, task_id: str, offset: int = 0, limit: int = OUTPUT_PAGE_BYTES) -> DiffPage:
        """A page of the task's changes against its base commit (committed, uncommitted, new files) as a unified
        diff, the stat first: at most ``limit`` bytes from byte ``offset``, fewer when the page would not fit
        in a reply; pages never split a UTF-8 character."""
        record = self.get(task_id)
        wt = self._worktree_of(record, "show")
        if offset < 0:
            raise InvalidOptionsError(
                "offset must be 0 or more (a byte offset; use next_offset from the previous page)"
            )
        limit = max(1, min(int(limit), OUTPUT_PAGE_BYTES))
        tip, data, total = worktrees.diff(wt, offset, limit)
        start = min(offset, total)
        changes = record.changes.model_copy(update={"files": [], "files_truncated": False}) if record.changes else None
        page = DiffPage(
            task_id=task_id,
            status=record.status,
            branch=wt.branch,
            base_commit=wt.base_commit,
            head_commit=tip,
            offset=start,
            next_offset=start,
            total_bytes=total,
            eof=start >= total,
            text="",
            changes=changes,
        )
        data = utf8_page(data, fit_page(data, text_room(page)), start + len(data) >= total)
        end = start + len(data)
        return page.model_copy(
            update={"next_offset": end, "eof": end >= total, "text": data.decode("utf-8", "replace")}
        )

    def merge(self, task_id: str, strategy: str = "merge", message: str | None = None) -> MergeResult:
        """Bring a completed worktree task's changes into the branch checked out in its original cwd (see
        worktrees.merge: refused, and the repository left as it was, on uncommitted changes there or a
        conflict). Its record then says it was merged."""
        if strategy not in ("merge", "squash", "rebase"):
            raise InvalidOptionsError(f"strategy {strategy[:40]!r} is none of 'merge', 'squash', 'rebase'")
        if message is not None and ("\x00" in message or not message.strip()):
            raise InvalidOptionsError("message is empty or has a NUL character: give a commit message, or none")
        record = self.get(task_id)
        wt = self._worktree_of(record, "merge")
        if record.status != TaskStatus.COMPLETED:
            raise MergeRefusedError(
                f"task {task_id} is {record.status.value}: only a task that ended completed is merged (get_task_diff "
                "shows what it changed; continue_task can finish its work); nothing was done"
            )
        if wt.merged is not None:
            raise MergeRefusedError(
                f"task {task_id} was already merged into {wt.merged.target_branch} ({wt.merged.strategy}, "
                f"{wt.merged.commit[:12]}); nothing was done"
            )
        users = self._worktree_users(record)
        if users:
            raise MergeRefusedError(
                f"task {users[0].task_id} ({users[0].status.value}) works in the worktree of task {task_id}: wait for "
                "it to end, then merge; nothing was done"
            )
        title = clip(" ".join((record.name or record.prompt_preview).split()), 72) or task_id
        default = (
            f"Merge task {task_id} ({wt.branch}): {title}"
            if strategy == "merge"
            else f"{title}\n\ncc-tasks task {task_id}, from branch {wt.branch} ({strategy})"
        )
        result = worktrees.merge(
            wt,
            task_id=task_id,
            strategy=strategy,  # type: ignore[arg-type]
            message=message or default,
            leftovers_message=f"Changes task {task_id} left uncommitted in its worktree\n\n(committed by cc-tasks merge_task)",
        )
        merged = wt.model_copy(
            update={
                "merged": MergeInfo(strategy=strategy, target_branch=result.target_branch, commit=result.head),
                **({"base_commit": result.before} if strategy == "rebase" else {}),
            }
        )
        try:
            changes = worktrees.changes(merged) or record.changes
        except GitError:
            changes = record.changes
        self.store.annotate(task_id, worktree=merged, changes=changes)
        log.info("merged task %s into %s of %s (%s)", task_id, result.target_branch, result.repo, strategy)
        return result

    def _worktree_users(self, r: TaskRecord, include_finished: bool = False) -> list[TaskRecord]:
        """Tasks other than ``r`` that work in ``r``'s worktree (the task it continues, its continuations):
        the unfinished ones, or with ``include_finished`` all of them."""
        wt = r.worktree
        users = []
        for t in self.store.list_ids(include_finished=include_finished):
            if t == r.task_id:
                continue
            try:
                o = self.store.read(t, cached=True)
            except CCTasksError:
                continue
            if (
                (include_finished or not o.status.terminal)
                and o.worktree
                and (o.worktree.name, o.worktree.repo)
                == (
                    wt.name,
                    wt.repo,
                )
            ):
                users.append(o)
        return users

    def _remove_worktree(self, r: TaskRecord, keep_branch: bool) -> dict:
        wt = r.worktree
        if elsewhere(wt):  # (never a same-named worktree of this machine's)
            return {
                "worktree_removed": False,
                "branch_deleted": False,
                "worktree_note": f"worktree {wt.path} and branch {wt.branch} kept: they are on {wt.host}, not here",
            }
        users = self._worktree_users(r, include_finished=True)  # (a chain of continuations shares one worktree:
        if users:  # it goes with the last of them, so that cleaning one never loses another's work)
            return {
                "worktree_removed": False,
                "branch_deleted": False,
                "worktree_note": f"worktree {wt.path} and branch {wt.branch} kept: task {users[0].task_id} "
                f"({users[0].status.value}) shares it; they go with the last task of the worktree",
            }
        try:
            merged = worktrees.is_merged(wt)
            why = "it was merged" if merged else "keep_branch" if keep_branch else None
            removed, deleted, note = worktrees.remove(wt, keep_branch_because=why)
        except GitError as e:
            return {"worktree_removed": False, "branch_deleted": False, "worktree_note": f"could not remove it: {e}"}
        log.info("task %s: worktree %s removed: %s, branch deleted: %s", r.task_id, wt.path, removed, deleted)
        return {"worktree_removed": removed, "branch_deleted": deleted, "worktree_note": note}
