"""Make the plugin's virtual environment: what ``bin/cc-tasks-mcp`` runs on first use (standard library only).

    python3 scripts/plugin_venv.py --root PLUGIN_ROOT --venv DIR

Creates DIR with ``python -m venv`` and installs the package of PLUGIN_ROOT into it with pip, from a copy of
its sources (the plugin folder is never written to). Concurrent runs for the same DIR are serialised by an
flock on ``DIR.lock`` (released by the kernel if a run dies), so two Claude Code windows starting the server
for the first time at once build it once. DIR counts as ready only once ``DIR/.cc-tasks-ready`` exists:
that file is written last, so an interrupted build is thrown away and made again. Afterwards, sibling
environments of other versions unused for PRUNE_AFTER_DAYS are removed.

Signals that would stop a client's MCP server (SIGTERM, SIGHUP, SIGINT) are ignored, and the run leaves
the client's process group, so a build that outlasts the client's start-up timeout still completes and the
next start is fast. Output goes to the caller's stdout/stderr (the launcher sends both to a log file).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = ".cc-tasks-ready"
USED = ".cc-tasks-used"
PRUNE_AFTER_DAYS = 7
#: What pip needs from the plugin folder to build the package.
SOURCES = ("pyproject.toml", "README.md", "cc_tasks")


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} plugin_venv[{os.getpid()}]: {msg}", flush=True)


def runs(venv: Path) -> bool:
    """Whether the environment's interpreter still starts (its base Python may have been removed)."""
    try:
        return subprocess.run([str(venv / "bin" / "python"), "-c", ""], timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build(root: Path, venv: Path) -> None:
    if venv.exists():
        log(f"removing the unfinished or broken environment {venv}")
        shutil.rmtree(venv)
    t0 = time.monotonic()
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_USER", "PIP_REQUIRE_VIRTUALENV", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # every step runs in a scratch directory: the client's cwd may hold a cc_tasks folder of its own
    with tempfile.TemporaryDirectory(prefix="cc-tasks-src-") as tmp:
        log(f"creating {venv} with {sys.executable} ({sys.version.split()[0]})")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tmp, env=env)
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            p = root / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(p, src / name)
        log(f"installing {root} into it")
        subprocess.run([str(py), "-m", "pip", "install", "--no-input", str(src)], check=True, cwd=tmp, env=env)
        subprocess.run([str(py), "-c", "import cc_tasks.server"], check=True, cwd=tmp, env=env)
    (venv / READY).write_text(f"{root}\n")
    log(f"ready in {time.monotonic() - t0:.1f} s")


def prune(venv: Path) -> None:
    """Remove the other versions' environments that no start has used for a while."""
    cutoff = time.time() - PRUNE_AFTER_DAYS * 86400
    for other in venv.parent.glob("venv-*"):
        if other == venv or not other.is_dir() or other.name.endswith(".lock"):
            continue
        used = other / USED
        try:
            last = used.stat().st_mtime if used.exists() else other.stat().st_mtime
        except OSError:
            continue
        if last < cutoff:
            log(f"removing {other} (unused for {PRUNE_AFTER_DAYS} days)")
            shutil.rmtree(other, ignore_errors=True)
            Path(f"{other}.lock").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path, help="the plugin folder (holds pyproject.toml)")
    ap.add_argument("--venv", required=True, type=Path, help="the environment to make")
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    root, venv = args.root.resolve(), args.venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        waited = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        if time.monotonic() - waited > 0.5:
            log(f"waited {time.monotonic() - waited:.1f} s for another start building {venv}")
        if (venv / READY).exists() and runs(venv):
            log(f"{venv} is ready (built by another start)")
            return 0
        try:
            build(root, venv)
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"failed: {e}")
            return 1
    prune(venv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
