"""The human and remote surfaces on the NATS backend: every CLI command (``--backend URL`` on the subcommand,
or CC_TASKS_BACKEND) and the HTTP transport with its dashboard API, against a worker process on NATS; none of
them has a claude binary or a local store. And a worker's SIGTERM: the first drains, a second cancels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from .conftest import ROOT
from .test_http import free_port, http
from .test_manager import fake, wait_until
from .test_nats_backend import start_worker, stop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def surfaces_env(tmp_path) -> dict:
    """A client's environment: no claude here, and a store folder that must stay unused."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC_TASKS_BACKEND", "CC_TASKS_DIR")}
    env.update(CC_TASKS_CLAUDE_BIN=str(tmp_path / "no-claude-here"), CC_TASKS_DIR=str(tmp_path / "unused-store"))
    return env


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cc_tasks", *args], capture_output=True, text=True, timeout=60,
                          cwd=str(ROOT), env=env)  # fmt: skip


def test_every_cli_command_works_on_nats(nats_url, surfaces_env, fake_claude, workdir, tmp_path):
    b = ("--backend", nats_url)
    worker = start_worker(nats_url, fake_claude)
    try:
        r = cli(surfaces_env, "run", fake({"result": "forty-two"}), "--cwd", str(workdir), "--name", "n1", "--wait", *b)
        assert r.returncode == 0 and "forty-two" in r.stdout, r.stderr
        listed = json.loads(cli(surfaces_env, "list", "--all", "--json", *b).stdout)
        (task,) = [t for t in listed["tasks"] if t["name"] == "n1"]
        tid = task["task_id"]
        shown = json.loads(cli(surfaces_env, "show", tid, "--json", *b).stdout)
        assert shown["status"] == "completed" and shown["result"] == "forty-two"
        logs = cli(surfaces_env, "logs", tid, *b)
        assert logs.returncode == 0 and "forty-two" in logs.stdout, logs.stderr
        followed = cli(surfaces_env, "logs", "-f", tid, *b)  # (a finished task: follows to its end at once)
        assert followed.returncode == 0 and "forty-two" in followed.stdout, followed.stderr
        # the same through the environment, and a cancel of a running task from here
        env = {**surfaces_env, "CC_TASKS_BACKEND": nats_url}
        go = tmp_path / "never"
        started = cli(env, "run", fake({"wait_file": str(go)}), "--cwd", str(workdir), "--json")
        assert started.returncode == 0, started.stderr
        long = json.loads(started.stdout)["task_id"]
        wait_until(lambda: json.loads(cli(env, "show", long, "--json").stdout)["status"] == "running", 30)
        assert cli(env, "cancel", long).returncode == 0
        assert json.loads(cli(env, "show", long, "--json").stdout)["status"] == "cancelled"
        cleaned = cli(env, "cleanup", tid)
        assert cleaned.returncode == 0, cleaned.stderr
        gone = cli(env, "show", tid)
        assert gone.returncode == 2 and "Traceback" not in gone.stderr and tid in gone.stderr
        doctor = cli(env, "doctor")
        assert doctor.returncode == 0 and "nats" in doctor.stdout.lower(), doctor.stdout + doctor.stderr
        assert not os.path.exists(surfaces_env["CC_TASKS_DIR"])  # no local store was made
    finally:
        stop(worker)


async def test_the_http_transport_and_dashboard_api_work_on_nats(nats_url, surfaces_env, fake_claude, workdir):
    worker = start_worker(nats_url, fake_claude)
    port = free_port()
    token = "t0ken-for-nats-http"
    server = subprocess.Popen(
        [sys.executable, "-m", "cc_tasks", "serve", "--transport", "http", "--port", str(port), "--token", token],
        env={**surfaces_env, "CC_TASKS_BACKEND": nats_url},
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.poll() is not None or _health(base), 30)
        assert server.poll() is None
        transport = StreamableHttpTransport(f"{base}/mcp", headers={"Authorization": f"Bearer {token}"})
        async with Client(transport) as c:
            info = (await c.call_tool("get_server_info", {})).structured_content
            assert info["backend"] == "nats"
            tid = (
                await c.call_tool("start_cc_task_async", {"prompt": fake({"result": "over http"}), "cwd": str(workdir)})
            ).structured_content["task_id"]
            done = (await c.call_tool("wait_for_tasks", {"task_ids": [tid], "timeout_seconds": 60})).structured_content
            assert done["tasks"][0]["status"] == "completed"
        status, _, body = http(f"{base}/api/tasks?all=1", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and tid in body
    finally:
        server.terminate()
        server.wait(20)
        stop(worker)


def _health(base: str) -> bool:
    try:
        return http(base + "/health")[0] == 200
    except OSError:
        return False


def _worker(url: str, claude: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("CC_TASKS_BACKEND", "CC_TASKS_DIR")}
    return subprocess.Popen([sys.executable, "-m", "cc_tasks.worker", "--backend", url, "--slots", "2", *args],
                            cwd=str(ROOT), env={**env, "CC_TASKS_CLAUDE_BIN": claude},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def test_a_workers_sigterm_drains_and_a_second_one_cancels(nats_url, surfaces_env, fake_claude, workdir, tmp_path):
    import signal

    env = {**surfaces_env, "CC_TASKS_BACKEND": nats_url}

    def start(cfg: dict) -> str:
        r = cli(env, "run", fake(cfg), "--cwd", str(workdir), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["task_id"]

    def status(tid: str) -> str:
        return json.loads(cli(env, "show", tid, "--json").stdout)["status"]

    go = tmp_path / "go"
    worker = _worker(nats_url, fake_claude)
    try:
        first = start({"wait_file": str(go), "result": "drained"})
        wait_until(lambda: status(first) == "running", 30)
        worker.send_signal(signal.SIGTERM)  # drain: no new claims, the running task finishes
        later = start({"result": "later"})
        assert status(later) == "queued" and worker.poll() is None
        go.touch()
        assert worker.wait(60) == 0
        assert status(first) == "completed" and status(later) == "queued"
    finally:
        stop(worker)
    worker = _worker(nats_url, fake_claude)  # (takes the queued one, then a second SIGTERM cancels)
    try:
        wait_until(lambda: status(later) == "completed", 30)
        long = start({"wait_file": str(tmp_path / "never")})
        wait_until(lambda: status(long) == "running", 30)
        worker.send_signal(signal.SIGTERM)  # (draining: the task would run on)
        # Signals of one kind do not queue: a second SIGTERM sent at once would merge with the first. A
        # command in between (a task the draining worker leaves queued) keeps them apart.
        assert status(start({"result": "not for this one"})) == "queued"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        assert status(long) == "cancelled"
    finally:
        stop(worker)
