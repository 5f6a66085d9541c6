"""The backend interface: where tasks live and how workers pull them. ``store.TaskStore`` (local files) is
the first implementation; every backend passes tests/test_backend_contract.py.

Client side (servers, the CLI): submit, read, list, events, output pages, request a cancel, delete, and
``nudge`` (the one verb that tells workers to look at the queue now). Worker side: ``claim`` leases the
highest-priority, oldest ready tasks within the global cap; ``renew`` is a lease's heartbeat; ``progress``,
``event`` and ``finish`` are fenced by the lease: once it expired or was taken over they raise
``LeaseLostError`` and change nothing. Dependencies (waiting -> queued / skipped) are resolved by the
backend when a task ends; a lease whose worker is gone is ended by the backend (``worker_lost``).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import InvalidOptionsError, LeaseLostError
from .models import Attempt, Lease, Progress, TaskRecord, TaskRequest, WorkerInfo, utcnow
from .states import TaskStatus

#: Characters of each dependency's result put in front of a prompt (or in a claim), and of all of them together.
DEP_RESULT_CHARS = 8_000
DEP_RESULTS_TOTAL = 32_000


@runtime_checkable
class Backend(Protocol):
    kind: str
    max_concurrent: int
    lease_seconds: float

    @property
    def address(self) -> str: ...

    # -- client side -----------------------------------------------------------
    def submit(self, record: TaskRecord, request: TaskRequest) -> None: ...

    def read(self, task_id: str, cached: bool = False) -> TaskRecord: ...

    def load(self, task_id: str) -> TaskRecord: ...

    def lease_alive(self, lease: Lease, max_age: float = 0.0) -> bool: ...

    def request(self, task_id: str) -> TaskRequest: ...

    def list_ids(self, include_finished: bool) -> Iterator[str]: ...

    def has_active(self) -> bool: ...

    def usable(self) -> bool: ...

    def activity_stamp(self) -> object: ...

    def queue_position(self, task_id: str) -> int | None: ...

    def iter_events(self, task_id: str, since: int = 0) -> Iterator[tuple[int, dict]]: ...

    def read_output(self, task_id: str, source: str, offset: int, limit: int) -> tuple[bytes, int]: ...

    def request_cancel(self, task_id: str) -> TaskRecord: ...

    def annotate(self, task_id: str, **fields) -> TaskRecord: ...

    def force_cancel(self, task_id: str, error: str) -> TaskRecord: ...

    def delete(self, task_id: str) -> None: ...

    def purge(self, task_id: str) -> None: ...

    def nudge(self) -> None: ...

    def worker_known(self) -> bool: ...

    def stop_worker(self) -> bool: ...

    def reap(self, wait: float = 0.0) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    # -- worker side -------------------------------------------------------------
    def register(self, info: WorkerInfo) -> None: ...

    def heartbeat(self, worker_id: str) -> bool: ...

    def unregister(self, worker_id: str) -> None: ...

    def claim(self, worker: WorkerInfo, free_slots: int, fresh: bool = True) -> list[TaskRecord]: ...

    def renew(self, lease: Lease) -> None: ...

    def holds(self, lease: Lease) -> bool: ...

    def progress(self, lease: Lease, **fields) -> TaskRecord: ...

    def event(self, lease: Lease, kind: str, **data) -> None: ...

    def finish(self, lease: Lease, status: TaskStatus, result_text: str | None = None, **fields) -> TaskRecord: ...

    def cancel_requested(self, task_id: str) -> bool: ...

    def workspace(self, task_id: str) -> Path: ...

    def worker_lost(self, r: TaskRecord, reason: str) -> TaskRecord: ...

    # -- agents: a task board --------------------------------------------------
    def claim_agent(
        self, claimer: str, labels: list[str], group: str | None, lease_seconds: float
    ) -> tuple[TaskRecord, str] | None: ...

    def renew_agent(self, task_id: str, token: str, note: str | None = None) -> TaskRecord: ...

    def complete_agent(self, task_id: str, token: str, result: str, preview_chars: int) -> TaskRecord: ...

    def fail_agent(self, task_id: str, token: str, error: str, retry: bool) -> TaskRecord: ...

    def release_agent(self, task_id: str, token: str) -> TaskRecord: ...

    def sweep_agent_leases(self) -> int: ...

    def has_ready_agent_task(self, labels: list[str], group: str | None) -> bool: ...

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> int: ...

    def iter_notes(self, group: str, since: int = 0) -> Iterator[dict]: ...


def lost_update(cur: TaskRecord, reason: str, acted: bool) -> TaskRecord:
    """What "the worker is gone" (or an agent's lease expired) does to a running record, for every backend:
    the lease is dropped; the task goes back to the queue as a new attempt if its run had no effect
    (``acted`` is False: used no tool) and attempts remain, else it ends failed, or cancelled if a cancel was
    asked for. (Pure: the backends decide ``acted`` and write the result under their compare-and-set.)"""
    now = utcnow()
    n = len(cur.attempts) + 1
    agent = cur.runner == "agent"  # (an agent's lease expired: what it did is its own business)
    acted = acted and not agent
    requeue = not cur.cancel_requested and not acted and n < cur.max_attempts
    what = "lease expired" if agent else "worker lost"
    attempt = Attempt(attempt=n, started_at=cur.started_at or now, finished_at=now, status=TaskStatus.FAILED,
                      reason=f"{what}: {reason}", retried=requeue)  # fmt: skip
    fields: dict = {"attempts": [*cur.attempts, attempt], "lease": None, "claude": None}
    if cur.cancel_requested:
        fields.update(status=TaskStatus.CANCELLED, error=f"cancelled; {what}: {reason}")
    elif requeue:
        fields.update(status=TaskStatus.QUEUED, started_at=None, progress=Progress())
    elif agent:
        fields.update(status=TaskStatus.FAILED, error=f"lease expired: {reason} (no attempts left)")
    else:
        why = "its run had used tools or ended, so it is not run again" if acted else "no attempts left"
        fields.update(status=TaskStatus.FAILED, error=f"worker lost: {reason}; its process tree was stopped ({why})")
    return cur.model_copy(update=fields)


def cancel_update(r: TaskRecord) -> TaskRecord | None:
    """What a cancel does to a record: a task that has not started, or an agent's task, is cancelled at once
    (an agent's lease is dropped with it); a running claude task is only marked (its worker stops it). None:
    nothing to do (finished, or already marked)."""
    if r.status.terminal or (r.cancel_requested and r.runner == "claude"):
        return None
    if r.status in (TaskStatus.WAITING, TaskStatus.QUEUED):
        error = "cancelled before it started"
    elif r.runner == "agent":
        held = f" (it was held by {r.lease.worker!r})" if r.lease else ""
        error = f"cancelled{held}"
    else:
        return r.model_copy(update={"cancel_requested": True})
    return r.model_copy(update={"status": TaskStatus.CANCELLED, "cancel_requested": True, "error": error})


def agent_renewed(r: TaskRecord, note: str | None) -> dict:
    """An agent's renew_task: its lease runs on by its length; a note becomes the task's last text."""
    lease = r.lease.model_copy(update={"expires_at": utcnow() + timedelta(seconds=r.lease.lease_seconds or 0)})
    fields: dict = {"lease": lease}
    if note:
        fields["progress"] = r.progress.model_copy(update={"last_text": note[-500:], "updated_at": utcnow()})
    return fields


def agent_completed(r: TaskRecord, result: str, preview_chars: int) -> dict:
    """An agent's complete_task: completed, its result previewed in the record (the whole stored apart)."""
    attempt = Attempt(attempt=len(r.attempts) + 1, started_at=r.started_at or utcnow(), finished_at=utcnow(),
                      status=TaskStatus.COMPLETED)  # fmt: skip
    return {"status": TaskStatus.COMPLETED, "result": result[:preview_chars],
            "result_truncated": len(result) > preview_chars, "result_chars": len(result), "is_error": False,
            "attempts": [*r.attempts, attempt]}  # fmt: skip


def agent_failed(r: TaskRecord, error: str, retry: bool) -> dict:
    """An agent's fail_task: back to the queue as a new attempt with ``retry`` while attempts remain, else failed."""
    n = len(r.attempts) + 1
    again = retry and n < r.max_attempts
    attempt = Attempt(attempt=n, started_at=r.started_at or utcnow(), finished_at=utcnow(),
                      status=TaskStatus.FAILED, reason=error, retried=again)  # fmt: skip
    if again:
        return {"status": TaskStatus.QUEUED, "lease": None, "started_at": None, "attempts": [*r.attempts, attempt]}
    left = " (no attempts left)" if retry else ""
    return {"status": TaskStatus.FAILED, "error": f"{error}{left}", "is_error": True,
            "attempts": [*r.attempts, attempt]}  # fmt: skip


def check_agent_lease(r: TaskRecord, task_id: str, digest: str) -> Lease:
    """The lease an agent's call holds ``r`` under (``digest``: the SHA-256 of its token), or the error that
    refuses the call: not an agent task, held by no lease, or by another one. (Expiry is the caller's look.)"""
    if r.runner != "agent":
        raise InvalidOptionsError(
            f"task {task_id} is not an agent task (a worker runs claude for it); only tasks posted with "
            "post_task (or runner 'agent') are claimed, renewed, completed or failed by agents"
        )
    lease = r.lease
    if r.status != TaskStatus.RUNNING or lease is None or lease.token_sha256 is None:
        raise LeaseLostError(
            f"task {task_id} is {r.status.value}, held by no lease: that lease is stale; claim_task for work"
        )
    if not hmac.compare_digest(lease.token_sha256, digest):
        raise LeaseLostError(
            f"task {task_id}: that lease is not the one that holds it (it is held by {lease.worker!r}, "
            f"claim {lease.epoch}); use the lease claim_task gave you, or claim_task again"
        )
    return lease


def dependency_preamble(backend: Backend, depends_on: list[str], total: int = DEP_RESULTS_TOTAL) -> str:
    """The dependencies' results, bounded, as text to put in front of a prompt."""
    parts = []
    per = max(500, min(DEP_RESULT_CHARS, total // max(1, len(depends_on))))
    for dep in depends_on:
        r = backend.read(dep)
        data, total = backend.read_output(dep, "result", 0, per * 4)
        text = data.decode("utf-8", "replace") if total else (r.result or "")
        cut = text[:per]
        more = len(text) > per or total > len(data)
        tail = f"\n[... more: get_task_output(task_id={dep!r})]" if more else ""
        parts.append(f'<dependency task_id="{dep}" name="{r.name or ""}">\n{cut}{tail}\n</dependency>')
    return ("Results of the tasks this task depends on:\n\n" + "\n\n".join(parts) + "\n\n---\n\n") if parts else ""
