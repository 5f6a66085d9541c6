"""The repository as a Claude Code plugin and its own marketplace, with the real pinned claude CLI offline in a
scratch HOME: the manifests validate, installing from the local marketplace connects the cc-tasks server,
a session finds the skill and the slash commands, and the launcher's first use makes its environment once."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cc_tasks import __version__
from cc_tasks.models import TaskOptions
from cc_tasks.store import TaskStore

from .conftest import ROOT
from .test_manager import fake, run, wait_until

TOOLS = [
    "cancel_task",
    "check_task_status",
    "cleanup_task",
    "continue_task",
    "execute_cc_task",
    "get_server_info",
    "get_task_diff",
    "get_task_events",
    "get_task_output",
    "list_active_tasks",
    "merge_task",
    "start_cc_task_async",
    "start_cc_tasks_batch",
    "wait_for_tasks",
]
PREFIX = "mcp__plugin_cc-tasks_cc-tasks__"
#: The folder Claude Code gives the plugin as CLAUDE_PLUGIN_DATA (plugin@marketplace, '@' made '-').
DATA = Path(".claude/plugins/data/cc-tasks-cc-tasks")
CONNECTED = re.compile(r"^plugin:cc-tasks:cc-tasks: \S+/bin/cc-tasks-mcp .*✔ Connected", re.M)
#: The one warning `claude plugin validate` gives this repository: its CLAUDE.md is for developers of cc-tasks.
KNOWN_WARNING = "CLAUDE.md at the plugin root is not loaded as project context"


def claude(real_claude: str, *args: str, cwd: Path | str | None = None, input: str | None = None, timeout=60, env=None):
    return subprocess.run(
        [real_claude, *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


#: In -p mode Claude Code connects MCP servers in the background and goes on without one that is not up within
#: 5 s; on a loaded 2-core machine Python alone may take that long, so the sessions here wait for it.
WAIT_FOR_MCP = {"MCP_CONNECTION_NONBLOCKING": "0", "MCP_CONNECT_TIMEOUT_MS": "60000"}


def session(real_claude: str, prompt: str, cwd: Path, timeout=120) -> list[dict]:
    """Run ``claude -p`` with stream-json output and return its events."""
    args = ["-p", "--output-format=stream-json", "--verbose"]
    res = claude(real_claude, *args, cwd=cwd, input=prompt, timeout=timeout, env=WAIT_FOR_MCP)
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and events and events[-1]["type"] == "result", res.stderr[-3000:]
    return events


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """What a user's clone holds: the repository's files (committed or not, less what git ignores)."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    dest = tmp_path_factory.mktemp("clone") / "cc-tasks"
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if name.startswith("tools/claude-cli/node_modules") or not src.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    return dest


def install_plugin(real_claude: str, checkout: Path) -> None:
    added = claude(real_claude, "plugin", "marketplace", "add", str(checkout))
    assert added.returncode == 0, added.stdout + added.stderr
    installed = claude(real_claude, "plugin", "install", "cc-tasks@cc-tasks")
    assert installed.returncode == 0, installed.stdout + installed.stderr


@pytest.fixture
def plugin(cc_env, real_claude, checkout, monkeypatch) -> Path:
    """The plugin installed from the local marketplace in the scratch HOME. Its launcher serves with this
    interpreter (CC_TASKS_PLUGIN_PYTHON) instead of making an environment; test_first_use makes one."""
    monkeypatch.setenv("CC_TASKS_PLUGIN_PYTHON", sys.executable)
    install_plugin(real_claude, checkout)
    return checkout


def test_repository_validates_as_plugin_and_marketplace(real_claude, cc_env, checkout):
    res = claude(real_claude, "plugin", "validate", "--json", str(checkout))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["success"] is True
    assert report["manifest"]["type"] == "marketplace" and not report["manifest"]["errors"]
    assert not report["manifest"]["warnings"], report["manifest"]["warnings"]
    for part in report["contents"]:
        assert not part["errors"], part
        assert all(KNOWN_WARNING in w["message"] for w in part["warnings"]), part["warnings"]
    provides = report["provides"]
    assert provides["mcpServers"] == [
        {"name": "cc-tasks", "type": "stdio", "target": "${CLAUDE_PLUGIN_ROOT}/bin/cc-tasks-mcp", "args": []}
    ]
    assert provides["skills"] == ["cc-tasks:parallel-subagents"]
    assert sorted(provides["commands"]) == ["cc-tasks:cleanup", "cc-tasks:status"]
    # the plugin's version is the package's
    manifest = json.loads((checkout / ".claude-plugin" / "plugin.json").read_text())
    project_version = re.search(r'^version = "(.+)"$', (checkout / "pyproject.toml").read_text(), re.M).group(1)
    assert manifest["name"] == "cc-tasks" and manifest["version"] == project_version == __version__


def test_installed_plugin_connects_and_lists_its_parts(plugin, real_claude, workdir):
    listed = json.loads(claude(real_claude, "plugin", "list", "--json").stdout)
    (entry,) = [p for p in listed if p["id"] == "cc-tasks@cc-tasks"]
    assert entry["enabled"] and entry["version"] == __version__
    details = claude(real_claude, "plugin", "details", "cc-tasks@cc-tasks")
    assert details.returncode == 0 and re.search(r"Skills \(3\)\s+cleanup, parallel-subagents, status", details.stdout)
    assert re.search(r"MCP servers \(1\)\s+cc-tasks", details.stdout), details.stdout
    mcp = claude(real_claude, "mcp", "list", cwd=workdir)
    assert mcp.returncode == 0 and CONNECTED.search(mcp.stdout), mcp.stdout + mcp.stderr


def test_a_session_finds_the_skill_and_loads_it(plugin, real_claude, workdir, mock_api):
    seen = len(mock_api.state.requests)
    steps = [{"tool": "Skill", "input": {"skill": "cc-tasks:parallel-subagents"}}, {"text": "skill loaded"}]
    events = session(real_claude, "how do I fan out? @@mock " + json.dumps({"steps": steps}), workdir)
    init = events[0]
    assert init["type"] == "system" and init["subtype"] == "init"
    assert {"name": "plugin:cc-tasks:cc-tasks", "status": "connected", "source": "plugin"} in init["mcp_servers"]
    assert "cc-tasks:parallel-subagents" in init["skills"]
    assert {"cc-tasks:status", "cc-tasks:cleanup"} <= set(init["slash_commands"])
    assert {PREFIX + t for t in TOOLS} <= set(init["tools"])
    assert {"name": "cc-tasks", "path": str(plugin), "source": "cc-tasks@cc-tasks", "version": __version__} in init[
        "plugins"
    ]
    # the model is told the skill exists and when to use it ...
    first = json.dumps(mock_api.state.requests[seen])
    assert "cc-tasks:parallel-subagents" in first and "fan out, parallelise, delegate" in first
    # ... and invoking it puts the SKILL.md body into the conversation
    texts = [
        b["text"]
        for e in events
        if e["type"] == "user" and isinstance(e["message"]["content"], list)
        for b in e["message"]["content"]
        if b.get("type") == "text"
    ]
    body = (plugin / "skills" / "parallel-subagents" / "SKILL.md").read_text().split("---", 2)[2].strip()
    assert any(f"skills/parallel-subagents\n\n{body[:200]}" in t for t in texts), texts
    assert events[-1]["result"] == "skill loaded" and not events[-1]["is_error"]


async def test_slash_commands_list_and_clean_up_tasks_through_the_plugin_server(
    plugin, fake_manager, real_claude, workdir
):
    done = await run(fake_manager, TaskOptions(prompt=fake({"result": "hi"}), name="greet", cwd=str(workdir)))
    tid = done.task_id
    # the commands' allowed-tools let them call the plugin's tools in a -p session (nothing else is allowed)
    listing = [{"tool": PREFIX + "list_active_tasks", "input": {"include_finished": True}}, {"text": "{last_result}"}]
    events = session(real_claude, "/cc-tasks:status @@mock " + json.dumps({"steps": listing}), workdir)
    result = events[-1]
    assert not result["permission_denials"] and not result["is_error"], result
    tasks = json.loads(result["result"])["tasks"]
    assert [(t["task_id"], t["name"], t["status"]) for t in tasks] == [(tid, "greet", "completed")]
    cleanup = [{"tool": PREFIX + "cleanup_task", "input": {"task_id": tid}}, {"text": "{last_result}"}]
    events = session(real_claude, f"/cc-tasks:cleanup {tid} @@mock " + json.dumps({"steps": cleanup}), workdir)
    result = events[-1]
    assert not result["permission_denials"] and json.loads(result["result"])["deleted"] is True, result
    assert list(TaskStore(os.environ["CC_TASKS_DIR"]).all_ids()) == []
    # without the command, the same call is not allowed
    events = session(real_claude, "list them @@mock " + json.dumps({"steps": listing}), workdir)
    assert [d["tool_name"] for d in events[-1]["permission_denials"]] == [PREFIX + "list_active_tasks"]


@pytest.mark.timeout(600)
def test_first_use_makes_the_environment_once(cc_env, real_claude, checkout, workdir, monkeypatch):
    """The real path on a fresh machine: no CC_TASKS_PLUGIN_PYTHON, so the launcher makes a virtual
    environment in CLAUDE_PLUGIN_DATA (pip install of this package and its dependencies). A start that is
    stopped while it installs (as Claude Code does past its start-up timeout) leaves the install running;
    two Claude Code processes starting the server meanwhile wait for it instead of installing again."""
    monkeypatch.delenv("CC_TASKS_PLUGIN_PYTHON", raising=False)
    monkeypatch.setenv("MCP_TIMEOUT", "300000")  # this machine's install time is not what is tested here
    install_plugin(real_claude, checkout)
    data = Path(cc_env["HOME"]) / DATA
    log = data / "install.log"
    first = subprocess.Popen(
        [str(checkout / "bin" / "cc-tasks-mcp")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env={**os.environ, "CLAUDE_PLUGIN_ROOT": str(checkout), "CLAUDE_PLUGIN_DATA": str(data)},
    )
    wait_until(lambda: log.exists() and "installing" in log.read_text(), timeout=120)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGTERM and out == b"", err
    assert b"first start of" in err and b"install.log" in err
    ready = list(data.glob("venv-*/.cc-tasks-ready"))
    assert ready == [], "stopped before the install could finish: nothing to test"
    lists = [
        subprocess.Popen(
            [real_claude, "mcp", "list"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir
        )
        for _ in range(2)
    ]
    for p in lists:
        out, _ = p.communicate(timeout=500)
        assert p.returncode == 0 and CONNECTED.search(out), out + log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("ready in") == 1, text[-3000:]
    assert text.count("is ready (built by another start)") == 2, text[-3000:]
    (venv,) = [p.parent for p in data.glob("venv-*/.cc-tasks-ready")]
    assert venv.name.startswith(f"venv-{__version__}-") and (venv / ".cc-tasks-used").exists()
    assert not (checkout / "build").exists() and not list(checkout.glob("*.egg-info"))  # the plugin folder is read only


def test_launcher_says_when_no_python_fits(checkout, tmp_path):
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for name in ("python3", "python3.13", "python3.12", "python3.11", "python3.10"):
        (fakebin / name).write_text("#!/bin/sh\nexit 1\n")  # an interpreter older than 3.10 fails the check
        (fakebin / name).chmod(0o755)
    res = subprocess.run(
        [str(checkout / "bin" / "cc-tasks-mcp")],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": f"{fakebin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CC_TASKS_PLUGIN_HOME": str(tmp_path / "home"),
        },
    )
    assert res.returncode == 1 and res.stdout == ""
    assert "no Python 3.10 or later found" in res.stderr and "CC_TASKS_PYTHON" in res.stderr
