"""The task board, for every backend (``engine.TaskEngine`` is an ``AgentBoard``): tasks outside agents claim
(``runner: "agent"``) and groups' notes. An agent's lease carries an expiry and its token's SHA-256; every agent
write is fenced by both; an expired lease goes through ``worker_lost`` like a lost worker's."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from .errors import CorruptRecordError, InvalidOptionsError, LeaseLostError, TaskNotFoundError
from .ids import validate_task_id
from .models import Attempt, Lease, TaskRecord, check_group, utcnow
from .queue import queue_order, ready
from .repo import Liveness
from .states import TaskStatus


def agent_renewed(r: TaskRecord, note: str | None) -> dict:
    """An agent's renew_task: its lease runs on by its length; a note becomes the task's last text."""
    lease = r.lease.model_copy(update={"expires_at": utcnow() + timedelta(seconds=r.lease.lease_seconds or 0)})
    fields: dict = {"lease": lease}
    if note:
        fields["progress"] = r.progress.model_copy(update={"last_text": note[-500:], "updated_at": utcnow()})
    return fields


def agent_completed(r: TaskRecord, result: str, preview_chars: int) -> dict:
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
    """The lease an agent's call (``digest``: its token's SHA-256) holds ``r`` under, or the error refusing it."""
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


def fold_notes(notes: list[dict], since: int) -> Iterator[dict]:
    """A group's notes from position ``since``, less those a later note of the same key replaced."""
    notes = [n for n in notes if isinstance(n, dict) and isinstance(n.get("seq"), int)]
    last = {n["key"]: n["seq"] for n in notes if n.get("key")}
    for n in notes:
        if n["seq"] >= since and (not n.get("key") or last[n["key"]] == n["seq"]):
            yield n


class AgentBoard:
    """The agent-task and notes half of the engine (its methods use the engine's records and leases)."""

    def claim_agent(
        self, claimer: str, labels: list[str], group: str | None, lease_seconds: float
    ) -> tuple[TaskRecord, str] | None:
        """Lease the first ready agent task ``claimer`` has the labels for (of ``group`` if given): the record and the
        lease token (only its SHA-256 is stored), or None. Agent tasks do not count against the cap."""
        mine = set(labels)
        with self.repo.claim_lock() as still_ours:
            _, seen = self.repo.unfinished()
            records = {t: self.check_lease(r) if r.runner == "agent" else r for t, (_, r) in seen.items()}
            records.update(self.resolve_waiting(records))
            candidates = sorted(
                (r for r in records.values() if ready(r) and r.runner == "agent" and set(r.labels) <= mine
                 and (group is None or r.group == group)),
                key=queue_order,
            )  # fmt: skip
            if candidates and not still_ours():
                return None
            for r in candidates:
                token = secrets.token_urlsafe(24)
                digest = hashlib.sha256(token.encode()).hexdigest()
                taken: list[TaskRecord] = []

                def fn(cur: TaskRecord, digest=digest, taken=taken) -> TaskRecord | None:
                    taken.clear()
                    if not ready(cur) or cur.runner != "agent":
                        return None
                    now = utcnow()
                    lease = Lease(task_id=cur.task_id, worker=claimer, epoch=cur.epoch + 1, acquired_at=now,
                                  expires_at=now + timedelta(seconds=lease_seconds), lease_seconds=lease_seconds,
                                  token_sha256=digest)  # fmt: skip
                    taken.append(cur.model_copy(update={"status": TaskStatus.RUNNING, "started_at": now,
                                                        "epoch": lease.epoch, "lease": lease}))  # fmt: skip
                    return taken[0]

                try:
                    self.update(r.task_id, fn)
                except (TaskNotFoundError, CorruptRecordError):
                    continue
                if taken:
                    return taken[0], token
        return None

    def sweep_agent_leases(self) -> int:
        """Hand running agent tasks whose lease expired to ``worker_lost``; servers do it once a second."""
        n = 0
        for _, r in self.repo.unfinished()[1].values():
            if r.runner == "agent" and r.status == TaskStatus.RUNNING and r.lease is not None:
                if not self.lease_alive(r.lease):
                    self.check_lease(r)
                    n += 1
        return n

    def has_ready_agent_task(self, labels: list[str], group: str | None) -> bool:
        """Whether a claim_agent could find something (a waiting claimer's cheap look, without the lock)."""
        mine = set(labels)
        records = {t: r for t, (_, r) in self.repo.unfinished()[1].items()}
        for r in records.values():
            if r.runner != "agent":
                continue
            if r.status == TaskStatus.RUNNING and r.lease is not None and not self.lease_alive(r.lease):
                return True  # an expired lease: the claim requeues it
            if r.status == TaskStatus.WAITING:  # its dependencies all ended: the claim resolves it
                if all((d := records.get(dep) or self._peek(dep)) is None or d.status.terminal for dep in r.depends_on):
                    return True
                continue
            if ready(r) and set(r.labels) <= mine and (group is None or r.group == group):
                return True
        return False

    def _agent_op(self, task_id: str, token: str, changes: Callable[[TaskRecord], dict]) -> TaskRecord:
        """Change an agent task under its lease (``check_agent_lease``; an expired one is refused too)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        expired: list[TaskRecord] = []

        def fn(r: TaskRecord) -> TaskRecord:
            expired.clear()
            lease = check_agent_lease(r, task_id, digest)
            if self._liveness(lease) is Liveness.GONE:
                expired.append(r)
                raise LeaseLostError(
                    f"task {task_id}: the lease expired at {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC (renew_task "
                    "keeps it); the task went back to the queue or failed: claim_task again"
                )
            return r.model_copy(update=changes(r))

        try:
            return self.update(validate_task_id(task_id), fn)
        finally:
            if expired:  # requeue or fail it now
                self.check_lease(expired[0])

    def renew_agent(self, task_id: str, token: str, note: str | None = None) -> TaskRecord:
        r = self._agent_op(task_id, token, lambda r: agent_renewed(r, note))
        self.append_event(task_id, "renewed", by=r.lease.worker, until=r.lease.expires_at, note=note)
        return r

    def complete_agent(self, task_id: str, token: str, result: str, preview_chars: int) -> TaskRecord:
        """Completed, its whole result stored under the claim's epoch first (a lease taken over meanwhile: refused)."""
        r0 = self.load(task_id)  # (the caller's lease first: a refused call never touches a stored result)
        epoch = check_agent_lease(r0, task_id, hashlib.sha256(token.encode()).hexdigest()).epoch
        self.repo.put_output(task_id, epoch, "result", result.encode("utf-8", "surrogatepass"))

        def changes(r: TaskRecord) -> dict:
            if r.epoch != epoch:
                raise LeaseLostError(f"task {task_id}: it was claimed again meanwhile; claim_task again")
            return agent_completed(r, result, preview_chars)

        try:
            r = self._agent_op(task_id, token, changes)
        except LeaseLostError:
            self.repo.put_output(task_id, epoch, "result", None)
            raise
        self.resolve_waiting()
        return r

    def fail_agent(self, task_id: str, token: str, error: str, retry: bool) -> TaskRecord:
        r = self._agent_op(task_id, token, lambda r: agent_failed(r, error, retry))
        if r.status == TaskStatus.QUEUED:
            self.append_event(task_id, "requeued", reason=f"failed: {error[:500]}", attempt=len(r.attempts) + 1)
            self.repo.signal("nudge")
        else:
            self.resolve_waiting()
        return r

    def release_agent(self, task_id: str, token: str) -> TaskRecord:
        """Back to the queue, not counted as an attempt."""
        by: list[str] = []

        def changes(r: TaskRecord) -> dict:
            by[:] = [r.lease.worker]
            return {"status": TaskStatus.QUEUED, "lease": None, "started_at": None}

        r = self._agent_op(task_id, token, changes)
        self.append_event(task_id, "released", by=by[0] if by else None)
        self.repo.signal("nudge")
        return r

    @staticmethod
    def _group(group: str) -> str:
        try:
            return check_group(group)
        except ValueError as e:
            raise InvalidOptionsError(str(e)) from None

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> int:
        """Append a note; returns its position. For readers, a note with a ``key`` replaces that key's earlier ones."""
        log_name = f"notes.{self._group(group)}"
        return self.repo.append_numbered(log_name, lambda n: {"seq": n, "ts": time.time(), "key": key, "by": by,
                                                               "text": text})  # fmt: skip

    def iter_notes(self, group: str, since: int = 0) -> Iterator[dict]:
        return fold_notes([n for _, n in self.repo.read_log(f"notes.{self._group(group)}")], since)
