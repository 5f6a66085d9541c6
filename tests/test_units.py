"""Pure parts: the status lifecycle, options validation, argv/env building, stream-json parsing."""

import pytest
from pydantic import ValidationError

from cc_tasks.command import STRIP_ENV, build_argv, build_env
from cc_tasks.errors import InvalidTransitionError
from cc_tasks.models import TRANSITIONS, Progress, TaskOptions, TaskRecord, TaskStatus, check_transition
from cc_tasks.stream import apply_event, outcome, split_lines


def test_lifecycle_is_written_in_one_place():
    assert TRANSITIONS[TaskStatus.WAITING] == {
        TaskStatus.QUEUED,
        TaskStatus.SKIPPED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
    assert TRANSITIONS[TaskStatus.QUEUED] == {TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED}
    assert TRANSITIONS[TaskStatus.RUNNING] == {
        TaskStatus.QUEUED,  # its worker was lost before the attempt used a tool: a new attempt
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.TIMEOUT,
        TaskStatus.CANCELLED,
    }
    terminal = {s for s in TaskStatus if s.terminal}
    assert terminal == {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.TIMEOUT,
        TaskStatus.CANCELLED,
        TaskStatus.SKIPPED,
    }
    check_transition(TaskStatus.QUEUED, TaskStatus.RUNNING)
    with pytest.raises(InvalidTransitionError, match="completed to running"):
        check_transition(TaskStatus.COMPLETED, TaskStatus.RUNNING)
    with pytest.raises(InvalidTransitionError):
        check_transition(TaskStatus.QUEUED, TaskStatus.COMPLETED)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "a\x00b"}, "NUL"),
        ({"prompt": "x", "env": {"A B": "1"}}, "not a valid variable name"),
        ({"prompt": "x", "env": {"CC_TASKS_DEPTH": "0"}}, "bounds sub-agent nesting"),
        ({"prompt": "x", "resume_session_id": "--evil"}, "session id"),
        ({"prompt": "x", "mcp_config": "{not json"}, "not valid JSON"),
        ({"prompt": "x", "max_turns": 0}, "greater than or equal"),
        ({"prompt": "x", "permission_mode": "yolo"}, "permission_mode"),
        ({"prompt": "x", "allowed_tools": [""]}, "empty entry"),
        ({"prompt": "x", "unknown": 1}, "Extra inputs"),
    ],
)
def test_options_reject_bad_values(bad, match):
    with pytest.raises(ValidationError, match=match):
        TaskOptions(**bad)


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


def test_env_strips_nesting_variables_and_bumps_depth():
    base = {"PATH": "/bin", "ANTHROPIC_BASE_URL": "http://x", **{k: "1" for k in STRIP_ENV}}
    env = build_env(base, TaskOptions(prompt="x", env={"FOO": "bar"}), depth=1, task_id="t", store_dir="/s")
    assert env["PATH"] == "/bin" and env["ANTHROPIC_BASE_URL"] == "http://x" and env["FOO"] == "bar"
    assert not set(STRIP_ENV) & set(env)
    assert env["CC_TASKS_DEPTH"] == "2" and env["CC_TASKS_TASK_ID"] == "t" and env["CC_TASKS_DIR"] == "/s"


def test_split_lines_keeps_partial_and_skips_junk():
    buf = b'{"type":"a"}\nnot json\n\n[1,2]\n{"type":"b"}\n{"type":"par'
    events, rest = split_lines(buf)
    assert events == [{"type": "a"}, {"type": "b"}]
    assert rest == b'{"type":"par'


def test_apply_event_tracks_turns_tools_text_and_cost():
    p = Progress()
    notes = apply_event(
        p,
        {
            "type": "assistant",
            "parent_tool_use_id": None,
            "message": {
                "content": [{"type": "text", "text": "looking"}, {"type": "tool_use", "name": "Bash", "input": {}}]
            },
        },
    )
    assert (p.turns, p.tool_calls, p.last_tool, p.last_text) == (1, 1, "Bash", "looking")
    assert [n["kind"] for n in notes] == ["assistant_text", "tool_use"]
    # a sub-agent's message (parent_tool_use_id set) is not a turn of this task
    apply_event(p, {"type": "assistant", "parent_tool_use_id": "x", "message": {"content": []}})
    assert p.turns == 1
    apply_event(p, {"type": "result", "total_cost_usd": 0.25})
    assert p.cost_usd == 0.25
    apply_event(
        p,
        {
            "type": "assistant",
            "parent_tool_use_id": None,
            "message": {"content": [{"type": "text", "text": "y" * 5000}]},
        },
    )
    assert len(p.last_text) == 500


def test_outcome_judges_by_is_error_and_exit_code():
    ok = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "result": "fine",
        "session_id": "s",
        "total_cost_usd": 0.1,
        "num_turns": 2,
        "duration_ms": 10,
        "usage": {"input_tokens": 1},
    }
    o = outcome(ok, 0)
    assert o.status == TaskStatus.COMPLETED and o.result == "fine" and o.error is None and o.num_turns == 2
    api_err = {**ok, "is_error": True, "result": "API Error: 529 overloaded", "api_error_status": 529}
    o = outcome(api_err, 1)
    assert o.status == TaskStatus.FAILED and "529 overloaded" in o.error and o.api_error_status == 529
    assert outcome(ok, 3).status == TaskStatus.FAILED  # a non-zero exit is a failure even without is_error
    o = outcome(None, 137, "Killed\n")
    assert o.status == TaskStatus.FAILED and "code 137 without a result" in o.error and "Killed" in o.error


def test_bounded_record_truncates_only_the_copy():
    r = TaskRecord(task_id="t", cwd="/", timeout_seconds=1, result="x" * 100, result_chars=100)
    b = r.bounded(10)
    assert b.result == "x" * 10 and b.result_truncated and b.result_chars == 100
    assert r.result == "x" * 100 and not r.result_truncated
