"""The launcher: a warm, single-threaded process per store that forks task supervisors on request.

Starting a supervisor with ``python -m cc_tasks.supervisor`` costs ~0.3 s of CPU (interpreter start and
imports), as much as a third of a short claude run. The launcher pays that once: it imports everything,
listens on ``<store>/launcher.sock`` (the store is 0700; peers must be this user), and for each request
forks a child that becomes the task's supervisor, a process of its own in a session of its own, exactly
as if it had been exec'd. The launcher reaps only the children it forked, and exits after being idle for
``IDLE_EXIT`` seconds with no child and no unfinished task left. It also pumps the shared queue itself,
once a second and whenever a server sends ``kick`` after a submit, so queued tasks start even if every
server has exited. Servers start it when it is not running; if it cannot be reached, supervisors are
spawned directly (scheduler.spawn_supervisor).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .store import TaskStore

def _idle_exit() -> float:
    try:
        return max(1.0, float(os.environ.get("CC_TASKS_LAUNCHER_IDLE") or 600))
    except ValueError:
        return 600.0  # a bad value must not break every command that imports this module


IDLE_EXIT = _idle_exit()
PUMP_EVERY = 1.0
CONNECT_TIMEOUT = 2.0
START_WAIT = 10.0
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
IDENTITY = {"version": __version__, "package": PACKAGE_PARENT, "python": sys.executable}


def socket_path(store: TaskStore) -> Path:
    return store.root / "launcher.sock"


def _request(store: TaskStore, msg: dict, timeout: float = CONNECT_TIMEOUT) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path(store)))
        s.sendall(json.dumps(msg).encode() + b"\n")
        return json.loads(_recv_line(s) or b"{}")


def _recv_line(s: socket.socket) -> bytes:
    """Bytes up to and including the first newline, or whatever came before the peer closed."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


_verified: dict[str, float] = {}  # socket path -> inode of a launcher this process found to be of its version


def is_known_good(store: TaskStore) -> bool:
    """True if this process already found a launcher of its own version behind the store's socket."""
    try:
        return _verified.get(str(socket_path(store))) == os.stat(socket_path(store)).st_ino
    except OSError:
        return False


def ensure_running(store: TaskStore, on_spawn=None) -> bool:
    """Make sure a launcher of this code version serves the store; start one if needed (call under the queue lock)."""
    if is_known_good(store):
        return True
    from filelock import FileLock, Timeout
    try:
        with FileLock(str(store.root / "launcher.lock"), timeout=30):
            return _ensure_running_locked(store, on_spawn)
    except (Timeout, OSError):
        return False  # callers start supervisors directly


def spawn_module(store: TaskStore, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m ARGS`` in a session of its own (it outlives its parent), output to ``log_path``, with this
    package importable whether it is installed or run from a checkout."""
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(store.root), close_fds=True,
                                start_new_session=True)


def _remember(store: TaskStore) -> None:
    _verified[str(socket_path(store))] = os.stat(socket_path(store)).st_ino


def _ensure_running_locked(store: TaskStore, on_spawn=None) -> bool:
    try:
        hello = _request(store, {"op": "hello"})
        if hello.get("identity") == IDENTITY:
            _remember(store)
            return True
        _request(store, {"op": "quit"})  # another version of cc-tasks: replace it
    except (OSError, ValueError):
        pass
    try:
        os.unlink(socket_path(store))
    except FileNotFoundError:
        pass
    p = spawn_module(store, ["cc_tasks.launcher", str(store.root)], store.root / "launcher.log", dict(os.environ))
    if on_spawn:
        on_spawn(p)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return False
        try:
            if _request(store, {"op": "hello"}).get("identity") == IDENTITY:
                _remember(store)
                return True
            return False
        except (OSError, ValueError):
            time.sleep(0.01)
    return False


def kick(store: TaskStore) -> bool:
    """Ask the store's launcher to look at the queue soon, without waiting for it: the request waits in the
    socket's backlog until the launcher gets to it. False if no launcher is listening."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(socket_path(store)))
            s.sendall(b'{"op": "kick"}\n')
        return True
    except OSError:
        _verified.pop(str(socket_path(store)), None)  # gone: the next ensure_running starts a new one
        return False


def stop(store: TaskStore) -> bool:
    """Ask the store's launcher to exit (its supervisors keep running). True if one was running."""
    try:
        _request(store, {"op": "quit"})
        return True
    except (OSError, ValueError):
        return False


def launch(store: TaskStore, task_id: str) -> dict:
    """Ask the launcher to fork the task's supervisor; returns its ProcRef fields. Raises OSError."""
    try:
        reply = _request(store, {"op": "start", "task_id": task_id}, timeout=10.0)
    except (OSError, ValueError) as e:
        _verified.pop(str(socket_path(store)), None)
        raise OSError(f"launcher unreachable: {e}") from None
    if "ref" not in reply:
        raise OSError(reply.get("error", "launcher gave no pid"))
    return reply["ref"]


class Launcher:
    def __init__(self, store: TaskStore):
        self.store = store
        self.children: set[int] = set()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.last_activity = time.monotonic()
        self.quit = False
        self._conn: socket.socket | None = None
        self._own_fds: list[int] = []
        self.kicked = True
        self.last_pump = 0.0

    def serve(self) -> None:
        path = socket_path(self.store)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        bound = os.stat(path).st_ino
        self.sock.listen(128)
        self.sock.setblocking(False)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self._own_fds = [wake_r, wake_w]
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGTERM, lambda *a: setattr(self, "quit", True))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        while not self.quit:
            ready, _, _ = select.select([self.sock, wake_r], [], [], PUMP_EVERY)
            if wake_r in ready:
                os.read(wake_r, 4096)
            self.reap()
            if self.sock in ready:  # take every waiting request, then pump once for all their kicks
                while True:
                    try:
                        conn = self.sock.accept()[0]
                    except (BlockingIOError, InterruptedError):
                        break
                    conn.setblocking(True)
                    self.handle(conn)
            active = bool(self.store.active_ids())
            if active and (self.kicked or time.monotonic() - self.last_pump >= PUMP_EVERY):
                self.pump()
            if not active and not self.children and time.monotonic() - self.last_activity > IDLE_EXIT:
                break
        try:
            if os.stat(path).st_ino == bound:  # not a successor's socket
                os.unlink(path)
        except OSError:
            pass

    def reap(self) -> None:
        for pid in list(self.children):  # only pids this launcher forked
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)
                self.last_activity = time.monotonic()

    def handle(self, conn: socket.socket) -> None:
        self.last_activity = time.monotonic()
        self._conn = conn
        with conn:
            try:
                conn.settimeout(5.0)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
                if uid != os.getuid():
                    return
                buf = _recv_line(conn)
                if not buf.endswith(b"\n"):
                    return
                msg = json.loads(buf)
                reply = self.dispatch(msg)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except Exception as e:  # a bad client must not take the launcher down
                try:
                    conn.sendall(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
                except OSError:
                    pass

    def dispatch(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "hello":
            return {"identity": IDENTITY, "pid": os.getpid(), "children": len(self.children)}
        if op == "kick":
            self.kicked = True
            return {"ok": True}
        if op == "quit":
            self.quit = True
            return {"ok": True}
        if op == "start":
            from .store import validate_task_id
            task_id = validate_task_id(msg.get("task_id"))
            return {"ref": self._spawn_ref(task_id).model_dump()}
        return {"error": f"unknown op {op!r}"}

    def pump(self) -> None:
        """Start what the queue allows, forking supervisors here; skip if another process is pumping."""
        self.kicked = False
        self.last_pump = time.monotonic()
        try:
            from .config import Settings
            from .scheduler import pump
            pump(self.store, Settings.from_env().max_concurrent, spawn=self._spawn_ref, blocking=False)
        except Exception:
            traceback.print_exc()

    def _spawn_ref(self, task_id: str):
        from .procs import ref_of
        return ref_of(self.fork_supervisor(task_id))  # a zombie still has its start time: no race with reaping

    def fork_supervisor(self, task_id: str) -> int:
        pid = os.fork()
        if pid:
            self.children.add(pid)
            return pid
        # the child: a supervisor of its own, as if freshly exec'd
        code = 1
        try:
            self.sock.close()
            if self._conn is not None:  # the request's connection and the wake pipe are not the child's
                self._conn.close()
            signal.set_wakeup_fd(-1)
            for fd in getattr(self, "_own_fds", []):
                os.close(fd)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            env = json.loads(self.store.path(task_id, "request.json").read_text())["env"]
            os.environ.clear()
            os.environ.update(env)
            with open(self.store.path(task_id, "supervisor.log"), "ab") as slog:
                os.dup2(slog.fileno(), 1)
                os.dup2(slog.fileno(), 2)
            from .supervisor import main as supervisor_main
            code = supervisor_main([str(self.store.root), task_id])
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)


def warm_imports() -> None:
    """Import what a supervisor needs, once, so that forked children start warm."""
    from . import supervisor  # noqa: F401  (pulls in models, store, scheduler, stream, procs)
    from .models import Attempt, Progress, TaskOptions, TaskRecord
    for model in (TaskRecord, TaskOptions, Progress, Attempt):
        model.model_rebuild()
    import ctypes  # noqa: F401  (procs.become_subreaper)

    import psutil
    psutil.Process().create_time()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cc_tasks.launcher STORE_DIR", file=sys.stderr)
        return 2
    warm_imports()
    import gc
    gc.freeze()  # keep the collector of forked children off the inherited objects (fewer copy-on-write faults)
    Launcher(TaskStore(Path(argv[0]))).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
