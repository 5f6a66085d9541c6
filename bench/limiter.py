#!/usr/bin/env python3
"""The rate-limit-aware cap (cc_tasks/limits.py): N parallel real-CLI tasks against the mock Messages API, the
first request of each answered 429 once (``error_once``, a key per task), measured in the same run, alternating
rounds of:

- ``plain``: N ``claude -p`` processes started at once (what people do by hand; with ``--cap C``, C at once,
  as ``xargs -P C`` would): nothing backs off but each claude's own retry;
- ``cc_tasks``: the same N prompts through a TaskManager on a fresh local store with cap N (or C): its
  on-demand worker reports each ``api_retry`` 429 to the limiter, which halves the starts and pauses them.

Per mode (medians over the rounds): the API requests the mock received in the WINDOW seconds after a round's
first 429 and in all, the 429s it answered, how many tasks started after the first 429, and the wall time from
the first start (the submission, for cc_tasks) to all done. For cc_tasks also the limiter's states seen while
the tasks ran (polled every 20 ms from the store) and at the end.

    .venv/bin/python bench/limiter.py [--tasks 10] [--rounds 3] [--window 5]
    .venv/bin/python bench/limiter.py --tasks 20 --cap 10   # more tasks than the cap: later starts are held back
    .venv/bin/python bench/limiter.py --quick          # 4 tasks, one round, no warm-up (proves it works)

Prints a table and writes bench/limiter.json. The mock runs in this process; its answers are timed by wrapping
``tests.mock_anthropic.plan_reply``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = ROOT / "tools" / "claude-cli" / "node_modules" / ".bin" / "claude"
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cc_tasks.config import Settings  # noqa: E402
from cc_tasks.manager import TaskManager  # noqa: E402
from cc_tasks.models import BatchItem, TaskStatus  # noqa: E402
from tests import mock_anthropic  # noqa: E402
from tests.mock_anthropic import MockServer  # noqa: E402

console = Console(width=150)
MODES = ("plain", "cc_tasks")


class Requests:
    """Every request the mock answered: (monotonic time, wall time, HTTP status, the step's error_once key)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: list[tuple[float, float, int, str | None]] = []
        self._plan = mock_anthropic.plan_reply

    def install(self) -> None:
        def plan(body, state):
            out = self._plan(body, state)
            script = mock_anthropic._find_directive(body.get("messages") or [])[0] or {}
            key = next((s.get("key") for s in script.get("steps") or [] if "key" in s), None)
            with self.lock:
                self.seen.append((time.monotonic(), time.time(), out[0], key))
            return out

        mock_anthropic.plan_reply = plan  # (the handler looks it up on every request)

    def of(self, keys: set[str]) -> list[tuple[float, float, int, str | None]]:
        with self.lock:
            return [r for r in self.seen if r[3] in keys]


def prompts(n: int) -> tuple[list[str], set[str]]:
    run = uuid.uuid4().hex[:8]
    keys = [f"limiter-bench-{run}-{i}" for i in range(n)]
    steps = [[{"error_once": 429, "type": "rate_limit_error", "key": k, "text": f"ok {i}"}] for i, k in enumerate(keys)]
    return [f"limiter bench task {i} @@mock {json.dumps({'steps': s})}" for i, s in enumerate(steps)], set(keys)


def plain(texts: list[str], env: dict, cwd: Path, cap: int) -> dict:
    """``claude -p`` for every prompt, ``cap`` at once (all at once by default), as by hand or ``xargs -P``;
    their api_retry events counted from stream-json."""
    spans = []

    def run(text: str) -> tuple[int, bytes, bytes]:
        start = time.time()
        p = subprocess.Popen(
            [str(CLAUDE), "-p", text, "--output-format=stream-json", "--verbose"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        out, err = p.communicate(timeout=300)
        spans.append((start, time.time()))
        return p.returncode, out, err

    t0 = time.monotonic()
    with ThreadPoolExecutor(cap) as pool:
        outs = list(pool.map(run, texts))
    wall = time.monotonic() - t0
    for code, out, err in outs:
        if code != 0:
            raise SystemExit(f"claude failed ({code}): {out.decode()[-1500:]} {err.decode()[-1500:]}")
    events = [json.loads(line) for _, out, _ in outs for line in out.splitlines() if line.strip().startswith(b"{")]
    retries = sum(1 for e in events if e.get("type") == "system" and e.get("subtype") == "api_retry")
    return {"t0": t0, "wall_s": wall, "claude_api_retries": retries, "spans": spans}


def via_cc_tasks(texts: list[str], store: Path, cwd: Path, cap: int) -> dict:
    """The same prompts through a TaskManager (``cap``) on a fresh store; the limiter polled while they run."""
    os.environ["CC_TASKS_DIR"] = str(store)
    os.environ["CC_TASKS_MAX_CONCURRENT"] = str(cap)
    m = TaskManager(Settings.from_env())
    states, stop = [], threading.Event()

    def poll(t0: float) -> None:
        last = None
        while not stop.is_set():
            lim = m.store.limiter()
            if lim != last:
                states.append((round(time.monotonic() - t0, 3), lim))
                last = lim
            stop.wait(0.02)

    try:
        t0 = time.monotonic()
        watcher = threading.Thread(target=poll, args=(t0,), daemon=True)
        watcher.start()
        ids = [t.task_id for t in m.start_batch([BatchItem(prompt=p, cwd=str(cwd)) for p in texts]).tasks]
        done = asyncio.run(m.wait(ids, timeout=600))
        wall = time.monotonic() - t0
        stop.set()
        watcher.join()
        bad = [(t.status, t.error) for t in done.tasks if t.status != TaskStatus.COMPLETED]
        if not done.done or bad:
            raise SystemExit(f"cc-tasks tasks did not complete: {bad}")
        retries = sum(
            1 for t in ids for _, e in m.store.iter_events(t) if e["kind"] == "api_retry" and e.get("status") == 429
        )
        spans = [(t.started_at.timestamp(), t.finished_at.timestamp()) for t in done.tasks]
        final = m.server_info().limiter
    finally:
        stop.set()
        for s in m.list().tasks:
            m.cancel(s.task_id)
        m.store.stop_worker()
        m.reap(wait=15)
    caps = [lim.effective_cap for _, lim in states if lim.effective_cap is not None]
    first = next(((t, lim) for t, lim in states if lim.last_status is not None), None)
    return {
        "t0": t0,
        "wall_s": wall,
        "claude_api_retries": retries,
        "spans": spans,
        "states": [(t, lim.effective_cap) for t, lim in states],
        "limiter": {
            "min_effective_cap": min(caps) if caps else None,
            "first_seen_s": first[0] if first else None,
            "pause_s": round((first[1].paused_until - first[1].last_at).total_seconds(), 3) if first else None,
            "states_seen": len(states),
            "at_end": json.loads(final.model_dump_json()) if final else None,
        },
    }


def measure(got: dict, reqs: list[tuple[float, float, int, str | None]], window: float) -> dict:
    first = min((r for r in reqs if r[2] == 429), default=None)
    t429 = first[0] if first else float("nan")
    out = {
        "wall_s": round(got["wall_s"], 3),
        "requests": len(reqs),
        "errors_429": sum(r[2] == 429 for r in reqs),
        "requests_in_window": sum(t429 <= r[0] <= t429 + window for r in reqs),
        "first_429_after_s": round(t429 - got["t0"], 3) if first else None,
        "last_request_after_first_429_s": round(max(r[0] for r in reqs) - t429, 3) if first else None,
        "claude_api_retries": got["claude_api_retries"],
    }
    if first:
        spans = got["spans"]
        later = sorted(a for a, _ in spans if a > first[1])
        out["started_after_first_429"] = len(later)
        out["starts_after_first_429_s"] = [round(a - first[1], 2) for a in later]
        # how many ran at once at each start after the first 429 (the limiter's doing, or not)
        out["most_running_after_first_429"] = max((sum(a <= t < b for a, b in spans) for t in later), default=None)
    if "states" in got and first:  # the effective cap over time, from the first 429
        out["effective_cap_timeline"] = [(round(t + got["t0"] - t429, 2), c) for t, c in got["states"]]
    if "limiter" in got:
        out["limiter"] = got["limiter"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cap", type=int, help="most at once in both modes (default: --tasks, all at once)")
    ap.add_argument("--window", type=float, default=5.0, help="seconds after a round's first 429 to count requests")
    ap.add_argument("--quick", action="store_true", help="4 tasks, one round, no warm-up")
    ap.add_argument("--out", default=str(ROOT / "bench" / "limiter.json"))
    args = ap.parse_args()
    if not CLAUDE.exists():
        console.print(f"[red]the pinned claude CLI is missing at {CLAUDE}: run scripts/bootstrap.sh")
        return 2
    if args.quick:
        args.tasks, args.rounds = 4, 1
    args.cap = min(args.cap or args.tasks, args.tasks)
    tmp = Path(tempfile.mkdtemp(prefix="cc-tasks-limiter-"))
    (tmp / "home").mkdir()
    work = tmp / "work"
    work.mkdir()
    requests = Requests()
    requests.install()
    with MockServer() as mock:
        for k in [k for k in os.environ if k.startswith(("CC_TASKS_", "CLAUDE"))]:
            del os.environ[k]
        os.environ.update(  # (this process's: the TaskManager and its worker read them; plain claude gets them too)
            {
                "HOME": str(tmp / "home"),
                "ANTHROPIC_BASE_URL": mock.url,
                "ANTHROPIC_API_KEY": "bench-key",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_MAX_RETRIES": "1",  # (as in the tests; claude still retries a 429 once)
                "IS_SANDBOX": "1",
                "CC_TASKS_CLAUDE_BIN": str(CLAUDE),
                "CC_TASKS_WORKER_IDLE": "30",
            }
        )
        stores = iter(tmp / f"store-{i}" for i in range(1000))

        def one(mode: str) -> dict:
            texts, keys = prompts(args.tasks)
            if mode == "plain":
                got = plain(texts, dict(os.environ), work, args.cap)
            else:
                got = via_cc_tasks(texts, next(stores), work, args.cap)
            return measure(got, requests.of(keys), args.window)

        if not args.quick:
            for mode in MODES:  # warm-up, not counted
                one(mode)
        rounds: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                rounds[mode].append(one(mode))
                console.log(mode, rounds[mode][-1])
    result: dict = {
        "quick": args.quick,
        "tasks": args.tasks,
        "cap": args.cap,
        "rounds": args.rounds,
        "window_s": args.window,
    }
    result["modes"] = {}
    for mode, rs in rounds.items():
        med = {}
        for k in ("wall_s", "requests", "errors_429", "requests_in_window", "first_429_after_s",
                  "last_request_after_first_429_s", "claude_api_retries", "started_after_first_429",
                  "most_running_after_first_429"):  # fmt: skip
            values = [x[k] for x in rs if x.get(k) is not None]
            med[k] = round(statistics.median(values), 3) if values else None
        result["modes"][mode] = {**med, "rounds": rs}
    lims = [x["limiter"] for x in rounds["cc_tasks"]]
    result["limiter_seen"] = {
        "min_effective_cap": min((x["min_effective_cap"] for x in lims if x["min_effective_cap"]), default=None),
        "pause_s": [x["pause_s"] for x in lims],
        "at_end": lims[-1]["at_end"] if lims else None,
    }
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    result["when"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(
        title=f"{args.tasks} real-CLI tasks, {args.cap} at once, each first request answered 429 (medians of {args.rounds})"
    )
    table.add_column("mode")
    cols = [("wall_s", "wall s"), ("requests", "requests"), ("errors_429", "429s"),
            ("requests_in_window", f"requests in {args.window:g} s after the first 429"),
            ("last_request_after_first_429_s", "last request after first 429, s"),
            ("claude_api_retries", "claude retries"), ("started_after_first_429", "started after first 429"),
            ("most_running_after_first_429", "most running at those starts")]  # fmt: skip
    for _, title in cols:
        table.add_column(title, justify="right")
    for mode, r in result["modes"].items():
        table.add_row(mode, *("—" if r[k] is None else str(r[k]) for k, _ in cols))
    console.print(table)
    console.print(f"limiter seen (cc_tasks): {result['limiter_seen']}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
