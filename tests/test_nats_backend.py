"""The NATS backend end to end: a worker process (``python -m cc_tasks.worker --backend URL``) runs fake-claude
tasks that a server submitted without a claude binary or a local store; cancels from another process reach a
running task; results are read by other backend objects; a task no worker can run stays queued and says why;
credentials never reach a record, a reply or claude's environment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import nats.errors
import pytest

from cc_tasks import nats_repo
from cc_tasks.config import Settings
from cc_tasks.connect import open_backend
from cc_tasks.errors import BackendUnreachableError
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions, TaskRecord, TaskRequest, TaskStatus, utcnow
from cc_tasks.nats_backend import NatsBackend
from cc_tasks.nats_conn import nats_settings, redacted
from cc_tasks.store import new_task_id

from .backends import worker_info
from .conftest import ROOT, pid_alive
from .nats_servers import start_nats
from .test_manager import fake, wait_until

pytestmark = pytest.mark.timeout(90)


def start_worker(url: str, claude: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    e = {**os.environ, "CC_TASKS_CLAUDE_BIN": claude, "WORKER_ONLY": "worker-env", **(env or {})}
    for k in ("CC_TASKS_BACKEND", "SUBMITTER_SECRET", "CC_TASKS_DIR"):  # (the server's, not the worker's)
        e.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", "cc_tasks.worker", "--backend", url, "--cancel-on-exit", *args],
        cwd=str(ROOT),
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture
def url(nats_url) -> str:
    return nats_url


@pytest.fixture
def server(url, tmp_path, monkeypatch):
    """A manager on the NATS backend with no claude binary and no usable store: both are the workers'."""
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", str(tmp_path / "no-claude-here"))
    monkeypatch.setenv("CC_TASKS_DIR", str(tmp_path / "no-store"))
    monkeypatch.setenv("SUBMITTER_SECRET", "do-not-ship")
    m = TaskManager(Settings.from_env())
    yield m
    for s in m.list().tasks:
        m.store.request_cancel(s.task_id)
    m.store.close()
    assert not (tmp_path / "no-store").exists()


def test_urls_name_a_namespace_and_hide_credentials():
    s = nats_settings("nats://u:p@h:4222/team-a?replicas=3", env={})
    assert (s.servers, s.namespace, s.replicas, s.url) == (
        ("nats://h:4222",),
        "team-a",
        3,
        "nats://h:4222/team-a?replicas=3",
    )
    assert nats_settings("nats://h:4222", env={}).namespace == "cc_tasks"
    assert nats_settings("tls://h:4222?ns=x", env={}).namespace == "x"
    assert redacted("nats://u:secret@h:4222/ns") == "nats://h:4222/ns"


async def test_a_worker_process_runs_tasks_submitted_without_claude(server, url, fake_claude, workdir):
    worker = start_worker(url, fake_claude, "--slots", "2", "--label", "repo-a")
    try:
        a = server.start(TaskOptions(prompt=fake({"result": "A" * 70_000, "argv": True, "env_keys": ["SUBMITTER_SECRET", "WORKER_ONLY", "TASK_VAR"]}), cwd=str(workdir), env={"TASK_VAR": "given"}))  # fmt: skip
        b = server.start(TaskOptions(prompt=fake({"result": "B"}), cwd=str(workdir), depends_on=[a.task_id],
                                     include_dependency_results=True, labels=["repo-a"]))  # fmt: skip
        done = await server.wait([a.task_id, b.task_id], timeout=60)
        assert done.done and [t.status for t in done.tasks] == [TaskStatus.COMPLETED] * 2
        seen = json.loads((workdir / "argv.json").read_text())
        assert seen["env"] == {"SUBMITTER_SECRET": None, "WORKER_ONLY": "worker-env", "TASK_VAR": "given"}
        other = NatsBackend(url)  # another process's view: one KV get per record, outputs from the object store
        try:
            data, total = other.read_output(a.task_id, "result", 69_990, 100)
            assert total == 70_000 and data == b"A" * 10
            assert b'"type":"result"' in other.read_output(a.task_id, "transcript", 0, 1 << 20)[0].replace(b" ", b"")
            assert b"A" * 100 in other.read_output(b.task_id, "prompt", 0, 1 << 20)[0]  # (the dependency's result)
            assert other.read(b.task_id).result == "B"
        finally:
            other.close()
        info = server.server_info()
        assert info.backend == "nats" and info.store_dir == url
        assert [w.labels for w in info.workers] == [["repo-a"]]
        kinds = [e["kind"] for e in server.events(a.task_id).events]
        assert kinds[0] == "status" and "started" in kinds and kinds[-1] == "status"
    finally:
        stop(worker)


async def test_a_cancel_from_another_process_reaches_a_running_task_within_2_s(server, url, fake_claude, workdir):
    worker = start_worker(url, fake_claude)
    try:
        r = server.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
        rec = wait_until(lambda: (x := server.get(r.task_id)).claude and x)
        code = f"from cc_tasks.nats_backend import NatsBackend; NatsBackend({url!r}).request_cancel({r.task_id!r})"
        subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), check=True, timeout=30)
        t0 = time.monotonic()
        wait_until(lambda: server.store.read(r.task_id).status.terminal, timeout=10)
        assert time.monotonic() - t0 < 2.0
        done = server.get(r.task_id)
        assert done.status == TaskStatus.CANCELLED
        wait_until(lambda: not pid_alive(rec.claude.pid), timeout=5)
        # the CLI's subcommand form (cc-tasks cancel --backend URL) on a queued task
        q = server.start(TaskOptions(prompt=fake({}), cwd="/nonexistent/dir"))
        out = subprocess.run(
            [sys.executable, "-m", "cc_tasks", "cancel", "--backend", url, q.task_id],
            cwd=str(ROOT), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert server.get(q.task_id).status == TaskStatus.CANCELLED
    finally:
        stop(worker)


async def test_a_task_no_worker_can_run_stays_queued_and_says_why(server, url, fake_claude, workdir):
    no_cwd = server.start(TaskOptions(prompt=fake({}), cwd="/nonexistent/cc-tasks-dir"))
    assert "no worker is running" in server.get(no_cwd.task_id).queue_note
    worker = start_worker(url, fake_claude, "--label", "repo-a")
    try:
        gpu = server.start(TaskOptions(prompt=fake({}), cwd=str(workdir), labels=["gpu"]))
        ok = server.start(TaskOptions(prompt=fake({"result": "fine"}), cwd=str(workdir)))
        assert (await server.wait([ok.task_id], timeout=60)).tasks[0].status == TaskStatus.COMPLETED
        r = wait_until(lambda: (x := server.get(no_cwd.task_id)).queue_note and "no directory" in x.queue_note and x)
        assert r.status == TaskStatus.QUEUED and "/nonexistent/cc-tasks-dir" in r.queue_note
        g = server.get(gpu.task_id)
        assert g.status == TaskStatus.QUEUED and "gpu" in g.queue_note and "repo-a" in g.queue_note
        assert server.server_info().workers[0].labels == ["repo-a"]
    finally:
        stop(worker)


async def test_credentials_never_reach_records_replies_or_claude(tmp_path, fake_claude, workdir, monkeypatch):
    server = start_nats(tmp_path / "nats-auth", args=("--user", "ccuser", "--pass", "s3cret-pw"))
    plain = server.url
    try:
        url = plain.replace("nats://", "nats://ccuser:s3cret-pw@") + "/auth"
        with pytest.raises(Exception):  # (no credentials: refused)
            NatsBackend(plain + "/x").close()
        monkeypatch.setenv("CC_TASKS_BACKEND", url)
        monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", str(tmp_path / "none"))
        m = TaskManager(Settings.from_env())
        worker = start_worker(url, fake_claude)
        try:
            r = m.start(TaskOptions(prompt=fake({"argv": True, "env_keys": ["CC_TASKS_BACKEND"]}), cwd=str(workdir)))
            done = (await m.wait([r.task_id], timeout=60)).tasks[0]
            assert done.status == TaskStatus.COMPLETED
            texts = [
                done.model_dump_json(),
                m.server_info().model_dump_json(),
                json.dumps(m.events(r.task_id).model_dump(mode="json")),
                (workdir / "argv.json").read_text(),
                m.store.address,
            ]
            assert not [t for t in texts if "s3cret-pw" in t]
            assert json.loads((workdir / "argv.json").read_text())["env"]["CC_TASKS_BACKEND"] == redacted(url)
        finally:
            stop(worker)
            m.store.close()
    finally:
        server.stop()


async def test_a_worker_cut_off_from_the_server_finishes_its_task_when_it_reconnects(
    tmp_path, fake_claude, workdir, monkeypatch
):
    store = tmp_path / "nats-restart"
    server = start_nats(store)
    url = f"{server.url}/restart"
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_LEASE_SECONDS", "20")
    m = TaskManager(Settings.from_env())
    worker = start_worker(url, fake_claude)
    try:
        go = tmp_path / "go"
        r = m.start(TaskOptions(prompt=fake({"wait_file": str(go), "result": "survived"}), cwd=str(workdir)))
        wait_until(lambda: m.get(r.task_id).claude)
        server.stop()  # the server goes away for a while; the task goes on
        go.touch()
        time.sleep(2)  # (the outage: nothing to wait for; the worker retries its final write meanwhile)
        server = start_nats(store, port=server.port)
        done = (await m.wait([r.task_id], timeout=60)).tasks[0]
        assert done.status == TaskStatus.COMPLETED and done.result == "survived" and done.epoch == 1
    finally:
        stop(worker)
        m.store.close()
        server.stop()


async def test_a_killed_workers_task_goes_to_another_worker_once_its_lease_runs_out(
    url, tmp_path, fake_claude, workdir, monkeypatch
):
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_LEASE_SECONDS", "2")  # (the first opener sets the workers bucket's TTL)
    m = TaskManager(Settings.from_env())
    assert m.store.lease_seconds == 2
    first = start_worker(url, fake_claude)
    second = None
    try:
        go = tmp_path / "go"
        r = m.start(TaskOptions(prompt=fake({"wait_file": str(go), "no_tools": True, "result": "again"}), cwd=str(workdir)))  # fmt: skip
        rec = wait_until(lambda: (x := m.get(r.task_id)).claude and x)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        t0 = time.monotonic()
        requeued = wait_until(lambda: (x := m.get(r.task_id)).status == TaskStatus.QUEUED and x, timeout=15)
        assert time.monotonic() - t0 < 6 and "worker lost" in requeued.attempts[0].reason
        wait_until(lambda: not pid_alive(rec.claude.pid), timeout=10)  # (its claude, on this host, was stopped)
        go.touch()
        second = start_worker(url, fake_claude)
        done = (await m.wait([r.task_id], timeout=60)).tasks[0]
        assert done.status == TaskStatus.COMPLETED and done.result == "again" and done.epoch == 2
        assert done.lease.worker != rec.lease.worker
    finally:
        stop(first)
        if second is not None:
            stop(second)
        m.store.close()


def test_repeated_listings_and_output_reads_leave_no_consumers(url):
    """Regression: reads must not leave a consumer each on the server (ObjectStore.get's ephemeral consumer
    lingers for seconds; a burst of them reached JetStream's consumer limit, error 10026)."""
    b = NatsBackend(url)
    n = b.nats
    me = worker_info()
    try:
        big = os.urandom(300_000)  # (three chunks)
        n._run(n._obj_put("x.1.transcript", big))
        n._run(n._obj_put("x.1.result", b"small"))
        for i in range(1500):
            assert n._run(n._obj_get("x.1.result")) == b"small"
            if i % 100 == 0:
                assert n._run(n._obj_get("x.1.transcript")) == big
                b.workers()
            b.has_active()
            b.activity_stamp()
            if i % 10 == 0:
                assert b.claim(me, 4) == []  # (the claimers' watcher of the records: one consumer)
        assert n._run(n._obj_get("x.1.missing")) is None

        async def consumers() -> dict[str, int]:
            mine = (f"KV_{n.NS}_", f"OBJ_{n.NS}_", f"{n.NS}_")  # (other tests' namespaces share the server)
            return {
                s.config.name: s.state.consumer_count
                for s in await n.js.streams_info()
                if s.config.name.startswith(mine)
            }

        counts = n._run(consumers())
        assert counts and sum(counts.values()) <= 2, counts
    finally:
        b.close()


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "cc_tasks.worker", "--backend=nats://127.0.0.1:9", "--nats-creds=/no/such.creds"],
        [sys.executable, "-m", "cc_tasks", "worker", "--backend=nats://127.0.0.1:9", "--nats-creds=/no/such.creds"],
        [sys.executable, "-m", "cc_tasks", "--backend=nats://127.0.0.1:9", "--nats-creds=/no/such.creds", "list"],
    ],
)
def test_nats_file_flags_reach_the_settings(argv):
    """--nats-creds (and its siblings) on the worker module, `cc-tasks worker` and the group: the file is
    checked before any connection, and the error names the flag, in one line."""
    res = subprocess.run(argv, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--nats-creds='/no/such.creds': no such file" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_cancel_check_during_an_outage_answers_the_last_known_value(tmp_path):
    """An outage is not a cancel and not a supervisor error: the check gives up after CANCEL_RETRY seconds and
    the last answer stands (False if none), so a running task keeps going."""
    nats = start_nats(tmp_path / "outage")
    b = NatsBackend(f"{nats.url}/outage", lease_seconds=30)
    try:
        assert b.cancel_requested("t-none") is False  # (reachable: no such task, no cancel)
        b.nats._cancel_checked["t-known"] = (0.0, True)  # (an old answer, due for a new check)
        nats.stop()
        t0 = time.monotonic()
        assert b.cancel_requested("t-known") is True
        assert b.cancel_requested("t-never") is False
        assert time.monotonic() - t0 < 2 * (nats_repo.CANCEL_RETRY + 2)
    finally:
        b.close()
        nats.stop()


def _queued(b: NatsBackend, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = TaskRecord(task_id=new_task_id(), cwd="/tmp", timeout_seconds=60, max_attempts=3)
        b.submit(r, TaskRequest(options=TaskOptions(prompt="x"), cwd="/tmp", claude_bin="claude"))
        ids.append(r.task_id)
    return ids


#: Behaviours of the old single-class NatsBackend that the engine over NatsRepo lost (cc_tasks/ is not this
#: file's to change): each test below states the behaviour; strict, so a fix shows as XPASS and drops the mark.
def test_a_failing_lease_write_keeps_the_claims_other_leases(url, monkeypatch):
    b = NatsBackend(url, lease_seconds=30)
    try:
        ids = _queued(b, 3)
        w = worker_info()
        b.register(w)
        n = b.nats
        cas = n._cas

        async def flaky(kv, key, value, rev):  # (the lease of ids[1]: its write fails, the others' land)
            if kv is n.kv_tasks and key == ids[1]:
                raise BackendUnreachableError("lost")
            return await cas(kv, key, value, rev)

        monkeypatch.setattr(n, "_cas", flaky)
        got = b.claim(w, 3)
        assert sorted(r.task_id for r in got) == sorted([ids[0], ids[2]])
        assert b.load(ids[1]).status == TaskStatus.QUEUED
    finally:
        b.close()


@pytest.mark.parametrize(
    "failing",
    ["index", "event"],
)  # fmt: skip
def test_a_write_whose_index_or_event_fails_still_reports_the_change(url, monkeypatch, failing):
    """The record is written: its index entry (NatsRepo.cas) and its status event (the engine's) are best effort,
    never a reason to report the change as failed."""
    b = NatsBackend(url, lease_seconds=30)
    try:
        (t,) = _queued(b, 1)
        n = b.nats

        async def broken(*a, **k):
            raise BackendUnreachableError("lost")

        if failing == "index":
            kv_put, kv_delete = n._kv_put, n._kv_delete

            async def idx_put(kv, *a):
                return await (broken() if kv is n.kv_idx else kv_put(kv, *a))

            async def idx_delete(kv, *a):
                return await (broken() if kv is n.kv_idx else kv_delete(kv, *a))

            monkeypatch.setattr(n, "_kv_put", idx_put)
            monkeypatch.setattr(n, "_kv_delete", idx_delete)
        else:
            monkeypatch.setattr(n, "_publish", broken)  # (every event append)
        r = b.request_cancel(t)  # (a queued task: cancelled at once)
        assert r.status == TaskStatus.CANCELLED and b.load(t).status == TaskStatus.CANCELLED
    finally:
        b.close()


@pytest.mark.parametrize(
    "changed",
    [False, True],
)  # fmt: skip
def test_a_lease_whose_acknowledgement_was_lost_is_recognised_as_ours(url, monkeypatch, changed):
    """The lease landed and its answer was lost (the update is retried and finds the key moved on). NatsRepo's
    compare-and-set finds its own value and counts it as landed; if the record changed meanwhile (``changed``: a
    cancel mark) it reports a conflict, and the claim still knows the record holds its own lease."""
    b = NatsBackend(url, lease_seconds=30)
    try:
        (t,) = _queued(b, 1)
        w = worker_info()
        b.register(w)
        n = b.nats
        kv = n.kv_tasks
        update = kv.update
        lost = [True]

        async def lost_ack(key, value, last=None, **kw):
            rev = await update(key, value, last=last, **kw)
            if not lost:
                return rev
            lost.clear()
            if changed:
                e = await n._kv_get(kv, key)
                marked = n._parse(key, e.value).model_copy(update={"cancel_requested": True})
                await update(key, marked.model_dump_json().encode(), last=e.revision)
            raise nats.errors.TimeoutError  # (landed; its answer lost: _cas tries again)

        monkeypatch.setattr(kv, "update", lost_ack)
        got = b.claim(w, 1)
        assert not lost  # (the lease's write was the one whose answer was lost)
        stored = b.load(t)
        assert stored.status == TaskStatus.RUNNING and stored.lease.worker == w.worker_id
        assert [r.task_id for r in got] == [t], "the claim did not recognise its own lease"
        assert got[0].lease.worker == w.worker_id and got[0].status == TaskStatus.RUNNING
    finally:
        b.close()


def test_a_worker_releases_a_task_leased_to_it_that_it_does_not_run(url):
    b = NatsBackend(url, lease_seconds=30)
    try:
        a, c = _queued(b, 2)
        w = worker_info()
        b.register(w)
        got = {r.task_id: r for r in b.claim(w, 2)}
        later = utcnow() + timedelta(seconds=5)
        assert b.release_unsupervised(w.worker_id, lambda: ({(a, 1), (c, 1)}, later)) == []
        assert b.release_unsupervised(w.worker_id, lambda: (set(), got[a].lease.acquired_at)) == []  # (in flight)
        assert b.release_unsupervised(w.worker_id, lambda: ({(a, 1)}, later)) == [c]
        released = b.load(c)
        assert released.status == TaskStatus.QUEUED and released.lease is None and b.load(a).lease == got[a].lease
        (again,) = b.claim(w, 1)
        assert again.task_id == c and again.epoch == 2
    finally:
        b.close()


def test_the_claim_lock_survives_a_lost_answer_to_its_create_and_its_delete(url, monkeypatch):
    """A create that landed though its answer was lost is the holder's (its token), not a wait for the TTL; a
    delete whose answer was lost is tried again, and the lock is free after."""
    b = NatsBackend(url, lease_seconds=30)
    try:
        (t,) = _queued(b, 1)
        w = worker_info()
        b.register(w)
        n = b.nats
        kv = n.kv_lock
        create, delete = kv.create, kv.delete
        lost = {"create": 1, "delete": 1}

        async def create_lost(key, value, **kw):
            rev = await create(key, value, **kw)
            if lost["create"]:
                lost["create"] -= 1
                raise nats.errors.TimeoutError
            return rev

        async def delete_failed(key, **kw):
            if lost["delete"]:
                lost["delete"] -= 1
                raise nats.errors.TimeoutError
            return await delete(key, **kw)

        monkeypatch.setattr(kv, "create", create_lost)
        monkeypatch.setattr(kv, "delete", delete_failed)
        t0 = time.monotonic()
        (got,) = b.claim(w, 1)
        assert got.task_id == t and time.monotonic() - t0 < 5
        assert lost == {"create": 0, "delete": 0}
        assert n._run(n._kv_get(kv, "queue")) is None  # (released)
    finally:
        b.close()


def test_a_claim_pass_that_lost_the_lock_leases_nothing(url, monkeypatch):
    b = NatsBackend(url, lease_seconds=30)
    try:
        (t,) = _queued(b, 1)
        w = worker_info()
        b.register(w)
        n = b.nats
        unfinished = n._unfinished

        async def slow_pass(skip):
            seen = await unfinished(skip)
            await n.kv_lock.purge("queue")  # (the lock's TTL ran out during the pass)
            await n.kv_lock.create("queue", b"another claimer")
            return seen

        monkeypatch.setattr(n, "_unfinished", slow_pass)
        assert b.claim(w, 1) == []
        assert b.load(t).status == TaskStatus.QUEUED
        assert n._run(n._kv_get(n.kv_lock, "queue")).value == b"another claimer"  # (not released by us)
    finally:
        b.close()


def test_a_server_without_jetstream_is_one_clear_line(tmp_path):
    from .nats_servers import NatsServer, free_port, nats_server_bin

    port = free_port()
    plain = NatsServer(dir=tmp_path, port=port, argv=[nats_server_bin(), "-a", "127.0.0.1", "-p", str(port)])
    plain.start()
    try:
        url = f"nats://u:s3cret@127.0.0.1:{port}"
        threads = {t.name for t in threading.enumerate()}
        with pytest.raises(BackendUnreachableError, match=r"JetStream is not enabled on nats://127.0.0.1:\d+: .*-js"):
            NatsBackend(url)
        assert not {t.name for t in threading.enumerate()} - threads  # (its loop's thread ended)
        e = {**os.environ, "PYTHONWARNINGS": "default"}
        p = subprocess.run(
            [sys.executable, "-m", "cc_tasks.worker", "--backend", url], cwd=str(ROOT), env=e,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 2
        assert p.stderr.strip().splitlines() == [
            f"error: JetStream is not enabled on nats://127.0.0.1:{port}: start nats-server with -js (or a "
            "jetstream {} block in its configuration)"
        ]
    finally:
        plain.stop()


def test_the_lease_defaults_to_30_s_on_nats_and_follows_the_setting(url, monkeypatch):
    monkeypatch.delenv("CC_TASKS_LEASE_SECONDS", raising=False)
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    m = TaskManager(Settings.from_env())
    try:
        assert m.store.lease_seconds == 30 and m.server_info().lease_seconds == 30
    finally:
        m.store.close()
    monkeypatch.setenv("CC_TASKS_LEASE_SECONDS", "12")
    b = open_backend(f"{url}b")  # (a namespace of its own: the first opener sets the bucket's TTL)
    try:
        assert b.lease_seconds == 12
    finally:
        b.close()


async def test_a_worker_without_heartbeat_for_nearly_a_lease_stops_its_claude(
    tmp_path, fake_claude, workdir, monkeypatch
):
    """An outage longer than the lease: the worker stops its own claude (others may run the task meanwhile) and
    writes nothing for it; once back, the task is run again (it used no tool) and completes."""
    store = tmp_path / "nats-long-outage"
    server = start_nats(store)
    url = f"{server.url}/longoutage"
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_LEASE_SECONDS", "3")
    m = TaskManager(Settings.from_env())
    worker = start_worker(url, fake_claude, env={"CC_TASKS_LEASE_SECONDS": "3"})
    try:
        go = tmp_path / "go"
        r = m.start(TaskOptions(prompt=fake({"wait_file": str(go), "no_tools": True, "result": "again"}), cwd=str(workdir)))  # fmt: skip
        rec = wait_until(lambda: (x := m.get(r.task_id)).claude and x)
        server.stop()
        t0 = time.monotonic()
        wait_until(lambda: not pid_alive(rec.claude.pid), timeout=15)  # (nobody else can reach the server)
        assert time.monotonic() - t0 < 3 + 2
        go.touch()
        server = start_nats(store, port=server.port)
        done = (await m.wait([r.task_id], timeout=60)).tasks[0]
        assert done.status == TaskStatus.COMPLETED and done.result == "again" and done.epoch == 2
    finally:
        stop(worker)
        m.store.close()
        server.stop()


def test_a_claimer_judges_workers_gone_only_after_a_lease_connected(url):
    """Just after (re)connecting, a missing worker key may be a restarted server's expiry, not a gone worker."""
    b = NatsBackend(url, lease_seconds=30)
    try:
        (t,) = _queued(b, 1)
        w = worker_info()
        b.register(w)
        b.claim(w, 1)
        b.nats._run(b.nats.kv_workers.purge(w.worker_id))
        assert b.read(t).status == TaskStatus.RUNNING  # (connected for less than a lease)
        b.nats._connected_at -= 30
        assert b.read(t).status == TaskStatus.QUEUED
    finally:
        b.close()


async def test_waiters_poll_a_local_stamp_and_remote_calls_leave_the_event_loop(url, monkeypatch):
    """activity_stamp is this object's counter, fed by its records watcher: no request per poll (a wait polls it
    every 2-50 ms); and the manager's calls that reach the server run in a thread, not on the event loop."""
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    m = TaskManager(Settings.from_env())
    other = NatsBackend(url)
    try:
        s0 = m.store.activity_stamp()

        def no_requests(*a, **k):
            raise AssertionError("activity_stamp asked the server")

        monkeypatch.setattr(m.store.nats.js, "stream_info", no_requests)
        assert m.store.activity_stamp() == s0
        (t,) = _queued(other, 1)
        s1 = wait_until(lambda: (s := m.store.activity_stamp()) != s0 and s, timeout=10)
        other.request_cancel(t)
        wait_until(lambda: m.store.activity_stamp() != s1, timeout=10)
        assert await m.on_loop(threading.current_thread) is not threading.current_thread()
    finally:
        other.close()
        m.store.close()


def test_a_call_the_caller_stopped_waiting_for_is_cancelled(url):
    """_run's timeout cancels the coroutine: a claim that outlived its caller leases nothing afterwards."""
    b = NatsBackend(url)
    try:
        cancelled = threading.Event()

        async def slow():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(TimeoutError):
            b.nats._run(slow(), timeout=0.1)
        assert cancelled.wait(5)
    finally:
        b.close()


def test_activity_stamp_never_waits_for_the_watcher_to_start(url, monkeypatch):
    """While the records watcher cannot start (an outage), activity_stamp answers the local counter at once (it
    runs on a server's event loop, every poll) and starts the watcher in the background, once at a time."""
    b = NatsBackend(url)
    try:
        calls = []

        async def slow_watch():
            calls.append(1)
            await asyncio.sleep(1.0)
            raise BackendUnreachableError("down")

        monkeypatch.setattr(b.nats, "_watch_records", slow_watch)
        t0 = time.monotonic()
        s0 = b.activity_stamp()
        assert [b.activity_stamp() for _ in range(20)] == [s0] * 20
        assert time.monotonic() - t0 < 0.5
        wait_until(lambda: calls, timeout=5)
        wait_until(lambda: not b.nats._recs_starting, timeout=10)
        assert len(calls) == 1  # (not subscribed twice)
        b.activity_stamp()
        wait_until(lambda: len(calls) == 2, timeout=5)  # (a failed start is tried again by the next call)
    finally:
        b.close()


def test_the_records_watcher_keeps_nothing_of_finished_records(url):
    """A server's watcher sees every record: it keeps the unfinished ones (claims need them) and only counts the
    others' changes, so result previews do not pile up in memory."""
    b = NatsBackend(url)
    other = NatsBackend(url)
    try:
        done, live = _queued(other, 2)
        n = b.nats
        n._run(n._watch_records())
        wait_until(lambda: done in n._recs and live in n._recs, timeout=10)
        s0 = b.activity_stamp()
        other.request_cancel(done)
        wait_until(lambda: b.activity_stamp() != s0, timeout=10)
        assert done not in n._recs and done not in n._statuses
        assert live in n._recs and n._statuses[live] == b"queued"
    finally:
        other.close()
        b.close()


def test_a_task_whose_supervisor_was_abandoned_after_starting_claude_is_a_lost_workers(url):
    """An outage after claude started and before its first flush: the record shows no claude and no tool, but the
    worker's lease watch abandoned a running claude. Its task is not put back quietly: an attempt is counted, and
    the worker's own tool count decides whether it may run again."""
    b = NatsBackend(url, lease_seconds=30)
    try:
        quiet, ran, acted = _queued(b, 3)
        w = worker_info()
        b.register(w)
        got = {r.task_id: r for r in b.claim(w, 3)}
        later = utcnow() + timedelta(seconds=5)
        abandoned = {(ran, 1): (True, 0), (acted, 1): (True, 2), ("t-elsewhere", 1): (True, 0)}
        out = b.release_unsupervised(w.worker_id, lambda: (set(), later), abandoned=abandoned)
        assert sorted(out) == sorted(got)
        assert abandoned == {}
        q = b.load(quiet)
        assert q.status == TaskStatus.QUEUED and q.attempts == []  # (never supervised: released quietly)
        r = b.load(ran)
        assert r.status == TaskStatus.QUEUED and len(r.attempts) == 1 and r.attempts[0].retried
        a = b.load(acted)
        assert a.status == TaskStatus.FAILED and "used tools" in a.error
    finally:
        b.close()
