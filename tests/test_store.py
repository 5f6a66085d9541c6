"""The store: private directory checks, strict task ids, atomic records, serialised updates."""

import os
import threading

import pytest

from cc_tasks.errors import InvalidTaskIdError, TaskNotFoundError, UnsafeStoreError
from cc_tasks.models import TaskOptions, TaskRecord, TaskRequest, TaskStatus
from cc_tasks.store import TaskStore, new_task_id, validate_task_id

HOSTILE_IDS = [
    "../x",
    "/etc/passwd",
    "a\x00b",
    "",
    "..",
    ".",
    "20260101-000000-000-1a2b3c4d/../../x",
    "20260101-000000-000-1A2B3C4D",
    "x" * 5000,
    "20260101-000000-000-1a2b3c4d\n",
]


def test_store_is_created_private(tmp_path):
    s = TaskStore(tmp_path / "a" / "store")
    assert (os.stat(s.root).st_mode & 0o777) == 0o700


def test_store_refuses_symlink_and_open_permissions(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeStoreError, match="symlink"):
        TaskStore(tmp_path / "link")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafeStoreError, match="chmod 700"):
        TaskStore(loose)


def test_store_refuses_other_owner(tmp_path):
    d = tmp_path / "other"
    d.mkdir(mode=0o700)
    if os.getuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    os.chown(d, 12345, 12345)
    with pytest.raises(UnsafeStoreError, match="belongs to uid 12345"):
        TaskStore(d)


def test_task_ids_are_time_sortable_and_strict():
    ids = [new_task_id() for _ in range(50)]
    assert len(set(ids)) == 50
    for i in ids:
        assert validate_task_id(i) == i
    for bad in HOSTILE_IDS:
        with pytest.raises(InvalidTaskIdError, match="invalid task id"):
            validate_task_id(bad)


def test_hostile_ids_touch_no_file(tmp_path):
    s = TaskStore(tmp_path / "store")
    before = sorted(p for p in tmp_path.rglob("*"))
    for bad in HOSTILE_IDS:
        for call in (s.read, s.delete, lambda t: s.update(t, lambda r: r), lambda t: s.append_event(t, "x")):
            with pytest.raises(InvalidTaskIdError):
                call(bad)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def _record(s: TaskStore) -> TaskRecord:
    r = TaskRecord(task_id=new_task_id(), cwd="/", timeout_seconds=10)
    s.submit(r, TaskRequest(options=TaskOptions(prompt="hi"), cwd="/", claude_bin="/bin/true"))
    return r


def test_create_read_update_delete(tmp_path):
    s = TaskStore(tmp_path / "store")
    r = _record(s)
    assert s.load(r.task_id) == r
    assert s.request(r.task_id).options.prompt == "hi"
    assert s.active_ids() == [r.task_id]
    r2 = s.transition(r.task_id, TaskStatus.RUNNING)
    assert r2.status == TaskStatus.RUNNING
    # a transition the lifecycle forbids leaves the record alone
    assert s.transition(r.task_id, TaskStatus.WAITING).status == TaskStatus.RUNNING
    r3 = s.transition(r.task_id, TaskStatus.COMPLETED)
    assert r3.finished_at is not None and s.active_ids() == []
    events = (s.task_dir(r.task_id) / "events.jsonl").read_text().splitlines()
    assert [e for e in events if '"status"' in e][-1].count("completed") == 1
    s.delete(r.task_id)
    with pytest.raises(TaskNotFoundError):
        s.read(r.task_id)
    assert list(s.all_ids()) == []
    assert not any(p.name.startswith(".") for p in s.tasks_dir.iterdir())


def test_updates_from_many_threads_are_serialised(tmp_path):
    s = TaskStore(tmp_path / "store")
    r = _record(s)

    def bump():
        for _ in range(25):
            s.update(
                r.task_id,
                lambda rec: rec.model_copy(
                    update={"progress": rec.progress.model_copy(update={"turns": rec.progress.turns + 1})}
                ),
            )

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert s.read(r.task_id).progress.turns == 100
    assert not [p for p in s.task_dir(r.task_id).iterdir() if p.name.endswith(".tmp")]


def test_a_torn_record_is_a_clear_error_and_claims_pass_it_by(tmp_path):
    from cc_tasks.errors import CorruptRecordError

    from .backends import worker_info

    s = TaskStore(tmp_path / "store")
    torn, fine = _record(s), _record(s)
    (s.task_dir(torn.task_id) / "record.json").write_bytes(b'{"task_id": "')
    with pytest.raises(CorruptRecordError, match=f"task {torn.task_id}: its record .*record.json is unreadable"):
        s.read(torn.task_id)
    w = worker_info()
    s.register(w)
    assert [r.task_id for r in s.claim(w, 4)] == [fine.task_id]
    s.delete(torn.task_id)
    assert s.active_ids() == [fine.task_id]


def test_a_lost_run_whose_transcript_shows_a_tool_call_is_not_run_again(tmp_path):
    """The record's progress lags claude's transcript by up to a flush: the transcript decides."""
    from .backends import expire, worker_info

    s = TaskStore(tmp_path / "store", lease_seconds=5)
    r = TaskRecord(task_id=new_task_id(), cwd="/", timeout_seconds=10, max_attempts=3)
    s.submit(r, TaskRequest(options=TaskOptions(prompt="hi"), cwd="/", claude_bin="/bin/true"))
    (s.task_dir(r.task_id) / "stdout.jsonl").write_text('{"type": "system", "subtype": "init"}\n')
    w = worker_info()
    s.register(w)
    (claimed,) = s.claim(w, 1)
    assert claimed.lease.transcript_offset > 0  # an earlier run's lines do not count
    with open(s.task_dir(r.task_id) / "stdout.jsonl", "a") as f:
        f.write('{"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "Bash"}]}}\n')
    assert s.load(r.task_id).progress.tool_calls == 0
    expire(s, w)
    lost = s.read(r.task_id)
    assert lost.status == TaskStatus.FAILED and "used tools or ended" in lost.error and lost.lease is None
    events = (s.task_dir(r.task_id) / "events.jsonl").read_text()
    assert "requeued" not in events
