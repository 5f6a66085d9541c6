"""Many processes on one NATS backend: worker processes (``python -m cc_tasks.worker --backend URL``) and real
MCP server processes (``CC_TASKS_BACKEND=URL python main.py`` over stdio) sharing one namespace. Tasks run
exactly once under the global cap and are read from every server; a SIGKILLed worker's tasks are requeued or
failed, never stuck and never run twice when they must not be; a cancel from a server stops the whole tree
on another worker; the real claude CLI runs on a worker, and Claude Code drives a server on NATS."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

from .conftest import ROOT
from .nats_fixture import namespace
from .test_manager import fake
from .test_nats_backend import start_worker, stop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def url(nats_url) -> str:
    return f"{nats_url}/{namespace()}"


def mcp_server(url: str, tmp_path: Path, tag: str) -> Client:
    """A client driving a fresh ``python main.py`` on the NATS backend (no claude binary, no usable store)."""
    env = {
        **os.environ,
        "CC_TASKS_BACKEND": url,
        "CC_TASKS_CLAUDE_BIN": str(tmp_path / "no-claude-here"),
        "CC_TASKS_DIR": str(tmp_path / "no-store"),
        "CC_TASKS_TEST_TAG": tag,
    }
    return Client(
        StdioTransport(command=sys.executable, args=[str(ROOT / "main.py")], env=env, cwd=str(ROOT), keep_alive=False)
    )


def runs(track: Path) -> list[tuple[str, int]]:
    """(task id, copies running at its start) for every run the fake claude logged in ``track``."""
    log = track / "runs.log"
    lines = log.read_text().split() if log.exists() else []
    return [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)]


async def submit(client: Client, tasks: list[dict]) -> list[str]:
    res = await client.call_tool("start_cc_tasks_batch", {"tasks": tasks})
    return [t["task_id"] for t in res.structured_content["tasks"]]


async def test_200_tasks_through_two_servers_run_once_each_under_the_cap_on_three_workers(
    url, tmp_path, fake_claude, workdir, monkeypatch
):
    cap = 4
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", str(cap))
    track = tmp_path / "track"
    track.mkdir()
    workers = [start_worker(url, fake_claude, "--slots", "3") for _ in range(3)]  # (9 slots: the cap binds)
    try:
        async with mcp_server(url, tmp_path, "a") as a, mcp_server(url, tmp_path, "b") as b:

            def batch(tag: str) -> list[dict]:
                cfg = {"track": str(track), "sleep": 0.1, "no_tools": True}
                return [
                    {"prompt": fake({**cfg, "result": f"{tag}-{i}"}), "cwd": str(workdir), "name": f"{tag}-{i}"}
                    for i in range(100)
                ]

            ids_a = await submit(a, batch("a"))
            ids_b = await submit(b, batch("b"))
            assert len(set(ids_a + ids_b)) == 200
            t0 = time.monotonic()
            for client, ids in ((a, ids_a), (b, ids_b)):
                res = await client.call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 90})
                assert res.structured_content["done"], res.structured_content
            elapsed = time.monotonic() - t0
            # every result, from both servers (the other server's tasks too)
            for client in (a, b):
                for tag, ids in (("a", ids_a), ("b", ids_b)):
                    res = (
                        await client.call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 5})
                    ).structured_content
                    got = {t["task_id"]: (t["status"], t["result"]) for t in res["tasks"]}
                    assert got == {t: ("completed", f"{tag}-{i}") for i, t in enumerate(ids)}
                one = (await client.call_tool("check_task_status", {"task_id": ids_b[-1]})).structured_content
                assert one["result"] == "b-99" and one["epoch"] == 1 and len(one["attempts"]) == 1
            info = (await a.call_tool("get_server_info", {})).structured_content
            assert info["backend"] == "nats" and len(info["workers"]) == 3
    finally:
        for w in workers:
            stop(w)
    seen = runs(track)
    assert sorted(t for t, _ in seen) == sorted(ids_a + ids_b)  # each exactly once
    assert max(n for _, n in seen) <= cap  # the global cap over three workers
    assert max(n for _, n in seen) >= 2, "the tasks never overlapped: the cap was not exercised"
    print(f"200 tasks in {elapsed:.1f} s, at most {max(n for _, n in seen)} at once")
