"""The JetStream plumbing under nats_repo.NatsRepo: the connection and its event loop, the namespace's buckets and
streams (their layout is in nats_repo's docstring), the KV, object and stream primitives, the claim lock and the
records watcher. I/O only: what the values mean is nats_repo's.

nats-py is asyncio: each object runs one event loop in a daemon thread and its sync methods submit coroutines to
it with ``asyncio.run_coroutine_threadsafe``. Calls that fail for a while (a JetStream leader election) are
retried with backoff for RETRY_FOR seconds, or until the server answers in a worker's writes (``repo.PATIENT``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
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
from .repo import PATIENT
from .states import TaskStatus

log = logging.getLogger("cc_tasks")
LOCK_TTL = 30.0
LOCK_WAIT = 60.0
#: Outputs kept in memory for paging (in all; each at most a quarter of it).
OBJ_CACHE_BYTES = 128 << 20
RETRY_FOR = 30.0
#: A record's status, without parsing the record (the records watcher looks at every write).
STATUS_RE = re.compile(rb'"status":"([a-z_]+)"')
#: The finished statuses as a record's JSON has them: the records watcher keeps nothing of those records.
FINISHED = frozenset(s.value.encode() for s in TaskStatus if s.terminal)
#: JetStream's "wrong last sequence" error codes (a compare-and-set that lost).
WRONG_LAST = (10071, 10164)


async def _retrying(fn: Callable[[], Awaitable], what: str = "nats"):
    """nats_conn.retrying for RETRY_FOR seconds, without end in a worker's writes (``repo.PATIENT``)."""
    return await retrying(fn, what=what, deadline=FOREVER if PATIENT.get() else RETRY_FOR)


class JetStreamClient:
    """A connection to a namespace of JetStream (see the module docstring); nats_repo.NatsRepo is the repo over it.
    ``url``: ``nats://[user:pass@]host:port[/NS][?ns=NS&replicas=N]``."""

    def __init__(
        self, url: str, *, lease_seconds: float, settings: NatsSettings | None = None, **files: str | None
    ) -> None:
        """``files``: creds, nkey, tls_ca, tls_cert, tls_key (the ``--nats-*`` flags; the environment's
        CC_TASKS_NATS_* otherwise); ``settings`` instead of the URL's and the files' (nats_conn). ``lease_seconds``:
        the workers bucket's TTL if this object creates it (its first opener's stands)."""
        self.url = url
        self.settings = settings or nats_settings(url, **files)
        self.ns, self.replicas = self.settings.namespace, self.settings.replicas
        self.NS = self.ns.upper()
        self.lease_seconds = lease_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-{self.ns}", daemon=True)
        self._thread.start()
        self._log_seqs: dict[str, list[int]] = {}
        self._obj_cache: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._obj_cached = 0
        #: The records watcher: each unfinished task's (revision, value) last seen, the highest revision seen.
        self._recs: dict[str, tuple[int, bytes]] = {}
        self._recs_seq = 0
        self._recs_sub = None
        self._recs_lock = asyncio.Lock()  # (one subscription, whoever starts it first)
        self._recs_moved = asyncio.Event()
        self._closing = False
        #: Each task's status as the records watcher last saw it, and a count of the changes (activity).
        self._statuses: dict[str, bytes] = {}
        self._activity = 0
        #: When this object's connection last came up (None while it is down): see NatsRepo._settled.
        self._connected_at: float | None = None
        try:
            self._run(self._setup())
        except BaseException:
            self._shutdown(drain=False)
            raise

    @property
    def address(self) -> str:
        return redacted(self.url)

    # -- the event loop ----------------------------------------------------------
    def _run(self, coro, timeout: float | None = 300.0, patient: bool | None = None):
        """Run ``coro`` on the loop and wait for it. In a patient caller (``repo.PATIENT``, unless ``patient``
        says otherwise) it is retried until the server answers, and waited for without a timeout."""
        patient = PATIENT.get() if patient is None else patient

        async def go():
            PATIENT.set(patient)  # (in this task's context: the loop's retries see it)
            return await coro

        fut = asyncio.run_coroutine_threadsafe(go(), self._loop)
        try:
            return fut.result(None if patient else timeout)
        except TimeoutError:
            fut.cancel()  # (never left running behind the caller's back: a claim that outlived it leases nothing)
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
        self.kv_meta = await self._bucket(f"{NS}_META")
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

        async def close():
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
            self._run(close(), timeout=10, patient=False)
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

    async def _cas(self, kv, key: str, value: bytes | None, rev: int | None) -> int | None:
        """Write ``value`` (None: a delete marker) if the key is still at ``rev`` (None: absent); the new revision
        (0 for a delete), or None if it was not. A retry after a lost acknowledgement that finds our own write
        (or the key gone, for a delete) counts as landed."""
        retried = False

        async def attempt():
            nonlocal retried
            try:
                if value is None:
                    await kv.delete(key, last=rev)
                    return 0
                return await (kv.create(key, value) if rev is None else kv.update(key, value, last=rev))
            except Exception as e:
                retried = retried or is_transient(e)
                raise

        try:
            return await _retrying(attempt, "kv update")
        except jserr.BadRequestError as e:
            if not isinstance(e, jserr.KeyWrongLastSequenceError) and e.err_code not in WRONG_LAST:
                raise  # (a delete's conflict is not translated by nats-py)
            if retried:
                e = await self._kv_get(kv, key)
                if value is None and e is None:
                    return 0
                if e is not None and e.value == value:
                    return e.revision
            return None

    # -- the records watcher ---------------------------------------------------------------
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
                if status in FINISHED:  # (only unfinished records are asked for: keep nothing of the rest)
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

    # -- objects: requests and outputs -----------------------------------------------------
    async def _obj_put(self, name: str, data: bytes | io.BufferedIOBase) -> None:
        async def put():
            if not isinstance(data, bytes):
                data.seek(0)
            return await self.obs.put(name, data)

        await _retrying(put, "object put")

    async def _obj_get(self, name: str, cache: bool = False) -> bytes | None:
        """The object's bytes, read chunk by chunk with direct stream reads (``ObjectStore.get`` makes an
        ephemeral consumer per call, which the server keeps for seconds after: a burst of reads reached the
        server's consumer limit, error 10026). None if there is no such object. ``cache``: kept in memory by
        the object's nuid and digest (a new upload has others), so paging through it reads it once."""
        for _ in range(5):  # (an upload replacing it meanwhile purges the chunks being read: read it again)
            try:
                info = await _retrying(lambda: self.obs.get_info(name), "object info")
            except (jserr.ObjectNotFoundError, jserr.ObjectDeletedError, jserr.NotFoundError):
                return None
            if not info.size or not info.nuid:
                return b""
            tag = f"{info.nuid}:{info.digest}"
            hit = self._obj_cache.get(name)
            if cache and hit is not None and hit[0] == tag:
                self._obj_cache.move_to_end(name)
                return hit[1]
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
            if digest and base64.urlsafe_b64encode(h.digest()).decode().rstrip("=") != digest:
                continue
            data = buf.getvalue()
            if cache and len(data) <= OBJ_CACHE_BYTES // 4:
                self._cache_put(name, tag, data)
            return data
        return None

    def _cache_put(self, name: str, tag: str, data: bytes) -> None:
        old = self._obj_cache.pop(name, None)
        self._obj_cached += len(data) - (len(old[1]) if old else 0)
        self._obj_cache[name] = (tag, data)
        while self._obj_cached > OBJ_CACHE_BYTES:
            self._obj_cached -= len(self._obj_cache.popitem(last=False)[1][1])

    async def _obj_delete(self, name: str) -> None:
        with contextlib.suppress(jserr.ObjectNotFoundError, jserr.ObjectDeletedError, jserr.NotFoundError):
            await _retrying(lambda: self.obs.delete(name), "object delete")

    # -- streams -----------------------------------------------------------------------------
    async def _publish(self, stream: str, subject: str, entry: dict, headers: dict[str, str]) -> None:
        """``headers`` has a message id: a retry after a lost acknowledgement is recognised by the stream."""
        data = json.dumps(entry, default=str).encode("utf-8", "surrogatepass")
        await _retrying(lambda: self.js.publish(subject, data, stream=stream, headers=headers), "publish")

    async def _walk(self, stream: str, subject: str, since: int) -> tuple[list[tuple[int, bytes]], list[int]]:
        """The messages on ``subject`` from position ``since`` (positions: order on the subject), and the stream
        sequence of every position. Those are kept, so the next walk starts where this one ended."""
        seqs = self._log_seqs.setdefault(subject, [])
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
        if len(self._log_seqs) > 2000:
            self._log_seqs.clear()
        return out, seqs

    # -- the claim lock -----------------------------------------------------------------
    async def _lock(self) -> int:
        """A key created if absent (the bucket's TTL frees a dead holder's after LOCK_TTL), its value a token of
        this holder's own; its revision."""
        token = f"{HOST} {os.getpid()} {secrets.token_hex(8)}".encode()
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.002
        while True:
            rev = await self._cas(self.kv_lock, "queue", token, None)  # (a lost answer that landed is ours)
            if rev is not None:
                return rev
            if time.monotonic() > deadline:
                raise Timeout(f"{self.address} queue lock")
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(100) / 100))
            delay = min(0.05, delay * 1.5)

    async def _still_ours(self, rev: int) -> bool:
        e = await self._kv_get(self.kv_lock, "queue")
        return e is not None and e.revision == rev

    async def _unlock(self, rev: int) -> None:
        try:
            await retrying(lambda: self.kv_lock.delete("queue", last=rev), what="unlock", deadline=5.0)
        except jserr.BadRequestError as e:
            if e.err_code not in WRONG_LAST:  # (else not ours any more: expired and taken, or our delete landed)
                log.warning("%s: queue lock not released (%s); it expires in %g s", self.address, e, LOCK_TTL)
        except Exception as e:  # (the bucket's TTL frees it)
            log.warning("%s: queue lock not released (%s); it expires in %g s", self.address, e, LOCK_TTL)
