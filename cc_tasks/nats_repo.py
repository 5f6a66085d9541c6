"""The NATS JetStream repo (``repo.Repo``): tasks shared by servers and workers on several machines, in a namespace
from the URL (``nats://host:4222/NAME`` or ``?ns=NAME``; default ``cc_tasks``):

    KV   <NS>_TASKS     <task_id> -> the TaskRecord (JSON); every write is a compare-and-set on the key's revision.
    KV   <NS>_REQ       <task_id> -> the TaskRequest (a large one goes to the object store, ``<id>.request``).
    KV   <NS>_IDX       a.<task_id> -> status of an unfinished task; w.<task_id>: waiting for dependencies (both
                        kept from each record written); n.<task_id>: older versions' queue notes.
    KV   <NS>_WORKERS   <worker_id> -> WorkerInfo; the bucket's TTL is the lease: a worker is alive while its key
                        exists (its heartbeat re-puts it; the server removes it lease_seconds after the last one).
    KV   <NS>_LOCK      ``queue``: the claim lock (create-if-absent; the bucket's 30 s TTL frees a dead holder's).
    KV   <NS>_META      small keyed values: ``config``, ``remarks.<task_id>``...
    OBJ  <NS>_OUT       <task_id>.<epoch>.<source>: result, transcript, stderr, prompt of each claim (epoch): a
                        superseded worker's late upload is never the one read.
    STREAM <NS>_EV      subject <ns>.ev.<task_id>: the task's events (position = order on the subject).
    STREAM <NS>_NOTES   subject <ns>.notes.<hex group>: group notes (appended by compare-and-set on the subject).
    core   <ns>.nudge (workers look at the queue now), <ns>.cancel.<task_id> (a running task's worker stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats.js.errors as jserr

from .checks import ensure_private_dir
from .errors import BackendUnreachableError, CorruptRecordError, InvalidOptionsError, TaskNotFoundError
from .ids import validate_task_id
from .models import TaskRecord, TaskRequest, WorkerInfo, check_group
from .nats_conn import retrying
from .nats_store import RETRY_FOR, WRONG_LAST, JetStreamClient, _retrying, blocking, log
from .repo import INDEXES, SOURCES, Liveness, Versioned, parse_request
from .states import TaskStatus

REQ_INLINE_MAX = 512 << 10  # (larger requests go to the object store: a KV value is at most max_payload)
CANCEL_POLL = 0.5
CANCEL_RETRY = 2.0  # (how long one cancel check rides out a failing server before the last answer stands)
SMALL_UPLOAD = 1 << 20
RECS_WAIT = 0.25  # (how long ``unfinished`` waits for the records watcher to catch up before reading them)
META_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


class NatsRepo(JetStreamClient):
    def __repr__(self) -> str:
        return f"NatsRepo({self.address!r})"

    def usable(self) -> bool:
        return True

    def _parse(self, task_id: str, data: bytes) -> TaskRecord:
        try:
            return TaskRecord.model_validate_json(data)
        except ValueError as e:
            why = f"its record is unreadable ({(str(e).strip().splitlines() or ['invalid'])[0]})"
            raise CorruptRecordError(f"task {task_id}: {why}; cleanup_task deletes the task") from None

    async def _get(self, task_id: str) -> Versioned:
        e = await self._kv_get(self.kv_tasks, validate_task_id(task_id))
        if e is None:
            raise TaskNotFoundError(
                f"no task {task_id} in this backend ({self.address}); list_active_tasks shows the known ones"
            )
        r = self._parse(task_id, e.value)
        return (e.revision, r.status.value), r

    get = blocking(_get)

    @blocking
    async def get_many(self, ids: list[str]) -> dict[str, Versioned]:
        async def one(t: str) -> Versioned | None:
            with contextlib.suppress(TaskNotFoundError, CorruptRecordError):
                return await self._get(t)

        got = await asyncio.gather(*(one(t) for t in ids))
        return {t: v for t, v in zip(ids, got) if v is not None}

    async def _index(self, task_id: str, old: str | None, new: TaskStatus, strict: bool = False) -> None:
        """Keep the index true to a record's status (``old``: the one it replaced; None: a new task)."""
        idx, w, a, waiting = self.kv_idx, f"w.{task_id}", f"a.{task_id}", TaskStatus.WAITING
        writes = [self._kv_delete(idx, w)] if old == waiting.value and new != waiting else []
        if new == waiting and old != new.value:
            writes.append(self._kv_put(idx, w, b""))
        writes.append(self._kv_delete(idx, a) if new.terminal else self._kv_put(idx, a, new.value.encode()))
        for failed in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(failed, Exception) and not strict:  # (best effort: the record is written)
                log.warning("task %s: %s: index write failed: %s", task_id, new.value, failed)
            elif isinstance(failed, BaseException):
                raise failed

    async def _cas_record(self, record: TaskRecord, revision: object) -> object | None:
        rev, status = revision
        t = validate_task_id(record.task_id)
        if (new := await self._cas(self.kv_tasks, t, record.model_dump_json().encode(), rev)) is None:
            return None
        if record.status.value != status:
            await self._index(t, status, record.status)
        return new, record.status.value

    @blocking
    async def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None:
        if record.task_id != task_id:
            raise ValueError(f"record of task {record.task_id} written as task {task_id}")
        return await self._cas_record(record, revision)

    @blocking
    async def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]:
        done = await asyncio.gather(*(self._cas_record(r, rev) for r, rev in writes), return_exceptions=True)
        for (r, _), d in zip(writes, done, strict=True):
            if isinstance(d, Exception):
                log.warning("task %s: write failed: %s", r.task_id, d)
            elif isinstance(d, BaseException):
                raise d
        return [None if isinstance(d, Exception) else d for d in done]

    @blocking
    async def create(self, record: TaskRecord, request: TaskRequest) -> None:
        """The request, the agent's prompt and the index first, the record last: the task appears with it."""
        t = validate_task_id(record.task_id)
        if await self._kv_get(self.kv_tasks, t) is not None:  # (refused before anything of it is touched)
            raise ValueError(f"task {t} exists already")
        data = request.model_dump_json().encode("utf-8", "surrogatepass")
        if len(data) > REQ_INLINE_MAX:
            await self._obj_put(f"{t}.request", data)
            data = b"@object"
        await self._kv_put(self.kv_req, t, data)
        if record.runner == "agent":
            await self._obj_put(f"{t}.0.prompt", request.options.prompt.encode("utf-8", "surrogatepass"))
        await self._index(t, None, record.status, strict=True)
        if await self._cas(self.kv_tasks, t, record.model_dump_json().encode(), None) is None:
            raise ValueError(f"task {t} exists already")

    @blocking
    async def request(self, task_id: str) -> TaskRequest:
        e = await self._kv_get(self.kv_req, validate_task_id(task_id))
        if e is None:
            raise TaskNotFoundError(f"task {task_id} has no request (deleted, or not a task)")
        data = e.value if e.value != b"@object" else await self._obj_get(f"{task_id}.request")
        if data is None:
            raise TaskNotFoundError(f"task {task_id}: its request is gone from the object store")
        return parse_request(task_id, data, "in the REQ bucket")

    @blocking
    async def delete(self, task_id: str) -> None:
        t = validate_task_id(task_id)
        e = await self._kv_get(self.kv_tasks, t)
        if e is None:
            raise TaskNotFoundError(f"no task {t} in this backend ({self.address})")
        epoch = 20
        with contextlib.suppress(CorruptRecordError):
            epoch = self._parse(t, e.value).epoch
        await self._kv_delete(self.kv_tasks, t)
        for key in (f"a.{t}", f"w.{t}", f"n.{t}"):
            await self._kv_delete(self.kv_idx, key)
        if getattr(await self._kv_get(self.kv_req, t), "value", None) == b"@object":
            await self._obj_delete(f"{t}.request")
        await self._kv_delete(self.kv_req, t)
        await self._kv_delete(self.kv_meta, f"remarks.{t}")
        await asyncio.gather(*(self._obj_delete(f"{t}.{n}.{s}") for n in range(epoch + 1) for s in SOURCES))
        subject = f"{self.ns}.ev.{t}"
        await _retrying(lambda: self.js.purge_stream(self.ev_stream, subject=subject), "purge")
        self._log_seqs.pop(subject, None)
        self._cancels.discard(t)
        self._cancel_checked.pop(t, None)
        self._activity += 1  # (a purge leaves no marker for the records watcher to see)

    def ids(self, index: str = "all") -> list[str]:
        if index not in INDEXES:
            raise ValueError(f"unknown index {index!r} (one of {', '.join(INDEXES)})")
        kv, prefix = {"all": (self.kv_tasks, ""), "active": (self.kv_idx, "a."), "waiting": (self.kv_idx, "w.")}[index]
        return sorted(self._run(self._kv_keys(kv, prefix)), reverse=True)

    async def _unfinished(self, skip: frozenset[str]) -> tuple[list[str], dict[str, Versioned]]:
        """The index's ids; records from the watcher once caught up, else read (not ``skip``'s); stale ids mended."""
        await self._watch_records()
        ids = sorted(await self._kv_keys(self.kv_idx, "a."), reverse=True)
        info = await _retrying(lambda: self.js.stream_info(f"KV_{self.NS}_TASKS"), "stream info")
        last, deadline = info.state.last_seq, time.monotonic() + RECS_WAIT
        while self._recs_seq < last and time.monotonic() < deadline:
            self._recs_moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recs_moved.wait(), max(0.001, deadline - time.monotonic()))
        if self._recs_seq < last:  # (the newest message was removed, or the watcher lags)
            self._recs_seq = last
            for t in ids:
                self._recs.pop(t, None)
        out: dict[str, Versioned] = {}
        missing = [t for t in ids if t not in self._recs and t not in skip]
        for t, (seq, data) in [(t, self._recs[t]) for t in ids if t in self._recs]:
            parsed = self._parsed.get(t)
            if parsed is None or parsed[0] != seq:
                try:
                    parsed = self._parsed[t] = (seq, self._parse(t, data))
                except CorruptRecordError:
                    continue
            out[t] = (seq, parsed[1].status.value), parsed[1]
        entries = await asyncio.gather(*(self._kv_get(self.kv_tasks, t) for t in missing))
        gone = {t for t, e in zip(missing, entries) if e is None}
        for t, e in [(t, e) for t, e in zip(missing, entries) if e is not None]:
            try:
                r = self._parse(t, e.value)
            except CorruptRecordError:
                continue
            if r.status.terminal:  # (a stale index entry: a crash or a race between two writers)
                gone.add(t)
                await self._index(t, TaskStatus.WAITING.value, r.status)
            else:
                self._parsed[t] = (e.revision, r)
                out[t] = (e.revision, r.status.value), r
        for cache in (self._recs, self._parsed):  # (finished tasks are not looked at again)
            for t in set(cache).difference(ids):
                del cache[t]
        return [t for t in ids if t not in gone], out

    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]:
        return self._run(self._unfinished(skip))

    def activity(self) -> object:
        """A counter fed by the records watcher and signals; never waits: the watcher is started in the background."""
        if self._recs_sub is None and not self._recs_starting and not self._closing:
            self._recs_starting = True
            try:
                asyncio.run_coroutine_threadsafe(self._start_watching(), self._loop)
            except RuntimeError:  # (the loop is closed)
                self._recs_starting = False
        return self._activity

    async def _start_watching(self) -> None:
        try:
            await asyncio.wait_for(self._watch_records(), RETRY_FOR)
        except Exception as e:  # (the next activity call tries again)
            log.debug("%s: records watcher: %s", self.address, e)
        finally:
            self._recs_starting = False

    @staticmethod
    def _output_name(task_id: str, epoch: int, source: str) -> str:
        if source not in SOURCES:
            raise ValueError(f"unknown output source {source!r}")
        return f"{validate_task_id(task_id)}.{int(epoch)}.{source}"

    def workspace(self, task_id: str) -> Path:
        root = ensure_private_dir(Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}")
        return ensure_private_dir(ensure_private_dir(root / self.ns) / validate_task_id(task_id))

    def forget_workspace(self, task_id: str) -> None:
        root = Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}"
        shutil.rmtree(root / self.ns / validate_task_id(task_id), ignore_errors=True)

    @blocking
    async def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None:
        name = self._output_name(task_id, epoch, source)
        if data is None:
            await self._obj_delete(name)
        elif isinstance(data, bytes):
            await self._obj_put(name, data)
        else:
            with contextlib.suppress(FileNotFoundError), open(data, "rb") as f:
                if size := os.fstat(f.fileno()).st_size:
                    await self._obj_put(name, f.read() if size <= SMALL_UPLOAD else f)

    @blocking
    async def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        epochs = (epoch, 0) if source == "prompt" and epoch != 0 else (epoch,)  # (an agent's prompt: stored at submit)
        for name in [self._output_name(task_id, n, source) for n in epochs]:
            if (data := await self._obj_get(name, cache=True)) is not None:
                return data[offset : offset + limit] if offset < len(data) else b"", len(data)
        return b"", 0

    def _log(self, name: str) -> tuple[str, str]:
        kind, _, rest = name.partition(".")
        if kind == "ev":
            return self.ev_stream, f"{self.ns}.ev.{validate_task_id(rest)}"
        if kind == "notes":
            try:
                check_group(rest)
            except ValueError as e:
                raise InvalidOptionsError(str(e)) from None
            return self.notes_stream, f"{self.ns}.notes.{rest.encode().hex()}"
        raise ValueError(f"unknown log {name!r} (ev.<task_id> or notes.<group>)")

    def append(self, log: str, entry: dict) -> None:
        stream, subject = self._log(log)
        self._run(self._publish(stream, subject, entry, {"Nats-Msg-Id": secrets.token_hex(12)}))

    @blocking
    async def append_numbered(self, log: str, make: Callable[[int], dict]) -> int:
        """A compare-and-set on the subject's last sequence; entries carry ``_pos``: an append reads one message."""
        stream, subject = self._log(log)
        while True:
            msg_id = secrets.token_hex(12)
            try:
                last = await _retrying(lambda: self.js.get_msg(stream, subject=subject), "get")
            except jserr.NotFoundError:
                last_seq, pos = 0, 0
            else:
                last_seq, pos = last.seq, None
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    p = json.loads(last.data).get("_pos")
                    pos = p + 1 if isinstance(p, int) and not isinstance(p, bool) else None
                if pos is None:  # (appended without a position: count)
                    _, seqs = await self._walk(stream, subject, 1 << 62)
                    last_seq, pos = (seqs[-1] if seqs else 0), len(seqs)
            headers = {"Nats-Expected-Last-Subject-Sequence": str(last_seq), "Nats-Msg-Id": msg_id}
            try:
                await self._publish(stream, subject, {**make(pos), "_pos": pos}, headers)
                return pos
            except jserr.APIError as e:
                if e.err_code not in WRONG_LAST:
                    raise
            won = await self._next_msg(stream, subject, last_seq + 1)  # (ours if only our answer was lost)
            if won is not None and (won.headers or {}).get("Nats-Msg-Id") == msg_id:
                return pos

    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]:
        stream, subject = self._log(log)
        out = []
        for pos, raw in self._run(self._walk(stream, subject, since))[0]:
            entry = None
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
            if isinstance(entry, dict):
                entry.pop("_pos", None)
            out.append((pos, entry if isinstance(entry, dict) else {"kind": "unreadable"}))
        return out

    def put_worker(self, info: WorkerInfo) -> None:
        self._run(self._kv_put(self.kv_workers, info.worker_id, info.model_dump_json().encode()))

    @blocking
    async def beat(self, worker_id: str) -> bool:
        e = await self._kv_get(self.kv_workers, worker_id)
        return e is not None and await self._cas(self.kv_workers, worker_id, e.value, e.revision) is not None

    def remove_worker(self, worker_id: str) -> None:
        self._run(self._kv_delete(self.kv_workers, worker_id))

    @blocking
    async def workers(self) -> list[WorkerInfo]:
        keys = await self._kv_keys(self.kv_workers)
        out = []
        for e in await asyncio.gather(*(self._kv_get(self.kv_workers, k) for k in keys)):
            if e is not None and e.value:
                with contextlib.suppress(ValueError):
                    out.append(WorkerInfo.model_validate_json(e.value))
        return out

    def liveness(self, worker_id: str) -> Liveness:
        """A missing key is a gone worker only after a whole lease connected (after an outage, keys come back)."""
        if getattr(self._run(self._kv_get(self.kv_workers, worker_id)), "value", None):
            return Liveness.ALIVE
        settled = self._connected_at is not None and time.monotonic() - self._connected_at >= self.lease_seconds
        return Liveness.GONE if settled else Liveness.UNKNOWN

    @contextlib.contextmanager
    def claim_lock(self) -> Iterator[Callable[[], bool]]:
        rev = self._run(self._lock())
        try:
            yield lambda: getattr(self._run(self._kv_get(self.kv_lock, "queue")), "revision", None) == rev
        finally:
            self._run(self._unlock(rev), patient=False)

    def signal(self, kind: str, task_id: str | None = None) -> None:
        if kind not in ("nudge", "cancel", "uncancel"):
            raise ValueError(f"unknown signal {kind!r} (nudge, cancel or uncancel)")
        t = None if kind == "nudge" else validate_task_id(task_id)
        if kind == "uncancel":
            self._cancels.discard(t)
            self._cancel_checked.pop(t, None)
            return
        if t is not None:
            self._cancels.add(t)
        self._run(self._publish_signal(f"{self.ns}.nudge" if t is None else f"{self.ns}.cancel.{t}"))

    async def _publish_signal(self, subject: str) -> None:
        self._activity += 1
        await self.nc.publish(subject, b"")

    async def _on_signal(self, msg) -> None:
        if msg.subject != f"{self.ns}.nudge":  # (<ns>.cancel.<task_id>)
            self._cancels.add(msg.subject.rsplit(".", 1)[-1])
        self._activity += 1
        for handler in list(self._handlers):
            with contextlib.suppress(Exception):
                handler()

    @blocking
    async def subscribe(self, handler: Callable[[], None]) -> None:
        self._handlers.append(handler)
        if self._nudge_sub is None:
            self._nudge_sub = await self.nc.subscribe(f"{self.ns}.nudge", cb=self._on_signal)
        if self._cancel_sub is None:
            self._cancel_sub = await self.nc.subscribe(f"{self.ns}.cancel.*", cb=self._on_signal)

    def cancel_signalled(self, task_id: str) -> bool:
        """Heard on the cancel subject, or read in the record at most every CANCEL_POLL s (in an outage: the last)."""
        if task_id in self._cancels:
            return True
        now, (read_at, last) = time.monotonic(), self._cancel_checked.get(task_id, (-math.inf, False))
        if now - read_at < CANCEL_POLL or not self.nc.is_connected:
            return last
        try:
            yes = self._run(self._cancel_requested(task_id), timeout=CANCEL_RETRY + 5, patient=False)
        except (BackendUnreachableError, TimeoutError) as e:  # (a cancel sent meanwhile is heard or read later)
            log.debug("task %s: cancel check: %s", task_id, e)
            yes = last
        if len(self._cancel_checked) > 1000:
            self._cancel_checked.clear()
        self._cancel_checked[task_id] = (now, yes)
        if yes:
            self._cancels.add(task_id)
        return yes

    async def _cancel_requested(self, task_id: str) -> bool:
        if self._cancel_sub is None:
            self._cancel_sub = await self.nc.subscribe(f"{self.ns}.cancel.*", cb=self._on_signal)
        with contextlib.suppress(jserr.KeyNotFoundError, jserr.KeyDeletedError, CorruptRecordError):
            get = retrying(lambda: self.kv_tasks.get(task_id), what="cancel check", deadline=CANCEL_RETRY)
            return self._parse(task_id, (await asyncio.wait_for(get, CANCEL_RETRY)).value).cancel_requested
        return False

    @staticmethod
    def _meta_key(key: str) -> str:
        if not isinstance(key, str) or not META_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid meta key {str(key)[:80]!r} (letters, digits, '_', '-', dot-separated)")
        return key

    def get_meta(self, key: str) -> tuple[object, bytes] | None:
        e = self._run(self._kv_get(self.kv_meta, self._meta_key(key)))
        return None if e is None else (e.revision, e.value or b"")

    @blocking
    async def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool:
        key = self._meta_key(key)
        if value is None and revision is None:  # (removing an absent value: it is absent, or it is not)
            return await self._kv_get(self.kv_meta, key) is None
        return await self._cas(self.kv_meta, key, value, revision) is not None
