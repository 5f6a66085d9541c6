"""The worker with the fake claude: it pulls tasks, supervises them, keeps its leases, and goes away cleanly.
A worker that is lost (SIGKILL) frees its slot; its task is requeued or failed."""

import os
import signal
import threading
import time

import pytest

from cc_tasks import worker as worker_mod
from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager
from cc_tasks.models import BatchItem, TaskOptions, TaskStatus
from cc_tasks.repo import Capabilities
from cc_tasks.worker import Worker

from .conftest import pid_alive
from .test_manager import fake, run, wait_until


async def test_a_killed_worker_fails_a_task_that_used_a_tool_and_stops_claude(fake_manager, workdir):
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).progress.tool_calls and x.claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)  # a dead pid on this host: the lease ends at once
    assert after.status == TaskStatus.FAILED and "worker lost" in after.error and "used tools" in after.error
    wait_until(lambda: not pid_alive(rec.claude.pid))  # (stopped in the background of the read)
    assert after.attempts[-1].reason.startswith("worker lost")


async def test_a_killed_worker_requeues_a_task_that_used_no_tool(fake_manager, workdir, tmp_path):
    track = tmp_path / "track"
    track.mkdir()
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300, "no_tools": True}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)
    assert after.status == TaskStatus.QUEUED and after.lease is None and after.epoch == 1
    assert after.attempts[0].retried and "worker lost" in after.attempts[0].reason
    wait_until(lambda: not pid_alive(rec.claude.pid))  # (stopped in the background of the read)
    events = fake_manager.events(r.task_id).events
    assert "requeued" in [e["kind"] for e in events]
    fake_manager.cancel(r.task_id)  # (or a new worker would run it again, as attempt 2)
    # with no attempts left, the same loss fails the task
    one = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "no_tools": True}), cwd=str(workdir), max_attempts=1)
    )
    rec = wait_until(lambda: (x := fake_manager.get(one.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(one.task_id)
    assert after.status == TaskStatus.FAILED and "no attempts left" in after.error


async def test_a_requeued_task_runs_again_as_a_new_attempt(fake_manager, workdir, tmp_path):
    go = tmp_path / "go"
    r = fake_manager.start(TaskOptions(prompt=fake({"wait_file": str(go), "no_tools": True}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    assert fake_manager.get(r.task_id).status == TaskStatus.QUEUED
    go.touch()
    fake_manager.nudge()  # a new worker claims it: attempt 2, claim 2
    done = (await fake_manager.wait([r.task_id], timeout=60)).tasks[0]
    assert done.status == TaskStatus.COMPLETED and done.epoch == 2 and len(done.attempts) == 2
    assert done.lease.pid != rec.lease.pid


async def test_the_store_worker_answers_on_its_private_socket(fake_manager, workdir):
    from cc_tasks import control

    r = await run(fake_manager, TaskOptions(prompt=fake({"result": "warm"}), cwd=str(workdir)))
    assert r.result == "warm"
    sock = fake_manager.store.socket_path
    assert sock.exists() and (sock.stat().st_mode & 0o077) == 0
    hello = control.request(sock, {"op": "hello"})
    assert hello["identity"] == control.IDENTITY and r.lease.pid == hello["pid"] and r.lease.worker == hello["worker"]
    assert control.request(sock, {"op": "start", "task_id": r.task_id}) == {"error": "unknown op 'start'"}
    assert [w.worker_id for w in fake_manager.store.workers()] == [hello["worker"]]
    assert fake_manager.store.stop_worker()
    wait_until(lambda: not pid_alive(hello["pid"]))
    assert not sock.exists() and fake_manager.store.workers() == []  # it unregistered


async def test_a_stopped_worker_finishes_its_tasks_and_sigterm_cancels_them(fake_manager, tmp_path):
    dirs = [tmp_path / n for n in ("a", "b")]
    for d in dirs:
        d.mkdir()
    a = fake_manager.start(TaskOptions(prompt=fake({"wait_file": str(tmp_path / "go")}), cwd=str(dirs[0])))
    first = wait_until(lambda: (x := fake_manager.get(a.task_id)).status == TaskStatus.RUNNING and x.lease)
    assert fake_manager.store.stop_worker()  # quit: no more work, but it sees its task through
    wait_until(lambda: not fake_manager.store.socket_path.exists())
    assert pid_alive(first.pid)
    (tmp_path / "go").touch()
    done = await fake_manager.wait([a.task_id], timeout=60)
    assert done.tasks[0].status == TaskStatus.COMPLETED
    wait_until(lambda: not pid_alive(first.pid))
    # a new worker takes the next task; SIGTERM makes it cancel what it supervises, then exit
    b = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300, "grandchild": True}), cwd=str(dirs[1])))
    rec = wait_until(lambda: (x := fake_manager.get(b.task_id)).claude and (dirs[1] / "grandchild.pid").exists() and x)
    assert rec.lease.pid != first.pid
    os.kill(rec.lease.pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(b.task_id)
    assert after.status == TaskStatus.CANCELLED
    assert not pid_alive(rec.claude.pid) and not pid_alive(int((dirs[1] / "grandchild.pid").read_text()))


async def test_a_killed_worker_is_replaced(fake_manager, workdir):
    r = await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))
    assert r.status == TaskStatus.COMPLETED
    old = fake_manager.store.worker_hello()["pid"]
    os.kill(old, signal.SIGKILL)  # leaves its socket file behind
    # (gone once nothing answers: a dying process's socket may still take a connection for a moment)
    wait_until(lambda: not pid_alive(old) and fake_manager.store.worker_hello() is None)
    r = fake_manager.start(TaskOptions(prompt=fake({"result": "after"}), cwd=str(workdir)), nudge=False)
    fake_manager.nudge()
    done = await fake_manager.wait([r.task_id], timeout=60)
    assert done.tasks[0].result == "after"
    assert fake_manager.store.worker_hello()["pid"] != old


async def test_workers_in_several_processes_run_each_task_once(fake_manager, workdir, tmp_path, monkeypatch):
    """Two more workers (``python -m cc_tasks.worker``) pull from the same queue as the store's own: every task
    runs exactly once and the global cap holds."""
    import subprocess
    import sys

    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "3")
    fake_manager.settings.max_concurrent = fake_manager.store.max_concurrent = 3
    track = tmp_path / "track"
    track.mkdir()
    extra = [
        subprocess.Popen(
            [sys.executable, "-m", "cc_tasks.worker", "--store", str(fake_manager.store.root), "--slots", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        wait_until(lambda: len(fake_manager.store.workers()) == 2)
        items = [BatchItem(prompt=fake({"sleep": 0.3, "track": str(track)}), cwd=str(workdir)) for _ in range(24)]
        ids = [t.task_id for t in fake_manager.start_batch(items).tasks]
        done = await fake_manager.wait(ids, timeout=90)
        assert done.done and {t.status for t in done.tasks} == {TaskStatus.COMPLETED}
        assert len({t.lease.worker for t in done.tasks}) >= 2  # the work was shared
    finally:
        for p in extra:
            p.terminate()
        for p in extra:
            p.wait(20)
    runs = [line.split() for line in (track / "runs.log").read_text().splitlines()]
    assert sorted(r[0] for r in runs) == sorted(ids)  # each exactly once
    assert max(int(r[1]) for r in runs) <= 3


async def test_cancel_right_after_start_never_stops_the_worker(fake_manager, workdir):
    await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))
    pid = fake_manager.store.worker_hello()["pid"]
    for _ in range(5):  # the worker claims the task while cancel is under way
        r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)), nudge=False)
        fake_manager.nudge()
        assert fake_manager.cancel(r.task_id).status == TaskStatus.CANCELLED
    assert fake_manager.store.worker_hello()["pid"] == pid and pid_alive(pid)


def test_a_supervisor_that_ends_without_a_final_record_fails_its_task(cc_env, workdir, monkeypatch):
    """Whatever happens in a supervisor thread, the worker does not leave its task running."""
    from cc_tasks.supervisor import Supervisor
    from cc_tasks.worker import Worker

    m = TaskManager(Settings.from_env())
    r = m.start(TaskOptions(prompt=fake(), cwd=str(workdir)), nudge=False)
    w = Worker(m.store, slots=1)  # this test process stands in for the worker
    m.store.register(w.info)
    try:
        (claimed,) = m.store.claim(w.info, 1)
        assert claimed.task_id == r.task_id and m.get(r.task_id).status == TaskStatus.RUNNING
        monkeypatch.setattr(Supervisor, "run", lambda self: None)
        w._run(Supervisor(m.store, claimed), (claimed.task_id, claimed.epoch))
        after = m.get(r.task_id)
        assert after.status == TaskStatus.FAILED and "without a final record" in after.error
    finally:
        m.store.unregister(w.info.worker_id)


async def test_a_worker_killed_before_it_recorded_claudes_pid_still_stops_claude(fake_manager, workdir):
    """claude's pid reaches the record with the first progress flush; a worker dying before that leaves
    claude to be found by the task id in its environment."""
    r = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "grandchild": True, "no_tools": True}), cwd=str(workdir))
    )
    wait_until(lambda: (workdir / "grandchild.pid").exists())
    rec = fake_manager.store.load(r.task_id)
    from cc_tasks import procs

    found = procs.task_processes(r.task_id)
    assert len(found) >= 2  # claude and its background child
    if rec.claude is not None:
        pytest.skip("the first progress flush came before this test looked")
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)
    assert after.status == TaskStatus.QUEUED and "worker lost" in after.attempts[0].reason
    wait_until(lambda: not any(pid_alive(p.pid) for p in found))


async def test_a_worker_whose_store_is_deleted_exits(cc_env, fake_claude, workdir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", fake_claude)
    monkeypatch.setenv("CC_TASKS_DIR", str(tmp_path / "doomed"))
    m = TaskManager(Settings.from_env())
    assert (await run(m, TaskOptions(prompt=fake(), cwd=str(workdir)))).status == TaskStatus.COMPLETED
    pid = m.store.worker_hello()["pid"]
    shutil.rmtree(m.store.root)
    wait_until(lambda: not pid_alive(pid))
    m.reap(wait=5)


async def test_a_labelled_task_waits_for_a_worker_with_its_labels(fake_manager, workdir):
    import subprocess
    import sys

    r = fake_manager.start(TaskOptions(prompt=fake({"result": "on gpu"}), cwd=str(workdir), labels=["gpu"]))
    fake_manager.nudge()
    queued = fake_manager.get(r.task_id)  # the store's worker has no labels: it never claims it
    assert queued.status == TaskStatus.QUEUED and "cc-tasks worker --label gpu" in queued.queue_note
    gpu = subprocess.Popen(
        [sys.executable, "-m", "cc_tasks.worker", "--store", str(fake_manager.store.root), "--label", "gpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = (await fake_manager.wait([r.task_id], timeout=60)).tasks[0]
        assert done.status == TaskStatus.COMPLETED and done.lease.pid == gpu.pid
        info = fake_manager.server_info()
        assert info.backend == "local" and any(w.labels == ["gpu"] and w.pid == gpu.pid for w in info.workers)
    finally:
        gpu.terminate()
        assert gpu.wait(20) == 0  # SIGTERM drains: nothing was running, so it exits at once


class _StubBackend:
    """Just what a worker's lease watch and cancel look use: a remote kind, a lease, a cancel check that hangs."""

    kind = "nats"
    lease_seconds = 3.0
    caps = Capabilities(kind="nats", remote=True, lost_claims=True, lease_seconds=3.0)
    launcher = None

    def __init__(self):
        self.asked = threading.Event()
        self.answer = threading.Event()

    def cancel_requested(self, task_id: str) -> bool:
        self.asked.set()
        self.answer.wait(20)
        return False


class _StubSupervisor:
    def __init__(self, task_id: str, both_stopping: threading.Barrier):
        self.task_id, self.lost, self.grace = task_id, None, None
        self.both_stopping = both_stopping
        self.stopped = threading.Event()

    def abandon(self, reason: str) -> None:
        self.lost = reason

    def request_stop(self) -> None:
        pass

    def stop_everything(self, grace_int: float = 3.0) -> None:
        self.grace = grace_int
        self.both_stopping.wait()  # (raises if the other is not being stopped at the same time)
        self.stopped.set()


def test_the_lease_watch_stops_every_abandoned_tree_at_once_while_a_cancel_check_hangs():
    """A cancel check the server does not answer never holds the worker's lock: the lease watch abandons the tasks
    at two thirds of the lease and stops their trees in parallel, with a short SIGINT grace."""
    backend = _StubBackend()
    w = Worker(backend, slots=2)
    both = threading.Barrier(2, timeout=10)
    sups = [_StubSupervisor("t-a", both), _StubSupervisor("t-b", both)]
    w.supervising = {("t-a", 1): sups[0], ("t-b", 1): sups[1]}
    assert w._silence_limit() == 2.0
    looking = threading.Thread(target=w._look_for_cancels, daemon=True)
    looking.start()
    assert backend.asked.wait(10)
    w.beat_ok = time.monotonic() - 10
    watching = threading.Thread(target=w._watch_leases, daemon=True)
    watching.start()
    try:
        for s in sups:
            assert s.stopped.wait(10), "the lease watch was stuck behind the cancel check"
            assert s.lost and s.grace == worker_mod.ABANDON_GRACE < 3.0
    finally:
        w._stopped.set()
        backend.answer.set()
        looking.join(30)
        watching.join(30)


def test_a_worker_whose_heartbeats_fail_claims_nothing():
    """Claims may work while heartbeats fail: a task claimed then would be abandoned at once (churn)."""
    backend = _StubBackend()
    asked = []
    backend.claim = lambda info, free, fresh=True: asked.append(free) or []
    w = Worker(backend, slots=2)
    w.beat_ok = time.monotonic() - w._silence_limit()
    w.claim(2, fresh=True)
    assert asked == []
    w.beat_ok = time.monotonic()
    w.claim(2, fresh=True)
    assert asked == [2]
