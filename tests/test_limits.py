"""Fleet limits with the real claude CLI against a mock API whose replies cost money: a budget reserves at claim
and caps claude's --max-budget-usd, so spend ends at most one turn per running task above it; tasks it cannot
start are reported blocked at once and start when it is raised; 429s lower the starts of every claimer."""

from __future__ import annotations

import time

import pytest

from cc_tasks.engine import TaskEngine
from cc_tasks.memory_repo import MemoryRepo
from cc_tasks.models import TaskOptions, TaskStatus

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
    assert manager.get(second.task_id).blocked_by == "budget" and manager.get_budget("g").blocked == 1
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
