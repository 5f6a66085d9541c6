"""The local repo: ``repo.Repo`` over files in one private folder, shared by every process of the user on this
machine. Only I/O lives here (no task policy: that is the engine's).

Layout (under the root): ``tasks/<task_id>/`` holds record.json (the TaskRecord, replaced atomically; its bytes are
its revision), request.json (the TaskRequest: options, cwd, claude binary, the submitter's environment), prompt.txt,
stdout.jsonl and stderr.log (claude's stdin, from the start for an agent task; its stream-json transcript; its
stderr), result.<epoch>.txt (a claim's whole final result; result.txt: cc-tasks <= 0.4), events.jsonl (append-only,
``ev.<task_id>``), the marker ``cancel`` (a cancel was signalled) and the filelocks ``lock`` (compare-and-sets of
record.json) and ``events.lock`` (numbered appends). ``active/<task_id>`` and ``waiting/<task_id>`` are the index
markers (not finished; waiting for its dependencies); ``workers/<worker_id>.json`` a registered WorkerInfo and
``.beat`` its heartbeat (this host's monotonic clock, written in place); ``groups/<group>/notes.jsonl`` a group's
notes (``notes.<group>``, numbered under its ``lock``); ``meta/<key>`` small keyed values (config,
remarks.<task_id>) set under meta/.lock; ``worker.sock`` the store's worker's control socket (control.py,
launcher.py); ``queue.lock`` serialises claims.

The mtime of ``active/`` is the activity stamp: touched when a task is added, removed or changes status, and on
every nudge. The active marker is made before a task's folder appears and removed after its record is final, so
the index may hold a little more than the truth (``unfinished`` repairs what a crash left behind), never less."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from . import control, procs
from .checks import ensure_private_dir
from .errors import CorruptRecordError, InvalidOptionsError, TaskNotFoundError
from .ids import HOST, TASK_ID_RE, WORKER_ID_RE, atomic_write, validate_task_id, write_all
from .models import TaskRecord, TaskRequest, WorkerInfo, check_group
from .repo import INDEXES, SOURCES, WORKSPACE_FILES, Capabilities, Liveness, Versioned, each, parse_request
from .states import TaskStatus

log = logging.getLogger("cc_tasks")

LOCK_TIMEOUT = 30.0
POLL = 0.002
META_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What changes whenever a record is replaced (atomic_write: a new inode) or rewritten."""
    return st.st_ino, st.st_mtime_ns, st.st_size


def _write(path: Path, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


class FileRepo:
    """Records from ``get``, ``get_many`` and ``unfinished`` are shared by the parse cache: never change them."""

    def __init__(self, root: Path | str, *, lease_seconds: float):
        self.root = ensure_private_dir(Path(root))
        self.tasks_dir, self.active_dir, self.waiting_dir, self.workers_dir = (
            ensure_private_dir(self.root / name) for name in ("tasks", "active", "waiting", "workers")
        )
        self.caps = Capabilities(
            kind="local", remote=False, lost_claims=False, worker_home=self.root, log_dir=self.root,
            lease_seconds=lease_seconds,
        )  # fmt: skip
        self._queue_lock_path = self.root / "queue.lock"
        self._queue_lock_path.touch(0o600)
        self._cache: dict[str, tuple[bytes, TaskRecord]] = {}
        #: The stamp of each record file as last read here: a skipped one is read again only if it changed.
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._locks: dict[str, FileLock] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._handlers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"FileRepo({str(self.root)!r})"

    @property
    def address(self) -> str:
        return str(self.root)

    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / validate_task_id(task_id)

    def path(self, task_id: str, name: str) -> Path:
        return self.task_dir(task_id) / name

    def _locked(self, path: Path, timeout: float = LOCK_TIMEOUT) -> contextlib.AbstractContextManager:
        """Hold the lock file ``path``, polling briskly; one FileLock per file and process (making one costs more)."""
        lock = self._locks.get(str(path))
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks.clear()
            lock = self._locks[str(path)] = FileLock(str(path), timeout=timeout)
        return lock.acquire(timeout=timeout, poll_interval=POLL)

    @contextlib.contextmanager
    def _task_locked(self, task_id: str, name: str) -> Iterator[Path]:
        """Hold the task's lock file ``name``; TaskNotFoundError if the task is not (or no longer) there."""
        d = self.task_dir(task_id)
        if not (d / "record.json").is_file():
            raise TaskNotFoundError(self._not_found(task_id))
        with self._locked(d / name):
            if not (d / "record.json").is_file():  # deleted while we waited: filelock re-made the folder
                with contextlib.suppress(OSError):
                    os.unlink(d / name)
                    os.rmdir(d)
                raise TaskNotFoundError(self._not_found(task_id))
            yield d

    def _not_found(self, task_id: str) -> str:
        return f"no task {task_id} in this store ({self.root}); list_active_tasks shows the known ones"

    def _touch_activity(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.active_dir)

    def create(self, record: TaskRecord, request: TaskRequest) -> None:
        """Write the task's folder completely, then make it appear at once (rename)."""
        task_id = validate_task_id(record.task_id)
        final = self.task_dir(task_id)
        if final.exists():
            raise FileExistsError(f"task {task_id} already exists in {self.root}")
        files = {
            "request.json": request.model_dump_json().encode("utf-8", "surrogatepass"),
            "record.json": record.model_dump_json().encode(),
            "events.jsonl": b"",
        }
        if record.runner == "agent":
            files["prompt.txt"] = request.options.prompt.encode("utf-8", "surrogatepass")
        tmp = self.tasks_dir / f".new-{task_id}"
        os.mkdir(tmp, 0o700)
        try:  # nothing in tmp is visible before the rename, so plain writes are enough here
            for name, data in files.items():
                _write(tmp / name, data, os.O_EXCL)
            (self.active_dir / task_id).touch(0o600)
            if record.status == TaskStatus.WAITING:
                (self.waiting_dir / task_id).touch(0o600)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._unindex(task_id)
            raise
        self._touch_activity()

    def _unindex(self, task_id: str, status: TaskStatus | None = None) -> None:
        """Remove the index markers that ``status`` (None: the task is gone) leaves out."""
        if status != TaskStatus.WAITING:
            (self.waiting_dir / task_id).unlink(missing_ok=True)
        if status is None or status.terminal:
            (self.active_dir / task_id).unlink(missing_ok=True)

    def _parsed(self, task_id: str, data: bytes) -> TaskRecord:
        """The record of these bytes, parsed once per change (the cached record is shared: never changed)."""
        hit = self._cache.get(task_id)
        if hit is not None and hit[0] == data:
            return hit[1]
        try:
            record = TaskRecord.model_validate_json(data)
        except ValueError as e:
            first = str(e).strip().splitlines()
            raise CorruptRecordError(
                f"task {task_id}: its record {self.path(task_id, 'record.json')} is unreadable "
                f"({first[0] if first else 'invalid'}); cleanup_task deletes the task"
            ) from None
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[task_id] = (data, record)
        return record

    def get(self, task_id: str) -> Versioned:
        try:
            fd = os.open(self.path(task_id, "record.json"), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(task_id, None)
            raise TaskNotFoundError(self._not_found(task_id)) from None
        try:
            stamp = _stamp(os.fstat(fd))
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
        record = self._parsed(task_id, data)
        self._stamps[task_id] = stamp
        return data, record

    def get_many(self, ids: list[str]) -> dict[str, Versioned]:
        return each(self.get, ids)

    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]:
        """The active ids, less missing and final tasks (a crash's leftover markers are removed), and the records of
        those not in ``skip`` (a corrupt one: none)."""
        waiting = set(self.ids("waiting"))
        ids: list[str] = []
        records: dict[str, Versioned] = {}
        for t in self.ids("active"):
            if t in skip:  # (a view's queued task: read again only if its file changed since, e.g. claimed elsewhere)
                try:
                    changed = _stamp(os.stat(self.path(t, "record.json"))) != self._stamps.get(t)
                except OSError:
                    changed = True
            if t not in skip or changed:
                try:
                    rev, r = self.get(t)
                except TaskNotFoundError:
                    continue
                except CorruptRecordError:
                    pass
                else:
                    if r.status.terminal or (t in waiting and r.status != TaskStatus.WAITING):
                        self._unindex(t, r.status)
                    if r.status.terminal:
                        continue
                    records[t] = (rev, r)
            ids.append(t)
        if len(self._cache) > len(ids):  # forget the others (a long-lived claimer would keep every task)
            for t in set(self._cache).difference(ids):  # (other threads write to it)
                self._cache.pop(t, None)
                self._stamps.pop(t, None)
        return ids, records

    def ids(self, index: str = "all") -> list[str]:
        if index not in INDEXES:
            raise ValueError(f"unknown index {index!r} (one of {', '.join(INDEXES)})")
        d = {"all": self.tasks_dir, "active": self.active_dir, "waiting": self.waiting_dir}[index]
        return sorted((e.name for e in os.scandir(d) if TASK_ID_RE.fullmatch(e.name)), reverse=True)

    def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None:
        if record.task_id != task_id:
            raise ValueError(f"cas of task {task_id} with the record of task {record.task_id}")
        data = record.model_dump_json().encode()
        try:
            with self._task_locked(task_id, "lock") as d:
                current = _read(d / "record.json")
                if current is None or current != revision:
                    return None
                old_status = None
                with contextlib.suppress(CorruptRecordError):
                    old_status = self._parsed(task_id, current).status  # (cached: the caller's get parsed it)
                atomic_write(d / "record.json", data, fsync=record.status.terminal)
                self._cache[task_id] = (data, record.model_copy())
        except (TaskNotFoundError, FileNotFoundError):  # (deleted before or while we wrote)
            return None
        if record.status != old_status:
            self._unindex(task_id, record.status)
            self._touch_activity()
        return data

    def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]:
        out: list[object | None] = []
        for r, rev in writes:
            try:
                out.append(self.cas(r.task_id, r, rev))
            except OSError as e:  # (one failed write: the others stand)
                log.warning("task %s: write failed: %s", r.task_id, e)
                out.append(None)
        return out

    def request(self, task_id: str) -> TaskRequest:
        data = _read(self.path(task_id, "request.json"))
        if data is None:
            raise TaskNotFoundError(f"task {task_id} has no request.json (deleted, or not a task)")
        return parse_request(task_id, data, "request.json")

    def delete(self, task_id: str) -> None:
        d = self.task_dir(task_id)
        if not d.exists():
            raise TaskNotFoundError(self._not_found(task_id))
        self._unindex(task_id)
        self._locks.pop(str(d / "lock"), None)
        self._locks.pop(str(d / "events.lock"), None)
        self._cache.pop(task_id, None)
        trash = self.tasks_dir / f".del-{task_id}-{secrets.token_hex(3)}"
        os.rename(d, trash)  # disappears at once for every reader
        shutil.rmtree(trash, ignore_errors=True)
        self._touch_activity()
        remarks = self._meta_path(f"remarks.{task_id}")
        if remarks.exists():
            with self._locked(self._meta_dir() / ".lock"):
                remarks.unlink(missing_ok=True)

    def workspace(self, task_id: str) -> Path:
        return self.task_dir(task_id)

    def _output_file(self, task_id: str, epoch: int, source: str) -> Path:
        if source not in SOURCES:
            raise ValueError(f"unknown output source {source!r} (one of {', '.join(SOURCES)})")
        name = f"result.{int(epoch)}.txt" if source == "result" else WORKSPACE_FILES[source]
        return self.path(task_id, name)

    def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None:
        target = self._output_file(task_id, epoch, source)
        if data is None:
            target.unlink(missing_ok=True)
            return
        if isinstance(data, Path):
            if Path(os.path.abspath(data)) == target:
                return  # the workspace is the storage: the supervisor wrote it in place
            data = data.read_bytes()
        atomic_write(target, data, fsync=source == "result")

    def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        target = self._output_file(task_id, epoch, source)
        for path in [target, target.with_name("result.txt")] if source == "result" else [target]:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(min(max(offset, 0), total))
                return f.read(max(limit, 0)), total
        return b"", 0

    def forget_workspace(self, task_id: str) -> None:
        """Nothing to do: the workspace is the storage."""

    def _log_files(self, log: str, create: bool = False) -> tuple[Path, Path]:
        kind, _, name = log.partition(".")
        if kind == "ev":
            return self.path(name, "events.jsonl"), self.path(name, "events.lock")
        if kind == "notes":
            try:
                check_group(name)
            except ValueError as e:
                raise InvalidOptionsError(str(e)) from None
            d = self.root / "groups" / name
            if create:
                ensure_private_dir(ensure_private_dir(d.parent) / name)
            return d / "notes.jsonl", d / "lock"
        raise ValueError(f"unknown log {log[:80]!r} (ev.<task_id> or notes.<group>)")

    @staticmethod
    def _append_line(path: Path, entry: dict, sep: bytes = b"") -> None:
        _write(path, sep + (json.dumps(entry, default=str) + "\n").encode(), os.O_APPEND)

    def append(self, log: str, entry: dict) -> None:
        path, _ = self._log_files(log, create=True)
        with contextlib.suppress(FileNotFoundError):  # (a task's events: the task was deleted meanwhile)
            self._append_line(path, entry)

    def append_numbered(self, log: str, make: Callable[[int], dict]) -> int:
        path, lock = self._log_files(log, create=True)
        # (a task's events: TaskNotFoundError if the task is gone)
        with self._task_locked(log[3:], lock.name) if log.startswith("ev.") else self._locked(lock):
            data = _read(path) or b""
            torn = bool(data) and not data.endswith(b"\n")
            n = data.count(b"\n") + torn
            # a line cut short by a crash stays line n-1 (unreadable); the new one starts on a line of its own
            self._append_line(path, make(n), b"\n" if torn else b"")
        return n

    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]:
        path, _ = self._log_files(log)
        out = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), open(path, "rb") as f:
            for i, line in enumerate(f):
                if i < since:
                    continue
                entry = None
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                out.append((i, entry if isinstance(entry, dict) else {"kind": "unreadable"}))
        return out

    def _worker_file(self, worker_id: str) -> Path:
        if not isinstance(worker_id, str) or not WORKER_ID_RE.fullmatch(worker_id):
            raise ValueError(f"invalid worker id {str(worker_id)[:80]!r}")
        return self.workers_dir / f"{worker_id}.json"

    def put_worker(self, info: WorkerInfo) -> None:
        atomic_write(self._worker_file(info.worker_id), info.model_dump_json().encode(), fsync=False)
        self._workers[info.worker_id] = info
        self.beat(info.worker_id)

    def beat(self, worker_id: str) -> bool:
        """Write this host's monotonic clock in place into the beat file; False if the worker is not registered."""
        path = self._worker_file(worker_id)
        if not path.exists():
            return False
        _write(path.with_suffix(".beat"), f"{time.monotonic():20.3f}".encode())
        return True

    def remove_worker(self, worker_id: str) -> None:
        path = self._worker_file(worker_id)
        path.unlink(missing_ok=True)
        path.with_suffix(".beat").unlink(missing_ok=True)
        self._workers.pop(worker_id, None)

    def _worker_info(self, worker_id: str) -> WorkerInfo | None:
        path = self._worker_file(worker_id)
        info = self._workers.get(worker_id)
        if info is None:
            try:
                info = WorkerInfo.model_validate_json(path.read_bytes())
            except (OSError, ValueError):
                return None
            if len(self._workers) > 1000:
                self._workers.clear()
            self._workers[worker_id] = info
        return info

    def workers(self) -> list[WorkerInfo]:
        ids = [e.name.removesuffix(".json") for e in os.scandir(self.workers_dir) if e.name.endswith(".json")]
        alive = [w for w in ids if WORKER_ID_RE.fullmatch(w) and self.liveness(w) == Liveness.ALIVE]
        return [info for info in map(self._worker_info, alive) if info is not None]

    def liveness(self, worker_id: str) -> Liveness:
        """ALIVE while registered with a fresh beat and its process alive on this host, else GONE (never UNKNOWN)."""
        info = self._worker_info(worker_id)
        path = self._worker_file(worker_id)
        try:  # (the beat: this host's monotonic clock)
            with open(path.with_suffix(".beat"), "rb") as f:
                fresh = time.monotonic() - float(f.read(64)) <= self.caps.lease_seconds
        except (OSError, ValueError):
            fresh = False
        alive = info is not None and info.host == HOST and path.exists() and fresh and procs.alive(info.proc)
        return Liveness.ALIVE if alive else Liveness.GONE

    @contextlib.contextmanager
    def claim_lock(self) -> Iterator[Callable[[], bool]]:
        """The queue lock (filelock.Timeout after 60 s). A holder never loses it while it lives."""
        with self._locked(self._queue_lock_path, 60.0):
            yield lambda: True

    def signal(self, kind: str, task_id: str | None = None) -> None:
        if kind == "nudge":
            self._touch_activity()
        elif kind == "cancel":
            with contextlib.suppress(FileNotFoundError):  # (the task was deleted)
                self.path(task_id, "cancel").touch(0o600)
        elif kind == "uncancel":
            self.path(task_id, "cancel").unlink(missing_ok=True)
            return
        else:
            raise ValueError(f"unknown signal {kind!r} (nudge, cancel or uncancel)")
        for handler in list(self._handlers):
            handler()
        if kind == "nudge" and (sock := self.root / "worker.sock").exists():
            control.send(sock, {"op": "nudge"})  # (best effort: a worker that does not listen polls anyway)

    def subscribe(self, handler: Callable[[], None]) -> None:
        self._handlers.append(handler)

    def cancel_signalled(self, task_id: str) -> bool:
        return self.path(task_id, "cancel").exists()

    def activity(self) -> object:
        st = os.stat(self.active_dir)
        return st.st_mtime_ns, st.st_ino

    def _meta_dir(self) -> Path:
        return ensure_private_dir(self.root / "meta")

    def _meta_path(self, key: str) -> Path:
        if not isinstance(key, str) or not META_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid meta key {str(key)[:80]!r}")
        return self.root / "meta" / key

    def get_meta(self, key: str) -> tuple[object, bytes] | None:
        data = _read(self._meta_path(key))
        return None if data is None else (data, data)

    def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool:
        path = self._meta_path(key)
        with self._locked(self._meta_dir() / ".lock"):
            if _read(path) != revision:
                return False
            if value is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, value)
        return True

    def usable(self) -> bool:
        return self.active_dir.is_dir() and self.tasks_dir.is_dir()

    def close(self) -> None:
        pass
