"""The task manager: everything the tools do, callable directly from tests and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, Literal, Mapping

import anyio

from . import procs
from .command import build_argv, build_env
from .config import Settings
from .errors import DepthLimitError, InvalidOptionsError, TaskNotFoundError
from .models import (REPLY_TEXT_BUDGET, CleanupResult, OutputPage, TaskList, TaskOptions, TaskRecord,
                     TaskStatus, TaskSummary, WaitResult, utcnow)
from .store import TaskStore, new_task_id, validate_task_id

log = logging.getLogger("cc_tasks")
ProgressFn = Callable[[float, str], Awaitable[None]]
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
#: A queued task whose supervisor never recorded itself is declared dead after this many seconds.
START_GRACE = 60.0
#: How long cancel waits for a supervisor to stop its task before stopping it itself.
CANCEL_WAIT = 15.0
PROGRESS_EVERY = 1.0


def setup_logging(store: TaskStore) -> None:
    logger = logging.getLogger("cc_tasks")
    if any(getattr(h, "_cc_tasks", False) for h in logger.handlers):
        return
    handler = logging.handlers.RotatingFileHandler(store.root / "cc_tasks.log", maxBytes=1_000_000, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler._cc_tasks = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class TaskManager:
    def __init__(self, settings: Settings | None = None, env: Mapping[str, str] | None = None):
        self.settings = settings or Settings.from_env()
        self.store = TaskStore(self.settings.store_dir)
        self._env = env
        self._children: dict[int, subprocess.Popen] = {}
        self._children_lock = threading.Lock()
        setup_logging(self.store)

    # -- child processes -----------------------------------------------------
    def install_sigchld_handler(self) -> bool:
        """Reap this manager's supervisors as they exit. Only pids we spawned are ever waited for."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGCHLD, lambda signum, frame: self.reap())
        return True

    def reap(self, wait: float = 0.0) -> None:
        """Collect exited supervisors; with ``wait``, give running ones that long to exit first."""
        deadline = time.monotonic() + wait
        for pid, p in list(self._children.items()):
            try:
                if wait > 0:
                    p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is not None:
                self._children.pop(pid, None)

    # -- start ---------------------------------------------------------------
    def _check_start(self, opts: TaskOptions) -> tuple[str, str]:
        s = self.settings
        if s.depth >= s.max_depth:
            raise DepthLimitError(
                f"sub-agent nesting limit reached: this server runs at depth {s.depth} (CC_TASKS_DEPTH) and "
                f"CC_TASKS_MAX_DEPTH is {s.max_depth}; do this work yourself instead of starting another sub-agent")
        cwd = os.path.abspath(os.path.expanduser(opts.cwd)) if opts.cwd else os.getcwd()
        if not os.path.isdir(cwd):
            raise InvalidOptionsError(f"cwd {opts.cwd!r} does not exist or is not a directory; give an existing directory")
        for d in opts.add_dirs or []:
            if not os.path.isdir(os.path.expanduser(d)):
                raise InvalidOptionsError(f"add_dirs entry {d!r} does not exist or is not a directory")
        if isinstance(opts.mcp_config, str) and not opts.mcp_config.lstrip().startswith("{") \
                and not os.path.isfile(os.path.expanduser(opts.mcp_config)):
            raise InvalidOptionsError(f"mcp_config {opts.mcp_config!r} is neither a JSON object nor an existing file")
        return cwd, s.resolve_claude()

    def start(self, opts: TaskOptions) -> TaskRecord:
        cwd, claude = self._check_start(opts)
        task_id = new_task_id()
        record = TaskRecord(
            task_id=task_id, name=opts.name, cwd=cwd, model=opts.model, prompt_preview=opts.prompt[:200],
            timeout_seconds=opts.timeout_seconds or self.settings.default_timeout,
            depth=self.settings.depth + 1, metadata=opts.metadata)
        request = opts.model_dump(mode="json", exclude={"env"})
        request["env_names"] = sorted(opts.env or {})
        files = {
            "request.json": json.dumps(request).encode(),
            "prompt.txt": opts.prompt.encode("utf-8", "surrogatepass"),
            "launch.json": json.dumps({"argv": build_argv(opts, claude), "cwd": cwd}).encode(),
        }
        self.store.create(record, files)
        base = os.environ if self._env is None else self._env
        env = build_env(base, opts, depth=self.settings.depth, task_id=task_id, store_dir=str(self.store.root))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        try:
            with open(self.store.path(task_id, "supervisor.log"), "wb") as slog:
                p = subprocess.Popen([sys.executable, "-m", "cc_tasks.supervisor", str(self.store.root), task_id],
                                     stdin=subprocess.DEVNULL, stdout=slog, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.store.root), close_fds=True, start_new_session=True)
        except OSError as e:
            return self.store.transition(task_id, TaskStatus.FAILED, error=f"could not start the task's supervisor: {e}")
        with self._children_lock:
            self._children[p.pid] = p
        try:
            ref = procs.ref_of(p.pid)
            record = self.store.update(task_id, lambda r: None if r.supervisor or r.status.terminal
                                       else r.model_copy(update={"supervisor": ref}))
        except Exception:  # the supervisor may already be done; its own record write wins
            record = self.store.read(task_id)
        log.info("started task %s (supervisor pid %s) in %s", task_id, p.pid, cwd)
        return record

    # -- read ----------------------------------------------------------------
    def reconcile(self, record: TaskRecord) -> TaskRecord:
        """Fail an unfinished task whose supervisor is gone (SIGKILLed, machine rebooted)."""
        if record.status.terminal:
            self.store.unmark_if_finished(record)
            return record
        if record.supervisor is None:
            age = (utcnow() - record.created_at).total_seconds()
            if age < START_GRACE:
                return record
            reason = f"the task's supervisor never started (waited {START_GRACE:g}s)"
        elif procs.alive(record.supervisor):
            return record
        else:
            reason = f"the task's supervisor (pid {record.supervisor.pid}) died; its process tree was stopped"

        def fn(r: TaskRecord) -> TaskRecord | None:
            if r.status.terminal or (r.supervisor is not None and procs.alive(r.supervisor)):
                return None
            procs.stop_tree(procs.process_of(r.claude))
            return r.model_copy(update={"status": TaskStatus.FAILED, "error": reason})
        try:
            return self.store.update(record.task_id, fn)
        except TaskNotFoundError:
            return record

    def get(self, task_id: str) -> TaskRecord:
        return self.reconcile(self.store.read(validate_task_id(task_id)))

    def list(self, include_finished: bool = False, limit: int = 50, status: TaskStatus | None = None) -> TaskList:
        limit = max(1, min(int(limit), 500))
        records: list[TaskRecord] = []
        more = False
        ids = self.store.all_ids() if include_finished or (status and status.terminal) else iter(self.store.active_ids())
        for task_id in ids:
            try:
                r = self.reconcile(self.store.read(task_id))
            except TaskNotFoundError:
                continue
            if not include_finished and r.status.terminal:
                continue
            if status is not None and r.status != status:
                continue
            if len(records) == limit:
                more = True
                break
            records.append(r)
        records.sort(key=lambda r: r.created_at, reverse=True)
        return TaskList(tasks=[TaskSummary.of(r) for r in records], count=len(records), more=more)

    def output(self, task_id: str, offset: int = 0, limit: int = REPLY_TEXT_BUDGET,
               source: Literal["result", "transcript", "stderr"] = "result") -> OutputPage:
        record = self.get(task_id)
        if offset < 0:
            raise InvalidOptionsError("offset must be 0 or more (a byte offset; use next_offset from the previous page)")
        limit = max(1, min(int(limit), REPLY_TEXT_BUDGET))
        name = {"result": "result.txt", "transcript": "stdout.jsonl", "stderr": "stderr.log"}[source]
        path = self.store.path(task_id, name)
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(min(offset, total))
                data = f.read(limit)
        except FileNotFoundError:
            total, data = 0, b""
        start = min(offset, total)
        # cut at a UTF-8 character boundary so that no page splits a character
        if start + len(data) < total:
            cut = len(data)
            while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
                cut -= 1
            if cut > 0 and data[cut - 1] >= 0xC0:
                cut -= 1
            data = data[:cut] or data
        end = start + len(data)
        return OutputPage(task_id=task_id, source=source, offset=start, next_offset=end, total_bytes=total,
                          eof=end >= total, text=data.decode("utf-8", "replace"), status=record.status)

    # -- stop ----------------------------------------------------------------
    def cancel(self, task_id: str) -> TaskRecord:
        """Stop the task's whole process tree; the record stays with status ``cancelled``."""
        record = self.get(task_id)
        if record.status.terminal:
            return record
        self.store.update(task_id, lambda r: None if r.status.terminal else r.model_copy(update={"cancel_requested": True}))
        (self.store.task_dir(task_id) / "cancel").touch()
        self.store.append_event(task_id, "cancel_requested", by_pid=os.getpid())
        sup = procs.process_of(record.supervisor)
        if sup is not None:
            try:
                sup.send_signal(signal.SIGTERM)
            except Exception:
                pass
            deadline = time.monotonic() + CANCEL_WAIT
            while time.monotonic() < deadline:
                self.reap()
                if procs.process_of(record.supervisor) is None:  # it writes the record, then exits
                    break
                time.sleep(0.02)
        record = self.store.read(task_id)
        if record.status.terminal:
            return record
        # The supervisor is gone or unresponsive: stop everything ourselves.
        procs.stop_tree(procs.process_of(record.supervisor), others=[p for p in [procs.process_of(record.claude)] if p],
                        reap=self.reap, grace_int=0.5)
        self.reap()
        return self.store.transition(task_id, TaskStatus.CANCELLED, error="cancelled: the task's process tree was stopped")

    def cleanup(self, task_id: str) -> CleanupResult:
        record = self.get(task_id)
        was = record.status
        if not record.status.terminal:
            self.cancel(task_id)
        self.store.delete(task_id)
        log.info("cleaned up task %s (was %s)", task_id, was.value)
        return CleanupResult(task_id=task_id, deleted=True, was_status=was)

    # -- wait ----------------------------------------------------------------
    async def wait(self, task_ids: list[str], mode: Literal["all", "any"] = "all", timeout: float = 300.0,
                   progress: ProgressFn | None = None) -> WaitResult:
        if not task_ids:
            raise InvalidOptionsError("task_ids is empty: give at least one task id")
        ids = list(dict.fromkeys(validate_task_id(t) for t in task_ids))
        for t in ids:
            self.store.read(t)  # unknown ids fail before any waiting
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        interval = min(0.25, 0.025 * max(1, len(ids) / 4))
        next_progress = t0
        while True:
            records = [self.get(t) for t in ids]
            finished = [r.task_id for r in records if r.status.terminal]
            done = len(finished) == len(ids) if mode == "all" else bool(finished)
            now = time.monotonic()
            if done or now >= deadline:
                budget = max(500, REPLY_TEXT_BUDGET // max(1, len(records)) - 500)
                return WaitResult(done=done, timed_out=not done, finished=finished,
                                  pending=[t for t in ids if t not in finished],
                                  tasks=[r.bounded(budget) for r in records])
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                running = sum(r.status == TaskStatus.RUNNING for r in records)
                await progress(now - t0, f"{len(finished)}/{len(ids)} finished, {running} running, {now - t0:.0f}s")
            await asyncio.sleep(interval)

    async def execute(self, opts: TaskOptions, progress: ProgressFn | None = None) -> TaskRecord:
        """Run one task to its end. If the caller is cancelled, the task's process tree is stopped."""
        record = await anyio.to_thread.run_sync(self.start, opts)
        task_id = record.task_id
        t0 = time.monotonic()
        next_progress = t0
        try:
            while not record.status.terminal:
                now = time.monotonic()
                if progress is not None and now >= next_progress:
                    next_progress = now + PROGRESS_EVERY
                    p = record.progress
                    tool = f", last tool {p.last_tool}" if p.last_tool else ""
                    await progress(now - t0, f"{record.status.value}: {p.turns} turns{tool}, {now - t0:.0f}s")
                await asyncio.sleep(0.025)
                record = self.get(task_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.cancel, task_id)
            raise
        return record.bounded()
