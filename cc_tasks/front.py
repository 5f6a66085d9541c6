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

``CC_TASKS_FAST_HANDSHAKE=0`` turns this off (the server starts at once, as before). The cache folder must be
the user's own and private (mode 0700): what it holds goes into the model's context.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import sys
import time
import zlib
from pathlib import Path

from . import __version__
from .checks import check_environment, ensure_private_dir
from .errors import CCTasksError, ConfigError

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
#: After a build that failed, none is tried for this long.
FAILED_BUILD_PAUSE = 3600.0
#: Set by ``build`` for the servers it asks: the cache file they record into.
RECORD_ENV = "CC_TASKS_HANDSHAKE_RECORD"


def cache_dir(env: dict | os._Environ = os.environ) -> Path:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cc-tasks"


def private_cache_dir(env: dict | os._Environ = os.environ) -> Path | None:
    """The cache folder, made mode 0700 if missing; None if it is not safe to read (a symlink, another
    user's, writable by others): what it holds goes into the model's context (tool descriptions)."""
    try:
        return ensure_private_dir(cache_dir(env))
    except (OSError, CCTasksError):
        return None


def cache_key() -> str:
    """What the handshake depends on: this code (every module's size and mtime), the interpreter and its
    installed packages (site-packages' mtime changes on every install). No setting changes it."""
    parts = [f"{CACHE_FORMAT}\0{__version__}\0{sys.executable}\0{sys.version}"]
    pkg = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(pkg, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    for p in sorted(set(sys.path)):
        if p.endswith("-packages"):
            try:
                parts.append(f"{p}:{os.stat(p).st_mtime_ns}")
            except OSError:
                pass
    data = "\0".join(parts).encode()  # (two checksums: no hashlib, whose OpenSSL costs a start 3 ms)
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}{len(data):x}"


def load_cache(path: Path) -> dict:
    """The cache: {protocol version: {method: result}}; anything else (cut short, edited) counts as none."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and all(
        isinstance(v, dict) and all(isinstance(r, dict) for r in v.values()) for v in data.values()
    )
    return data if ok else {}


def save_cache(path: Path, data: dict) -> None:
    """Atomically, mode 0600, best effort (a cache that cannot be written only makes the next start slower);
    caches of other versions of the code are removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
        for old in path.parent.glob("handshake-*.json"):
            if old != path:
                _unlink(old)
    except OSError:
        _unlink(tmp)


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

    def __init__(self, path: Path):
        self.path = path
        self.asked: dict[object, tuple[str, str | None]] = {}  # request id -> (method, protocol version)
        self.version: str | None = None
        self.lock = _thread.allocate_lock()

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
                cache = load_cache(self.path)  # (a concurrent build may have written it)
                if cache.get(version, {}).get(method) != msg["result"]:
                    cache.setdefault(version, {})[method] = msg["result"]
                    save_cache(self.path, cache)


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
            if self.drop_id is not None and self.drop_id.encode() in line and _observe_id(line) == self.drop_id:
                self.drop_id = None
                continue
            out.append(line + b"\n")
        if out:
            _write_all(self.fd, b"".join(out))
            if self.recorder is not None and self.recorder.asked:  # (after the client has its reply)
                for line in out:
                    _observe(line, self.recorder.reply)
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
        if env.get("CC_TASKS_FAST_HANDSHAKE", "1") not in ("0", "1"):
            raise ConfigError(f"CC_TASKS_FAST_HANDSHAKE={env['CC_TASKS_FAST_HANDSHAKE']!r}: give 1 (default) or 0")
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
    recording = env.get(RECORD_ENV)  # (set by ``build`` for the servers it asks)
    folder = None if recording or env.get("CC_TASKS_FAST_HANDSHAKE") == "0" else private_cache_dir(env)
    path = Path(recording) if recording else (folder / f"handshake-{cache_key()}.json" if folder else None)
    cache = load_cache(path) if folder and path else {}
    if cache and env.get("CC_TASKS_DEPTH", "0") in ("", "0"):
        import threading  # (the rest of this module imports only what answering a handshake needs)

        threading.Thread(target=_preload, name="cc-tasks-preload", daemon=True).start()
    if folder and path and not cache:
        build_in_background(path, env)
    replay: list[bytes] = []
    drop_id: str | None = None
    version: str | None = None
    while cache:
        line = reader.readline()
        if not line:
            return 0
        line = line if line.endswith(b"\n") else line + b"\n"
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            replay.append(line)  # the server says what is wrong with it
            break
        method = msg.get("method")
        result = cached_reply(cache, version, msg) if not (method == "initialize" and drop_id) else None
        if result is not None:
            if method == "initialize":
                version = msg["params"]["protocolVersion"]
                drop_id = f"cc-tasks-front-{os.urandom(6).hex()}"
                replay.append(json.dumps({**msg, "id": drop_id}).encode() + b"\n")
            _write_all(wire_out, json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode() + b"\n")
            continue
        if method == "notifications/initialized" and drop_id is not None:
            replay.append(line)
            continue
        if method is not None and "id" not in msg:
            continue  # other notifications (cancelled, roots changed) concern nothing the server holds yet
        replay.append(line)
        break
    cache = result = None  # (the server lives on in this frame: keep none of the cache's ~1 MB of objects)
    recorder = Recorder(path) if path else None
    if recorder is not None:
        recorder.version = version
        for line in replay:
            if drop_id is None or drop_id.encode() not in line:
                _observe(line, recorder.request)
    return handover(ReplayReader(b"".join(replay), reader, recorder), FilterWriter(wire_out, drop_id, recorder))


class ServerStdout:
    """``sys.stdout`` while the server runs: its ``buffer`` is the wire (what the MCP stdio transport
    writes to), text written to it goes to stderr (a stray print must not corrupt the protocol)."""

    def __init__(self, wire: io.BufferedWriter):
        self.buffer = wire

    def __getattr__(self, name: str):
        return getattr(sys.stderr, name)

    def write(self, text: str) -> int:
        return sys.stderr.write(text)


def handover(raw_in: io.RawIOBase, raw_out: io.RawIOBase) -> int:
    """Run the FastMCP server on these streams (the MCP stdio transport takes ``sys.stdin``'s and
    ``sys.stdout``'s buffers when it starts). If the server cannot start, every request gets an error
    reply saying why (the handshake went well: the client waits for answers), and the process exits at EOF."""
    stdin = io.TextIOWrapper(io.BufferedReader(raw_in), encoding="utf-8", errors="replace")
    try:
        from .manager import TaskManager  # here, not at the top: importing these is the cost this module avoids
        from .server import run_stdio

        manager = TaskManager()
    except Exception as e:  # noqa: BLE001 (whatever it is, the client must hear it)
        message = str(e) if isinstance(e, CCTasksError) else f"{type(e).__name__}: {e}"
        sys.stderr.write(f"error: {message}\n")
        for line in stdin:
            msg_id = _observe_id(line.encode()) if '"method"' in line else None
            if msg_id is not None:
                error = {"code": -32603, "message": f"cc-tasks cannot start: {message}"}
                raw_out.write(json.dumps({"jsonrpc": "2.0", "id": msg_id, "error": error}).encode() + b"\n")
        return 2
    sys.stdin = stdin
    sys.stdout = ServerStdout(io.BufferedWriter(raw_out))
    run_stdio(manager)
    return 0


def build_in_background(path: Path, env: dict | os._Environ) -> None:
    """Start one detached process that asks a server of this code for its handshake and caches it (the
    server here may not live long enough: Claude Code stops a server that is slow to answer its first
    request, and a sub-agent may end before the server is up). At most one at a time per cache file, and
    none for an hour after one that failed."""
    lock, failed = path.with_name(path.name + ".lock"), path.with_name(path.name + ".failed")
    try:
        if time.time() - failed.stat().st_mtime < FAILED_BUILD_PAUSE:
            return
    except OSError:
        pass
    try:
        if time.time() - lock.stat().st_mtime < BUILD_SECONDS:
            return
        _unlink(lock)  # (a stale one: its builder died)
    except OSError:
        pass
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    except OSError:
        return
    import subprocess  # (a cache miss only)

    root = str(Path(__file__).resolve().parent.parent)
    child_env = {k: v for k, v in env.items() if k not in ("CC_TASKS_TASK_ID", "CC_TASKS_FAST_HANDSHAKE")}
    child_env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    try:
        subprocess.Popen(
            [sys.executable, "-m", "cc_tasks.front", "build", str(path)],
            env=child_env,
            cwd=root,  # (so that no cc_tasks folder of the client's project shadows this one)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        _unlink(lock)


def build(path: Path) -> int:
    """Run servers of this code that record into ``path`` and ask them what the front caches: one under
    each stateless protocol version (2026), one in a session (``initialize``). They run on a scratch store
    (the handshake does not depend on it), so that nothing of the user's tasks is touched."""
    import contextlib
    import shutil
    import tempfile

    deadline = time.monotonic() + BUILD_SECONDS
    client = {"name": "cc-tasks-front", "version": __version__}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = tempfile.mkdtemp(prefix="cc-tasks-handshake-")
    env = {k: v for k, v in os.environ.items() if k != "CC_TASKS_BACKEND"}
    env.update({RECORD_ENV: str(path), "CC_TASKS_DIR": scratch, "CC_TASKS_DEPTH": "1"})
    try:
        for version in MODERN_VERSIONS:
            meta = {
                "_meta": {
                    META_VERSION: version,
                    "io.modelcontextprotocol/clientInfo": client,
                    "io.modelcontextprotocol/clientCapabilities": {},
                }
            }
            _ask_server([("server/discover", meta)] + [(m, meta) for m in LISTS], env, deadline)
        hello = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": client}
        requests = [("initialize", hello), ("notifications/initialized", None)] + [(m, {}) for m in LISTS]
        _ask_server(requests, env, deadline)
    except OSError:
        pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        cache = load_cache(path)
        if not (all(v in cache for v in MODERN_VERSIONS) and LEGACY_VERSION in cache):
            with contextlib.suppress(OSError):
                path.with_name(path.name + ".failed").touch()
        _unlink(path.with_name(path.name + ".lock"))
    return 0


def _ask_server(requests: list[tuple[str, dict | None]], env: dict, deadline: float) -> None:
    """One recording server; each request after the reply to the one before (params None: a notification).
    Killed at the deadline whatever it does."""
    import subprocess
    import threading

    p = subprocess.Popen([sys.executable, "-m", "cc_tasks"], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), p.kill)
    watchdog.start()
    try:
        for n, (method, params) in enumerate(requests, 1):
            msg = {"jsonrpc": "2.0", "method": method, **({"id": n, "params": params} if params is not None else {})}
            p.stdin.write(json.dumps(msg).encode() + b"\n")
            p.stdin.flush()
            while params is not None:
                line = p.stdout.readline()
                if not line:
                    raise OSError("the server ended")
                if _observe_id(line) == n:
                    break
    finally:
        try:
            p.stdin.close()
            p.wait(max(1.0, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired):
            p.kill()
            p.wait()
        watchdog.cancel()


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
