"""The local task store: the file backend. One folder per task under a private directory, shared by every
process of the user, and the claim-and-lease primitive that workers pull tasks with.

Layout::

    <root>/tasks/<task_id>/record.json   the TaskRecord, replaced atomically
                           request.json  the TaskRequest: options, cwd, claude binary, the submitter's environment
                           prompt.txt    claude's standard input (written by the supervisor)
                           stdout.jsonl  claude's stream-json transcript
                           stderr.log    claude's standard error
                           result.txt    the whole final result text
                           events.jsonl  append-only event log
                           cancel        marker: a cancel was asked for (the running supervisor stops)
                           lock          filelock serialising updates of record.json
    <root>/active/<task_id>              marker of a task that is not finished (cheap listing)
    <root>/waiting/<task_id>             marker of a task waiting for its dependencies
    <root>/workers/<worker_id>.json      a registered worker (WorkerInfo); its mtime is the worker's heartbeat
    <root>/worker.sock                   the control socket of the store's worker (control.py)
    <root>/queue.lock                    serialises claims
    <root>/cc_tasks.log, worker.log      logs

Leases: a worker claims a task (queued -> running) under the queue lock, and the record then holds its
lease: the worker's id and the task's claim count (``epoch``). Every write the worker makes for the task
is checked against that lease under the task's lock (``LeaseLostError`` otherwise). On one machine a
worker's leases live as long as its heartbeat: the mtime of its registration file, refreshed every second,
and its pid (with its start ticks) on this host. ``worker_lost`` is the one place that ends a lease whose
worker is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from . import control, procs
from .backend import agent_completed, agent_failed, agent_renewed, cancel_update, check_agent_lease, lost_update
from .checks import ensure_private_dir
from .config import default_lease_seconds, default_max_concurrent
from .errors import (
    CorruptRecordError,
    InvalidOptionsError,
    InvalidTaskIdError,
    LeaseLostError,
    TaskNotFoundError,
    WorkerUnavailableError,
)
from .models import Lease, ProcRef, Progress, TaskRecord, TaskRequest, WorkerInfo, check_group, utcnow
from .queue import QueueView, queue_order, ready
from .states import DEP_FAILED, TRANSITIONS, TaskStatus, check_transition
from .stream import apply_event, split_lines

log = logging.getLogger("cc_tasks")
TASK_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{3}-[0-9a-f]{8}")
WORKER_ID_RE = re.compile(r"w-[0-9]+-[0-9a-f]{6}")
LOCK_TIMEOUT = 30.0
POLL = 0.002
HOST = socket.gethostname()
#: A worker found alive this recently is not looked at again (pollers reading many of its tasks).
ALIVE_CACHE = 0.2
#: How long a server waits for a worker it started to answer.
WORKER_START_WAIT = 10.0
OUTPUT_FILES = {"result": "result.txt", "transcript": "stdout.jsonl", "stderr": "stderr.log", "prompt": "prompt.txt"}


def new_task_id(now: datetime | None = None) -> str:
    """Time-sortable id: ``YYYYMMDD-HHMMSS-mmm-<8 hex>`` (UTC)."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(4)}"


def validate_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        shown = repr(task_id)[:80]
        raise InvalidTaskIdError(
            f"invalid task id {shown}: task ids look like 20260101-120000-000-1a2b3c4d "
            "(use an id returned by start_cc_task_async or list_active_tasks)"
        )
    return task_id


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _event_line(kind: str, **data) -> bytes:
    return (
        json.dumps({"ts": time.time(), "kind": kind, **{k: v for k, v in data.items() if v is not None}}, default=str)
        + "\n"
    ).encode()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class TaskStore:
    """The local backend (see backend.Backend). ``max_concurrent`` (the global cap on running tasks) and
    ``lease_seconds`` (how long a silent worker keeps its leases) default to the environment's settings."""

    kind = "local"

    def __init__(self, root: Path | str, *, max_concurrent: int | None = None, lease_seconds: float | None = None):
        self.root = ensure_private_dir(Path(root))
        self.tasks_dir = ensure_private_dir(self.root / "tasks")
        self.active_dir = ensure_private_dir(self.root / "active")
        self.waiting_dir = ensure_private_dir(self.root / "waiting")
        self.workers_dir = ensure_private_dir(self.root / "workers")
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.lease_seconds = lease_seconds or default_lease_seconds()
        self._cache: dict[str, tuple[bytes, TaskRecord]] = {}
        self._locks: dict[str, FileLock] = {}
        self._queue_lock_path = self.root / "queue.lock"
        self._queue_lock_path.touch(0o600)
        self._view: QueueView | None = None
        self._workers: dict[str, WorkerInfo] = {}
        self._seen_alive: dict[str, float] = {}
        #: the socket's inode and the process of a worker found to be of this code's version
        self._known_worker: tuple[int, ProcRef] | None = None
        self._spawned: list[subprocess.Popen] = []
        self._spawn_lock = threading.Lock()
        self._spawned_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TaskStore({str(self.root)!r})"

    @property
    def address(self) -> str:
        return str(self.root)

    # -- locks ---------------------------------------------------------------
    def _lock_for(self, path: str, timeout: float) -> FileLock:
        """One FileLock object per lock file and process (making one costs more than using it; its state
        is per thread, so threads still exclude each other)."""
        lock = self._locks.get(path)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks.clear()
            lock = self._locks[path] = FileLock(path, timeout=timeout)
        return lock

    @contextlib.contextmanager
    def locked(self, lock: FileLock, timeout: float | None = None):
        """Hold ``lock``, polling briskly (filelock's default poll is 50 ms)."""
        lock.acquire(timeout=timeout, poll_interval=POLL)
        try:
            yield lock
        finally:
            lock.release()

    def queue_lock(self) -> FileLock:
        return self._lock_for(str(self._queue_lock_path), 60.0)

    # -- paths ---------------------------------------------------------------
    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / validate_task_id(task_id)

    def path(self, task_id: str, name: str) -> Path:
        return self.task_dir(task_id) / name

    def lock(self, task_id: str) -> FileLock:
        return self._lock_for(str(self.path(task_id, "lock")), LOCK_TIMEOUT)

    # -- submit --------------------------------------------------------------
    def submit(self, record: TaskRecord, request: TaskRequest) -> None:
        """Write a new task's folder completely, then make it appear at once (rename). Tasks of a batch are
        submitted in dependency order, so nobody sees a task whose dependencies are missing."""
        final = self.task_dir(record.task_id)
        tmp = self.tasks_dir / f".new-{record.task_id}"
        os.mkdir(tmp, 0o700)
        files = {
            **(
                {"prompt.txt": request.options.prompt.encode("utf-8", "surrogatepass")}
                if record.runner == "agent"
                else {}
            ),
            "request.json": request.model_dump_json().encode("utf-8", "surrogatepass"),
            "record.json": record.model_dump_json().encode(),
            "events.jsonl": _event_line("status", status=record.status.value),
        }
        try:  # nothing in tmp is visible before the rename, so plain writes are enough here
            for name, data in files.items():
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            (self.active_dir / record.task_id).touch(0o600)
            if record.status == TaskStatus.WAITING:
                (self.waiting_dir / record.task_id).touch(0o600)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _unlink(self.active_dir / record.task_id)
            _unlink(self.waiting_dir / record.task_id)
            raise

    # -- read ----------------------------------------------------------------
    def exists(self, task_id: str) -> bool:
        return (self.task_dir(task_id) / "record.json").is_file()

    def _bytes(self, task_id: str) -> bytes:
        try:
            return (self.task_dir(task_id) / "record.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(task_id, None)
            raise TaskNotFoundError(
                f"no task {task_id} in this store ({self.root}); list_active_tasks shows the known ones"
            ) from None

    def _parse(self, task_id: str, data: bytes) -> TaskRecord:
        try:
            return TaskRecord.model_validate_json(data)
        except ValueError as e:
            first = str(e).strip().splitlines()
            raise CorruptRecordError(
                f"task {task_id}: its record {self.task_dir(task_id) / 'record.json'} is unreadable "
                f"({first[0] if first else 'invalid'}); cleanup_task deletes the task"
            ) from None

    def load(self, task_id: str) -> TaskRecord:
        """The record as it is on disk (no lease check)."""
        return self._parse(task_id, self._bytes(task_id))

    def read_cached(self, task_id: str, copy: bool = True) -> TaskRecord:
        """``load``, but a record whose bytes have not changed since the last call is not parsed again. A copy
        the caller may change, or with ``copy=False`` the cached record itself, which must not be changed."""
        data = self._bytes(task_id)
        hit = self._cache.get(task_id)
        if hit is None or hit[0] != data:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[task_id] = hit = (data, self._parse(task_id, data))
        return hit[1].model_copy() if copy else hit[1]

    def read(self, task_id: str, cached: bool = False) -> TaskRecord:
        """The task's record; a running task whose worker is gone is handed to ``worker_lost`` first."""
        if cached:  # (a poller: a worker found alive in the last ALIVE_CACHE seconds is not looked at again)
            return self.check_lease(self.read_cached(validate_task_id(task_id), copy=False), ALIVE_CACHE)
        return self.check_lease(self.load(validate_task_id(task_id)))

    def request(self, task_id: str) -> TaskRequest:
        try:
            return TaskRequest.model_validate_json(self.path(task_id, "request.json").read_bytes())
        except FileNotFoundError:
            raise TaskNotFoundError(f"task {task_id} has no request.json (deleted, or not a task)") from None
        except ValueError as e:
            raise CorruptRecordError(f"task {task_id}: its request.json is unreadable ({e})") from None

    def queue_position(self, task_id: str) -> int | None:
        """1 = the next queued task of its kind (claude or agent) to be claimed; None if it is not queued."""
        records = self._read_all(self.active_ids())
        mine = records.get(task_id)
        return QueueView(records, mine.runner).position(task_id) if mine else None

    # -- write ---------------------------------------------------------------
    def write(self, record: TaskRecord, *, fsync: bool = True) -> None:
        data = record.model_dump_json().encode()
        atomic_write(self.task_dir(record.task_id) / "record.json", data, fsync=fsync)
        if record.task_id in self._cache:  # a claimer's cache stays true to its own writes
            self._cache[record.task_id] = (data, record.model_copy())

    def update(self, task_id: str, fn: Callable[[TaskRecord], TaskRecord | None], *, fsync: bool = False) -> TaskRecord:
        """Read, change and write the record under the task's lock. ``fn`` returns None for no change (and may
        raise to refuse the change). Every status change goes through here and the TRANSITIONS table."""
        if not self.exists(task_id):
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.root})")
        try:
            with self.locked(self.lock(task_id)):
                try:
                    current = self.load(task_id)
                except TaskNotFoundError:  # deleted while we waited: filelock re-made the folder; undo that
                    self._remove_husk(task_id)
                    raise
                new = fn(current)  # a changed copy (model_copy(update=...)) or None
                if new is None:
                    return current
                if new.status != current.status:
                    check_transition(current.status, new.status)
                    if new.status.terminal:  # a final record reaches the disk before anyone is told
                        new.finished_at = new.finished_at or utcnow()
                        fsync = True
                self.write(new, fsync=fsync)
        except FileNotFoundError:
            raise TaskNotFoundError(f"task {task_id} was deleted") from None
        if new.status != current.status:
            if current.status == TaskStatus.WAITING:
                _unlink(self.waiting_dir / task_id)
            if new.status.terminal:
                _unlink(self.active_dir / task_id)
            worker = new.lease.worker if new.status == TaskStatus.RUNNING and new.lease else None
            self.append_event(task_id, "status", status=new.status.value, error=new.error, worker=worker)
        return new

    def transition(self, task_id: str, status: TaskStatus, **fields) -> TaskRecord:
        """Move to ``status`` if the lifecycle allows it from the current one; else leave the record alone."""

        def fn(r: TaskRecord) -> TaskRecord | None:
            if r.status == status or status not in TRANSITIONS[r.status]:
                return None
            return r.model_copy(update={"status": status, **fields})

        return self.update(task_id, fn)

    def _remove_husk(self, task_id: str) -> None:
        d = self.task_dir(task_id)
        try:
            os.unlink(d / "lock")
            os.rmdir(d)
        except OSError:
            pass

    # -- events --------------------------------------------------------------
    def append_event(self, task_id: str, kind: str, **data) -> None:
        line = _event_line(kind, **data)
        try:
            fd = os.open(self.path(task_id, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except FileNotFoundError:
            return  # task deleted meanwhile
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def iter_events(self, task_id: str, since: int = 0) -> Iterator[tuple[int, dict]]:
        """The task's events from position ``since``, with their positions (a line that is not JSON reads as
        an event of kind ``unreadable``)."""
        try:
            with open(self.path(task_id, "events.jsonl"), "rb") as f:
                for i, line in enumerate(f):
                    if i < since:
                        continue
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        ev = {"kind": "unreadable"}
                    yield i, ev if isinstance(ev, dict) else {"kind": "unreadable"}
        except FileNotFoundError:
            return

    def read_output(self, task_id: str, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of a task's output from ``offset``, and the output's current size."""
        try:
            with open(self.path(task_id, OUTPUT_FILES[source]), "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(min(offset, total))
                return f.read(limit), total
        except FileNotFoundError:
            return b"", 0

    def workspace(self, task_id: str) -> Path:
        """The folder the supervisor keeps a task's prompt, transcript and stderr in."""
        return self.task_dir(task_id)

    # -- listing -------------------------------------------------------------
    def usable(self) -> bool:
        """False once the store was deleted (its workers then cancel their tasks and exit)."""
        return self.active_dir.is_dir() and self.tasks_dir.is_dir()

    def has_active(self) -> bool:
        return any(TASK_ID_RE.fullmatch(e.name) for e in os.scandir(self.active_dir))

    def active_ids(self) -> list[str]:
        """Unfinished tasks, newest first."""
        return sorted((e.name for e in os.scandir(self.active_dir) if TASK_ID_RE.fullmatch(e.name)), reverse=True)

    def all_ids(self) -> Iterator[str]:
        """Every task id, newest first (ids sort by creation time)."""
        names = [e.name for e in os.scandir(self.tasks_dir) if TASK_ID_RE.fullmatch(e.name)]
        names.sort(reverse=True)
        return iter(names)

    def list_ids(self, include_finished: bool) -> Iterator[str]:
        return self.all_ids() if include_finished else iter(self.active_ids())

    def activity_stamp(self) -> tuple[int, int]:
        """Changes whenever a task starts or ends (cheap: one stat); waits look at it between reads."""
        st = os.stat(self.active_dir)
        return st.st_mtime_ns, st.st_ino

    def _read_all(self, ids: list[str]) -> dict[str, TaskRecord]:
        """The records (shared, read-only); unreadable ones are left out (they only affect their own task)."""
        out = {}
        for t in ids:
            try:
                out[t] = self.read_cached(t, copy=False)
            except (TaskNotFoundError, CorruptRecordError):
                continue
        return out

    # -- delete --------------------------------------------------------------
    def delete(self, task_id: str) -> None:
        d = self.task_dir(task_id)
        if not d.exists():
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.root})")
        _unlink(self.active_dir / task_id)
        _unlink(self.waiting_dir / task_id)
        self._locks.pop(str(d / "lock"), None)
        self._cache.pop(task_id, None)
        trash = self.tasks_dir / f".del-{task_id}-{secrets.token_hex(3)}"
        os.rename(d, trash)  # disappears at once for every reader
        shutil.rmtree(trash, ignore_errors=True)

    def annotate(self, task_id: str, **fields) -> TaskRecord:
        """Set fields of a finished task's record that no worker writes any more (a worktree task's ``changes``,
        its ``worktree`` once merged). Never its status; a task that has not finished is left alone."""
        if "status" in fields or "lease" in fields:
            raise ValueError("annotate never changes a task's status or lease")

        def fn(r: TaskRecord) -> TaskRecord | None:
            return r.model_copy(update=fields) if r.status.terminal else None

        return self.update(validate_task_id(task_id), fn)

    # -- cancel (client side) ------------------------------------------------
    def request_cancel(self, task_id: str) -> TaskRecord:
        """A task that has not started, or an agent's task, is cancelled at once (an agent's lease is dropped:
        its later calls are refused); a running claude task is marked, and its worker's supervisor stops it
        (``cancel_requested``)."""

        fn = cancel_update

        r = self.update(validate_task_id(task_id), fn)
        if r.status == TaskStatus.RUNNING:
            (self.task_dir(task_id) / "cancel").touch()
            self.append_event(task_id, "cancel_requested", by_pid=os.getpid())
        elif r.status.terminal:
            self.resolve_waiting()
        return r

    def cancel_requested(self, task_id: str) -> bool:
        return (self.task_dir(task_id) / "cancel").exists()

    def force_cancel(self, task_id: str, error: str) -> TaskRecord:
        """End a running task whose worker did not stop it in time: first its record (cancelled, lease dropped:
        the worker's later writes are refused), then its processes on this host."""
        doomed: list = []

        def fn(cur: TaskRecord) -> TaskRecord | None:
            if cur.status.terminal:
                return None
            doomed.append(self._doomed(cur))
            return cur.model_copy(update={"status": TaskStatus.CANCELLED, "error": error, "lease": None})

        r = self.update(validate_task_id(task_id), fn)
        if doomed:
            self._stop(doomed[0], wait=True)
            self.resolve_waiting()
        return r

    def purge(self, task_id: str) -> None:
        """Delete a task whose record cannot be read, after stopping the processes that carry its id here."""
        procs.stop_tree(None, others=procs.task_processes(validate_task_id(task_id)))
        self.delete(task_id)

    # -- workers -------------------------------------------------------------
    def _worker_file(self, worker_id: str) -> Path:
        if not WORKER_ID_RE.fullmatch(worker_id):
            raise ValueError(f"invalid worker id {worker_id[:80]!r}")
        return self.workers_dir / f"{worker_id}.json"

    def register(self, info: WorkerInfo) -> None:
        atomic_write(self._worker_file(info.worker_id), info.model_dump_json().encode(), fsync=False)
        self.heartbeat(info.worker_id)

    def heartbeat(self, worker_id: str) -> bool:
        """Keep the worker's leases alive: this host's monotonic clock, written in place into its beat file
        (no new file, no record write per task; a stepped wall clock or a suspend changes nothing). False if
        the worker is not registered (its file was removed): it registers again."""
        path = self._worker_file(worker_id)
        if not path.exists():
            return False
        fd = os.open(path.with_suffix(".beat"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, f"{time.monotonic():20.3f}".encode(), 0)
        finally:
            os.close(fd)
        return True

    def unregister(self, worker_id: str) -> None:
        _unlink(self._worker_file(worker_id))
        _unlink(self._worker_file(worker_id).with_suffix(".beat"))

    def worker_info(self, worker_id: str) -> WorkerInfo | None:
        info = self._workers.get(worker_id)
        if info is None:
            try:
                info = WorkerInfo.model_validate_json(self._worker_file(worker_id).read_bytes())
            except (OSError, ValueError):
                return None
            self._workers[worker_id] = info
        return info

    def workers(self) -> list[WorkerInfo]:
        """Registered workers whose heartbeat is fresh."""
        out = []
        for e in os.scandir(self.workers_dir):
            wid = e.name.removesuffix(".json")
            if e.name.endswith(".json") and WORKER_ID_RE.fullmatch(wid) and self._worker_alive(wid):
                info = self.worker_info(wid)
                if info is not None:
                    out.append(info)
        return out

    def _worker_alive(self, worker_id: str, max_age: float = 0.0) -> bool:
        now = time.monotonic()
        if now - self._seen_alive.get(worker_id, -1e9) < max_age:
            return True
        info = self.worker_info(worker_id)
        alive = (
            info is not None
            and info.host == HOST  # (a local store is one host's: a worker elsewhere cannot be checked)
            and self._beat_age(worker_id) <= self.lease_seconds
            and procs.alive(info.proc)
        )
        if alive:
            if len(self._seen_alive) > 1000:
                self._seen_alive.clear()
            self._seen_alive[worker_id] = now
        else:
            self._seen_alive.pop(worker_id, None)
        return alive

    def _beat_age(self, worker_id: str) -> float:
        """Seconds since the worker's last heartbeat (on this host's monotonic clock); infinite if none."""
        try:
            with open(self._worker_file(worker_id).with_suffix(".beat"), "rb") as f:
                return time.monotonic() - float(f.read(64))
        except (OSError, ValueError):
            return float("inf")

    def lease_alive(self, lease: Lease, max_age: float = 0.0) -> bool:
        """Whether the lease holds: an agent's until it expires; a worker's while the worker lives (its
        heartbeat is fresh, and its pid, on this host); with ``max_age``, a worker found alive that recently
        counts as alive without looking again."""
        if lease.expires_at is not None:
            return utcnow() < lease.expires_at
        return self._worker_alive(lease.worker, max_age)

    # -- the worker is gone ----------------------------------------------------
    def check_lease(self, r: TaskRecord, max_age: float = 0.0) -> TaskRecord:
        """``r``, or what ``worker_lost`` made of it if it runs under the lease of a worker that is gone."""
        if r.status != TaskStatus.RUNNING or (r.lease is not None and self.lease_alive(r.lease, max_age)):
            return r
        if r.lease is None:
            if r.supervisor is not None and procs.alive(r.supervisor):
                return r  # a task of cc-tasks 0.2, still under its supervisor: left to it
            return self.worker_lost(r, "its supervisor is gone (a task of an earlier cc-tasks version)")
        if r.lease.expires_at is not None:
            return self.worker_lost(
                r, f"{r.lease.worker!r} did not renew it by {r.lease.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        info = self.worker_info(r.lease.worker)
        who = f"worker {r.lease.worker} (pid {info.proc.pid} on {info.host})" if info else f"worker {r.lease.worker}"
        return self.worker_lost(r, f"{who} stopped renewing its lease (exited, killed, or hung)")

    def _doomed(self, r: TaskRecord) -> tuple[psutil.Process | None, list[psutil.Process]]:
        """The processes of ``r``'s run that this host can see: its claude, and every process carrying the task's
        id in its environment (its tools, also those a lost worker had adopted). Taken before the task can be
        claimed again, since a new attempt's processes carry the same id."""
        if r.runner != "claude" or (r.lease is not None and r.lease.host not in ("", HOST)):
            return None, []
        root = procs.process_of(r.claude) if r.claude is not None else None
        others = [p for p in procs.task_processes(r.task_id) if root is None or p.pid != root.pid]
        return root, others

    @staticmethod
    def _stop(doomed: tuple[psutil.Process | None, list[psutil.Process]], wait: bool) -> None:
        """Stop what ``_doomed`` found; with ``wait=False`` in a thread of its own (a reader or a claim must not
        wait seconds for a stubborn tree; not a daemon, so a short-lived CLI process still sees it through)."""
        root, others = doomed
        if root is None and not others:
            return
        if wait:
            procs.stop_tree(root, others=others, grace_int=1.0)
        else:
            threading.Thread(
                target=procs.stop_tree, args=(root,), kwargs={"others": others, "grace_int": 1.0}, name="stop-lost"
            ).start()

    def _acted(self, r: TaskRecord) -> bool:
        """Whether the run under ``r``'s lease may have had effects: a tool call in the record, or a tool call or
        a final result in its transcript since the lease was granted (the record's progress lags it by up to
        a flush)."""
        if r.progress.tool_calls:
            return True
        seen = Progress()
        buf = b""
        try:
            with open(self.path(r.task_id, "stdout.jsonl"), "rb") as f:
                f.seek(r.lease.transcript_offset if r.lease else 0)
                while chunk := f.read(1 << 20):
                    events, buf = split_lines(buf + chunk)
                    for ev in events:
                        apply_event(seen, ev)
                        if seen.tool_calls or ev.get("type") == "result":
                            return True
        except FileNotFoundError:
            pass
        return False

    def worker_lost(self, r: TaskRecord, reason: str, *, wait: bool = False) -> TaskRecord:
        """The one place for "the worker is gone". First the record (under the task's lock): the lease is
        dropped, so the lost worker's writes are refused from here on, and the task goes back to the queue as
        a new attempt when its run had no effect (no tool call, no result) and attempts remain; else it ends
        ``failed`` ("worker lost"), or ``cancelled`` if a cancel was asked for. Then its processes (on this
        host) are stopped, as found before the task could be claimed again."""
        lease = r.lease
        doomed: list = []

        def fn(cur: TaskRecord) -> TaskRecord | None:
            if cur.status != TaskStatus.RUNNING or (lease is not None and not lease.same(cur.lease)):
                return None  # someone else dealt with it
            if cur.lease is not None and self.lease_alive(cur.lease):
                return None  # renewed since ``r`` was read
            doomed.append(self._doomed(cur))
            return lost_update(cur, reason, acted=cur.runner != "agent" and self._acted(cur))

        try:
            new = self.update(r.task_id, fn)
        except (TaskNotFoundError, CorruptRecordError):
            return r
        if not doomed:
            return new
        if new.status == TaskStatus.QUEUED:
            _unlink(self.task_dir(r.task_id) / "cancel")
            self.append_event(r.task_id, "requeued", reason=reason, attempt=len(new.attempts) + 1)
            self._queue_changed()
        self._stop(doomed[0], wait)
        if new.status.terminal:
            self.resolve_waiting()
        return new

    # -- claim (worker side) -----------------------------------------------------
    def claim(self, worker: WorkerInfo, free_slots: int, fresh: bool = True) -> list[TaskRecord]:
        """Lease up to ``free_slots`` ready tasks to ``worker``: highest priority, then oldest first, only tasks
        whose labels the worker has, and never more running in the store than ``max_concurrent``. Each
        returned record holds the worker's lease. Claims are serialised by the queue lock, and each is a
        compare-and-set on the record (queued and unleased), so exactly one worker gets a task.
        ``fresh=False`` trusts this process's view of the queued tasks (see QueueView)."""
        if free_slots <= 0:
            return []
        out: list[TaskRecord] = []
        with self.locked(self.queue_lock()):
            ids = self.active_ids()
            self._keep_cached(ids)
            view = None if fresh else self._view
            if view is None:
                records = self._read_all(ids)
            else:
                view.keep(set(ids))
                records = self._read_all([t for t in ids if t not in view.queued])
            for t, r in list(records.items()):
                records[t] = self.check_lease(r)
                if records[t].status.terminal:  # (a marker left by a crash between write and unlink)
                    _unlink(self.active_dir / t)
            records.update(self.resolve_waiting(records))
            if view is None:
                view = self._view = QueueView(records)
            else:
                for r in records.values():
                    view.note(r)
            running = sum(r.status == TaskStatus.RUNNING and r.runner == "claude" for r in records.values())
            free = min(free_slots, self.max_concurrent - running)
            tried: set[str] = set()
            labels = set(worker.labels)
            while free > 0:
                batch = view.first(free, skip=tried)
                if not batch:
                    break
                for t in batch:
                    tried.add(t)
                    r = self._peek(t)
                    if r is None or not set(r.labels) <= labels:
                        continue
                    rec = self._take(t, worker)
                    if rec is not None:
                        out.append(rec)
                        view.taken(t)
                        free -= 1
                        continue
                    r = self._peek(t)  # refused: cancelled, or taken by a claimer that skipped the lock
                    if r is None:
                        view.queued.discard(t)
                        continue
                    view.note(r)
                    if r.status == TaskStatus.RUNNING and r.runner == "claude":
                        free -= 1
        return out

    def _peek(self, task_id: str) -> TaskRecord | None:
        try:
            return self.read_cached(task_id, copy=False)
        except (TaskNotFoundError, CorruptRecordError):
            return None

    def _keep_cached(self, task_ids: list[str]) -> None:
        """Forget cached records other than these (a long-lived claimer would otherwise keep every task)."""
        if len(self._cache) > len(task_ids):
            keep = set(task_ids)
            for t in [t for t in list(self._cache) if t not in keep]:  # (supervisor threads write to it)
                self._cache.pop(t, None)

    def _lease_task(self, task_id: str, runner: str, make_lease: Callable[[TaskRecord], Lease]) -> TaskRecord | None:
        """The compare-and-set of a claim: a ready task of ``runner`` becomes running under a new lease (one more
        claim: the epoch that fences the previous holder's writes). None if it was not ready any more."""
        taken: list[TaskRecord] = []

        def fn(r: TaskRecord) -> TaskRecord | None:
            if not ready(r) or r.runner != runner:
                return None
            lease = make_lease(r)
            update = {
                "status": TaskStatus.RUNNING,
                "started_at": lease.acquired_at,
                "epoch": lease.epoch,
                "lease": lease,
            }
            taken.append(r.model_copy(update=update))
            return taken[0]

        try:
            self.update(task_id, fn)
        except (TaskNotFoundError, CorruptRecordError):
            return None
        return taken[0] if taken else None

    def _take(self, task_id: str, worker: WorkerInfo) -> TaskRecord | None:
        def lease(r: TaskRecord) -> Lease:
            try:
                offset = os.stat(self.path(task_id, "stdout.jsonl")).st_size
            except FileNotFoundError:
                offset = 0
            return Lease(task_id=task_id, worker=worker.worker_id, epoch=r.epoch + 1, host=worker.host,
                         pid=worker.proc.pid, transcript_offset=offset)  # fmt: skip

        return self._lease_task(task_id, "claude", lease)

    def resolve_waiting(self, records: dict[str, TaskRecord] | None = None) -> dict[str, TaskRecord]:
        """Move waiting tasks whose dependencies all completed to queued; skip those with one that did not
        (cascading). Runs when a task ends (and in every claim); returns the records it changed."""
        ids = [e.name for e in os.scandir(self.waiting_dir) if TASK_ID_RE.fullmatch(e.name)]
        if not ids:
            return {}
        known = dict(records or {})
        changed: dict[str, TaskRecord] = {}
        again = True
        while again:
            again = False
            for t in ids:
                r = known.get(t) or self._peek(t)
                if r is None or r.status != TaskStatus.WAITING:
                    if r is not None and r.status != TaskStatus.WAITING:
                        _unlink(self.waiting_dir / t)
                    continue
                verdict, reason = TaskStatus.QUEUED, None
                for dep in r.depends_on:
                    d = known.get(dep) or self._peek(dep)
                    if d is None:
                        verdict, reason = TaskStatus.SKIPPED, f"dependency {dep} was deleted or is unreadable"
                        break
                    if d.status in DEP_FAILED:
                        verdict, reason = TaskStatus.SKIPPED, f"dependency {dep} ended {d.status.value}"
                        break
                    if d.status != TaskStatus.COMPLETED:
                        verdict = None
                if verdict is None:
                    continue
                try:
                    new = self.transition(t, verdict, **({"error": reason} if reason else {}))
                except (TaskNotFoundError, CorruptRecordError):
                    continue
                known[t] = changed[t] = new
                again = again or new.status != r.status
        if any(r.status == TaskStatus.QUEUED for r in changed.values()):
            self._queue_changed()
        return changed

    # -- fenced writes (worker side) --------------------------------------------
    def _fenced(self, lease: Lease, changes: Callable[[TaskRecord], dict], *, fsync: bool = False) -> TaskRecord:
        def fn(r: TaskRecord) -> TaskRecord:
            if r.status != TaskStatus.RUNNING or not lease.same(r.lease):
                raise LeaseLostError(self._lost_message(lease, r))
            return r.model_copy(update=changes(r))

        try:
            return self.update(lease.task_id, fn, fsync=fsync)
        except (TaskNotFoundError, CorruptRecordError) as e:
            raise LeaseLostError(f"task {lease.task_id}: {e}") from None

    @staticmethod
    def _lost_message(lease: Lease, r: TaskRecord) -> str:
        holder = f"held by worker {r.lease.worker} (epoch {r.lease.epoch})" if r.lease else "held by no worker"
        return (
            f"task {lease.task_id}: the lease of worker {lease.worker} (epoch {lease.epoch}) is no longer valid: "
            f"the task is {r.status.value}, {holder}"
        )

    def holds(self, lease: Lease) -> bool:
        """Whether ``lease`` is still the task's lease (a cheap read, no lock)."""
        r = self._peek(lease.task_id)
        return r is not None and r.status == TaskStatus.RUNNING and lease.same(r.lease)

    def renew(self, lease: Lease) -> None:
        """The heartbeat for one lease: raises LeaseLostError if it is no longer the task's."""
        self.heartbeat(lease.worker)
        if not self.holds(lease):
            r = self._peek(lease.task_id)
            raise LeaseLostError(self._lost_message(lease, r) if r else f"task {lease.task_id} is gone")

    def event(self, lease: Lease, kind: str, **data) -> None:
        """Append to the task's event log, if ``lease`` still holds it. Each line carries the lease's epoch (a
        check without the task's lock: a line may slip in as a lease is lost; its epoch tells it apart)."""
        if not self.holds(lease):
            raise LeaseLostError(f"task {lease.task_id}: the lease of worker {lease.worker} is no longer valid")
        self.append_event(lease.task_id, kind, epoch=lease.epoch, **data)

    def progress(self, lease: Lease, **fields) -> TaskRecord:
        """Record live progress (and claude's pid, the session id) under ``lease``."""
        return self._fenced(lease, lambda r: fields)

    def finish(self, lease: Lease, status: TaskStatus, result_text: str | None = None, **fields) -> TaskRecord:
        """End the task under ``lease``: its result text (whole, in result.txt) and final fields; then release
        or skip the tasks that wait for it."""

        def changes(r: TaskRecord) -> dict:
            if result_text is not None:  # under the task's lock, after the fence: a stale worker never writes it
                atomic_write(self.path(lease.task_id, "result.txt"), result_text.encode("utf-8", "surrogatepass"))
            return {"status": status, **fields}

        new = self._fenced(lease, changes, fsync=True)
        self.resolve_waiting()
        return new

    # -- agents: a task board ----------------------------------------------------
    def _queue_changed(self) -> None:
        """Tell claimers that wait (claim_task's wait_seconds watches activity_stamp) a task may be ready."""
        try:
            os.utime(self.active_dir)
        except OSError:
            pass

    def claim_agent(
        self, claimer: str, labels: list[str], group: str | None, lease_seconds: float
    ) -> tuple[TaskRecord, str] | None:
        """Lease the highest-priority, oldest ready agent task ``claimer`` may take (it has all the task's
        labels; of ``group`` if given) for ``lease_seconds``. Returns the record and the lease token (only its
        SHA-256 is stored), or None. Serialised by the queue lock and a compare-and-set on the record, like a
        worker's claim: exactly one claimer gets a task. Agent tasks do not count against the global cap."""
        mine = set(labels)
        with self.locked(self.queue_lock()):
            records = self._read_all(self.active_ids())
            for t, r in list(records.items()):
                if r.runner == "agent" and r.status == TaskStatus.RUNNING:
                    records[t] = self.check_lease(r)
            records.update(self.resolve_waiting(records))
            candidates = sorted(
                (
                    r
                    for r in records.values()
                    if ready(r)
                    and r.runner == "agent"
                    and set(r.labels) <= mine
                    and (group is None or r.group == group)
                ),
                key=queue_order,
            )
            for r in candidates:
                token = secrets.token_urlsafe(24)
                got = self._take_agent(r.task_id, claimer, lease_seconds, token)
                if got is not None:
                    return got, token
        return None

    def sweep_agent_leases(self) -> int:
        """Hand running agent tasks whose lease expired to ``worker_lost`` (requeue or fail; dependents follow).
        Readers and claims do it for the tasks they look at; servers do it once a second for the rest."""
        n = 0
        for t in self.active_ids():
            r = self._peek(t)
            if r is not None and r.runner == "agent" and r.status == TaskStatus.RUNNING and r.lease is not None:
                if not self.lease_alive(r.lease):
                    self.check_lease(r)
                    n += 1
        return n

    def has_ready_agent_task(self, labels: list[str], group: str | None) -> bool:
        """Whether a claim_agent could find something (read without the queue lock: a waiting claimer's cheap
        look before it takes the lock)."""
        mine = set(labels)
        for t in self.active_ids():
            r = self._peek(t)
            if r is None or r.runner != "agent":
                continue
            if r.status == TaskStatus.RUNNING and r.lease is not None and not self.lease_alive(r.lease):
                return True  # an expired lease: the claim requeues it
            if r.status == TaskStatus.WAITING:  # its dependencies all ended: the claim resolves it
                deps = [self._peek(d) for d in r.depends_on]
                if all(d is None or d.status.terminal for d in deps):
                    return True
                continue
            if ready(r) and set(r.labels) <= mine and (group is None or r.group == group):
                return True
        return False

    def _take_agent(self, task_id: str, claimer: str, lease_seconds: float, token: str) -> TaskRecord | None:
        def lease(r: TaskRecord) -> Lease:
            now = utcnow()
            return Lease(task_id=task_id, worker=claimer, epoch=r.epoch + 1, acquired_at=now,
                         expires_at=now + timedelta(seconds=lease_seconds), lease_seconds=lease_seconds,
                         token_sha256=hashlib.sha256(token.encode()).hexdigest())  # fmt: skip

        return self._lease_task(task_id, "agent", lease)

    def _agent_op(
        self, task_id: str, token: str, changes: Callable[[TaskRecord], dict], *, fsync: bool = False
    ) -> TaskRecord:
        """Change an agent task under its lease: refused (nothing changed) for a task that is not an agent
        task, a lease that is not the task's (another claimer's, an earlier one's), or one that expired."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        expired: list[TaskRecord] = []

        def fn(r: TaskRecord) -> TaskRecord:
            lease = check_agent_lease(r, task_id, digest)
            if not self.lease_alive(lease):
                expired.append(r)
                raise LeaseLostError(
                    f"task {task_id}: the lease expired at {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC (renew_task "
                    "keeps it); the task went back to the queue or failed: claim_task again"
                )
            return r.model_copy(update=changes(r))

        try:
            return self.update(validate_task_id(task_id), fn, fsync=fsync)
        finally:
            if expired:  # (outside the task's lock) requeue or fail it now
                self.check_lease(expired[0])

    def renew_agent(self, task_id: str, token: str, note: str | None = None) -> TaskRecord:
        def changes(r: TaskRecord) -> dict:
            return agent_renewed(r, note)

        r = self._agent_op(task_id, token, changes)
        self.append_event(task_id, "renewed", by=r.lease.worker, until=r.lease.expires_at, note=note)
        return r

    def complete_agent(self, task_id: str, token: str, result: str, preview_chars: int) -> TaskRecord:
        def changes(r: TaskRecord) -> dict:
            atomic_write(self.path(task_id, "result.txt"), result.encode("utf-8", "surrogatepass"))
            return agent_completed(r, result, preview_chars)

        r = self._agent_op(task_id, token, changes, fsync=True)
        self.resolve_waiting()
        return r

    def fail_agent(self, task_id: str, token: str, error: str, retry: bool) -> TaskRecord:
        def changes(r: TaskRecord) -> dict:
            return agent_failed(r, error, retry)

        r = self._agent_op(task_id, token, changes, fsync=True)
        if r.status == TaskStatus.QUEUED:
            self.append_event(task_id, "requeued", reason=f"failed: {error[:500]}", attempt=len(r.attempts) + 1)
            self._queue_changed()
        else:
            self.resolve_waiting()
        return r

    def release_agent(self, task_id: str, token: str) -> TaskRecord:
        """Back to the queue, not counted as an attempt."""
        by: list[str] = []

        def changes(r: TaskRecord) -> dict:
            by.append(r.lease.worker)
            return {"status": TaskStatus.QUEUED, "lease": None, "started_at": None}

        r = self._agent_op(task_id, token, changes)
        self.append_event(task_id, "released", by=by[0] if by else None)
        self._queue_changed()
        return r

    # -- group notes ---------------------------------------------------------------
    def _group_dir(self, group: str) -> Path:
        try:
            check_group(group)
        except ValueError as e:
            raise InvalidOptionsError(str(e)) from None
        return ensure_private_dir(ensure_private_dir(self.root / "groups") / group)

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> int:
        """Append a note to the group's notes; returns its position. A note with a ``key`` replaces, for readers,
        the earlier notes of that key."""
        d = self._group_dir(group)
        with self.locked(self._lock_for(str(d / "lock"), LOCK_TIMEOUT)):
            path = d / "notes.jsonl"
            try:
                with open(path, "rb") as f:
                    seq = sum(1 for _ in f)
            except FileNotFoundError:
                seq = 0
            line = {"seq": seq, "ts": time.time(), "key": key, "by": by, "text": text}
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                _write_all(fd, (json.dumps(line) + "\n").encode("utf-8", "surrogatepass"))
            finally:
                os.close(fd)
        return seq

    def iter_notes(self, group: str, since: int = 0) -> Iterator[dict]:
        """The group's notes from position ``since``, less those a later note of the same key replaced."""
        path = self._group_dir(group) / "notes.jsonl"
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            return
        notes = []
        for raw in lines:
            try:
                n = json.loads(raw)
            except ValueError:
                continue
            if isinstance(n, dict) and isinstance(n.get("seq"), int):
                notes.append(n)
        last = {n["key"]: n["seq"] for n in notes if n.get("key")}
        for n in notes:
            if n["seq"] >= since and (not n.get("key") or last[n["key"]] == n["seq"]):
                yield n

    # -- the store's worker (started on demand) --------------------------------
    @property
    def socket_path(self) -> Path:
        return self.root / "worker.sock"

    def worker_known(self) -> bool:
        """True if this process already found a worker of its own version behind the store's socket, and that
        worker still lives (a dying one may still take a connection, and the nudge would be lost)."""
        known = self._known_worker
        try:
            return known is not None and known[0] == os.stat(self.socket_path).st_ino and procs.alive(known[1])
        except OSError:
            return False

    def _remember_worker(self, hello: dict) -> None:
        try:
            self._known_worker = (os.stat(self.socket_path).st_ino, procs.ref_of(int(hello["pid"])))
        except (OSError, KeyError, ValueError, psutil.Error):
            self._known_worker = None

    def nudge(self) -> None:
        """Have the store's worker look at the queue now; start one if none of this code's identity listens.
        Raises WorkerUnavailableError if none could be started (queued tasks stay queued)."""
        if self.worker_known() and control.send(self.socket_path, {"op": "nudge"}):
            return
        self._known_worker = None
        self.ensure_worker()
        if not control.send(self.socket_path, {"op": "nudge"}):
            self._known_worker = None

    def ensure_worker(self) -> None:
        with self._spawn_lock:
            if self.worker_known():
                return
            try:
                with self.locked(FileLock(str(self.root / "worker.lock")), timeout=30):
                    self._ensure_worker_locked()
            except Timeout:
                raise WorkerUnavailableError(
                    f"could not start the store's worker: {self.root / 'worker.lock'} stayed locked for 30 s"
                ) from None

    def _ensure_worker_locked(self) -> None:
        control.send(self.root / "launcher.sock", {"op": "quit"})  # cc-tasks 0.2's launcher: drain and go
        try:
            hello = control.request(self.socket_path, {"op": "hello"})
            if control.same_version(hello):
                self._remember_worker(hello)
                if self._known_worker is not None:
                    return
            control.request(self.socket_path, {"op": "quit"})  # another version of cc-tasks: replace it
        except (OSError, ValueError):
            pass
        _unlink(self.socket_path)
        self.reap()
        # not part of any task: a server inside a task must not pass the task's id on (see procs.task_orphans)
        env = {k: v for k, v in os.environ.items() if k != "CC_TASKS_TASK_ID"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (control.PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "cc_tasks.worker", "--store", str(self.root), "--on-demand"]
        try:
            with open(self.root / "worker.log", "ab") as out:
                p = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    cwd=str(self.root), close_fds=True, start_new_session=True,
                )  # fmt: skip
        except OSError as e:
            raise WorkerUnavailableError(f"could not start the store's worker ({' '.join(argv)}): {e}") from None
        with self._spawned_lock:
            self._spawned.append(p)
        deadline = time.monotonic() + WORKER_START_WAIT
        while time.monotonic() < deadline:
            if p.poll() is not None:
                break
            try:
                hello = control.request(self.socket_path, {"op": "hello"})
                if control.same_version(hello):
                    self._remember_worker(hello)
                    return
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        raise WorkerUnavailableError(
            f"the store's worker did not start (exit code {p.poll()}); see {self.root / 'worker.log'}"
        )

    def worker_hello(self) -> dict | None:
        try:
            return control.request(self.socket_path, {"op": "hello"})
        except (OSError, ValueError):
            return None

    def stop_worker(self) -> bool:
        """Ask the store's worker to take no more work and exit once its tasks have ended. True if one ran."""
        try:
            control.request(self.socket_path, {"op": "quit"})
            return True
        except (OSError, ValueError):
            return False

    def reap(self, wait: float = 0.0) -> None:
        """Collect workers this process started that have exited (only those: never waitpid(-1))."""
        deadline = time.monotonic() + wait
        for p in list(self._spawned):
            if wait > 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.0, deadline - time.monotonic()))
        # a SIGCHLD handler may run this in the middle of another call: never wait for the lock, the next
        # call collects what this one skips
        if self._spawned_lock.acquire(blocking=False):
            try:
                self._spawned = [p for p in self._spawned if p.poll() is None]
            finally:
                self._spawned_lock.release()
