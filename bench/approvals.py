#!/usr/bin/env python3
"""What the approval server costs a sub-agent that asks nothing (a plain text answer: the cost every task with
``approvals: "ask"``, the default, pays): N sequential real-CLI sub-agents per round against the mock Messages
API, alternating rounds of ``approvals: "deny"`` (the baseline: no approval server) and ``"ask"`` (claude starts
cc_tasks/approve.py as an MCP server, with ``--permission-prompt-tool``), measured two ways:

- ``direct``: claude run by this process with the argv and environment a worker builds
  (``command.build_argv``/``build_env``; for "ask", ``approval_server`` is a real ``ApprovalDesk``'s
  ``server_config()``, its socket listening, nothing asking): claude's start-up cost alone;
- ``e2e``: tasks through a ``TaskManager`` on a temporary store (``execute``: submit, the store's worker
  claims it, opens the desk, runs claude, the final record), one at a time.

Also the approval server's own start: spawn ``python -I -S cc_tasks/approve.py`` -> the reply to one
``server/discover`` line, against a bare ``python -I -S -c pass`` (spawn -> exit), alternating, medians.

    .venv/bin/python bench/approvals.py            # 10 sub-agents a round, 5 rounds (e2e: 3), ~4 min
    .venv/bin/python bench/approvals.py --quick    # 2 sub-agents, 1 round (proves it works)

Per mode: the median over rounds of a round's wall time per sub-agent and CPU seconds per sub-agent (direct:
this process's children, claude and all it started, reaped; this process is a subreaper, so nothing escapes
the count; e2e: the store's worker with its reaped children, from psutil), and ask's ratio to deny and the
difference. One round of each mode first warms up (not counted). Prints a table, writes bench/approvals.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = ROOT / "tools" / "claude-cli" / "node_modules" / ".bin" / "claude"
sys.path.insert(0, str(ROOT))

from cc_tasks import approve, procs  # noqa: E402
from cc_tasks.command import build_argv, build_env, servers_to_deny  # noqa: E402
from cc_tasks.config import Settings  # noqa: E402
from cc_tasks.desk import ApprovalDesk  # noqa: E402
from cc_tasks.manager import TaskManager  # noqa: E402
from cc_tasks.models import Lease, TaskOptions, TaskStatus  # noqa: E402
from cc_tasks.store import TaskStore  # noqa: E402
from tests.mock_anthropic import MockServer  # noqa: E402

MODES = ("deny", "ask")
PROMPT = "say hi"
console = Console(width=150)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reap_strays(owned: set[int]) -> int:
    """Wait for children no Popen of ours owns (orphans adopted as a subreaper: an MCP server its claude left
    behind), so that their CPU is counted in the round they belong to. How many there were."""
    n = 0
    for c in psutil.Process().children():
        if c.pid in owned:
            continue
        try:
            c.wait(30)
            n += 1
        except (psutil.TimeoutExpired, psutil.NoSuchProcess, ChildProcessError):
            pass
    return n


def check_servers(mode: str, init: dict, who: str) -> None:
    """claude's init line names the approval server, connected (ask), or no MCP server (deny)."""
    servers = {s["name"]: s["status"] for s in init.get("mcp_servers", [])}
    want = {approve.NAME: "connected"} if mode == "ask" else {}
    if servers != want:
        raise SystemExit(f"{who} ({mode}): MCP servers {servers}, expected {want}")


class Direct:
    """claude run directly, one sub-agent at a time, with the worker's argv and environment."""

    def __init__(self, env: dict, cwd: Path, desk: ApprovalDesk):
        self.cwd, self.strays = cwd, 0
        claude = str(CLAUDE.resolve())  # (as Settings.resolve_claude gives the worker)
        self.runs: dict[str, tuple[list[str], dict]] = {}
        for mode in MODES:
            opts = TaskOptions(prompt=PROMPT, approvals=mode)
            run_env = build_env(env, opts, depth=0, task_id=f"bench-{mode}", store_dir=env["CC_TASKS_DIR"])
            server = desk.server_config() if mode == "ask" else None
            argv = build_argv(opts, claude, deny_servers=servers_to_deny(run_env), approval_server=server)
            self.runs[mode] = (argv, run_env)
        self.prompt = cwd / "prompt.txt"  # (claude reads its prompt from stdin, as under cc-tasks)
        self.prompt.write_text(PROMPT)

    def one(self, mode: str) -> None:
        argv, env = self.runs[mode]
        with self.prompt.open("rb") as stdin:
            p = subprocess.Popen(
                argv, cwd=self.cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        out, err = p.communicate(timeout=300)
        if p.returncode != 0:
            raise SystemExit(f"claude ({mode}) failed ({p.returncode}): {err.decode()[-2000:]}")
        check_servers(mode, json.loads(out.splitlines()[0]), "claude")
        self.strays += reap_strays({p.pid})

    def round(self, mode: str, n: int) -> tuple[float, float]:
        cpu0, t0 = children_cpu(), time.perf_counter()
        for _ in range(n):
            self.one(mode)
        return (time.perf_counter() - t0) / n, (children_cpu() - cpu0) / n


class EndToEnd:
    """Tasks through a TaskManager on a temporary store, one at a time; CPU: the store's worker and its children."""

    def __init__(self, work: Path):
        self.work = work
        self.m = TaskManager(Settings.from_env())
        self.files = TaskStore(Path(os.environ["CC_TASKS_DIR"]))
        self.seen: dict[int, float] = {}

    def worker_cpu(self) -> float:
        """CPU seconds so far of every worker pid seen (its own and its reaped children's: claude, the servers)."""
        pid = (self.m.store.worker_hello() or {}).get("pid")
        for p in {pid, *self.seen} - {None}:
            try:
                t = psutil.Process(p).cpu_times()
                self.seen[p] = t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return sum(self.seen.values())

    async def round(self, mode: str, n: int) -> tuple[float, float]:
        self.m.nudge()  # (a worker is up before the clock starts: its start is not the approval server's)
        cpu0, t0 = self.worker_cpu(), time.perf_counter()
        for _ in range(n):
            r = await self.m.execute(TaskOptions(prompt=PROMPT, cwd=str(self.work), approvals=mode))
            if r.status != TaskStatus.COMPLETED:
                raise SystemExit(f"task {r.task_id} ({mode}): {r.status.value}: {r.error}")
            with self.files.path(r.task_id, "stdout.jsonl").open() as f:  # (claude's init line)
                check_servers(mode, json.loads(f.readline()), f"task {r.task_id}")
        return (time.perf_counter() - t0) / n, (self.worker_cpu() - cpu0) / n

    def close(self) -> None:
        self.m.store.stop_worker()
        self.m.reap(wait=15)


def server_start(reps: int) -> dict:
    """Spawn -> the reply to server/discover of approve.py, against spawn -> exit of a bare python -I -S."""
    approve_argv = [sys.executable, "-I", "-S", approve.__file__]
    bare_argv = [sys.executable, "-I", "-S", "-c", "pass"]
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}).encode() + b"\n"
    env = {"CC_TASKS_APPROVAL_SOCKET": "/nonexistent.sock", "PATH": os.environ.get("PATH", "")}
    times: dict[str, list[float]] = {"approve_first_answer": [], "bare_python": []}
    cpus: dict[str, list[float]] = {"approve_first_answer": [], "bare_python": []}
    for i in range(reps + 1):  # (the first of each warms the page cache: not counted)
        for name in ("approve_first_answer", "bare_python")[:: 1 if i % 2 else -1]:
            c0, t0 = children_cpu(), time.perf_counter()
            if name == "bare_python":
                subprocess.run(bare_argv, env=env, check=True, stdin=subprocess.DEVNULL)
                elapsed = time.perf_counter() - t0
            else:
                p = subprocess.Popen(approve_argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                p.stdin.write(line)
                p.stdin.flush()
                reply = json.loads(p.stdout.readline())
                elapsed = time.perf_counter() - t0
                assert reply["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == approve.NAME, reply
                p.stdin.close()
                p.wait(10)
            if i:
                times[name].append(elapsed)
                cpus[name].append(children_cpu() - c0)
    out = {f"{k}_ms": round(statistics.median(v) * 1000, 2) for k, v in times.items()}
    out.update({f"{k}_cpu_ms": round(statistics.median(v) * 1000, 2) for k, v in cpus.items()})
    out["added_ms"] = round(out["approve_first_answer_ms"] - out["bare_python_ms"], 2)
    out["reps"] = reps
    return out


def summarise(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict:
    med = {
        m: {"wall_s": round(statistics.median(wall[m]), 4), "cpu_s": round(statistics.median(cpu[m]), 4)} for m in MODES
    }
    d, a = med["deny"], med["ask"]
    return {
        **med,
        "wall_ratio": round(a["wall_s"] / d["wall_s"], 3),
        "cpu_ratio": round(a["cpu_s"] / d["cpu_s"], 3),
        "wall_added_ms": round((a["wall_s"] - d["wall_s"]) * 1000, 1),
        "cpu_added_ms": round((a["cpu_s"] - d["cpu_s"]) * 1000, 1),
        "rounds_wall_s": {m: [round(x, 4) for x in wall[m]] for m in MODES},
        "rounds_cpu_s": {m: [round(x, 4) for x in cpu[m]] for m in MODES},
    }


def alternate(r: int) -> tuple[str, ...]:
    return MODES if r % 2 == 0 else MODES[::-1]


def main() -> int:
    ap = argparse.ArgumentParser(description="The approval server's cost per sub-agent: approvals ask against deny")
    ap.add_argument("--quick", action="store_true", help="2 sub-agents, 1 round, 5 server starts")
    ap.add_argument("--agents", type=int, default=10, help="sequential sub-agents per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (direct)")
    ap.add_argument("--e2e-rounds", type=int, default=3, help="alternating rounds through a TaskManager (0: none)")
    ap.add_argument("--starts", type=int, default=20, help="approval server starts (and bare python starts) to time")
    ap.add_argument("--out", default=str(ROOT / "bench" / "approvals.json"))
    args = ap.parse_args()
    if args.quick:
        args.agents, args.rounds, args.e2e_rounds, args.starts = 2, 1, min(args.e2e_rounds, 1), 5
    procs.become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-approvals-"))
    work, home = tmp / "work", tmp / "home"
    work.mkdir()
    home.mkdir()
    results: dict = {"agents": args.agents, "rounds": args.rounds, "e2e_rounds": args.e2e_rounds, "quick": args.quick}
    results["server_start"] = server_start(args.starts)
    with MockServer() as mock:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CC_TASKS_", "CLAUDE"))},
            "HOME": str(home),
            "ANTHROPIC_BASE_URL": mock.url,
            "ANTHROPIC_API_KEY": "bench-key",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "IS_SANDBOX": "1",
            "CC_TASKS_DIR": str(tmp / "store"),
            "CC_TASKS_CLAUDE_BIN": str(CLAUDE),
            "CC_TASKS_DEFAULT_TIMEOUT": "120",
            "CC_TASKS_WORKER_IDLE": "600",
        }
        desk = ApprovalDesk(None, Lease(task_id="bench", worker="bench", epoch=1), [], 600)
        try:
            direct = Direct(env, work, desk)
            for mode in MODES:  # warm-up, not counted
                direct.round(mode, 1)
            wall: dict[str, list[float]] = {m: [] for m in MODES}
            cpu: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                for mode in alternate(r):
                    w, c = direct.round(mode, args.agents)
                    wall[mode].append(w)
                    cpu[mode].append(c)
            results["direct"] = {**summarise(wall, cpu), "strays_reaped": direct.strays}
        finally:
            desk.close()
        if args.e2e_rounds:
            os.environ.clear()
            os.environ.update(env)  # (the store's worker, started from here, and its tasks get this environment)
            e2e = EndToEnd(work)
            try:

                async def run() -> dict:
                    for mode in MODES:  # warm-up: the worker, caches
                        await e2e.round(mode, 1)
                    wall = {m: [] for m in MODES}
                    cpu = {m: [] for m in MODES}
                    for r in range(args.e2e_rounds):
                        for mode in alternate(r):
                            w, c = await e2e.round(mode, args.agents)
                            wall[mode].append(w)
                            cpu[mode].append(c)
                    return summarise(wall, cpu)

                results["e2e"] = asyncio.run(run())
            finally:
                e2e.close()
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title=f"per sub-agent that asks nothing: approvals ask vs deny ({args.agents} sequential a round)")
    for title in ("measure", "rounds", "deny", "ask", "ratio", "added"):
        table.add_column(title, justify="right")
    for way, label in (("direct", "claude direct"), ("e2e", "TaskManager")):
        if way not in results:
            continue
        f, n = results[way], args.rounds if way == "direct" else args.e2e_rounds
        table.add_row(f"{label}: wall s", str(n), f"{f['deny']['wall_s']:.3f}", f"{f['ask']['wall_s']:.3f}",
                      f"{f['wall_ratio']:.3f}", f"{f['wall_added_ms']:+.0f} ms")  # fmt: skip
        table.add_row(f"{label}: CPU s", str(n), f"{f['deny']['cpu_s']:.3f}", f"{f['ask']['cpu_s']:.3f}",
                      f"{f['cpu_ratio']:.3f}", f"{f['cpu_added_ms']:+.0f} ms")  # fmt: skip
    s = results["server_start"]
    table.add_row("approve.py spawn -> first answer ms (vs bare python -I -S start)", str(s["reps"]),
                  f"{s['bare_python_ms']:.1f}", f"{s['approve_first_answer_ms']:.1f}",
                  f"{s['approve_first_answer_ms'] / s['bare_python_ms']:.2f}", f"{s['added_ms']:+.1f} ms")  # fmt: skip
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
