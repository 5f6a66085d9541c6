"""The MCP tools in-process (fastmcp.Client(mcp)), running the real claude CLI against the mock API."""

import asyncio
import json
import subprocess
import sys
import time

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions, TaskStatus
from cc_tasks.server import create_server

from .conftest import ROOT, mock_prompt, pid_alive, zombies_of_this_process
from .test_manager import wait_until


@pytest.fixture
async def client(manager):
    async with Client(create_server(manager)) as c:
        yield c


def data(result) -> dict:
    return result.structured_content


SLEEPER = "sh -c 'echo $$ > sleep.pid; exec sleep 300'"


async def test_sync_execution_reports_progress(client, workdir):
    seen: list[tuple[float, str]] = []

    async def on_progress(progress, total, message):
        seen.append((progress, message))

    res = await client.call_tool(
        "execute_cc_task",
        {
            "prompt": mock_prompt([{"bash": "sleep 2.5; echo slept"}, {"text": "done: {last_result}"}]),
            "cwd": str(workdir),
            "allowed_tools": ["Bash"],
            "name": "sync-1",
        },
        progress_handler=on_progress,
    )
    d = data(res)
    assert d["status"] == "completed" and d["result"] == "done: slept" and d["exit_code"] == 0
    assert d["name"] == "sync-1" and d["num_turns"] == 2 and d["session_id"] and d["total_cost_usd"] > 0
    assert len(seen) >= 3, seen
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert any("last tool Bash" in m for _, m in seen), seen


async def test_ten_async_tasks_in_parallel(client, workdir):
    ids = []
    for i in range(10):
        r = data(
            await client.call_tool(
                "start_cc_task_async", {"prompt": f"parallel task number {i}", "cwd": str(workdir), "name": f"p{i}"}
            )
        )
        assert r["status"] in ("queued", "running")
        ids.append(r["task_id"])
    listed = data(await client.call_tool("list_active_tasks", {}))
    assert {t["task_id"] for t in listed["tasks"]} <= set(ids)
    res = data(await client.call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 90}))
    assert res["done"] and sorted(res["finished"]) == sorted(ids)
    by_id = {t["task_id"]: t for t in res["tasks"]}
    for i, tid in enumerate(ids):
        assert by_id[tid]["status"] == "completed"
        assert by_id[tid]["result"].strip() == f"mock reply: parallel task number {i}"
    assert data(await client.call_tool("list_active_tasks", {}))["count"] == 0
    everything = data(await client.call_tool("list_active_tasks", {"include_finished": True, "limit": 5}))
    assert everything["count"] == 5 and everything["more"]


async def test_bash_tool_writes_a_file_in_cwd(client, workdir):
    res = data(
        await client.call_tool(
            "execute_cc_task",
            {
                "prompt": mock_prompt(
                    [{"bash": "echo made-by-subagent > made.txt && pwd"}, {"text": "wrote in {last_result}"}]
                ),
                "cwd": str(workdir),
                "allowed_tools": ["Bash"],
            },
        )
    )
    assert res["status"] == "completed"
    assert (workdir / "made.txt").read_text().strip() == "made-by-subagent"
    assert res["result"] == f"wrote in {workdir}"


async def test_api_error_fails_with_reason(client, workdir):
    res = data(
        await client.call_tool(
            "execute_cc_task",
            {
                "prompt": mock_prompt(
                    [{"error": 400, "type": "invalid_request_error", "message": "field foo is not allowed"}]
                ),
                "cwd": str(workdir),
            },
        )
    )
    assert res["status"] == "failed" and res["is_error"] is True and res["exit_code"] == 1
    assert (
        "API Error: 400" in res["error"]
        and "field foo is not allowed" in res["error"]
        and "API error (400)" in res["error"]
    )


async def _assert_tree_gone(manager, task_id, workdir):
    rec = manager.get(task_id)
    sleeper = int((workdir / "sleep.pid").read_text())
    # claude and its tools are stopped before the final record is written ...
    for pid in (sleeper, rec.claude.pid):
        assert not pid_alive(pid), pid
    # ... by the store's worker, which goes on serving
    assert rec.lease is not None and pid_alive(rec.lease.pid)
    wait_until(lambda: not zombies_of_this_process())


async def test_timeout_leaves_no_process(client, manager, workdir):
    res = data(
        await client.call_tool(
            "execute_cc_task",
            {
                "prompt": mock_prompt([{"bash": SLEEPER}, {"text": "never"}]),
                "cwd": str(workdir),
                "allowed_tools": ["Bash"],
                "timeout_seconds": 5,
            },
        )
    )
    assert res["status"] == "timeout" and "timed out after 5s" in res["error"]
    await _assert_tree_gone(manager, res["task_id"], workdir)


async def test_cancel_leaves_no_process(client, manager, workdir):
    tid = data(
        await client.call_tool(
            "start_cc_task_async",
            {
                "prompt": mock_prompt([{"bash": SLEEPER}, {"text": "never"}]),
                "cwd": str(workdir),
                "allowed_tools": ["Bash"],
            },
        )
    )["task_id"]
    wait_until(lambda: (workdir / "sleep.pid").exists())
    res = data(await client.call_tool("cancel_task", {"task_id": tid}))
    assert res["status"] == "cancelled" and res["exit_code"] is not None
    await _assert_tree_gone(manager, tid, workdir)
    assert data(await client.call_tool("check_task_status", {"task_id": tid}))["status"] == "cancelled"


async def test_client_cancelling_execute_stops_the_task(client, manager, workdir):
    call = asyncio.create_task(
        client.call_tool(
            "execute_cc_task",
            {
                "prompt": mock_prompt([{"bash": SLEEPER}, {"text": "never"}]),
                "cwd": str(workdir),
                "allowed_tools": ["Bash"],
            },
        )
    )
    await asyncio.to_thread(wait_until, lambda: (workdir / "sleep.pid").exists())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    tid = manager.list(include_finished=True).tasks[0].task_id
    rec = await asyncio.to_thread(wait_until, lambda: (r := manager.get(tid)).status.terminal and r)
    assert rec.status == TaskStatus.CANCELLED
    await asyncio.to_thread(wait_until, lambda: not pid_alive(int((workdir / "sleep.pid").read_text())))


async def test_twenty_megabytes_of_output_stay_bounded_and_page(client, manager, workdir):
    size = 20_000_000
    res = await client.call_tool(
        "execute_cc_task", {"prompt": mock_prompt([{"big": size}]), "cwd": str(workdir), "timeout_seconds": 110}
    )
    d = data(res)
    assert d["status"] == "completed" and d["result_truncated"] and d["result_chars"] == size
    assert sum(len(c.text) for c in res.content) + len(json.dumps(d)) <= 40_000
    status = await client.call_tool("check_task_status", {"task_id": d["task_id"]})
    assert sum(len(c.text) for c in status.content) + len(json.dumps(status.structured_content)) <= 40_000
    first = data(await client.call_tool("get_task_output", {"task_id": d["task_id"]}))
    assert first["total_bytes"] == size and len(first["text"]) == 16_000 and not first["eof"]  # the default limit
    last = data(await client.call_tool("get_task_output", {"task_id": d["task_id"], "offset": size - 100}))
    assert last["eof"] and len(last["text"]) == 100
    transcript = data(
        await client.call_tool("get_task_output", {"task_id": d["task_id"], "source": "transcript", "limit": 1000})
    )
    assert transcript["total_bytes"] > size and len(transcript["text"]) <= 1000
    # every byte is reachable by following next_offset
    offset, total = 0, 0
    while True:
        page = manager.output(d["task_id"], offset=offset)
        total += len(page.text)
        offset = page.next_offset
        if page.eof:
            break
    assert total == size


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\x00b", "", "20260101-000000-000-1a2b3c4d/../.."])
async def test_hostile_task_ids_are_rejected(client, manager, bad):
    before = sorted(p.name for p in manager.store.root.rglob("*"))
    for tool, extra in (
        ("check_task_status", {}),
        ("cancel_task", {}),
        ("cleanup_task", {}),
        ("get_task_output", {}),
        ("wait_for_tasks", None),
    ):
        args = {"task_ids": [bad]} if extra is None else {"task_id": bad}
        with pytest.raises(ToolError, match="invalid task id"):
            await client.call_tool(tool, args)
    assert sorted(p.name for p in manager.store.root.rglob("*")) == before


async def test_unknown_task_and_bad_options_are_clear_errors(client, workdir, tmp_path):
    with pytest.raises(ToolError, match="no task 20260101-000000-000-1a2b3c4d"):
        await client.call_tool("check_task_status", {"task_id": "20260101-000000-000-1a2b3c4d"})
    with pytest.raises(ToolError, match="prompt is empty"):
        await client.call_tool("start_cc_task_async", {"prompt": "  "})
    with pytest.raises(ToolError, match="does not exist"):
        await client.call_tool("start_cc_task_async", {"prompt": "x", "cwd": str(tmp_path / "missing")})


async def test_missing_claude_binary_is_a_tool_error(cc_env, tmp_path, monkeypatch, workdir):
    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", str(tmp_path / "nowhere" / "claude"))
    m = TaskManager(Settings.from_env())
    async with Client(create_server(m)) as c:
        for tool in ("start_cc_task_async", "execute_cc_task"):
            with pytest.raises(ToolError, match="claude CLI not found"):
                await c.call_tool(tool, {"prompt": "hello", "cwd": str(workdir)})
    assert list(m.store.all_ids()) == []


async def test_status_answers_fast_while_a_sync_execution_runs(client, manager, workdir):
    call = asyncio.create_task(
        client.call_tool(
            "execute_cc_task",
            {
                "prompt": mock_prompt([{"bash": "sleep 3; echo ok"}, {"text": "done"}]),
                "cwd": str(workdir),
                "allowed_tools": ["Bash"],
            },
        )
    )
    tid = await asyncio.to_thread(wait_until, lambda: (t := manager.list().tasks) and t[0].task_id)
    worst = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        st = data(await client.call_tool("check_task_status", {"task_id": tid}))
        await client.call_tool("list_active_tasks", {})
        worst = max(worst, time.monotonic() - t0)
        assert not st["status"] == "completed" or call.done()
        await asyncio.sleep(0.05)
    assert worst < 1.0, f"status calls blocked for {worst:.2f}s while execute_cc_task ran"
    assert not call.done()
    assert data(await call)["status"] == "completed"


def test_sub_agents_that_may_not_nest_do_not_start_cc_tasks(manager, workdir, real_claude, monkeypatch):
    """cc-tasks registered at user scope (as the README says): a sub-agent at CC_TASKS_MAX_DEPTH could not use
    it, so claude is told not to start it (deniedMcpServers); one that may nest gets it."""
    add = [real_claude, "mcp", "add", "--scope", "user", "cc-tasks", "--", sys.executable, str(ROOT / "main.py")]
    subprocess.run(add, check=True, capture_output=True, timeout=60)

    def servers(max_depth: str) -> list[tuple[str, str]]:
        monkeypatch.setenv("CC_TASKS_MAX_DEPTH", max_depth)  # (what the sub-agent's environment says)
        r = manager.start(TaskOptions(prompt="say hi", cwd=str(workdir)))
        assert wait_until(lambda: manager.get(r.task_id).status.terminal, 90)
        assert manager.get(r.task_id).status == TaskStatus.COMPLETED
        page = manager.output(r.task_id, source="transcript", limit=200_000)
        init = next(e for e in map(json.loads, page.text.splitlines()) if e.get("subtype") == "init")
        return [(s["name"], s["status"]) for s in init.get("mcp_servers", [])]

    approvals = ("cc-tasks-approvals", "connected")  # (the task's own approval server: never denied)
    assert servers("1") == [approvals]  # depth 1 of at most 1: cc-tasks not started
    assert sorted(servers("2")) == [("cc-tasks", "connected"), approvals]
