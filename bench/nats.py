#!/usr/bin/env python3
"""The NATS backend's scaling curve: N fake tasks of 50 ms (bench/fake_claude.sh) run by 1, 2 and 4 worker
processes of 8 slots each, beside ``xargs -P`` with the same total slots running the same fake task,
measured in the same run. Also submit -> start latency (p50/p99, from the records' created_at and
started_at: of the N tasks, queueing included, and of 20 tasks sent one at a time to idle workers) and the read behind check_task_status (p50) on NATS beside the local store.

    .venv/bin/python bench/nats.py                    # 1000 tasks, 1/2/4 workers, a nats-server of its own
    .venv/bin/python bench/nats.py --quick            # 100 tasks, 1/2 workers (proves it works)
    .venv/bin/python bench/nats.py --kind local       # the same harness on the local store (no NATS)
    .venv/bin/python bench/nats.py --url nats://HOST:4222   # against a running server (a namespace of its own)

Prints a table and writes bench/nats.json. Workers are ``cc-tasks worker --slots 8`` processes (``--backend
URL`` on NATS, ``--store DIR`` locally); tasks are submitted through the backend API (``Backend.submit``),
so the figures are the backend's, not an MCP client's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path, where "nats" would be this file, not nats-py:
# drop it (and put the repository first).
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cc_tasks import control  # noqa: E402
from cc_tasks.models import TaskOptions, TaskRecord, TaskRequest  # noqa: E402
from cc_tasks.store import TaskStore, new_task_id  # noqa: E402
from tests.nats_servers import start_nats  # noqa: E402

FAKE = ROOT / "bench" / "fake_claude.sh"
CC_TASKS = Path(sys.executable).parent / "cc-tasks"
SLOTS = 8
console = Console(width=150)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def ms(x: float) -> float:
    return round(x * 1000, 2)


def xargs(n: int, parallel: int, sleep: float) -> float:
    """Seconds for ``n`` fake tasks through ``xargs -P parallel``: the floor for the same slots."""
    t0 = time.perf_counter()
    subprocess.run(
        f"seq {n} | xargs -P{parallel} -I{{}} sh -c 'printf \"sleep={sleep}\\n\" | {FAKE} > /dev/null'",
        shell=True,
        check=True,
    )
    return time.perf_counter() - t0


class Target:
    """Where tasks go: a backend to submit to and read from, and how to start a worker on it."""

    def __init__(self, kind: str, address: str, cap: int):
        self.kind, self.address, self.cap = kind, address, cap
        self.backend = self._open()

    def _open(self):
        if self.kind == "local":
            return TaskStore(Path(self.address), max_concurrent=self.cap)
        try:
            from cc_tasks.connect import open_backend  # the nats branch (cc_tasks/connect.py)
        except ImportError as e:
            if e.name != "cc_tasks.connect":
                raise
            raise SystemExit(
                "bench/nats.py: cc_tasks.connect.open_backend is missing (the NATS backend has not landed on "
                "this branch); run with --kind local to check the harness"
            ) from None
        return open_backend(self.address, max_concurrent=self.cap)

    def worker_argv(self, slots: int) -> list[str]:
        if self.kind == "local":
            return [str(CC_TASKS), "--store", self.address, "worker", f"--slots={slots}"]
        # `cc-tasks worker --backend URL`: the nats branch's plumbing (checked on a scratch merge with e383778).
        return [str(CC_TASKS), "worker", f"--backend={self.address}", f"--slots={slots}"]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CC_TASKS_MAX_CONCURRENT": str(self.cap),
            "CC_TASKS_CLAUDE_BIN": str(FAKE),
            **({"CC_TASKS_BACKEND": self.address} if self.kind == "nats" else {}),
        }

    def submit(self, n: int, sleep: float, cwd: str) -> list[TaskRecord]:
        records = []
        for _ in range(n):
            opts = TaskOptions(prompt=f"sleep={sleep}\n", cwd=cwd)
            r = TaskRecord(task_id=new_task_id(), cwd=cwd, timeout_seconds=120, prompt_preview=opts.prompt[:200])
            # The submitter's environment is not shipped (env={}): a worker runs claude with its own.
            self.backend.submit(r, TaskRequest(options=opts, cwd=cwd, claude_bin=str(FAKE), env={}))
            records.append(r)
        if self.kind == "nats":
            self.backend.nudge()
        else:  # the listening workers' socket (TaskStore.nudge would start a worker of its own if none answered)
            control.send(self.backend.socket_path, {"op": "nudge"})
        return records

    def wait_done(self, ids: list[str], timeout: float) -> int:
        """Until every task in ``ids`` is finished (read in submission order, so mostly one read a pass);
        returns how often ``has_active()`` said "nothing active" while one was not (a backend bug)."""
        deadline = time.monotonic() + timeout
        pending = list(ids)
        early, asked = 0, 0.0
        while pending:
            if self.backend.read(pending[0]).status.terminal:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} tasks still not finished after {timeout:g} s")
            if time.monotonic() - asked > 1:  # (once a second: on NATS each call is a listing request)
                asked = time.monotonic()
                early += not self.backend.has_active()
            time.sleep(0.02)
        return early

    def close(self) -> None:
        with contextlib.suppress(Exception):
            getattr(self.backend, "close", lambda: None)()


@contextlib.contextmanager
def workers(target: Target, count: int, log_dir: Path):
    """``count`` worker processes of SLOTS slots; drained (SIGTERM) and reaped at the end, bounded."""
    procs = []
    try:
        for i in range(count):
            out = open(log_dir / f"worker-{target.kind}-{count}-{i}.log", "wb")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen(target.worker_argv(SLOTS), env=target.env(), stdout=out, stderr=out), out))
        yield [p for p, _ in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, out in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            out.close()


def run_round(target: Target, count: int, n: int, sleep: float, cwd: str, log_dir: Path) -> dict:
    """One point of the curve: ``count`` workers, ``n`` tasks; wall time, submit time, submit->start latency."""
    with workers(target, count, log_dir) as procs:
        warm = target.submit(count * SLOTS, 0, cwd)  # warm-up: every worker up, connected, claiming
        target.wait_done([r.task_id for r in warm], 120)
        assert all(p.poll() is None for p in procs), f"a worker exited: see {log_dir}"
        t0 = time.perf_counter()
        records = target.submit(n, sleep, cwd)
        submitted = time.perf_counter() - t0
        early = target.wait_done([r.task_id for r in records], 900)
        wall = time.perf_counter() - t0
        idle = []  # one task at a time on idle workers: the latency without queueing
        for _ in range(20):
            one = target.submit(1, 0, cwd)[0]
            target.wait_done([one.task_id], 60)
            r = target.backend.read(one.task_id)
            idle.append((r.started_at - r.created_at).total_seconds())
    done = [target.backend.read(r.task_id) for r in records]
    bad = [f"{r.task_id} {r.status.value} {r.error or ''}"[:300] for r in done if r.status.value != "completed"]
    assert not bad, f"{len(bad)} tasks did not complete, e.g. {bad[:3]}"
    latency = [(r.started_at - r.created_at).total_seconds() for r in done if r.started_at]
    return {
        "workers": count,
        "slots": count * SLOTS,
        "tasks": n,
        "wall_s": round(wall, 3),
        "submit_s": round(submitted, 3),
        "submit_to_start_p50_ms": ms(pct(latency, 50)),
        "submit_to_start_p99_ms": ms(pct(latency, 99)),
        "idle_submit_to_start_p50_ms": ms(pct(idle, 50)),
        "idle_submit_to_start_p99_ms": ms(pct(idle, 99)),
        "has_active_false_while_pending": early,
    }


def status_read_p50(target: Target, reps: int, cwd: str) -> float:
    """p50 of one record read (what check_task_status does first) of a finished task."""
    tid = target.submit(1, 0, cwd)[0].task_id
    with workers(target, 1, Path(tempfile.gettempdir())):
        target.wait_done([tid], 60)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        target.backend.read(tid)
        times.append(time.perf_counter() - t0)
    return ms(pct(times, 50))


def main() -> int:
    ap = argparse.ArgumentParser(description="cc-tasks on NATS: the scaling curve against xargs -P")
    ap.add_argument("--quick", action="store_true", help="100 tasks, 1 and 2 workers")
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=0.05, help="seconds each fake task sleeps")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--kind", choices=["nats", "local"], default="nats")
    ap.add_argument("--url", help="a running NATS server (default: start one on a free local port)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "nats.json"))
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.workers = 100, [1, 2]
    tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-bench-nats-"))
    cwd = str(tmp / "work")
    os.makedirs(cwd)
    cap = SLOTS * max(args.workers)
    server = None
    results: dict = {"tasks": args.tasks, "sleep_s": args.sleep, "kind": args.kind, "curve": []}
    try:
        if args.kind == "nats" and not args.url:
            server = start_nats(tmp / "nats")
        for count in args.workers:
            if args.kind == "nats":
                address = f"{args.url or server.url}/bench{uuid.uuid4().hex[:8]}"
            else:
                address = str(tmp / f"store-{count}")
            target = Target(args.kind, address, cap)
            try:
                point = run_round(target, count, args.tasks, args.sleep, cwd, tmp)
            finally:
                target.close()
            point["xargs_s"] = round(xargs(args.tasks, count * SLOTS, args.sleep), 3)
            point["ratio"] = round(point["wall_s"] / point["xargs_s"], 3)
            results["curve"].append(point)
            console.print(point)
        local = Target("local", str(tmp / "store-status"), cap)
        results["status_read_local_p50_ms"] = status_read_p50(local, 300, cwd)
        if args.kind == "nats":
            remote = Target("nats", f"{args.url or server.url}/benchstatus", cap)
            try:
                results["status_read_nats_p50_ms"] = status_read_p50(remote, 300, cwd)
            finally:
                remote.close()
    finally:
        if server is not None:
            server.stop()
    table = Table(title=f"{args.tasks} tasks of {args.sleep * 1000:g} ms on {args.kind}, {SLOTS} slots per worker")
    cols = {"workers": "workers", "slots": "slots", "wall_s": "wall s", "xargs_s": "xargs -P s", "ratio": "ratio",
            "submit_s": "submit s", "submit_to_start_p50_ms": "start p50 ms", "submit_to_start_p99_ms": "start p99 ms",
            "idle_submit_to_start_p50_ms": "idle start p50 ms", "idle_submit_to_start_p99_ms": "idle p99 ms"}  # fmt: skip
    for title in cols.values():
        table.add_column(title, justify="right")
    for p in results["curve"]:
        table.add_row(*(str(p[k]) for k in cols))
    console.print(table)
    console.print(
        f"record read (check_task_status) p50: local {results['status_read_local_p50_ms']} ms"
        + (f", NATS {results['status_read_nats_p50_ms']} ms" if "status_read_nats_p50_ms" in results else "")
    )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
