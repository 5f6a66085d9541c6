"""The cap belongs to the backend, not to each claimer's environment: stored with it (``cc-tasks config set
max_concurrent N``), or on a remote backend the first worker's value when none is stored; shown by doctor and
get_server_info; a worker with more slots than the cap says so at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager
from cc_tasks.models import TaskOptions

from .conftest import ROOT
from .test_manager import fake, wait_until
from .test_nats_backend import stop
from .test_nats_many import runs

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cc_tasks", *args], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def worker(url: str, claude: str, log: Path, cap: int, slots: int) -> subprocess.Popen:
    env = {**os.environ, "CC_TASKS_CLAUDE_BIN": claude, "CC_TASKS_MAX_CONCURRENT": str(cap)}
    env.pop("CC_TASKS_BACKEND", None)
    return subprocess.Popen(
        [sys.executable, "-m", "cc_tasks.worker", "--backend", url, "--cancel-on-exit", "--slots", str(slots)],
        cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True,
    )  # fmt: skip


async def test_two_workers_with_different_environments_claim_under_the_stored_cap(
    nats_url, tmp_path, fake_claude, workdir, monkeypatch
):
    set_cap = cli("--backend", nats_url, "config", "set", "max_concurrent", "3")
    assert set_cap.returncode == 0 and "max_concurrent = 3 (stored)" in set_cap.stdout, set_cap.stdout + set_cap.stderr
    track = tmp_path / "track"
    track.mkdir()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [worker(nats_url, fake_claude, logs[0], 8, 8), worker(nats_url, fake_claude, logs[1], 2, 2)]
    monkeypatch.setenv("CC_TASKS_BACKEND", nats_url)
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "16")  # (this server's own default: the stored cap wins)
    m = TaskManager(Settings.from_env())
    try:
        info = m.server_info()
        assert info.max_concurrent == 3 and "stored" in (info.cap_source or "")
        cfg = {"track": str(track), "sleep": 0.4, "no_tools": True}
        ids = [m.start(TaskOptions(prompt=fake(cfg), cwd=str(workdir))).task_id for _ in range(12)]
        done = await m.wait(ids, timeout=90)
        assert all(t.status == "completed" for t in done.tasks), [t.status for t in done.tasks]
        seen = runs(track)
        assert sorted(t for t, _ in seen) == sorted(ids)  # each ran once
        assert max(n for _, n in seen) <= 3  # never more than the stored cap at once, whatever each worker's env
        wait_until(lambda: "the cap in force is 3" in logs[0].read_text())  # 8 slots above the cap: one line
        assert logs[0].read_text().count("the cap in force is 3") == 1
        assert "the cap in force" not in logs[1].read_text()  # 2 slots: within it
        doctor = cli("--backend", nats_url, "doctor")
        assert "cap 3 tasks at once (stored with the backend" in doctor.stdout, doctor.stdout
    finally:
        for w in workers:
            stop(w)
        m.store.close()


def test_the_first_worker_stores_its_cap_when_none_is_set(nats_url, tmp_path, fake_claude):
    w = worker(nats_url, fake_claude, tmp_path / "w.log", 5, 2)
    try:
        wait_until(lambda: "max_concurrent = 5 (stored)" in cli("--backend", nats_url, "config").stdout)
    finally:
        stop(w)
    later = worker(nats_url, fake_claude, tmp_path / "w2.log", 9, 9)  # a second worker does not change it
    try:
        wait_until(lambda: "the cap in force is 5" in (tmp_path / "w2.log").read_text())
        assert "max_concurrent = 5 (stored)" in cli("--backend", nats_url, "config").stdout
    finally:
        stop(later)


def test_the_local_store_keeps_a_cap_set_with_config(tmp_path, monkeypatch):
    store = tmp_path / "store"
    env = {"CC_TASKS_DIR": str(store), "CC_TASKS_MAX_CONCURRENT": "7"}
    assert "max_concurrent = not stored (in force here: 7)" in cli("config", env=env).stdout
    bad = cli("config", "set", "max_concurrent", "0", env=env)
    assert bad.returncode != 0 and "below 1" in bad.stderr
    assert cli("config", "set", "max_concurrent", "2", env=env).returncode == 0
    monkeypatch.setenv("CC_TASKS_DIR", str(store))
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "7")
    m = TaskManager(Settings.from_env())
    assert m.server_info().max_concurrent == 2
    assert "cap 2 tasks at once (stored" in cli("doctor", env=env).stdout
    assert cli("config", "unset", "max_concurrent", env=env).returncode == 0
    assert m.server_info().max_concurrent == 7
