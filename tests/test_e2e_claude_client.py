"""The real use: Claude Code itself is the MCP client. The mock makes the parent agent start two
sub-agents with start_cc_task_async and then wait_for_tasks; the sub-agents run the real CLI too."""

import json
import subprocess
import sys

from cc_tasks.models import TaskStatus
from cc_tasks.store import TaskStore

from .conftest import ROOT


def test_claude_code_orchestrates_two_subagents(cc_env, real_claude, workdir):
    def child(name: str) -> str:
        return f"{name} @@mock " + json.dumps({"steps": [{"text": f"{name}-result"}]})

    steps = [
        {"tool": "mcp__cc__start_cc_task_async", "input": {"prompt": child("alpha"), "name": "alpha"}},
        {"tool": "mcp__cc__start_cc_task_async", "input": {"prompt": child("beta"), "name": "beta"}},
        {"tool": "mcp__cc__wait_for_tasks", "input": {"task_ids": "$TASK_IDS", "timeout_seconds": 90}},
        {"text": "parent saw: {last_result}"},
    ]
    prompt = "split the work in two @@mock " + json.dumps({"steps": steps})
    config = {"mcpServers": {"cc": {"command": sys.executable, "args": [str(ROOT / "main.py")]}}}
    proc = subprocess.run(
        [
            real_claude,
            "-p",
            "--output-format=stream-json",
            "--verbose",
            f"--mcp-config={json.dumps(config)}",
            "--allowedTools=mcp__cc__start_cc_task_async",
            "--allowedTools=mcp__cc__wait_for_tasks",
        ],
        input=prompt,
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=150,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result = events[-1]
    assert proc.returncode == 0 and result["type"] == "result" and not result["is_error"], proc.stderr[-2000:]
    called = [
        b["name"]
        for e in events
        if e["type"] == "assistant"
        for b in e["message"]["content"]
        if b["type"] == "tool_use"
    ]
    assert called == ["mcp__cc__start_cc_task_async"] * 2 + ["mcp__cc__wait_for_tasks"]
    answer = result["result"]
    assert answer.startswith("parent saw: ") and "alpha-result" in answer and "beta-result" in answer
    store = TaskStore(cc_env["CC_TASKS_DIR"])
    children = [store.read(t) for t in store.all_ids()]
    assert sorted(c.name for c in children) == ["alpha", "beta"]
    assert all(c.status == TaskStatus.COMPLETED and c.depth == 1 and c.cwd == str(workdir) for c in children)
