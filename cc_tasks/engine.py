"""The task engine: every rule of a task's life, written once over a storage interface (repo.Repo) and run
unchanged on the local files, NATS JetStream and in memory (the repos hold only I/O): claim order (priority, age,
labels, the cap), lease liveness, lost workers (requeue or fail), dependencies, cancels, agents' leases, notes.

Clients submit, read, list, cancel, delete and ``nudge``; workers ``claim`` and ``renew``; ``progress``, ``event``
and ``finish`` are fenced by the lease (``LeaseLostError`` once it expired or was taken over, nothing changed).
Every record change is a compare-and-set through ``update`` and states.TRANSITIONS: two writers never both win.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import procs
from .approvals import ApprovalRules
from .board import AgentBoard
from .config import default_max_concurrent
from .errors import CorruptRecordError, LeaseLostError, TaskNotFoundError
from .ids import HOST, validate_task_id
from .launcher import WorkerLauncher
from .leases import ALIVE_CACHE, LeaseRules, doomed_processes, holding, lost_message, stop_processes
from .limits import FleetLimits
from .models import FleetConfig, Lease, TaskRecord, TaskRequest, WorkerInfo, utcnow
from .queue import QueueView, ready
from .repo import SOURCES, WORKSPACE_FILES, Repo, patiently
from .states import DEP_FAILED, TRANSITIONS, TaskStatus, check_transition

log = logging.getLogger("cc_tasks")
#: Seconds between uploads of a running task's transcript (only while it is smaller than LIVE_UPLOAD_MAX).
LIVE_UPLOAD_EVERY = 5.0
LIVE_UPLOAD_MAX = 8 << 20
#: Characters of each dependency's result put in front of a prompt (or in a claim), and of all of them together.
DEP_RESULT_CHARS = 8_000
DEP_RESULTS_TOTAL = 32_000
#: A worker's remark on a task it passes over is written at most this often.
REMARK_EVERY = 60.0


def entry(kind: str, **data) -> dict:
    """An event (or note) line: when, what, and the fields that are set."""
    return {"ts": time.time(), "kind": kind, **{k: v for k, v in data.items() if v is not None}}


def cancel_update(r: TaskRecord) -> TaskRecord | None:
    """A cancel: at once for a task not started or an agent's; a running claude task is only marked (None: no-op)."""
    if r.status.terminal or (r.cancel_requested and r.runner == "claude"):
        return None
    if r.status in (TaskStatus.WAITING, TaskStatus.QUEUED):
        error = "cancelled before it started"
    elif r.runner == "agent":
        error = f"cancelled (it was held by {r.lease.worker!r})" if r.lease else "cancelled"
    else:
        return r.model_copy(update={"cancel_requested": True})
    return r.model_copy(update={"status": TaskStatus.CANCELLED, "cancel_requested": True, "error": error})


def dependency_verdict(r: TaskRecord, deps: dict[str, TaskRecord | None]) -> tuple[TaskStatus | None, str | None]:
    """Queued once every dependency completed, skipped once one did not (or is gone); (None, None) while some run."""
    verdict: TaskStatus | None = TaskStatus.QUEUED
    for dep in r.depends_on:
        d = deps.get(dep)
        if d is None:
            return TaskStatus.SKIPPED, f"dependency {dep} was deleted or is unreadable"
        if d.status in DEP_FAILED:
            return TaskStatus.SKIPPED, f"dependency {dep} ended {d.status.value}"
        if d.status != TaskStatus.COMPLETED:
            verdict = None
    return verdict, None


class TaskEngine(LeaseRules, AgentBoard, ApprovalRules, FleetLimits):
    """The rules over ``repo``. ``max_concurrent``: this process's default cap; one stored with the backend wins
    (on a remote backend the first worker stores its own when none is set: every machine claims under one cap)."""

    def __init__(self, repo: Repo, *, max_concurrent: int | None = None):
        self.repo = repo
        self.caps = repo.caps
        self.default_cap = max_concurrent or default_max_concurrent()
        self._seen_alive: dict[str, float] = {}
        self._view: QueueView | None = None
        self._uploaded: dict[str, tuple[float, int]] = {}
        self._remarked: dict[tuple[str, str], float] = {}
        self.launcher = WorkerLauncher(self.caps.worker_home) if self.caps.worker_home else None  # (see nudge)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

    @property
    def address(self) -> str:
        return self.repo.address

    @property
    def kind(self) -> str:
        """For people (doctor, get_server_info); never branched on."""
        return self.caps.kind

    @property
    def lease_seconds(self) -> float:
        return self.caps.lease_seconds

    def close(self) -> None:
        self.repo.close()

    def reap(self, wait: float = 0.0) -> None:
        """Collect the on-demand workers this process started that have exited."""
        if self.launcher is not None:
            self.launcher.reap(wait)

    def config(self) -> FleetConfig:
        got = self.repo.get_meta("config")
        try:
            return FleetConfig.model_validate_json(got[1]) if got else FleetConfig()
        except ValueError:
            log.warning("%s: the stored configuration is unreadable; using the defaults", self.address)
            return FleetConfig()

    def set_config(self, **fields) -> FleetConfig:
        """Change the configuration stored with the backend (compare-and-set: concurrent changes both land)."""
        while True:
            got = self.repo.get_meta("config")
            cur = FleetConfig.model_validate_json(got[1]) if got else FleetConfig()
            new = FleetConfig.model_validate({**cur.model_dump(), **fields})
            if self.repo.cas_meta("config", new.model_dump_json().encode(), got[0] if got else None):
                return new

    @property
    def max_concurrent(self) -> int:
        """The cap in force: the stored one, else this process's default."""
        return self.config().max_concurrent or self.default_cap

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        """This process's default (a stored cap still wins)."""
        self.default_cap = value

    def cap_source(self) -> str:
        if self.config().max_concurrent:
            return f"stored with the backend ({self.address})"
        return "this process's CC_TASKS_MAX_CONCURRENT (or its default)"

    def update(self, task_id: str, fn: Callable[[TaskRecord], TaskRecord | None]) -> TaskRecord:
        """Read, change, compare-and-set (again from a fresh read if another write came first). ``fn`` returns None
        for no change, may raise to refuse it, and may run more than once. Every status change goes through here."""
        while True:
            revision, current = self.repo.get(task_id)
            new = fn(current)
            if new is None:
                return current
            if new.status != current.status:
                check_transition(current.status, new.status)
                if new.status.terminal:
                    new.finished_at = new.finished_at or utcnow()
            if self.repo.cas(task_id, new, revision) is not None:
                break
        if new.status != current.status:
            worker = new.lease.worker if new.status == TaskStatus.RUNNING and new.lease else None
            self._log_status(task_id, entry("status", status=new.status.value, error=new.error, worker=worker))
        return new

    def _log_status(self, task_id: str, line: dict) -> None:
        """Best effort: the record is the truth (a failed append never makes the change fail)."""
        try:
            self.repo.append(f"ev.{task_id}", line)
        except Exception as e:
            log.warning("task %s: %s: event write failed: %s", task_id, line.get("status"), e)

    def transition(self, task_id: str, status: TaskStatus, **fields) -> TaskRecord:
        def fn(r: TaskRecord) -> TaskRecord | None:
            if r.status == status or status not in TRANSITIONS[r.status]:
                return None
            return r.model_copy(update={"status": status, **fields})

        return self.update(task_id, fn)

    def _peek(self, task_id: str) -> TaskRecord | None:
        try:
            return self.repo.get(task_id)[1]
        except (TaskNotFoundError, CorruptRecordError):
            return None

    def submit(self, record: TaskRecord, request: TaskRequest) -> None:
        """A new task (a batch's in dependency order: none is seen before its dependencies)."""
        validate_task_id(record.task_id)
        self.repo.create(record, request)
        self.repo.append(f"ev.{record.task_id}", entry("status", status=record.status.value))

    def load(self, task_id: str) -> TaskRecord:
        """The record as stored (no lease check)."""
        return self.repo.get(validate_task_id(task_id))[1].model_copy(deep=True)

    def read(self, task_id: str, cached: bool = False) -> TaskRecord:
        """The task's record; a running task whose worker is gone is handed to ``worker_lost`` first. ``cached``:
        a poller's read (the record may be shared: do not change it; a worker seen alive lately is not asked)."""
        r = self.repo.get(validate_task_id(task_id))[1]
        checked = self.check_lease(r, ALIVE_CACHE if cached else 0.0)
        return checked if cached or checked is not r else r.model_copy(deep=True)

    def request(self, task_id: str) -> TaskRequest:
        return self.repo.request(validate_task_id(task_id))

    def list_ids(self, include_finished: bool) -> Iterator[str]:
        return iter(self.repo.ids("all" if include_finished else "active"))

    def has_active(self) -> bool:
        return bool(self.repo.ids("active"))

    def usable(self) -> bool:
        return self.repo.usable()

    def activity_stamp(self) -> object:
        return self.repo.activity()

    def queue_position(self, task_id: str) -> int | None:
        """1 = the next queued task of its kind (claude or agent) to be claimed; None if it is not queued."""
        records = {t: r for t, (_, r) in self.repo.unfinished()[1].items()}
        mine = records.get(task_id)
        return QueueView(records, mine.runner).position(task_id) if mine else None

    def queue_note(self, task_id: str) -> str | None:
        """What the workers that passed this queued task over said (missing labels, no such directory), if any."""
        got = self.repo.get_meta(f"remarks.{validate_task_id(task_id)}")
        try:
            seen = json.loads(got[1]) if got else {}
        except ValueError:
            return None
        return "; ".join(f"worker {w}: {why}" for w, why in list(seen.items())[:5]) or None

    def _remark(self, task_id: str, worker: WorkerInfo, why: str) -> None:
        now = time.monotonic()
        if now - self._remarked.get((task_id, worker.worker_id), -1e9) < REMARK_EVERY:
            return
        if len(self._remarked) > 10_000:
            self._remarked.clear()
        self._remarked[(task_id, worker.worker_id)] = now
        key = f"remarks.{task_id}"
        for _ in range(5):
            got = self.repo.get_meta(key)
            try:
                seen = json.loads(got[1]) if got else {}
            except ValueError:
                seen = {}
            seen[f"{worker.worker_id} on {worker.host}"] = why
            if self.repo.cas_meta(key, json.dumps(dict(list(seen.items())[-10:])).encode(), got[0] if got else None):
                return

    def iter_events(self, task_id: str, since: int = 0) -> Iterator[tuple[int, dict]]:
        return iter(self.repo.read_log(f"ev.{validate_task_id(task_id)}", since))

    def append_event(self, task_id: str, kind: str, **data) -> None:
        self.repo.append(f"ev.{validate_task_id(task_id)}", entry(kind, **data))

    def read_output(self, task_id: str, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes from ``offset`` and the size of the record's claim's output (a result once ended)."""
        if source not in SOURCES:
            raise ValueError(f"unknown output source {source!r}")
        r = self._peek(validate_task_id(task_id))
        if r is None or (source == "result" and not r.status.terminal):
            return b"", 0
        return self.repo.read_output(task_id, r.epoch, source, offset, limit)

    def workspace(self, task_id: str) -> Path:
        return self.repo.workspace(validate_task_id(task_id))

    def annotate(self, task_id: str, **fields) -> TaskRecord:
        """Set fields of a finished task's record (a worktree's ``changes``), never status or lease; else no-op."""
        if "status" in fields or "lease" in fields:
            raise ValueError("annotate never changes a task's status or lease")

        def fn(r: TaskRecord) -> TaskRecord | None:
            return r.model_copy(update=fields) if r.status.terminal else None

        return self.update(validate_task_id(task_id), fn)

    def delete(self, task_id: str) -> None:
        self.repo.delete(validate_task_id(task_id))

    def purge(self, task_id: str) -> None:
        """Delete a task whose record cannot be read, after stopping the processes that carry its id here."""
        procs.stop_tree(None, others=procs.task_processes(validate_task_id(task_id)))
        self.delete(task_id)

    def nudge(self) -> None:
        """Workers look at the queue now; the backend's own worker, if any, is started (WorkerUnavailableError)."""
        if self.launcher is not None:
            self.launcher.nudge()
        else:
            self.repo.signal("nudge")

    def subscribe(self, handler: Callable[[], None]) -> None:
        self.repo.subscribe(handler)

    def request_cancel(self, task_id: str) -> TaskRecord:
        """See ``cancel_update``; a running claude task's worker is signalled (its supervisor stops the tree)."""
        r = self.update(validate_task_id(task_id), cancel_update)
        if r.status == TaskStatus.RUNNING:
            self.repo.signal("cancel", task_id)
            self.append_event(task_id, "cancel_requested", by_pid=os.getpid(), by_host=HOST)
        elif r.status.terminal:
            self.resolve_waiting()
        return r

    def cancel_requested(self, task_id: str) -> bool:
        return self.repo.cancel_signalled(task_id)

    def force_cancel(self, task_id: str, error: str) -> TaskRecord:
        """End a task its worker did not stop in time: the record (lease dropped), then its processes here."""
        doomed: list = []

        def fn(cur: TaskRecord) -> TaskRecord | None:
            doomed.clear()
            if cur.status.terminal:
                return None
            doomed.append(doomed_processes(cur))
            return cur.model_copy(update={"status": TaskStatus.CANCELLED, "error": error, "lease": None})

        r = self.update(validate_task_id(task_id), fn)
        if doomed:
            self.repo.signal("cancel", task_id)
            stop_processes(doomed[0], wait=True)
            self.resolve_waiting()
        return r

    def resolve_waiting(self, records: dict[str, TaskRecord] | None = None) -> dict[str, TaskRecord]:
        """Queue or skip (cascading) the waiting tasks per ``dependency_verdict``; returns the records it changed."""
        ids = self.repo.ids("waiting")
        if not ids:
            return {}
        known = dict(records or {})
        changed: dict[str, TaskRecord] = {}
        again = True
        while again:
            again = False
            for t, r in {t: known.get(t) or self._peek(t) for t in ids}.items():
                if r is None or r.status != TaskStatus.WAITING:
                    continue
                verdict, reason = dependency_verdict(r, {d: known.get(d) or self._peek(d) for d in r.depends_on})
                if verdict is None:
                    continue
                try:
                    new = self.transition(t, verdict, **({"error": reason} if reason else {}))
                except (TaskNotFoundError, CorruptRecordError):
                    continue
                known[t] = changed[t] = new
                again = again or new.status != r.status
        if any(r.status == TaskStatus.QUEUED for r in changed.values()):
            self.repo.signal("nudge")
        return changed

    def register(self, info: WorkerInfo) -> None:
        """A worker joins. On a remote backend the first worker's cap becomes the namespace's when none is stored."""
        self.repo.put_worker(info)
        if self.caps.remote and self.repo.get_meta("config") is None:
            new = FleetConfig(max_concurrent=self.default_cap).model_dump_json().encode()
            if self.repo.cas_meta("config", new, None):
                log.info("%s: the cap is now %d (this worker's; none was stored)", self.address, self.default_cap)

    def heartbeat(self, worker_id: str) -> bool:
        with patiently():
            return self.repo.beat(worker_id)

    def unregister(self, worker_id: str) -> None:
        self.repo.remove_worker(worker_id)

    def workers(self) -> list[WorkerInfo]:
        return self.repo.workers()

    def claim(self, worker: WorkerInfo, free_slots: int, fresh: bool = True) -> list[TaskRecord]:
        """Lease up to ``free_slots`` ready tasks in queue order, within the cap, whose labels (and, remotely, folder)
        ``worker`` has; under the claim lock, each lease a CAS. ``fresh=False`` trusts this engine's QueueView."""
        if free_slots <= 0:
            return []
        out: list[TaskRecord] = []
        with self.repo.claim_lock() as still_ours:
            view = None if fresh else self._view
            ids, seen = self.repo.unfinished(frozenset(view.queued) if view is not None else frozenset())
            records = {t: self.check_lease(r, ALIVE_CACHE) for t, (_, r) in seen.items()}
            records.update(self.resolve_waiting(records))
            if view is None:
                view = self._view = QueueView(records)
            else:
                view.keep(set(ids))
                for r in records.values():
                    view.note(r)
            running = sum(r.status == TaskStatus.RUNNING and r.runner == "claude" for r in records.values())
            free = min(free_slots, self.starts_allowed(running))  # (the cap, less what the limiter holds back)
            scopes = self.budget_scopes()
            if scopes:
                self.settle_reservations(records)
            tried: set[str] = set()
            labels = set(worker.labels)
            while free > 0:
                batch = view.first(free, skip=tried)
                if not batch:
                    break
                tried.update(batch)
                have = {t: seen[t] for t in batch if t in seen and seen[t][1] is records.get(t)}
                have.update(self.repo.get_many([t for t in batch if t not in have]))
                picks = []
                for t in batch:
                    if t not in have:
                        view.queued.discard(t)
                        continue
                    r = have[t][1]
                    if not ready(r) or r.runner != "claude":
                        view.note(r)
                        free -= r.status == TaskStatus.RUNNING and r.runner == "claude"
                    elif missing := sorted(set(r.labels) - labels):
                        self._remark(t, worker, f"lacks labels {missing}")
                    elif self.caps.remote and not os.path.isdir(r.cwd):
                        self._remark(t, worker, f"has no directory {r.cwd}")
                    else:
                        wanted = self.request(t).options.max_budget_usd if scopes else None
                        amount, why = self.reserve(r, wanted, scopes) if scopes else (None, None)
                        if why is not None:
                            self._block(r, why)
                        else:
                            picks.append((*have[t], amount))
                if picks and not still_ours():  # (a pass longer than the lock: another claimer may be in)
                    log.warning("%s: the claim lock expired during a claim pass; leasing nothing more", self.address)
                    break
                leased_epochs = {r.task_id: r.epoch + 1 for _, r, _ in picks}
                reserved = {r.task_id: r for _, r, amount in picks if amount is not None}
                for rec in self._lease_all(picks, worker):
                    if not isinstance(rec, TaskRecord):  # refused: the id
                        r = self._peek(rec)
                        by = r.lease.worker if r is not None and r.status == TaskStatus.RUNNING and r.lease else None
                        if rec in reserved and by != worker.worker_id:
                            self.release(reserved[rec], None)  # (not leased: its reservation goes back)
                        if r is None:  # cancelled, or taken meanwhile
                            view.queued.discard(rec)
                            continue
                        if by != worker.worker_id or r.epoch != leased_epochs.get(rec):
                            view.note(r)
                            free -= r.status == TaskStatus.RUNNING and r.runner == "claude"
                            continue
                        rec = r  # (ours: it landed, its answer was lost)
                    out.append(rec)
                    view.taken(rec.task_id)
                    free -= 1
        return out

    def _lease_all(
        self, picks: list[tuple[object, TaskRecord, float | None]], worker: WorkerInfo
    ) -> list[TaskRecord | str]:
        """Lease the picks to ``worker`` at once (each with its budget reservation): leased records or refused ids."""
        writes = []
        for revision, r, amount in picks:
            try:
                offset = os.stat(self.repo.workspace(r.task_id) / WORKSPACE_FILES["transcript"]).st_size
            except OSError:
                offset = 0
            lease = Lease(task_id=r.task_id, worker=worker.worker_id, epoch=r.epoch + 1, host=worker.host,
                          pid=worker.proc.pid, transcript_offset=offset)  # fmt: skip
            check_transition(r.status, TaskStatus.RUNNING)
            new = r.model_copy(update={"status": TaskStatus.RUNNING, "started_at": lease.acquired_at,
                                       "epoch": lease.epoch, "lease": lease, "budget_reserved_usd": amount,
                                       "blocked_by": None, "blocked_reason": None})  # fmt: skip
            writes.append((new, revision))
        out: list[TaskRecord | str] = []
        for (new, _), landed in zip(writes, self.repo.cas_many(writes) if writes else [], strict=True):
            if landed is None:
                out.append(new.task_id)
                continue
            self.repo.signal("uncancel", new.task_id)
            self._log_status(new.task_id, entry("status", status="running", worker=worker.worker_id))
            if new.budget_reserved_usd is not None:
                self.append_event(new.task_id, "budget_reserved", usd=new.budget_reserved_usd)
            out.append(new)
        return out

    def _fenced(self, lease: Lease, changes: Callable[[TaskRecord], dict]) -> TaskRecord:
        def fn(r: TaskRecord) -> TaskRecord:
            if not holding(lease, r):
                raise LeaseLostError(lost_message(lease, r))
            return r.model_copy(update=changes(r))

        try:
            with patiently():
                return self.update(lease.task_id, fn)
        except (TaskNotFoundError, CorruptRecordError) as e:
            raise LeaseLostError(f"task {lease.task_id}: {e}") from None

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` is still the task's lease (a read, no write)."""
        with patiently():
            r = self._peek(lease.task_id)
        return holding(lease, r)

    def renew(self, lease: Lease) -> None:
        """The heartbeat for one lease: raises LeaseLostError if it is no longer the task's."""
        with patiently():
            self.repo.beat(lease.worker)
            r = self._peek(lease.task_id)
        if not holding(lease, r):
            raise LeaseLostError(lost_message(lease, r))

    def event(self, lease: Lease, kind: str, **data) -> None:
        """Append to the task's events if ``lease`` still holds it (each carries the lease's epoch)."""
        if not self.holds(lease):
            raise LeaseLostError(f"task {lease.task_id}: the lease of worker {lease.worker} is no longer valid")
        with patiently():
            self.repo.append(f"ev.{lease.task_id}", entry(kind, epoch=lease.epoch, **data))

    def progress(self, lease: Lease, **fields) -> TaskRecord:
        """Live progress under ``lease``; a small transcript is also stored every LIVE_UPLOAD_EVERY s (for readers)."""
        r = self._fenced(lease, lambda r: fields)
        path = self.repo.workspace(lease.task_id) / WORKSPACE_FILES["transcript"]
        try:
            size = path.stat().st_size
        except OSError:
            return r
        last = self._uploaded.get(lease.task_id, (0.0, -1))
        now = time.monotonic()
        if size != last[1] and size <= LIVE_UPLOAD_MAX and now - last[0] >= LIVE_UPLOAD_EVERY:
            self._uploaded[lease.task_id] = (now, size)
            with patiently():
                self.repo.put_output(lease.task_id, lease.epoch, "transcript", path)
        return r

    def finish(self, lease: Lease, status: TaskStatus, result_text: str | None = None, **fields) -> TaskRecord:
        """Store the outputs under the lease's epoch (a superseded claim's are never read), then the final record
        (fenced); then resolve the tasks waiting for it."""
        t, ws = lease.task_id, self.repo.workspace(lease.task_id)
        outputs: dict[str, bytes | Path] = {s: ws / name for s, name in WORKSPACE_FILES.items()}
        if result_text is not None:
            outputs["result"] = result_text.encode("utf-8", "surrogatepass")
        with patiently():
            if not self.holds(lease):
                raise LeaseLostError(lost_message(lease, self._peek(t)))
            for source, data in outputs.items():
                self.repo.put_output(t, lease.epoch, source, data)
            try:
                new = self._fenced(lease, lambda r: {"status": status, "pending_approvals": [], **fields})
            except LeaseLostError:
                if result_text is not None:
                    self.repo.put_output(t, lease.epoch, "result", None)
                raise
        self._uploaded.pop(t, None)
        if new.budget_reserved_usd is not None:  # (its real cost charged, the rest of its reservation returned)
            self.release(new, new.total_cost_usd if new.total_cost_usd is not None else (new.progress.cost_usd or 0.0))
        self.resolve_waiting()
        self.repo.forget_workspace(t)
        return new


def dependency_preamble(backend: TaskEngine, depends_on: list[str], total: int = DEP_RESULTS_TOTAL) -> str:
    """The dependencies' results, bounded, as text to put in front of a prompt."""
    parts = []
    per = max(500, min(DEP_RESULT_CHARS, total // max(1, len(depends_on))))
    for dep in depends_on:
        r = backend.read(dep)
        data, size = backend.read_output(dep, "result", 0, per * 4)
        text = data.decode("utf-8", "replace") if size else (r.result or "")
        tail = f"\n[... more: get_task_output(task_id={dep!r})]" if len(text) > per or size > len(data) else ""
        parts.append(f'<dependency task_id="{dep}" name="{r.name or ""}">\n{text[:per]}{tail}\n</dependency>')
    return ("Results of the tasks this task depends on:\n\n" + "\n\n".join(parts) + "\n\n---\n\n") if parts else ""
