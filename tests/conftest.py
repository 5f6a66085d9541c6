"""Shared fixtures: the pinned real claude CLI, the mock Anthropic API, a private store per test."""

from __future__ import annotations

import contextlib
import json
import signal
import stat
import sys
from pathlib import Path

import psutil
import pytest

from cc_tasks.config import Settings
from cc_tasks.manager import TaskManager

from .mock_anthropic import MockServer
from .nats_servers import nats_cluster, nats_server, nats_url  # noqa: F401 (fixtures for the NATS tests)

ROOT = Path(__file__).resolve().parent.parent
REAL_CLAUDE = ROOT / "tools" / "claude-cli" / "node_modules" / ".bin" / "claude"


@pytest.fixture(scope="session")
def real_claude() -> str:
    if not REAL_CLAUDE.exists():
        pytest.fail(f"the pinned claude CLI is missing at {REAL_CLAUDE}: run scripts/bootstrap.sh")
    return str(REAL_CLAUDE)


@pytest.fixture(scope="session")
def mock_api():
    with MockServer() as mock:
        yield mock


@pytest.fixture
def fake_claude(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("fakebin")
    path = d / "claude"
    path.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_claude.py").read_text())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def workdir(tmp_path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def cc_env(tmp_path, monkeypatch, mock_api, real_claude) -> dict[str, str]:
    """Environment for servers and claude: offline against the mock, a scratch HOME, a private store."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": mock_api.url,
        "ANTHROPIC_API_KEY": "test-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "IS_SANDBOX": "1",
        "CC_TASKS_DIR": str(tmp_path / "store"),
        "CC_TASKS_CLAUDE_BIN": real_claude,
        "CC_TASKS_DEFAULT_TIMEOUT": "120",
        "CC_TASKS_WORKER_IDLE": "20",
    }
    for k in ("CC_TASKS_DEPTH", "CC_TASKS_MAX_DEPTH", "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@contextlib.contextmanager
def running_manager():
    """A TaskManager on the test's store; every task still running at the end is cancelled."""
    m = TaskManager(Settings.from_env())
    old = signal.getsignal(signal.SIGCHLD)
    m.install_sigchld_handler()
    try:
        yield m
    finally:
        for s in m.list().tasks:
            m.cancel(s.task_id)
        m.store.stop_worker()
        for p in list(m.store.launcher._spawned):  # (one still starting missed the quit: SIGTERM, its tasks are done)
            if p.poll() is None:
                p.terminate()
        m.reap(wait=15)
        signal.signal(signal.SIGCHLD, old)


@pytest.fixture
def manager(cc_env):
    """A manager running the real claude CLI against the mock API."""
    with running_manager() as m:
        yield m


@pytest.fixture
def fake_manager(cc_env, fake_claude, monkeypatch):
    """A manager running the fake claude."""
    monkeypatch.setenv("CC_TASKS_CLAUDE_BIN", fake_claude)
    with running_manager() as m:
        yield m


def mock_prompt(steps: list[dict], text: str = "task") -> str:
    return f"{text} @@mock {json.dumps({'steps': steps})}"


def zombies_of_this_process() -> list[int]:
    return [c.pid for c in psutil.Process().children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="session", autouse=True)
def handshake_cache(tmp_path_factory):
    """One handshake cache (cc_tasks/front.py) for the whole run, whatever HOME a test gives its servers: the
    first server start builds it (in the background), the others answer the handshake from it."""
    d = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d))
        yield d


@pytest.fixture(scope="session", autouse=True)
def no_stray_workers(tmp_path_factory):
    """At the end, stop workers that tests' servers started on their stores (they would idle-exit anyway)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    strays = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "cc_tasks.worker" in (p.info["cmdline"] or []) and any(base in a for a in p.info["cmdline"] or [])
    ]
    for p in strays:
        p.terminate()
    psutil.wait_procs(strays, timeout=10)
