"""A task board for agents that are already running: post_task, claim_task under a lease, renew, complete,
fail, release; lease expiry; groups and their notes; a graph mixing agent tasks and claude tasks."""

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from cc_tasks.errors import InvalidOptionsError, LeaseLostError, TaskNotFoundError
from cc_tasks.models import BatchItem, PostOptions, TaskOptions, TaskStatus
from cc_tasks.server import create_server
from cc_tasks.store import TaskStore

from .conftest import ROOT
from .test_coordination import stdio_server
from .test_manager import fake


def post(m, prompt="do it", **kw):
    return m.post(PostOptions(prompt=prompt, **kw))


@pytest.mark.timeout(300)
async def test_claims_are_exactly_once_across_four_servers_and_eighty_claimers(cc_env, fake_claude, workdir):
    store = TaskStore(cc_env["CC_TASKS_DIR"])
    env = {**os.environ, "CC_TASKS_CLAUDE_BIN": fake_claude}
    clients = [stdio_server(env) for _ in range(4)]
    for c in clients:
        await c.__aenter__()
        await c.call_tool("get_server_info", {})  # (the server behind the handshake is up: see front.py)
    try:
        posted = (
            await clients[0].call_tool(
                "start_cc_tasks_batch",
                {"tasks": [{"prompt": f"job {i}", "runner": "agent", "group": "g"} for i in range(100)]},
            )
        ).structured_content["tasks"]
        ids = [t["task_id"] for t in posted]
        claims: list[tuple[str, str]] = []

        async def claimer(c: Client, name: str):
            while True:
                got = (await c.call_tool("claim_task", {"worker": name, "lease_seconds": 60})).structured_content
                if not got["claimed"]:
                    return
                claims.append((got["task_id"], name))
                await c.call_tool("complete_task", {"task_id": got["task_id"], "lease": got["lease"], "result": name})

        await asyncio.gather(*(claimer(c, f"s{n}-c{k}") for n, c in enumerate(clients) for k in range(20)))
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)
    counts = Counter(t for t, _ in claims)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}  # each task claimed exactly once
    assert len({who.split("-")[0] for _, who in claims}) == 4  # every server's claimers got work
    for t, who in claims:
        r = store.load(t)
        assert r.status == TaskStatus.COMPLETED and r.result == who and r.epoch == 1 and r.runner == "agent"


@pytest.mark.timeout(60)
async def test_an_expired_lease_requeues_and_the_late_complete_is_refused(fake_manager):
    t = post(fake_manager, max_attempts=2)
    first = fake_manager.claim("slow", lease_seconds=10)
    assert first.claimed and first.task_id == t.task_id and first.attempt == 1
    assert not fake_manager.claim("fast").claimed  # held
    deadline = time.monotonic() + 30
    while not (second := fake_manager.claim("fast", lease_seconds=60)).claimed:  # (an event: the clock)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.25)
    assert second.task_id == t.task_id and second.attempt == 2
    with pytest.raises(LeaseLostError, match="not the one that holds it"):
        fake_manager.complete(t.task_id, first.lease, "late")
    r = fake_manager.get(t.task_id)
    assert r.status == TaskStatus.RUNNING and r.lease.worker == "fast" and "lease expired" in r.attempts[0].reason
    kinds = [e["kind"] for e in fake_manager.events(t.task_id).events]
    assert "requeued" in kinds and kinds.count("status") >= 4
    assert fake_manager.complete(t.task_id, second.lease, "on time").status == TaskStatus.COMPLETED


async def test_renew_release_fail_and_retry(fake_manager):
    t = post(fake_manager, max_attempts=2)
    c = fake_manager.claim("a", lease_seconds=30)
    renewed = fake_manager.renew(t.task_id, c.lease, note="halfway")
    assert renewed.lease_expires_at > c.lease_expires_at
    assert fake_manager.get(t.task_id).progress.last_text == "halfway"
    assert fake_manager.release(t.task_id, c.lease).status == TaskStatus.QUEUED
    c2 = fake_manager.claim("b")
    assert c2.attempt == 1  # a release is not an attempt
    with pytest.raises(LeaseLostError):
        fake_manager.renew(t.task_id, c.lease)  # the released lease is gone
    r = fake_manager.fail(t.task_id, c2.lease, "flaky", retry=True)
    assert r.status == TaskStatus.QUEUED and r.attempts[0].retried
    c3 = fake_manager.claim("b")
    r = fake_manager.fail(t.task_id, c3.lease, "still broken", retry=True)
    assert r.status == TaskStatus.FAILED and "no attempts left" in r.error
    kinds = [e["kind"] for e in fake_manager.events(t.task_id).events]
    for kind in ("renewed", "released", "requeued"):
        assert kind in kinds


async def test_bad_input_is_refused_and_changes_nothing(fake_manager, workdir):
    t = post(fake_manager)
    claude = fake_manager.start(TaskOptions(prompt=fake({"sleep": 30}), cwd=str(workdir)))
    c = fake_manager.claim("me")
    before = fake_manager.store.load(t.task_id)
    with pytest.raises(InvalidOptionsError, match="worker is empty"):
        fake_manager.claim("  ")
    for seconds in (9.9, 86_401):
        with pytest.raises(InvalidOptionsError, match="lease_seconds"):
            fake_manager.claim("me", lease_seconds=seconds)
    with pytest.raises(InvalidOptionsError, match="not an agent task"):
        fake_manager.complete(claude.task_id, c.lease, "x")
    with pytest.raises(LeaseLostError, match="not the one that holds it"):
        fake_manager.complete(t.task_id, "someone-elses-lease", "x")
    with pytest.raises(InvalidOptionsError, match="at most 1,000,000"):
        fake_manager.complete(t.task_id, c.lease, "x" * 1_000_001)
    with pytest.raises(TaskNotFoundError):
        fake_manager.complete("20260101-000000-000-00000000", c.lease, "x")
    with pytest.raises(InvalidOptionsError, match="do not apply to an agent task"):
        fake_manager.start_batch([BatchItem(prompt="x", runner="agent", allowed_tools=["Bash"])])
    assert fake_manager.store.load(t.task_id) == before
    async with Client(create_server(fake_manager)) as client:
        with pytest.raises(ToolError, match="lease_seconds"):
            await client.call_tool("claim_task", {"worker": "me", "lease_seconds": 5})
        with pytest.raises(ToolError, match="either task_id or group"):
            await client.call_tool("cancel_task", {})


async def test_a_graph_of_agent_then_claude_then_agent_passes_results_on(fake_manager, workdir):
    res = fake_manager.start_batch(
        [
            BatchItem(key="plan", prompt="make a plan", runner="agent", group="g"),
            BatchItem(
                key="build",
                prompt=fake({"argv": True}),
                cwd=str(workdir),
                depends_on=["plan"],
                include_dependency_results=True,
                group="g",
            ),  # fmt: skip
            BatchItem(
                key="review",
                prompt="review it",
                runner="agent",
                depends_on=["build"],
                include_dependency_results=True,
                group="g",
            ),  # fmt: skip
        ]
    )
    ids = {t.key: t.task_id for t in res.tasks}
    c = fake_manager.claim("planner")  # workers never take agent tasks; the plan is the only one ready
    assert c.task_id == ids["plan"] and c.group == "g"
    assert fake_manager.get(ids["build"]).status == TaskStatus.WAITING
    assert not fake_manager.claim("reviewer").claimed  # the review waits for the build
    fake_manager.complete(ids["plan"], c.lease, "PLAN: three steps")
    build = (await fake_manager.wait([ids["build"]], timeout=60)).tasks[0]
    assert build.status == TaskStatus.COMPLETED and build.runner == "claude"
    assert "PLAN: three steps" in json.loads((workdir / "argv.json").read_text())["prompt"]
    review = fake_manager.claim("reviewer")
    assert review.task_id == ids["review"] and "fake result" in review.dependency_results
    assert review.prompt == "review it"
    fake_manager.complete(ids["review"], review.lease, "LGTM")
    assert (await fake_manager.wait(None, group="g", timeout=10)).done


async def test_groups_list_wait_cancel_and_share_notes(fake_manager, workdir):
    a = post(fake_manager, group="team")
    b = post(fake_manager, group="team")
    other = post(fake_manager, group="solo")
    c = fake_manager.start(TaskOptions(prompt=fake({"sleep": 60}), cwd=str(workdir), group="team"))
    assert {t.task_id for t in fake_manager.list(group="team").tasks} == {a.task_id, b.task_id, c.task_id}
    got = fake_manager.claim("x", group="solo")
    assert got.task_id == other.task_id
    done = fake_manager.cancel_group("team")
    assert sorted(done.cancelled) == sorted([a.task_id, b.task_id, c.task_id])
    waited = await fake_manager.wait(None, group="team", timeout=30)
    assert waited.done and {r.status for r in waited.tasks} == {TaskStatus.CANCELLED}
    assert fake_manager.get(other.task_id).status == TaskStatus.RUNNING  # another group: untouched
    # notes: appended, paged with a cursor; a keyed note replaces the last of its key
    for n in range(25):
        fake_manager.add_note("team", f"fact {n}", by="x")
    fake_manager.add_note("team", "style: black", key="style")
    fake_manager.add_note("team", "style: ruff", key="style")
    seen, since = [], 0
    while True:
        page = fake_manager.notes("team", since=since, limit=10)
        seen += [n.text for n in page.notes]
        since = page.next
        if not page.more:
            break
    assert seen == [f"fact {n}" for n in range(25)] + ["style: ruff"]
    assert [n.text for n in fake_manager.notes("team", since=26).notes] == ["style: ruff"]
    with pytest.raises(InvalidOptionsError, match="group"):
        fake_manager.add_note("../etc", "x")
    with pytest.raises(InvalidOptionsError, match="at most"):
        fake_manager.add_note("team", "\x01" * 5_000)


def _claude_p(real_claude: str, prompt: str, tools: list[str], cwd) -> list[dict]:
    config = {"mcpServers": {"cc": {"command": sys.executable, "args": [str(ROOT / "main.py")]}}}
    proc = subprocess.run(
        [real_claude, "-p", "--output-format=stream-json", "--verbose", f"--mcp-config={json.dumps(config)}",
         *[f"--allowedTools=mcp__cc__{t}" for t in tools]],  # fmt: skip
        input=prompt, capture_output=True, text=True, cwd=cwd, timeout=150,
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and events[-1]["type"] == "result", proc.stderr[-2000:]
    return events


@pytest.mark.timeout(300)
def test_claude_code_claims_and_completes_a_posted_task_and_a_lead_waits_on_the_group(cc_env, real_claude, workdir):
    store = TaskStore(cc_env["CC_TASKS_DIR"])
    # the lead: posts two agent tasks in a group
    steps = [
        {"tool": "mcp__cc__post_task", "input": {"prompt": "translate the README", "group": "docs"}},
        {"tool": "mcp__cc__post_task", "input": {"prompt": "proofread the README", "group": "docs"}},
        {"text": "posted"},
    ]
    _claude_p(real_claude, "plan @@mock " + json.dumps({"steps": steps}), ["post_task"], workdir)
    posted = [t for t in store.list_ids(include_finished=True)]
    assert len(posted) == 2 and all(store.load(t).runner == "agent" for t in posted)
    # two Claude Code sessions as workers: each claims one task and completes it with its lease
    for n in range(2):
        steps = [
            {"tool": "mcp__cc__claim_task", "input": {"worker": f"window-{n}", "group": "docs"}},
            {"tool": "mcp__cc__complete_task",
             "input": {"task_id": "$LAST.task_id", "lease": "$LAST.lease", "result": f"done by window-{n}"}},
            {"text": "finished: {last_result}"},
        ]  # fmt: skip
        events = _claude_p(real_claude, "work @@mock " + json.dumps({"steps": steps}),
                           ["claim_task", "complete_task"], workdir)  # fmt: skip
        assert not events[-1]["is_error"]
    results = sorted(store.load(t).result for t in posted)
    assert results == ["done by window-0", "done by window-1"]
    assert {store.load(t).lease.worker for t in posted} == {"window-0", "window-1"}
    # the lead waits on the group
    steps = [
        {"tool": "mcp__cc__wait_for_tasks", "input": {"group": "docs", "timeout_seconds": 30}},
        {"text": "lead saw: {last_result}"},
    ]
    events = _claude_p(real_claude, "wait @@mock " + json.dumps({"steps": steps}), ["wait_for_tasks"], workdir)
    final = events[-1]["result"]
    assert "lead saw:" in final and "done by window-0" in final and "done by window-1" in final


async def test_cancelling_a_claimed_agent_task_is_immediate_and_fences_its_agent(fake_manager):
    t = post(fake_manager, group="c")
    dependent = post(fake_manager, depends_on=[t.task_id])
    c = fake_manager.claim("holder")
    t0 = time.monotonic()
    done = fake_manager.cancel(t.task_id)
    assert time.monotonic() - t0 < 2 and done.status == TaskStatus.CANCELLED and "'holder'" in done.error
    with pytest.raises(LeaseLostError):
        fake_manager.complete(t.task_id, c.lease, "too late")
    assert fake_manager.get(dependent.task_id).status == TaskStatus.SKIPPED
    assert fake_manager.get(t.task_id).status == TaskStatus.CANCELLED
    with pytest.raises(InvalidOptionsError, match="has no tasks"):
        fake_manager.cancel_group("nobody")


async def test_a_stale_read_never_expires_a_lease_that_was_renewed(fake_manager):
    t = post(fake_manager)
    c = fake_manager.claim("a", lease_seconds=10)
    stale = fake_manager.store.load(t.task_id)
    fake_manager.renew(t.task_id, c.lease)
    past = stale.lease.model_copy(update={"expires_at": stale.lease.acquired_at})  # as a late reader sees it
    after = fake_manager.store.check_lease(stale.model_copy(update={"lease": past}))
    assert after.status == TaskStatus.RUNNING and after.attempts == []
    assert fake_manager.complete(t.task_id, c.lease, "ok").status == TaskStatus.COMPLETED


@pytest.mark.timeout(60)
async def test_an_expired_lease_is_noticed_by_a_wait_on_its_dependents(fake_manager):
    a = post(fake_manager, max_attempts=1)
    b = post(fake_manager, depends_on=[a.task_id])
    fake_manager.claim("gone", lease_seconds=10)  # and never heard of again
    waited = await fake_manager.wait([b.task_id], timeout=30)
    assert waited.done and waited.tasks[0].status == TaskStatus.SKIPPED
    a_now = fake_manager.get(a.task_id)
    assert a_now.status == TaskStatus.FAILED and "lease expired" in a_now.error


async def test_a_claim_reply_fits_and_says_when_its_prompt_was_cut(fake_manager):
    prompt = "start\x01" + "\x01" * 11_000  # escaped six times its size in JSON
    post(fake_manager, prompt=prompt, metadata={"k": "v" * 14_000})
    async with Client(create_server(fake_manager)) as client:
        res = await client.call_tool("claim_task", {"worker": "w"})
    size = len(json.dumps(res.structured_content)) + sum(len(b.text) for b in res.content)
    got = res.structured_content
    assert size <= 40_000 and got["prompt_truncated"] and got["prompt"].startswith("start")
    assert len(got["prompt"]) < len(prompt) and got["metadata"] == {"k": "v" * 14_000}
    page = fake_manager.output(got["task_id"], source="prompt")
    assert page.text.startswith("start") and page.total_bytes == len(prompt)
