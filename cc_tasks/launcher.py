"""The launcher: a warm, long-lived process per store that supervises the tasks it starts.

Starting a supervisor process per task costs CPU that a short task notices: a cold ``python -m`` start
~0.3 s (interpreter and imports), and even a fork of a warm Python process ~10 ms (copy-on-write faults
throughout its heap). The launcher pays for the imports once and supervises every task it starts in a
thread of its own (supervisord-style), each with its own ``Supervisor``: claude is its only process start.
It listens on ``<store>/launcher.sock`` (the store is 0700; peers must be this user), is a child
subreaper (what claude's tools leave behind is re-parented to it and stopped with its task, found by the
task id in its environment), reaps only children that no Popen of its own owns, and pumps the shared queue
itself, whenever a task it supervises ends, when a server sends ``kick`` after a submit, and once a
second, so queued tasks start even if every server has exited. ``quit`` makes it stop taking work and exit
once its tasks have ended; SIGTERM cancels them first. It exits after ``IDLE_EXIT`` seconds with nothing
to do. Servers start it when it is not running; if it cannot be reached, tasks get a supervisor process of
their own (scheduler.spawn_supervisor).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, procs
from .config import Settings
from .errors import TaskNotFoundError
from .models import TaskStatus
from .store import TaskStore, validate_task_id

if TYPE_CHECKING:  # (supervisor imports this module)
    from .supervisor import Supervisor


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
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(store.root),
            close_fds=True,
            start_new_session=True,
        )


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
    # not part of any task: a server inside a task must not pass the task's id on (see procs.task_orphans)
    env = {k: v for k, v in os.environ.items() if k != "CC_TASKS_TASK_ID"}
    p = spawn_module(store, ["cc_tasks.launcher", str(store.root)], store.root / "launcher.log", env)
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
    """Ask the store's launcher to take no more work and exit once the tasks it supervises have ended.
    True if one was running."""
    try:
        _request(store, {"op": "quit"})
        return True
    except (OSError, ValueError):
        return False


def launch(store: TaskStore, task_id: str) -> dict | None:
    """Ask the launcher to supervise the task; returns the ProcRef fields of its supervisor, or None if the
    task was not queued any more or had a supervisor already. Raises OSError if the launcher cannot."""
    try:
        reply = _request(store, {"op": "start", "task_id": task_id}, timeout=10.0)
    except (OSError, ValueError) as e:
        _verified.pop(str(socket_path(store)), None)
        raise OSError(f"launcher unreachable: {e}") from None
    if "ref" not in reply:
        raise OSError(reply.get("error", "launcher gave no pid"))
    return reply["ref"]


def cancel(store: TaskStore, task_id: str) -> bool:
    """Ask the launcher to cancel a task it supervises; True if it does."""
    try:
        return bool(_request(store, {"op": "cancel", "task_id": task_id}).get("ok"))
    except (OSError, ValueError):
        return False


class Launcher:
    def __init__(self, store: TaskStore):
        self.store = store
        self.max_concurrent = Settings.from_env().max_concurrent
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.last_activity = time.monotonic()
        self.quit = False  # take no more work; exit once the tasks supervised here have ended
        self.cancel_all = False  # SIGTERM: cancel those tasks first
        self.kicked = True
        self.last_pump = self.last_reap = 0.0
        self.supervising: dict[str, Supervisor] = {}  # task id -> its Supervisor (one thread each)
        self._lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self.me = procs.ref_of(os.getpid()).model_copy(update={"shared": True})

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

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
        self._bound = (path, os.stat(path).st_ino)
        self.sock.listen(128)
        self.sock.setblocking(False)
        procs.become_subreaper()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *a: self.stop(cancel=True))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.listening, self.cancelled = True, False
        while True:
            try:
                if self.serve_once():
                    break
            except Exception:  # one bad pass (EMFILE, say) must not end every task's supervision
                traceback.print_exc()
                if not self.store.active_dir.is_dir():  # the store was deleted: nothing is left to serve
                    self.stop(cancel=True)
                time.sleep(0.1)
        if self.listening:
            _unlink_if(*self._bound)

    def serve_once(self) -> bool:
        """Wait for a request, a wake-up or the next tick, and do what is due. True when it is time to exit."""
        watch = [self.sock, self._wake_r] if self.listening else [self._wake_r]
        poller = select.poll()  # (not select: fds may go beyond 1024 with many tasks)
        for fd in watch:
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll((0.005 if self.kicked else PUMP_EVERY) * 1000)}
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if time.monotonic() - self.last_reap >= PUMP_EVERY:  # orphans adopted from tasks' trees
            self.last_reap = time.monotonic()
            procs.reap_children()
        if self.listening and self.sock.fileno() in ready:  # every waiting request, then one pump for all kicks
            while True:
                try:
                    conn = self.sock.accept()[0]
                except (BlockingIOError, InterruptedError):
                    break
                conn.setblocking(True)
                self.handle(conn)
        if self.quit:
            if self.listening:  # a successor may bind the socket now
                self.listening = False
                self.sock.close()
                _unlink_if(*self._bound)
            if self.cancel_all and not self.cancelled:
                self.cancelled = True
                with self._lock:
                    for sup in self.supervising.values():
                        sup.request_stop()
            self.kicked = False
            return not self.supervising
        active = self.store.has_active()
        if active and time.monotonic() - self.last_pump >= PUMP_EVERY:
            self.pump(fresh=True)
            self.fail_lost_tasks()
        elif active and self.kicked:
            self.pump(fresh=False)
        elif not active:
            self.kicked = False
        return not active and not self.supervising and time.monotonic() - self.last_activity > IDLE_EXIT

    def stop(self, cancel: bool = False) -> None:
        self.quit = True
        self.cancel_all = self.cancel_all or cancel

    def handle(self, conn: socket.socket) -> None:
        self.last_activity = time.monotonic()
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
            return {"identity": IDENTITY, "pid": os.getpid(), "tasks": len(self.supervising)}
        if op == "kick":
            self.kicked = True
            return {"ok": True}
        if op == "quit":
            self.stop()
            return {"ok": True}
        if op == "start":
            if self.quit:
                return {"error": "the launcher is stopping"}
            ref = self.supervise(validate_task_id(msg.get("task_id")))
            return {"ref": ref.model_dump() if ref else None}
        if op == "cancel":
            with self._lock:  # (under the lock that _run closes it under: never a write to a closed pipe)
                sup = self.supervising.get(validate_task_id(msg.get("task_id")))
                if sup is not None:
                    sup.request_stop()
            return {"ok": sup is not None}
        return {"error": f"unknown op {op!r}"}

    def pump(self, fresh: bool) -> None:
        """Start what the queue allows, supervised here; if another process is pumping, try again soon.
        Pumps on kicks trust the cached records of queued tasks; one a second reads them all again."""
        if fresh:
            self.last_pump = time.monotonic()
        self.kicked = False  # (a task ending meanwhile sets it again)
        try:
            from .scheduler import pump

            if pump(self.store, self.max_concurrent, spawn=self.supervise, blocking=False, fresh=fresh) is None:
                self.kicked = True
        except Exception:
            traceback.print_exc()

    def fail_lost_tasks(self) -> None:
        """Fail tasks recorded as supervised here that no thread of this process supervises (a thread that
        died before writing the final record): with this process alive, nobody else would notice."""
        for t in self.store.active_ids():
            try:  # (the fresh pump has just read them; a stale one only costs a no-op transition)
                r = self.store.peek_cached(t) or self.store.read_cached(t, copy=False)
            except Exception:
                continue
            mine = r.supervisor is not None and r.supervisor.same_process(self.me)
            with self._lock:
                lost = mine and not r.status.terminal and t not in self.supervising
            if lost:
                procs.stop_tree(procs.process_of(r.claude))
                with contextlib.suppress(TaskNotFoundError):  # (deleted meanwhile)
                    self.store.transition(
                        t,
                        TaskStatus.FAILED,
                        error="its supervisor (a thread of the store's "
                        f"launcher) ended without a final record; see {self.store.root / 'launcher.log'}",
                    )

    def supervise(self, task_id: str):
        """Claim a queued task for this process and supervise it in a thread; the ProcRef recorded as its
        supervisor, or None if it is not queued or another supervisor has it."""
        from .supervisor import Supervisor, claim  # (here: supervisor imports this module)

        claimed = claim(self.store, task_id, self.me)
        if claimed is None:
            return None
        from .scheduler import note_started

        note_started(self.store, task_id)  # (when a server's pump asked for it, this process's view learns it)
        sup = None
        try:
            sup = Supervisor(self.store, task_id, shared=True)
            with self._lock:
                self.supervising[task_id] = sup
            threading.Thread(target=self._run, args=(sup, claimed), name=f"task-{task_id}", daemon=True).start()
        except Exception as e:
            with self._lock:
                self.supervising.pop(task_id, None)
                if sup is not None:
                    sup.close()
            self.store.transition(task_id, TaskStatus.FAILED, error=f"could not start the task's supervisor: {e}")
            return None
        return self.me

    def _run(self, sup, claimed) -> None:
        from .supervisor import supervise

        try:
            supervise(sup, claimed)
        finally:
            with self._lock:
                self.supervising.pop(sup.task_id, None)
                sup.close()
            self.last_activity = time.monotonic()
            self.kicked = True  # its slot is free
            self.wake()


def _unlink_if(path: Path, inode: int) -> None:
    """Remove the socket if it is still the one this launcher bound (not a successor's)."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cc_tasks.launcher STORE_DIR", file=sys.stderr)
        return 2
    import gc

    from . import scheduler, supervisor  # noqa: F401  (imported once, before any task needs them)

    gc.freeze()  # the imported modules live as long as the process: keep the collector off them
    Launcher(TaskStore(Path(argv[0]))).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
