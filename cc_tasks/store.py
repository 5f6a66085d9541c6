"""The task store: one folder per task under a private directory, shared by every process of the user.

Layout::

    <root>/tasks/<task_id>/record.json   the TaskRecord, replaced atomically
                           request.json  options, claude argv and cwd, the submitter's environment
                           prompt.txt    claude's standard input (written by the supervisor)
                           stdout.jsonl  claude's stream-json transcript
                           stderr.log    claude's standard error
                           result.txt    the whole final result text
                           events.jsonl  append-only event log
                           lock          filelock serialising updates of record.json
    <root>/active/<task_id>              marker of a task that is not finished (cheap listing)
    <root>/cc_tasks.log                  rotating log
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from .errors import InvalidTaskIdError, TaskNotFoundError, UnsafeStoreError
from .models import TRANSITIONS, TaskRecord, TaskStatus, check_transition, utcnow

TASK_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{3}-[0-9a-f]{8}")
LOCK_TIMEOUT = 30.0
POLL = 0.002


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


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing; refuse it if it is unsafe."""
    path = Path(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStoreError(f"task store {path} is a symlink; refusing it (set CC_TASKS_DIR to a real directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStoreError(f"task store {path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeStoreError(
            f"task store {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "remove it or set CC_TASKS_DIR to a directory of your own"
        )
    if st.st_mode & 0o022:
        raise UnsafeStoreError(
            f"task store {path} is group- or world-writable (mode {oct(st.st_mode & 0o777)}); "
            f"run 'chmod 700 {path}' or set CC_TASKS_DIR elsewhere"
        )
    return path


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


class TaskStore:
    def __init__(self, root: Path):
        self.root = ensure_private_dir(root)
        self.tasks_dir = ensure_private_dir(self.root / "tasks")
        self.active_dir = ensure_private_dir(self.root / "active")
        self._cache: dict[str, tuple[bytes, TaskRecord]] = {}
        self._locks: dict[str, FileLock] = {}
        self._queue_lock_path = self.root / "scheduler.lock"
        self._queue_lock_path.touch(0o600)

    def queue_lock(self) -> FileLock:
        """The store-wide lock of the shared queue (see scheduler.pump)."""
        return self._lock_for(str(self._queue_lock_path), 60.0)

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

    # -- paths ---------------------------------------------------------------
    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / validate_task_id(task_id)

    def path(self, task_id: str, name: str) -> Path:
        return self.task_dir(task_id) / name

    def lock(self, task_id: str) -> FileLock:
        return self._lock_for(str(self.path(task_id, "lock")), LOCK_TIMEOUT)

    # -- create / read -------------------------------------------------------
    def create(self, record: TaskRecord, files: dict[str, bytes]) -> None:
        """Write a new task's folder completely, then make it appear at once (rename)."""
        final = self.task_dir(record.task_id)
        tmp = self.tasks_dir / f".new-{record.task_id}"
        os.mkdir(tmp, 0o700)
        try:
            # nothing in tmp is visible before the rename, so plain writes are enough here
            first_event = _event_line("status", status=record.status.value)
            for name, data in {
                **files,
                "record.json": record.model_dump_json().encode(),
                "events.jsonl": first_event,
            }.items():
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            (self.active_dir / record.task_id).touch(0o600)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                os.unlink(self.active_dir / record.task_id)
            except FileNotFoundError:
                pass
            raise

    def exists(self, task_id: str) -> bool:
        return (self.task_dir(task_id) / "record.json").is_file()

    def read(self, task_id: str) -> TaskRecord:
        try:
            data = (self.task_dir(task_id) / "record.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise TaskNotFoundError(
                f"no task {task_id} in this store ({self.root}); list_active_tasks shows the known ones"
            ) from None
        return TaskRecord.model_validate_json(data)

    def read_cached(self, task_id: str, copy: bool = True) -> TaskRecord:
        """Like ``read``, but a record whose bytes have not changed since the last call is not parsed and
        validated again. Returns a copy the caller may change, or with ``copy=False`` the cached record
        itself, which must not be changed."""
        try:
            data = (self.task_dir(task_id) / "record.json").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(task_id, None)
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.root})") from None
        hit = self._cache.get(task_id)
        if hit is None or hit[0] != data:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[task_id] = hit = (data, TaskRecord.model_validate_json(data))
        return hit[1].model_copy() if copy else hit[1]

    def peek_cached(self, task_id: str) -> TaskRecord | None:
        """The cached record (not to be changed), without looking at the file; None if not cached."""
        hit = self._cache.get(task_id)
        return hit[1] if hit else None

    def keep_cached(self, task_ids: list[str]) -> None:
        """Forget cached records other than these (a long-lived pumper would otherwise keep every task)."""
        if len(self._cache) > len(task_ids):
            keep = set(task_ids)
            for t in [t for t in list(self._cache) if t not in keep]:  # (supervisor threads write to it)
                self._cache.pop(t, None)

    def write(self, record: TaskRecord, *, fsync: bool = True) -> None:
        data = record.model_dump_json().encode()
        atomic_write(self.task_dir(record.task_id) / "record.json", data, fsync=fsync)
        if record.task_id in self._cache:  # a pumper's cache stays true to its own writes
            self._cache[record.task_id] = (data, record.model_copy())

    # -- update --------------------------------------------------------------
    def update(self, task_id: str, fn: Callable[[TaskRecord], TaskRecord | None], *, fsync: bool = False) -> TaskRecord:
        """Read, change and write the record under the task's lock. ``fn`` returns None for no change."""
        if not self.exists(task_id):
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.root})")
        try:
            with self.locked(self.lock(task_id)):
                try:
                    current = self.read(task_id)
                except TaskNotFoundError:  # deleted while we waited: filelock re-made the folder; undo that
                    self._remove_husk(task_id)
                    raise
                new = fn(current)  # fn returns a changed copy (model_copy(update=...)) or None
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
            if new.status.terminal:
                self._unmark_active(task_id)
            self.append_event(task_id, "status", status=new.status.value, error=new.error)
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

    def _unmark_active(self, task_id: str) -> None:
        try:
            os.unlink(self.active_dir / task_id)
        except FileNotFoundError:
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

    # -- listing -------------------------------------------------------------
    def has_active(self) -> bool:
        return any(TASK_ID_RE.fullmatch(e.name) for e in os.scandir(self.active_dir))

    def active_ids(self) -> list[str]:
        return sorted((e.name for e in os.scandir(self.active_dir) if TASK_ID_RE.fullmatch(e.name)), reverse=True)

    def all_ids(self) -> Iterator[str]:
        """Every task id, newest first (ids sort by creation time)."""
        names = [e.name for e in os.scandir(self.tasks_dir) if TASK_ID_RE.fullmatch(e.name)]
        names.sort(reverse=True)
        return iter(names)

    def unmark_if_finished(self, record: TaskRecord) -> None:
        if record.status.terminal:
            self._unmark_active(record.task_id)

    # -- delete --------------------------------------------------------------
    def delete(self, task_id: str) -> None:
        d = self.task_dir(task_id)
        if not d.exists():
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.root})")
        self._unmark_active(task_id)
        self._locks.pop(str(d / "lock"), None)
        trash = self.tasks_dir / f".del-{task_id}-{secrets.token_hex(3)}"
        os.rename(d, trash)  # disappears at once for every reader
        shutil.rmtree(trash, ignore_errors=True)
