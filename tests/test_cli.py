"""The cc-tasks command line, run as real processes against a real store (fake claude for speed)."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from cc_tasks import cli as cli_module
from cc_tasks.models import TaskStatus
from cc_tasks.store import TaskStore

from .conftest import ROOT, mock_prompt, pid_alive
from .test_manager import fake, wait_until


@pytest.fixture
def cli(cc_env, fake_claude, monkeypatch):
    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", fake_claude)
    store = TaskStore(cc_env["CC_TASKS_DIR"])

    def call(*args, input=None, timeout=60, env=None):
        return subprocess.run(
            [sys.executable, "-m", "cc_tasks", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            cwd=str(ROOT),
            env={**os.environ, **(env or {})},
        )

    call.store = store
    yield call
    for t in store.active_ids():
        call("cancel", t)
    store.stop_worker()


def test_every_subcommand_has_help(cli):
    for cmd in ("serve", "list", "show", "logs", "run", "cancel", "cleanup", "doctor", "install-claude", "worker",
                "post", "claim", "renew", "complete", "fail", "release", "notes", "diff", "merge", "approvals", "approve",
                "deny"):  # fmt: skip
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "Usage: cc-tasks " + cmd in r.stdout, (cmd, r.stderr)


def test_run_wait_show_list_logs(cli, workdir):
    r = cli(
        "run", fake({"result": "the answer is 42"}, "first line"), "--cwd", str(workdir), "--name", "cli-task", "--wait"
    )
    assert r.returncode == 0, r.stderr
    assert "the answer is 42" in r.stdout and "completed" in r.stderr
    (tid,) = list(cli.store.all_ids())
    shown = cli("show", tid)
    assert shown.returncode == 0 and "cli-task" in shown.stdout and "completed" in shown.stdout
    as_json = json.loads(cli("show", tid, "--json").stdout)
    assert as_json["task_id"] == tid and as_json["result"] == "the answer is 42"
    assert "no tasks" in cli("list").stdout  # nothing active
    listed = cli("list", "--all")
    assert tid in listed.stdout and "cli-task" in listed.stdout and str(workdir) in listed.stdout
    assert [t["task_id"] for t in json.loads(cli("list", "--all", "--json").stdout)["tasks"]] == [tid]
    assert json.loads(cli("list", "--status", "failed", "--json").stdout)["tasks"] == []
    logs = cli("logs", tid)
    assert logs.returncode == 0 and "session" in logs.stdout and "Bash" in logs.stdout and "done" in logs.stdout


def test_run_wait_exit_code_reflects_failure(cli, workdir):
    r = cli(
        "run",
        fake({"is_error": True, "exit": 1, "result": "API Error: 500 nope"}),
        "--cwd",
        str(workdir),
        "--wait",
        "--max-attempts",
        "1",
    )
    assert r.returncode == 1 and "failed" in r.stderr and "API Error: 500 nope" in r.stderr


def test_run_without_wait_prints_the_id_and_logs_follow(cli, workdir):
    r = cli("run", fake({"sleep": 1.5, "result": "slow done"}), "--cwd", str(workdir))
    tid = r.stdout.strip()
    assert r.returncode == 0 and cli.store.exists(tid)
    followed = cli("logs", tid, "-f", timeout=60)
    assert followed.returncode == 0 and "slow done" in followed.stdout and "is completed" in followed.stdout


def test_cancel_and_cleanup(cli, workdir):
    tid = cli("run", fake({"sleep": 300}), "--cwd", str(workdir)).stdout.strip()
    wait_until(lambda: cli.store.read(tid).status == TaskStatus.RUNNING and cli.store.read(tid).claude)
    claude_pid = cli.store.read(tid).claude.pid
    r = cli("cancel", tid)
    assert r.returncode == 0 and "cancelled" in r.stdout and not pid_alive(claude_pid)
    r = cli("cleanup", tid)
    assert r.returncode == 0 and not cli.store.exists(tid)
    r = cli("cleanup", tid)
    assert r.returncode == 2 and "no task" in r.stderr
    r = cli("show", "../etc/passwd")
    assert r.returncode == 2 and "invalid task id" in r.stderr


def test_cleanup_older_than_spares_running_and_recent(cli, workdir):
    old = cli("run", fake(), "--cwd", str(workdir), "--wait")
    assert old.returncode == 0
    (old_id,) = list(cli.store.all_ids())
    failed_id = None
    cli("run", fake({"exit": 1, "is_error": True}), "--cwd", str(workdir), "--wait", "--max-attempts", "1")
    failed_id = [t for t in cli.store.all_ids() if t != old_id][0]
    running = cli("run", fake({"sleep": 300}), "--cwd", str(workdir)).stdout.strip()
    wait_until(lambda: cli.store.read(running).status == TaskStatus.RUNNING)
    # age the finished ones by a week
    for t in (old_id, failed_id):
        cli.store.update(t, lambda r: r.model_copy(update={"finished_at": r.finished_at.replace(year=2020)}))
    r = cli("cleanup", "--older-than", "7d", "--status", "failed")
    assert r.returncode == 0 and "deleted 1" in r.stdout and not cli.store.exists(failed_id)
    r = cli("cleanup", "--older-than", "7d")
    assert "deleted 1" in r.stdout and not cli.store.exists(old_id)
    assert cli.store.exists(running) and cli.store.read(running).status == TaskStatus.RUNNING
    assert cli("cleanup", "--older-than", "soon").returncode == 2
    assert cli("cleanup").returncode == 2


def test_doctor(cli, tmp_path):
    r = cli("doctor")
    assert r.returncode == 0, r.stdout
    assert "claude" in r.stdout and "store" in r.stdout and "mode 0o700" in r.stdout
    assert "ANTHROPIC_API_KEY" in r.stdout and "test-key" not in r.stdout  # present, never printed
    r = cli("doctor", env={"CC_TASKS_CLAUDE_BIN": str(tmp_path / "missing")})
    assert r.returncode == 1 and "claude CLI not found" in r.stdout


def cc_tasks(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cc_tasks", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env
    )


def test_install_claude_adds_this_installation_for_the_user(cc_env, real_claude, workdir):
    r = cc_tasks("install-claude", "--claude", real_claude, cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    server = [sys.executable, str(ROOT / "main.py"), "serve"]
    ran = shlex.join([real_claude, "mcp", "add", "--scope", "user", "cc-tasks", "--", *server])
    assert f"running: {ran}" in r.stdout and "cc-tasks added for every project of yours" in r.stdout
    listed = subprocess.run([real_claude, "mcp", "list"], capture_output=True, text=True, cwd=workdir, timeout=60)
    assert f"cc-tasks: {' '.join(server)} - ✔ Connected" in listed.stdout, listed.stdout + listed.stderr
    again = cc_tasks("install-claude", "--claude", real_claude, cwd=workdir)
    assert again.returncode == 2 and "already exists" in again.stdout
    assert shlex.join([real_claude, "mcp", "remove", "--scope", "user", "cc-tasks"]) in again.stderr


def test_install_claude_for_a_project_writes_its_mcp_json(cc_env, real_claude, workdir):
    r = cc_tasks("install-claude", "--scope", "project", cwd=workdir)  # the claude of CC_TASKS_CLAUDE_BIN
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"running: {shlex.quote(real_claude)} mcp add --scope project cc-tasks -- " in r.stdout
    config = json.loads((workdir / ".mcp.json").read_text())["mcpServers"]["cc-tasks"]
    assert config["command"] == sys.executable and config["args"] == [str(ROOT / "main.py"), "serve"]
    got = subprocess.run(
        [real_claude, "mcp", "get", "cc-tasks"], capture_output=True, text=True, cwd=workdir, timeout=60
    )
    assert "Scope: Project config" in got.stdout, got.stdout + got.stderr


def test_install_claude_without_claude_says_what_to_do(cc_env, workdir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CC_TASKS_CLAUDE_BIN"}
    env["PATH"] = str(tmp_path)  # no claude there
    r = cc_tasks("install-claude", cwd=workdir, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert "'claude' is not on PATH" in r.stderr and "--claude PATH or CC_TASKS_CLAUDE_BIN" in r.stderr
    r = cc_tasks("install-claude", "--claude", str(tmp_path / "nope"), cwd=workdir, env=env)
    assert r.returncode == 2 and "is not an executable file" in r.stderr
    assert not (workdir / ".mcp.json").exists()


def test_install_claude_serves_an_installed_package_with_dash_m(tmp_path, monkeypatch):
    assert cli_module.server_command() == [sys.executable, str(ROOT / "main.py"), "serve"]  # a checkout
    monkeypatch.setattr(cli_module, "__file__", str(tmp_path / "site-packages" / "cc_tasks" / "cli.py"))
    flag = ["-P"] if sys.version_info >= (3, 11) else []  # never import a cc_tasks folder of the client's cwd
    assert cli_module.server_command() == [sys.executable, *flag, "-m", "cc_tasks", "serve"]


def test_a_shell_script_works_the_task_board(cli):
    tid = cli("post", "summarise the logs", "--group", "ops", "--name", "logs").stdout.strip()
    other = cli("post", "-", "--group", "ops", input="check the disks\n").stdout.strip()
    assert cli("claim", "--worker", "sh", "--group", "nope").returncode == 1  # nothing for it
    got = json.loads(cli("claim", "--worker", "sh", "--group", "ops", "--lease", "60").stdout)
    assert got["claimed"] and got["task_id"] == tid and got["prompt"] == "summarise the logs"
    assert cli("renew", tid, "--lease", got["lease"], "--note", "reading").returncode == 0
    bad = cli("complete", tid, "--lease", "not-the-lease", "--result", "x")
    assert bad.returncode == 2 and "not the one that holds it" in bad.stderr
    done = cli("complete", tid, "--lease", got["lease"], "--result-file", "-", input="all quiet\n")
    assert done.returncode == 0 and "completed" in done.stdout
    assert cli.store.read_output(tid, "result", 0, 100)[0] == b"all quiet\n"
    second = json.loads(cli("claim", "--worker", "sh", "--wait", "1").stdout)
    assert second["task_id"] == other
    assert "failed" in cli("fail", other, "--lease", second["lease"], "--error", "disk gone").stdout
    assert cli("notes", "ops", "--add", "disk 3 is flaky", "--key", "disks", "--by", "sh").stdout.strip() == "0"
    assert cli("notes", "ops", "--add", "disk 3 replaced", "--key", "disks").stdout.strip() == "1"
    listed = cli("notes", "ops")
    assert "disk 3 replaced" in listed.stdout and "flaky" not in listed.stdout
    assert len(json.loads(cli("list", "--all", "--group", "ops", "--json").stdout)["tasks"]) == 2
    bad = cli("post", "x", "--group", "a b")
    assert bad.returncode == 2 and "group" in bad.stderr and "Traceback" not in bad.stderr


# -- sub-agents that ask, answered from a shell: the real claude (against the mock API) run by the store's worker


@pytest.fixture
def real_cli(cc_env):
    """The CLI against the test's store, its tasks run by the store's worker with the real claude CLI."""
    store = TaskStore(cc_env["CC_TASKS_DIR"])

    def call(*args, timeout=60):
        return subprocess.run([sys.executable, "-m", "cc_tasks", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=str(ROOT), env=dict(os.environ))  # fmt: skip

    call.store = store
    yield call
    for t in store.active_ids():
        call("cancel", t)
    store.stop_worker()


ASKS = [{"bash": "echo hi > out.txt"}, {"text": "done: {last_result}"}]


def start_asking(cli, cwd, name: str) -> tuple[str, str]:
    """A task started from the CLI whose sub-agent asks to run a Bash call: (task id, request id)."""
    r = cli("run", mock_prompt(ASKS), "--cwd", str(cwd), "--name", name)
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip()
    req = wait_until(lambda: (rec := cli.store.read(tid)).awaiting and rec.awaiting[0], 60)
    return tid, req.request_id


@pytest.mark.timeout(180)
def test_approvals_lists_and_approve_and_deny_answer_from_the_shell(real_cli, workdir):
    assert "no pending approval requests" in real_cli("approvals").stdout
    allowed_dir, denied_dir = workdir / "allowed", workdir / "denied"
    allowed_dir.mkdir()
    denied_dir.mkdir()
    allowed, a_req = start_asking(real_cli, allowed_dir, "to allow")
    denied, d_req = start_asking(real_cli, denied_dir, "to deny")

    listed = real_cli("approvals")
    assert listed.returncode == 0, listed.stderr
    for tid, req, name in ((allowed, a_req, "to allow"), (denied, d_req, "to deny")):
        row = next(line for line in listed.stdout.splitlines() if req in line)
        assert tid in row and name in row and "Bash" in row and "echo hi" in row and "UTC (in " in row
    as_json = json.loads(real_cli("approvals", "--json").stdout)
    assert [(a["task_id"], a["request_id"]) for a in as_json["approvals"]] == [(allowed, a_req), (denied, d_req)]
    first = as_json["approvals"][0]
    assert first["name"] == "to allow" and "echo hi > out.txt" in first["input_preview"]
    assert json.loads(real_cli("approvals", "--group", "nobody", "--json").stdout)["approvals"] == []
    assert not (allowed_dir / "out.txt").exists()  # nothing ran before the answer

    ok = real_cli("approve", allowed, a_req)
    assert ok.returncode == 0 and f"{a_req} of {allowed} allowed" in ok.stdout and "by cli " in ok.stdout, ok.stderr
    no = real_cli("deny", denied, d_req, "--message", "not here: use the fixture instead")
    assert no.returncode == 0 and "denied" in no.stdout, no.stderr
    again = real_cli("deny", allowed, a_req)  # exactly one answer counts
    assert again.returncode == 1 and "error:" in again.stderr and again.stdout == ""
    assert "already answered: allow by cli " in again.stderr or "no pending request" in again.stderr
    unknown = real_cli("approve", denied, "a-00000000")
    assert unknown.returncode == 1 and "no pending request 'a-00000000'" in unknown.stderr

    done = {t: wait_until(lambda t=t: (r := real_cli.store.read(t)).status.terminal and r, 60)
            for t in (allowed, denied)}  # fmt: skip
    assert done[allowed].status == TaskStatus.COMPLETED and (allowed_dir / "out.txt").read_text() == "hi\n"
    assert done[denied].status == TaskStatus.COMPLETED and not (denied_dir / "out.txt").exists()
    assert "not here: use the fixture instead" in done[denied].result
    answered = {t: [e for _, e in real_cli.store.iter_events(t) if e["kind"] == "approval_answered"]
                for t in (allowed, denied)}  # fmt: skip
    assert answered[allowed][0]["decision"] == "allow" and answered[allowed][0]["by"].startswith("cli ")
    assert answered[denied][0]["decision"] == "deny" and "@" in answered[denied][0]["by"]
    assert "no pending approval requests" in real_cli("approvals").stdout


@pytest.mark.timeout(180)
def test_approve_remember_answers_the_same_call_again(real_cli, workdir):
    steps = [{"bash": "echo hi >> out.txt"}, {"bash": "echo hi >> out.txt"}, {"text": "done"}]
    tid = real_cli("run", mock_prompt(steps), "--cwd", str(workdir)).stdout.strip()
    req = wait_until(lambda: (rec := real_cli.store.read(tid)).awaiting and rec.awaiting[0], 60)
    ok = real_cli("approve", tid, req.request_id, "--remember")
    assert ok.returncode == 0 and "remembered for the rest of the task: Bash(echo hi" in ok.stdout, ok.stderr
    done = wait_until(lambda: (r := real_cli.store.read(tid)).status.terminal and r, 60)
    assert done.status == TaskStatus.COMPLETED and (workdir / "out.txt").read_text() == "hi\nhi\n"
    long = real_cli("deny", tid, req.request_id, "--message", "x" * 2001)
    assert long.returncode == 2 and "at most 2000" in long.stderr
