#!/usr/bin/env python3
"""Sub-agents that never use cc-tasks (the issue "Lean"): N trivial real-CLI sub-agents in parallel, started
with the argv and environment a cc-tasks worker gives them (``command.build_argv``/``servers_to_deny``, the
prompt on stdin), against the mock Messages API, alternating rounds of:

- ``not_registered``: cc-tasks is not registered with Claude Code (the baseline);
- ``registered_max_depth``: registered at user scope, sub-agents at CC_TASKS_MAX_DEPTH (may not start tasks:
  the worker keeps claude from starting cc-tasks, ``deniedMcpServers``);
- ``registered_may_nest``: registered at user scope, sub-agents one level down (may start tasks: cc-tasks'
  server starts, its front answers the handshake from its cache);
- ``null_server``: a stdlib MCP server with no tools registered instead (bench/null_mcp.py): what any
  registered stdio server costs Claude Code at the least.

    .venv/bin/python bench/subagents.py [--agents 20] [--rounds 5]

Prints JSON (and writes bench/subagents.json): per mode the median wall time of a round (all N finished)
and the median CPU seconds of a round (claude, its MCP servers and all they started), and each mode's ratios
to ``not_registered``. One round of each mode first warms up (not counted); the bench then waits for the
handshake cache the first server of this code builds in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = ROOT / "tools" / "claude-cli" / "node_modules" / ".bin" / "claude"
sys.path.insert(0, str(ROOT))

from cc_tasks.command import build_argv, servers_to_deny  # noqa: E402
from cc_tasks.models import TaskOptions  # noqa: E402
from tests.mock_anthropic import MockServer  # noqa: E402

MODES = {  # mode: (what is registered, CC_TASKS_DEPTH of the sub-agents)
    "not_registered": (None, "1"),
    "registered_max_depth": ([sys.executable, str(ROOT / "main.py")], "2"),
    "registered_may_nest": ([sys.executable, str(ROOT / "main.py")], "1"),
    "null_server": ([sys.executable, str(ROOT / "bench" / "null_mcp.py")], "1"),
}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_round(n: int, env: dict, cwd: Path) -> tuple[float, float]:
    cpu0, t0 = children_cpu(), time.perf_counter()
    argv = build_argv(TaskOptions(prompt="say hi"), str(CLAUDE), deny_servers=servers_to_deny(env))
    prompt = cwd / "prompt.txt"  # (claude reads its prompt from stdin, as under cc-tasks)
    prompt.write_text("say hi")
    procs = []
    for _ in range(n):
        with prompt.open("rb") as stdin:
            procs.append(
                subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
    for p in procs:
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise SystemExit(f"claude failed ({p.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - t0, children_cpu() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "subagents.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-subagents-"))
    with MockServer() as mock:
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CC_TASKS_", "CLAUDE"))},
            "ANTHROPIC_BASE_URL": mock.url,
            "ANTHROPIC_API_KEY": "bench-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "IS_SANDBOX": "1",
            "CC_TASKS_DIR": str(tmp / "store"),
        }
        envs = {}
        for mode, (server, depth) in MODES.items():
            home = tmp / mode
            home.mkdir()
            envs[mode] = {**base, "HOME": str(home), "CC_TASKS_DEPTH": depth}
            if server:
                add = [str(CLAUDE), "mcp", "add", "--scope", "user", "cc-tasks", "--", *server]
                subprocess.run(add, env=envs[mode], check=True, capture_output=True, timeout=60)
        work = tmp / "work"
        work.mkdir()
        for mode in envs:  # warm-up, not counted
            one_round(args.agents, envs[mode], work)
        deadline = time.monotonic() + 120  # the first server of this code builds the handshake cache
        for mode in ("registered_max_depth", "registered_may_nest"):
            cache = tmp / mode / ".cache" / "cc-tasks"
            while time.monotonic() < deadline and list(cache.glob("*.lock")):
                time.sleep(0.5)
        wall: dict[str, list[float]] = {m: [] for m in envs}
        cpu: dict[str, list[float]] = {m: [] for m in envs}
        for _ in range(args.rounds):
            for mode, env in envs.items():
                w, c = one_round(args.agents, env, work)
                wall[mode].append(round(w, 3))
                cpu[mode].append(round(c, 3))
    med = {
        m: {"wall_s": round(statistics.median(wall[m]), 3), "cpu_s": round(statistics.median(cpu[m]), 3)} for m in envs
    }
    base_wall, base_cpu = med["not_registered"]["wall_s"], med["not_registered"]["cpu_s"]
    for m in med:
        med[m]["wall_ratio"] = round(med[m]["wall_s"] / base_wall, 3)
        med[m]["cpu_ratio"] = round(med[m]["cpu_s"] / base_cpu, 3)
    result = {
        **med,
        "agents": args.agents,
        "rounds": args.rounds,
        "walls": wall,
        "cpus": cpu,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
