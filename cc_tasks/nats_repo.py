"""The NATS JetStream repo: tasks shared by servers and workers on several machines (``repo.Repo``, I/O only;
every task rule is engine.TaskEngine's).

Everything lives in JetStream under a namespace taken from the URL (``nats://host:4222/NAME`` or
``nats://host:4222?ns=NAME``; default ``cc_tasks``), so several deployments (and tests) share a server:

    KV   <NS>_TASKS     <task_id> -> the TaskRecord (JSON); every write is a compare-and-set on the key's revision.
    KV   <NS>_REQ       <task_id> -> the TaskRequest (a large one goes to the object store, ``<id>.request``).
    KV   <NS>_IDX       a.<task_id> -> status of an unfinished task; w.<task_id>: waiting for dependencies (kept
                        from the status of each record written); n.<task_id>: older versions' queue notes.
    KV   <NS>_WORKERS   <worker_id> -> WorkerInfo; the bucket's TTL is the lease: a worker is alive while its
                        key exists (its heartbeat re-puts it; the server removes it lease_seconds after the last
                        one, by the server's clock).
    KV   <NS>_LOCK      ``queue``: the claim lock (create-if-absent; the bucket's 30 s TTL frees a dead holder's).
    KV   <NS>_META      small keyed values: ``config``, ``remarks.<task_id>``...
    OBJ  <NS>_OUT       <task_id>.<epoch>.<source>: result, transcript, stderr, prompt of each claim (epoch), so
                        a superseded worker's late upload is never the one read.
    STREAM <NS>_EV      subject <ns>.ev.<task_id>: the task's events (position = order on the subject).
    STREAM <NS>_NOTES   subject <ns>.notes.<hex group>: group notes (appended by compare-and-set on the subject).
    core   <ns>.nudge (workers look at the queue now), <ns>.cancel.<task_id> (a running task's worker stops it).

The connection, its event loop (and the retries), the KV, object and stream primitives, the claim lock and the
records watcher are nats_store.JetStreamClient's, this class's base.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from .nats_conn import NatsSettings, retrying
from .nats_store import RETRY_FOR, WRONG_LAST, JetStreamClient, _retrying
from .repo import INDEXES, SOURCES, Capabilities, Liveness, Versioned
from .states import TaskStatus

log = logging.getLogger("cc_tasks")
#: A request larger than this goes to the object store (the KV value limit is the server's max_payload).
REQ_INLINE_MAX = 512 << 10
CANCEL_POLL = 0.5
#: How long one cancel check rides out a failing server before the last answer stands (a supervisor polls it).
CANCEL_RETRY = 2.0
#: A file up to this size is uploaded from memory (larger ones are streamed from the file).
SMALL_UPLOAD = 1 << 20
#: How long ``unfinished`` waits for the records watcher to catch up before it reads the records instead.
RECS_WAIT = 0.25
#: A meta key (a KV key: no empty token between dots).
META_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


class NatsRepo(JetStreamClient):
    """The NATS repo (see the module docstring). ``url``: ``nats://[user:pass@]host:port[/NS][?ns=NS&replicas=N]``."""

    def __init__(
        self, url: str, *, lease_seconds: float, settings: NatsSettings | None = None, **files: str | None
    ) -> None:
        """``files``: creds, nkey, tls_ca, tls_cert, tls_key (the ``--nats-*`` flags; the environment's
        CC_TASKS_NATS_* otherwise); ``settings`` instead of the URL's and the files' (nats_conn). ``lease_seconds``:
        the workers bucket's TTL if this object creates it (its first opener's stands)."""
        super().__init__(url, lease_seconds=lease_seconds, settings=settings, **files)  # (connects)
        self._cancels: set[str] = set()
        self._cancel_checked: dict[str, tuple[float, bool]] = {}
        self._cancel_sub = None
        self._nudge_sub = None
        self._handlers: list[Callable[[], None]] = []
        self._parsed: dict[str, tuple[int, TaskRecord]] = {}
        self._recs_starting = False  # (activity started the watcher in the background: see there)
        self.caps = Capabilities(
            kind="nats", remote=True, lost_claims=True, worker_home=None, log_dir=None, lease_seconds=self.lease_seconds
        )

    def __repr__(self) -> str:
        return f"NatsRepo({self.address!r})"

    def usable(self) -> bool:
        return True

    # -- records -----------------------------------------------------------------------
    def _parse(self, task_id: str, data: bytes) -> TaskRecord:
        try:
            return TaskRecord.model_validate_json(data)
        except ValueError as e:
            first = str(e).strip().splitlines()
            raise CorruptRecordError(
                f"task {task_id}: its record is unreadable ({first[0] if first else 'invalid'}); "
                "cleanup_task deletes the task"
            ) from None

    async def _get(self, task_id: str) -> Versioned:
        e = await self._kv_get(self.kv_tasks, validate_task_id(task_id))
        if e is None:
            raise TaskNotFoundError(
                f"no task {task_id} in this backend ({self.address}); list_active_tasks shows the known ones"
            )
        r = self._parse(task_id, e.value)
        return (e.revision, r.status.value), r

    def get(self, task_id: str) -> Versioned:
        return self._run(self._get(task_id))

    def get_many(self, ids: list[str]) -> dict[str, Versioned]:
        async def one(t: str) -> Versioned | None:
            try:
                return await self._get(t)
            except (TaskNotFoundError, CorruptRecordError):
                return None

        async def go():
            got = await asyncio.gather(*(one(t) for t in ids))
            return {t: v for t, v in zip(ids, got) if v is not None}

        return self._run(go())

    async def _index(self, task_id: str, old: str | None, new: TaskStatus, strict: bool = False) -> None:
        """Keep the index true to a record's status (``old``: the one it replaced; None: a new task)."""
        writes = []
        if old == TaskStatus.WAITING.value and new != TaskStatus.WAITING:
            writes.append(self._kv_delete(self.kv_idx, f"w.{task_id}"))
        if new == TaskStatus.WAITING and old != new.value:
            writes.append(self._kv_put(self.kv_idx, f"w.{task_id}", b""))
        if new.terminal:
            writes.append(self._kv_delete(self.kv_idx, f"a.{task_id}"))
        else:
            writes.append(self._kv_put(self.kv_idx, f"a.{task_id}", new.value.encode()))
        for failed in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(failed, BaseException):
                if strict or not isinstance(failed, Exception):
                    raise failed
                # (the record is written: its index entry is best effort, never a reason to report it failed)
                log.warning("task %s: %s: index write failed: %s", task_id, new.value, failed)

    async def _cas_record(self, record: TaskRecord, revision: object) -> object | None:
        rev, status = revision
        t = validate_task_id(record.task_id)
        new = await self._cas(self.kv_tasks, t, record.model_dump_json().encode(), rev)
        if new is None:
            return None
        if record.status.value != status:
            await self._index(t, status, record.status)
        return new, record.status.value

    def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None:
        if record.task_id != task_id:
            raise ValueError(f"record of task {record.task_id} written as task {task_id}")
        return self._run(self._cas_record(record, revision))

    def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]:
        """Each write on its own; one that failed (an error, not a conflict) is logged and reads as None."""

        async def go():
            done = await asyncio.gather(*(self._cas_record(r, rev) for r, rev in writes), return_exceptions=True)
            for (r, _), d in zip(writes, done, strict=True):
                if isinstance(d, BaseException) and not isinstance(d, Exception):
                    raise d
                if isinstance(d, Exception):
                    log.warning("task %s: write failed: %s", r.task_id, d)
            return [None if isinstance(d, Exception) else d for d in done]

        return self._run(go())

    def create(self, record: TaskRecord, request: TaskRequest) -> None:
        """The request, the agent's prompt and the index first, the record last: the task appears with it."""

        async def go():
            t = validate_task_id(record.task_id)
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

        self._run(go())

    def request(self, task_id: str) -> TaskRequest:
        async def go():
            e = await self._kv_get(self.kv_req, validate_task_id(task_id))
            if e is None:
                raise TaskNotFoundError(f"task {task_id} has no request (deleted, or not a task)")
            data = e.value if e.value != b"@object" else await self._obj_get(f"{task_id}.request")
            if data is None:
                raise TaskNotFoundError(f"task {task_id}: its request is gone from the object store")
            try:
                return TaskRequest.model_validate_json(data)
            except ValueError as err:
                raise CorruptRecordError(f"task {task_id}: its request is unreadable ({err})") from None

        return self._run(go())

    def delete(self, task_id: str) -> None:
        async def go():
            t = validate_task_id(task_id)
            e = await self._kv_get(self.kv_tasks, t)
            if e is None:
                raise TaskNotFoundError(f"no task {t} in this backend ({self.address})")
            try:
                epoch = self._parse(t, e.value).epoch
            except CorruptRecordError:
                epoch = 20
            await self._kv_delete(self.kv_tasks, t)
            for key in (f"a.{t}", f"w.{t}", f"n.{t}"):
                await self._kv_delete(self.kv_idx, key)
            req = await self._kv_get(self.kv_req, t)
            if req is not None and req.value == b"@object":
                await self._obj_delete(f"{t}.request")
            await self._kv_delete(self.kv_req, t)
            await self._kv_delete(self.kv_meta, f"remarks.{t}")
            names = [f"{t}.{n}.{s}" for n in range(epoch + 1) for s in SOURCES]
            await asyncio.gather(*(self._obj_delete(n) for n in names))
            subject = f"{self.ns}.ev.{t}"
            await _retrying(lambda: self.js.purge_stream(self.ev_stream, subject=subject), "purge")
            self._log_seqs.pop(subject, None)
            self._cancels.discard(t)
            self._cancel_checked.pop(t, None)

        self._run(go())

    def ids(self, index: str = "all") -> list[str]:
        if index not in INDEXES:
            raise ValueError(f"unknown index {index!r} (one of {', '.join(INDEXES)})")
        kv, prefix = {"all": (self.kv_tasks, ""), "active": (self.kv_idx, "a."), "waiting": (self.kv_idx, "w.")}[index]
        return sorted(self._run(self._kv_keys(kv, prefix)), reverse=True)

    # -- the records watcher: unfinished tasks and activity -------------------------------
    async def _unfinished(self, skip: frozenset[str]) -> tuple[list[str], dict[str, Versioned]]:
        """The index lists the unfinished tasks; their records come from the watcher once it has caught up with
        the records' stream, else are read (those in ``skip`` are not). An id whose record is gone or finished
        (a stale index entry, mended here) is left out."""
        await self._watch_records()
        ids = sorted(await self._kv_keys(self.kv_idx, "a."), reverse=True)
        info = await _retrying(lambda: self.js.stream_info(f"KV_{self.NS}_TASKS"), "stream info")
        deadline = time.monotonic() + RECS_WAIT
        while self._recs_seq < info.state.last_seq and time.monotonic() < deadline:
            self._recs_moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recs_moved.wait(), max(0.001, deadline - time.monotonic()))
        if self._recs_seq < info.state.last_seq:  # (the newest message was removed, or the watcher lags)
            self._recs_seq = info.state.last_seq
            for t in ids:
                self._recs.pop(t, None)
        out: dict[str, Versioned] = {}
        missing = []
        for t in ids:
            hit = self._recs.get(t)
            if hit is None:
                if t not in skip:
                    missing.append(t)
                continue
            seq, data = hit
            parsed = self._parsed.get(t)
            if parsed is None or parsed[0] != seq:
                try:
                    parsed = self._parsed[t] = (seq, self._parse(t, data))
                except CorruptRecordError:
                    continue
            out[t] = (seq, parsed[1].status.value), parsed[1]
        gone = set()
        entries = await asyncio.gather(*(self._kv_get(self.kv_tasks, t) for t in missing))
        for t, e in zip(missing, entries):
            try:
                r = self._parse(t, e.value) if e is not None else None
            except CorruptRecordError:
                continue
            if r is None or r.status.terminal:
                gone.add(t)
                if r is not None:  # (a stale index entry: a crash or a race between two writers)
                    await self._index(t, TaskStatus.WAITING.value, r.status)
                continue
            self._parsed[t] = (e.revision, r)
            out[t] = (e.revision, r.status.value), r
        active = set(ids)
        for cache in (self._recs, self._parsed):  # (finished tasks are not looked at again)
            for t in [t for t in cache if t not in active]:
                del cache[t]
        return [t for t in ids if t not in gone], out

    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]:
        return self._run(self._unfinished(skip))

    def activity(self) -> object:
        """A counter of this object's, fed by its watcher of the records (started by the first call) and by the
        signals it sends or hears, so waiters poll it without a request to the server. It never waits for the
        server (it is called on a server's event loop, every poll): the watcher is started in the background
        (once at a time); while it cannot start (an outage) the counter does not change."""
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

    # -- objects: requests and outputs -----------------------------------------------------
    @staticmethod
    def _output_name(task_id: str, epoch: int, source: str) -> str:
        if source not in SOURCES:
            raise ValueError(f"unknown output source {source!r}")
        return f"{validate_task_id(task_id)}.{int(epoch)}.{source}"

    def workspace(self, task_id: str) -> Path:
        """A local folder (on the worker) where the supervisor keeps the task's prompt, transcript and stderr;
        they are uploaded to the object store (put_output)."""
        root = ensure_private_dir(Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}")
        return ensure_private_dir(ensure_private_dir(root / self.ns) / validate_task_id(task_id))

    def forget_workspace(self, task_id: str) -> None:
        root = Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}"
        shutil.rmtree(root / self.ns / validate_task_id(task_id), ignore_errors=True)

    def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None:
        """bytes are stored; a file's content is uploaded (from memory up to SMALL_UPLOAD, else streamed; a
        missing or empty file is not: reading it gives nothing either way); None removes the output."""
        name = self._output_name(task_id, epoch, source)

        async def go():
            if data is None:
                await self._obj_delete(name)
            elif isinstance(data, bytes):
                await self._obj_put(name, data)
            else:
                try:
                    with open(data, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size:
                            await self._obj_put(name, f.read() if size <= SMALL_UPLOAD else f)
                except FileNotFoundError:
                    pass

        self._run(go())

    def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        names = [self._output_name(task_id, epoch, source)]
        if source == "prompt" and epoch != 0:
            names.append(self._output_name(task_id, 0, source))  # (an agent's prompt, stored at submit)

        async def go():
            for name in names:
                data = await self._obj_get(name, cache=True)
                if data is not None:
                    return data
            return b""

        data = self._run(go())
        return data[offset : offset + limit] if offset < len(data) else b"", len(data)

    # -- logs: a task's events, a group's notes -------------------------------------------
    def _log(self, name: str) -> tuple[str, str]:
        """The stream and subject of a log."""
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

    def append_numbered(self, log: str, make: Callable[[int], dict]) -> int:
        """A compare-and-set on the subject's last sequence; the entry carries its position (``_pos``, not shown
        by read_log), so the next append reads one message, not the log. A conflict whose winner is our own
        message (a retry after a lost acknowledgement) counts as landed."""
        stream, subject = self._log(log)

        async def go():
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
                with contextlib.suppress(jserr.NotFoundError):  # (the message that took the position)
                    won = await _retrying(
                        lambda s=last_seq: self.js.get_msg(stream, seq=s + 1, subject=subject, next=True), "get"
                    )
                    if (won.headers or {}).get("Nats-Msg-Id") == msg_id:
                        return pos

        return self._run(go())

    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]:
        stream, subject = self._log(log)
        out = []
        for pos, raw in self._run(self._walk(stream, subject, since))[0]:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entry.pop("_pos", None)
            out.append((pos, entry if isinstance(entry, dict) else {"kind": "unreadable"}))
        return out

    # -- workers ------------------------------------------------------------------
    def put_worker(self, info: WorkerInfo) -> None:
        self._run(self._kv_put(self.kv_workers, info.worker_id, info.model_dump_json().encode()))

    def beat(self, worker_id: str) -> bool:
        """Re-put the worker's key (which the bucket's TTL would remove); False if it is gone (expired, removed)."""

        async def go():
            e = await self._kv_get(self.kv_workers, worker_id)
            return e is not None and await self._cas(self.kv_workers, worker_id, e.value, e.revision) is not None

        return self._run(go())

    def remove_worker(self, worker_id: str) -> None:
        self._run(self._kv_delete(self.kv_workers, worker_id))

    def workers(self) -> list[WorkerInfo]:
        """Registered workers whose heartbeat is fresh (their key has not expired)."""

        async def go():
            keys = await self._kv_keys(self.kv_workers)
            entries = await asyncio.gather(*(self._kv_get(self.kv_workers, k) for k in keys))
            out = []
            for e in entries:
                if e is not None and e.value:
                    with contextlib.suppress(ValueError):
                        out.append(WorkerInfo.model_validate_json(e.value))
            return out

        return self._run(go())

    def liveness(self, worker_id: str) -> Liveness:
        e = self._run(self._kv_get(self.kv_workers, worker_id))
        if e is not None and e.value:
            return Liveness.ALIVE
        return Liveness.GONE if self._settled() else Liveness.UNKNOWN

    def _settled(self) -> bool:
        """Whether this object has been connected for a whole lease: only then is a missing worker key a gone
        worker. Just after an outage (ours or the server's: a restarted server drops keys older than their TTL)
        live workers have not had the time to put their keys again."""
        return self._connected_at is not None and time.monotonic() - self._connected_at >= self.lease_seconds

    # -- the claim lock -----------------------------------------------------------------
    @contextlib.contextmanager
    def claim_lock(self) -> Iterator[Callable[[], bool]]:
        """The claim lock; ``still_ours()``: whether the key is still the one this holder created (a pass longer
        than LOCK_TTL may have lost it)."""
        rev = self._run(self._lock())
        try:
            yield lambda: self._run(self._still_ours(rev))
        finally:
            self._run(self._unlock(rev), patient=False)

    # -- signals ---------------------------------------------------------------------
    def signal(self, kind: str, task_id: str | None = None) -> None:
        if kind == "nudge":
            subject = f"{self.ns}.nudge"
        elif kind in ("cancel", "uncancel"):
            t = validate_task_id(task_id)
            if kind == "uncancel":
                self._cancels.discard(t)
                self._cancel_checked.pop(t, None)
                return
            self._cancels.add(t)
            subject = f"{self.ns}.cancel.{t}"
        else:
            raise ValueError(f"unknown signal {kind!r} (nudge, cancel or uncancel)")

        async def go():
            self._activity += 1
            await self.nc.publish(subject, b"")

        self._run(go())

    def _heard(self) -> None:
        self._activity += 1
        for handler in list(self._handlers):
            with contextlib.suppress(Exception):
                handler()

    async def _on_cancel(self, msg) -> None:
        self._cancels.add(msg.subject.rsplit(".", 1)[-1])
        self._heard()

    async def _on_nudge(self, msg) -> None:
        self._heard()

    def subscribe(self, handler: Callable[[], None]) -> None:
        """``handler`` is called in this object's thread (it must only set flags)."""
        self._handlers.append(handler)

        async def go():
            if self._nudge_sub is None:
                self._nudge_sub = await self.nc.subscribe(f"{self.ns}.nudge", cb=self._on_nudge)
            if self._cancel_sub is None:
                self._cancel_sub = await self.nc.subscribe(f"{self.ns}.cancel.*", cb=self._on_cancel)

        self._run(go())

    def cancel_signalled(self, task_id: str) -> bool:
        """Told on the cancel subject (at once), or seen in the record (read at most every CANCEL_POLL seconds
        per task). During an outage it never waits long: the last answer stands."""
        if task_id in self._cancels:
            return True
        now = time.monotonic()
        hit = self._cancel_checked.get(task_id)
        if hit is not None and now - hit[0] < CANCEL_POLL:
            return hit[1]
        if not self.nc.is_connected:  # (an outage: no waiting for it; the last answer stands)
            return hit[1] if hit is not None else False

        async def go():
            if self._cancel_sub is None:
                self._cancel_sub = await self.nc.subscribe(f"{self.ns}.cancel.*", cb=self._on_cancel)
            try:
                get = retrying(lambda: self.kv_tasks.get(task_id), what="cancel check", deadline=CANCEL_RETRY)
                e = await asyncio.wait_for(get, CANCEL_RETRY)
            except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
                return False
            try:
                return self._parse(task_id, e.value).cancel_requested
            except CorruptRecordError:
                return False

        try:
            yes = self._run(go(), timeout=CANCEL_RETRY + 5, patient=False)
        except (BackendUnreachableError, TimeoutError) as e:
            # (an outage: the last answer stands; the supervisor keeps going and keeps its deadline, and a cancel
            # sent meanwhile arrives on the cancel subject or is seen in the record once the server is back)
            log.debug("task %s: cancel check: %s", task_id, e)
            yes = hit[1] if hit is not None else False
        if len(self._cancel_checked) > 1000:
            self._cancel_checked.clear()
        self._cancel_checked[task_id] = (now, yes)
        if yes:
            self._cancels.add(task_id)
        return yes

    # -- meta: shared configuration and small keyed values ------------------------------------
    @staticmethod
    def _meta_key(key: str) -> str:
        if not isinstance(key, str) or not META_KEY_RE.fullmatch(key):
            raise ValueError(f"invalid meta key {str(key)[:80]!r} (letters, digits, '_', '-', dot-separated)")
        return key

    def get_meta(self, key: str) -> tuple[object, bytes] | None:
        e = self._run(self._kv_get(self.kv_meta, self._meta_key(key)))
        return None if e is None else (e.revision, e.value or b"")

    def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool:
        key = self._meta_key(key)

        async def go():
            if value is None and revision is None:  # (remove an absent value: it is absent, or it is not)
                return await self._kv_get(self.kv_meta, key) is None
            return await self._cas(self.kv_meta, key, value, revision) is not None

        return self._run(go())
