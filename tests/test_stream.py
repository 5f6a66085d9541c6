"""Parsing claude's stream-json output: pure functions."""

from cc_tasks.models import Progress, TaskStatus
from cc_tasks.stream import apply_event, outcome, split_lines


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
