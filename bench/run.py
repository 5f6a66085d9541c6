#!/usr/bin/env python3
"""Benchmarks: cc-tasks driven as a real stdio server through a real MCP client, each figure beside its
baseline measured in the same run. Prints a table and writes bench/results.json.

    .venv/bin/python bench/run.py            # full counts (a few minutes)
    .venv/bin/python bench/run.py --quick    # small counts, only to prove it works (CI)

Needs scripts/bootstrap.sh to have run (the pinned claude CLI). Offline: the real CLI talks to the mock
Anthropic API of the tests on loopback; bench/fake_claude.sh stands in for claude where a fast fake is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from rich.console import Console
from rich.table import Table

from cc_tasks.models import MAX_BATCH

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cc_tasks import __version__  # noqa: E402
from cc_tasks.models import TaskOptions, TaskRecord, TaskRequest, TaskStatus  # noqa: E402
from cc_tasks.store import TaskStore, new_task_id  # noqa: E402

REAL_CLAUDE = ROOT / "tools" / "claude-cli" / "node_modules" / ".bin" / "claude"
FAKE = ROOT / "bench" / "fake_claude.sh"
console = Console()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 3)


class RawStdio:
    """A minimal MCP client: JSON-RPC lines over a server's stdio, no schema validation or result
    conversion, so that its timings are the server's round trip (the fastmcp client adds its own work)."""

    def __init__(self, env: dict):
        self.p = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=str(ROOT),
        )
        self.n = 0
        self.rpc(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench-raw", "version": "1"}},
        )
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _send(self, msg: dict) -> None:
        self.p.stdin.write(json.dumps(msg).encode() + b"\n")
        self.p.stdin.flush()

    def rpc(self, method: str, params: dict) -> dict:
        self.n += 1
        self._send({"jsonrpc": "2.0", "id": self.n, "method": method, "params": params})
        while True:
            msg = json.loads(self.p.stdout.readline())
            if msg.get("id") == self.n:
                if "error" in msg or msg.get("result", {}).get("isError"):
                    raise RuntimeError(f"{method}: {msg}")
                return msg["result"]

    def call(self, tool: str, args: dict) -> dict:
        return self.rpc("tools/call", {"name": tool, "arguments": args}).get("structuredContent", {})

    def timed(self, tool: str, args: dict, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.call(tool, args)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        self.p.stdin.close()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-bench-"))
        self.results: dict = {}
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.work = self.tmp / "work"
        self.work.mkdir()
        self.mock = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "mock_anthropic.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.mock_url = self.mock.stdout.readline().strip()
        self.stores = 0

    def close(self):
        self.mock.terminate()
        self.mock.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def env(self, claude: Path, cap: int, store: Path | None = None) -> dict[str, str]:
        self.stores += 1
        return {
            **os.environ,
            "HOME": str(self.home),
            "ANTHROPIC_BASE_URL": self.mock_url,
            "ANTHROPIC_API_KEY": "bench",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "IS_SANDBOX": "1",
            "CC_TASKS_DIR": str(store or self.tmp / f"store-{self.stores}"),
            "CC_TASKS_CLAUDE_BIN": str(claude),
            "CC_TASKS_MAX_CONCURRENT": str(cap),
            "CC_TASKS_WORKER_IDLE": "30",
        }

    @contextlib.asynccontextmanager
    async def server(self, env: dict):
        client = Client(
            StdioTransport(
                command=sys.executable, args=[str(ROOT / "main.py")], env=env, cwd=str(ROOT), keep_alive=False
            )
        )
        async with client:
            info = (await client.call_tool("get_server_info", {})).structured_content
            try:
                yield client, info["pid"]
            finally:
                await self.stop_all(client)
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
                        "from cc_tasks.store import TaskStore;"
                        "TaskStore(Path(sys.argv[2])).stop_worker()",
                        str(ROOT),
                        env["CC_TASKS_DIR"],
                    ],
                    timeout=30,
                )

    async def stop_all(self, c: Client):
        active = (await c.call_tool("list_active_tasks", {"limit": 500})).structured_content["tasks"]
        await asyncio.gather(*(c.call_tool("cancel_task", {"task_id": t["task_id"]}) for t in active))

    async def timed(self, c: Client, tool: str, args: dict, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await c.call_tool(tool, args)
            out.append(time.perf_counter() - t0)
        return out

    def record(self, key: str, **fields):
        self.results[key] = fields
        console.log(key, fields)

    # 1 -------------------------------------------------------------------------------------------------
    async def start_latency(self):
        n = 30 if self.quick else 200
        async with self.server(self.env(FAKE, cap=8)) as (c, _):
            await self.timed(c, "get_server_info", {}, 20)
            first = await c.call_tool("start_cc_task_async", {"prompt": "sleep=0\n", "cwd": str(self.work)})
            await c.call_tool("wait_for_tasks", {"task_ids": [first.structured_content["task_id"]]})
            noop = await self.timed(c, "get_server_info", {}, n)
            starts = await self.timed(c, "start_cc_task_async", {"prompt": "sleep=0\n", "cwd": str(self.work)}, n)
        raw = RawStdio(self.env(FAKE, cap=8))
        try:
            raw.timed("get_server_info", {}, 20)
            warm = raw.call("start_cc_task_async", {"prompt": "sleep=0\n", "cwd": str(self.work)})  # starts the worker
            raw.call("wait_for_tasks", {"task_ids": [warm["task_id"]]})
            raw_noop = raw.timed("get_server_info", {}, n)
            raw_starts = raw.timed("start_cc_task_async", {"prompt": "sleep=0\n", "cwd": str(self.work)}, n)
            for t in raw.call("list_active_tasks", {"limit": 500})["tasks"]:
                raw.call("cancel_task", {"task_id": t["task_id"]})
        finally:
            raw.close()
        self.record(
            "1_start_latency",
            n=n,
            start_p50_ms=ms(pct(starts, 50)),
            start_p99_ms=ms(pct(starts, 99)),
            noop_p50_ms=ms(pct(noop, 50)),
            noop_p99_ms=ms(pct(noop, 99)),
            raw_start_p50_ms=ms(pct(raw_starts, 50)),
            raw_start_p99_ms=ms(pct(raw_starts, 99)),
            raw_noop_p50_ms=ms(pct(raw_noop, 50)),
            raw_noop_p99_ms=ms(pct(raw_noop, 99)),
            target="start p50 <= 5 ms, p99 <= 20 ms",
        )

    # 2 -------------------------------------------------------------------------------------------------
    async def status_latency(self):
        n = 50 if self.quick else 300
        running_n = 5 if self.quick else 20
        env = self.env(FAKE, cap=running_n + 4)
        info_store = env["CC_TASKS_DIR"]
        async with self.server(env) as (c, _):
            done = await c.call_tool("execute_cc_task", {"prompt": "sleep=0\n", "cwd": str(self.work)})
            tid = done.structured_content["task_id"]
            await self.timed(c, "check_task_status", {"task_id": tid}, 10)
            idle = await self.timed(c, "check_task_status", {"task_id": tid}, n)
            ids = [
                (
                    await c.call_tool("start_cc_task_async", {"prompt": "sleep=60\n", "cwd": str(self.work)})
                ).structured_content["task_id"]
                for _ in range(running_n)
            ]
            while (
                sum(
                    t["status"] == "running"
                    for t in (await c.call_tool("list_active_tasks", {})).structured_content["tasks"]
                )
                < running_n
            ):
                await asyncio.sleep(0.05)
            busy = await self.timed(c, "check_task_status", {"task_id": ids[0]}, n)
            raw = RawStdio(self.env(FAKE, cap=running_n + 4, store=Path(info_store)))
            try:
                raw.timed("check_task_status", {"task_id": tid}, 10)
                raw_idle = raw.timed("check_task_status", {"task_id": tid}, n)
                raw_busy = raw.timed("check_task_status", {"task_id": ids[0]}, n)
            finally:
                raw.close()
            await self.stop_all(c)
            ex = asyncio.create_task(c.call_tool("execute_cc_task", {"prompt": "sleep=30\n", "cwd": str(self.work)}))
            while not (await c.call_tool("list_active_tasks", {})).structured_content["tasks"]:
                await asyncio.sleep(0.02)
            running = (await c.call_tool("list_active_tasks", {})).structured_content["tasks"][0]["task_id"]
            during = await self.timed(c, "check_task_status", {"task_id": running}, n)
            await c.call_tool("cancel_task", {"task_id": running})
            with contextlib.suppress(Exception):
                await ex
        self.record(
            "2_status_latency",
            n=n,
            running_tasks=running_n,
            idle_p50_ms=ms(pct(idle, 50)),
            idle_p99_ms=ms(pct(idle, 99)),
            with_running_p50_ms=ms(pct(busy, 50)),
            with_running_p99_ms=ms(pct(busy, 99)),
            during_execute_p50_ms=ms(pct(during, 50)),
            during_execute_p99_ms=ms(pct(during, 99)),
            raw_idle_p50_ms=ms(pct(raw_idle, 50)),
            raw_idle_p99_ms=ms(pct(raw_idle, 99)),
            raw_with_running_p50_ms=ms(pct(raw_busy, 50)),
            raw_with_running_p99_ms=ms(pct(raw_busy, 99)),
            target="p50 <= 2 ms, p99 <= 10 ms in every case",
        )

    # 3 -------------------------------------------------------------------------------------------------
    async def direct_parallel(self, env: dict, prompts: list[str]) -> float:
        t0 = time.perf_counter()
        procs = [
            await asyncio.create_subprocess_exec(
                str(REAL_CLAUDE),
                "-p",
                "--output-format=stream-json",
                "--verbose",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=str(self.work),
                env=env,
            )
            for _ in prompts
        ]
        await asyncio.gather(*(p.communicate(pr.encode()) for p, pr in zip(procs, prompts)))
        assert all(p.returncode == 0 for p in procs)
        return time.perf_counter() - t0

    async def via_server(self, c: Client, prompts: list[str]) -> float:
        t0 = time.perf_counter()
        ids = [
            (await c.call_tool("start_cc_task_async", {"prompt": p, "cwd": str(self.work)})).structured_content[
                "task_id"
            ]
            for p in prompts
        ]
        res = await c.call_tool("wait_for_tasks", {"task_ids": ids, "timeout_seconds": 600}, timeout=650)
        elapsed = time.perf_counter() - t0
        assert all(t["status"] == "completed" for t in res.structured_content["tasks"]), res.structured_content
        return elapsed

    async def parallel_real(self):
        n, rounds = (5, 1) if self.quick else (20, 9)
        env = self.env(REAL_CLAUDE, cap=n)
        prompts = [f"parallel benchmark task {i}" for i in range(n)]
        direct, ours, cpu = [], [], []
        async with self.server(env) as (c, server_pid):
            await self.via_server(c, prompts[:2])  # warm-up: worker, caches
            await self.direct_parallel(env, prompts[:2])
            store, seen = TaskStore(Path(env["CC_TASKS_DIR"])), {}

            def own_cpu() -> float:
                """The server's and the store's worker's own CPU seconds so far (not their children's), summed
                over every worker pid seen (an idle worker may exit and another start)."""
                pids = {server_pid, (store.worker_hello() or {}).get("pid")} - {None}
                for pid in pids | set(seen):
                    try:
                        t = psutil.Process(pid).cpu_times()
                        seen[pid] = t.user + t.system
                    except psutil.NoSuchProcess:
                        pass
                return sum(seen.values())

            for r in range(rounds):
                if r % 2 == 0:
                    direct.append(await self.direct_parallel(env, prompts))
                c0 = own_cpu()
                ours.append(await self.via_server(c, prompts))
                cpu.append(own_cpu() - c0)
                if r % 2 == 1:
                    direct.append(await self.direct_parallel(env, prompts))
        self.record(
            "3_parallel_real_cli",
            tasks=n,
            rounds=rounds,
            direct_s=[round(x, 3) for x in direct],
            server_s=[round(x, 3) for x in ours],
            server_and_worker_cpu_s=[round(x, 3) for x in cpu],
            cpu_s=round(statistics.median(cpu), 3),
            ratio=round(statistics.median(ours) / statistics.median(direct), 3),
            target="ratio <= 1.05; server + worker < 0.5 CPU-s",
        )

    # 4 -------------------------------------------------------------------------------------------------
    async def many_short(self):
        n = 60 if self.quick else 500
        t0 = time.perf_counter()
        subprocess.run(
            f"seq {n} | xargs -P8 -I{{}} sh -c 'printf \"sleep=0.05\\n\" | {FAKE} > /dev/null'", shell=True, check=True
        )
        direct = time.perf_counter() - t0
        tasks = [{"prompt": "sleep=0.05\n", "cwd": str(self.work)} for _ in range(n)]
        raw = RawStdio(self.env(FAKE, cap=8))  # the server's own time
        try:
            raw.call("execute_cc_task", {"prompt": "sleep=0\n", "cwd": str(self.work)})  # warm worker
            t0 = time.perf_counter()
            ids = [
                t["task_id"]
                for i in range(0, n, MAX_BATCH)
                for t in raw.call("start_cc_tasks_batch", {"tasks": tasks[i : i + MAX_BATCH]})["tasks"]
            ]
            for i in range(0, n, 200):
                res = raw.call("wait_for_tasks", {"task_ids": ids[i : i + 200], "timeout_seconds": 900})
                assert res["done"] and all(t["status"] == "completed" for t in res["tasks"])
            ours = time.perf_counter() - t0
        finally:
            raw.close()
        async with self.server(self.env(FAKE, cap=8)) as (c, _):  # the same through the fastmcp client
            await c.call_tool("execute_cc_task", {"prompt": "sleep=0\n", "cwd": str(self.work)})
            t0 = time.perf_counter()
            ids = []
            for i in range(0, n, MAX_BATCH):
                batch = await c.call_tool("start_cc_tasks_batch", {"tasks": tasks[i : i + MAX_BATCH]})
                ids += [t["task_id"] for t in batch.structured_content["tasks"]]
            for i in range(0, n, 200):
                res = (
                    await c.call_tool(
                        "wait_for_tasks", {"task_ids": ids[i : i + 200], "timeout_seconds": 900}, timeout=950
                    )
                ).structured_content
                assert res["done"] and all(t["status"] == "completed" for t in res["tasks"])
            client = time.perf_counter() - t0
        self.record(
            "4_many_short_tasks",
            tasks=n,
            concurrency=8,
            direct_xargs_s=round(direct, 3),
            server_s=round(ours, 3),
            ratio=round(ours / direct, 3),
            fastmcp_client_s=round(client, 3),
            fastmcp_client_ratio=round(client / direct, 3),
            target="ratio <= 1.25",
        )

    # 5 -------------------------------------------------------------------------------------------------
    def fill_store(self, path: Path, n: int) -> str:
        store = TaskStore(path)
        last = ""
        for i in range(n):
            r = TaskRecord(
                task_id=new_task_id(),
                cwd=str(self.work),
                timeout_seconds=60,
                result=f"result {i}",
                result_chars=8,
                exit_code=0,
                is_error=False,
            )
            store.submit(r, TaskRequest(options=TaskOptions(prompt="x"), cwd=str(self.work), claude_bin=str(FAKE)))
            store.transition(r.task_id, TaskStatus.RUNNING)
            store.transition(r.task_id, TaskStatus.COMPLETED)
            last = r.task_id
        return last

    async def big_store(self):
        big_n = 1000 if self.quick else 10_000
        n = 50 if self.quick else 200
        out = {}
        for label, count in (("small", 10), ("big", big_n)):
            path = self.tmp / f"filled-{label}"
            tid = self.fill_store(path, count)
            async with self.server(self.env(FAKE, cap=8, store=path)) as (c, _):
                await self.timed(c, "list_active_tasks", {}, 10)
                lst = await self.timed(c, "list_active_tasks", {}, n)
                lst_all = await self.timed(c, "list_active_tasks", {"include_finished": True, "limit": 50}, n)
                st = await self.timed(c, "check_task_status", {"task_id": tid}, n)
            raw = RawStdio(self.env(FAKE, cap=8, store=path))
            try:
                raw.timed("list_active_tasks", {}, 10)
                raw_lst = raw.timed("list_active_tasks", {}, n)
                raw_st = raw.timed("check_task_status", {"task_id": tid}, n)
            finally:
                raw.close()
            out[label] = (count, lst, lst_all, st, raw_lst, raw_st)
        fields = {}
        for label, (count, lst, lst_all, st, raw_lst, raw_st) in out.items():
            fields.update(
                {
                    f"{label}_tasks": count,
                    f"{label}_list_p50_ms": ms(pct(lst, 50)),
                    f"{label}_list_finished_p50_ms": ms(pct(lst_all, 50)),
                    f"{label}_status_p50_ms": ms(pct(st, 50)),
                    f"{label}_raw_list_p50_ms": ms(pct(raw_lst, 50)),
                    f"{label}_raw_status_p50_ms": ms(pct(raw_st, 50)),
                }
            )
        self.record("5_big_store", **fields, target="list <= 15 ms, status <= 2 ms; no growth with finished tasks")

    # 6 -------------------------------------------------------------------------------------------------
    async def memory(self):
        n = 10 if self.quick else 50
        size = 20_000_000 if self.quick else 100_000_000
        async with self.server(self.env(FAKE, cap=n + 2)) as (c, pid):
            proc = psutil.Process(pid)
            await c.call_tool("execute_cc_task", {"prompt": "sleep=0\n", "cwd": str(self.work)})
            for _ in range(3):
                await self.timed(c, "list_active_tasks", {}, 20)
            rest = proc.memory_info().rss
            for _ in range(n):
                await c.call_tool("start_cc_task_async", {"prompt": "sleep=60\n", "cwd": str(self.work)})
            while (
                sum(
                    t["status"] == "running"
                    for t in (await c.call_tool("list_active_tasks", {"limit": 500})).structured_content["tasks"]
                )
                < n
            ):
                await asyncio.sleep(0.05)
            await self.timed(c, "list_active_tasks", {"limit": 500}, 10)
            with_running = proc.memory_info().rss
            await self.stop_all(c)
            base = proc.memory_info().rss
            peak = [base]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.01)

            th = threading.Thread(target=sample)
            th.start()
            try:
                res = (
                    await c.call_tool(
                        "execute_cc_task",
                        {"prompt": f"bytes={size}\n", "cwd": str(self.work), "timeout_seconds": 600},
                        timeout=650,
                    )
                ).structured_content
            finally:
                stop.set()
                th.join()
            assert res["status"] == "completed", res
        mb = 1 << 20
        self.record(
            "6_memory",
            running_tasks=n,
            rss_at_rest_mb=round(rest / mb, 1),
            rss_with_running_mb=round(with_running / mb, 1),
            output_bytes=size,
            rss_growth_during_output_mb=round((peak[0] - base) / mb, 1),
            target="<= 100 MB with the tasks running; growth <= 10 MB",
        )

    # 7 -------------------------------------------------------------------------------------------------
    async def execute_real(self):
        rounds = 2 if self.quick else 25
        env = self.env(REAL_CLAUDE, cap=4)
        direct, ours, overhead = [], [], []
        async with self.server(env) as (c, _):
            await c.call_tool("execute_cc_task", {"prompt": "warm up", "cwd": str(self.work)})
            await self.direct_parallel(env, ["warm up"])
            for r in range(rounds):

                async def d():
                    direct.append(await self.direct_parallel(env, ["one task"]))

                async def o():
                    t0 = time.perf_counter()
                    res = await c.call_tool("execute_cc_task", {"prompt": "one task", "cwd": str(self.work)})
                    ours.append(time.perf_counter() - t0)
                    r = res.structured_content
                    assert r["status"] == "completed"
                    # what the server adds: the call's time less the time the claude process ran
                    store = TaskStore(Path(env["CC_TASKS_DIR"]))
                    events = [json.loads(x) for x in store.path(r["task_id"], "events.jsonl").read_text().splitlines()]
                    started = next(e["ts"] for e in events if e["kind"] == "started")
                    ended = next(e["ts"] for e in events if e["kind"] == "result")
                    overhead.append(ours[-1] - (ended - started))

                for step in (d, o) if r % 2 == 0 else (o, d):
                    await step()
        self.record(
            "7_execute_real_cli",
            rounds=rounds,
            direct_median_s=round(statistics.median(direct), 3),
            server_median_s=round(statistics.median(ours), 3),
            direct_spread_s=[round(min(direct), 3), round(max(direct), 3)],
            server_overhead_p50_ms=ms(statistics.median(overhead)),
            ratio=round(statistics.median(ours) / statistics.median(direct), 3),
            target="ratio <= 1.05",
        )


def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    claude = subprocess.run([str(REAL_CLAUDE), "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "os": platform.platform(),
        "cc_tasks": __version__,
        "claude": claude,
    }


def table(results: dict) -> Table:
    t = Table(title="cc-tasks benchmarks")
    t.add_column("#")
    t.add_column("figures")
    t.add_column("target")
    for key, fields in results.items():
        figures = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "target")
        t.add_row(key, figures, fields.get("target", ""))
    return t


async def amain(args) -> int:
    if not REAL_CLAUDE.exists():
        console.print(f"[red]the pinned claude CLI is missing at {REAL_CLAUDE}: run scripts/bootstrap.sh")
        return 2
    b = Bench(args.quick)
    try:
        steps = [
            b.start_latency,
            b.status_latency,
            b.parallel_real,
            b.many_short,
            b.big_store,
            b.memory,
            b.execute_real,
        ]
        for step in steps:
            if args.only and not any(step.__name__.startswith(o) for o in args.only):
                continue
            await step()
    finally:
        b.close()
    out = {
        "quick": args.quick,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": b.results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    console.print(table(b.results))
    console.print(f"machine: {out['machine']}")
    console.print(f"wrote {args.out}")
    return 0


# (key, measure, figure, baseline, target, met?). Latency targets and #4 are judged on the raw client's figures
# (the server's round trip); the fastmcp client's own validation and conversion add 1-2 ms to every call, and
# much more to replies of hundreds of records.
ROWS = [
    (
        "1_start_latency",
        "start_cc_task_async latency, 200 sequential starts (fast fake)",
        lambda r: (
            f"p50 {r['start_p50_ms']} ms, p99 {r['start_p99_ms']} ms (raw client: p50 {r['raw_start_p50_ms']}, "
            f"p99 {r['raw_start_p99_ms']})"
        ),
        lambda r: (
            f"no-op tool: p50 {r['noop_p50_ms']} ms, p99 {r['noop_p99_ms']} ms (raw: {r['raw_noop_p50_ms']}, "
            f"{r['raw_noop_p99_ms']})"
        ),
        "p50 ≤ 5 ms, p99 ≤ 20 ms",
        lambda r: r["raw_start_p50_ms"] <= 5 and r["raw_start_p99_ms"] <= 20,
    ),
    (
        "2_status_latency",
        "check_task_status latency: idle / 20 running / during execute_cc_task",
        lambda r: (
            f"p50 {r['idle_p50_ms']} / {r['with_running_p50_ms']} / {r['during_execute_p50_ms']} ms; "
            f"p99 {r['idle_p99_ms']} / {r['with_running_p99_ms']} / {r['during_execute_p99_ms']} ms "
            f"(raw client, idle / 20 running: p50 {r['raw_idle_p50_ms']} / {r['raw_with_running_p50_ms']}, "
            f"p99 {r['raw_idle_p99_ms']} / {r['raw_with_running_p99_ms']})"
        ),
        lambda r: "idle",
        "p50 ≤ 2 ms, p99 ≤ 10 ms",
        lambda r: (
            max(r["raw_idle_p50_ms"], r["raw_with_running_p50_ms"]) <= 2
            and max(r["raw_idle_p99_ms"], r["raw_with_running_p99_ms"], r["during_execute_p99_ms"]) <= 10
        ),
    ),
    (
        "3_parallel_real_cli",
        "20 real-CLI tasks in parallel, first start to last result",
        lambda r: f"{statistics.median(r['server_s']):.2f} s (median of {r['rounds']})",
        lambda r: f"20 × claude -p directly: {statistics.median(r['direct_s']):.2f} s",
        "ratio ≤ 1.05",
        lambda r: r["ratio"] <= 1.05,
    ),
    (
        "4_many_short_tasks",
        "500 short tasks (~50 ms fake) at concurrency 8",
        lambda r: (
            f"{r['server_s']:.2f} s (raw client; fastmcp client {r['fastmcp_client_s']:.2f} s, "
            f"ratio {r['fastmcp_client_ratio']})"
        ),
        lambda r: f"xargs -P8: {r['direct_xargs_s']:.2f} s",
        "ratio ≤ 1.25",
        lambda r: r["ratio"] <= 1.25,
    ),
    (
        "5_big_store",
        "list_active_tasks / check_task_status with 10,000 finished tasks",
        lambda r: (
            f"list {r['big_list_p50_ms']} ms, status {r['big_status_p50_ms']} ms (p50; raw client: "
            f"{r['big_raw_list_p50_ms']}, {r['big_raw_status_p50_ms']})"
        ),
        lambda r: (
            f"10 tasks: list {r['small_list_p50_ms']} ms, status {r['small_status_p50_ms']} ms (raw: "
            f"{r['small_raw_list_p50_ms']}, {r['small_raw_status_p50_ms']})"
        ),
        "list ≤ 15 ms, status ≤ 2 ms, flat",
        lambda r: r["big_raw_list_p50_ms"] <= 15 and r["big_raw_status_p50_ms"] <= 2,
    ),
    (
        "6_memory",
        "server RSS with 50 running tasks; growth while a task writes 100 MB",
        lambda r: f"{r['rss_with_running_mb']} MB; +{r['rss_growth_during_output_mb']} MB",
        lambda r: f"at rest {r['rss_at_rest_mb']} MB",
        "≤ 100 MB; ≤ 10 MB",
        lambda r: r["rss_with_running_mb"] <= 100 and r["rss_growth_during_output_mb"] <= 10,
    ),
    (
        "7_execute_real_cli",
        "execute_cc_task of one real-CLI task",
        lambda r: (
            f"{r['server_median_s']} s (median of {r['rounds']}; server overhead {r['server_overhead_p50_ms']} ms)"
        ),
        lambda r: f"claude -p directly: {r['direct_median_s']} s",
        "ratio ≤ 1.05",
        lambda r: r["ratio"] <= 1.05,
    ),
]


def markdown(data: dict) -> str:
    lines = ["| # | measure | cc-tasks | baseline (same run) | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for key, measure, fig, base, target, met in ROWS:
        r = data["results"].get(key)
        if r is None:
            continue
        ratio = r.get("ratio") or (round(r["start_p50_ms"] / r["noop_p50_ms"], 2) if "start_p50_ms" in r else "")
        lines.append(
            f"| {key[0]} | {measure} | {fig(r)} | {base(r)} | {ratio} | {target} | {'yes' if met(r) else 'no'} |"
        )
    m = data["machine"]
    lines.append(
        f"\nMachine: {m['cpus']} × {m['cpu']}, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}, "
        f"claude {m['claude']}; run {data['when']}{' (quick mode)' if data['quick'] else ''}."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="cc-tasks benchmarks")
    ap.add_argument("--markdown", metavar="RESULTS_JSON", help="print a results file as a Markdown table and exit")
    ap.add_argument("--quick", action="store_true", help="small counts: proves the benchmark works (CI)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--only", nargs="*", help="run only the measures whose method name starts with these")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
