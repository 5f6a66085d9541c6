#!/usr/bin/env python3
"""The figures of the issue "Lean": cc-tasks beside a minimal FastMCP server (one tool), the floor the design
cannot go under, measured in the same run, alternating rounds.

    .venv/bin/python bench/lean.py [--rounds 7] [--calls 300]

Prints JSON (and writes bench/lean.json), medians: spawn -> initialize reply (cc-tasks with its handshake
cache, as every start after the first of a version; and without it, CC_TASKS_FAST_HANDSHAKE=0); spawn ->
first tool reply (the floor's echo; cc-tasks' get_server_info at depth 0, where the server is imported in the
background meanwhile, and in a sub-agent, where the call waits for the import); RSS after the handshake and
a few calls; ping / a tool call of the floor / check_task_status / start_cc_task_async round trips (p50, raw
JSON-RPC client); the size of a check_task_status reply (structured + text); the store's worker RSS fresh at
rest, after 101 tasks, and with 20 tasks running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cc_tasks import front  # noqa: E402
from cc_tasks.store import TaskStore  # noqa: E402

FAKE = ROOT / "bench" / "fake_claude.sh"
MINIMAL = """
from fastmcp import FastMCP
mcp = FastMCP("minimal")
@mcp.tool
def echo(text: str) -> str:
    return text
mcp.run(show_banner=False)
"""
HELLO = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench-lean", "version": "1"}}


class Server:
    """A stdio MCP server process and a raw JSON-RPC client for it."""

    def __init__(self, argv: list[str], env: dict):
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env=env, cwd=str(ROOT))  # fmt: skip
        self.n = 0
        self.last_reply = ""
        self.rpc("initialize", HELLO)
        self.startup = time.perf_counter() - self.t0
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, msg: dict) -> None:
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()

    def rpc(self, method: str, params: dict | None = None) -> dict:
        self.n += 1
        self.send({"jsonrpc": "2.0", "id": self.n, "method": method, **({"params": params} if params else {})})
        while True:
            line = self.p.stdout.readline()
            msg = json.loads(line)
            if msg.get("id") == self.n:
                self.last_reply = line.decode()
                return msg.get("result", {})

    def timed(self, method: str, params: dict | None, n: int) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.rpc(method, params)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 3)

    def rss_mb(self) -> float:
        return round(psutil.Process(self.p.pid).memory_info().rss / 2**20, 1)

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def first_call(argv: list[str], env: dict, tool: str, args: dict) -> float:
    """Spawn -> initialize -> tools/list -> the first tool call's reply, in seconds."""
    s = Server(argv, env)
    s.rpc("tools/list")
    s.rpc("tools/call", {"name": tool, "arguments": args})
    elapsed = time.perf_counter() - s.t0
    s.close()
    return elapsed


def worker_rss(store: TaskStore) -> float | None:
    hello = store.worker_hello() or {}
    return round(psutil.Process(hello["pid"]).memory_info().rss / 2**20, 1) if hello.get("pid") else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "lean.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-lean-"))
    minimal = tmp / "minimal.py"
    minimal.write_text(MINIMAL)
    env = {**os.environ, "CC_TASKS_DIR": str(tmp / "store"), "CC_TASKS_CLAUDE_BIN": str(FAKE),
           "CC_TASKS_WORKER_IDLE": "60", "CC_TASKS_MAX_CONCURRENT": "20", "XDG_CACHE_HOME": str(tmp / "cache")}  # fmt: skip
    os.environ.update(env)  # (the store's worker, started from here too, gets the same settings)
    ours_argv, floor_argv = [sys.executable, str(ROOT / "main.py")], [sys.executable, str(minimal)]
    # The handshake cache, as the first server of this code builds it (once per version, in the background).
    cache = tmp / "cache" / "cc-tasks" / f"handshake-{front.cache_key()}.json"
    subprocess.run([sys.executable, "-m", "cc_tasks.front", "build", str(cache)], env={**env, "PYTHONPATH": str(ROOT)},
                   check=True, timeout=120)  # fmt: skip
    start = {"floor": [], "cc_tasks": [], "cc_tasks_no_cache": []}
    call = {"floor": [], "cc_tasks": [], "cc_tasks_sub_agent": []}
    no_cache = {**env, "CC_TASKS_FAST_HANDSHAKE": "0"}
    sub_agent = {**env, "CC_TASKS_DEPTH": "1"}
    for _ in range(args.rounds):  # alternating, so that a slow minute hits both
        for name, argv, e in (
            ("floor", floor_argv, env),
            ("cc_tasks", ours_argv, env),
            ("cc_tasks_no_cache", ours_argv, no_cache),
        ):
            s = Server(argv, e)
            start[name].append(s.startup)
            s.close()
        call["floor"].append(first_call(floor_argv, env, "echo", {"text": "x"}))
        call["cc_tasks"].append(first_call(ours_argv, env, "get_server_info", {}))
        call["cc_tasks_sub_agent"].append(first_call(ours_argv, sub_agent, "get_server_info", {}))
    floor, ours = Server(floor_argv, env), Server(ours_argv, env)
    store = TaskStore(tmp / "store")
    try:
        for s in (floor, ours):
            s.rpc("tools/list")
        floor_ping = floor.timed("ping", None, args.calls)
        floor_call = floor.timed("tools/call", {"name": "echo", "arguments": {"text": "x"}}, args.calls)
        front_ping = ours.timed("ping", None, args.calls)  # (answered by the front)
        work = str(tmp)
        ours.rpc("tools/call", {"name": "get_server_info", "arguments": {}})  # (hands over to the server)
        ping = ours.timed("ping", None, args.calls)  # (answered by FastMCP)
        store.nudge()  # the store's worker, fresh
        time.sleep(3)  # (a rest, not a synchronisation: the worker at rest)
        worker_fresh = worker_rss(store)
        started = ours.rpc(
            "tools/call", {"name": "start_cc_task_async", "arguments": {"prompt": "sleep=0\n", "cwd": work}}
        )
        task_id = started["structuredContent"]["task_id"]
        ours.rpc("tools/call", {"name": "wait_for_tasks", "arguments": {"task_ids": [task_id], "timeout_seconds": 60}})
        status = ours.timed("tools/call", {"name": "check_task_status", "arguments": {"task_id": task_id}}, args.calls)
        reply = json.loads(ours.last_reply)["result"]
        reply_chars = len(json.dumps(reply.get("structuredContent", {}))) + sum(
            len(b.get("text", "")) for b in reply.get("content", []))  # fmt: skip
        start_ms = ours.timed("tools/call", {"name": "start_cc_task_async",
                                             "arguments": {"prompt": "sleep=0\n", "cwd": work}}, 100)  # fmt: skip
        time.sleep(3)  # (the worker finishes the started tasks)
        worker_after = worker_rss(store)
        ids = [
            ours.rpc("tools/call", {"name": "start_cc_task_async", "arguments": {"prompt": "sleep=6\n", "cwd": work}})[
                "structuredContent"
            ]["task_id"]
            for _ in range(20)
        ]
        time.sleep(3)  # (all 20 running: the cap is 20)
        running = sum(1 for i in ids if store.read(i).status.value == "running")
        worker_running = worker_rss(store)
        result = {
            "spawn_to_initialize_s": {k: round(statistics.median(v), 3) for k, v in start.items()},
            "spawn_to_first_tool_reply_s": {k: round(statistics.median(v), 3) for k, v in call.items()},
            "rss_mb": {
                "floor": floor.rss_mb(),
                "cc_tasks": ours.rss_mb(),
                "worker_at_rest": worker_fresh,
                "worker_after_101_tasks": worker_after,
                "worker_with_running": worker_running,
                "running": running,
            },  # fmt: skip
            "p50_ms": {
                "floor_ping": floor_ping,
                "floor_tool_call": floor_call,
                "front_ping": front_ping,
                "ping": ping,
                "check_task_status": status,
                "start_cc_task_async": start_ms,
            },  # fmt: skip
            "check_task_status_reply_chars": reply_chars,
            "rounds": args.rounds,
            "calls": args.calls,
        }
        store.stop_worker()
    finally:
        floor.close()
        ours.close()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
