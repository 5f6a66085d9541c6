"""Leases and lost workers, for every backend (``engine.TaskEngine`` is a ``LeaseRules``): when a lease is alive,
what "the worker is gone" does to a running task (requeue or fail), and what a worker does with leases it does not
supervise (where claims can be lost in flight)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import psutil

from . import procs
from .errors import CorruptRecordError, TaskNotFoundError
from .ids import HOST
from .models import Attempt, Lease, Progress, TaskRecord, utcnow
from .repo import Liveness
from .states import TaskStatus
from .stream import apply_event, split_lines

log = logging.getLogger("cc_tasks")
#: A worker found alive this recently is not looked at again (pollers reading many of its tasks).
ALIVE_CACHE = 0.2
#: How much of a lost run's transcript is read to tell whether it did something.
ACTED_SCAN_MAX = 64 << 20


def lost_update(cur: TaskRecord, reason: str, acted: bool) -> TaskRecord:
    """A lost worker (or an agent's expired lease): lease dropped; requeued as a new attempt if the run had no effect
    (``acted``: a tool used, a result) and attempts remain, else failed (cancelled if asked for)."""
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


def holding(lease: Lease, r: TaskRecord | None) -> bool:
    """Whether ``r`` still runs under ``lease``."""
    return r is not None and r.status == TaskStatus.RUNNING and lease.same(r.lease)


def lost_message(lease: Lease, r: TaskRecord | None) -> str:
    if r is None:
        return f"task {lease.task_id}: the lease of worker {lease.worker} is no longer valid: the task is gone"
    holder = f"held by worker {r.lease.worker} (epoch {r.lease.epoch})" if r.lease else "held by no worker"
    return (
        f"task {lease.task_id}: the lease of worker {lease.worker} (epoch {lease.epoch}) is no longer valid: "
        f"the task is {r.status.value}, {holder}"
    )


def doomed_processes(r: TaskRecord) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """``r``'s claude and the processes with its id in their environment, on this host (taken before a new claim)."""
    if r.runner != "claude" or (r.lease is not None and r.lease.host not in ("", HOST)):
        return None, []
    root = procs.process_of(r.claude) if r.claude is not None else None
    others = [p for p in procs.task_processes(r.task_id) if root is None or p.pid != root.pid]
    return root, others


def stop_processes(doomed: tuple[psutil.Process | None, list[psutil.Process]], wait: bool) -> None:
    """Stop what ``doomed_processes`` found; ``wait=False``: in a (non-daemon) thread, so a reader need not wait."""
    root, others = doomed
    if root is None and not others:
        return
    if wait:
        procs.stop_tree(root, others=others, grace_int=1.0)
    else:
        kwargs = {"others": others, "grace_int": 1.0}
        threading.Thread(target=procs.stop_tree, args=(root,), kwargs=kwargs, name="stop-lost").start()


class LeaseRules:
    """The lease half of the engine (its methods use the engine's records and repo)."""

    def _liveness(self, lease: Lease, max_age: float = 0.0) -> Liveness:
        if lease.expires_at is not None:  # an agent's: until it expires
            return Liveness.ALIVE if utcnow() < lease.expires_at else Liveness.GONE
        now = time.monotonic()
        if now - self._seen_alive.get(lease.worker, -1e9) < max_age:
            return Liveness.ALIVE
        live = self.repo.liveness(lease.worker)
        if live is Liveness.ALIVE:
            if len(self._seen_alive) > 1000:
                self._seen_alive.clear()
            self._seen_alive[lease.worker] = now
        else:
            self._seen_alive.pop(lease.worker, None)
        return live

    def lease_alive(self, lease: Lease, max_age: float = 0.0) -> bool:
        """Whether the lease holds (a worker's that cannot be judged yet counts as holding)."""
        return self._liveness(lease, max_age) is not Liveness.GONE

    def check_lease(self, r: TaskRecord, max_age: float = 0.0) -> TaskRecord:
        """``r``, or what ``worker_lost`` made of it if it runs under a lease whose holder is gone."""
        if r.status != TaskStatus.RUNNING:
            return r
        lease = r.lease
        if lease is None:
            if r.supervisor is not None and procs.alive(r.supervisor):
                return r  # a task of cc-tasks 0.2, still under its supervisor: left to it
            why = "it has no lease (a task of an earlier cc-tasks version whose supervisor is gone)"
            return self.worker_lost(r, why)
        if self._liveness(lease, max_age) is not Liveness.GONE:
            return r
        if lease.expires_at is not None:
            return self.worker_lost(r, f"{lease.worker!r} did not renew it by {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC")
        who = f"worker {lease.worker} (pid {lease.pid} on {lease.host})"
        return self.worker_lost(r, f"{who} stopped renewing its lease (exited, killed, hung or cut off)")

    def _acted(self, r: TaskRecord) -> bool:
        """Whether the run may have had effects: a tool call in the record, or a tool call or result in the transcript
        since the lease (the record's progress lags it by a flush)."""
        if r.progress.tool_calls:
            return True
        seen, buf = Progress(), b""
        offset = r.lease.transcript_offset if r.lease else 0
        end = offset + ACTED_SCAN_MAX
        while offset < end:
            chunk, total = self.repo.read_output(r.task_id, r.epoch, "transcript", offset, 1 << 20)
            if not chunk:
                break
            offset += len(chunk)
            events, buf = split_lines(buf + chunk)
            for ev in events:
                apply_event(seen, ev)
                if seen.tool_calls or ev.get("type") == "result":
                    return True
            if offset >= total:
                break
        return False

    def worker_lost(self, r: TaskRecord, reason: str, *, force: bool = False, tool_calls: int = 0) -> TaskRecord:
        """The one place for "the worker is gone": the record first (``lost_update``), then its processes here.
        ``force``: its worker says it no longer runs it (lease not judged); ``tool_calls``: that worker's count."""
        lease = r.lease
        doomed: list = []

        def fn(cur: TaskRecord) -> TaskRecord | None:
            doomed.clear()
            if cur.status != TaskStatus.RUNNING or (lease is not None and not lease.same(cur.lease)):
                return None  # someone else dealt with it
            if not force and cur.lease is not None and self._liveness(cur.lease) is not Liveness.GONE:
                return None  # renewed since ``r`` was read
            doomed.append(doomed_processes(cur))
            return lost_update(cur, reason, acted=cur.runner != "agent" and (tool_calls > 0 or self._acted(cur)))

        try:
            new = self.update(r.task_id, fn)
        except (TaskNotFoundError, CorruptRecordError):
            return r
        if not doomed:
            return new
        if new.status == TaskStatus.QUEUED:
            self.repo.signal("uncancel", r.task_id)
            self.append_event(r.task_id, "requeued", reason=reason, attempt=len(new.attempts) + 1)
            self.repo.signal("nudge")
        stop_processes(doomed[0], wait=False)
        if new.status.terminal:
            self.resolve_waiting()
        return new

    def release_unsupervised(
        self,
        worker_id: str,
        supervised: Callable[[], tuple[set[tuple[str, int]], datetime]],
        abandoned: dict[tuple[str, int], tuple[bool, int]] | None = None,
    ) -> list[str]:
        """Put back the tasks leased to ``worker_id`` it does not supervise (a claim's answer lost). ``supervised()``:
        its (task id, epoch) and the time before which every lease it got is among them; ``abandoned``: (claude
        started?, tool calls) of tasks it gave up: a lost worker's; the quiet release is for unstarted ones."""
        _, seen = self.repo.unfinished()
        mine = [r for _, r in seen.values()
                if r.status == TaskStatus.RUNNING and r.runner == "claude" and r.lease and r.lease.worker == worker_id]  # fmt: skip
        keys, cutoff = supervised()
        abandoned = {} if abandoned is None else abandoned
        gone, ours = dict(abandoned), {(r.task_id, r.epoch) for r in mine}
        for k in [k for k in gone if k not in ours]:
            abandoned.pop(k, None)
        out: list[str] = []
        for r in (r for r in mine if (r.task_id, r.epoch) not in keys and r.lease.acquired_at < cutoff):
            lease, key = r.lease, (r.task_id, r.epoch)
            spawned, tools = gone.get(key, (False, 0))
            if spawned or r.claude is not None or r.progress.tool_calls:  # claude ran: a lost worker's task
                why = f"worker {worker_id} no longer supervises it"
                if spawned:
                    why = f"worker {worker_id} abandoned it after starting claude ({tools} tool calls)"
                new = self.worker_lost(r, why, force=True, tool_calls=tools)
                if new is not r and not (new.status == TaskStatus.RUNNING and new.lease == lease):
                    out.append(r.task_id)
                    abandoned.pop(key, None)
                continue
            did: list[bool] = []

            def fn(cur: TaskRecord, lease=lease, did=did) -> TaskRecord | None:
                did.clear()
                if not holding(lease, cur) or cur.claude or cur.progress.tool_calls:
                    return None  # (ended, taken, or claude started meanwhile: the next pass deals with it)
                did.append(True)
                if cur.cancel_requested:
                    return cur.model_copy(update={"status": TaskStatus.CANCELLED, "lease": None, "claude": None,
                                                  "error": "cancelled before its worker started it"})  # fmt: skip
                return cur.model_copy(update={"status": TaskStatus.QUEUED, "lease": None, "claude": None,
                                              "started_at": None, "progress": Progress()})  # fmt: skip

            try:
                new = self.update(r.task_id, fn)
            except (TaskNotFoundError, CorruptRecordError):
                continue
            if did:
                abandoned.pop(key, None)
                log.warning("task %s: leased to worker %s, which does not run it: released", r.task_id, worker_id)
                self.append_event(r.task_id, "released", by=worker_id, reason="leased but not started")
                out.append(r.task_id)
                if new.status.terminal:
                    self.resolve_waiting()
        if out:
            self.repo.signal("nudge")
        return out
