"""The NATS backend on a 3-node JetStream cluster (``nats://a,b,c/NS?replicas=3``): a node that leads the
task records' stream is SIGKILLed while worker processes run 100 tasks; none is lost, none runs twice, all
complete."""

from __future__ import annotations

import time

import pytest

from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager
from cc_tasks.models import BatchItem, TaskStatus

from .nats_servers import js_request
from .test_manager import fake, wait_until
from .test_nats_backend import start_worker, stop
from .test_nats_many import runs

pytestmark = pytest.mark.timeout(120)


def stream_leader(cluster, stream: str) -> str | None:
    for s in cluster.servers:
        if s.running:
            info = js_request(s.port, f"$JS.API.STREAM.INFO.{stream}")
            if info and "error" not in info:
                return info.get("cluster", {}).get("leader")
    return None


async def test_killing_the_leader_node_during_100_tasks_loses_none_and_runs_none_twice(
    nats_cluster, tmp_path, fake_claude, workdir, monkeypatch
):
    url = f"{nats_cluster.url}/cluster?replicas=3"
    monkeypatch.setenv("CC_TASKS_BACKEND", url)
    monkeypatch.setenv("CC_TASKS_MAX_CONCURRENT", "6")
    m = TaskManager(Settings.from_env())
    track = tmp_path / "track"
    track.mkdir()
    workers = [start_worker(url, fake_claude, "--slots", "3") for _ in range(3)]
    try:
        cfg = {"track": str(track), "sleep": 0.3, "no_tools": True}
        items = [BatchItem(prompt=fake({**cfg, "result": f"r{i}"}), cwd=str(workdir)) for i in range(100)]
        ids = [t.task_id for t in m.start_batch(items).tasks]
        wait_until(lambda: len(runs(track)) >= 20, timeout=60)
        leader = stream_leader(nats_cluster, f"KV_{m.store.nats.NS}_TASKS")
        assert leader, "no leader for the records' stream"
        nats_cluster.by_name(leader).kill()
        killed_at, ran_before = time.monotonic(), len(runs(track))
        done = await m.wait(ids, timeout=90)
        took = time.monotonic() - killed_at
        assert done.done, [t.status for t in done.tasks if not t.status.terminal]
        records = [m.get(t) for t in ids]
        assert [r.status for r in records] == [TaskStatus.COMPLETED] * 100
        assert [r.result for r in records] == [f"r{i}" for i in range(100)]
        assert all(r.epoch == 1 and len(r.attempts) == 1 for r in records)  # (never requeued)
        new_leader = stream_leader(nats_cluster, f"KV_{m.store.nats.NS}_TASKS")
        assert new_leader and new_leader != leader
    finally:
        for w in workers:
            stop(w)
        m.store.close()
    seen = sorted(t for t, _ in runs(track))
    assert seen == sorted(ids)  # each ran exactly once
    assert max(n for _, n in runs(track)) <= 6
    print(f"killed {leader} after {ran_before} runs; the other {100 - ran_before} took {took:.1f} s")
