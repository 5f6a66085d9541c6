"""Coordination: the shared concurrency cap and queue, dependencies, batches, priorities, retries,
follow-ups and the event log."""

import asyncio
import json
import os
import signal
import sys
import uuid

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from fastmcp.exceptions import ToolError

from cc_tasks.errors import InvalidOptionsError
from cc_tasks.models import BatchItem, TaskOptions, TaskStatus
from cc_tasks.server import create_server
from cc_tasks.store import TaskStore

from .conftest import ROOT, mock_prompt, pid_alive
from .test_manager import fake, wait_until
from .test_stdio_servers import server_pids


def stdio_server(env: dict) -> Client:
    return Client(
        StdioTransport(command=sys.executable, args=[str(ROOT / "main.py")], env=env, cwd=str(ROOT), keep_alive=False)
    )


@pytest.mark.timeout(400)
async def test_four_servers_two_hundred_tasks_cap_three(cc_env, fake_claude, workdir, tmp_path):
    track = tmp_path / "track"
    track.mkdir()
    env = {**os.environ, "CC_TASKS_CLAUDE_BIN": fake_claude, "CC_TASKS_MAX_CONCURRENT": "3"}
    prompt = fake({"track": str(track), "sleep": 0.05})
    clients = [stdio_server(env) for _ in range(4)]
    for c in clients:
        await c.__aenter__()
    try:

        async def submit(c):
            res = await asyncio.gather(
                *(c.call_tool("start_cc_task_async", {"prompt": prompt, "cwd": str(workdir)}) for _ in range(50))
            )
            return [r.structured_content["task_id"] for r in res]

        ids = [t for batch in await asyncio.gather(*(submit(c) for c in clients)) for t in batch]
        assert len(set(ids)) == 200
        reply = await clients[0].call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 350}, timeout=380)
        res = reply.structured_content
        assert res["done"], res["pending"][:5]
        assert sorted(res["finished"]) == sorted(ids) and res["tasks"]  # (entries: as many as fit in the reply)
        assert {t["status"] for t in res["tasks"]} == {"completed"} and "(200 completed)" in reply.content[0].text
        left = (await clients[1].call_tool("list_active_tasks", {})).structured_content
        assert left["count"] == 0
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    runs = [line.split() for line in (track / "runs.log").read_text().splitlines()]
    assert sorted(r[0] for r in runs) == sorted(ids)  # every task ran exactly once
    assert max(int(r[1]) for r in runs) <= 3  # the cap was never exceeded
    assert max(int(r[1]) for r in runs) >= 2  # and tasks did run side by side


async def test_queue_drains_after_the_server_that_queued_it_is_killed(cc_env, fake_claude, workdir):
    env = {**os.environ, "CC_TASKS_CLAUDE_BIN": fake_claude, "CC_TASKS_MAX_CONCURRENT": "1"}
    c = stdio_server(env)
    await c.__aenter__()
    try:
        batch = (
            await c.call_tool(
                "start_cc_tasks_batch",
                {"tasks": [{"prompt": fake({"sleep": 0.3}), "cwd": str(workdir)} for _ in range(5)]},
            )
        ).structured_content
        ids = [t["task_id"] for t in batch["tasks"]]
        (pid,) = server_pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid))
    finally:
        try:
            await c.__aexit__(None, None, None)
        except Exception:
            pass
    store = TaskStore(cc_env["CC_TASKS_DIR"])
    # no server is left: the store's worker goes on claiming the queued tasks
    wait_until(lambda: all(store.read(t).status == TaskStatus.COMPLETED for t in ids), timeout=60)
    starts = sorted(store.read(t).started_at for t in ids)
    assert starts == [store.read(t).started_at for t in ids]  # oldest first at equal priority


def cap(manager, monkeypatch, n: int) -> None:
    """Set the cap for this manager and for the worker it starts (which inherits its environment)."""
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", str(n))
    manager.settings.max_concurrent = manager.store.max_concurrent = n


async def test_killed_worker_gives_its_slot_back(cc_env, fake_manager, workdir, monkeypatch):
    cap(fake_manager, monkeypatch, 1)
    blocker = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    waiting = fake_manager.start(TaskOptions(prompt=fake({"result": "second"}), cwd=str(workdir)))
    rec = wait_until(lambda: (r := fake_manager.get(blocker.task_id)).status == TaskStatus.RUNNING and r.claude and r)
    queued = fake_manager.get(waiting.task_id)
    assert queued.status == TaskStatus.QUEUED and queued.queue_position == 1
    os.kill(rec.lease.pid, signal.SIGKILL)
    async with Client(create_server(fake_manager)) as c:  # it starts a new worker, which reclaims the slot
        res = await c.call_tool("wait_for_tasks", {"task_ids": [waiting.task_id], "timeout_seconds": 60})
    assert res.structured_content["tasks"][0]["result"] == "second"
    dead = fake_manager.get(blocker.task_id)
    assert dead.status == TaskStatus.FAILED and "worker lost" in dead.error
    wait_until(lambda: not pid_alive(rec.claude.pid))  # (stopped in the background of the read)


def _batch(workdir, log, spec: dict[str, tuple[list[str], dict]]) -> list[BatchItem]:
    return [
        BatchItem(
            key=k,
            prompt=fake({"log": str(log), "name": k, "sleep": 0.2, **cfg}),
            cwd=str(workdir),
            depends_on=deps or None,
            max_attempts=1,
        )
        for k, (deps, cfg) in spec.items()
    ]


async def test_diamond_runs_in_order(fake_manager, workdir, tmp_path):
    log = tmp_path / "order.log"
    items = _batch(workdir, log, {"d": (["b", "c"], {}), "b": (["a"], {}), "c": (["a"], {}), "a": ([], {})})
    res = fake_manager.start_batch(items)
    assert [t.key for t in res.tasks] == ["d", "b", "c", "a"]
    by_key = {t.key: t for t in res.tasks}
    # "a" has been started (a worker claims a task as it takes it); "d" waits for "b" and "c"
    assert by_key["a"].status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and by_key["d"].status == TaskStatus.WAITING
    assert fake_manager.get(by_key["d"].task_id).depends_on == [by_key["b"].task_id, by_key["c"].task_id]
    done = await fake_manager.wait([t.task_id for t in res.tasks], timeout=60)
    assert {t.status for t in done.tasks} == {TaskStatus.COMPLETED}
    lines = log.read_text().split("\n")
    pos = {line: i for i, line in enumerate(lines)}
    assert pos["end a"] < pos["start b"] and pos["end a"] < pos["start c"]
    assert pos["end b"] < pos["start d"] and pos["end c"] < pos["start d"]


async def test_failing_root_skips_its_descendants(fake_manager, workdir, tmp_path):
    log = tmp_path / "order.log"
    items = _batch(
        workdir,
        log,
        {
            "a": ([], {"is_error": True, "exit": 1, "result": "root broke"}),
            "b": (["a"], {}),
            "c": (["a"], {}),
            "d": (["b", "c"], {}),
        },
    )
    res = {t.key: t.task_id for t in fake_manager.start_batch(items).tasks}
    done = {t.task_id: t for t in (await fake_manager.wait(list(res.values()), timeout=60)).tasks}
    assert done[res["a"]].status == TaskStatus.FAILED and "root broke" in done[res["a"]].error
    for k in "bc":
        assert done[res[k]].status == TaskStatus.SKIPPED
        assert done[res[k]].error == f"dependency {res['a']} ended failed"
    assert done[res["d"]].status == TaskStatus.SKIPPED and "ended skipped" in done[res["d"]].error
    assert log.read_text().split() == ["start", "a", "end", "a"]  # nothing else ran


async def test_cycles_and_unknown_ids_are_rejected(fake_manager, workdir):
    cyc = [
        BatchItem(key="x", prompt="1", cwd=str(workdir), depends_on=["y"]),
        BatchItem(key="y", prompt="2", cwd=str(workdir), depends_on=["z"]),
        BatchItem(key="z", prompt="3", cwd=str(workdir), depends_on=["x"]),
    ]
    with pytest.raises(InvalidOptionsError, match="dependency cycle in the batch: x -> y -> z -> x"):
        fake_manager.start_batch(cyc)
    with pytest.raises(InvalidOptionsError, match="neither a task of this store nor a key"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(workdir), depends_on=["20200101-000000-000-00000000"]))
    with pytest.raises(InvalidOptionsError, match="neither a task"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(workdir), depends_on=["../../etc"]))
    with pytest.raises(InvalidOptionsError, match="unique"):
        fake_manager.start_batch([BatchItem(key="k", prompt="1"), BatchItem(key="k", prompt="2")])
    assert list(fake_manager.store.all_ids()) == []


async def test_priorities_reorder_the_queue(fake_manager, workdir, tmp_path, monkeypatch):
    cap(fake_manager, monkeypatch, 1)
    log, gate = tmp_path / "order.log", tmp_path / "gate"
    blocker = fake_manager.start(TaskOptions(prompt=fake({"wait_file": str(gate)}), cwd=str(workdir)))
    # (it holds the only slot before the others exist: else it is still queued, and counted, when positions are read)
    wait_until(lambda: fake_manager.get(blocker.task_id).status == TaskStatus.RUNNING)
    low = fake_manager.start(TaskOptions(prompt=fake({"log": str(log), "name": "low"}), cwd=str(workdir)))
    mid = fake_manager.start(TaskOptions(prompt=fake({"log": str(log), "name": "mid"}), cwd=str(workdir), priority=5))
    high = fake_manager.start(
        TaskOptions(prompt=fake({"log": str(log), "name": "high"}), cwd=str(workdir), priority=10)
    )
    assert [fake_manager.get(t.task_id).queue_position for t in (high, mid, low)] == [1, 2, 3]
    gate.touch()
    await fake_manager.wait([blocker.task_id, low.task_id, mid.task_id, high.task_id], timeout=60)
    assert log.read_text().splitlines() == ["start high", "end high", "start mid", "end mid", "start low", "end low"]


async def test_transient_api_error_is_retried_and_a_real_error_is_not(manager, workdir):
    key = uuid.uuid4().hex
    no_inner_retry = {"CLAUDE_CODE_MAX_RETRIES": "0"}
    flaky = manager.start(
        TaskOptions(
            prompt=mock_prompt([{"error_once": 529, "key": key, "text": "recovered"}]),
            cwd=str(workdir),
            env=no_inner_retry,
            retry_backoff_seconds=0.2,
        )
    )
    broken = manager.start(
        TaskOptions(
            prompt=mock_prompt([{"error": 400, "message": "bad field"}]),
            cwd=str(workdir),
            env=no_inner_retry,
            retry_backoff_seconds=0.2,
        )
    )
    done = {t.task_id: t for t in (await manager.wait([flaky.task_id, broken.task_id], timeout=90)).tasks}
    f = done[flaky.task_id]
    assert f.status == TaskStatus.COMPLETED and f.result == "recovered"
    assert [(a.attempt, a.status, a.retried, a.exit_code) for a in f.attempts] == [
        (1, TaskStatus.FAILED, True, 1),
        (2, TaskStatus.COMPLETED, False, 0),
    ]
    assert "529" in f.attempts[0].reason
    b = done[broken.task_id]
    assert b.status == TaskStatus.FAILED and len(b.attempts) == 1 and not b.attempts[0].retried
    # an overload after the task already used a tool is not retried: its side effects would repeat
    ran = manager.start(
        TaskOptions(
            prompt=mock_prompt(
                [{"bash": "echo side-effect >> effects.txt"}, {"error": 529, "type": "overloaded_error"}]
            ),
            cwd=str(workdir),
            env=no_inner_retry,
            allowed_tools=["Bash"],
            retry_backoff_seconds=0.2,
        )
    )
    r = (await manager.wait([ran.task_id], timeout=90)).tasks[0]
    assert r.status == TaskStatus.FAILED and len(r.attempts) == 1 and "529" in r.error
    assert (workdir / "effects.txt").read_text() == "side-effect\n"
    kinds = [e["kind"] for e in manager.events(flaky.task_id).events]
    assert kinds.count("retry") == 1 and kinds.count("started") == 2


async def test_continue_task_resumes_the_session(manager, workdir, mock_api):
    first = manager.start(
        TaskOptions(
            prompt=mock_prompt([{"text": "noted the word"}], "remember the word kiwi"),
            cwd=str(workdir),
            model="claude-sonnet-x",
            name="first",
        )
    )
    r1 = (await manager.wait([first.task_id], timeout=60)).tasks[0]
    assert r1.status == TaskStatus.COMPLETED and r1.session_id
    async with Client(create_server(manager)) as c:
        res = await c.call_tool(
            "continue_task",
            {
                "task_id": first.task_id,
                "prompt": mock_prompt([{"text": "user turns seen: {history}"}], "what was the word"),
            },
        )
        tid = res.structured_content["task_id"]
        r2 = (await c.call_tool("wait_for_tasks", {"task_ids": [tid], "timeout_seconds": 60})).structured_content
        second = (await c.call_tool("check_task_status", {"task_id": tid})).structured_content
    assert r2["tasks"][0]["status"] == "completed" and r2["tasks"][0]["result"] == "user turns seen: 2"
    assert second["result"] == "user turns seen: 2"
    assert second["parent_task_id"] == first.task_id and second["cwd"] == str(workdir)
    assert second["model"] == "claude-sonnet-x"  # options carry over unless given
    last = [b for b in mock_api.state.requests if "what was the word" in json.dumps(b["messages"])][-1]
    assert "remember the word kiwi" in json.dumps(last["messages"])  # the mock saw the earlier conversation
    with pytest.raises(InvalidOptionsError, match="no claude session|finish"):
        running = manager.start(
            TaskOptions(
                prompt=mock_prompt([{"bash": "python3 -c 'import time; time.sleep(30)'"}]),
                cwd=str(workdir),
                allowed_tools=["Bash"],
            )
        )
        manager.continue_task(running.task_id, "too early")


async def test_dependency_results_go_in_front_of_the_prompt(manager, workdir):
    res = manager.start_batch(
        [
            BatchItem(key="a", prompt=mock_prompt([{"text": "alpha-output-42"}]), cwd=str(workdir)),
            BatchItem(
                key="b",
                prompt=mock_prompt([{"text": "saw: {prompt}"}], "use what a found"),
                cwd=str(workdir),
                depends_on=["a"],
                include_dependency_results=True,
            ),
        ]
    )
    ids = [t.task_id for t in res.tasks]
    done = (await manager.wait(ids, timeout=60)).tasks
    b = done[1]
    assert b.status == TaskStatus.COMPLETED
    assert "alpha-output-42" in b.result and f'task_id="{ids[0]}"' in b.result and "use what a found" in b.result


async def test_events_page_with_a_cursor(fake_manager, workdir):
    r = fake_manager.start(TaskOptions(prompt=fake(), cwd=str(workdir)))
    await fake_manager.wait([r.task_id], timeout=60)
    page1 = fake_manager.events(r.task_id, since=0, limit=3)
    assert [e["seq"] for e in page1.events] == [0, 1, 2] and page1.more and page1.next == 3
    assert page1.events[0]["kind"] == "status" and page1.events[0]["status"] == "queued"
    page2 = fake_manager.events(r.task_id, since=page1.next)
    assert page2.events[0]["seq"] == 3 and not page2.more
    assert page2.events[-1] == {**page2.events[-1], "kind": "status", "status": "completed"}
    assert fake_manager.events(r.task_id, since=page2.next).events == []
    async with Client(create_server(fake_manager)) as c:
        with pytest.raises(ToolError, match="invalid task id"):
            await c.call_tool("get_task_events", {"task_id": "../x"})
        got = (await c.call_tool("get_task_events", {"task_id": r.task_id})).structured_content
    assert len(got["events"]) == page2.next
