"""The JetStream plumbing under nats_repo.NatsRepo (layout in its docstring): each object runs an asyncio loop in a
thread; failing calls (a leader election) are retried for RETRY_FOR s, or without end in a worker's writes (PATIENT)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors as jserr
from filelock import Timeout
from nats.js.api import DeliverPolicy, StreamConfig

from .errors import BackendUnreachableError
from .ids import HOST
from .nats_conn import FOREVER, NatsSettings, connect, is_transient, nats_settings, redacted, retrying
from .repo import PATIENT, Capabilities
from .states import TaskStatus

log = logging.getLogger("cc_tasks")
LOCK_TTL = 30.0
LOCK_WAIT = 60.0
OBJ_CACHE_BYTES = 128 << 20  # (outputs kept in memory for paging, in all; each at most a quarter of it)
RETRY_FOR = 30.0
STATUS_RE = re.compile(rb'"status":"([a-z_]+)"')  # (the records watcher sees every write: no parsing)
FINISHED = frozenset(s.value.encode() for s in TaskStatus if s.terminal)
WRONG_LAST = (10071, 10164)  # (JetStream's "wrong last sequence": a compare-and-set that lost)
OBJ_GONE = (jserr.ObjectNotFoundError, jserr.ObjectDeletedError, jserr.NotFoundError)


async def _retrying(fn: Callable[[], Awaitable], what: str = "nats"):
    return await retrying(fn, what=what, deadline=FOREVER if PATIENT.get() else RETRY_FOR)


def blocking(method: Callable[..., Awaitable]) -> Callable:
    """A coroutine method as a sync one: run on the object's loop and waited for (``_run``)."""
    return functools.wraps(method)(lambda self, *args, **kwargs: self._run(method(self, *args, **kwargs)))


class JetStreamClient:
    def __init__(
        self, url: str, *, lease_seconds: float, settings: NatsSettings | None = None, **files: str | None
    ) -> None:
        """``url``: ``nats://[user:pass@]host:port[/NS][?ns=NS&replicas=N]``; ``files``: the ``--nats-*`` files."""
        self.url, self.address, self.settings = url, redacted(url), settings or nats_settings(url, **files)
        self.ns, self.replicas = self.settings.namespace, self.settings.replicas
        self.NS, self.lease_seconds = self.ns.upper(), lease_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{self.ns}", daemon=True)
        self._thread.start()
        self._log_seqs: dict[str, list[int]] = {}  # (subject -> each position's stream sequence)
        self._obj_cache, self._obj_cached = OrderedDict(), 0  # (name -> (nuid:digest, bytes); their size)
        #: The records watcher's: unfinished tasks' (revision, value), status and record, the last revision seen.
        self._recs, self._statuses, self._parsed = {}, {}, {}
        self._recs_seq = self._activity = 0
        self._recs_sub = self._cancel_sub = self._nudge_sub = None
        self._recs_lock, self._recs_moved = asyncio.Lock(), asyncio.Event()
        self._recs_starting = self._closing = False
        #: Tasks told cancelled; each task's cancel check (when, what); the subscribers' handlers.
        self._cancels, self._cancel_checked, self._handlers = set(), {}, []
        self._connected_at: float | None = None  # (None while the connection is down)
        try:
            self._run(self._setup())
        except BaseException:
            self.close(drain=False)
            raise
        self.caps = Capabilities(kind="nats", remote=True, lost_claims=True, lease_seconds=self.lease_seconds)

    def _run(self, coro, timeout: float | None = 300.0, patient: bool | None = None):
        """Run ``coro`` on the loop and wait for it (without a timeout if ``patient``, by default ``repo.PATIENT``)."""
        patient = PATIENT.get() if patient is None else patient

        async def go():
            PATIENT.set(patient)  # (in this task's context: the loop's retries see it)
            return await coro

        fut = asyncio.run_coroutine_threadsafe(go(), self._loop)
        try:
            return fut.result(None if patient else timeout)
        except TimeoutError:
            fut.cancel()  # (a claim that outlived its caller leases nothing)
            raise

    async def _setup(self) -> None:
        async def on_disconnect() -> None:
            self._connected_at = None
            if not self._closing:
                log.warning("nats: disconnected from %s; reconnecting", self.settings.url)

        async def on_reconnect() -> None:
            self._connected_at = time.monotonic()

        settings = self.settings.model_copy(update={"name": f"cc-tasks {HOST} {os.getpid()}"})
        self.nc = await connect(settings, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        self._connected_at = time.monotonic()
        self.js = self.nc.jetstream(timeout=5.0)
        NS, r = self.NS, self.replicas
        try:
            self.kv_tasks = await self._bucket(f"{NS}_TASKS")
            self.kv_req = await self._bucket(f"{NS}_REQ")
            self.kv_idx = await self._bucket(f"{NS}_IDX")
            self.kv_workers = await self._bucket(f"{NS}_WORKERS", ttl=self.lease_seconds)
            self.kv_lock = await self._bucket(f"{NS}_LOCK", ttl=LOCK_TTL)
            self.kv_meta = await self._bucket(f"{NS}_META")
            try:
                self.obs = await self.js.object_store(f"{NS}_OUT")
            except jserr.NotFoundError:
                self.obs = await self.js.create_object_store(f"{NS}_OUT", replicas=r)
            self.obj_stream, self.ev_stream, self.notes_stream = f"OBJ_{NS}_OUT", f"{NS}_EV", f"{NS}_NOTES"
            for name, subject in ((self.ev_stream, f"{self.ns}.ev.*"), (self.notes_stream, f"{self.ns}.notes.*")):
                try:
                    await self.js.stream_info(name)
                except jserr.NotFoundError:
                    with contextlib.suppress(jserr.BadRequestError):
                        await self.js.add_stream(StreamConfig(name=name, subjects=[subject], num_replicas=r))
            info = await self.js.stream_info(f"KV_{NS}_WORKERS")
            if info.config.max_age:  # (the bucket's TTL is the lease: its first opener set it)
                self.lease_seconds = float(info.config.max_age)
        except (jserr.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
            url = self.settings.url
            why = f"on {url} does not answer ({type(e).__name__}); check that a majority of a cluster is up"
            if not (self.nc._server_info or {}).get("jetstream"):  # (the server's INFO says whether it has it)
                why = f"is not enabled on {url}: start nats-server with -js (or a jetstream {{}} block in its "
                why += "configuration)"
            raise BackendUnreachableError(f"JetStream {why}") from None

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

    def close(self, drain: bool = True) -> None:
        self._closing = True
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._disconnect(drain), timeout=10, patient=False)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _disconnect(self, drain: bool) -> None:
        if (nc := getattr(self, "nc", None)) is None:
            return
        with contextlib.suppress(Exception):  # (None: AttributeError)
            await self._recs_sub.unsubscribe()
        if drain:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)
        with contextlib.suppress(Exception):
            await nc.close()  # (a no-op once drained)
        # (let the client's own tasks see their cancellation before the loop stops)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _kv_get(self, kv, key: str):
        with contextlib.suppress(jserr.KeyNotFoundError, jserr.KeyDeletedError):  # (None)
            return await _retrying(lambda: kv.get(key), "kv get")

    async def _kv_put(self, kv, key: str, value: bytes) -> int:
        return await _retrying(lambda: kv.put(key, value), "kv put")

    async def _kv_delete(self, kv, key: str) -> None:
        """Purge the key's messages (no delete marker is left: _kv_keys lists subjects)."""
        await _retrying(lambda: self.js.purge_stream(kv._stream, subject=f"{kv._pre}{key}"), "kv remove")

    async def _kv_keys(self, kv, prefix: str = "") -> list[str]:
        """The keys (less ``prefix``) starting with ``prefix``, as the stream's leader has them (no watcher's lag)."""
        pre = f"{kv._pre}{prefix}"
        info = await _retrying(lambda: self.js.stream_info(kv._stream, subjects_filter=f"{pre}>"), "stream info")
        return [subject[len(pre) :] for subject in (info.state.subjects or {})]

    async def _cas(self, kv, key: str, value: bytes | None, rev: int | None) -> int | None:
        """Write ``value`` (None: delete) if the key is still at ``rev`` (None: absent): the new revision or None."""
        transient = []

        async def attempt():
            try:
                if value is None:
                    await kv.delete(key, last=rev)
                    return 0
                return await (kv.create(key, value) if rev is None else kv.update(key, value, last=rev))
            except Exception as e:
                transient.append(is_transient(e))
                raise

        try:
            return await _retrying(attempt, "kv update")
        except jserr.BadRequestError as e:
            if not isinstance(e, jserr.KeyWrongLastSequenceError) and e.err_code not in WRONG_LAST:
                raise  # (a delete's conflict is not translated by nats-py)
            if any(transient):  # (retried after a lost answer: our write, or the key gone, counts as landed)
                e = await self._kv_get(kv, key)
                if value is None and e is None:
                    return 0
                if e is not None and e.value == value:
                    return e.revision
            return None

    async def _watch_records(self) -> None:
        """Follow the task records (one ordered consumer; finished records are not kept, results are large)."""
        async with self._recs_lock:
            if self._recs_sub is None:
                self._recs_sub = await self.js.subscribe(
                    f"$KV.{self.NS}_TASKS.>",
                    cb=self._on_record,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                    inactive_threshold=30.0,  # (removed by the server this long after this object is gone)
                )

    async def _on_record(self, msg) -> None:
        key = msg.subject[len(f"$KV.{self.NS}_TASKS.") :]
        seq = msg.metadata.sequence.stream
        removed = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
        m = None if removed else STATUS_RE.search(msg.data or b"")
        status = m.group(1) if m else b""
        if removed or self._statuses.get(key) != status:
            self._activity += 1
        if removed or status in FINISHED:
            self._recs.pop(key, None)
            self._statuses.pop(key, None)
        else:
            self._recs[key], self._statuses[key] = (seq, msg.data), status
        self._recs_seq = max(self._recs_seq, seq)
        self._recs_moved.set()

    async def _obj_put(self, name: str, data: bytes | io.BufferedIOBase) -> None:
        async def put():
            if not isinstance(data, bytes):
                data.seek(0)
            return await self.obs.put(name, data)

        await _retrying(put, "object put")

    async def _obj_get(self, name: str, cache: bool = False) -> bytes | None:
        """None if absent. Direct gets (``obs.get`` makes a consumer per call: bursts hit 10026); ``cache``: paging."""
        for _ in range(5):  # (an upload replacing it meanwhile purges the chunks being read: read it again)
            try:
                info = await _retrying(lambda: self.obs.get_info(name), "object info")
            except OBJ_GONE:
                return None
            if not info.size or not info.nuid:
                return b""
            tag = f"{info.nuid}:{info.digest}"
            if cache and self._obj_cache.get(name, ("",))[0] == tag:
                self._obj_cache.move_to_end(name)
                return self._obj_cache[name][1]
            subject, buf, seq = f"$O.{self.NS}_OUT.C.{info.nuid}", io.BytesIO(), 1
            while buf.tell() < info.size and (m := await self._next_msg(self.obj_stream, subject, seq)) is not None:
                buf.write(m.data or b"")
                seq = m.seq + 1
            data, digest = buf.getvalue(), (info.digest or "").partition("=")[2].rstrip("=")
            sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")
            if len(data) < info.size or (digest and sha != digest):  # (a chunk purged, or not what was uploaded)
                continue
            if cache and len(data) <= OBJ_CACHE_BYTES // 4:
                self._obj_cached += len(data) - len(self._obj_cache.pop(name, ("", b""))[1])
                self._obj_cache[name] = (tag, data)
                while self._obj_cached > OBJ_CACHE_BYTES:
                    self._obj_cached -= len(self._obj_cache.popitem(last=False)[1][1])
            return data
        return None

    async def _obj_delete(self, name: str) -> None:
        with contextlib.suppress(*OBJ_GONE):
            await _retrying(lambda: self.obs.delete(name), "object delete")

    async def _publish(self, stream: str, subject: str, entry: dict, headers: dict[str, str]) -> None:
        """``headers`` has a message id: a retry after a lost acknowledgement is recognised by the stream."""
        data = json.dumps(entry, default=str).encode("utf-8", "surrogatepass")
        await _retrying(lambda: self.js.publish(subject, data, stream=stream, headers=headers), "publish")

    async def _next_msg(self, stream: str, subject: str, seq: int):
        with contextlib.suppress(jserr.NotFoundError):
            return await _retrying(lambda: self.js.get_msg(stream, seq=seq, subject=subject, next=True), "get")

    async def _walk(self, stream: str, subject: str, since: int) -> tuple[list[tuple[int, bytes]], list[int]]:
        """(position, data) on ``subject`` from ``since``, and each position's stream sequence (kept for the next)."""
        seqs, out = self._log_seqs.setdefault(subject, []), []
        seq, pos = (seqs[since], since) if since < len(seqs) else ((seqs[-1] + 1 if seqs else 1), len(seqs))
        while (m := await self._next_msg(stream, subject, seq)) is not None:
            if pos == len(seqs):
                seqs.append(m.seq)
            if pos >= since:
                out.append((pos, m.data or b""))
            pos, seq = pos + 1, m.seq + 1
        if len(self._log_seqs) > 2000:
            self._log_seqs.clear()
        return out, seqs

    async def _lock(self) -> int:
        """Create the key with a token of this holder's (the bucket's TTL frees a dead holder's); its revision."""
        token = f"{HOST} {os.getpid()} {secrets.token_hex(8)}".encode()
        deadline, delay = time.monotonic() + LOCK_WAIT, 0.002
        while True:
            if (rev := await self._cas(self.kv_lock, "queue", token, None)) is not None:  # (a lost answer: ours)
                return rev
            if time.monotonic() > deadline:
                raise Timeout(f"{self.address} queue lock")
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(100) / 100))
            delay = min(0.05, delay * 1.5)

    async def _unlock(self, rev: int) -> None:
        try:
            await retrying(lambda: self.kv_lock.delete("queue", last=rev), what="unlock", deadline=5.0)
        except Exception as e:  # (a wrong last sequence: not ours any more, expired and taken, or our delete landed)
            if not (isinstance(e, jserr.BadRequestError) and e.err_code in WRONG_LAST):
                log.warning("%s: queue lock not released (%s); it expires in %g s", self.address, e, LOCK_TTL)
