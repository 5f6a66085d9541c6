"""Models: task options validation and bounded records."""

import pytest
from pydantic import ValidationError

from cc_tasks.models import TaskOptions, TaskRecord


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


def test_bounded_record_truncates_only_the_copy():
    r = TaskRecord(task_id="t", cwd="/", timeout_seconds=1, result="x" * 100, result_chars=100)
    b = r.bounded(10)
    assert b.result == "x" * 10 and b.result_truncated and b.result_chars == 100
    assert r.result == "x" * 100 and not r.result_truncated


def test_labels_are_checked_and_kept_sorted_once():
    assert TaskOptions(prompt="x", labels=["b", "a", "b"]).labels == ["a", "b"]
    for bad in (["has space"], [""], ["x" * 65], ["-lead"]):
        with pytest.raises(ValidationError, match="label"):
            TaskOptions(prompt="x", labels=bad)


def test_every_model_builds_and_has_a_schema():
    """Models are built on first use (defer_build): a broken definition shows here, not in some later call."""
    from cc_tasks import models

    found = [
        m
        for m in vars(models).values()
        if isinstance(m, type) and issubclass(m, models.BaseModel) and m is not models.BaseModel
    ]
    assert len(found) > 30
    for m in found:
        m.model_rebuild(force=True)
        assert m.model_json_schema()["type"] == "object"
