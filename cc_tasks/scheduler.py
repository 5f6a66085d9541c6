"""The shared queue: which waiting and queued tasks may start now, and starting their supervisors.

``pump`` runs under one store-wide lock, so whichever process calls it (any server, or the supervisor of a
task that just ended) sees the same queue and no task is started twice. A slot is held by a task whose
supervisor is alive; a SIGKILLed supervisor frees its slot as soon as anyone pumps.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

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
    return launcher.spawn_module(
        store, ["cc_tasks.supervisor", str(store.root), task_id], store.path(task_id, "supervisor.log"), env
    )


def holds_slot(r: TaskRecord) -> bool:
    return r.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and r.supervisor is not None


def queue_order(r: TaskRecord) -> tuple:
    return (-r.priority, r.created_at, r.task_id)


def _read_all(store: TaskStore, ids: list[str]) -> dict[str, TaskRecord]:
    """The records (shared, read-only: the scheduler replaces records, never changes them)."""
    out = {}
    for t in ids:
        try:
            out[t] = store.read_cached(t, copy=False)
        except (TaskNotFoundError, ValueError):
            continue
    return out


def fail_if_supervisor_died(store: TaskStore, r: TaskRecord, alive_max_age: float = 0.0) -> TaskRecord:
    """A task whose supervisor is gone (SIGKILL, reboot) fails; what is left of its claude tree is stopped.
    ``alive_max_age``: a supervisor found alive that recently is not looked at again (for pollers)."""
    if r.status.terminal or r.supervisor is None or procs.alive(r.supervisor, max_age=alive_max_age):
        return r

    def fn(cur: TaskRecord) -> TaskRecord | None:
        if cur.status.terminal or cur.supervisor is None or procs.alive(cur.supervisor):
            return None
        if cur.claude is not None:
            procs.stop_tree(procs.process_of(cur.claude))
        else:  # it died before recording claude's pid
            procs.stop_tree(None, others=procs.task_processes(cur.task_id))
        log_path = store.root / "launcher.log" if cur.supervisor.shared else store.path(cur.task_id, "supervisor.log")
        return cur.model_copy(
            update={
                "status": TaskStatus.FAILED,
                "error": f"the task's supervisor (pid {cur.supervisor.pid}) died; its process tree was "
                f"stopped (its output, if any, is in {log_path})",
            }
        )

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
                        d = records[dep] = store.read_cached(dep, copy=False)
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


def _start_one(
    store: TaskStore, task_id: str, warm: bool, on_spawn: Callable[[subprocess.Popen], None] | None
) -> tuple[ProcRef | None, bool]:
    """Have the task supervised: by the warm launcher, or by a supervisor process of its own. Returns (ref,
    still warm); ref is None if the task was not started (it ended, or a supervisor has it already)."""
    if warm:
        try:
            ref = launcher.launch(store, task_id)
            return (ProcRef(**ref) if ref else None), True
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


def _ready(r: TaskRecord) -> bool:
    return r.status == TaskStatus.QUEUED and r.supervisor is None


class QueueView:
    """What this process's pumps have seen of the queue, so that a pump need not read and sort every
    queued task again: ``ready`` holds the queued tasks in start order, ``others`` the rest of the active
    ones (holding a slot, or waiting). A queued task's record changes only when a pumper starts it or it is
    cancelled, and a refused start shows either; a fresh pump (the launcher does one a second) reads all."""

    def __init__(self, records: Mapping[str, TaskRecord] = {}):
        ready = [r for r in records.values() if _ready(r)]
        self.ready: list[tuple[tuple, str]] = sorted((queue_order(r), r.task_id) for r in ready)
        self.queued: set[str] = {r.task_id for r in ready}
        self.others: set[str] = {t for t, r in records.items() if not _ready(r)}

    def note(self, r: TaskRecord) -> None:
        if _ready(r):
            if r.task_id not in self.queued:
                bisect.insort(self.ready, (queue_order(r), r.task_id))
                self.queued.add(r.task_id)
            self.others.discard(r.task_id)
        else:  # its entry in ``ready`` is dropped when reached
            self.queued.discard(r.task_id)
            self.others.add(r.task_id)

    def keep(self, ids: set[str]) -> None:
        self.queued &= ids
        self.others &= ids

    def started(self, task_id: str) -> None:
        self.queued.discard(task_id)
        self.others.add(task_id)

    def first(self, n: int, skip: set[str]) -> list[str]:
        """Up to ``n`` queued tasks not in ``skip``, in start order (entries of tasks no longer queued are
        dropped)."""
        out: list[str] = []
        i = 0
        while i < len(self.ready) and len(out) < n:
            t = self.ready[i][1]
            if t not in self.queued:
                del self.ready[i]
                continue
            if t not in skip:
                out.append(t)
            i += 1
        return out


_views: dict[Path, QueueView] = {}


def note_started(store: TaskStore, task_id: str) -> None:
    """Tell this process's queue view that a task was started (the launcher, asked by another process)."""
    view = _views.get(store.root)
    if view is not None:
        view.started(task_id)


def pump(
    store: TaskStore,
    max_concurrent: int,
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
    spawn: Callable[[str], ProcRef | None] | None = None,
    blocking: bool = True,
    fresh: bool = True,
) -> list[str] | None:
    """Start as many queued tasks as free slots allow, highest priority then oldest first.

    ``spawn`` supervises a task in this process (the launcher: it records itself as the supervisor); by
    default the launcher is asked, or a supervisor process is started. With ``blocking=False`` the pump is
    skipped, returning None, when another process holds the lock. ``fresh=False`` reads only the records
    of tasks that are new or not queued (see QueueView): for the usual pumper of a store, the launcher."""
    started: list[str] = []
    lock = store.queue_lock()
    try:
        lock.acquire(timeout=None if blocking else 0, poll_interval=0.002)
    except Timeout:
        return None
    try:
        ids = store.active_ids()
        store.keep_cached(ids)
        view = None if fresh else _views.get(store.root)
        if view is None:
            records = _read_all(store, ids)
        else:
            view.keep(set(ids))
            records = _read_all(store, [t for t in ids if t not in view.queued])
        for t, r in list(records.items()):
            records[t] = fail_if_supervisor_died(store, r)
            store.unmark_if_finished(records[t])
        resolve_waiting(store, records)
        if view is None:
            view = _views[store.root] = QueueView(records)
        else:
            for r in records.values():
                view.note(r)
        free = max(0, max_concurrent - sum(holds_slot(r) for r in records.values()))
        warm = (
            spawn is None
            and free > 0
            and bool(view.queued)
            and use_launcher()
            and launcher.ensure_running(store, on_spawn)
        )
        tried: set[str] = set()
        while free > 0:
            batch = view.first(free, skip=tried)
            if not batch:
                break
            for t in batch:
                tried.add(t)
                if spawn is not None:
                    ref = spawn(t)
                else:
                    ref, warm = _start_one(store, t, warm, on_spawn)
                    if ref is not None and not ref.shared:  # a launcher records itself; a new process is recorded here
                        store.update(
                            t,
                            lambda cur, ref=ref: (
                                None
                                if cur.supervisor or cur.status.terminal
                                else cur.model_copy(update={"supervisor": ref})
                            ),
                        )
                if ref is not None:
                    started.append(t)
                    view.started(t)
                    free -= 1
                    continue
                try:  # refused: it was cancelled, or someone else started it (then it holds a slot)
                    r = store.read_cached(t, copy=False)
                except TaskNotFoundError:
                    view.queued.discard(t)
                    continue
                view.note(r)
                if holds_slot(r):
                    free -= 1
    finally:
        lock.release()
    if started:
        log.info("started %d queued task(s): %s", len(started), ", ".join(started))
    return started


def queue_position(store: TaskStore, task_id: str) -> int | None:
    records = _read_all(store, store.active_ids())
    ready = sorted(
        (r for r in records.values() if r.status == TaskStatus.QUEUED and r.supervisor is None), key=queue_order
    )
    for i, r in enumerate(ready, 1):
        if r.task_id == task_id:
            return i
    return None
