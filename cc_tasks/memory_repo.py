"""An in-memory repo.Repo (as Dramatiq's StubBroker): one process, no files, no server. The engine's policy tests
and its property-based tests run on it in milliseconds; it passes the same contract as the real ones.

Records are stored as JSON (so a caller's change to a record it read never reaches the store); a worker is alive
while ``beat`` was called within the lease on a clock the tests may move (``clock``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import Timeout

from .errors import CorruptRecordError, TaskNotFoundError
from .ids import validate_task_id
from .models import TaskRecord, TaskRequest, WorkerInfo
from .repo import WORKSPACE_FILES, Capabilities, Liveness, Versioned, each
from .states import TaskStatus


class MemoryRepo:
    def __init__(self, *, lease_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.caps = Capabilities(kind="memory", remote=False, lost_claims=False, lease_seconds=lease_seconds)
        self.clock = clock
        self._mu = threading.RLock()
        self._claim = threading.Lock()
        self._records: dict[str, tuple[int, str]] = {}
        self._requests: dict[str, str] = {}
        self._outputs: dict[tuple[str, int, str], bytes] = {}
        self._logs: dict[str, list[str]] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._meta: dict[str, tuple[int, bytes]] = {}
        self._cancels: set[str] = set()
        self._handlers: list[Callable[[], None]] = []
        self._activity = 0
        self._rev = 0
        self._dir = Path(tempfile.mkdtemp(prefix="cc_tasks-memory-"))

    @property
    def address(self) -> str:
        return f"memory:{id(self):x}"

    def _next(self) -> int:
        self._rev += 1
        return self._rev

    # -- records -------------------------------------------------------------------
    def create(self, record: TaskRecord, request: TaskRequest) -> None:
        with self._mu:
            if record.task_id in self._records:
                raise ValueError(f"task {record.task_id} exists")
            self._requests[record.task_id] = request.model_dump_json()
            if record.runner == "agent":
                self._outputs[(record.task_id, 0, "prompt")] = request.options.prompt.encode("utf-8", "surrogatepass")
            self._records[record.task_id] = (self._next(), record.model_dump_json())
            self._activity += 1

    def get(self, task_id: str) -> Versioned:
        with self._mu:
            hit = self._records.get(task_id)
        if hit is None:
            raise TaskNotFoundError(f"no task {task_id} in this store ({self.address})")
        try:
            return hit[0], TaskRecord.model_validate_json(hit[1])
        except ValueError:
            raise CorruptRecordError(f"task {task_id}: its record is unreadable") from None

    def get_many(self, ids: list[str]) -> dict[str, Versioned]:
        return each(self.get, ids)

    def _status(self, t: str) -> TaskStatus:
        return TaskStatus(json.loads(self._records[t][1])["status"])

    def ids(self, index: str = "all") -> list[str]:
        with self._mu:
            ids = list(self._records)
            if index == "active":
                ids = [t for t in ids if not self._status(t).terminal]
            elif index == "waiting":
                ids = [t for t in ids if self._status(t) == TaskStatus.WAITING]
            elif index != "all":
                raise ValueError(f"unknown index {index!r}")
        return sorted(ids, reverse=True)

    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]:
        ids = self.ids("active")  # (``skip`` is only a hint: reading is free here, and a view may be stale)
        return ids, self.get_many(ids)

    def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None:
        with self._mu:
            hit = self._records.get(task_id)
            if hit is None or hit[0] != revision:
                return None
            before = self._status(task_id)
            rev = self._next()
            self._records[task_id] = (rev, record.model_dump_json())
            if record.status != before:
                self._activity += 1
            return rev

    def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]:
        return [self.cas(r.task_id, r, rev) for r, rev in writes]

    def request(self, task_id: str) -> TaskRequest:
        with self._mu:
            raw = self._requests.get(task_id)
        if raw is None:
            raise TaskNotFoundError(f"task {task_id} has no request (deleted, or not a task)")
        return TaskRequest.model_validate_json(raw)

    def delete(self, task_id: str) -> None:
        with self._mu:
            if self._records.pop(task_id, None) is None:
                raise TaskNotFoundError(f"no task {task_id} in this store ({self.address})")
            self._requests.pop(task_id, None)
            for k in [k for k in self._outputs if k[0] == task_id]:
                del self._outputs[k]
            self._logs.pop(f"ev.{task_id}", None)
            self._meta.pop(f"remarks.{task_id}", None)
            self._activity += 1
        shutil.rmtree(self._dir / task_id, ignore_errors=True)

    # -- outputs ---------------------------------------------------------------------
    def workspace(self, task_id: str) -> Path:
        d = self._dir / validate_task_id(task_id)
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None:
        if isinstance(data, Path):
            try:
                data = data.read_bytes()
            except FileNotFoundError:
                return
            if not data:
                return
        with self._mu:
            if data is None:
                self._outputs.pop((task_id, epoch, source), None)
            else:
                self._outputs[(task_id, epoch, source)] = data

    def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        with self._mu:
            data = self._outputs.get((task_id, epoch, source))
            if data is None and source == "prompt":
                data = self._outputs.get((task_id, 0, "prompt"))
        if data is None and source in WORKSPACE_FILES:  # (a run in progress: its workspace is the output so far)
            try:
                data = (self._dir / task_id / WORKSPACE_FILES[source]).read_bytes()
            except OSError:
                data = None
        data = data or b""
        return data[offset : offset + limit], len(data)

    def forget_workspace(self, task_id: str) -> None:
        shutil.rmtree(self._dir / task_id, ignore_errors=True)

    # -- logs --------------------------------------------------------------------------
    def append(self, log: str, entry: dict) -> None:
        with self._mu:
            if log.startswith("ev.") and log[3:] not in self._records:
                return
            self._logs.setdefault(log, []).append(json.dumps(entry, default=str))

    def append_numbered(self, log: str, make: Callable[[int], dict]) -> int:
        with self._mu:
            lines = self._logs.setdefault(log, [])
            n = len(lines)
            lines.append(json.dumps(make(n), default=str))
            return n

    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]:
        with self._mu:
            lines = list(self._logs.get(log, ()))
        out = []
        for i, raw in enumerate(lines[since:], since):
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = None
            out.append((i, ev if isinstance(ev, dict) else {"kind": "unreadable"}))
        return out

    # -- workers -------------------------------------------------------------------------
    def put_worker(self, info: WorkerInfo) -> None:
        with self._mu:
            self._workers[info.worker_id] = (info, self.clock())

    def beat(self, worker_id: str) -> bool:
        with self._mu:
            hit = self._workers.get(worker_id)
            if hit is None:
                return False
            self._workers[worker_id] = (hit[0], self.clock())
            return True

    def remove_worker(self, worker_id: str) -> None:
        with self._mu:
            self._workers.pop(worker_id, None)

    def liveness(self, worker_id: str) -> Liveness:
        with self._mu:
            hit = self._workers.get(worker_id)
        fresh = hit is not None and self.clock() - hit[1] <= self.caps.lease_seconds
        return Liveness.ALIVE if fresh else Liveness.GONE

    def workers(self) -> list[WorkerInfo]:
        with self._mu:
            infos = [info for info, _ in self._workers.values()]
        return [i for i in infos if self.liveness(i.worker_id) is Liveness.ALIVE]

    # -- coordination ------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim_lock(self) -> Iterator[Callable[[], bool]]:
        if not self._claim.acquire(timeout=60):
            raise Timeout("memory claim lock")
        try:
            yield lambda: True
        finally:
            self._claim.release()

    def signal(self, kind: str, task_id: str | None = None) -> None:
        with self._mu:
            if kind == "cancel" and task_id:
                self._cancels.add(task_id)
            elif kind == "uncancel" and task_id:
                self._cancels.discard(task_id)
                return
            self._activity += 1
            handlers = list(self._handlers)
        for h in handlers:
            h()

    def subscribe(self, handler: Callable[[], None]) -> None:
        with self._mu:
            self._handlers.append(handler)

    def cancel_signalled(self, task_id: str) -> bool:
        with self._mu:
            return task_id in self._cancels

    def activity(self) -> object:
        return self._activity

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> tuple[object, bytes] | None:
        with self._mu:
            return self._meta.get(key)

    def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool:
        with self._mu:
            cur = self._meta.get(key)
            if (cur[0] if cur else None) != revision:
                return False
            if value is None:
                self._meta.pop(key, None)
            else:
                self._meta[key] = (self._next(), value)
            return True

    def usable(self) -> bool:
        return True

    def close(self) -> None:
        self.forget_all()

    def forget_all(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
