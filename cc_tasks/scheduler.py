"""The shared queue: which waiting and queued tasks may start now, and starting their supervisors.

``pump`` runs under one store-wide lock, so whichever process calls it (any server, or the supervisor of a
task that just ended) sees the same queue and no task is started twice. A slot is held by a task whose
supervisor is alive; a SIGKILLed supervisor frees its slot as soon as anyone pumps.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Callable

from filelock import Timeout

from . import launcher, procs
from .errors import TaskNotFoundError
from .models import ProcRef, TaskRecord, TaskStatus
from .store import TaskStore

log = logging.getLogger("cc_tasks")
#: Statuses of dependencies that make a dependent task skip.
DEP_FAILED = frozenset({TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED, TaskStatus.SKIPPED})


def use_launcher() -> bool:
    """Fork supervisors from the warm launcher unless CC_TASKS_LAUNCHER=0."""
    return os.environ.get("CC_TASKS_LAUNCHER", "1") != "0"


def spawn_supervisor(store: TaskStore, task_id: str) -> subprocess.Popen:
    """Start the task's supervisor in a session of its own, with the environment its submitter had."""
    env = json.loads(store.path(task_id, "request.json").read_text())["env"]
    return launcher.spawn_module(store, ["cc_tasks.supervisor", str(store.root), task_id],
                                 store.path(task_id, "supervisor.log"), env)


def holds_slot(r: TaskRecord) -> bool:
    return r.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and r.supervisor is not None


def queue_order(r: TaskRecord) -> tuple:
    return (-r.priority, r.created_at, r.task_id)


def _read_all(store: TaskStore, ids: list[str]) -> dict[str, TaskRecord]:
    out = {}
    for t in ids:
        try:
            out[t] = store.read_cached(t)
        except (TaskNotFoundError, ValueError):
            continue
    return out


def fail_if_supervisor_died(store: TaskStore, r: TaskRecord) -> TaskRecord:
    """A task whose supervisor is gone (SIGKILL, reboot) fails; what is left of its claude tree is stopped."""
    if r.status.terminal or r.supervisor is None or procs.alive(r.supervisor):
        return r

    def fn(cur: TaskRecord) -> TaskRecord | None:
        if cur.status.terminal or cur.supervisor is None or procs.alive(cur.supervisor):
            return None
        procs.stop_tree(procs.process_of(cur.claude))
        log_path = store.path(cur.task_id, "supervisor.log")
        return cur.model_copy(update={"status": TaskStatus.FAILED, "error":
                                      f"the task's supervisor (pid {cur.supervisor.pid}) died; its process tree was "
                                      f"stopped (its output, if any, is in {log_path})"})
    try:
        return store.update(r.task_id, fn)
    except TaskNotFoundError:
        return r


def resolve_waiting(store: TaskStore, records: dict[str, TaskRecord]) -> None:
    """Move waiting tasks whose dependencies all completed to queued; skip those with a failed one."""
    changed = True
    while changed:
        changed = False
        for r in [r for r in records.values() if r.status == TaskStatus.WAITING]:
            verdict, reason = TaskStatus.QUEUED, None
            for dep in r.depends_on:
                d = records.get(dep)
                if d is None:
                    try:
                        d = records[dep] = store.read_cached(dep)
                    except TaskNotFoundError:
                        verdict, reason = TaskStatus.SKIPPED, f"dependency {dep} was deleted"
                        break
                if d.status in DEP_FAILED:
                    verdict, reason = TaskStatus.SKIPPED, f"dependency {dep} ended {d.status.value}"
                    break
                if d.status != TaskStatus.COMPLETED:
                    verdict = None
            if verdict is None:
                continue
            new = store.transition(r.task_id, verdict, **({"error": reason} if reason else {}))
            records[r.task_id] = new
            changed = changed or new.status != r.status


def _start_one(store: TaskStore, task_id: str, warm: bool,
               on_spawn: Callable[[subprocess.Popen], None] | None) -> tuple[ProcRef | None, bool]:
    """Start one supervisor: forked by the warm launcher, or exec'd directly. Returns (ref, still warm)."""
    if warm:
        try:
            return ProcRef(**launcher.launch(store, task_id)), True
        except OSError as e:
            log.warning("launcher failed (%s); starting supervisors directly", e)
    try:
        p = spawn_supervisor(store, task_id)
    except OSError as e:
        store.transition(task_id, TaskStatus.FAILED, error=f"could not start the task's supervisor: {e}")
        return None, False
    try:
        ref = procs.ref_of(p.pid)  # before anyone may reap it: a zombie still has its create time
    except Exception:
        ref = None
    if on_spawn:
        on_spawn(p)
    if ref is None:
        store.transition(task_id, TaskStatus.FAILED, error="the task's supervisor vanished at start")
    return ref, False


def pump(store: TaskStore, max_concurrent: int, on_spawn: Callable[[subprocess.Popen], None] | None = None,
         spawn: Callable[[str], ProcRef] | None = None, blocking: bool = True) -> list[str]:
    """Start as many queued tasks as free slots allow, highest priority then oldest first.

    ``spawn`` starts a supervisor in-process (the launcher forks); by default the launcher is asked, or the
    supervisor is exec'd. With ``blocking=False`` the pump is skipped when another process holds the lock."""
    started: list[str] = []
    lock = store.queue_lock()
    try:
        lock.acquire(timeout=None if blocking else 0, poll_interval=0.002)
    except Timeout:
        return started
    try:
        records = _read_all(store, store.active_ids())
        for t, r in list(records.items()):
            records[t] = fail_if_supervisor_died(store, r)
            store.unmark_if_finished(records[t])
        resolve_waiting(store, records)
        busy = sum(holds_slot(r) for r in records.values())
        ready = sorted((r for r in records.values() if r.status == TaskStatus.QUEUED and r.supervisor is None),
                       key=queue_order)
        to_start = ready[:max(0, max_concurrent - busy)]
        warm = spawn is None and bool(to_start) and use_launcher() and launcher.ensure_running(store, on_spawn)
        for r in to_start:
            if spawn is not None:
                ref = spawn(r.task_id)
            else:
                ref, warm = _start_one(store, r.task_id, warm, on_spawn)
            if ref is None:
                continue
            store.update(r.task_id, lambda cur, ref=ref: None if cur.supervisor or cur.status.terminal
                         else cur.model_copy(update={"supervisor": ref}))
            started.append(r.task_id)
    finally:
        lock.release()
    if started:
        log.info("started %d queued task(s): %s", len(started), ", ".join(started))
    return started


def queue_position(store: TaskStore, task_id: str) -> int | None:
    records = _read_all(store, store.active_ids())
    ready = sorted((r for r in records.values() if r.status == TaskStatus.QUEUED and r.supervisor is None),
                   key=queue_order)
    for i, r in enumerate(ready, 1):
        if r.task_id == task_id:
            return i
    return None
