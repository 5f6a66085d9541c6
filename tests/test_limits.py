"""Fleet limits with the real claude CLI against a mock API whose replies cost money: a budget reserves at claim
and caps claude's --max-budget-usd, so spend ends at most one turn per running task above it; tasks it cannot
start are reported blocked at once and start when it is raised; 429s lower the starts of every claimer."""

from __future__ import annotations

import time

import pytest

from cc_tasks.engine import TaskEngine
from cc_tasks.memory_repo import MemoryRepo
from cc_tasks.models import TaskOptions, TaskStatus, utcnow

from .conftest import mock_prompt
from .test_manager import wait_until

pytestmark = pytest.mark.timeout(120)
#: One turn of 250,000 input tokens: about $1 at the pinned claude's price for the mock's model.
DOLLAR_TURN = {"usage": {"input_tokens": 250_000, "output_tokens": 5}}


def costly(n_turns: int = 1) -> str:
    return mock_prompt([{"bash": "echo spent", **DOLLAR_TURN}] * n_turns + [{"text": "done"}])


async def test_a_group_budget_blocks_new_tasks_and_raising_it_releases_them(manager, workdir):
    manager.set_budget(0.5, group="g")
    opts = {"cwd": str(workdir), "group": "g", "allowed_tools": ["Bash"]}
    first = manager.start(TaskOptions(prompt=costly(3), **opts, name="first"))
    done = wait_until(lambda: (r := manager.get(first.task_id)).status.terminal and r, 60)
    assert done.budget_reserved_usd == 0.5  # (all that was left: claude ran with --max-budget-usd=0.5)
    spent = manager.get_budget("g")
    assert spent.reserved_usd == 0 and spent.finished == 1 and spent.spent_usd == pytest.approx(done.total_cost_usd)
    assert 0.5 < spent.spent_usd < 0.5 + 1.1  # it stopped after the turn that reached it: one turn over at most
    second = manager.start(TaskOptions(prompt=mock_prompt([{"text": "cheap"}]), **opts, name="second"))
    t0 = time.monotonic()
    waited = await manager.wait([second.task_id], timeout=60)
    assert time.monotonic() - t0 < 30 and not waited.done and not waited.timed_out
    assert [b.task_id for b in waited.blocked] == [second.task_id] and "exhausted" in waited.blocked[0].reason
    blocked = manager.get(second.task_id)
    assert blocked.blocked_by == "budget" and manager.get_budget("g").blocked == 1
    assert "group 'g''s budget is exhausted" in blocked.queue_note and "set_budget" in blocked.queue_note
    events = [e["kind"] for _, e in manager.store.iter_events(second.task_id)]
    assert "budget_exhausted" in events
    raised = manager.set_budget(5.0, group="g")
    assert raised.budget_usd == 5.0 and raised.remaining_usd == pytest.approx(5.0 - spent.spent_usd)
    finished = (await manager.wait([second.task_id], timeout=60)).tasks[0]
    assert finished.status == TaskStatus.COMPLETED and finished.result == "cheap" and finished.blocked_by is None
    after = manager.get_budget("g")
    assert after.finished == 2 and after.reserved_usd == 0 and after.blocked == 0
    other = manager.get_budget()  # (no store budget: nothing)
    assert other.budget_usd is None


def test_reservations_are_capped_by_every_budget_and_returned_at_the_end():
    t = [0.0]
    e = TaskEngine(MemoryRepo(clock=lambda: t[0]), max_concurrent=8)
    from .test_backend_contract import registered, submit

    e.set_budget(3.0)
    e.set_budget(10.0, group="g")
    tasks = [submit(e) for _ in range(3)]
    for x in tasks:
        e.update(x.task_id, lambda r: r.model_copy(update={"group": "g"}))
    w = registered(e)
    got = e.claim(w, 3)
    assert [r.budget_reserved_usd for r in got] == [2.0, 1.0]  # the store's $3 bounds them
    assert e.get_budget().remaining_usd == 0 and e.get_budget("g").reserved_usd == 3.0
    third = e.read(tasks[2].task_id)
    assert (
        third.status == TaskStatus.QUEUED and third.blocked_by == "budget" and "store's budget" in third.blocked_reason
    )
    e.finish(got[0].lease, TaskStatus.COMPLETED, total_cost_usd=0.25)
    b = e.get_budget()
    assert b.spent_usd == 0.25 and b.reserved_usd == 1.0 and b.finished == 1
    (again,) = e.claim(w, 3)
    assert again.task_id == tasks[2].task_id and again.budget_reserved_usd == 1.75


def test_429s_halve_the_starts_pause_them_and_quiet_brings_them_back(monkeypatch):
    from . import test_backend_contract as c

    e = TaskEngine(MemoryRepo(), max_concurrent=8)
    for _ in range(12):
        c.submit(e)
    w = c.registered(e)
    first = e.claim(w, 4)
    assert len(first) == 4
    lim = e.rate_limited(429, 1500)
    assert lim.effective_cap == 2 and lim.paused_until is not None and lim.last_status == 429
    assert e.rate_limited(429, 1500).effective_cap == 2  # (a burst halves once)
    assert e.claim(w, 8) == []  # paused, and 4 already run against an effective cap of 2
    e.finish(first[0].lease, TaskStatus.COMPLETED)
    e.finish(first[1].lease, TaskStatus.COMPLETED)
    e.finish(first[2].lease, TaskStatus.COMPLETED)
    wait_until(lambda: e.claim(w, 8), 10)  # the pause ends: up to 2 run again
    assert sum(r.status == TaskStatus.RUNNING for r in (e.read(t) for t in e.list_ids(False))) == 2
    import cc_tasks.limits as limits

    monkeypatch.setattr(limits, "LIMITER_QUIET", 0.0)
    e.claim(w, 8)
    assert e.limiter().effective_cap == 3  # a quiet period: one more
    info = e.limiter()
    assert info.last_status == 429


# -- the limiter, budgets across processes and machines, end to end (the real claude CLI) --------------------------


def rate_limited_once(key: str, text: str) -> str:
    """A task whose first API request gets a 429 (once per key, for the whole mock), then answers ``text``."""
    return mock_prompt([{"error_once": 429, "type": "rate_limit_error", "key": key, "text": text}])


async def test_429s_on_ten_running_tasks_lower_the_cap_every_task_completes_and_quiet_restores_it(
    manager, workdir, monkeypatch
):
    import uuid

    import cc_tasks.limits as limits
    from cc_tasks.models import BatchItem

    from .test_coordination import cap

    cap(manager, monkeypatch, 10)  # (before the worker starts: it inherits the environment)
    run = uuid.uuid4().hex[:8]
    items = [
        BatchItem(prompt=rate_limited_once(f"limiter-{run}-{i}", f"ok {i}"), cwd=str(workdir), name=f"t{i}")
        for i in range(10)
    ]
    ids = [t.task_id for t in manager.start_batch(items).tasks]
    # while they run: a 429 claude retries lowers the cap every claimer sees (the worker writes it to the store)
    seen = wait_until(
        lambda: (lim := manager.store.limiter()).last_status == 429 and (lim.effective_cap or 10) < 10 and lim, 60
    )
    assert seen.paused_until is not None and seen.last_at is not None
    done = await manager.wait(ids, timeout=90)
    assert done.done and not done.blocked
    assert [(t.status, t.result) for t in done.tasks] == [(TaskStatus.COMPLETED, f"ok {i}") for i in range(10)]
    for t in ids:  # every task's claude retried its 429 once (CLAUDE_CODE_MAX_RETRIES=1 still retries once)
        retries = [e for _, e in manager.store.iter_events(t) if e["kind"] == "api_retry"]
        assert [e["status"] for e in retries] == [429], retries
    info = manager.server_info().limiter
    assert info.last_status == 429 and info.effective_cap is not None and info.effective_cap < 10
    # quiet periods bring it back, one start a period, up to the cap (LIMITER_QUIET of this process: 0 s)
    monkeypatch.setattr(limits, "LIMITER_QUIET", 0.0)
    # (the pause runs from when the worker saw the api_retry event: it may outlast the task by a moment)
    wait_until(lambda: utcnow() >= manager.store.limiter().paused_until, 10)
    caps = []
    for _ in range(10):
        allowed = manager.store.starts_allowed(0)
        caps.append(manager.store.limiter().effective_cap)
        if allowed == 10:
            break
    assert allowed == 10 and caps[-1] is None, caps
    assert caps[:-1] == sorted(set(caps[:-1])) and all(c > info.effective_cap for c in caps[:-1])  # (climbing)
    assert manager.server_info().limiter.last_status == 429  # (the last one is still reported)


#: What one DOLLAR_TURN costs at most (claude prices it $1.0001; the margin is for the final text turn's tokens).
TURN_USD = 1.01


def spent_within(info, budget: float) -> None:
    """The budget held: used up (tasks were blocked), and at most one turn over it per task that ran under it."""
    assert info.budget_usd == budget and info.reserved_usd == 0 and info.running == 0, info
    assert budget - 0.01 <= info.spent_usd <= budget + info.finished * TURN_USD, info


async def test_a_store_budget_set_by_one_server_process_bounds_the_tasks_of_another(
    cc_env, manager, workdir, monkeypatch, tmp_path
):
    import os
    import sys

    from fastmcp import Client
    from fastmcp.client.transports import StdioTransport

    from .conftest import ROOT
    from .test_coordination import cap

    cap(manager, monkeypatch, 6)  # (room for every task: the budget is what holds them back)
    budget = 4.0
    server = Client(  # another server process on the same store (this test's manager is the first)
        StdioTransport(
            command=sys.executable, args=[str(ROOT / "main.py")], env=dict(os.environ), cwd=str(ROOT), keep_alive=False
        )
    )
    opts = {"cwd": str(workdir), "allowed_tools": ["Bash"], "max_budget_usd": 1.5}  # ($1.5: claude stops at turn 2)
    async with server as other:
        got = (await other.call_tool("set_budget", {"budget_usd": budget})).structured_content
        assert got["budget_usd"] == budget and got["remaining_usd"] == budget
        assert manager.get_budget().budget_usd == budget  # (the other process's budget is this one's)
        mine, theirs = [], []
        for i in range(3):  # interleaved: the oldest run first, so both processes' tasks run under the budget
            res = await other.call_tool("start_cc_task_async", {"prompt": costly(3), "name": f"theirs-{i}", **opts})
            theirs.append(res.structured_content["task_id"])
            mine.append(manager.start(TaskOptions(prompt=costly(3), name=f"mine-{i}", **opts)).task_id)
        ids = [t for pair in zip(theirs, mine, strict=True) for t in pair]
        res = await other.call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 90})
        waited = res.structured_content
        assert not waited["done"] and not waited["timed_out"], waited  # (it returned: the rest are blocked)
        theirs_info = (await other.call_tool("get_budget", {})).structured_content
    ran = [t for t in ids if manager.get(t).status.terminal]
    held = [t for t in ids if not manager.get(t).status.terminal]
    assert len(ran) >= 2 and set(ran) & set(mine) and set(ran) & set(theirs), (ran, held)
    assert held and sorted(b["task_id"] for b in waited["blocked"]) == sorted(held)
    assert all("exhausted" in b["reason"] for b in waited["blocked"])
    for t in ran:  # each reserved at most $1.5 and claude stopped within one turn of its reservation
        r = manager.get(t)
        assert 0 < r.budget_reserved_usd <= 1.5 and r.total_cost_usd <= r.budget_reserved_usd + TURN_USD, r
        assert r.status == TaskStatus.FAILED and "error_max_budget_usd" in r.error  # (claude stopped at it)
    for t in held:
        r = manager.get(t)
        assert r.status == TaskStatus.QUEUED and r.blocked_by == "budget" and r.budget_reserved_usd is None
        # (the event is appended just after the record says blocked: waited for, not raced)
        wait_until(lambda t=t: any(e["kind"] == "budget_exhausted" for _, e in manager.store.iter_events(t)), 10)
    info = manager.get_budget()
    spent_within(info, budget)
    assert info.finished == len(ran) and info.blocked == len(held)
    assert info.spent_usd == pytest.approx(sum(manager.get(t).total_cost_usd for t in ran))
    assert {k: theirs_info[k] for k in ("spent_usd", "finished", "blocked")} == {
        "spent_usd": info.spent_usd, "finished": info.finished, "blocked": info.blocked}  # fmt: skip


@pytest.mark.timeout(150)
async def test_a_store_budget_on_nats_bounds_the_tasks_of_two_worker_machines(cc_env, nats_url, workdir, monkeypatch):
    from cc_tasks.config import Settings
    from cc_tasks.manager import TaskManager
    from cc_tasks.models import BatchItem
    from cc_tasks.nats_backend import NatsBackend

    from .test_nats_backend import start_worker, stop

    monkeypatch.setenv("CC_TASKS_BACKEND", nats_url)
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "4")  # (the first worker stores it: room for both workers' slots)
    budget = 4.0
    claude = cc_env["CC_TASKS_CLAUDE_BIN"]
    workers = {m: start_worker(nats_url, claude, "--slots", "2", "--label", m) for m in ("a", "b")}  # two machines
    m = TaskManager(Settings.from_env())
    other = NatsBackend(nats_url)  # another process's view of the backend
    try:
        wait_until(lambda: len(m.store.workers()) == 2, 30)
        assert m.set_budget(budget).budget_usd == budget and other.get_budget().budget_usd == budget
        opts = {"cwd": str(workdir), "allowed_tools": ["Bash"], "max_budget_usd": 1.5}
        items = [  # (a label pins a task to one machine; in one batch, so both machines claim at once)
            BatchItem(prompt=costly(3), name=f"{machine}-{i}", labels=[machine], **opts)
            for i in range(3)
            for machine in ("a", "b")
        ]
        ids = [t.task_id for t in m.start_batch(items).tasks]
        waited = await m.wait(ids, timeout=120)
        assert not waited.done and not waited.timed_out and waited.blocked
        ran = [r for r in waited.tasks if r.status.terminal]
        held = [r for r in waited.tasks if not r.status.terminal]
        assert {r.labels[0] for r in ran} == {"a", "b"}, [(r.name, r.status) for r in waited.tasks]  # both machines
        for r in ran:
            assert 0 < r.budget_reserved_usd <= 1.5 and r.total_cost_usd <= r.budget_reserved_usd + TURN_USD, r
        assert sorted(b.task_id for b in waited.blocked) == sorted(r.task_id for r in held)
        assert all(r.blocked_by == "budget" and "exhausted" in r.blocked_reason for r in held)
        info = other.get_budget()
        spent_within(info, budget)
        assert info.finished == len(ran) and info.blocked == len(held)
        assert info.spent_usd == pytest.approx(sum(r.total_cost_usd for r in ran))
        assert m.get_budget() == info
        raised = other.set_budget(info.spent_usd + 1.0)  # raised by the other process: a blocked task runs now
        assert raised.budget_usd == info.spent_usd + 1.0  # (a worker may have reserved the $1 left already)
        assert raised.remaining_usd + raised.reserved_usd == pytest.approx(1.0)
        # (whichever machine claims first takes the $1 left; the other's tasks stay blocked)
        wait_until(lambda: [r for r in held if m.get(r.task_id).status.terminal], 60)
        again = wait_until(lambda: (b := other.get_budget()).running == 0 and b.blocked == len(held) - 1 and b, 30)
        late = [r for r in (m.get(h.task_id) for h in held) if r.status.terminal]
        assert len(late) == 1 and late[0].budget_reserved_usd == pytest.approx(1.0), late
        spent_within(again, info.spent_usd + 1.0)
        assert again.finished == len(ran) + 1 and again.blocked == len(held) - 1
    finally:
        for s in m.list().tasks:
            m.store.request_cancel(s.task_id)
        for w in workers.values():
            stop(w)
        other.close()
        m.store.close()
