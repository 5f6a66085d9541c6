"""The supervisor of one task: runs its claude under the worker's lease, follows it, and finishes the task.

A worker (worker.py) claims a task and runs a ``Supervisor`` for it in a thread of its own. The supervisor
starts claude with stdout/stderr going to files in the task's workspace and the prompt on stdin, follows
the stream-json transcript to keep the record's live progress, enforces the timeout, retries transient
failures that used no tool, stops the whole tree on cancel (``request_stop``, or the backend's cancel
marker), and finishes the task. Every write it makes goes through the backend under the task's lease:
once the lease is lost (``LeaseLostError``), it stops claude's tree and writes nothing more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import subprocess
import time
import traceback
from pathlib import Path

import psutil

from . import procs, worktrees
from .command import asks_approval, build_argv, build_env, servers_to_deny
from .config import Settings
from .desk import ApprovalDesk, request_timeout
from .engine import TaskEngine as Backend
from .engine import dependency_preamble
from .errors import BackendUnreachableError, CCTasksError, GitError, LeaseLostError
from .ids import HOST, atomic_write
from .models import RESULT_PREVIEW_CHARS, Attempt, Progress, TaskRecord, utcnow
from .states import TaskStatus
from .stream import Outcome, apply_event, is_transient, outcome, split_lines

log = logging.getLogger("cc_tasks")
TICK = 0.25
FLUSH_EVERY = 0.5


class ClaudeStartError(Exception):
    """claude could not be started (not found, not executable, cwd gone, out of processes)."""


class Supervisor:
    def __init__(self, backend: Backend, record: TaskRecord):
        assert record.lease is not None, "a supervisor runs a claimed task"
        self.backend = backend
        self.record = record
        self.lease = record.lease
        self.task_id = record.task_id
        self.dir = backend.workspace(record.task_id)
        self.stop_reason: str | None = None
        self.proc: subprocess.Popen | None = None
        self.progress = Progress()
        self.result_event: dict | None = None
        self.session_id: str | None = None
        self._buf = b""
        self._out = None
        self._stopped = False
        self.claude_ref = None
        self.worktree = record.worktree
        self._last_text_event = -1e9
        self.lost: str | None = None  # set by abandon(): write nothing more
        self.spawned = False  # claude was started (in any attempt): an abandoned task's worker says so
        self.desk: ApprovalDesk | None = None  # where the sub-agent's permission requests come in (approvals 'ask')
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    # -- stopping ------------------------------------------------------------
    def request_stop(self) -> None:
        """Cancel from another thread: the supervisor stops the task's tree and records it cancelled.
        (The worker calls this and ``close`` under one lock, so the pipe is never written after closing.)"""
        self.stop_reason = self.stop_reason or "cancel"
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def close(self) -> None:
        if self.desk is not None:
            self.desk.close()
            self.desk = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def abandon(self, reason: str) -> None:
        """From the worker's lease watch (another thread), when its heartbeat has failed for nearly a lease: the
        task is no longer surely this worker's (others may judge it gone and run it elsewhere), so claude's tree
        is stopped (the caller calls stop_everything, outside the worker's lock) and the supervisor writes nothing
        more, as on LeaseLostError."""
        self.lost = reason
        self.request_stop()

    def _check_lost(self) -> None:
        if self.lost:
            raise LeaseLostError(f"task {self.task_id}: {self.lost}")

    def cancelled(self) -> bool:
        self._check_lost()
        if self.stop_reason:
            return True
        try:
            return self.backend.cancel_requested(self.task_id)
        except BackendUnreachableError as e:  # (an outage is not a cancel: keep going, keep the deadline)
            log.warning("task %s: cannot check for a cancel (%s); going on", self.task_id, e)
            return False

    def _sleep(self, seconds: float, fds: tuple[int, ...] = ()) -> None:
        """Sleep, but wake at once on ``request_stop`` (or when one of ``fds`` is readable). poll, not select:
        a worker supervising many tasks may hold fds beyond select's 1024."""
        poller = select.poll()
        for fd in (self._wake_r, *fds):
            poller.register(fd, select.POLLIN)
        try:
            poller.poll(max(0.0, seconds) * 1000)
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- main ----------------------------------------------------------------
    def run(self) -> None:
        """Run the task to its end; whatever goes wrong, never leave it running without a final record (unless
        the lease was lost: then the task is no longer this supervisor's to write)."""
        try:
            self._run()
        except LeaseLostError as e:
            log.warning("%s; stopping its claude tree", e)
            self.stop_everything()
        except Exception as e:
            traceback.print_exc()
            try:
                self.stop_everything()
                self._end(
                    TaskStatus.FAILED,
                    error=f"supervisor error: {type(e).__name__}: {e}",
                    exit_code=self.proc.returncode if self.proc else None,
                )
            except CCTasksError:
                pass

    def _end(self, status: TaskStatus, result_text: str | None = None, **fields) -> TaskRecord:
        self._check_lost()
        return self.backend.finish(self.lease, status, result_text, **fields, **self._worktree_fields())

    # -- the task's git worktree (option worktree) ---------------------------------
    def _prepare_worktree(self, cwd: str) -> str | None:
        """Before claude makes (or enters) the task's worktree: keep .claude/worktrees/ out of the user's git
        status, refuse a branch left without its worktree, and record the base commit. An error, or None."""
        wt = self.worktree
        assert wt is not None
        try:
            worktrees.exclude_worktrees(wt.repo)
            if worktrees.orphan_branch(wt):
                return (
                    f"its branch {wt.branch} exists but its worktree {wt.path} is gone (removed by hand, or by "
                    "cleanup_task with keep_branch): claude --worktree would reset the branch and lose its commits; "
                    "restore the worktree (git worktree add) or start a new task"
                )
            if wt.base_commit is None:
                self.worktree = wt.model_copy(update={"base_commit": worktrees.head(cwd), "host": HOST})
                self.backend.progress(self.lease, worktree=self.worktree)
        except GitError as e:
            return f"could not prepare its git worktree: {e}"
        return None

    def _worktree_fields(self) -> dict:
        """The final record's ``worktree`` (where git has it) and ``changes``; nothing if git fails (they are
        then computed when the record is read)."""
        wt = self.worktree
        if wt is None:
            return {}
        try:
            wt = worktrees.locate(wt, made_here=wt.name == self.task_id)
            return {"worktree": wt, "changes": worktrees.changes(wt)}
        except GitError as e:
            log.warning("task %s: reading its worktree's changes: %s", self.task_id, e)
            return {}

    def _run(self) -> None:
        record = self.record
        if self.cancelled():
            self._end(TaskStatus.CANCELLED, error="cancelled before it started")
            return
        request = self.backend.request(self.task_id)
        opts = request.options
        remote = self.backend.caps.remote
        # a remote worker runs claude with its own environment plus the task's env (the submitter's stays home)
        env = build_env(
            os.environ if remote else request.env,
            opts,
            depth=record.depth - 1,
            task_id=self.task_id,
            store_dir=self.backend.address,
        )
        if remote:  # a cc-tasks server inside the task uses the same backend
            env.pop("CC_TASKS_DIR", None)
            env["CC_TASKS_BACKEND"] = self.backend.address
        claude_bin = request.claude_bin
        if not claude_bin:  # the worker's claude (CC_TASKS_CLAUDE_BIN, else claude on its PATH)
            try:
                claude_bin = Settings.from_env().resolve_claude()
            except CCTasksError as e:
                self._end(TaskStatus.FAILED, error=f"could not start claude on worker {self.lease.worker}: {e}")
                return
        if self.worktree is not None:
            problem = self._prepare_worktree(request.cwd)
            if problem:
                self._end(TaskStatus.FAILED, error=problem)
                return
        if record.budget_reserved_usd is not None:  # (what its claim reserved of the budgets: claude stops there)
            spend = [x for x in (opts.max_budget_usd, record.budget_reserved_usd) if x]
            opts = opts.model_copy(update={"max_budget_usd": min(spend)})
        if asks_approval(opts):
            timeout = request_timeout(opts.approval_timeout_seconds, env)
            self.desk = ApprovalDesk(self.backend, self.lease, list(opts.approval_rules or []), timeout)
        argv = build_argv(
            opts,
            claude_bin,
            self.worktree.name if self.worktree else None,
            deny_servers=servers_to_deny(env),
            approval_server=self.desk.server_config() if self.desk else None,
        )
        prompt = opts.prompt
        if opts.include_dependency_results and record.depends_on:
            prompt = dependency_preamble(self.backend, record.depends_on) + prompt
        stdin_path = self.dir / "prompt.txt"  # claude's standard input (replaced whole: a claude of a lost
        # lease that still reads the old one is not cut short)
        atomic_write(stdin_path, prompt.encode("utf-8", "surrogatepass"), fsync=False)
        deadline = time.monotonic() + record.timeout_seconds
        attempts: list[Attempt] = list(record.attempts)  # (earlier attempts: a lost worker's)
        while True:
            n = len(attempts) + 1
            attempt = Attempt(attempt=n, started_at=utcnow())
            try:
                kind = self.run_attempt(argv, request.cwd, env, stdin_path, deadline, attempt=n)
            except ClaudeStartError as e:
                attempt.finished_at, attempt.status, attempt.reason = utcnow(), TaskStatus.FAILED, str(e)
                self._end(TaskStatus.FAILED, error=f"could not start claude: {e}", attempts=[*attempts, attempt])
                return
            rc = self.proc.returncode if self.proc else None
            out = self.outcome(kind, record, rc)
            attempt.finished_at, attempt.exit_code, attempt.status, attempt.reason = utcnow(), rc, out.status, out.error
            # a run that already used tools is not started again: its side effects would repeat
            if (
                kind == "exited"
                and n < record.max_attempts
                and is_transient(out, self.progress.turns)
                and self.progress.tool_calls == 0
                and not self.cancelled()
            ):
                delay = min(600.0, opts.retry_backoff_seconds * (2 ** (n - 1)))
                if time.monotonic() + delay < deadline:
                    attempt.retried = True
                    attempts.append(attempt)
                    self.backend.event(self.lease, "retry", attempt=n, delay=delay, reason=out.error)
                    self.backend.progress(self.lease, attempts=list(attempts), claude=None)
                    self.claude_ref = None
                    until = time.monotonic() + max(delay, self._limiter_pause())  # (a retry waits for the limiter too)
                    while time.monotonic() < until and not self.cancelled():
                        self._sleep(until - time.monotonic())
                    if self.cancelled():
                        self.finish(
                            Outcome(status=TaskStatus.CANCELLED, error="cancelled while waiting to retry"),
                            attempts,
                            None,
                        )
                        return
                    continue
            attempts.append(attempt)
            self.finish(out, attempts, rc)
            return

    def _limiter_pause(self) -> float:
        """Seconds the fleet's limiter pauses starts for (after a 429/529), 0 if none."""
        try:
            until = self.backend.limiter().paused_until
        except CCTasksError:
            return 0.0
        return max(0.0, (until - utcnow()).total_seconds()) if until else 0.0

    def run_attempt(
        self, argv: list[str], cwd: str, env: dict, stdin_path: Path, deadline: float, *, attempt: int
    ) -> str:
        self.progress = Progress()
        self.result_event, self._buf = None, b""
        out_path = self.dir / "stdout.jsonl"
        start_offset = out_path.stat().st_size if out_path.exists() else 0  # earlier attempts stay in front
        self._check_lost()
        self.backend.renew(self.lease)  # (never start claude under a lease that is gone)
        self._check_lost()  # (nor once abandoned while the renew waited for the server)
        try:
            with (
                open(stdin_path, "rb") as stdin,
                open(out_path, "ab") as out,
                open(self.dir / "stderr.log", "ab") as err,
            ):
                self.proc = procs.spawn(argv, stdin=stdin, stdout=out, stderr=err, cwd=cwd, env=env, close_fds=True)
        except OSError as e:
            raise ClaudeStartError(str(e)) from e
        self.spawned = True
        self._stopped = False
        try:  # from here on, whatever fails, claude's tree is stopped and collected, and files are closed
            try:
                self.claude_ref = procs.ref_of(self.proc.pid)
            except psutil.NoSuchProcess:
                self.claude_ref = None
            # The record learns claude's pid with the first progress flush (FLUSH_EVERY), or the final record:
            # a short task costs one record write less. Until then a lost worker's claude is found by the task
            # id in its environment (engine.TaskEngine.worker_lost).
            self.backend.event(self.lease, "started", pid=self.proc.pid, attempt=attempt)
            self._out = open(out_path, "rb")
            self._out.seek(start_offset)
            kind = self.loop(deadline)
            self.stop_everything()
            self.read_output()
            if self._buf.strip():
                self._buf += b"\n"
                self._parse_buffer()
            return kind
        finally:
            if not self._stopped:
                self.stop_everything()
            if self._out is not None:
                self._out.close()
                self._out = None

    def loop(self, deadline: float) -> str:
        assert self.proc is not None
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        last_flush, dirty = time.monotonic(), True  # (the first flush also records claude's pid)
        try:
            while True:
                fds = tuple(fd for fd in (pidfd, self.desk.fileno() if self.desk else None) if fd is not None)
                self._sleep(min(TICK, deadline - time.monotonic()), fds)
                if self.desk is not None:
                    self.desk.accept()  # (the sub-agent asks: a request waits on the desk's socket)
                self._check_lost()
                tools_before = self.progress.tool_calls
                dirty |= self.read_output()
                if self.proc.poll() is not None:
                    return "exited"
                if self.cancelled():
                    return "cancel"
                if time.monotonic() >= deadline:
                    return "timeout"
                now = time.monotonic()
                # the first tool call reaches the record at once: a task that used a tool is never run again
                if dirty and (now - last_flush >= FLUSH_EVERY or (tools_before == 0 and self.progress.tool_calls)):
                    self.flush_progress()
                    last_flush, dirty = now, False
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def read_output(self) -> bool:
        chunk = self._out.read() if self._out else b""
        if not chunk:
            return False
        self.progress.output_bytes += len(chunk)
        self._buf += chunk
        if b"\n" in chunk:
            self._parse_buffer()
        return True

    def _parse_buffer(self) -> None:
        events, self._buf = split_lines(self._buf)
        for ev in events:
            if ev.get("type") == "result":
                self.result_event = ev
            if ev.get("session_id") and not self.session_id:
                self.session_id = ev["session_id"]
            for note in apply_event(self.progress, ev):
                if note["kind"] == "assistant_text":  # at most one text preview a second in the log
                    now = time.monotonic()
                    if now - self._last_text_event < 1.0:
                        continue
                    self._last_text_event = now
                if note["kind"] == "api_retry" and note.get("status") in (429, 529):  # (the fleet backs off)
                    try:
                        self.backend.rate_limited(note["status"], note["retry_in_seconds"] * 1000)
                    except CCTasksError as e:
                        log.warning("task %s: the limiter: %s", self.task_id, e)
                self.backend.event(self.lease, note.pop("kind"), **note)

    def flush_progress(self) -> None:
        self._check_lost()
        self.progress.updated_at = utcnow()
        fields = {"progress": self.progress.model_copy(), "claude": self.claude_ref}
        if self.session_id:
            fields["session_id"] = self.session_id
        rec = self.backend.progress(self.lease, **fields)
        if rec.cancel_requested:
            self.stop_reason = self.stop_reason or "cancel"

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()

    def stop_everything(self, grace_int: float = procs.GRACE_INT) -> None:
        """Stop claude's tree if it still runs, then what its tools left behind (re-parented to the worker,
        a subreaper, and found by the task id in their environment). ``grace_int``: seconds claude has after
        SIGINT before SIGTERM."""
        self._stopped = True
        root = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                root = None
        procs.stop_tree(root, reap=self._reap, grace_int=grace_int)
        leftovers = procs.task_orphans(self.task_id)
        if leftovers:
            procs.stop_tree(None, others=leftovers, reap=self._reap, grace_int=grace_int)
        if self.proc is not None:
            self.proc.wait()
            procs.disown(self.proc.pid)

    def outcome(self, kind: str, record: TaskRecord, rc: int | None) -> Outcome:
        out = outcome(self.result_event, rc, _tail(self.dir / "stderr.log", 2000), self.session_id)
        if kind == "cancel":
            return out.model_copy(
                update={"status": TaskStatus.CANCELLED, "error": "cancelled: the task's process tree was stopped"}
            )
        if kind == "timeout":
            return out.model_copy(
                update={
                    "status": TaskStatus.TIMEOUT,
                    "error": f"timed out after {record.timeout_seconds:g}s: the task's process tree was stopped",
                }
            )
        return out

    def finish(self, out: Outcome, attempts: list[Attempt], rc: int | None) -> None:
        fields = out.model_dump(exclude={"status", "api_error_status", "result"})
        text = out.result
        self.progress.updated_at = utcnow()
        self._end(
            out.status,
            text,
            exit_code=rc,
            progress=self.progress,
            attempts=attempts,
            **({"claude": self.claude_ref} if self.claude_ref else {}),
            **_result_fields(text),
            **fields,
        )


def _result_fields(text: str | None) -> dict:
    return {
        "result": None if text is None else text[:RESULT_PREVIEW_CHARS],
        "result_truncated": text is not None and len(text) > RESULT_PREVIEW_CHARS,
        "result_chars": len(text or ""),
    }


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
