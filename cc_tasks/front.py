"""The stdio front door: answers the MCP handshake at once, imports the server when a request needs it.

Claude Code starts every registered MCP server for every session (sub-agents included) and waits for its
handshake before the first turn. Importing FastMCP and the tools takes about a second of CPU, which a
sub-agent that never starts a task would pay for nothing. So ``python main.py`` runs this module first
(standard library only): it answers ``initialize``, ``ping`` and the list requests (``tools/list``, ...)
from a copy of the server's own earlier replies, cached per version of the code, its environment and the
protocol version the client asks for; the first other request (a tool call) makes it import the server and
hand the connection over: the server gets the client's ``initialize`` replayed under an id of our own (its
reply is dropped), then that request and the rest of the stream. Without a usable copy (first start, code
or settings changed, another protocol version) the server starts at once and records its replies for the
next start. At nesting depth 0 (the user's own session) the server is imported in the background meanwhile,
so the first tool call does not wait for it; in sub-agents it is imported only if a tool is called.

``CC_TASKS_FAST_HANDSHAKE=0`` turns this off (the server starts at once, as before).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .checks import check_environment
from .errors import CCTasksError

#: Requests the front answers from the cache (without a cursor), besides ``initialize`` and ``ping``.
LISTS = ("tools/list", "prompts/list", "resources/list", "resources/templates/list")
#: Where a request of the stateless protocol says its version.
META_VERSION = "io.modelcontextprotocol/protocolVersion"
CACHE_FORMAT = 1
#: What ``build`` asks for: the versions Claude Code speaks (the stateless protocol first, then a session).
MODERN_VERSIONS = ("2026-07-28",)
LEGACY_VERSION = "2025-06-18"
#: A cache build gives up after this long; a lock file older than this is stale.
BUILD_SECONDS = 60.0


def cache_dir(env: dict | os._Environ = os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cc-tasks"


def cache_key() -> str:
    """What the handshake depends on: this code (every module's size and mtime), the interpreter and its
    installed packages (site-packages' mtime changes on every install). No setting changes it."""
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{__version__}\0{sys.executable}\0{sys.version}".encode())
    pkg = Path(__file__).parent
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            st = os.stat(pkg / name)
            h.update(f"\0{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for p in sys.path:
        if p.endswith("-packages"):
            try:
                h.update(f"\0{p}:{os.stat(p).st_mtime_ns}".encode())
            except OSError:
                pass
    return h.hexdigest()[:32]


def load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_cache(path: Path, data: dict) -> None:
    """Atomically, best effort: a cache that cannot be written only makes the next start slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:
        pass


def request_version(msg: dict, session: str | None) -> str | None:
    """The protocol version a request is made under: its own (``_meta``, the stateless protocol of 2026,
    which starts with ``server/discover`` and has no ``initialize``), else the session's. (Pure.)"""
    params = msg.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    own = meta.get(META_VERSION) if isinstance(meta, dict) else None
    return own if isinstance(own, str) else session


def cached_reply(cache: dict, session: str | None, msg: dict) -> dict | None:
    """The cached result for this request, or None when the server must answer it. (Pure.)"""
    method, params = msg.get("method"), msg.get("params") or {}
    if "id" not in msg or not isinstance(method, str) or not isinstance(params, dict):
        return None
    if method == "ping":
        return {}
    if method == "initialize":
        asked = params.get("protocolVersion")
        return (cache.get(asked) or {}).get("initialize") if isinstance(asked, str) else None
    version = request_version(msg, session)
    if version and (method == "server/discover" or (method in LISTS and not params.get("cursor"))):
        return (cache.get(version) or {}).get(method)
    return None


class Recorder:
    """Watches a connection the server answers and keeps the replies the front can give next time."""

    def __init__(self, path: Path, cache: dict):
        self.path, self.cache = path, cache
        self.asked: dict[object, tuple[str, str | None]] = {}  # request id -> (method, protocol version)
        self.version: str | None = None
        self.lock = threading.Lock()

    def request(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params") or {}
        if "id" not in msg or not isinstance(method, str) or not isinstance(params, dict):
            return
        if method == "initialize" and isinstance(params.get("protocolVersion"), str):
            self.version = params["protocolVersion"]
        version = request_version(msg, self.version)
        if method in ("initialize", "server/discover") or (method in LISTS and not params.get("cursor")):
            with self.lock:
                self.asked[_id_key(msg["id"])] = (method, version)

    def reply(self, msg: dict) -> None:
        with self.lock:
            asked = self.asked.pop(_id_key(msg.get("id")), None)
        if asked is None or not isinstance(msg.get("result"), dict):
            return
        method, version = asked
        if method == "initialize":
            version = msg["result"].get("protocolVersion")
            if not isinstance(version, str):
                return
            self.version = version
        if version and not msg["result"].get("isError"):
            with self.lock:
                self.cache = {**load_cache(self.path), **self.cache}  # (a concurrent build may have written it)
                self.cache.setdefault(version, {})[method] = msg["result"]
                save_cache(self.path, self.cache)


def _id_key(value: object) -> str:
    return json.dumps(value)


class ReplayReader(io.RawIOBase):
    """The server's stdin: the replayed lines first, then the rest of the client's stream."""

    def __init__(self, first: bytes, rest: io.BufferedReader, recorder: Recorder | None):
        self.pending, self.rest, self.recorder = first, rest, recorder

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self.pending:
            line = self.rest.readline()
            if not line:
                return 0
            if self.recorder is not None and _may_be_recorded(line):
                _observe(line, self.recorder.request)
            self.pending = line
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class FilterWriter(io.RawIOBase):
    """The server's stdout: whole lines to the client, except the reply to the replayed ``initialize``."""

    def __init__(self, fd: int, drop_id: str | None, recorder: Recorder | None):
        self.fd, self.drop_id, self.recorder = fd, drop_id, recorder
        self.partial = b""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.partial += data
        *lines, self.partial = self.partial.split(b"\n")
        out = []
        for line in lines:
            if self.drop_id is not None and self.drop_id.encode() in line:
                try:
                    if json.loads(line).get("id") == self.drop_id:
                        self.drop_id = None
                        continue
                except ValueError:
                    pass
            if self.recorder is not None and self.recorder.asked:
                _observe(line, self.recorder.reply)
            out.append(line + b"\n")
        if out:
            _write_all(self.fd, b"".join(out))
        return len(data)


def _may_be_recorded(line: bytes) -> bool:
    """A cheap look before parsing a request: could it be one the recorder keeps the reply of?"""
    return b"/list" in line or b"initialize" in line or b"server/discover" in line


def _observe(line: bytes, fn) -> None:
    try:
        msg = json.loads(line)
    except ValueError:
        return
    if isinstance(msg, dict):
        fn(msg)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _preload() -> None:
    try:
        import cc_tasks.server  # noqa: F401  (the import is the point: it warms the modules)
    except Exception:  # the handover imports it again and reports what is wrong
        pass


def serve(env: dict | os._Environ = os.environ) -> int:
    """Serve MCP over this process's stdin/stdout, answering the handshake before importing the server."""
    try:
        check_environment(env)
    except CCTasksError as e:  # as the server would: refuse to start, saying what is wrong
        sys.stderr.write(f"error: {e}\n")
        return 2
    # The wire gets private descriptors; fd 0 reads nothing and fd 1 goes to stderr, so that nothing a
    # library or a child prints can corrupt the protocol (the same guard the MCP stdio transport sets up).
    wire_in, wire_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    reader = os.fdopen(wire_in, "rb")
    path = cache_dir(env) / f"handshake-{cache_key()}.json"
    mode = env.get("CC_TASKS_FAST_HANDSHAKE", "1")  # 0: off; record: only record (what ``build`` runs)
    cache = load_cache(path) if mode == "1" else {}
    if cache and env.get("CC_TASKS_DEPTH", "0") in ("", "0"):
        threading.Thread(target=_preload, name="cc-tasks-preload", daemon=True).start()
    replay: list[bytes] = []
    drop_id: str | None = None
    version: str | None = None
    if not cache and mode == "1":
        build_in_background(path, env)
    while cache:
        line = reader.readline()
        if not line:
            return 0
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            replay.append(line)  # the server says what is wrong with it
            break
        method = msg.get("method")
        result = cached_reply(cache, version, msg)
        if result is not None:
            if method == "initialize":
                version = msg["params"]["protocolVersion"]
                drop_id = f"cc-tasks-front-{secrets.token_hex(6)}"
                replay.append(json.dumps({**msg, "id": drop_id}).encode() + b"\n")
            _write_all(wire_out, json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode() + b"\n")
            continue
        if method == "notifications/initialized" and drop_id is not None:
            replay.append(line if line.endswith(b"\n") else line + b"\n")
            continue
        if method is not None and "id" not in msg:
            continue  # other notifications (cancelled, roots changed) concern nothing the server holds yet
        replay.append(line if line.endswith(b"\n") else line + b"\n")
        break
    cache = result = None  # (the server lives on in this frame: keep none of the cache's ~1 MB of objects)
    recorder = Recorder(path, {}) if mode != "0" else None  # (merges with the file when it saves)
    if recorder is not None:
        recorder.version = version
        for line in replay:
            if drop_id is None or drop_id.encode() not in line:
                _observe(line, recorder.request)
    return handover(ReplayReader(b"".join(replay), reader, recorder), FilterWriter(wire_out, drop_id, recorder))


def handover(raw_in: io.RawIOBase, raw_out: io.RawIOBase) -> int:
    """Run the FastMCP server on these streams (it reads ``sys.stdin``/``sys.stdout`` when it starts)."""
    from .server import run_stdio  # here, not at the top: importing it is the cost this module avoids

    sys.stdin = io.TextIOWrapper(io.BufferedReader(raw_in), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw_out), encoding="utf-8", write_through=True)
    run_stdio()
    return 0


def build_in_background(path: Path, env: dict | os._Environ) -> None:
    """Start one detached process that asks a server of this code for its handshake and caches it (the
    server here may not live long enough: Claude Code stops a server that is slow to answer its first
    request, and a sub-agent may end before the server is up). At most one at a time per cache file."""
    lock = path.with_name(path.name + ".lock")
    try:
        if time.time() - lock.stat().st_mtime < BUILD_SECONDS:
            return
        lock.unlink()
    except OSError:
        pass
    try:
        lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return
    child_env = {k: v for k, v in env.items() if k not in ("CC_TASKS_TASK_ID", "CC_TASKS_FAST_HANDSHAKE")}
    child_env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    try:
        subprocess.Popen(
            [sys.executable, "-m", "cc_tasks.front", "build", str(path)],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        _unlink(lock)


def build(path: Path) -> int:
    """Run servers of this code with ``CC_TASKS_FAST_HANDSHAKE=record`` and ask them what the front caches:
    one under each stateless protocol version (2026), one in a session (``initialize``)."""
    deadline = time.monotonic() + BUILD_SECONDS
    client = {"name": "cc-tasks-front", "version": __version__}
    try:
        for version in MODERN_VERSIONS:
            meta = {
                "_meta": {
                    META_VERSION: version,
                    "io.modelcontextprotocol/clientInfo": client,
                    "io.modelcontextprotocol/clientCapabilities": {},
                }
            }
            _ask_server([("server/discover", meta)] + [(m, meta) for m in LISTS], deadline)
        hello = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": client}
        _ask_server([("initialize", hello), ("notifications/initialized", None)] + [(m, {}) for m in LISTS], deadline)
    except OSError:
        pass
    finally:
        _unlink(path.with_name(path.name + ".lock"))
    return 0


def _ask_server(requests: list[tuple[str, dict | None]], deadline: float) -> None:
    """One recording server; each request after the reply to the one before (params None: a notification)."""
    env = {**os.environ, "CC_TASKS_FAST_HANDSHAKE": "record", "CC_TASKS_DEPTH": os.environ.get("CC_TASKS_DEPTH", "1")}
    p = subprocess.Popen([sys.executable, "-m", "cc_tasks"], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for n, (method, params) in enumerate(requests, 1):
            msg = {"jsonrpc": "2.0", "method": method, **({"id": n, "params": params} if params is not None else {})}
            p.stdin.write(json.dumps(msg).encode() + b"\n")
            p.stdin.flush()
            while params is not None and time.monotonic() < deadline:
                line = p.stdout.readline()
                if not line:
                    raise OSError("the server ended")
                if _observe_id(line) == n:
                    break
    finally:
        p.stdin.close()
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _observe_id(line: bytes) -> object:
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg.get("id") if isinstance(msg, dict) else None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def main() -> int:
    try:
        return serve()
    except KeyboardInterrupt:  # Claude Code stops its servers with SIGINT
        return 130


if __name__ == "__main__":
    if sys.argv[1:2] == ["build"] and len(sys.argv) == 3:
        sys.exit(build(Path(sys.argv[2])))
    sys.exit(main())
