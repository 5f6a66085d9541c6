"""The store's own worker, started on demand: where the backend declares a ``worker_home`` (the local store),
a server or the CLI that has queued work makes sure one worker of this code's version runs there and nudges it
over its control socket (control.py). Nothing here claims or starts a task: the worker pulls its work."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from . import control, procs
from .errors import WorkerUnavailableError
from .models import ProcRef

#: How long a server waits for a worker it started to answer.
WORKER_START_WAIT = 10.0


class WorkerLauncher:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.socket_path = self.home / "worker.sock"
        #: the socket's inode and the process of a worker found to be of this code's version
        self._known: tuple[int, ProcRef] | None = None
        self._spawned: list[subprocess.Popen] = []
        self._spawn_lock = threading.Lock()
        self._spawned_lock = threading.Lock()

    def worker_known(self) -> bool:
        """True if this process already found a worker of its own version behind the socket, and that worker
        still lives (a dying one may still take a connection, and the nudge would be lost)."""
        known = self._known
        try:
            return known is not None and known[0] == os.stat(self.socket_path).st_ino and procs.alive(known[1])
        except OSError:
            return False

    def _remember(self, hello: dict) -> None:
        try:
            self._known = (os.stat(self.socket_path).st_ino, procs.ref_of(int(hello["pid"])))
        except (OSError, KeyError, ValueError, psutil.Error):
            self._known = None

    def nudge(self) -> None:
        """Have the worker look at the queue now, starting one if needed (WorkerUnavailableError if none could)."""
        if self.worker_known() and control.send(self.socket_path, {"op": "nudge"}):
            return
        self._known = None
        self.ensure_worker()
        if not control.send(self.socket_path, {"op": "nudge"}):
            self._known = None

    def ensure_worker(self) -> None:
        with self._spawn_lock:
            if self.worker_known():
                return
            try:
                with FileLock(str(self.home / "worker.lock")).acquire(timeout=30, poll_interval=0.002):
                    self._ensure_locked()
            except Timeout:
                raise WorkerUnavailableError(
                    f"could not start the store's worker: {self.home / 'worker.lock'} stayed locked for 30 s"
                ) from None

    def _ensure_locked(self) -> None:
        control.send(self.home / "launcher.sock", {"op": "quit"})  # cc-tasks 0.2's launcher: drain and go
        hello = self.worker_hello()
        if hello is not None:
            if control.same_version(hello):
                self._remember(hello)
                if self._known is not None:
                    return
            self.stop_worker()  # another version of cc-tasks: replace it
        self.socket_path.unlink(missing_ok=True)
        self.reap()
        # not part of any task: a server inside a task must not pass the task's id on (see procs.task_orphans)
        env = {k: v for k, v in os.environ.items() if k != "CC_TASKS_TASK_ID"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (control.PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "cc_tasks.worker", "--store", str(self.home), "--on-demand"]
        try:
            with open(self.home / "worker.log", "ab") as out:
                p = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    cwd=str(self.home), close_fds=True, start_new_session=True,
                )  # fmt: skip
        except OSError as e:
            raise WorkerUnavailableError(f"could not start the store's worker ({' '.join(argv)}): {e}") from None
        with self._spawned_lock:
            self._spawned.append(p)
        deadline = time.monotonic() + WORKER_START_WAIT
        while time.monotonic() < deadline and p.poll() is None:
            hello = self.worker_hello()
            if hello is not None:
                if control.same_version(hello):
                    self._remember(hello)
                    return
                break
            time.sleep(0.01)
        raise WorkerUnavailableError(
            f"the store's worker did not start (exit code {p.poll()}); see {self.home / 'worker.log'}"
        )

    def _ask(self, op: str) -> dict | None:
        try:
            return control.request(self.socket_path, {"op": op})
        except (OSError, ValueError):
            return None

    def worker_hello(self) -> dict | None:
        return self._ask("hello")

    def stop_worker(self) -> bool:
        """Ask the worker to take no more work and exit once its tasks have ended. True if one ran."""
        return self._ask("quit") is not None

    def reap(self, wait: float = 0.0) -> None:
        """Collect workers this process started that have exited (only those: never waitpid(-1))."""
        deadline = time.monotonic() + wait
        if wait > 0:
            for p in list(self._spawned):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.0, deadline - time.monotonic()))
        # never wait for the lock (a SIGCHLD handler may run this mid-call): the next call collects what this skips
        if self._spawned_lock.acquire(blocking=False):
            try:
                self._spawned = [p for p in self._spawned if p.poll() is None]
            finally:
                self._spawned_lock.release()
