"""Many processes on one NATS backend: worker processes (``python -m cc_tasks.worker --backend URL``) and real
MCP server processes (``CC_TASKS_BACKEND=URL python main.py`` over stdio) sharing one namespace. Tasks run
exactly once under the global cap and are read from every server; a SIGKILLed worker's tasks are requeued or
failed, never stuck and never run twice when they must not be; a cancel from a server stops the whole tree
on another worker; the real claude CLI runs on a worker, and Claude Code drives a server on NATS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions, TaskStatus

from .conftest import ROOT, mock_prompt, pid_alive
from .test_manager import fake, wait_until
from .test_nats_backend import start_worker, stop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def url(nats_url) -> str:
    return nats_url


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
                for t, want in ((ids_a[0], "a-0"), (ids_b[0], "b-0")):  # (the object store's copy)
                    page = (await client.call_tool("get_task_output", {"task_id": t})).structured_content
                    assert page["text"] == want and page["eof"]
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


async def test_a_killed_workers_task_ends_failed_and_never_runs_twice_with_max_attempts_1_or_after_a_tool(
    url, tmp_path, fake_claude, workdir, monkeypatch
):
    lease = 2
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_LEASE_SECONDS", str(lease))  # (the first opener sets the workers bucket's TTL)
    m = TaskManager(Settings.from_env())
    track = tmp_path / "track"
    track.mkdir()
    first = start_worker(url, fake_claude, "--slots", "2")
    second = None
    try:
        go = tmp_path / "go"
        once = m.start(TaskOptions(prompt=fake({"wait_file": str(go), "no_tools": True, "track": str(track)}),
                                   cwd=str(workdir), max_attempts=1))  # fmt: skip
        acted = m.start(TaskOptions(prompt=fake({"sleep": 300, "track": str(track)}), cwd=str(workdir)))
        assert m.get(acted.task_id).max_attempts == 3
        recs = [
            wait_until(lambda: (x := m.get(once.task_id)).claude and x),
            wait_until(lambda: (x := m.get(acted.task_id)).progress.tool_calls and x),
        ]
        assert recs[1].claude is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        t0 = time.monotonic()
        second = start_worker(url, fake_claude, "--slots", "2")  # (it would take either task if it were requeued)
        ends = [wait_until(lambda t=t: (x := m.get(t)).status.terminal and x, timeout=lease + 10) for t in
                (once.task_id, acted.task_id)]  # fmt: skip
        assert time.monotonic() - t0 < lease + 5
        assert [e.status for e in ends] == [TaskStatus.FAILED, TaskStatus.FAILED]
        assert all("worker lost" in e.error for e in ends)
        assert "no attempts left" in ends[0].error and "used tools" in ends[1].error
        assert [len(e.attempts) for e in ends] == [1, 1] and not any(a.retried for e in ends for a in e.attempts)
        for r in recs:  # (on this host: the lost worker's claude was stopped)
            wait_until(lambda r=r: not pid_alive(r.claude.pid), timeout=10)
        go.touch()
        assert sorted(t for t, _ in runs(track)) == sorted([once.task_id, acted.task_id])  # each ran once
        assert [e.epoch for e in ends] == [1, 1]
    finally:
        stop(first)
        if second is not None:
            stop(second)
        m.store.close()


async def test_a_cancel_from_a_server_stops_the_whole_tree_on_another_worker_within_2_s(
    url, tmp_path, fake_claude, workdir
):
    workers = [start_worker(url, fake_claude), start_worker(url, fake_claude)]
    try:
        async with mcp_server(url, tmp_path, "a") as a, mcp_server(url, tmp_path, "b") as b:
            task_id = (
                await a.call_tool(
                    "start_cc_task_async",
                    {"prompt": fake({"grandchild": True, "sleep": 300}), "cwd": str(workdir)},
                )
            ).structured_content["task_id"]
            pidfile = workdir / "grandchild.pid"
            wait_until(lambda: pidfile.exists() and pidfile.read_text())
            rec = (await b.call_tool("check_task_status", {"task_id": task_id})).structured_content
            assert rec["status"] == "running" and rec["claude"]["pid"]
            tree = [rec["claude"]["pid"], int(pidfile.read_text())]
            assert all(pid_alive(p) for p in tree)
            runner = [w for w in workers if w.pid == rec["lease"]["pid"]]
            assert len(runner) == 1  # (a worker process, not a server, runs it)
            t0 = time.monotonic()
            done = (await b.call_tool("cancel_task", {"task_id": task_id})).structured_content
            took = time.monotonic() - t0
            print(f"cancel_task answered cancelled after {took:.2f} s")
            assert done["status"] == "cancelled" and took < 2.0, (took, done)
            assert "did not stop it" not in (done.get("error") or "")  # (its worker stopped it, not the server)
            wait_until(lambda: not any(pid_alive(p) for p in tree), timeout=2.0 - min(took, 1.5) + 0.5)
            seen = (await a.call_tool("check_task_status", {"task_id": task_id})).structured_content
            assert seen["status"] == "cancelled"
    finally:
        for w in workers:
            stop(w)
    assert not [p for p in tree if pid_alive(p)]


async def test_the_real_claude_cli_runs_a_bash_step_on_a_nats_worker(cc_env, url, workdir, monkeypatch):
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    worker = start_worker(url, cc_env["CC_TASKS_CLAUDE_BIN"])
    m = TaskManager(Settings.from_env())
    try:
        steps = [{"bash": "echo from-nats > out.txt && echo wrote"}, {"text": "result: {last_result}"}]
        r = m.start(TaskOptions(prompt=mock_prompt(steps), cwd=str(workdir), allowed_tools=["Bash"]))
        done = (await m.wait([r.task_id], timeout=90)).tasks[0]
        assert done.status == TaskStatus.COMPLETED, done.error
        rec = m.get(r.task_id)
        assert rec.result.strip() == "result: wrote" and rec.progress.tool_calls == 1
        assert rec.lease is None or rec.lease.pid == worker.pid
        assert (workdir / "out.txt").read_text() == "from-nats\n"
        transcript = m.store.read_output(r.task_id, "transcript", 0, 1 << 20)[0]
        assert b'"name":"Bash"' in transcript.replace(b" ", b"")
    finally:
        stop(worker)
        m.store.close()


async def test_claude_code_orchestrates_two_subagents_through_a_server_on_nats(cc_env, url, real_claude, workdir):
    def child(name: str) -> str:
        return mock_prompt([{"text": f"{name}-result"}], text=name)

    steps = [
        {"tool": "mcp__cc__start_cc_task_async", "input": {"prompt": child("alpha"), "name": "alpha"}},
        {"tool": "mcp__cc__start_cc_task_async", "input": {"prompt": child("beta"), "name": "beta"}},
        {"tool": "mcp__cc__wait_for_tasks", "input": {"task_ids": "$TASK_IDS", "timeout_seconds": 90}},
        {"text": "parent saw: {last_result}"},
    ]
    config = {"mcpServers": {"cc": {"command": sys.executable, "args": [str(ROOT / "main.py")],
                                    "env": {"CC_TASKS_BACKEND": url}}}}  # fmt: skip
    worker = start_worker(url, real_claude, "--slots", "2")
    try:
        proc = subprocess.run(
            [real_claude, "-p", "--output-format=stream-json", "--verbose", f"--mcp-config={json.dumps(config)}",
             "--allowedTools=mcp__cc__start_cc_task_async", "--allowedTools=mcp__cc__wait_for_tasks"],
            input=mock_prompt(steps, text="split the work in two"), capture_output=True, text=True, cwd=workdir,
            timeout=100,
        )  # fmt: skip
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        result = events[-1]
        assert proc.returncode == 0 and result["type"] == "result" and not result["is_error"], proc.stderr[-2000:]
        answer = result["result"]
        assert answer.startswith("parent saw: ") and "alpha-result" in answer and "beta-result" in answer
        m = TaskManager(Settings.from_env().model_copy(update={"backend": url}))
        try:
            children = [m.get(t.task_id) for t in m.list(include_finished=True).tasks]
        finally:
            m.store.close()
        assert sorted(c.name for c in children) == ["alpha", "beta"]
        assert all(c.status == TaskStatus.COMPLETED and c.depth == 1 and c.cwd == str(workdir) for c in children)
        assert all(len(c.attempts) == 1 and c.attempts[0].exit_code == 0 for c in children)
    finally:
        stop(worker)
    assert not (workdir / ".." / "store").resolve().exists()  # (nothing went to the local store)
