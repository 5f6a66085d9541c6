"""The NATS JetStream backend: tasks shared by servers and workers on several machines.

Everything lives in JetStream under a namespace taken from the URL (``nats://host:4222/NAME`` or
``nats://host:4222?ns=NAME``; default ``cc_tasks``), so several deployments (and tests) share a server:

    KV   <NS>_TASKS     <task_id> -> the TaskRecord (JSON). Every change is a compare-and-set on the key's
                        revision, through ``_update`` and states.TRANSITIONS, like TaskStore.update.
    KV   <NS>_REQ       <task_id> -> the TaskRequest (a large one goes to the object store, ``<id>.request``).
    KV   <NS>_IDX       a.<task_id> -> status of an unfinished task; w.<task_id>: waiting for dependencies;
                        n.<task_id> -> why no worker takes a queued task (missing cwd or labels).
    KV   <NS>_WORKERS   <worker_id> -> WorkerInfo; the bucket's TTL is the lease: a worker is alive while its
                        key exists (its heartbeat re-puts it every second; the server removes it lease_seconds
                        after the last one, by the server's clock).
    KV   <NS>_LOCK      ``queue``: the claim lock (create-if-absent; the bucket's 30 s TTL frees a dead holder's).
    OBJ  <NS>_OUT       <task_id>.<epoch>.<source>: result, transcript, stderr, prompt of each claim (epoch), so
                        a superseded worker's late upload is never the one read.
    STREAM <NS>_EV      subject <ns>.ev.<task_id>: the task's events (position = order on the subject).
    STREAM <NS>_NOTES   subject <ns>.notes.<hex group>: group notes (appended by compare-and-set on the subject).
    core   <ns>.nudge (workers look at the queue now), <ns>.cancel.<task_id> (a running task's worker stops it).

Claims: a claimer takes the queue lock, reads the unfinished records, ends the leases of workers that are gone
(``worker_lost``), resolves dependencies, and leases the ready tasks in priority-then-age order within the
global cap, each by compare-and-set on its record (queued and unleased -> running, epoch + 1). The record's
lease (worker id and epoch) fences every worker write: a write checks it by compare-and-set before any
visible effect. The WorkQueue-stream mapping was not used: a FIFO consumer cannot give priorities, labels,
dependencies and a cap counted over the records, and JetStream accepts a superseded worker's late ack, so
the epoch in the record is the fence anyway.

nats-py is asyncio: each backend object runs one event loop in a daemon thread and its sync methods (the
``Backend`` protocol) submit coroutines to it with ``asyncio.run_coroutine_threadsafe``. Writes that fail
for a while (a JetStream leader election) are retried with backoff (``_retrying``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import nats.errors
import nats.js.errors as jserr
from filelock import Timeout
from nats.js.api import DeliverPolicy, StreamConfig

from . import procs
from .backend import agent_completed, agent_failed, agent_renewed, cancel_update, check_agent_lease, lost_update
from .config import default_lease_seconds, default_max_concurrent
from .errors import (
    BackendUnreachableError,
    CorruptRecordError,
    InvalidOptionsError,
    LeaseLostError,
    TaskNotFoundError,
)
from .models import Lease, Progress, TaskRecord, TaskRequest, WorkerInfo, check_group, utcnow
from .nats_conn import FOREVER, NatsSettings, connect, is_transient, nats_settings, redacted, retrying
from .queue import QueueView, queue_order, ready
from .states import DEP_FAILED, TRANSITIONS, TaskStatus, check_transition
from .store import HOST, ensure_private_dir, validate_task_id

log = logging.getLogger("cc_tasks")
DEFAULT_NS = "cc_tasks"
SOURCES = ("result", "transcript", "stderr", "prompt")
WORKSPACE_FILES = {"transcript": "stdout.jsonl", "stderr": "stderr.log", "prompt": "prompt.txt"}
#: A worker found alive this recently is not looked at again (pollers reading many of its tasks).
ALIVE_CACHE = 0.2
LOCK_TTL = 30.0
LOCK_WAIT = 60.0
#: Seconds between uploads of a running task's transcript (only while it is smaller than LIVE_UPLOAD_MAX).
LIVE_UPLOAD_EVERY = 5.0
LIVE_UPLOAD_MAX = 8 << 20
#: A request larger than this goes to the object store (the KV value limit is the server's max_payload).
REQ_INLINE_MAX = 512 << 10
CANCEL_POLL = 0.5
#: How long one cancel check rides out a failing server before the last answer stands (a supervisor polls it).
CANCEL_RETRY = 2.0
#: Finished tasks' outputs kept in memory for paging (in all; each at most a quarter of it).
OBJ_CACHE_BYTES = 128 << 20
RETRY_FOR = 30.0
#: A workspace file up to this size is uploaded from memory (larger ones are streamed from the file).
SMALL_UPLOAD = 1 << 20
#: A record's status, without parsing the record (the records watcher looks at every write).
STATUS_RE = re.compile(rb'"status":"([a-z_]+)"')
#: The finished statuses as a record's JSON has them: the records watcher keeps nothing of those records.
FINISHED = frozenset(s.value.encode() for s in TaskStatus if s.terminal)
#: How long a claimer waits for its watcher of the records to catch up before it reads them instead.
RECS_WAIT = 0.25


#: Set in a worker's writes for its tasks: they wait for the server as long as it takes (a worker cut off
#: keeps its tasks running and writes when it reconnects; the fence decides whether the writes still count).
_PATIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("patient", default=False)


async def _retrying(fn: Callable[[], Awaitable], what: str = "nats"):
    """nats_conn.retrying: ``await fn()``, again with backoff while it fails for a transient reason (leader
    election, reconnect), for up to RETRY_FOR seconds, without end in a worker's writes (``_PATIENT``)."""
    return await retrying(fn, what=what, deadline=FOREVER if _PATIENT.get() else RETRY_FOR)


def _event_bytes(kind: str, **data) -> bytes:
    return json.dumps(
        {"ts": time.time(), "kind": kind, **{k: v for k, v in data.items() if v is not None}}, default=str
    ).encode()


class NatsBackend:
    """The NATS backend (see the module docstring). ``url``: ``nats://[user:pass@]host:port[/NS][?ns=NS&replicas=N]``."""

    kind = "nats"

    def __init__(
        self,
        url: str,
        *,
        max_concurrent: int | None = None,
        lease_seconds: float | None = None,
        settings: NatsSettings | None = None,
        **files: str | None,
    ):
        """``files``: creds, nkey, tls_ca, tls_cert, tls_key (the ``--nats-*`` flags; the environment's
        CC_TASKS_NATS_* otherwise); ``settings`` instead of the URL's and the files' (nats_conn)."""
        self.url = url
        self.settings = settings or nats_settings(url, **files)
        self.ns, self.replicas = self.settings.namespace, self.settings.replicas
        self.max_concurrent = max_concurrent or default_max_concurrent()
        self.lease_seconds = lease_seconds or default_lease_seconds(remote=True)
        self.NS = self.ns.upper()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{self.ns}", daemon=True)
        self._thread.start()
        self._seen_alive: dict[str, float] = {}
        self._cancels: set[str] = set()
        self._cancel_checked: dict[str, tuple[float, bool]] = {}
        self._ev_seqs: dict[str, list[int]] = {}
        self._obj_cache: OrderedDict[str, bytes] = OrderedDict()
        self._uploaded: dict[str, tuple[float, int]] = {}
        self._noted: dict[tuple[str, str], float] = {}
        self._nudge_handlers: list[Callable[[], None]] = []
        self._cancel_sub = None
        self._recs: dict[str, tuple[int, bytes]] = {}
        self._parsed: dict[str, tuple[int, TaskRecord]] = {}
        self._recs_seq = 0
        self._recs_sub = None
        self._recs_lock = asyncio.Lock()  # (one subscription, whoever starts it first)
        self._recs_starting = False  # (activity_stamp started the watcher in the background: see there)
        self._recs_moved = asyncio.Event()
        self._closing = False
        #: Each task's status as the records watcher last saw it, and a count of the changes (activity_stamp).
        self._statuses: dict[str, bytes] = {}
        self._activity = 0
        #: When this object's connection last came up (None while it is down): see _settled.
        self._connected_at: float | None = None
        try:
            self._run(self._setup())
        except BaseException:
            self._shutdown(drain=False)
            raise

    def __repr__(self) -> str:
        return f"NatsBackend({self.address!r})"

    @property
    def address(self) -> str:
        """The backend URL without credentials."""
        return redacted(self.url)

    # -- the event loop ----------------------------------------------------------
    def _run(self, coro, timeout: float | None = 300.0):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()  # (never left running behind the caller's back: a claim that outlived it leases nothing)
            raise

    def _run_patient(self, coro):
        """``_run`` for a worker's writes: retried until the server answers (see _PATIENT)."""

        async def go():
            _PATIENT.set(True)
            return await coro

        return self._run(go(), timeout=None)

    async def _setup(self) -> None:
        async def on_disconnect() -> None:
            self._connected_at = None
            if self._closing:
                return
            log.warning("nats: disconnected from %s; reconnecting", self.settings.url)

        async def on_reconnect() -> None:
            self._connected_at = time.monotonic()

        settings = self.settings.model_copy(update={"name": f"cc-tasks {HOST} {os.getpid()}"})
        self.nc = await connect(settings, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        self._connected_at = time.monotonic()
        self.js = self.nc.jetstream(timeout=5.0)
        try:
            await self._open_streams()
        except (jserr.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
            if not (self.nc._server_info or {}).get("jetstream"):  # (the server's INFO says whether it has it)
                raise BackendUnreachableError(
                    f"JetStream is not enabled on {self.settings.url}: start nats-server with -js (or a "
                    "jetstream {} block in its configuration)"
                ) from None
            raise BackendUnreachableError(
                f"JetStream on {self.settings.url} does not answer ({type(e).__name__}); check that a majority of "
                "a cluster is up"
            ) from None

    async def _open_streams(self) -> None:
        NS, r = self.NS, self.replicas
        self.kv_tasks = await self._bucket(f"{NS}_TASKS")
        self.kv_req = await self._bucket(f"{NS}_REQ")
        self.kv_idx = await self._bucket(f"{NS}_IDX")
        self.kv_workers = await self._bucket(f"{NS}_WORKERS", ttl=self.lease_seconds)
        self.kv_lock = await self._bucket(f"{NS}_LOCK", ttl=LOCK_TTL)
        try:
            self.obs = await self.js.object_store(f"{NS}_OUT")
        except jserr.NotFoundError:
            self.obs = await self.js.create_object_store(f"{NS}_OUT", replicas=r)
        self.obj_stream = f"OBJ_{NS}_OUT"
        self.ev_stream = f"{NS}_EV"
        self.notes_stream = f"{NS}_NOTES"
        for name, subject in ((self.ev_stream, f"{self.ns}.ev.*"), (self.notes_stream, f"{self.ns}.notes.*")):
            try:
                await self.js.stream_info(name)
            except jserr.NotFoundError:
                with contextlib.suppress(jserr.BadRequestError):
                    await self.js.add_stream(StreamConfig(name=name, subjects=[subject], num_replicas=r))
        info = await self.js.stream_info(f"KV_{NS}_WORKERS")
        if info.config.max_age:  # the bucket's TTL is the lease (its first opener set it)
            self.lease_seconds = float(info.config.max_age)

    async def _bucket(self, name: str, ttl: float | None = None):
        try:
            return await self.js.key_value(name)
        except jserr.NotFoundError:
            try:
                # (direct=False: reads go to the stream's leader, so a reader sees every write acknowledged before)
                return await self.js.create_key_value(
                    bucket=name, history=1, ttl=ttl, replicas=self.replicas, direct=False
                )
            except jserr.BadRequestError:  # made meanwhile by another process
                return await self.js.key_value(name)

    def close(self) -> None:
        self._shutdown(drain=True)

    def _shutdown(self, drain: bool) -> None:
        """End the records watcher, drain (or close) the connection, then stop the loop and its thread."""

        self._closing = True

        async def _close():
            nc = getattr(self, "nc", None)
            if nc is None:
                return
            with contextlib.suppress(Exception):
                if self._recs_sub is not None:
                    await self._recs_sub.unsubscribe()
            if drain:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.drain(), 5)
            with contextlib.suppress(Exception):
                if not nc.is_closed:
                    await nc.close()
            # (let the client's own tasks see their cancellation before the loop stops)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(_close(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- KV primitives ---------------------------------------------------------------
    async def _kv_get(self, kv, key: str):
        """The entry, or None if the key does not exist."""
        try:
            return await _retrying(lambda: kv.get(key), "kv get")
        except (jserr.KeyNotFoundError, jserr.KeyDeletedError):
            return None

    async def _kv_put(self, kv, key: str, value: bytes) -> int:
        return await _retrying(lambda: kv.put(key, value), "kv put")

    async def _kv_delete(self, kv, key: str) -> None:
        """Remove the key's messages (no delete marker is left: listings count subjects, see _kv_keys)."""
        await _retrying(lambda: self.js.purge_stream(kv._stream, subject=f"{kv._pre}{key}"), "kv remove")

    async def _kv_keys(self, kv, prefix: str = "") -> list[str]:
        """The keys (less ``prefix``) that start with ``prefix``: the subjects holding a message, as the stream's
        leader has them (a listing sees every write acknowledged before it; a watcher's consumer may lag)."""
        info = await _retrying(
            lambda: self.js.stream_info(kv._stream, subjects_filter=f"{kv._pre}{prefix}>"), "stream info"
        )
        n = len(kv._pre) + len(prefix)
        return [subject[n:] for subject in (info.state.subjects or {})]

    async def _cas(self, kv, key: str, value: bytes, rev: int) -> bool:
        """Write ``value`` if the key is still at ``rev``; True if it is there now (also when a retry after a
        lost acknowledgement finds our own write)."""
        retried = False

        async def attempt():
            nonlocal retried
            try:
                return await kv.update(key, value, last=rev)
            except Exception as e:
                retried = retried or is_transient(e)
                raise

        try:
            await _retrying(attempt, "kv update")
            return True
        except jserr.KeyWrongLastSequenceError:
            if retried:
                e = await self._kv_get(kv, key)
                return e is not None and e.value == value
            return False

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

    def _not_found(self, task_id: str) -> TaskNotFoundError:
        return TaskNotFoundError(
            f"no task {task_id} in this backend ({self.address}); list_active_tasks shows the known ones"
        )

    async def _entry(self, task_id: str):
        e = await self._kv_get(self.kv_tasks, task_id)
        if e is None:
            raise self._not_found(task_id)
        return e

    async def _load(self, task_id: str) -> TaskRecord:
        e = await self._entry(task_id)
        return self._parse(task_id, e.value)

    async def _peek(self, task_id: str) -> TaskRecord | None:
        try:
            return await self._load(task_id)
        except (TaskNotFoundError, CorruptRecordError):
            return None

    async def _read_all(self, ids: list[str]) -> dict[str, TaskRecord]:
        recs = await asyncio.gather(*(self._peek(t) for t in ids))
        return {t: r for t, r in zip(ids, recs, strict=True) if r is not None}

    async def _update(
        self, task_id: str, fn: Callable[[TaskRecord], TaskRecord | None], hint: tuple[int, TaskRecord] | None = None
    ) -> TaskRecord:
        """Read, change and compare-and-set the record (again from a fresh read if another write came first).
        ``fn`` returns None for no change, and may raise to refuse it. Every status change goes through here
        and the TRANSITIONS table. ``hint``: a (revision, record) read already (the claimers' cache): the first
        try writes against it without reading."""
        while True:
            if hint is not None:
                revision, current = hint
                hint = None
            else:
                e = await self._entry(task_id)
                revision, current = e.revision, self._parse(task_id, e.value)
            new = fn(current)
            if new is None:
                return current
            if new.status != current.status:
                check_transition(current.status, new.status)
                if new.status.terminal:
                    new.finished_at = new.finished_at or utcnow()
            if await self._cas(self.kv_tasks, task_id, new.model_dump_json().encode(), revision):
                break
        if new.status != current.status:
            writes = []
            if current.status == TaskStatus.WAITING:
                writes.append(self._kv_delete(self.kv_idx, f"w.{task_id}"))
            if new.status.terminal:
                writes.append(self._kv_delete(self.kv_idx, f"a.{task_id}"))
            else:
                writes.append(self._kv_put(self.kv_idx, f"a.{task_id}", new.status.value.encode()))
            worker = new.lease.worker if new.status == TaskStatus.RUNNING and new.lease else None
            writes.append(
                self._append_event(task_id, "status", status=new.status.value, error=new.error, worker=worker)
            )
            # (the record is written: its index entry and event are best effort, never a reason to report the
            # change as failed; a stale index entry is mended by the next claim pass)
            for failed in await asyncio.gather(*writes, return_exceptions=True):
                if isinstance(failed, Exception):
                    log.warning("task %s: %s: index or event write failed: %s", task_id, new.status.value, failed)
        return new

    # -- the claimers' view of the records ---------------------------------------------
    async def _watch_records(self) -> None:
        """Start following the task records (one ordered consumer for this object's life): ``_recs`` maps each
        unfinished task's key to the (revision, value) last seen (a finished record is dropped: servers would
        keep every result preview otherwise), ``_recs_seq`` is the highest revision seen."""
        if self._recs_sub is not None:
            return
        async with self._recs_lock:
            if self._recs_sub is None:
                await self._subscribe_records()

    async def _subscribe_records(self) -> None:
        pre = f"$KV.{self.NS}_TASKS."

        async def on_msg(msg) -> None:
            meta = msg.metadata
            key = msg.subject[len(pre) :]
            op = (msg.headers or {}).get("KV-Operation")
            if op in ("DEL", "PURGE"):
                self._recs.pop(key, None)
                self._statuses.pop(key, None)
                self._activity += 1
            else:
                m = STATUS_RE.search(msg.data or b"")
                status = m.group(1) if m else b""
                if self._statuses.get(key) != status:
                    self._activity += 1
                if status in FINISHED:  # (claims look only at unfinished records: keep nothing of the rest)
                    self._recs.pop(key, None)
                    self._statuses.pop(key, None)
                else:
                    self._recs[key] = (meta.sequence.stream, msg.data)
                    self._statuses[key] = status
            self._recs_seq = max(self._recs_seq, meta.sequence.stream)
            self._recs_moved.set()

        self._recs_sub = await self.js.subscribe(
            f"{pre}>",
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=30.0,  # (removed by the server this long after this object is gone)
        )

    async def _unfinished(self) -> dict[str, tuple[int, TaskRecord]]:
        """The unfinished tasks' (revision, record), as fresh as reading each (the index lists them; the
        records come from the watcher once it has caught up with the records' stream, else are read): a claim
        reads two listings, not every record."""
        await self._watch_records()
        ids = await self._active_ids()
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
        out: dict[str, tuple[int, TaskRecord]] = {}
        missing = []
        for t in ids:
            hit = self._recs.get(t)
            if hit is None:
                missing.append(t)
                continue
            seq, data = hit
            parsed = self._parsed.get(t)
            if parsed is None or parsed[0] != seq:
                try:
                    parsed = self._parsed[t] = (seq, self._parse(t, data))
                except CorruptRecordError:
                    continue
            out[t] = parsed
        entries = await asyncio.gather(*(self._kv_get(self.kv_tasks, t) for t in missing))
        for t, e in zip(missing, entries, strict=True):
            if e is not None:
                with contextlib.suppress(CorruptRecordError):
                    out[t] = self._parsed[t] = (e.revision, self._parse(t, e.value))
        active = set(ids)
        for cache in (self._recs, self._parsed):  # (finished tasks are not looked at again)
            for t in [t for t in cache if t not in active]:
                del cache[t]
        return out

    async def _transition(self, task_id: str, status: TaskStatus, **fields) -> TaskRecord:
        def fn(r: TaskRecord) -> TaskRecord | None:
            if r.status == status or status not in TRANSITIONS[r.status]:
                return None
            return r.model_copy(update={"status": status, **fields})

        return await self._update(task_id, fn)

    # -- submit and read (client side) -----------------------------------------------
    def submit(self, record: TaskRecord, request: TaskRequest) -> None:
        self._run(self._submit(record, request))

    async def _submit(self, record: TaskRecord, request: TaskRequest) -> None:
        t = validate_task_id(record.task_id)
        data = request.model_dump_json().encode("utf-8", "surrogatepass")
        if len(data) > REQ_INLINE_MAX:
            await self._obj_put(f"{t}.request", data)
            data = b"@object"
        await self._kv_put(self.kv_req, t, data)
        if record.runner == "agent":
            await self._obj_put(f"{t}.0.prompt", request.options.prompt.encode("utf-8", "surrogatepass"))
        data = record.model_dump_json().encode()
        try:
            await _retrying(lambda: self.kv_tasks.create(t, data), "kv create")
        except jserr.KeyWrongLastSequenceError:  # (a retry after a lost acknowledgement finds our own write)
            e = await self._kv_get(self.kv_tasks, t)
            if e is None or e.value != data:
                raise
        await self._kv_put(self.kv_idx, f"a.{t}", record.status.value.encode())
        if record.status == TaskStatus.WAITING:
            await self._kv_put(self.kv_idx, f"w.{t}", b"")
        await self._append_event(t, "status", status=record.status.value)

    def load(self, task_id: str) -> TaskRecord:
        return self._run(self._load(validate_task_id(task_id)))

    def read(self, task_id: str, cached: bool = False) -> TaskRecord:
        """The task's record; a running task whose worker is gone is handed to ``worker_lost`` first."""

        async def go():
            r = await self._load(validate_task_id(task_id))
            return await self._check_lease(r, ALIVE_CACHE if cached else 0.0)

        return self._run(go())

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

    async def _active_ids(self) -> list[str]:
        return sorted(await self._kv_keys(self.kv_idx, "a."), reverse=True)

    def list_ids(self, include_finished: bool) -> Iterator[str]:
        if include_finished:
            return iter(sorted(self._run(self._kv_keys(self.kv_tasks)), reverse=True))
        return iter(self._run(self._active_ids()))

    def has_active(self) -> bool:
        return bool(self._run(self._active_ids()))

    def usable(self) -> bool:
        return True

    def activity_stamp(self) -> object:
        """Changes whenever a task changes status, is added or is removed: a counter of this object's, fed by its
        watcher of the records (started by the first call), so waiters poll it without a request to the
        server. While the watcher cannot start (an outage) it does not change; waiters still read every
        WAIT_FULL_EVERY. It never waits for the server: it is called on a server's event loop, every poll; the
        watcher is started in the background (once at a time) and the counter is answered at once."""
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
        except Exception as e:  # (the next activity_stamp tries again)
            log.debug("%s: records watcher: %s", self.address, e)
        finally:
            self._recs_starting = False

    def queue_position(self, task_id: str) -> int | None:
        async def go():
            records = await self._read_all(await self._active_ids())
            mine = records.get(task_id)
            return QueueView(records, mine.runner).position(task_id) if mine else None

        return self._run(go())

    def queue_note(self, task_id: str) -> str | None:
        """Why workers that saw this queued task did not take it (missing cwd, missing labels), if any did."""
        e = self._run(self._kv_get(self.kv_idx, f"n.{validate_task_id(task_id)}"))
        if e is None:
            return None
        try:
            seen = json.loads(e.value)
        except ValueError:
            return None
        return "; ".join(f"worker {w}: {why}" for w, why in list(seen.items())[:5]) or None

    # -- events --------------------------------------------------------------------
    async def _append_event(self, task_id: str, kind: str, **data) -> None:
        subject = f"{self.ns}.ev.{task_id}"
        await _retrying(lambda: self.js.publish(subject, _event_bytes(kind, **data), stream=self.ev_stream), "event")

    async def _walk(
        self, stream: str, subject: str, since: int, cache: dict[str, list[int]]
    ) -> list[tuple[int, bytes]]:
        """The messages on ``subject`` from position ``since`` (positions: order on the subject). The stream
        sequence of every position seen is kept, so the next walk starts where this one ended."""
        seqs = cache.setdefault(subject, [])
        out: list[tuple[int, bytes]] = []
        if since < len(seqs):
            seq, pos = seqs[since], since
        else:
            seq, pos = (seqs[-1] + 1 if seqs else 1), len(seqs)  # (walk the positions not seen yet)
        while True:
            try:
                m = await _retrying(lambda s=seq: self.js.get_msg(stream, seq=s, subject=subject, next=True), "get")
            except jserr.NotFoundError:
                break
            if pos == len(seqs):
                seqs.append(m.seq)
            if pos >= since:
                out.append((pos, m.data or b""))
            pos, seq = pos + 1, m.seq + 1
        if len(cache) > 2000:
            cache.clear()
        return out

    def iter_events(self, task_id: str, since: int = 0) -> Iterator[tuple[int, dict]]:
        msgs = self._run(self._walk(self.ev_stream, f"{self.ns}.ev.{validate_task_id(task_id)}", since, self._ev_seqs))
        for i, raw in msgs:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"kind": "unreadable"}
            yield i, ev if isinstance(ev, dict) else {"kind": "unreadable"}

    # -- objects: results, transcripts ---------------------------------------------------
    async def _obj_put(self, name: str, data: bytes | io.BufferedIOBase) -> None:
        async def put():
            if not isinstance(data, bytes):
                data.seek(0)
            return await self.obs.put(name, data)

        await _retrying(put, "object put")

    async def _obj_get(self, name: str) -> bytes | None:
        """The object's bytes, read chunk by chunk with direct stream reads (``ObjectStore.get`` makes an
        ephemeral consumer per call, which the server keeps for seconds after: a burst of reads reached the
        server's consumer limit, error 10026). None if there is no such object."""
        for _ in range(5):  # (an upload replacing it meanwhile purges the chunks being read: read it again)
            try:
                info = await _retrying(lambda: self.obs.get_info(name), "object info")
            except (jserr.ObjectNotFoundError, jserr.ObjectDeletedError, jserr.NotFoundError):
                return None
            if not info.size or not info.nuid:
                return b""
            subject = f"$O.{self.NS}_OUT.C.{info.nuid}"
            buf, h, seq = io.BytesIO(), hashlib.sha256(), 1
            try:
                while buf.tell() < info.size:
                    m = await _retrying(
                        lambda s=seq, c=subject: self.js.get_msg(self.obj_stream, seq=s, subject=c, next=True), "get"
                    )
                    buf.write(m.data or b"")
                    h.update(m.data or b"")
                    seq = m.seq + 1
            except jserr.NotFoundError:
                continue
            digest = (info.digest or "").partition("=")[2].rstrip("=")
            if not digest or base64.urlsafe_b64encode(h.digest()).decode().rstrip("=") == digest:
                return buf.getvalue()
        return None

    async def _obj_delete(self, name: str) -> None:
        with contextlib.suppress(jserr.ObjectNotFoundError, jserr.ObjectDeletedError, jserr.NotFoundError):
            await _retrying(lambda: self.obs.delete(name), "object delete")

    def read_output(self, task_id: str, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of a task's output from ``offset``, and the output's current size. The output
        of the record's claim (epoch); a finished task's is kept in memory (it no longer changes)."""
        if source not in SOURCES:
            raise ValueError(f"unknown output source {source!r}")

        async def go():
            r = await self._peek(validate_task_id(task_id))
            if r is None:
                return b""
            if source == "result" and not r.status.terminal:
                return b""  # (an upload of a claim that never finished is not a result)
            names = [f"{task_id}.{r.epoch}.{source}"] + ([f"{task_id}.0.prompt"] if source == "prompt" else [])
            for name in names:
                key = f"{name}:{r.finished_at}"
                if r.status.terminal and key in self._obj_cache:
                    self._obj_cache.move_to_end(key)
                    return self._obj_cache[key]
                data = await self._obj_get(name)
                if data is None:
                    continue
                if r.status.terminal and len(data) <= OBJ_CACHE_BYTES // 4:
                    self._obj_cache[key] = data
                    while sum(map(len, self._obj_cache.values())) > OBJ_CACHE_BYTES:
                        self._obj_cache.popitem(last=False)
                return data
            return b""

        data = self._run(go())
        return data[offset : offset + limit] if offset < len(data) else b"", len(data)

    def workspace(self, task_id: str) -> Path:
        """A local folder (on the worker) where the supervisor keeps the task's prompt, transcript and stderr;
        they are uploaded to the object store as the task runs and when it ends."""
        root = ensure_private_dir(Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}")
        return ensure_private_dir(ensure_private_dir(root / self.ns) / validate_task_id(task_id))

    async def _upload_workspace(self, lease: Lease, sources=tuple(WORKSPACE_FILES)) -> None:
        """Upload the workspace's files under the lease's epoch, all at once; an empty or missing one is not
        uploaded (reading it gives nothing either way)."""
        d = Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}" / self.ns / lease.task_id

        async def one(source: str) -> None:
            name = f"{lease.task_id}.{lease.epoch}.{source}"
            try:
                with open(d / WORKSPACE_FILES[source], "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size == 0:
                        return
                    await self._obj_put(name, f.read() if size <= SMALL_UPLOAD else f)
            except FileNotFoundError:
                return

        await asyncio.gather(*(one(source) for source in sources))

    # -- delete, annotate -------------------------------------------------------------
    def delete(self, task_id: str) -> None:
        async def go():
            e = await self._entry(validate_task_id(task_id))
            try:
                epoch = self._parse(task_id, e.value).epoch
            except CorruptRecordError:
                epoch = 20
            await self._kv_delete(self.kv_tasks, task_id)
            for key in (f"a.{task_id}", f"w.{task_id}", f"n.{task_id}"):
                await self._kv_delete(self.kv_idx, key)
            req = await self._kv_get(self.kv_req, task_id)
            if req is not None and req.value == b"@object":
                await self._obj_delete(f"{task_id}.request")
            await self._kv_delete(self.kv_req, task_id)
            names = [f"{task_id}.{n}.{s}" for n in range(epoch + 1) for s in SOURCES]
            await asyncio.gather(*(self._obj_delete(n) for n in names))
            subject = f"{self.ns}.ev.{task_id}"
            await _retrying(lambda: self.js.purge_stream(self.ev_stream, subject=subject), "purge")
            self._ev_seqs.pop(subject, None)

        self._run(go())

    def purge(self, task_id: str) -> None:
        """Delete a task whose record cannot be read, after stopping the processes that carry its id here."""
        procs.stop_tree(None, others=procs.task_processes(validate_task_id(task_id)))
        self.delete(task_id)

    def annotate(self, task_id: str, **fields) -> TaskRecord:
        if "status" in fields or "lease" in fields:
            raise ValueError("annotate never changes a task's status or lease")

        def fn(r: TaskRecord) -> TaskRecord | None:
            return r.model_copy(update=fields) if r.status.terminal else None

        return self._run(self._update(validate_task_id(task_id), fn))

    # -- cancel (client side) -----------------------------------------------------------
    def request_cancel(self, task_id: str) -> TaskRecord:
        """A task that has not started, or an agent's task, is cancelled at once; a running claude task is
        marked and its worker is told on ``<ns>.cancel.<id>`` (it also sees the mark in the record)."""

        fn = cancel_update

        async def go():
            r = await self._update(validate_task_id(task_id), fn)
            if r.status == TaskStatus.RUNNING:
                self._cancels.add(task_id)
                await self.nc.publish(f"{self.ns}.cancel.{task_id}", b"")
                await self._append_event(task_id, "cancel_requested", by_pid=os.getpid(), by_host=HOST)
            elif r.status.terminal:
                await self._resolve_waiting()
            return r

        return self._run(go())

    def cancel_requested(self, task_id: str) -> bool:
        """Whether a cancel was asked for: told on the cancel subject (at once), or seen in the record (read
        at most every CANCEL_POLL seconds per task)."""
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
            yes = self._run(go(), timeout=CANCEL_RETRY + 5)
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

    async def _on_cancel(self, msg) -> None:
        task_id = msg.subject.rsplit(".", 1)[-1]
        self._cancels.add(task_id)
        for handler in list(self._nudge_handlers):
            with contextlib.suppress(Exception):
                handler()

    def force_cancel(self, task_id: str, error: str) -> TaskRecord:
        """End a running task whose worker did not stop it in time: its record first (cancelled, lease dropped:
        the worker's later writes are refused; its worker stops claude), then its processes on this host."""
        doomed: list[TaskRecord] = []

        def fn(cur: TaskRecord) -> TaskRecord | None:
            doomed.clear()
            if cur.status.terminal:
                return None
            doomed.append(cur)
            return cur.model_copy(update={"status": TaskStatus.CANCELLED, "error": error, "lease": None})

        async def go():
            r = await self._update(validate_task_id(task_id), fn)
            if doomed:
                await self.nc.publish(f"{self.ns}.cancel.{task_id}", b"")
                await self._resolve_waiting()
            return r

        r = self._run(go())
        if doomed:
            self._stop_local(doomed[0], wait=True)
        return r

    def _stop_local(self, r: TaskRecord, wait: bool) -> None:
        """Stop the task's processes if they run on this host (a lost worker's claude and tools)."""
        if r.runner != "claude" or r.lease is None or r.lease.host != HOST:
            return
        root = procs.process_of(r.claude) if r.claude is not None else None
        others = [p for p in procs.task_processes(r.task_id) if root is None or p.pid != root.pid]
        if root is None and not others:
            return
        if wait:
            procs.stop_tree(root, others=others, grace_int=1.0)
        else:
            threading.Thread(
                target=procs.stop_tree, args=(root,), kwargs={"others": others, "grace_int": 1.0}, name="stop-lost"
            ).start()

    # -- nudges ---------------------------------------------------------------------
    def nudge(self) -> None:
        """Tell every worker to look at the queue now (a message on ``<ns>.nudge``)."""

        async def go():
            await self.nc.publish(f"{self.ns}.nudge", b"")

        self._run(go())

    def on_nudge(self, handler: Callable[[], None]) -> None:
        """Call ``handler`` (in the backend's thread: it must only set flags) on a nudge or a cancel."""
        self._nudge_handlers.append(handler)

        async def go():
            async def cb(msg):
                for h in list(self._nudge_handlers):
                    with contextlib.suppress(Exception):
                        h()

            await self.nc.subscribe(f"{self.ns}.nudge", cb=cb)
            if self._cancel_sub is None:
                self._cancel_sub = await self.nc.subscribe(f"{self.ns}.cancel.*", cb=self._on_cancel)

        self._run(go())

    def worker_known(self) -> bool:
        return True  # (workers run on their own; a nudge is one publish, never a start)

    def stop_worker(self) -> bool:
        return False

    def reap(self, wait: float = 0.0) -> None:
        return None

    # -- workers ------------------------------------------------------------------
    def register(self, info: WorkerInfo) -> None:
        self._run(self._kv_put(self.kv_workers, info.worker_id, info.model_dump_json().encode()))

    def heartbeat(self, worker_id: str) -> bool:
        """Keep the worker's leases alive (re-put its key, which the bucket's TTL would remove). False if it
        is not registered any more (expired or removed): it registers again."""

        async def go():
            e = await self._kv_get(self.kv_workers, worker_id)
            return e is not None and await self._cas(self.kv_workers, worker_id, e.value, e.revision)

        return self._run_patient(go())

    def unregister(self, worker_id: str) -> None:
        self._run(self._kv_delete(self.kv_workers, worker_id))

    def release_unsupervised(
        self,
        worker_id: str,
        supervised: Callable[[], tuple[set[tuple[str, int]], datetime]],
        abandoned: dict[tuple[str, int], tuple[bool, int]] | None = None,
    ) -> list[str]:
        """Put back in the queue the tasks leased to ``worker_id`` that it does not supervise (a claim whose
        answer was lost or that failed after its lease landed): they would stay running while its heartbeat
        keeps the lease alive. ``supervised()``: the (task id, epoch) it supervises and the time before which
        every lease it got is among them (a claim in flight may hold newer ones); called after the read, in the
        caller's thread. ``abandoned``: the worker's tasks whose supervisor it abandoned (its lease watch), each
        with whether that supervisor started claude and its own count of tool calls (the record may not have
        them: an outage came before its first flush). Such a task is a lost worker's (``_worker_lost``: an
        attempt counted, not run again if it used a tool); the quiet release is for leases never started. Read
        after ``supervised()``; entries for tasks no longer leased to the worker, or dealt with here, are removed."""

        async def read():
            return [
                r
                for _, r in (await self._unfinished()).values()
                if r.status == TaskStatus.RUNNING and r.runner == "claude" and r.lease and r.lease.worker == worker_id
            ]

        mine = self._run(read())
        keys, cutoff = supervised()
        gone = dict(abandoned or {})
        if abandoned is not None:
            ours = {(r.task_id, r.epoch) for r in mine}
            for k in [k for k in gone if k not in ours]:
                abandoned.pop(k, None)
        orphans = [r for r in mine if (r.task_id, r.epoch) not in keys and r.lease.acquired_at < cutoff]
        if not orphans:
            return []

        async def go():
            out, ended = [], False
            for r in orphans:
                lease = r.lease
                spawned, tools = gone.get((r.task_id, r.epoch), (False, 0))
                if spawned or r.claude is not None or r.progress.tool_calls:  # (claude ran: a lost worker's task)
                    why = f"worker {worker_id} no longer supervises it"
                    if spawned:
                        why = f"worker {worker_id} abandoned it after starting claude ({tools} tool calls)"
                    new = await self._worker_lost(r, why, force=True, tool_calls=tools)
                    if new is not r and not (new.status == TaskStatus.RUNNING and new.lease == lease):
                        ended = ended or new.status.terminal
                        out.append(r.task_id)
                        if abandoned is not None:
                            abandoned.pop((r.task_id, r.epoch), None)
                    continue
                did: list[bool] = []

                def fn(cur: TaskRecord, lease=lease, did=did) -> TaskRecord | None:
                    did.clear()
                    if cur.status != TaskStatus.RUNNING or not lease.same(cur.lease):
                        return None
                    if cur.claude is not None or cur.progress.tool_calls:
                        return None  # (claude started meanwhile: the next pass deals with it)
                    did.append(True)
                    if cur.cancel_requested:
                        return cur.model_copy(update={"status": TaskStatus.CANCELLED, "lease": None, "claude": None,
                                                      "error": "cancelled before its worker started it"})  # fmt: skip
                    return cur.model_copy(update={"status": TaskStatus.QUEUED, "lease": None, "claude": None,
                                                  "started_at": None, "progress": Progress()})  # fmt: skip

                try:
                    new = await self._update(r.task_id, fn)
                except (TaskNotFoundError, CorruptRecordError):
                    continue
                if did:
                    if abandoned is not None:
                        abandoned.pop((r.task_id, r.epoch), None)
                    ended = ended or new.status.terminal
                    log.warning("task %s: leased to worker %s, which does not run it: released", r.task_id, worker_id)
                    await self._append_event(r.task_id, "released", by=worker_id, reason="leased but not started")
                    out.append(r.task_id)
            if out:
                await self.nc.publish(f"{self.ns}.nudge", b"")
            if ended:
                await self._resolve_waiting()
            return out

        return self._run(go())

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

    async def _worker_alive(self, worker_id: str, max_age: float = 0.0) -> bool:
        now = time.monotonic()
        if now - self._seen_alive.get(worker_id, -1e9) < max_age:
            return True
        e = await self._kv_get(self.kv_workers, worker_id)
        alive = e is not None and bool(e.value)
        if alive:
            if len(self._seen_alive) > 1000:
                self._seen_alive.clear()
            self._seen_alive[worker_id] = now
        else:
            self._seen_alive.pop(worker_id, None)
        return alive

    async def _lease_alive(self, lease: Lease, max_age: float = 0.0) -> bool:
        if lease.expires_at is not None:
            return utcnow() < lease.expires_at
        return await self._worker_alive(lease.worker, max_age)

    def lease_alive(self, lease: Lease, max_age: float = 0.0) -> bool:
        return self._run(self._lease_alive(lease, max_age))

    # -- the worker is gone --------------------------------------------------------------
    def _settled(self) -> bool:
        """Whether this object has been connected for a whole lease: only then is a missing worker key a gone
        worker. Just after an outage (ours or the server's: a restarted server drops keys older than their TTL)
        live workers have not had the time to put their keys again."""
        return self._connected_at is not None and time.monotonic() - self._connected_at >= self.lease_seconds

    async def _check_lease(self, r: TaskRecord, max_age: float = 0.0) -> TaskRecord:
        if r.status != TaskStatus.RUNNING or (r.lease is not None and await self._lease_alive(r.lease, max_age)):
            return r
        if r.lease is not None and r.lease.expires_at is None and not self._settled():
            return r  # (not judged yet: see _settled)
        if r.lease is None:
            return await self._worker_lost(r, "it has no lease")
        if r.lease.expires_at is not None:
            return await self._worker_lost(
                r, f"{r.lease.worker!r} did not renew it by {r.lease.expires_at:%Y-%m-%d %H:%M:%S} UTC"
            )
        who = f"worker {r.lease.worker} (pid {r.lease.pid} on {r.lease.host})"
        return await self._worker_lost(r, f"{who} stopped renewing its lease (exited, killed, hung or cut off)")

    def worker_lost(self, r: TaskRecord, reason: str) -> TaskRecord:
        return self._run(self._worker_lost(r, reason))

    async def _worker_lost(self, r: TaskRecord, reason: str, force: bool = False, tool_calls: int = 0) -> TaskRecord:
        """The one place for "the worker is gone" (as TaskStore.worker_lost): the lease is dropped, so the
        lost worker's writes are refused from here on (its supervisor then stops claude); the task goes back
        to the queue as a new attempt when its run used no tool and attempts remain, else it ends failed (or
        cancelled if a cancel was asked for). Its processes are stopped if they run on this host. ``force``: the lease
        is not looked at (its own worker says it no longer runs the task); ``tool_calls``: the tool calls its worker
        counted (the record may have fewer)."""
        lease = r.lease
        doomed: list[TaskRecord] = []
        alive = await self._lease_alive(lease) if lease is not None and not force else False

        def fn(cur: TaskRecord) -> TaskRecord | None:
            doomed.clear()
            if cur.status != TaskStatus.RUNNING or (lease is not None and not lease.same(cur.lease)):
                return None  # someone else dealt with it
            if alive:
                return None  # renewed since ``r`` was read
            doomed.append(cur)
            return lost_update(cur, reason, acted=bool(cur.progress.tool_calls or tool_calls))

        try:
            new = await self._update(r.task_id, fn)
        except (TaskNotFoundError, CorruptRecordError):
            return r
        if not doomed:
            return new
        if new.status == TaskStatus.QUEUED:
            await self._append_event(r.task_id, "requeued", reason=reason, attempt=len(new.attempts) + 1)
            await self.nc.publish(f"{self.ns}.nudge", b"")
        self._stop_local(doomed[0], wait=False)
        if new.status.terminal:
            await self._resolve_waiting()
        return new

    # -- claim (worker side) -------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _queue_locked(self):
        """The claim lock: a key created if absent (the bucket's TTL frees a dead holder's after LOCK_TTL), its
        value a token of this holder's own. Yields ``still_ours()``: whether the key is still the one this
        holder created (a pass longer than LOCK_TTL may have lost it); call it just before leasing."""
        token = f"{HOST} {os.getpid()} {secrets.token_hex(8)}".encode()
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.002
        while True:
            try:
                rev = await _retrying(lambda: self.kv_lock.create("queue", token), "lock")
                break
            except jserr.KeyWrongLastSequenceError:
                e = await self._kv_get(self.kv_lock, "queue")
                if e is not None and e.value == token:  # (our create landed; its answer was lost and retried)
                    rev = e.revision
                    break
                if time.monotonic() > deadline:
                    raise Timeout(f"{self.address} queue lock") from None
                await asyncio.sleep(delay * (0.5 + secrets.randbelow(100) / 100))
                delay = min(0.05, delay * 1.5)

        async def still_ours() -> bool:
            e = await self._kv_get(self.kv_lock, "queue")
            return e is not None and e.revision == rev

        try:
            yield still_ours
        finally:
            try:
                await retrying(lambda: self.kv_lock.delete("queue", last=rev), what="unlock", deadline=5.0)
            except jserr.KeyWrongLastSequenceError:
                pass  # (not ours any more: expired and taken, or our delete landed before a retry)
            except Exception as e:  # (the bucket's TTL frees it)
                log.warning("%s: queue lock not released (%s); it expires in %g s", self.address, e, LOCK_TTL)

    def claim(self, worker: WorkerInfo, free_slots: int, fresh: bool = True) -> list[TaskRecord]:
        """Lease up to ``free_slots`` ready tasks to ``worker`` (highest priority, then oldest; only tasks whose
        labels it has and whose cwd exists here; never more running than ``max_concurrent``), under the queue
        lock, each by compare-and-set on its record. A task this worker cannot run says why in the index
        (``queue_note``)."""
        if free_slots <= 0:
            return []
        return self._run(self._claim(worker, free_slots))

    async def _claim(self, worker: WorkerInfo, free_slots: int) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        async with self._queue_locked() as still_ours:
            seen = await self._unfinished()
            records = {t: r for t, (_, r) in seen.items()}
            for t, r in list(records.items()):  # (a worker seen alive in this pass is not looked up again)
                records[t] = await self._check_lease(r, ALIVE_CACHE)
                if records[t].status.terminal:  # (a marker left behind by a crash or a race)
                    await self._kv_delete(self.kv_idx, f"a.{t}")
            records.update(await self._resolve_waiting(records))
            running = sum(r.status == TaskStatus.RUNNING and r.runner == "claude" for r in records.values())
            free = min(free_slots, self.max_concurrent - running)
            labels = set(worker.labels)
            picked: list[TaskRecord] = []
            for r in sorted((r for r in records.values() if ready(r) and r.runner == "claude"), key=queue_order):
                if len(picked) >= free:
                    break
                missing = sorted(set(r.labels) - labels)
                if missing:
                    await self._note(r.task_id, worker, f"lacks labels {missing}")
                    continue
                if not os.path.isdir(r.cwd):
                    await self._note(r.task_id, worker, f"has no directory {r.cwd}")
                    continue
                picked.append(r)
            # (all at once: each is a compare-and-set on the revision read, which only fails if the record
            # changed since, e.g. a cancel; that task is left for the next round)
            hints = {t: seen[t] for t in (r.task_id for r in picked) if seen[t][1] is records[t]}
            if picked and not await still_ours():  # (a pass longer than the lock's TTL: another claimer may be in)
                log.warning("%s: the queue lock expired during a claim pass; leasing nothing this pass", self.address)
                return out
            taken = await asyncio.gather(
                *(self._take(r.task_id, worker, hints.get(r.task_id)) for r in picked), return_exceptions=True
            )
            for r, rec in zip(picked, taken, strict=True):
                if isinstance(rec, BaseException):  # (the others' leases stand; this one is tried next round)
                    if not isinstance(rec, Exception):
                        raise rec
                    log.warning("task %s: lease failed: %s", r.task_id, rec)
                elif rec is not None:
                    out.append(rec)
        return out

    async def _note(self, task_id: str, worker: WorkerInfo, why: str) -> None:
        """Say in the index why ``worker`` does not take ``task_id`` (at most once a minute per worker)."""
        now = time.monotonic()
        if now - self._noted.get((task_id, worker.worker_id), -1e9) < 60:
            return
        if len(self._noted) > 10_000:
            self._noted.clear()
        self._noted[(task_id, worker.worker_id)] = now
        key = f"n.{task_id}"
        for _ in range(5):
            e = await self._kv_get(self.kv_idx, key)
            seen = {}
            if e is not None:
                with contextlib.suppress(ValueError):
                    seen = json.loads(e.value)
            seen[f"{worker.worker_id} on {worker.host}"] = why
            data = json.dumps(dict(list(seen.items())[-10:])).encode()
            if e is None:
                try:
                    await self.kv_idx.create(key, data)
                    return
                except jserr.KeyWrongLastSequenceError:
                    continue
            if await self._cas(self.kv_idx, key, data, e.revision):
                return

    async def _lease_task(
        self,
        task_id: str,
        runner: str,
        make_lease: Callable[[TaskRecord], Lease],
        hint: tuple[int, TaskRecord] | None = None,
    ) -> TaskRecord | None:
        taken: list[TaskRecord] = []
        mine: list[Lease] = []

        def fn(r: TaskRecord) -> TaskRecord | None:
            taken.clear()
            if mine and r.status == TaskStatus.RUNNING and mine[0].same(r.lease):
                taken.append(r)  # (our own write, landed though its acknowledgement was lost)
                return None
            if not ready(r) or r.runner != runner:
                return None
            lease = make_lease(r)
            mine[:] = [lease]
            update = {
                "status": TaskStatus.RUNNING,
                "started_at": lease.acquired_at,
                "epoch": lease.epoch,
                "lease": lease,
            }
            taken.append(r.model_copy(update=update))
            return taken[0]

        try:
            await self._update(task_id, fn, hint)
        except (TaskNotFoundError, CorruptRecordError):
            return None
        return taken[0] if taken else None

    async def _take(
        self, task_id: str, worker: WorkerInfo, hint: tuple[int, TaskRecord] | None = None
    ) -> TaskRecord | None:
        def lease(r: TaskRecord) -> Lease:
            return Lease(task_id=task_id, worker=worker.worker_id, epoch=r.epoch + 1, host=worker.host,
                         pid=worker.proc.pid)  # fmt: skip

        rec = await self._take_lease(task_id, lease, hint)
        if rec is not None:
            self._cancels.discard(task_id)
            self._cancel_checked.pop(task_id, None)
        return rec

    async def _take_lease(self, task_id, lease, hint=None):
        return await self._lease_task(task_id, "claude", lease, hint)

    def resolve_waiting(self) -> dict[str, TaskRecord]:
        return self._run(self._resolve_waiting())

    async def _resolve_waiting(self, records: dict[str, TaskRecord] | None = None) -> dict[str, TaskRecord]:
        """Move waiting tasks whose dependencies all completed to queued; skip those with one that did not
        (cascading). Runs when a task ends (and in every claim); returns the records it changed."""
        ids = await self._kv_keys(self.kv_idx, "w.")
        if not ids:
            return {}
        known = dict(records or {})
        changed: dict[str, TaskRecord] = {}
        again = True
        while again:
            again = False
            for t in ids:
                r = known.get(t) or await self._peek(t)
                if r is None or r.status != TaskStatus.WAITING:
                    if r is not None and r.status != TaskStatus.WAITING:
                        await self._kv_delete(self.kv_idx, f"w.{t}")
                    continue
                verdict, reason = TaskStatus.QUEUED, None
                for dep in r.depends_on:
                    d = known.get(dep) or await self._peek(dep)
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
                    new = await self._transition(t, verdict, **({"error": reason} if reason else {}))
                except (TaskNotFoundError, CorruptRecordError):
                    continue
                known[t] = changed[t] = new
                again = again or new.status != r.status
        if any(r.status == TaskStatus.QUEUED for r in changed.values()):
            await self.nc.publish(f"{self.ns}.nudge", b"")
        return changed

    # -- fenced writes (worker side) ---------------------------------------------------
    @staticmethod
    def _lost_message(lease: Lease, r: TaskRecord | None) -> str:
        if r is None:
            return f"task {lease.task_id}: the lease of worker {lease.worker} is no longer valid: the task is gone"
        holder = f"held by worker {r.lease.worker} (epoch {r.lease.epoch})" if r.lease else "held by no worker"
        return (
            f"task {lease.task_id}: the lease of worker {lease.worker} (epoch {lease.epoch}) is no longer valid: "
            f"the task is {r.status.value}, {holder}"
        )

    async def _fenced(self, lease: Lease, changes: Callable[[TaskRecord], dict]) -> TaskRecord:
        def fn(r: TaskRecord) -> TaskRecord:
            if r.status != TaskStatus.RUNNING or not lease.same(r.lease):
                raise LeaseLostError(self._lost_message(lease, r))
            return r.model_copy(update=changes(r))

        try:
            return await self._update(lease.task_id, fn)
        except (TaskNotFoundError, CorruptRecordError) as e:
            raise LeaseLostError(f"task {lease.task_id}: {e}") from None

    async def _holds(self, lease: Lease) -> TaskRecord | None:
        """The record if ``lease`` is still its lease, else raises LeaseLostError."""
        r = await self._peek(lease.task_id)
        if r is None or r.status != TaskStatus.RUNNING or not lease.same(r.lease):
            raise LeaseLostError(self._lost_message(lease, r))
        return r

    def holds(self, lease: Lease) -> bool:
        try:
            self._run_patient(self._holds(lease))
            return True
        except LeaseLostError:
            return False

    def renew(self, lease: Lease) -> None:
        """The heartbeat for one lease: raises LeaseLostError if it is no longer the task's."""

        async def go():
            e = await self._kv_get(self.kv_workers, lease.worker)
            beat = self._cas(self.kv_workers, lease.worker, e.value, e.revision) if e is not None else asyncio.sleep(0)
            await asyncio.gather(beat, self._holds(lease))

        self._run_patient(go())

    def event(self, lease: Lease, kind: str, **data) -> None:
        """Append to the task's events if ``lease`` still holds it (each carries the lease's epoch)."""

        async def go():
            await self._holds(lease)
            await self._append_event(lease.task_id, kind, epoch=lease.epoch, **data)

        self._run_patient(go())

    def progress(self, lease: Lease, **fields) -> TaskRecord:
        """Record live progress under ``lease``; the transcript so far is uploaded every LIVE_UPLOAD_EVERY
        seconds while it is small (readers elsewhere follow it; all of it is uploaded when the task ends)."""

        async def go():
            r = await self._fenced(lease, lambda r: fields)
            path = self.workspace(lease.task_id) / WORKSPACE_FILES["transcript"]
            try:
                size = path.stat().st_size
            except OSError:
                return r
            last = self._uploaded.get(lease.task_id, (0.0, -1))
            now = time.monotonic()
            if size != last[1] and size <= LIVE_UPLOAD_MAX and now - last[0] >= LIVE_UPLOAD_EVERY:
                self._uploaded[lease.task_id] = (now, size)
                await self._upload_workspace(lease, ("transcript",))
            return r

        return self._run_patient(go())

    def finish(self, lease: Lease, status: TaskStatus, result_text: str | None = None, **fields) -> TaskRecord:
        """End the task under ``lease``: upload its result and workspace files under the lease's epoch, then the
        final record (compare-and-set, fenced); then release or skip the tasks that wait for it."""

        async def go():
            result_name = f"{lease.task_id}.{lease.epoch}.result"
            uploads = [self._upload_workspace(lease)]
            if result_text is not None:
                uploads.append(self._obj_put(result_name, result_text.encode("utf-8", "surrogatepass")))
            # (the uploads go under the lease's epoch, so they may start before the lease is checked: a
            # superseded claim's outputs are never the ones read)
            done = await asyncio.gather(self._holds(lease), *uploads, return_exceptions=True)
            failed = [x for x in done if isinstance(x, BaseException)]
            if failed:
                if result_text is not None:
                    await self._obj_delete(result_name)
                raise failed[0]
            try:
                new = await self._fenced(lease, lambda r: {"status": status, **fields})
            except LeaseLostError:
                if result_text is not None:
                    await self._obj_delete(result_name)
                raise
            self._uploaded.pop(lease.task_id, None)
            await self._resolve_waiting()
            return new

        new = self._run_patient(go())
        shutil.rmtree(
            Path(tempfile.gettempdir()) / f"cc_tasks-nats-{os.getuid()}" / self.ns / lease.task_id, ignore_errors=True
        )
        return new

    # -- agents: a task board ---------------------------------------------------------
    def claim_agent(
        self, claimer: str, labels: list[str], group: str | None, lease_seconds: float
    ) -> tuple[TaskRecord, str] | None:
        """As TaskStore.claim_agent: the highest-priority, oldest ready agent task ``claimer`` may take, leased
        for ``lease_seconds``; returns the record and the lease token (only its SHA-256 is stored)."""
        mine = set(labels)

        async def go():
            async with self._queue_locked() as still_ours:
                records = await self._read_all(await self._active_ids())
                for t, r in list(records.items()):
                    if r.runner == "agent" and r.status == TaskStatus.RUNNING:
                        records[t] = await self._check_lease(r)
                records.update(await self._resolve_waiting(records))
                candidates = sorted(
                    (r for r in records.values() if ready(r) and r.runner == "agent" and set(r.labels) <= mine
                     and (group is None or r.group == group)),
                    key=queue_order,
                )  # fmt: skip
                if candidates and not await still_ours():
                    return None
                for r in candidates:
                    token = secrets.token_urlsafe(24)

                    def lease(rec: TaskRecord, token=token) -> Lease:
                        now = utcnow()
                        return Lease(task_id=rec.task_id, worker=claimer, epoch=rec.epoch + 1, acquired_at=now,
                                     expires_at=now + timedelta(seconds=lease_seconds), lease_seconds=lease_seconds,
                                     token_sha256=hashlib.sha256(token.encode()).hexdigest())  # fmt: skip

                    got = await self._lease_task(r.task_id, "agent", lease)
                    if got is not None:
                        return got, token
            return None

        return self._run(go())

    def sweep_agent_leases(self) -> int:
        async def go():
            n = 0
            for r in (await self._read_all(await self._active_ids())).values():
                if r.runner == "agent" and r.status == TaskStatus.RUNNING and r.lease is not None:
                    if not await self._lease_alive(r.lease):
                        await self._check_lease(r)
                        n += 1
            return n

        return self._run(go())

    def has_ready_agent_task(self, labels: list[str], group: str | None) -> bool:
        mine = set(labels)

        async def go():
            records = await self._read_all(await self._active_ids())
            for r in records.values():
                if r.runner != "agent":
                    continue
                if r.status == TaskStatus.RUNNING and r.lease is not None and not await self._lease_alive(r.lease):
                    return True
                if r.status == TaskStatus.WAITING:
                    deps = [records.get(d) or await self._peek(d) for d in r.depends_on]
                    if all(d is None or d.status.terminal for d in deps):
                        return True
                    continue
                if ready(r) and set(r.labels) <= mine and (group is None or r.group == group):
                    return True
            return False

        return self._run(go())

    async def _agent_op(self, task_id: str, token: str, changes: Callable[[TaskRecord], dict]) -> TaskRecord:
        digest = hashlib.sha256(token.encode()).hexdigest()
        expired: list[TaskRecord] = []

        def fn(r: TaskRecord) -> TaskRecord:
            expired.clear()
            lease = check_agent_lease(r, task_id, digest)
            if lease.expires_at is not None and utcnow() >= lease.expires_at:
                expired.append(r)
                raise LeaseLostError(
                    f"task {task_id}: the lease expired at {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC (renew_task "
                    "keeps it); the task went back to the queue or failed: claim_task again"
                )
            return r.model_copy(update=changes(r))

        try:
            return await self._update(validate_task_id(task_id), fn)
        finally:
            if expired:
                await self._check_lease(expired[0])

    def renew_agent(self, task_id: str, token: str, note: str | None = None) -> TaskRecord:
        def changes(r: TaskRecord) -> dict:
            return agent_renewed(r, note)

        async def go():
            r = await self._agent_op(task_id, token, changes)
            await self._append_event(task_id, "renewed", by=r.lease.worker, until=r.lease.expires_at, note=note)
            return r

        return self._run(go())

    def complete_agent(self, task_id: str, token: str, result: str, preview_chars: int) -> TaskRecord:
        async def go():
            r0 = await self._load(validate_task_id(task_id))
            epoch = r0.lease.epoch if r0.lease else r0.epoch
            name = f"{task_id}.{epoch}.result"
            await self._obj_put(name, result.encode("utf-8", "surrogatepass"))

            def changes(r: TaskRecord) -> dict:
                if r.epoch != epoch:
                    raise LeaseLostError(f"task {task_id}: it was claimed again meanwhile; claim_task again")
                return agent_completed(r, result, preview_chars)

            try:
                r = await self._agent_op(task_id, token, changes)
            except LeaseLostError:
                await self._obj_delete(name)
                raise
            await self._resolve_waiting()
            return r

        return self._run(go())

    def fail_agent(self, task_id: str, token: str, error: str, retry: bool) -> TaskRecord:
        def changes(r: TaskRecord) -> dict:
            return agent_failed(r, error, retry)

        async def go():
            r = await self._agent_op(task_id, token, changes)
            if r.status == TaskStatus.QUEUED:
                await self._append_event(
                    task_id, "requeued", reason=f"failed: {error[:500]}", attempt=len(r.attempts) + 1
                )
            else:
                await self._resolve_waiting()
            return r

        return self._run(go())

    def release_agent(self, task_id: str, token: str) -> TaskRecord:
        by: list[str] = []

        def changes(r: TaskRecord) -> dict:
            by[:] = [r.lease.worker]
            return {"status": TaskStatus.QUEUED, "lease": None, "started_at": None}

        async def go():
            r = await self._agent_op(task_id, token, changes)
            await self._append_event(task_id, "released", by=by[0] if by else None)
            return r

        return self._run(go())

    # -- group notes ---------------------------------------------------------------
    def _notes_subject(self, group: str) -> str:
        try:
            check_group(group)
        except ValueError as e:
            raise InvalidOptionsError(str(e)) from None
        return f"{self.ns}.notes.{group.encode().hex()}"

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> int:
        """Append a note to the group's notes (a compare-and-set on the subject's last sequence); returns its
        position."""
        subject = self._notes_subject(group)

        async def go():
            while True:
                try:
                    last = await _retrying(lambda: self.js.get_msg(self.notes_stream, subject=subject), "get")
                    last_seq, seq = last.seq, json.loads(last.data)["seq"] + 1
                except jserr.NotFoundError:
                    last_seq, seq = 0, 0
                line = {"seq": seq, "ts": time.time(), "key": key, "by": by, "text": text}
                data = json.dumps(line).encode("utf-8", "surrogatepass")
                headers = {"Nats-Expected-Last-Subject-Sequence": str(last_seq)}
                try:
                    await _retrying(
                        lambda d=data, h=headers: self.js.publish(subject, d, stream=self.notes_stream, headers=h),
                        "note",
                    )
                    return seq
                except jserr.APIError as e:
                    if e.err_code in (10071, 10164):
                        continue
                    raise

        return self._run(go())

    def iter_notes(self, group: str, since: int = 0) -> Iterator[dict]:
        subject = self._notes_subject(group)
        notes = []
        for _, raw in self._run(self._walk(self.notes_stream, subject, 0, {})):
            with contextlib.suppress(ValueError):
                n = json.loads(raw)
                if isinstance(n, dict) and isinstance(n.get("seq"), int):
                    notes.append(n)
        last = {n["key"]: n["seq"] for n in notes if n.get("key")}
        for n in notes:
            if n["seq"] >= since and (not n.get("key") or last[n["key"]] == n["seq"]):
                yield n
