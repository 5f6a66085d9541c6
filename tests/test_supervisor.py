"""The supervisor of one task, run directly against a store with the fake claude."""

import os
import threading
import time

import pytest

from cc_tasks.backend import dependency_preamble
from cc_tasks.errors import BackendUnreachableError, LeaseLostError
from cc_tasks.models import TaskOptions, TaskRecord, TaskRequest
from cc_tasks.states import TaskStatus
from cc_tasks.store import TaskStore, new_task_id
from cc_tasks.supervisor import Supervisor

from .backends import expire, worker_info
from .conftest import pid_alive
from .test_manager import fake, wait_until


def submit(store: TaskStore, claude: str, prompt: str, **fields) -> TaskRecord:
    r = TaskRecord(task_id=new_task_id(), cwd="/tmp", timeout_seconds=60, max_attempts=3, **fields)
    store.submit(r, TaskRequest(options=TaskOptions(prompt=prompt), cwd="/tmp", claude_bin=claude))
    return r


def test_a_supervisor_that_loses_its_lease_stops_claude_and_writes_nothing(tmp_path, fake_claude):
    store = TaskStore(tmp_path / "store", max_concurrent=4, lease_seconds=5)
    t = submit(store, fake_claude, fake({"sleep": 300, "no_tools": True}))
    w1, w2 = worker_info(), worker_info()
    store.register(w1)
    store.register(w2)
    (claimed,) = store.claim(w1, 1)
    sup = Supervisor(store, claimed)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    running = wait_until(lambda: (r := store.load(t.task_id)).claude and r)
    expire(store, w1)  # w1 looks gone: its task is requeued and taken over by w2
    assert store.read(t.task_id).status == TaskStatus.QUEUED
    (taken,) = store.claim(w2, 1)
    thread.join(20)  # its next write (a progress flush) is refused: it stops claude and gives up
    assert not thread.is_alive()
    assert not pid_alive(running.claude.pid)
    after = store.load(t.task_id)
    assert after.status == TaskStatus.RUNNING and after.lease == taken.lease and after.claude is None
    assert not store.path(t.task_id, "result.txt").exists()


def test_a_supervisor_runs_a_task_to_its_end(tmp_path, fake_claude):
    store = TaskStore(tmp_path / "store")
    t = submit(store, fake_claude, fake({"result": "fine"}))
    w = worker_info()
    store.register(w)
    (claimed,) = store.claim(w, 1)
    Supervisor(store, claimed).run()
    done = store.load(t.task_id)
    assert done.status == TaskStatus.COMPLETED and done.result == "fine" and done.exit_code == 0
    assert store.read_output(t.task_id, "result", 0, 100) == (b"fine", 4)
    assert done.progress.tool_calls == 1 and done.attempts[0].status == TaskStatus.COMPLETED


def test_dependency_results_are_bounded_and_point_to_the_rest(tmp_path, fake_claude):
    store = TaskStore(tmp_path / "store")
    w = worker_info()
    store.register(w)
    deps = []
    for text in ("short", "y" * 20_000):
        r = submit(store, fake_claude, "p", name="dep")
        (c,) = store.claim(w, 1)
        store.finish(c.lease, TaskStatus.COMPLETED, result_text=text, result=text[:100])
        deps.append(r.task_id)
    pre = dependency_preamble(store, deps)
    assert "short" in pre and pre.count("y") <= 8_000 + 10
    assert f"get_task_output(task_id={deps[1]!r})" in pre and f"get_task_output(task_id={deps[0]!r})" not in pre


def test_an_unreachable_backend_is_not_a_cancel(tmp_path, fake_claude):
    """A cancel check that cannot reach the backend (a NATS outage) says "not cancelled": the supervisor keeps
    its task and its deadline instead of failing it with a supervisor error."""
    store = TaskStore(tmp_path / "store", max_concurrent=4, lease_seconds=5)
    t = submit(store, fake_claude, fake({"no_tools": True}))
    w = worker_info()
    store.register(w)
    (claimed,) = store.claim(w, 1)
    sup = Supervisor(store, claimed)

    def unreachable(task_id):
        raise BackendUnreachableError("NATS did not answer")

    store.cancel_requested = unreachable
    assert sup.cancelled() is False
    sup.request_stop()
    assert sup.cancelled() is True
    sup.close()
    assert t.task_id == claimed.task_id


def test_a_supervisor_abandoned_while_its_renew_waited_never_starts_claude(cc_env, tmp_path):
    """The lease watch may abandon a supervisor while its renew waits for the server: when the renew returns,
    claude is not started."""
    store = TaskStore(tmp_path / "store-abandon")
    rec = TaskRecord(task_id=new_task_id(), cwd=str(tmp_path), timeout_seconds=60)
    store.submit(rec, TaskRequest(options=TaskOptions(prompt="x"), cwd=str(tmp_path), claude_bin="claude"))
    (got,) = store.claim(worker_info(), 1)
    sup = Supervisor(store, got)
    renew = store.renew

    def slow_renew(lease):
        sup.abandon("no heartbeat")  # (the lease watch, while this call waited)
        return renew(lease)

    store.renew = slow_renew
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"")
    try:
        with pytest.raises(LeaseLostError):
            sup.run_attempt(["/bin/true"], str(tmp_path), dict(os.environ), stdin, time.monotonic() + 60, attempt=1)
        assert not sup.spawned and sup.proc is None
    finally:
        sup.close()
