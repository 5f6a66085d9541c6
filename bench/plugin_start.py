"""How long the plugin's launcher (bin/cc-tasks-mcp) takes to answer MCP's ``initialize``.

    .venv/bin/python bench/plugin_start.py [--warm N] [--home DIR]

First start: a fresh environment home, so the launcher makes the virtual environment (python3 -m venv,
pip install of this package and its dependencies from the configured index) before serving. Later starts:
the same home again, N times. Baseline: ``python main.py`` from this checkout's interpreter, N times.
Each figure is from starting the process to reading the ``initialize`` reply (standard input then closes,
and the server exits). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "bin" / "cc-tasks-mcp"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}


def time_to_initialize(argv: list[str], env: dict[str, str], cwd: str, timeout: float = 900) -> float:
    """Seconds from starting ``argv`` to its ``initialize`` reply on stdout (which must be JSON-RPC only)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    try:
        p.stdin.write(json.dumps(INIT).encode() + b"\n")
        p.stdin.flush()
        line = p.stdout.readline()
        elapsed = time.perf_counter() - t0
        reply = json.loads(line)  # anything else on stdout first would break an MCP client
        if reply.get("id") != 1 or "result" not in reply:
            raise RuntimeError(f"unexpected reply: {line[:300]!r}")
        return elapsed
    except (json.JSONDecodeError, RuntimeError):
        p.kill()
        raise RuntimeError(f"{argv[0]}: no initialize reply; stderr: {p.stderr.read()[-2000:]!r}") from None
    finally:
        if p.poll() is None:
            p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm", type=int, default=10, help="later starts (and baseline starts) to time")
    ap.add_argument("--home", help="environment home to use (default: a fresh temporary folder, removed after)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cc-tasks-plugin-start-"))
    home = Path(args.home) if args.home else work / "plugin-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CC_TASKS_PLUGIN", "CLAUDE_PLUGIN"))}
    env.update(CC_TASKS_PLUGIN_HOME=str(home), CC_TASKS_DIR=str(work / "store"))
    try:
        fresh = not any(home.glob("venv-*/.cc-tasks-ready"))
        first = time_to_initialize([str(LAUNCHER)], env, str(work))
        later = [time_to_initialize([str(LAUNCHER)], env, str(work)) for _ in range(args.warm)]
        base = [time_to_initialize([sys.executable, str(ROOT / "main.py")], env, str(work)) for _ in range(args.warm)]
        size = sum(f.stat().st_size for f in home.rglob("*") if f.is_file() and not f.is_symlink())
        print("| start | time to answer initialize |")
        print("|---|---|")
        print(f"| first ({'makes the environment' if fresh else 'environment already there'}) | {first:.2f} s |")
        print(
            f"| later (median of {len(later)}) | {statistics.median(later) * 1000:.0f} ms "
            f"(min {min(later) * 1000:.0f}, max {max(later) * 1000:.0f}) |"
        )
        print(f"| baseline `python main.py` (median of {len(base)}) | {statistics.median(base) * 1000:.0f} ms |")
        print(f"\nEnvironment: {size / 1e6:.0f} MB in {home}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
