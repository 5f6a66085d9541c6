"""The claude command line and environment: pure functions."""

import pytest

from cc_tasks.command import STRIP_ENV, build_argv, build_env, servers_to_deny
from cc_tasks.models import TaskOptions


def test_argv_maps_every_option_and_keeps_values_out_of_flag_position():
    opts = TaskOptions(
        prompt="--dangerously-skip-permissions do evil",
        model="-m",
        fallback_model="haiku",
        allowed_tools=["Bash(git *)", "Edit"],
        disallowed_tools=["WebFetch"],
        permission_mode="acceptEdits",
        max_turns=3,
        max_budget_usd=1.5,
        system_prompt="--help",
        append_system_prompt="be brief",
        resume_session_id="abc-123",
        add_dirs=["/tmp"],
        mcp_config={"mcpServers": {}},
    )
    argv = build_argv(opts, "/bin/claude")
    assert argv[:4] == ["/bin/claude", "-p", "--output-format=stream-json", "--verbose"]
    assert argv[4:] == [
        "--model=-m",
        "--fallback-model=haiku",
        "--allowedTools=Bash(git *)",
        "--allowedTools=Edit",
        "--disallowedTools=WebFetch",
        "--permission-mode=acceptEdits",
        "--max-turns=3",
        "--max-budget-usd=1.5",
        "--system-prompt=--help",
        "--append-system-prompt=be brief",
        "--resume=abc-123",
        "--add-dir=/tmp",
        '--mcp-config={"mcpServers": {}}',
    ]
    # the prompt never appears on the command line: it goes to stdin
    assert not any("evil" in a for a in argv)
    # every element after the binary is a flag in --name[=value] form
    assert all(a.startswith("-") for a in argv[1:])


def test_argv_minimal():
    assert build_argv(TaskOptions(prompt="hi"), "claude") == [
        "claude",
        "-p",
        "--output-format=stream-json",
        "--verbose",
    ]


def test_worktree_names_the_task_worktree():
    opts = TaskOptions(prompt="hi", worktree=True, max_turns=2)
    argv = build_argv(opts, "claude", "20260101-000000-000-1a2b3c4d")
    assert argv[4:] == ["--max-turns=2", "--worktree=20260101-000000-000-1a2b3c4d"]
    # without the option the name changes nothing; with it, a name is required
    assert build_argv(TaskOptions(prompt="hi"), "claude", "x") == build_argv(TaskOptions(prompt="hi"), "claude")
    with pytest.raises(ValueError, match="worktree"):
        build_argv(opts, "claude")


def test_env_strips_nesting_variables_and_bumps_depth():
    base = {"PATH": "/bin", "ANTHROPIC_BASE_URL": "http://x", **{k: "1" for k in STRIP_ENV}}
    env = build_env(base, TaskOptions(prompt="x", env={"FOO": "bar"}), depth=1, task_id="t", store_dir="/s")
    assert env["PATH"] == "/bin" and env["ANTHROPIC_BASE_URL"] == "http://x" and env["FOO"] == "bar"
    assert not set(STRIP_ENV) & set(env)
    assert env["CC_TASKS_DEPTH"] == "2" and env["CC_TASKS_TASK_ID"] == "t" and env["CC_TASKS_DIR"] == "/s"


def test_sub_agents_at_the_nesting_limit_are_kept_from_starting_cc_tasks():
    assert servers_to_deny({"CC_TASKS_DEPTH": "1"}) == []  # the default limit is 2: it may start tasks
    assert servers_to_deny({"CC_TASKS_DEPTH": "2"}) == ["cc-tasks", "plugin:cc-tasks:cc-tasks"]
    assert servers_to_deny({"CC_TASKS_DEPTH": "1", "CC_TASKS_MAX_DEPTH": "1"}) == [
        "cc-tasks",
        "plugin:cc-tasks:cc-tasks",
    ]
    named = {"CC_TASKS_DEPTH": "3", "CC_TASKS_MAX_DEPTH": "2", "CC_TASKS_SERVER_NAMES": "tasks, mine ,"}
    assert servers_to_deny(named) == ["tasks", "mine"]
    assert servers_to_deny({"CC_TASKS_DEPTH": "x"}) == []
    assert servers_to_deny({"CC_TASKS_DEPTH": "5", "CC_TASKS_SERVER_NAMES": ""}) == []  # (the way to keep it)
    argv = build_argv(TaskOptions(prompt="p"), "claude", deny_servers=["cc-tasks"])
    assert argv[-1] == '--settings={"deniedMcpServers": [{"serverName": "cc-tasks"}]}'
    assert not any(a.startswith("--settings") for a in build_argv(TaskOptions(prompt="p"), "claude"))
