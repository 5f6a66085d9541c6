"""Waiting for tasks to end: wait_for_tasks (``wait``) and execute_cc_task (``execute``: start one, wait for it)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from .errors import CCTasksError, InvalidOptionsError
from .ids import validate_task_id
from .models import ApprovalBrief, BlockedBrief, TaskOptions, TaskRecord, TaskStatus, Waited
from .stopping import StopMixin
from .submitting import SubmitMixin

ProgressFn = Callable[[float, str], Awaitable[None]]
#: Most tasks one wait follows (wait_for_tasks' task_ids, or a group's tasks).
WAIT_MAX = 200
PROGRESS_EVERY = 1.0
#: Waits (wait_for_tasks, execute_cc_task) look at the store's active/ folder this often (a stat; less
#: often the more records they would re-read), and re-read their unfinished records when it changed, or
#: every WAIT_FULL_EVERY seconds anyway (a changed record, a dead supervisor).
WAIT_POLL = 0.002
WAIT_FULL_EVERY = 0.25


class WaitMixin(SubmitMixin, StopMixin):
    """Waits that follow the store's activity (a stat of active/) and re-read only unfinished records."""

    async def wait(
        self,
        task_ids: list[str] | None,
        mode: Literal["all", "any"] = "all",
        timeout: float = 300.0,
        progress: ProgressFn | None = None,
        group: str | None = None,
    ) -> Waited:
        """Until all (or any) of the tasks end, one of them asks for approval (``needs_approval``: it waits for an
        answer), or ``timeout``. With ``group``: the group's tasks (as they are when the wait starts), with or
        without ``task_ids``."""
        if group is not None:
            members = await anyio.to_thread.run_sync(self.group_ids, group)
            if len(members) > WAIT_MAX:
                raise InvalidOptionsError(
                    f"group {group!r} has {len(members)} tasks; a wait takes at most {WAIT_MAX}: wait on task ids"
                )
            if not members and not task_ids:
                raise InvalidOptionsError(f"group {group!r} has no tasks")
            task_ids = [*(task_ids or []), *members]
        if not task_ids:
            raise InvalidOptionsError("task_ids is empty: give at least one task id (or a group)")
        ids = list(dict.fromkeys(validate_task_id(t) for t in task_ids))
        for t in ids:
            await self.on_loop(self.store.read, t)  # unknown ids fail before any waiting
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        next_progress = t0
        latest: dict[str, TaskRecord] = {}

        swept = [time.monotonic()]

        def refresh() -> None:  # in a worker thread: finding a dead supervisor stops its tree, which takes time
            if time.monotonic() - swept[0] >= 1.0:  # (an agent task's expired lease frees what depends on it)
                swept[0] = time.monotonic()
                self.store.sweep_agent_leases()
            for t in ids:  # a finished record does not change: read only the others again
                if t not in latest or not latest[t].status.terminal:
                    latest[t] = self._peek(t, copy=False)  # (only read, and replied with)

        while True:
            stamp = self._active_stamp()  # (before the reads: an end after them is seen by the next wait)
            await anyio.to_thread.run_sync(refresh)
            records = [latest[t] for t in ids]
            finished = [r.task_id for r in records if r.status.terminal]
            done = len(finished) == len(ids) if mode == "all" else bool(finished)
            now = time.monotonic()
            asking = [ApprovalBrief.of(r, a) for r in records for a in r.awaiting]  # (a sub-agent waits for us)
            pending = [r for r in records if not r.status.terminal]
            blocked = [BlockedBrief(task_id=r.task_id, reason=r.blocked_reason or "a budget is exhausted")
                       for r in pending if r.status == TaskStatus.QUEUED and r.blocked_by]  # fmt: skip
            stuck = bool(pending) and len(blocked) == len(pending)  # (nothing can start until a budget is raised)
            if done or now >= deadline or asking or stuck:
                return Waited(
                    done=done,
                    timed_out=not done and not asking and not stuck,
                    finished=finished,
                    pending=[t for t in ids if t not in finished],
                    tasks=records,
                    needs_approval=asking,
                    blocked=blocked,
                )
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                running = sum(r.status == TaskStatus.RUNNING for r in records)
                await progress(now - t0, f"{len(finished)}/{len(ids)} finished, {running} running, {now - t0:.0f}s")
            await self._until_a_task_ends(
                stamp,
                len(ids) - len(finished),
                deadline if progress is None else min(deadline, next_progress),
                now - t0,
            )

    async def _until_a_task_ends(self, stamp: tuple[int, int], unfinished: int, by: float, waited: float) -> None:
        """Sleep until some task of the store may have ended since ``stamp`` was taken (its marker in active/
        goes, which changes the folder), at most WAIT_FULL_EVERY. Looks every 2 ms at first, less often the
        longer the wait has lasted (``waited`` seconds; a hundredth of it, up to 50 ms) and the more records
        a change makes it re-read (1 ms each)."""
        gap = max(WAIT_POLL, 0.001 * unfinished, min(0.05, waited / 100))
        until = min(by, time.monotonic() + WAIT_FULL_EVERY)
        while True:
            await asyncio.sleep(max(0.0, min(gap, until - time.monotonic())))
            if time.monotonic() >= until or self._active_stamp() != stamp:
                return

    async def execute(self, opts: TaskOptions, progress: ProgressFn | None = None) -> TaskRecord:
        """Run one task to its end. If the caller is cancelled, the task's process tree is stopped."""
        stamp = self._active_stamp()
        record = await anyio.to_thread.run_sync(functools.partial(self.start, opts, nudge=False))
        await self.anudge()
        task_id = record.task_id
        t0 = time.monotonic()
        next_progress = t0
        try:
            while not record.status.terminal:
                now = time.monotonic()
                if progress is not None and now >= next_progress:
                    next_progress = now + PROGRESS_EVERY
                    p = record.progress
                    tool = f", last tool {p.last_tool}" if p.last_tool else ""
                    await progress(now - t0, f"{record.status.value}: {p.turns} turns{tool}, {now - t0:.0f}s")
                await self._until_a_task_ends(
                    stamp, 1, next_progress if progress is not None else now + WAIT_FULL_EVERY, now - t0
                )
                stamp = self._active_stamp()  # (before the read: an end after it is seen next time)
                record = await anyio.to_thread.run_sync(self._peek, task_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self.cancel, task_id)
                except CCTasksError:  # deleted meanwhile
                    pass
            raise
        return record.bounded()
