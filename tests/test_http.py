"""Streamable HTTP: the same tools behind a bearer token on every route, /health open, clean SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from cc_tasks.models import TaskOptions, TaskStatus
from cc_tasks.store import TaskStore

from .conftest import ROOT, mock_prompt
from .test_manager import fake, wait_until

TOKEN = "s3cret-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, method="GET", headers=None, data=None):
    """(status, headers, body) without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture
def http_server(cc_env, fake_claude, tmp_path):
    env = {**os.environ, "CC_TASKS_CLAUDE_BIN": fake_claude}
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    p = subprocess.Popen(
        [sys.executable, "-m", "cc_tasks", "serve", "--transport", "http", "--port", str(port), "--token", TOKEN],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: p.poll() is not None or http(base + "/health")[0] == 200 if _up(port) else False, timeout=30)
    assert p.poll() is None, open(tmp_path / "server.log").read()
    p.base, p.logfile, p.store = base, tmp_path / "server.log", TaskStore(cc_env["CC_TASKS_DIR"])
    yield p
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    for t in p.store.active_ids():
        subprocess.run([sys.executable, "-m", "cc_tasks", "cancel", t], env=env, cwd=str(ROOT), timeout=60)
    p.store.stop_worker()


def _up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_every_route_needs_the_token_but_health(http_server):
    base = http_server.base
    status, _, body = http(base + "/health")
    assert status == 200 and json.loads(body) == {"ok": True}
    for path in ("/", "/api/tasks", "/api/tasks/20260101-000000-000-1a2b3c4d", "/mcp"):
        assert http(base + path)[0] == 401, path
        assert http(base + path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
    assert http(base + "/api/tasks/x/cancel", method="POST", data=b"")[0] == 401
    status, _, body = http(base + "/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["tasks"] == []
    # a token in the URL once: it becomes an HttpOnly cookie and the URL loses it
    status, headers, _ = http(base + f"/?token={TOKEN}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    status, _, body = http(base + "/", headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and "<title>cc-tasks</title>" in body
    assert http(base + "/?token=wrong")[0] == 401
    # the token is never logged
    http_server.send_signal(signal.SIGTERM)
    assert http_server.wait(20) == 0  # SIGTERM shuts down cleanly
    logs = http_server.logfile.read_text() + (http_server.store.root / "cc_tasks.log").read_text()
    assert TOKEN not in logs


async def test_mcp_over_http_with_and_without_token(http_server, workdir):
    url = http_server.base + "/mcp"
    async with Client(StreamableHttpTransport(url, headers={"Authorization": f"Bearer {TOKEN}"})) as c:
        names = {t.name for t in await c.list_tools()}
        assert {"start_cc_task_async", "wait_for_tasks", "get_task_output"} <= names
        tid = (
            await c.call_tool("start_cc_task_async", {"prompt": fake({"result": "over http"}), "cwd": str(workdir)})
        ).structured_content["task_id"]
        res = (await c.call_tool("wait_for_tasks", {"task_ids": [tid], "timeout_seconds": 60})).structured_content
        assert res["tasks"][0]["result"] == "over http"
    with pytest.raises(Exception):
        async with Client(StreamableHttpTransport(url)) as c:
            await c.list_tools()
    status, _, body = http(http_server.base + f"/api/tasks/{tid}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["status"] == "completed"


def test_binding_beyond_loopback_needs_a_token(cc_env):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cc_tasks",
            "serve",
            "--transport",
            "http",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        env={k: v for k, v in os.environ.items() if k != "CC_TASKS_TOKEN"},
    )
    assert r.returncode == 2 and "refusing to serve on 0.0.0.0 without a token" in r.stderr


def test_claude_code_is_an_http_client(cc_env, real_claude, workdir, tmp_path):
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "cc_tasks", "serve", "--transport", "http", "--port", str(port)],
        env={**os.environ, "CC_TASKS_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    try:
        wait_until(lambda: _up(port), timeout=30)
        config = {
            "mcpServers": {
                "t": {
                    "type": "http",
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "headers": {"Authorization": f"Bearer {TOKEN}"},
                }
            }
        }
        prompt = mock_prompt(
            [
                {"tool": "mcp__t__get_server_info", "input": {}},
                {"tool": "mcp__t__list_active_tasks", "input": {"include_finished": True}},
                {"text": "saw: {all_results}"},
            ],
            "look at the server",
        )
        r = subprocess.run(
            [
                real_claude,
                "-p",
                "--output-format=stream-json",
                "--verbose",
                f"--mcp-config={json.dumps(config)}",
                "--allowedTools=mcp__t",
            ],
            input=prompt,
            capture_output=True,
            text=True,
            cwd=workdir,
            timeout=120,
        )
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert not result["is_error"], r.stdout[-2000:]
        assert cc_env["CC_TASKS_DIR"] in result["result"] and '"tasks":[]' in result["result"].replace(" ", "")
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


def test_without_a_token_only_loopback_hosts_and_origins_get_in(cc_env, fake_claude, tmp_path):
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "cc_tasks", "serve", "--transport", "http", "--port", str(port)],
        env={k: v for k, v in os.environ.items() if k != "CC_TASKS_TOKEN"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    try:
        wait_until(lambda: _up(port), timeout=30)
        base = f"http://127.0.0.1:{port}"
        assert http(base + "/api/tasks")[0] == 200
        assert http(base + "/api/tasks", headers={"Host": f"localhost:{port}"})[0] == 200
        # DNS rebinding: a page of another site that resolves to 127.0.0.1
        assert http(base + "/api/tasks", headers={"Host": f"attacker.example:{port}"})[0] == 403
        assert (
            http(
                base + "/mcp",
                method="POST",
                data=b"{}",
                headers={
                    "Host": f"127.0.0.1:{port}",
                    "Origin": f"http://attacker.example:{port}",
                    "Content-Type": "application/json",
                },
            )[0]
            == 403
        )
        assert http(base + "/api/tasks?limit=abc")[0] == 400
        assert http(base + "/api/tasks/20260101-000000-000-1a2b3c4d/transcript?offset=x")[0] in (400, 404)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


# -- the dashboard's approvals API: sub-agents that ask, answered over HTTP --------------------------------------

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def answer(base, body, headers=None):
    """POST /api/approvals/answer: (status, JSON reply)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {**AUTH, "X-CC-Tasks": "1", "Content-Type": "application/json", **(headers or {})}
    status, _, text = http(base + "/api/approvals/answer", method="POST", headers=hdrs, data=data)
    return status, json.loads(text)


def test_a_pending_request_is_listed_and_answered_once_over_http(http_server, manager, workdir):
    from .test_approvals import STEPS, asking

    base = http_server.base
    t = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(workdir), name="asks over http", group="web"))
    req = asking(manager, t.task_id)
    assert http(base + "/api/approvals")[0] == 401
    assert http(base + "/api/approvals/answer", method="POST", data=b"{}")[0] == 401
    status, _, body = http(base + "/api/approvals", headers=AUTH)
    (entry,) = json.loads(body)["approvals"]
    assert status == 200 and entry["task_id"] == t.task_id and entry["request_id"] == req.request_id
    assert entry["name"] == "asks over http" and entry["tool_name"] == "Bash" and "echo hi" in entry["input_preview"]
    assert json.loads(http(base + "/api/approvals?group=web", headers=AUTH)[2])["approvals"] == [entry]
    assert json.loads(http(base + "/api/approvals?group=other", headers=AUTH)[2])["approvals"] == []

    ok = {"task_id": t.task_id, "request_id": req.request_id, "decision": "allow"}
    status, _, _ = http(base + "/api/approvals/answer", method="POST", headers=AUTH, data=json.dumps(ok).encode())
    assert status == 400  # without X-CC-Tasks (a cross-site form cannot send it)
    for bad in (b"not json", b"[1]", b"x" * 70_000, {**ok, "decision": "maybe"}, {**ok, "message": 3},
                {**ok, "request_id": ""}, {**ok, "task_id": 7}, {**ok, "remember": "yes"}, {**ok, "extra": 1},
                {**ok, "task_id": "../etc/passwd"}):  # fmt: skip
        status, reply = answer(base, bad)
        assert status == 400 and reply["error"], bad
    status, reply = answer(base, {**ok, "task_id": "20260101-000000-000-1a2b3c4d"})
    assert status == 404 and "no task" in reply["error"]
    status, reply = answer(base, {**ok, "request_id": "a-00000000"})
    assert status == 409 and "no pending request 'a-00000000'" in reply["error"]
    assert not (workdir / "out.txt").exists()  # nothing ran yet

    status, reply = answer(base, ok)
    assert status == 200 and reply["decision"] == "allow" and reply["by"].startswith("dashboard of 127.0.0.1 on ")
    status, again = answer(base, {**ok, "decision": "deny"})  # exactly one answer counts
    assert status == 409 and ("already answered: allow by dashboard" in again["error"]
                              or "no pending request" in again["error"])  # fmt: skip
    done = wait_until(lambda: (r := manager.get(t.task_id)).status.terminal and r, 60)
    assert done.status == TaskStatus.COMPLETED and (workdir / "out.txt").read_text() == "hi\n"
    events = [e for _, e in manager.store.iter_events(t.task_id) if e["kind"] == "approval_answered"]
    assert [(e["decision"], e["by"]) for e in events] == [("allow", reply["by"])]
    assert json.loads(http(base + "/api/approvals", headers=AUTH)[2])["approvals"] == []


def test_the_approvals_list_stays_bounded_and_pages_with_a_cursor(http_server, manager):
    from cc_tasks.models import REPLY_CHARS, PostOptions

    t = manager.post(PostOptions(prompt="a job whose agent asks a lot", name="n" * 200))
    manager.claim("asker", lease_seconds=600)
    lease = manager.get(t.task_id).lease
    asked = [manager.store.ask_approval(lease, "Bash", {"command": f"{n} " + "\x01\"" * 5_000}, 600).request_id
             for n in range(80)]  # fmt: skip
    seen, cursor = [], ""
    while True:
        status, _, body = http(http_server.base + f"/api/approvals?cursor={cursor}", headers=AUTH)
        page = json.loads(body)
        assert status == 200 and len(body) <= REPLY_CHARS and page["approvals"]
        assert all(a["input_truncated"] and a["task_id"] == t.task_id for a in page["approvals"])
        seen += [a["request_id"] for a in page["approvals"]]
        if not page["more"]:
            break
        cursor = page["next_cursor"]
    assert seen == asked and cursor  # every request once, oldest first, over more than one page
    status, _, body = http(http_server.base + "/api/approvals?group=" + "g" * 300, headers=AUTH)
    assert status == 400
