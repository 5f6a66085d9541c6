#!/usr/bin/env python3
"""The figures of the issue "Lean": cc-tasks beside a minimal FastMCP server (one tool), the floor the design
cannot go under, measured in the same run, alternating rounds.

    .venv/bin/python bench/lean.py [--rounds 7] [--calls 300]

Prints JSON (and writes bench/lean.json): spawn -> initialize reply (median), RSS after the handshake and a
few calls, ping / check_task_status / start_cc_task_async round trips (p50, raw JSON-RPC client), the size of
a check_task_status reply (structured + text), and the store's worker at rest (RSS).
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
           "CC_TASKS_WORKER_IDLE": "30"}  # fmt: skip
    ours_argv, floor_argv = [sys.executable, str(ROOT / "main.py")], [sys.executable, str(minimal)]
    start = {"floor": [], "cc_tasks": []}
    for _ in range(args.rounds):  # alternating, so that a slow minute hits both
        for name, argv in (("floor", floor_argv), ("cc_tasks", ours_argv)):
            s = Server(argv, env)
            start[name].append(s.startup)
            s.close()
    floor, ours = Server(floor_argv, env), Server(ours_argv, env)
    try:
        for s in (floor, ours):
            s.rpc("tools/list")
        floor_ping = floor.timed("ping", None, args.calls)
        floor.rpc("tools/call", {"name": "echo", "arguments": {"text": "x"}})
        ping = ours.timed("ping", None, args.calls)
        work = str(tmp)
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
        time.sleep(2)  # (the worker finishes the started tasks; a rest, not a synchronisation)
        store = TaskStore(tmp / "store")
        hello = store.worker_hello() or {}
        worker_rss = round(psutil.Process(hello["pid"]).memory_info().rss / 2**20, 1) if hello.get("pid") else None
        result = {
            "spawn_to_initialize_s": {
                "floor": round(statistics.median(start["floor"]), 3),
                "cc_tasks": round(statistics.median(start["cc_tasks"]), 3),
            },  # fmt: skip
            "rss_mb": {"floor": floor.rss_mb(), "cc_tasks": ours.rss_mb(), "worker_at_rest": worker_rss},
            "p50_ms": {
                "floor_ping": floor_ping,
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
