"""The claude command line and environment for a task: pure functions, asserted on by tests.

No shell is involved. Every option value is passed in the ``--flag=value`` form, so a value that
starts with ``-`` can never be read as another flag; the prompt goes to claude's standard input,
so it is never read as a flag either and is not bounded by the argv size limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .config import DEFAULT_MAX_DEPTH
from .models import TaskOptions

#: Variables that make a nested claude believe it runs inside its parent's session.
STRIP_ENV = (
    "CLAUDECODE",
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_CODE_SSE_PORT",
    "CLAUDE_CODE_IDE_HOST_OVERRIDE",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_CODE_SESSION_ID",
    "CC_TASKS_TOKEN",  # the HTTP server's bearer token is not the sub-agents' business
)


#: The names cc-tasks is registered under with Claude Code (``claude mcp add ... cc-tasks``, the plugin's).
DEFAULT_SERVER_NAMES = ("cc-tasks", "plugin:cc-tasks:cc-tasks")


def servers_to_deny(env: Mapping[str, str]) -> list[str]:
    """The MCP servers a sub-agent with this environment is kept from starting: cc-tasks itself, when the
    sub-agent may not start tasks (CC_TASKS_DEPTH has reached CC_TASKS_MAX_DEPTH), since starting it would
    only cost the sub-agent time and memory before its first turn (it loses the task board and notes too).
    ``CC_TASKS_SERVER_NAMES`` (comma-separated) names it when it is registered under other names; set empty,
    nothing is denied."""
    try:
        depth = int(env.get("CC_TASKS_DEPTH") or 0)
        max_depth = int(env.get("CC_TASKS_MAX_DEPTH") or DEFAULT_MAX_DEPTH)
    except ValueError:
        return []
    if depth < max_depth:
        return []
    names = env.get("CC_TASKS_SERVER_NAMES")
    return list(DEFAULT_SERVER_NAMES) if names is None else [n.strip() for n in names.split(",") if n.strip()]


#: How claude names the approval server's tool (``--permission-prompt-tool``).
APPROVAL_TOOL = "mcp__cc-tasks-approvals__approve"


def asks_approval(opts: TaskOptions) -> bool:
    """Whether a sub-agent's permission requests go to cc-tasks (option ``approvals`` 'ask', and a permission mode
    that can ask at all): only then is the approval server added (every MCP server delays the first turn)."""
    return opts.approvals == "ask" and opts.permission_mode != "bypassPermissions"


def build_argv(
    opts: TaskOptions,
    claude_bin: str,
    worktree: str | None = None,
    *,
    deny_servers: Sequence[str] = (),
    approval_server: dict | None = None,
) -> list[str]:
    """claude's argv for ``opts``. ``worktree`` is the name of the task's worktree (its own id, or for a
    continuation the id of the task that made it): with the option ``worktree``, claude makes it (or enters
    it when it exists) and runs the session inside it. ``deny_servers``: MCP servers (by name) the session
    must not start, through claude's ``deniedMcpServers`` setting (see ``servers_to_deny``). ``approval_server``:
    the ``--mcp-config`` of the approval server (desk.py), given beside the task's own, and claude's permission
    prompt tool set to it."""
    argv = [claude_bin, "-p", "--output-format=stream-json", "--verbose"]

    def flag(name: str, value: object | None) -> None:
        if value is not None:
            argv.append(f"--{name}={value}")

    flag("model", opts.model)
    flag("fallback-model", opts.fallback_model)
    for tool in opts.allowed_tools or []:
        flag("allowedTools", tool)
    for tool in opts.disallowed_tools or []:
        flag("disallowedTools", tool)
    flag("permission-mode", opts.permission_mode)
    flag("max-turns", opts.max_turns)
    flag("max-budget-usd", opts.max_budget_usd)
    flag("system-prompt", opts.system_prompt)
    flag("append-system-prompt", opts.append_system_prompt)
    flag("resume", opts.resume_session_id)
    for d in opts.add_dirs or []:
        flag("add-dir", d)
    if opts.mcp_config is not None:
        cfg = opts.mcp_config if isinstance(opts.mcp_config, str) else json.dumps(opts.mcp_config)
        flag("mcp-config", cfg)
    if approval_server is not None:
        flag("mcp-config", json.dumps(approval_server))
        flag("permission-prompt-tool", APPROVAL_TOOL)
    if opts.worktree:
        if not worktree:
            raise ValueError("a task with the option worktree needs its worktree's name")
        flag("worktree", worktree)
    if deny_servers:
        flag("settings", json.dumps({"deniedMcpServers": [{"serverName": n} for n in deny_servers]}))
    return argv


def build_env(
    base: Mapping[str, str], opts: TaskOptions, *, depth: int, task_id: str, store_dir: str
) -> dict[str, str]:
    """The server's environment, less what confuses a nested claude, plus the task's own variables."""
    env = {k: v for k, v in base.items() if k not in STRIP_ENV}
    env.update(opts.env or {})
    env["CC_TASKS_DEPTH"] = str(depth + 1)
    env["CC_TASKS_TASK_ID"] = task_id
    env["CC_TASKS_DIR"] = store_dir
    return env
