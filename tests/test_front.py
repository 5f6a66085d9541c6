"""The stdio front door (cc_tasks/front.py): the handshake from the cache, the handover to the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from cc_tasks import front

from .conftest import ROOT

pytestmark = pytest.mark.timeout(120)

MODERN = "2026-07-28"
META = {
    front.META_VERSION: MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
HELLO = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}


class Client:
    """A raw JSON-RPC client of ``python main.py``."""

    def __init__(self, env: dict):
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.n = 0

    def rpc(self, method: str, params: dict | None = None) -> dict:
        self.n += 1
        self.send({"jsonrpc": "2.0", "id": self.n, "method": method, "params": params or {}})
        while True:
            msg = json.loads(self.p.stdout.readline())
            if msg.get("id") == self.n:
                return msg

    def send(self, msg: dict) -> None:
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()

    def rss_mb(self) -> float:
        return psutil.Process(self.p.pid).memory_info().rss / 2**20

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def env(tmp_path) -> dict:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CC_TASKS_")},
        "CC_TASKS_DIR": str(tmp_path / "store"),
        "CC_TASKS_DEPTH": "1",  # a sub-agent's server: nothing imported ahead of a tool call
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


def cache_file(env: dict):
    return front.cache_dir(env) / f"handshake-{front.cache_key()}.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[str, dict]:
    """A cache dir holding what ``python -m cc_tasks.front build`` asked a server of this code (once)."""
    d = tmp_path_factory.mktemp("built-cache")
    env = {**os.environ, "XDG_CACHE_HOME": str(d), "CC_TASKS_DIR": str(d / "store"), "PYTHONPATH": str(ROOT)}
    path = cache_file(env)
    subprocess.run([sys.executable, "-m", "cc_tasks.front", "build", str(path)], env=env, check=True, timeout=90)
    return str(d), json.loads(path.read_text())


@pytest.fixture
def cached_env(env, built) -> tuple[dict, dict]:
    return {**env, "XDG_CACHE_HOME": built[0]}, built[1]


def test_cached_reply_answers_only_what_it_has():
    cache = {MODERN: {"tools/list": {"tools": []}, "server/discover": {"d": 1}}, "2025-06-18": {"initialize": {"i": 1}}}
    assert front.cached_reply(cache, None, {"id": 1, "method": "ping"}) == {}
    assert front.cached_reply(cache, None, {"id": 1, "method": "initialize", "params": HELLO}) == {"i": 1}
    other = {**HELLO, "protocolVersion": "2024-11-05"}
    assert front.cached_reply(cache, None, {"id": 1, "method": "initialize", "params": other}) is None
    assert front.cached_reply(cache, None, {"id": 1, "method": "tools/list", "params": {"_meta": META}}) == {
        "tools": []
    }
    assert front.cached_reply(cache, MODERN, {"id": 1, "method": "tools/list"}) == {"tools": []}
    paged = {"id": 1, "method": "tools/list", "params": {"_meta": META, "cursor": "x"}}
    assert front.cached_reply(cache, None, paged) is None
    assert front.cached_reply(cache, None, {"id": 1, "method": "server/discover", "params": {"_meta": META}}) == {
        "d": 1
    }
    call = {"id": 1, "method": "tools/call", "params": {"_meta": META, "name": "x"}}
    assert front.cached_reply(cache, None, call) is None
    assert front.cached_reply(cache, None, {"method": "notifications/initialized"}) is None


def test_the_cache_key_follows_the_code(tmp_path, monkeypatch):
    key = front.cache_key()
    assert front.cache_key() == key
    monkeypatch.setattr(sys, "executable", "/elsewhere/python3")
    assert front.cache_key() != key


def test_build_caches_both_protocols_as_the_server_answers_them(cached_env):
    env, cache = cached_env
    assert set(cache[MODERN]) == {"server/discover", *front.LISTS}
    assert set(cache["2025-06-18"]) == {"initialize", *front.LISTS}
    assert cache["2025-06-18"]["initialize"]["serverInfo"]["name"] == "cc-tasks"
    env0 = {**env, "CC_TASKS_FAST_HANDSHAKE": "0"}
    c = Client(env0)
    try:
        for method in ("server/discover", "tools/list"):
            assert c.rpc(method, {"_meta": META})["result"] == cache[MODERN][method]
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["session", "stateless"])
def test_the_handshake_comes_from_the_cache_and_a_tool_call_hands_over(cached_env, protocol):
    env, cache = cached_env
    c = Client(env)
    try:
        if protocol == "session":
            r = c.rpc("initialize", HELLO)
            assert r["result"] == cache["2025-06-18"]["initialize"]
            c.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            params: dict = {}
        else:
            params = {"_meta": META}
            assert c.rpc("server/discover", params)["result"] == cache[MODERN]["server/discover"]
        tools = c.rpc("tools/list", params)["result"]["tools"]
        assert {"start_cc_task_async", "check_task_status"} <= {t["name"] for t in tools}
        assert c.rpc("ping")["result"] == {}
        # Nothing of the server is imported yet: a bare interpreter's memory, not FastMCP's (~85 MB).
        assert c.rss_mb() < 40
        info = c.rpc("tools/call", {**params, "name": "get_server_info", "arguments": {}})
        assert not info["result"].get("isError"), info
        assert info["result"]["structuredContent"]["store_dir"] == env["CC_TASKS_DIR"]
        assert c.rss_mb() > 60
        missing = c.rpc("tools/call", {**params, "name": "check_task_status", "arguments": {"task_id": "nope"}})
        assert missing["result"]["isError"]
    finally:
        c.close()


def test_a_first_start_without_a_cache_serves_and_builds_one(env):
    c = Client(env)
    try:
        r = c.rpc("initialize", HELLO)
        assert r["result"]["serverInfo"]["name"] == "cc-tasks"
        c.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert c.rpc("tools/list")["result"]["tools"]
    finally:
        c.close()
    path = cache_file(env)
    deadline = time.monotonic() + 60  # the build runs detached from the server (Claude Code may stop it)
    while time.monotonic() < deadline and (not path.exists() or path.with_name(path.name + ".lock").exists()):
        time.sleep(0.1)
    cache = json.loads(path.read_text())
    assert MODERN in cache and "initialize" in cache["2025-06-18"]


def test_a_bad_line_is_the_servers_to_answer(cached_env):
    env, _ = cached_env
    c = Client(env)
    try:
        c.p.stdin.write(b"this is not json\n")
        c.p.stdin.flush()
        r = c.rpc("initialize", HELLO)
        assert r["result"]["serverInfo"]["name"] == "cc-tasks"
    finally:
        c.close()


def test_a_second_initialize_goes_to_the_server_and_no_reply_of_the_front_leaks(cached_env):
    env, _ = cached_env
    c = Client(env)
    try:
        assert c.rpc("initialize", HELLO)["result"]["serverInfo"]["name"] == "cc-tasks"
        again = c.rpc("initialize", HELLO)
        assert again["id"] == 2  # (the server's own answer, whatever it says)
        c.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert c.rpc("tools/list")["result"]["tools"]
    finally:
        c.p.stdin.close()
        rest = c.p.stdout.read().decode()
        c.p.wait(15)
    assert "cc-tasks-front-" not in rest


def test_a_server_that_cannot_start_answers_every_request_with_why(cached_env, tmp_path):
    env, _ = cached_env
    env = {**env, "CC_TASKS_BACKEND": "nats://127.0.0.1:1/x", "CC_TASKS_NATS_CREDS": str(tmp_path / "missing.creds")}
    c = Client(env)
    try:
        assert c.rpc("server/discover", {"_meta": META})["result"]  # (the handshake comes from the cache)
        r = c.rpc("tools/call", {"_meta": META, "name": "get_server_info", "arguments": {}})
        assert r["error"]["message"].startswith("cc-tasks cannot start:") and "missing.creds" in r["error"]["message"]
        r = c.rpc("tools/call", {"_meta": META, "name": "list_active_tasks", "arguments": {}})
        assert "cannot start" in r["error"]["message"]
    finally:
        c.close()
    assert c.p.returncode == 2


def test_the_cache_is_read_only_from_a_private_folder_and_in_its_own_shape(tmp_path):
    loose = tmp_path / "loose"
    (loose / "cc-tasks").mkdir(parents=True)
    (loose / "cc-tasks").chmod(0o777)
    assert front.private_cache_dir({"XDG_CACHE_HOME": str(loose)}) is None
    assert front.private_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "fresh")}) == tmp_path / "fresh" / "cc-tasks"
    bad = tmp_path / "bad.json"
    for text in ('{"2025-06-18": "x"}', "[1]", "{", '{"v": {"tools/list": 3}}'):
        bad.write_text(text)
        assert front.load_cache(bad) == {}
    bad.write_text('{"v": {"tools/list": {"tools": []}}}')
    assert front.load_cache(bad) == {"v": {"tools/list": {"tools": []}}}


def test_saving_the_cache_keeps_it_private_and_drops_other_versions(tmp_path):
    old = tmp_path / "handshake-old.json"
    old.write_text("{}")
    path = tmp_path / "handshake-new.json"
    front.save_cache(path, {"v": {"tools/list": {"tools": []}}})
    assert json.loads(path.read_text()) == {"v": {"tools/list": {"tools": []}}}
    assert path.stat().st_mode & 0o777 == 0o600 and not old.exists()


def test_bad_settings_refuse_to_start(tmp_path):
    for change, message in (
        ({"CC_TASKS_FAST_HANDSHAKE": "false"}, "CC_TASKS_FAST_HANDSHAKE='false'"),
        ({"CC_TASKS_BACKEND": str(tmp_path / "loose")}, "group- or world-writable"),
    ):
        (tmp_path / "loose").mkdir(exist_ok=True)
        (tmp_path / "loose").chmod(0o777)
        env = {**os.environ, "CC_TASKS_DIR": str(tmp_path / "store"), **change}
        r = subprocess.run([sys.executable, str(ROOT / "main.py")], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
