"""Processes: identity that survives pid reuse, and stopping a whole process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

import psutil

from .models import ProcRef

#: Seconds to wait after SIGINT, then after SIGTERM, before SIGKILL.
GRACE_INT = 3.0
GRACE_TERM = 3.0
#: Once the root has exited after SIGINT, seconds its descendants still get (it may be stopping them) before
#: SIGTERM: they never got the SIGINT, so waiting out GRACE_INT for them only delays a cancel.
GRACE_AFTER_ROOT = 0.3


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): exact, and unlike the
    wall-clock create time it does not move when the system clock is stepped. None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


_own: dict[int, int | None] = {}


def _own_ticks() -> int | None:
    """This process's start ticks (a forked child has its own: keyed by pid)."""
    pid = os.getpid()
    if pid not in _own:
        _own[pid] = start_ticks(pid)
    return _own[pid]


def ref_of(pid: int) -> ProcRef:
    return ProcRef(pid=pid, create_time=psutil.Process(pid).create_time(), start_ticks=start_ticks(pid))


def process_of(ref: ProcRef | None) -> psutil.Process | None:
    """The live process behind ``ref``; None if it exited, is a zombie, or the pid was reused."""
    if ref is None:
        return None
    if ref.pid == os.getpid() and ref.start_ticks is not None and ref.start_ticks == _own_ticks():
        return psutil.Process()  # this process (the launcher, about the tasks it supervises)
    try:
        p = psutil.Process(ref.pid)
        ticks = start_ticks(ref.pid) if ref.start_ticks is not None else None
        if ticks is not None:
            if ticks != ref.start_ticks:
                return None
        elif abs(p.create_time() - ref.create_time) > 0.05:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


_seen_alive: dict[tuple[int, int | None], float] = {}


def alive(ref: ProcRef | None, max_age: float = 0.0) -> bool:
    """Whether ``ref``'s process lives; with ``max_age``, a process found alive that recently counts as
    alive without looking again (a poller checking the same supervisor for many tasks)."""
    if ref is None:
        return False
    key = (ref.pid, ref.start_ticks)
    if max_age > 0 and time.monotonic() - _seen_alive.get(key, -1e9) < max_age:
        return True
    if process_of(ref) is None:
        _seen_alive.pop(key, None)
        return False
    if len(_seen_alive) > 1000:
        _seen_alive.clear()
    _seen_alive[key] = time.monotonic()
    return True


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _child_pids(pid: int) -> list[int]:
    """Direct children from /proc/PID/task/*/children (Linux; ~50x cheaper than scanning every process)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.extend(int(x) for x in f.read().split())
    return out


def children(p: psutil.Process, recursive: bool = True) -> list[psutil.Process]:
    """``p.children()``, read from /proc's children lists where the kernel has them, else through psutil."""
    try:
        result: list[psutil.Process] = []
        todo = [p.pid]
        while todo:
            for c in _child_pids(todo.pop()):
                try:
                    result.append(psutil.Process(c))
                except psutil.NoSuchProcess:
                    continue
                if recursive:
                    todo.append(c)
        return result
    except OSError:
        try:
            return p.children(recursive=recursive)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []


def _descendants(p: psutil.Process) -> list[psutil.Process]:
    return children(p, recursive=True)


def _wait(procs: list[psutil.Process], timeout: float, reap: Callable[[], None] | None) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        if reap:
            reap()
        left = [p for p in procs if not _gone(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def stop_tree(
    root: psutil.Process | None,
    *,
    others: Iterable[psutil.Process] = (),
    reap: Callable[[], None] | None = None,
    grace_int: float = GRACE_INT,
    grace_term: float = GRACE_TERM,
) -> list[int]:
    """Stop ``root`` and all its descendants (and ``others``): SIGINT to root, then SIGTERM (once root exits,
    after GRACE_AFTER_ROOT; else after ``grace_int``), then SIGKILL.

    Descendants are snapshotted before any signal, since claude's tools run in sessions of their own
    and would be orphaned (and lost from view) once claude exits. ``reap`` is called while waiting so
    that a caller can collect its own children. Returns the pids that were stopped.
    """
    procs: list[psutil.Process] = []
    if root is not None and not _gone(root):
        procs.append(root)
        procs.extend(_descendants(root))
    for p in others:
        if not _gone(p) and p not in procs:
            procs.append(p)
    if not procs:
        return []
    pids = [p.pid for p in procs]
    if root is not None and root in procs:
        _signal([root], signal.SIGINT)
        if _wait([root], grace_int, reap):
            left = [p for p in procs if not _gone(p)]
        else:
            left = _wait(procs, GRACE_AFTER_ROOT, reap)
    else:
        left = procs
    for step_sig, grace in ((signal.SIGTERM, grace_term), (signal.SIGKILL, 5.0)):
        if not left:
            break
        # pick up anything the survivors started meanwhile
        extra = [d for p in left for d in _descendants(p) if d not in left]
        left = left + extra
        pids.extend(d.pid for d in extra)
        _signal(left, step_sig)
        left = _wait(left, grace, reap)
    return pids


#: Children owned by a Popen of this process: only their Popen may wait for them (see reap_children).
_owned: set[int] = set()
_owned_lock = threading.RLock()


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` whose pid is registered before any reaper of this process can see it, so that
    reap_children never steals its exit status. Call ``disown`` once the Popen has collected it."""
    with _owned_lock:
        p = subprocess.Popen(argv, **kwargs)
        _owned.add(p.pid)
    return p


def disown(pid: int) -> None:
    with _owned_lock:
        _owned.discard(pid)


def reap_children() -> None:
    """Collect exited children of this process that no Popen owns: orphans adopted as a subreaper."""
    with _owned_lock:
        for pid in _child_pids_safe(os.getpid()):
            if pid in _owned:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _child_pids_safe(pid: int) -> list[int]:
    try:
        return _child_pids(pid)
    except OSError:
        return [c.pid for c in children(psutil.Process(pid), recursive=False)]


def task_orphans(task_id: str) -> list[psutil.Process]:
    """Children of this process (a subreaper supervising several tasks) that no Popen owns and that carry the
    task's id in their environment (CC_TASKS_TASK_ID, set for claude and inherited by its tools)."""
    with _owned_lock:
        pids = [p for p in _child_pids_safe(os.getpid()) if p not in _owned]
    found = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("CC_TASKS_TASK_ID") == task_id:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def task_processes(task_id: str) -> list[psutil.Process]:
    """Every process of this user carrying the task's id in its environment (claude and its tools, wherever
    they were re-parented). A scan of all processes: for the rare case of a task whose supervisor died
    before recording claude's pid."""
    found = []
    for p in psutil.process_iter(["environ"]):
        env = p.info.get("environ") or {}
        if env.get("CC_TASKS_TASK_ID") == task_id and p.pid != os.getpid():
            found.append(p)
    return found


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux), so a task's tree stays in view."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
