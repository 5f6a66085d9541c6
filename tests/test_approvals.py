"""Sub-agents that ask: the real claude CLI (against the mock API) asks through cc-tasks' approval server for a
Bash call its permissions do not cover; the request is a fact in the store, answered once by the lead (or a
person, a rule, the timeout), on the local store and on NATS through a second server process."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

from cc_tasks.approvals import rule_matches
from cc_tasks.config import Settings
from cc_tasks.errors import ApprovalError
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions, TaskStatus
from cc_tasks.server import create_server

from .conftest import ROOT, mock_prompt, pid_alive
from .test_manager import wait_until
from .test_nats_backend import start_worker, stop

pytestmark = pytest.mark.timeout(120)
STEPS = [{"bash": "echo hi > out.txt"}, {"text": "done: {last_result}"}]


def asking(m: TaskManager, task_id: str):
    """The first pending request of a task, once it asks (bounded wait)."""
    return wait_until(lambda: (r := m.get(task_id)).awaiting and r.awaiting[0], 60)


def data(res) -> dict:
    return res.structured_content


@pytest.fixture
async def client(manager):
    async with Client(create_server(manager)) as c:
        yield c


async def test_a_sub_agent_asks_and_the_lead_allows_it(client, manager, workdir):
    r = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir)))
    t0 = time.monotonic()
    waited = data(await client.call_tool("wait_for_tasks", {"task_ids": [r.task_id], "timeout_seconds": 60}))
    assert time.monotonic() - t0 < 30 and not waited["done"] and not waited["timed_out"]
    (need,) = waited["needs_approval"]
    assert need["task_id"] == r.task_id and need["tool_name"] == "Bash" and "echo hi" in need["input_preview"]
    brief = waited["tasks"][0]
    assert brief["awaiting_approval"] and brief["approvals_pending"] == 1 and brief["status"] == "running"
    status = data(await client.call_tool("check_task_status", {"task_id": r.task_id}))
    assert status["pending_approvals"][0]["request_id"] == need["request_id"]
    listed = data(await client.call_tool("list_approvals", {}))
    assert [a["request_id"] for a in listed["approvals"]] == [need["request_id"]]
    assert not (workdir / "out.txt").exists()  # nothing ran before the answer
    ans = data(await client.call_tool("answer_approval", {"task_id": r.task_id, "request_id": need["request_id"],
                                                          "decision": "allow"}))  # fmt: skip
    assert ans["decision"] == "allow"
    done = await manager.wait([r.task_id], timeout=60)
    assert done.tasks[0].status == TaskStatus.COMPLETED and (workdir / "out.txt").read_text() == "hi\n"
    assert done.tasks[0].pending_approvals == []
    kinds = [e["kind"] for _, e in manager.store.iter_events(r.task_id)]
    assert "approval_requested" in kinds and "approval_answered" in kinds
    with pytest.raises(ApprovalError, match="no pending request"):
        manager.answer_approval(r.task_id, need["request_id"], "deny")


async def test_deny_reaches_the_model_and_updated_input_changes_what_runs(manager, workdir):
    denied = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir), name="denied"))
    a = asking(manager, denied.task_id)
    manager.answer_approval(denied.task_id, a.request_id, "deny", message="not in this repo, use the fixture")
    changed_dir = workdir / "changed"
    changed_dir.mkdir()
    changed = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(changed_dir), name="changed"))
    b = asking(manager, changed.task_id)
    manager.answer_approval(changed.task_id, b.request_id, "allow", updated_input={"command": "echo other > out.txt"})
    done = {t.name: t for t in (await manager.wait([denied.task_id, changed.task_id], timeout=60)).tasks}
    assert "not in this repo, use the fixture" in done["denied"].result and not (workdir / "out.txt").exists()
    assert (changed_dir / "out.txt").read_text() == "other\n"


async def test_a_request_no_one_answers_is_denied_at_its_timeout_and_the_task_goes_on(manager, workdir):
    r = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir), approval_timeout_seconds=2))
    a = asking(manager, r.task_id)
    early = await manager.wait([r.task_id], timeout=60)  # (returns at once: the sub-agent asks)
    assert early.needs_approval and not early.done
    done = wait_until(lambda: (x := manager.get(r.task_id)).status.terminal and x, 60)
    assert done.status == TaskStatus.COMPLETED and "no one answered" in done.result
    with pytest.raises(ApprovalError):
        manager.answer_approval(r.task_id, a.request_id, "allow")
    events = [e for _, e in manager.store.iter_events(r.task_id) if e["kind"] == "approval_answered"]
    assert events and events[-1]["by"] == "timeout"


async def test_of_two_concurrent_answers_exactly_one_wins(manager, workdir):
    r = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir)))
    a = asking(manager, r.task_id)
    results: list = []
    go = threading.Barrier(2)

    def answer(decision: str) -> None:
        go.wait()
        try:
            results.append(manager.answer_approval(r.task_id, a.request_id, decision, by=decision))
        except ApprovalError as e:
            results.append(e)

    threads = [threading.Thread(target=answer, args=(d,)) for d in ("allow", "deny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [x for x in results if not isinstance(x, Exception)]
    lost = [x for x in results if isinstance(x, Exception)]
    assert len(won) == 1 and len(lost) == 1 and f"by {won[0].by}" in str(lost[0])
    done = (await manager.wait([r.task_id], timeout=60)).tasks[0]
    assert done.status == TaskStatus.COMPLETED and (workdir / "out.txt").exists() == (won[0].decision == "allow")


async def test_approvals_deny_keeps_the_old_behaviour_and_a_rule_answers_without_asking(manager, workdir):
    old = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir), approvals="deny"))
    ruled_dir = workdir / "ruled"
    ruled_dir.mkdir()
    rule = {"tool": "Bash(echo hi:*)", "decision": "allow"}
    ruled = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(ruled_dir), approval_rules=[rule]))
    done = {t.task_id: t for t in (await manager.wait([old.task_id, ruled.task_id], timeout=60)).tasks}
    assert done[old.task_id].status == TaskStatus.COMPLETED and not (workdir / "out.txt").exists()
    assert not any(e["kind"].startswith("approval") for _, e in manager.store.iter_events(old.task_id))
    assert (ruled_dir / "out.txt").read_text() == "hi\n"
    answered = [e for _, e in manager.store.iter_events(ruled.task_id) if e["kind"] == "approval_answered"]
    assert answered and answered[0]["by"] == "rule Bash(echo hi:*)"
    assert not any(e["kind"] == "approval_requested" for _, e in manager.store.iter_events(ruled.task_id))


async def test_remember_answers_the_same_call_for_the_rest_of_the_task(manager, workdir):
    steps = [{"bash": "echo hi >> out.txt"}, {"bash": "echo hi >> out.txt"}, {"text": "done"}]
    r = manager.start(TaskOptions(prompt=mock_prompt(steps), cwd=str(workdir)))
    a = asking(manager, r.task_id)
    got = manager.answer_approval(r.task_id, a.request_id, "allow", remember=True)
    assert got.remembered is not None and got.remembered.tool.startswith("Bash(echo hi")
    done = (await manager.wait([r.task_id], timeout=60)).tasks[0]
    assert done.status == TaskStatus.COMPLETED and (workdir / "out.txt").read_text() == "hi\nhi\n"
    asked = [e for _, e in manager.store.iter_events(r.task_id) if e["kind"] == "approval_requested"]
    assert len(asked) == 1  # the second call was answered by the remembered rule


async def test_a_cancel_while_it_waits_stops_the_tree_at_once(manager, workdir):
    r = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir)))
    asking(manager, r.task_id)
    claude = wait_until(lambda: manager.get(r.task_id).claude, 30)
    t0 = time.monotonic()
    done = manager.cancel(r.task_id)
    assert done.status == TaskStatus.CANCELLED and time.monotonic() - t0 < 10
    assert not pid_alive(claude.pid) and done.pending_approvals == []


def test_rules_use_the_patterns_of_allowed_tools():
    assert rule_matches("Bash(npm test:*)", "Bash", {"command": "npm test -- -k x"})
    assert rule_matches("Bash(npm test:*)", "Bash", {"command": "npm test"})
    assert not rule_matches("Bash(npm test:*)", "Bash", {"command": "npm testing"})
    assert rule_matches("Bash(git status)", "Bash", {"command": "git status"})
    assert not rule_matches("Bash(git status)", "Bash", {"command": "git status; rm -rf /"})
    assert rule_matches("Write", "Write", {"file_path": "/x/y.py"}) and not rule_matches("Write", "Edit", {})
    assert rule_matches("Edit(src/*.py)", "Edit", {"file_path": "/repo/src/a.py"})
    assert rule_matches("WebFetch(domain:example.com)", "WebFetch", {"url": "https://docs.example.com/x"})


async def test_on_nats_a_second_server_process_answers(nats_url, cc_env, tmp_path, workdir, monkeypatch):
    monkeypatch.setenv("CC_TASKS_BACKEND", nats_url)
    worker = start_worker(nats_url, cc_env["CC_TASKS_CLAUDE_BIN"])
    m = TaskManager(Settings.from_env())
    env = {**os.environ, "CC_TASKS_BACKEND": nats_url, "CC_TASKS_DIR": str(tmp_path / "no-store")}
    other = Client(StdioTransport(command=sys.executable, args=[str(ROOT / "main.py")], env=env, cwd=str(ROOT),
                                  keep_alive=False))  # fmt: skip
    try:
        r = m.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir)))
        async with other:
            waited = data(await other.call_tool("wait_for_tasks", {"task_ids": [r.task_id], "timeout_seconds": 60}))
            (need,) = waited["needs_approval"]
            listed = data(await other.call_tool("list_approvals", {}))
            assert [a["request_id"] for a in listed["approvals"]] == [need["request_id"]]
            await other.call_tool("answer_approval", {"task_id": r.task_id, "request_id": need["request_id"],
                                                      "decision": "allow"})  # fmt: skip
        done = (await m.wait([r.task_id], timeout=60)).tasks[0]
        assert done.status == TaskStatus.COMPLETED and (workdir / "out.txt").read_text() == "hi\n"
        answered = [e for _, e in m.store.iter_events(r.task_id) if e["kind"] == "approval_answered"]
        assert answered and answered[0]["decision"] == "allow"
    finally:
        stop(worker)
        m.store.close()
