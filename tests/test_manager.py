"""The manager and supervisor with the fake claude: fast, and covering cases the real CLI cannot produce."""

import json
import os
import time

import psutil
import pytest

from cc_tasks.config import Settings
from cc_tasks.errors import (
    ClaudeNotFoundError,
    DepthLimitError,
    InvalidOptionsError,
    InvalidTaskIdError,
    TaskNotFoundError,
)
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions, TaskStatus

from .conftest import pid_alive, zombies_of_this_process


def fake(cfg: dict | None = None, text: str = "do the thing") -> str:
    return f"{text}\nFAKE {json.dumps(cfg or {})}\n"


def wait_until(pred, timeout=30.0):
    """Poll a condition that has no event to await (another process's state), bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


async def run(m: TaskManager, opts: TaskOptions, timeout=60):
    r = m.start(opts)
    res = await m.wait([r.task_id], timeout=timeout)
    assert res.done
    return res.tasks[0]


async def test_completes_with_result_prompt_on_stdin_and_env(fake_manager, workdir, monkeypatch):
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    monkeypatch.setenv("CC_TASKS_TOKEN", "server-secret")
    prompt = "-p --help\n" + fake(
        {
            "argv": True,
            "env_keys": [
                "CC_TASKS_DEPTH",
                "CLAUDECODE",
                "CLAUDE_CODE_ENTRYPOINT",
                "MY_VAR",
                "CC_TASKS_DIR",
                "CC_TASKS_TOKEN",
            ],
            "result": "all good",
        }
    )
    r = await run(
        fake_manager, TaskOptions(prompt=prompt, cwd=str(workdir), env={"MY_VAR": "v"}, name="n1", metadata={"k": 1})
    )
    assert r.status == TaskStatus.COMPLETED and r.exit_code == 0 and r.result == "all good"
    assert r.name == "n1" and r.metadata == {"k": 1} and r.num_turns == 2 and r.total_cost_usd == 0.001
    assert r.session_id and r.started_at and r.finished_at and r.cwd == str(workdir)
    seen = json.loads((workdir / "argv.json").read_text())
    assert seen["prompt"] == prompt  # the prompt arrives on stdin, untouched, though it starts with -p
    assert seen["argv"][1:4] == ["-p", "--output-format=stream-json", "--verbose"]
    # (and the approval server, approvals "ask" by default: tests/test_approvals.py)
    assert seen["argv"][4].startswith("--mcp-config=") and "cc-tasks-approvals" in seen["argv"][4]
    assert seen["argv"][5:] == ["--permission-prompt-tool=mcp__cc-tasks-approvals__approve"]
    assert seen["env"] == {
        "CC_TASKS_DEPTH": "1",
        "CLAUDECODE": None,
        "CLAUDE_CODE_ENTRYPOINT": None,
        "MY_VAR": "v",
        "CC_TASKS_DIR": str(fake_manager.store.root),
        "CC_TASKS_TOKEN": None,
    }
    assert "server-secret" not in fake_manager.store.path(r.task_id, "request.json").read_text()
    events = [
        json.loads(line)["kind"] for line in fake_manager.store.path(r.task_id, "events.jsonl").read_text().splitlines()
    ]
    assert events[0] == "status" and "tool_use" in events and "result" in events and events[-1] == "status"


@pytest.mark.parametrize(
    "cfg, error",
    [
        ({"no_result": True, "exit": 3}, "exited with code 3 without a result event"),
        ({"is_error": True, "exit": 1, "result": "API Error: 500 boom"}, "API Error: 500 boom"),
        ({"exit": 2, "result": "half done"}, "exit code 2"),
    ],
)
async def test_failures_carry_a_reason(fake_manager, workdir, cfg, error):
    r = await run(fake_manager, TaskOptions(prompt=fake(cfg), cwd=str(workdir)))
    assert r.status == TaskStatus.FAILED and error in r.error
    assert r.exit_code == cfg["exit"]


async def test_cancel_stops_a_stubborn_tree_and_leaves_no_zombie(fake_manager, workdir):
    r = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "ignore_signals": True, "grandchild": True}), cwd=str(workdir))
    )
    # (claude's pid reaches the record with the first progress flush, within FLUSH_EVERY)
    rec = wait_until(lambda: (workdir / "grandchild.pid").exists() and (x := fake_manager.get(r.task_id)).claude and x)
    grandchild = int((workdir / "grandchild.pid").read_text())
    assert psutil.Process(grandchild).ppid() == rec.claude.pid
    t0 = time.monotonic()
    done = fake_manager.cancel(r.task_id)
    assert done.status == TaskStatus.CANCELLED and "cancelled" in done.error and done.cancel_requested
    assert time.monotonic() - t0 < 15  # SIGINT, SIGTERM ignored: SIGKILL after the bounded grace periods
    for pid in (rec.claude.pid, grandchild):
        assert not pid_alive(pid)
    assert pid_alive(rec.lease.pid)  # the worker goes on serving the store
    wait_until(lambda: not zombies_of_this_process())
    # cancelling again is harmless
    assert fake_manager.cancel(r.task_id).status == TaskStatus.CANCELLED


async def test_timeout_stops_the_tree(fake_manager, workdir):
    r = await run(
        fake_manager,
        TaskOptions(prompt=fake({"sleep": 300, "grandchild": True}), cwd=str(workdir), timeout_seconds=1.5),
    )
    assert r.status == TaskStatus.TIMEOUT and "timed out after 1.5s" in r.error
    grandchild = int((workdir / "grandchild.pid").read_text())
    assert not pid_alive(grandchild) and not pid_alive(r.claude.pid)
    wait_until(lambda: not zombies_of_this_process())


async def test_leftover_background_processes_are_stopped_when_claude_exits(fake_manager, workdir):
    r = await run(fake_manager, TaskOptions(prompt=fake({"grandchild": True}), cwd=str(workdir)))
    assert r.status == TaskStatus.COMPLETED
    assert not pid_alive(int((workdir / "grandchild.pid").read_text()))


async def test_leftovers_of_one_task_are_stopped_and_no_other_tasks_processes(fake_manager, tmp_path):
    """The worker supervises both tasks and adopts what their tools leave behind: each task's leftovers
    are told apart by the task id in their environment."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    b = fake_manager.start(TaskOptions(prompt=fake({"grandchild": True, "sleep": 300}), cwd=str(b_dir)))
    wait_until(lambda: (b_dir / "grandchild.pid").exists())
    a = await run(fake_manager, TaskOptions(prompt=fake({"grandchild": True}), cwd=str(a_dir)))
    assert a.status == TaskStatus.COMPLETED and a.lease is not None
    assert not pid_alive(int((a_dir / "grandchild.pid").read_text()))
    b_rec = wait_until(lambda: (x := fake_manager.get(b.task_id)).claude and x)
    b_grandchild = int((b_dir / "grandchild.pid").read_text())
    assert b_rec.status == TaskStatus.RUNNING and pid_alive(b_rec.claude.pid) and pid_alive(b_grandchild)
    assert fake_manager.cancel(b.task_id).status == TaskStatus.CANCELLED
    assert not pid_alive(b_grandchild) and not pid_alive(b_rec.claude.pid)


async def test_output_pages_cover_everything_and_respect_utf8(fake_manager, workdir):
    text = "é☃ok\n" * 30_000  # multi-byte characters, 270 KB
    r = await run(fake_manager, TaskOptions(prompt=fake({"result": text}), cwd=str(workdir)))
    assert r.result_truncated and r.result_chars == len(text) and len(r.bounded().result) <= 16_000
    pages, offset = [], 0
    while True:
        page = fake_manager.output(r.task_id, offset=offset, limit=20_000)
        assert len(page.text.encode()) <= 20_000 and "\ufffd" not in page.text
        pages.append(page.text)
        offset = page.next_offset
        if page.eof:
            break
    assert "".join(pages) == text and page.total_bytes == len(text.encode())
    transcript = fake_manager.output(r.task_id, source="transcript", limit=500)
    assert transcript.text.startswith('{"type": "system"') and not transcript.eof


async def test_wait_any_all_and_timeout(fake_manager, workdir):
    slow = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    quick = fake_manager.start(TaskOptions(prompt=fake(), cwd=str(workdir)))
    res = await fake_manager.wait([slow.task_id, quick.task_id], mode="any", timeout=60)
    assert res.done and res.finished == [quick.task_id] and res.pending == [slow.task_id]
    res = await fake_manager.wait([slow.task_id, quick.task_id], mode="all", timeout=0.3)
    assert not res.done and res.timed_out and res.pending == [slow.task_id]
    with pytest.raises(TaskNotFoundError):
        await fake_manager.wait([slow.task_id, "20200101-000000-000-00000000"])
    with pytest.raises(InvalidTaskIdError):
        await fake_manager.wait(["../etc"])


def test_bad_starts_leave_nothing_behind(fake_manager, workdir, monkeypatch, tmp_path):
    store = fake_manager.store
    with pytest.raises(InvalidOptionsError, match="does not exist"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(tmp_path / "nope")))
    with pytest.raises(InvalidOptionsError, match="add_dirs"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(workdir), add_dirs=[str(tmp_path / "nope")]))
    missing = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_CLAUDE_BIN": str(tmp_path / "no-claude")}))
    with pytest.raises(ClaudeNotFoundError, match="CC_TASKS_CLAUDE_BIN"):
        missing.start(TaskOptions(prompt="x", cwd=str(workdir)))
    monkeypatch.setenv("PATH", str(tmp_path))
    on_path = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_CLAUDE_BIN": "claude"}))
    with pytest.raises(ClaudeNotFoundError, match="not on PATH"):
        on_path.start(TaskOptions(prompt="x", cwd=str(workdir)))
    deep = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_DEPTH": "2"}))
    with pytest.raises(DepthLimitError, match="CC_TASKS_MAX_DEPTH is 2"):
        deep.start(TaskOptions(prompt="x", cwd=str(workdir)))
    assert list(store.all_ids()) == [] and list(store.tasks_dir.iterdir()) == []


async def test_cleanup_stops_and_deletes(fake_manager, workdir):
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    res = fake_manager.cleanup(r.task_id)
    assert res.deleted and res.was_status == TaskStatus.RUNNING
    assert not pid_alive(rec.claude.pid)
    assert not fake_manager.store.task_dir(r.task_id).exists()
    with pytest.raises(TaskNotFoundError, match="no task"):
        fake_manager.cleanup(r.task_id)
    with pytest.raises(InvalidTaskIdError):
        fake_manager.cleanup("/etc/passwd")


async def test_a_torn_record_touches_only_its_own_task(fake_manager, workdir):
    from fastmcp import Client

    from cc_tasks.errors import CorruptRecordError
    from cc_tasks.server import create_server

    good = await run(fake_manager, TaskOptions(prompt=fake({"result": "fine"}), cwd=str(workdir)))
    torn = await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))
    path = fake_manager.store.path(torn.task_id, "record.json")
    path.write_bytes(path.read_bytes()[:57])  # cut short, as a crash or a full disk leaves it
    listing = fake_manager.list(include_finished=True)
    assert [t.task_id for t in listing.tasks] == [good.task_id] and listing.unreadable == [torn.task_id]
    with pytest.raises(CorruptRecordError, match=f"task {torn.task_id}: its record {path} is unreadable"):
        fake_manager.get(torn.task_id)
    async with Client(create_server(fake_manager)) as c:
        res = await c.call_tool("list_active_tasks", {"include_finished": True})
        assert res.structured_content["unreadable"] == [torn.task_id]
        res = await c.call_tool("check_task_status", {"task_id": torn.task_id}, raise_on_error=False)
        assert res.is_error and str(path) in res.content[0].text and "cleanup_task" in res.content[0].text
        assert (await c.call_tool("check_task_status", {"task_id": good.task_id})).structured_content[
            "result"
        ] == "fine"
        res = await c.call_tool("cleanup_task", {"task_id": torn.task_id})
        assert res.structured_content["deleted"] and res.structured_content["was_status"] is None
    assert fake_manager.list(include_finished=True).unreadable == []
    # the queue goes on: a new task runs
    assert (await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))).status == TaskStatus.COMPLETED
