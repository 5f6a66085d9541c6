"""Real server processes over stdio: tasks outlive a SIGKILLed server, and servers share one store."""

import os
import signal
import sys

import psutil
import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from fastmcp.exceptions import ToolError

from cc_tasks import __version__

from .conftest import ROOT, mock_prompt, pid_alive
from .test_manager import wait_until

#: A long-running tool call (claude's Bash tool refuses a standalone long ``sleep``).
SLEEPER = "python3 -c 'import time; time.sleep(300)'"


def server(tag: str) -> Client:
    """A client driving a fresh `python main.py` process; ``tag`` marks its command line."""
    env = dict(os.environ)
    return Client(
        StdioTransport(
            command=sys.executable,
            args=[str(ROOT / "main.py"), "serve"],
            env={**env, "CC_TASKS_TEST_TAG": tag},
            cwd=str(ROOT),
            keep_alive=False,
        )
    )


def server_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if any(a.endswith("main.py") for a in p.cmdline())]


def data(res) -> dict:
    return res.structured_content


async def test_task_survives_a_sigkilled_server(cc_env, workdir):
    first = server("a")
    await first.__aenter__()
    try:
        started = data(
            await first.call_tool(
                "start_cc_task_async",
                {
                    "prompt": mock_prompt([{"bash": "sleep 2; echo survived"}, {"text": "result: {last_result}"}]),
                    "cwd": str(workdir),
                    "allowed_tools": ["Bash"],
                },
            )
        )
        pids = server_pids()
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: not pid_alive(pids[0]))
    finally:
        try:
            await first.__aexit__(None, None, None)
        except Exception:
            pass
    async with server("b") as second:
        res = data(await second.call_tool("wait_for_tasks", {"task_ids": [started["task_id"]], "timeout_seconds": 60}))
        task = data(await second.call_tool("check_task_status", {"task_id": started["task_id"]}))
    assert res["done"] and res["tasks"][0]["status"] == "completed", res
    assert task["exit_code"] == 0 and task["result"] == "result: survived"


async def test_two_servers_see_cancel_and_clean_up_each_others_tasks(cc_env, workdir):
    async with server("a") as a, server("b") as b:
        long = data(
            await a.call_tool(
                "start_cc_task_async",
                {
                    "prompt": mock_prompt([{"bash": SLEEPER}, {"text": "never"}]),
                    "cwd": str(workdir),
                    "allowed_tools": ["Bash"],
                    "name": "long one",
                },
            )
        )["task_id"]
        listed = data(await b.call_tool("list_active_tasks", {}))
        assert [t["task_id"] for t in listed["tasks"]] == [long] and listed["tasks"][0]["name"] == "long one"
        cancelled = data(await b.call_tool("cancel_task", {"task_id": long}))
        assert cancelled["status"] == "cancelled"
        assert data(await a.call_tool("check_task_status", {"task_id": long}))["status"] == "cancelled"

        quick = data(await b.call_tool("start_cc_task_async", {"prompt": "quick one", "cwd": str(workdir)}))["task_id"]
        res = data(await a.call_tool("wait_for_tasks", {"task_ids": [quick], "timeout_seconds": 60}))
        assert res["tasks"][0]["result"].strip() == "mock reply: quick one"
        page = data(await a.call_tool("get_task_output", {"task_id": quick}))
        assert page["text"].strip() == "mock reply: quick one" and page["eof"]
        assert data(await a.call_tool("cleanup_task", {"task_id": quick}))["deleted"]
        with pytest.raises(ToolError, match="no task"):
            await b.call_tool("check_task_status", {"task_id": quick})
        everything = data(await b.call_tool("list_active_tasks", {"include_finished": True}))
        assert [t["task_id"] for t in everything["tasks"]] == [long]


async def test_python_m_entry_point_serves(cc_env):
    client = Client(
        StdioTransport(
            command=sys.executable, args=["-m", "cc_tasks"], env=dict(os.environ), cwd=str(ROOT), keep_alive=False
        )
    )
    async with client:
        names = {t.name for t in await client.list_tools()}
    assert names == {
        "execute_cc_task",
        "start_cc_task_async",
        "start_cc_tasks_batch",
        "continue_task",
        "check_task_status",
        "get_task_events",
        "list_active_tasks",
        "cancel_task",
        "cleanup_task",
        "get_task_output",
        "wait_for_tasks",
        "get_server_info",
        "post_task",
        "claim_task",
        "renew_task",
        "complete_task",
        "fail_task",
        "release_task",
        "add_note",
        "get_notes",
        "get_task_diff",
        "merge_task",
        "answer_approval",
        "list_approvals",
        "set_budget",
        "get_budget",
    }


async def test_initialize_reports_cc_tasks_version(cc_env):
    async with Client(server("v").transport, mode="legacy") as client:  # the initialize handshake Claude Code does
        info = client.initialize_result.server_info
        assert (info.name, info.version) == ("cc-tasks", __version__) and __version__ == "0.5.0"  # not FastMCP's
    async with Client(server("v").transport) as client:  # server/discover
        assert client.server_info.version == __version__


@pytest.mark.parametrize(
    "change, message",
    [
        ({"CC_TASKS_MAX_DEPTH": "lots"}, "CC_TASKS_MAX_DEPTH='lots' is not a number"),
        ({"CC_TASKS_DEFAULT_TIMEOUT": "0"}, "CC_TASKS_DEFAULT_TIMEOUT='0' must be at least 1"),
        ({"CC_TASKS_DIR": "LOOSE"}, "is group- or world-writable"),
    ],
)
def test_server_refuses_bad_configuration_clearly(cc_env, tmp_path, change, message):
    import subprocess

    if change.get("CC_TASKS_DIR") == "LOOSE":
        loose = tmp_path / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        change = {"CC_TASKS_DIR": str(loose)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        env={**os.environ, **change},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_version_and_help(cc_env):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "cc_tasks", "--version"], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert r.returncode == 0 and r.stdout.startswith("cc-tasks ")
    r = subprocess.run(
        [sys.executable, "-m", "cc_tasks", "--help"], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert r.returncode == 0 and "serve" in r.stdout
