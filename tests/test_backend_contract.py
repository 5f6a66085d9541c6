"""The backend contract: what every backend must do, run against each one (tests/backends.py KINDS).

Claims exactly once with concurrent claimers in several processes, the global cap, priority then age,
labels, dependencies, fencing, lease expiry and requeue, cancel while queued and while running, and
reading records, listings, events and output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from cc_tasks.backend import Backend
from cc_tasks.errors import LeaseLostError, TaskNotFoundError
from cc_tasks.models import Progress, TaskOptions, TaskRecord, TaskRequest, utcnow
from cc_tasks.repo import Liveness
from cc_tasks.states import TaskStatus
from cc_tasks.store import new_task_id

from .backends import KINDS, address_for, expire, open_backend, worker_info
from .conftest import ROOT
from .test_manager import wait_until


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def address(kind, tmp_path, request) -> str:
    return address_for(kind, tmp_path, request)


@pytest.fixture
def backend(kind, address) -> Backend:
    return open_backend(kind, address, max_concurrent=4, lease_seconds=5)


def submit(
    b: Backend,
    prompt: str = "p",
    *,
    priority: int = 0,
    depends_on: list[str] | None = None,
    labels: list[str] | None = None,
    max_attempts: int = 3,
) -> TaskRecord:
    r = TaskRecord(
        task_id=new_task_id(),
        cwd="/",
        prompt_preview=prompt,
        timeout_seconds=60,
        priority=priority,
        depends_on=depends_on or [],
        labels=labels or [],
        max_attempts=max_attempts,
        status=TaskStatus.WAITING if depends_on else TaskStatus.QUEUED,
    )
    b.submit(r, TaskRequest(options=TaskOptions(prompt=prompt), cwd="/", claude_bin="/bin/true"))
    return r


def registered(b: Backend, labels: tuple[str, ...] = ()):
    w = worker_info(labels)
    b.register(w)
    return w


def test_the_backend_implements_the_interface(backend):
    assert isinstance(backend, Backend)


def test_claims_are_exactly_once_across_processes(kind, address):
    b = open_backend(kind, address, max_concurrent=100)
    ids = [submit(b).task_id for _ in range(80)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.contract_claimer", kind, address, "3"],
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    claimed = Counter(t for out in outs for t in out.split())
    assert sorted(claimed) == sorted(ids) and set(claimed.values()) == {1}
    assert sum(bool(out.split()) for out in outs) >= 2  # several claimers got work
    for t in ids:
        r = b.read(t)
        assert r.status == TaskStatus.COMPLETED and r.epoch == 1


def test_the_global_cap_holds_across_workers(backend):
    for _ in range(6):
        submit(backend)
    w1, w2 = registered(backend), registered(backend)
    first = backend.claim(w1, 3)
    second = backend.claim(w2, 3)
    assert len(first) == 3 and len(second) == 1  # cap 4
    assert backend.claim(w1, 1) == []
    backend.finish(first[0].lease, TaskStatus.COMPLETED)
    assert len(backend.claim(w2, 5)) == 1


def test_priority_first_then_oldest(backend):
    low = submit(backend, priority=-1)
    a = submit(backend)
    high = submit(backend, priority=5)
    b2 = submit(backend)
    w = registered(backend)
    got = [r.task_id for r in backend.claim(w, 4)]
    assert got == [high.task_id, a.task_id, b2.task_id, low.task_id]
    assert backend.claim(w, 1) == []


def test_only_a_worker_with_every_label_claims_a_task(backend):
    gpu = submit(backend, labels=["gpu", "repo-a"])
    plain = submit(backend)
    none = registered(backend)
    some = registered(backend, ("gpu",))
    both = registered(backend, ("gpu", "repo-a", "x"))
    assert [r.task_id for r in backend.claim(none, 4)] == [plain.task_id]
    assert backend.claim(some, 4) == []
    assert [r.task_id for r in backend.claim(both, 4)] == [gpu.task_id]


def test_dependencies_are_resolved_when_a_task_ends(backend):
    a = submit(backend, "a")
    b = submit(backend, "b", depends_on=[a.task_id])
    c = submit(backend, "c", depends_on=[b.task_id])
    d = submit(backend, "d", depends_on=[a.task_id])
    w = registered(backend)
    (ra,) = backend.claim(w, 4)
    assert ra.task_id == a.task_id
    assert backend.read(b.task_id).status == TaskStatus.WAITING
    backend.finish(ra.lease, TaskStatus.COMPLETED, result_text="A")
    assert backend.read(b.task_id).status == TaskStatus.QUEUED  # at once, before any claim
    assert backend.read(d.task_id).status == TaskStatus.QUEUED
    got = {r.task_id: r for r in backend.claim(w, 4)}
    assert set(got) == {b.task_id, d.task_id}
    backend.finish(got[b.task_id].lease, TaskStatus.FAILED, error="no")
    rc = backend.read(c.task_id)
    assert rc.status == TaskStatus.SKIPPED and b.task_id in rc.error and "failed" in rc.error


def test_a_lost_lease_fences_every_write_of_its_worker(backend):
    t = submit(backend)
    w1, w2 = registered(backend), registered(backend)
    (r1,) = backend.claim(w1, 1)
    backend.progress(r1.lease, progress=Progress(turns=1))
    backend.event(r1.lease, "note", text="from w1")
    expire(backend, w1)
    requeued = backend.read(t.task_id)  # no tool used, attempts left: back in the queue
    assert requeued.status == TaskStatus.QUEUED and requeued.lease is None
    assert requeued.attempts[0].retried and "worker lost" in requeued.attempts[0].reason
    (r2,) = backend.claim(w2, 1)
    assert r2.epoch == r1.epoch + 1
    before = backend.read(t.task_id)
    for write in (
        lambda: backend.progress(r1.lease, progress=Progress(turns=9)),
        lambda: backend.event(r1.lease, "note", text="stale"),
        lambda: backend.finish(r1.lease, TaskStatus.COMPLETED, result_text="stale result"),
        lambda: backend.renew(r1.lease),
    ):
        with pytest.raises(LeaseLostError, match="no longer valid"):
            write()
    after = backend.read(t.task_id)
    assert after == before and after.lease.worker == w2.worker_id
    assert backend.read_output(t.task_id, "result", 0, 100) == (b"", 0)
    assert "stale" not in str(list(backend.iter_events(t.task_id)))
    backend.renew(r2.lease)
    done = backend.finish(r2.lease, TaskStatus.COMPLETED, result_text="fresh")
    assert done.status == TaskStatus.COMPLETED and backend.read_output(t.task_id, "result", 0, 100)[0] == b"fresh"


def test_lease_expiry_requeues_until_attempts_run_out(backend):
    t = submit(backend, max_attempts=2)
    w1, w2 = registered(backend), registered(backend)
    backend.claim(w1, 1)
    expire(backend, w1)
    assert backend.read(t.task_id).status == TaskStatus.QUEUED
    backend.claim(w2, 1)
    expire(backend, w2)
    r = backend.read(t.task_id)
    assert r.status == TaskStatus.FAILED and "worker lost" in r.error and len(r.attempts) == 2


def test_a_lost_attempt_that_used_a_tool_is_not_run_again(backend):
    t = submit(backend)
    dep = submit(backend, depends_on=[t.task_id])
    w = registered(backend)
    (r,) = backend.claim(w, 1)
    backend.progress(r.lease, progress=Progress(turns=1, tool_calls=1))
    expire(backend, w)
    lost = backend.read(t.task_id)
    assert lost.status == TaskStatus.FAILED and "worker lost" in lost.error and "used tools" in lost.error
    assert backend.read(dep.task_id).status == TaskStatus.SKIPPED  # its dependents are skipped
    assert backend.claim(registered(backend), 4) == []


def test_cancel_while_queued_and_while_running(backend):
    queued = submit(backend)
    dependent = submit(backend, depends_on=[queued.task_id])
    c = backend.request_cancel(queued.task_id)
    assert c.status == TaskStatus.CANCELLED and c.cancel_requested
    assert backend.read(dependent.task_id).status == TaskStatus.SKIPPED
    running = submit(backend)
    w = registered(backend)
    assert [r.task_id for r in backend.claim(w, 4)] == [running.task_id]  # never the cancelled one
    assert not backend.cancel_requested(running.task_id)
    r = backend.request_cancel(running.task_id)
    assert r.status == TaskStatus.RUNNING and r.cancel_requested and backend.cancel_requested(running.task_id)
    (lease,) = [backend.read(running.task_id).lease]
    done = backend.finish(lease, TaskStatus.CANCELLED, error="cancelled: stopped")
    assert done.status == TaskStatus.CANCELLED
    # cancelling a finished task changes nothing
    assert backend.request_cancel(running.task_id) == backend.read(running.task_id)


def test_a_running_task_whose_worker_does_not_stop_it_is_cancelled_by_force(backend):
    t = submit(backend)
    w = registered(backend)
    (r,) = backend.claim(w, 1)
    backend.request_cancel(t.task_id)
    forced = backend.force_cancel(t.task_id, "cancelled by force")
    assert forced.status == TaskStatus.CANCELLED and forced.error == "cancelled by force"
    with pytest.raises(LeaseLostError):
        backend.finish(r.lease, TaskStatus.COMPLETED)


def test_read_list_events_output_and_delete(backend):
    old = submit(backend, "old")
    new = submit(backend, "new")
    listed = list(backend.list_ids(include_finished=False))
    assert set(listed) == {new.task_id, old.task_id} and listed == sorted(listed, reverse=True)  # newest first
    w = registered(backend)
    claimed = {r.task_id: r for r in backend.claim(w, 2)}
    lease = claimed[old.task_id].lease
    for i in range(30):
        backend.event(lease, "tick", i=i)
    text = "é" * 50_000
    backend.finish(lease, TaskStatus.COMPLETED, result_text=text, result=text[:10], result_chars=len(text))
    assert list(backend.list_ids(include_finished=False)) == [new.task_id]
    assert set(backend.list_ids(include_finished=True)) == {new.task_id, old.task_id}
    r = backend.read(old.task_id)
    assert r.status == TaskStatus.COMPLETED and r.result_chars == 50_000 and r.finished_at is not None
    events = list(backend.iter_events(old.task_id))
    assert [i for i, _ in events] == list(range(len(events)))
    assert [e["kind"] for _, e in events].count("tick") == 30 and events[-1][1]["kind"] == "status"
    later = list(backend.iter_events(old.task_id, since=10))
    assert later == events[10:]
    data, total = backend.read_output(old.task_id, "result", 0, 1000)
    assert total == 100_000 and len(data) == 1000
    data, total = backend.read_output(old.task_id, "result", 99_000, 5000)
    assert len(data) == 1000
    assert backend.read_output(new.task_id, "transcript", 0, 10) == (b"", 0)
    assert backend.request(old.task_id).options.prompt == "old"
    backend.delete(old.task_id)
    with pytest.raises(TaskNotFoundError):
        backend.read(old.task_id)
    assert list(backend.list_ids(include_finished=True)) == [new.task_id]


def test_annotate_sets_fields_of_a_finished_task_only(backend):
    from cc_tasks.models import Changes, WorktreeInfo

    t = submit(backend, "wt")
    w = registered(backend)
    (claimed,) = backend.claim(w, 1)
    changes = Changes(files_changed=2, insertions=3, deletions=1, committed=False)
    assert backend.annotate(t.task_id, changes=changes).changes is None  # running: left alone
    backend.finish(claimed.lease, TaskStatus.COMPLETED)
    wt = WorktreeInfo(name=t.task_id, path="/r/.claude/worktrees/x", branch="worktree-x", repo="/r")
    r = backend.annotate(t.task_id, changes=changes, worktree=wt)
    assert r.changes == changes and r.worktree == wt and r.status == TaskStatus.COMPLETED
    assert backend.read(t.task_id).changes == changes
    with pytest.raises(ValueError):
        backend.annotate(t.task_id, status=TaskStatus.FAILED)


# -- the four drifts between the two former copies, resolved once in the engine -------------------------------
def test_a_lost_run_whose_transcript_shows_a_tool_call_is_not_run_again(backend):
    """Drift 1: "did the lost run do something" is read from the record's counters *and* the run's transcript
    since its lease (the record lags the transcript by a flush), on every backend."""
    t = submit(backend, max_attempts=3)
    w = registered(backend)
    (r,) = backend.claim(w, 1)
    line = '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"Bash","input":{}}]}}\n'
    (backend.workspace(t.task_id) / "stdout.jsonl").write_text(line)
    backend.progress(r.lease, progress=Progress(turns=1))  # the record says: no tool yet (stores the transcript)
    expire(backend, w)
    lost = backend.read(t.task_id)
    assert lost.status == TaskStatus.FAILED and "used tools" in lost.error


def test_claims_pass_over_a_task_whose_directory_is_missing_only_where_other_machines_may_have_it(backend, tmp_path):
    """Drift 2: one claim path (QueueView, priority then age) on every backend; the cwd is checked where other
    machines may run the task (and the worker says why it passed it over), not on one machine's store."""
    r = TaskRecord(task_id=new_task_id(), cwd=str(tmp_path / "not-here"), timeout_seconds=60)
    backend.submit(r, TaskRequest(options=TaskOptions(prompt="p"), cwd=r.cwd, claude_bin="/bin/true"))
    w = registered(backend)
    got = backend.claim(w, 1)
    if backend.caps.remote:
        assert got == [] and "has no directory" in (backend.queue_note(r.task_id) or "")
    else:
        assert [g.task_id for g in got] == [r.task_id]  # (its supervisor fails it, saying so)


def test_an_agent_whose_task_was_claimed_again_cannot_complete_it(backend):
    """Drift 3: completing an agent task checks the claim's epoch on every backend: a late result of an expired
    lease is refused and never the one read."""
    t = submit(backend)
    backend.update(t.task_id, lambda r: r.model_copy(update={"runner": "agent"}))
    first = backend.claim_agent("a1", [], None, 0.05)
    assert first is not None
    expire_at = first[0].lease.expires_at
    wait_until(lambda: utcnow() > expire_at)
    second = backend.claim_agent("a2", [], None, 60)
    assert second is not None and second[0].epoch == first[0].epoch + 1
    with pytest.raises(LeaseLostError):
        backend.complete_agent(t.task_id, first[1], "late", 1000)
    done = backend.complete_agent(t.task_id, second[1], "mine", 1000)
    assert done.status == TaskStatus.COMPLETED and backend.read_output(t.task_id, "result", 0, 100)[0] == b"mine"


def test_a_running_task_of_cc_tasks_0_2_is_left_to_its_live_supervisor(backend):
    """Drift 4a: a running record with no lease (cc-tasks 0.2) is left alone while its supervisor lives, and is a
    lost worker's once it does not, on every backend."""
    from cc_tasks import procs

    alive, dead = submit(backend), submit(backend)
    me = procs.ref_of(os.getpid())
    gone = me.model_copy(update={"start_ticks": (me.start_ticks or 0) + 1})
    for t, ref in ((alive, me), (dead, gone)):
        backend.update(
            t.task_id, lambda r, ref=ref: r.model_copy(update={"status": TaskStatus.RUNNING, "supervisor": ref})
        )
    assert backend.read(alive.task_id).status == TaskStatus.RUNNING
    assert backend.read(dead.task_id).status == TaskStatus.QUEUED


def test_a_worker_that_cannot_be_judged_yet_keeps_its_leases(backend):
    """Drift 4b: a lease is ended only when its worker is known to be gone; a backend that cannot tell yet (NATS
    just after an outage: live workers have not beaten again) leaves the task running, on every backend."""
    t = submit(backend)
    w = registered(backend)
    backend.claim(w, 1)
    backend.repo.liveness = lambda worker_id: Liveness.UNKNOWN  # (what NATS says until connected a whole lease)
    backend._seen_alive.clear()
    assert backend.read(t.task_id).status == TaskStatus.RUNNING
    del backend.repo.liveness
    expire(backend, w)
    assert backend.read(t.task_id).status == TaskStatus.QUEUED
