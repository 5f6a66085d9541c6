"""The manager and supervisor with the fake claude: fast, and covering cases the real CLI cannot produce."""

import json
import os
import signal
import time

import psutil
import pytest

from cc_tasks.config import Settings
from cc_tasks.errors import (
    ClaudeNotFoundError,
    DepthLimitError,
    InvalidOptionsError,
    InvalidTaskIdError,
    TaskNotFoundError,
)
from cc_tasks.manager import TaskManager
from cc_tasks.models import BatchItem, TaskOptions, TaskStatus

from .conftest import pid_alive, zombies_of_this_process


def fake(cfg: dict | None = None, text: str = "do the thing") -> str:
    return f"{text}\nFAKE {json.dumps(cfg or {})}\n"


def wait_until(pred, timeout=30.0):
    """Poll a condition that has no event to await (another process's state), bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


async def run(m: TaskManager, opts: TaskOptions, timeout=60):
    r = m.start(opts)
    res = await m.wait([r.task_id], timeout=timeout)
    assert res.done
    return res.tasks[0]


async def test_completes_with_result_prompt_on_stdin_and_env(fake_manager, workdir, monkeypatch):
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    monkeypatch.setenv("CC_TASKS_TOKEN", "server-secret")
    prompt = "-p --help\n" + fake(
        {
            "argv": True,
            "env_keys": [
                "CC_TASKS_DEPTH",
                "CLAUDECODE",
                "CLAUDE_CODE_ENTRYPOINT",
                "MY_VAR",
                "CC_TASKS_DIR",
                "CC_TASKS_TOKEN",
            ],
            "result": "all good",
        }
    )
    r = await run(
        fake_manager, TaskOptions(prompt=prompt, cwd=str(workdir), env={"MY_VAR": "v"}, name="n1", metadata={"k": 1})
    )
    assert r.status == TaskStatus.COMPLETED and r.exit_code == 0 and r.result == "all good"
    assert r.name == "n1" and r.metadata == {"k": 1} and r.num_turns == 2 and r.total_cost_usd == 0.001
    assert r.session_id and r.started_at and r.finished_at and r.cwd == str(workdir)
    seen = json.loads((workdir / "argv.json").read_text())
    assert seen["prompt"] == prompt  # the prompt arrives on stdin, untouched, though it starts with -p
    assert seen["argv"][1:] == ["-p", "--output-format=stream-json", "--verbose"]
    assert seen["env"] == {
        "CC_TASKS_DEPTH": "1",
        "CLAUDECODE": None,
        "CLAUDE_CODE_ENTRYPOINT": None,
        "MY_VAR": "v",
        "CC_TASKS_DIR": str(fake_manager.store.root),
        "CC_TASKS_TOKEN": None,
    }
    assert "server-secret" not in fake_manager.store.path(r.task_id, "request.json").read_text()
    events = [
        json.loads(line)["kind"] for line in fake_manager.store.path(r.task_id, "events.jsonl").read_text().splitlines()
    ]
    assert events[0] == "status" and "tool_use" in events and "result" in events and events[-1] == "status"


@pytest.mark.parametrize(
    "cfg, error",
    [
        ({"no_result": True, "exit": 3}, "exited with code 3 without a result event"),
        ({"is_error": True, "exit": 1, "result": "API Error: 500 boom"}, "API Error: 500 boom"),
        ({"exit": 2, "result": "half done"}, "exit code 2"),
    ],
)
async def test_failures_carry_a_reason(fake_manager, workdir, cfg, error):
    r = await run(fake_manager, TaskOptions(prompt=fake(cfg), cwd=str(workdir)))
    assert r.status == TaskStatus.FAILED and error in r.error
    assert r.exit_code == cfg["exit"]


async def test_cancel_stops_a_stubborn_tree_and_leaves_no_zombie(fake_manager, workdir):
    r = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "ignore_signals": True, "grandchild": True}), cwd=str(workdir))
    )
    # (claude's pid reaches the record with the first progress flush, within FLUSH_EVERY)
    rec = wait_until(lambda: (workdir / "grandchild.pid").exists() and (x := fake_manager.get(r.task_id)).claude and x)
    grandchild = int((workdir / "grandchild.pid").read_text())
    assert psutil.Process(grandchild).ppid() == rec.claude.pid
    t0 = time.monotonic()
    done = fake_manager.cancel(r.task_id)
    assert done.status == TaskStatus.CANCELLED and "cancelled" in done.error and done.cancel_requested
    assert time.monotonic() - t0 < 15  # SIGINT, SIGTERM ignored: SIGKILL after the bounded grace periods
    for pid in (rec.claude.pid, grandchild):
        assert not pid_alive(pid)
    assert pid_alive(rec.lease.pid)  # the worker goes on serving the store
    wait_until(lambda: not zombies_of_this_process())
    # cancelling again is harmless
    assert fake_manager.cancel(r.task_id).status == TaskStatus.CANCELLED


async def test_timeout_stops_the_tree(fake_manager, workdir):
    r = await run(
        fake_manager,
        TaskOptions(prompt=fake({"sleep": 300, "grandchild": True}), cwd=str(workdir), timeout_seconds=1.5),
    )
    assert r.status == TaskStatus.TIMEOUT and "timed out after 1.5s" in r.error
    grandchild = int((workdir / "grandchild.pid").read_text())
    assert not pid_alive(grandchild) and not pid_alive(r.claude.pid)
    wait_until(lambda: not zombies_of_this_process())


async def test_leftover_background_processes_are_stopped_when_claude_exits(fake_manager, workdir):
    r = await run(fake_manager, TaskOptions(prompt=fake({"grandchild": True}), cwd=str(workdir)))
    assert r.status == TaskStatus.COMPLETED
    assert not pid_alive(int((workdir / "grandchild.pid").read_text()))


async def test_a_killed_worker_fails_a_task_that_used_a_tool_and_stops_claude(fake_manager, workdir):
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).progress.tool_calls and x.claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)  # a dead pid on this host: the lease ends at once
    assert after.status == TaskStatus.FAILED and "worker lost" in after.error and "used tools" in after.error
    assert not pid_alive(rec.claude.pid)
    assert after.attempts[-1].reason.startswith("worker lost")


async def test_a_killed_worker_requeues_a_task_that_used_no_tool(fake_manager, workdir, tmp_path):
    track = tmp_path / "track"
    track.mkdir()
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300, "no_tools": True}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)
    assert after.status == TaskStatus.QUEUED and after.lease is None and after.epoch == 1
    assert after.attempts[0].retried and "worker lost" in after.attempts[0].reason
    assert not pid_alive(rec.claude.pid)
    events = fake_manager.events(r.task_id).events
    assert "requeued" in [e["kind"] for e in events]
    fake_manager.cancel(r.task_id)  # (or a new worker would run it again, as attempt 2)
    # with no attempts left, the same loss fails the task
    one = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "no_tools": True}), cwd=str(workdir), max_attempts=1)
    )
    rec = wait_until(lambda: (x := fake_manager.get(one.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(one.task_id)
    assert after.status == TaskStatus.FAILED and "no attempts left" in after.error


async def test_a_requeued_task_runs_again_as_a_new_attempt(fake_manager, workdir, tmp_path):
    go = tmp_path / "go"
    r = fake_manager.start(TaskOptions(prompt=fake({"wait_file": str(go), "no_tools": True}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    assert fake_manager.get(r.task_id).status == TaskStatus.QUEUED
    go.touch()
    fake_manager.nudge()  # a new worker claims it: attempt 2, claim 2
    done = (await fake_manager.wait([r.task_id], timeout=60)).tasks[0]
    assert done.status == TaskStatus.COMPLETED and done.epoch == 2 and len(done.attempts) == 2
    assert done.lease.pid != rec.lease.pid


async def test_leftovers_of_one_task_are_stopped_and_no_other_tasks_processes(fake_manager, tmp_path):
    """The worker supervises both tasks and adopts what their tools leave behind: each task's leftovers
    are told apart by the task id in their environment."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    b = fake_manager.start(TaskOptions(prompt=fake({"grandchild": True, "sleep": 300}), cwd=str(b_dir)))
    wait_until(lambda: (b_dir / "grandchild.pid").exists())
    a = await run(fake_manager, TaskOptions(prompt=fake({"grandchild": True}), cwd=str(a_dir)))
    assert a.status == TaskStatus.COMPLETED and a.lease is not None
    assert not pid_alive(int((a_dir / "grandchild.pid").read_text()))
    b_rec = wait_until(lambda: (x := fake_manager.get(b.task_id)).claude and x)
    b_grandchild = int((b_dir / "grandchild.pid").read_text())
    assert b_rec.status == TaskStatus.RUNNING and pid_alive(b_rec.claude.pid) and pid_alive(b_grandchild)
    assert fake_manager.cancel(b.task_id).status == TaskStatus.CANCELLED
    assert not pid_alive(b_grandchild) and not pid_alive(b_rec.claude.pid)


async def test_output_pages_cover_everything_and_respect_utf8(fake_manager, workdir):
    text = "é☃ok\n" * 30_000  # multi-byte characters, 270 KB
    r = await run(fake_manager, TaskOptions(prompt=fake({"result": text}), cwd=str(workdir)))
    assert r.result_truncated and r.result_chars == len(text) and len(r.bounded().result) <= 16_000
    pages, offset = [], 0
    while True:
        page = fake_manager.output(r.task_id, offset=offset, limit=20_000)
        assert len(page.text.encode()) <= 20_000 and "\ufffd" not in page.text
        pages.append(page.text)
        offset = page.next_offset
        if page.eof:
            break
    assert "".join(pages) == text and page.total_bytes == len(text.encode())
    transcript = fake_manager.output(r.task_id, source="transcript", limit=500)
    assert transcript.text.startswith('{"type": "system"') and not transcript.eof


async def test_wait_any_all_and_timeout(fake_manager, workdir):
    slow = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    quick = fake_manager.start(TaskOptions(prompt=fake(), cwd=str(workdir)))
    res = await fake_manager.wait([slow.task_id, quick.task_id], mode="any", timeout=60)
    assert res.done and res.finished == [quick.task_id] and res.pending == [slow.task_id]
    res = await fake_manager.wait([slow.task_id, quick.task_id], mode="all", timeout=0.3)
    assert not res.done and res.timed_out and res.pending == [slow.task_id]
    with pytest.raises(TaskNotFoundError):
        await fake_manager.wait([slow.task_id, "20200101-000000-000-00000000"])
    with pytest.raises(InvalidTaskIdError):
        await fake_manager.wait(["../etc"])


def test_bad_starts_leave_nothing_behind(fake_manager, workdir, monkeypatch, tmp_path):
    store = fake_manager.store
    with pytest.raises(InvalidOptionsError, match="does not exist"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(tmp_path / "nope")))
    with pytest.raises(InvalidOptionsError, match="add_dirs"):
        fake_manager.start(TaskOptions(prompt="x", cwd=str(workdir), add_dirs=[str(tmp_path / "nope")]))
    missing = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_CLAUDE_BIN": str(tmp_path / "no-claude")}))
    with pytest.raises(ClaudeNotFoundError, match="CC_TASKS_CLAUDE_BIN"):
        missing.start(TaskOptions(prompt="x", cwd=str(workdir)))
    monkeypatch.setenv("PATH", str(tmp_path))
    on_path = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_CLAUDE_BIN": "claude"}))
    with pytest.raises(ClaudeNotFoundError, match="not on PATH"):
        on_path.start(TaskOptions(prompt="x", cwd=str(workdir)))
    deep = TaskManager(Settings.from_env({**os.environ, "CC_TASKS_DEPTH": "2"}))
    with pytest.raises(DepthLimitError, match="CC_TASKS_MAX_DEPTH is 2"):
        deep.start(TaskOptions(prompt="x", cwd=str(workdir)))
    assert list(store.all_ids()) == [] and list(store.tasks_dir.iterdir()) == []


async def test_cleanup_stops_and_deletes(fake_manager, workdir):
    r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)))
    rec = wait_until(lambda: (x := fake_manager.get(r.task_id)).claude and x)
    res = fake_manager.cleanup(r.task_id)
    assert res.deleted and res.was_status == TaskStatus.RUNNING
    assert not pid_alive(rec.claude.pid)
    assert not fake_manager.store.task_dir(r.task_id).exists()
    with pytest.raises(TaskNotFoundError, match="no task"):
        fake_manager.cleanup(r.task_id)
    with pytest.raises(InvalidTaskIdError):
        fake_manager.cleanup("/etc/passwd")


async def test_the_store_worker_answers_on_its_private_socket(fake_manager, workdir):
    from cc_tasks import control

    r = await run(fake_manager, TaskOptions(prompt=fake({"result": "warm"}), cwd=str(workdir)))
    assert r.result == "warm"
    sock = fake_manager.store.socket_path
    assert sock.exists() and (sock.stat().st_mode & 0o077) == 0
    hello = control.request(sock, {"op": "hello"})
    assert hello["identity"] == control.IDENTITY and r.lease.pid == hello["pid"] and r.lease.worker == hello["worker"]
    assert control.request(sock, {"op": "start", "task_id": r.task_id}) == {"error": "unknown op 'start'"}
    assert [w.worker_id for w in fake_manager.store.workers()] == [hello["worker"]]
    assert fake_manager.store.stop_worker()
    wait_until(lambda: not pid_alive(hello["pid"]))
    assert not sock.exists() and fake_manager.store.workers() == []  # it unregistered


async def test_a_stopped_worker_finishes_its_tasks_and_sigterm_cancels_them(fake_manager, tmp_path):
    dirs = [tmp_path / n for n in ("a", "b")]
    for d in dirs:
        d.mkdir()
    a = fake_manager.start(TaskOptions(prompt=fake({"wait_file": str(tmp_path / "go")}), cwd=str(dirs[0])))
    first = wait_until(lambda: (x := fake_manager.get(a.task_id)).status == TaskStatus.RUNNING and x.lease)
    assert fake_manager.store.stop_worker()  # quit: no more work, but it sees its task through
    wait_until(lambda: not fake_manager.store.socket_path.exists())
    assert pid_alive(first.pid)
    (tmp_path / "go").touch()
    done = await fake_manager.wait([a.task_id], timeout=60)
    assert done.tasks[0].status == TaskStatus.COMPLETED
    wait_until(lambda: not pid_alive(first.pid))
    # a new worker takes the next task; SIGTERM makes it cancel what it supervises, then exit
    b = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300, "grandchild": True}), cwd=str(dirs[1])))
    rec = wait_until(lambda: (x := fake_manager.get(b.task_id)).claude and (dirs[1] / "grandchild.pid").exists() and x)
    assert rec.lease.pid != first.pid
    os.kill(rec.lease.pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(b.task_id)
    assert after.status == TaskStatus.CANCELLED
    assert not pid_alive(rec.claude.pid) and not pid_alive(int((dirs[1] / "grandchild.pid").read_text()))


async def test_a_killed_worker_is_replaced(fake_manager, workdir):
    r = await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))
    assert r.status == TaskStatus.COMPLETED
    old = fake_manager.store.worker_hello()["pid"]
    os.kill(old, signal.SIGKILL)  # leaves its socket file behind
    wait_until(lambda: not pid_alive(old))
    r = fake_manager.start(TaskOptions(prompt=fake({"result": "after"}), cwd=str(workdir)), nudge=False)
    fake_manager.nudge()
    done = await fake_manager.wait([r.task_id], timeout=60)
    assert done.tasks[0].result == "after"
    assert fake_manager.store.worker_hello()["pid"] != old


async def test_workers_in_several_processes_run_each_task_once(fake_manager, workdir, tmp_path, monkeypatch):
    """Two more workers (``python -m cc_tasks.worker``) pull from the same queue as the store's own: every task
    runs exactly once and the global cap holds."""
    import subprocess
    import sys

    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "3")
    fake_manager.settings.max_concurrent = fake_manager.store.max_concurrent = 3
    track = tmp_path / "track"
    track.mkdir()
    extra = [
        subprocess.Popen(
            [sys.executable, "-m", "cc_tasks.worker", "--store", str(fake_manager.store.root), "--slots", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        wait_until(lambda: len(fake_manager.store.workers()) == 2)
        items = [BatchItem(prompt=fake({"sleep": 0.05, "track": str(track)}), cwd=str(workdir)) for _ in range(30)]
        ids = [t.task_id for t in fake_manager.start_batch(items).tasks]
        done = await fake_manager.wait(ids, timeout=90)
        assert done.done and {t.status for t in done.tasks} == {TaskStatus.COMPLETED}
        assert len({t.lease.worker for t in done.tasks}) >= 2  # the work was shared
    finally:
        for p in extra:
            p.terminate()
        for p in extra:
            p.wait(20)
    runs = [line.split() for line in (track / "runs.log").read_text().splitlines()]
    assert sorted(r[0] for r in runs) == sorted(ids)  # each exactly once
    assert max(int(r[1]) for r in runs) <= 3


def test_process_identity_uses_boot_relative_start_ticks():
    from cc_tasks import procs

    me = procs.ref_of(os.getpid())
    assert me.start_ticks is not None and procs.alive(me)
    # a stepped wall clock moves create_time but not the start ticks
    assert procs.alive(me.model_copy(update={"create_time": me.create_time + 5}))
    assert not procs.alive(me.model_copy(update={"start_ticks": me.start_ticks + 1}))


async def test_cancel_right_after_start_never_stops_the_worker(fake_manager, workdir):
    await run(fake_manager, TaskOptions(prompt=fake(), cwd=str(workdir)))
    pid = fake_manager.store.worker_hello()["pid"]
    for _ in range(5):  # the worker claims the task while cancel is under way
        r = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir)), nudge=False)
        fake_manager.nudge()
        assert fake_manager.cancel(r.task_id).status == TaskStatus.CANCELLED
    assert fake_manager.store.worker_hello()["pid"] == pid and pid_alive(pid)


def test_a_supervisor_that_ends_without_a_final_record_fails_its_task(cc_env, workdir, monkeypatch):
    """Whatever happens in a supervisor thread, the worker does not leave its task running."""
    from cc_tasks.supervisor import Supervisor
    from cc_tasks.worker import Worker

    m = TaskManager(Settings.from_env())
    r = m.start(TaskOptions(prompt=fake(), cwd=str(workdir)), nudge=False)
    w = Worker(m.store, slots=1)  # this test process stands in for the worker
    m.store.register(w.info)
    try:
        (claimed,) = m.store.claim(w.info, 1)
        assert claimed.task_id == r.task_id and m.get(r.task_id).status == TaskStatus.RUNNING
        monkeypatch.setattr(Supervisor, "run", lambda self: None)
        w._run(Supervisor(m.store, claimed))
        after = m.get(r.task_id)
        assert after.status == TaskStatus.FAILED and "without a final record" in after.error
    finally:
        m.store.unregister(w.info.worker_id)


async def test_a_worker_killed_before_it_recorded_claudes_pid_still_stops_claude(fake_manager, workdir):
    """claude's pid reaches the record with the first progress flush; a worker dying before that leaves
    claude to be found by the task id in its environment."""
    r = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 300, "grandchild": True, "no_tools": True}), cwd=str(workdir))
    )
    wait_until(lambda: (workdir / "grandchild.pid").exists())
    rec = fake_manager.store.load(r.task_id)
    from cc_tasks import procs

    found = procs.task_processes(r.task_id)
    assert len(found) >= 2  # claude and its background child
    if rec.claude is not None:
        pytest.skip("the first progress flush came before this test looked")
    os.kill(rec.lease.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(rec.lease.pid))
    after = fake_manager.get(r.task_id)
    assert after.status == TaskStatus.QUEUED and "worker lost" in after.attempts[0].reason
    assert not any(pid_alive(p.pid) for p in found)


async def test_a_worker_whose_store_is_deleted_exits(cc_env, fake_claude, workdir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", fake_claude)
    monkeypatch.setenv("CC_TASKS_DIR", str(tmp_path / "doomed"))
    m = TaskManager(Settings.from_env())
    assert (await run(m, TaskOptions(prompt=fake(), cwd=str(workdir)))).status == TaskStatus.COMPLETED
    pid = m.store.worker_hello()["pid"]
    shutil.rmtree(m.store.root)
    wait_until(lambda: not pid_alive(pid))
    m.reap(wait=5)
