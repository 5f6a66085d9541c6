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
