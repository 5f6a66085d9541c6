"""The benchmark still works (quick mode, small counts). Figures are printed, never asserted on."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.timeout(600)
def test_benchmark_runs_in_quick_mode(tmp_path, real_claude):
    out = tmp_path / "results.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["machine"]["cpus"] >= 1
    assert sorted(results["results"]) == [
        "1_start_latency",
        "2_status_latency",
        "3_parallel_real_cli",
        "4_many_short_tasks",
        "5_big_store",
        "6_memory",
        "7_execute_real_cli",
    ]
    print(r.stdout[-4000:])


@pytest.mark.timeout(300)
def test_approvals_benchmark_runs_in_quick_mode(tmp_path, real_claude):
    out = tmp_path / "approvals.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "approvals.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert {"server_start", "direct", "e2e"} <= set(results)
    for way in ("direct", "e2e"):
        assert set(results[way]["rounds_wall_s"]) == {"deny", "ask"}
    print(r.stdout[-4000:])


@pytest.mark.timeout(300)
def test_limiter_benchmark_runs_in_quick_mode(tmp_path, real_claude):
    out = tmp_path / "limiter.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "limiter.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and sorted(results["modes"]) == ["cc_tasks", "plain"]
    for mode in results["modes"].values():  # (each task's first request got its 429, and claude retried it)
        assert mode["errors_429"] == results["tasks"] == mode["claude_api_retries"]
        assert mode["requests"] >= 2 * results["tasks"]
    assert results["limiter_seen"]["at_end"]["last_status"] == 429
    print(r.stdout[-4000:])
