"""The supervisor of a task: runs its claude, follows it, and writes its final record.

A ``Supervisor`` runs one task. It is hosted either by the store's launcher, a long-lived process that
supervises every task it starts, each in a thread of its own (the default: no process start per task), or
by a process of its own, ``python -m cc_tasks.supervisor STORE_DIR TASK_ID`` in a session of its own with
the environment of the process that submitted the task (``CC_TASKS_LAUNCHER=0``, or when no launcher can
run). Either way the host outlives the MCP server and is a child subreaper, so tool processes that claude
orphans stay in view. The supervisor starts claude with stdout/stderr going to files, follows the
stream-json transcript to keep the record's live progress, enforces the timeout, retries transient
failures, stops the whole tree on cancel (``request_stop``; SIGTERM to a supervisor process of its own; or
a ``cancel`` marker in the task folder), and writes the final record.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil

from . import launcher, procs
from .command import build_env
from .config import Settings
from .models import RESULT_PREVIEW_CHARS, Attempt, ProcRef, Progress, TaskOptions, TaskRecord, TaskStatus, utcnow
from .scheduler import pump, use_launcher
from .store import TaskStore, atomic_write
from .stream import Outcome, apply_event, is_transient, outcome, split_lines

TICK = 0.25


class ClaudeStartError(Exception):
    """claude could not be started (not found, not executable, cwd gone, out of processes)."""


FLUSH_EVERY = 0.5
#: Characters of each dependency's result put in front of the prompt, and of all of them together.
DEP_RESULT_CHARS = 8_000
DEP_RESULTS_TOTAL = 32_000


def claim(store: TaskStore, task_id: str, me: ProcRef) -> TaskRecord | None:
    """Take a queued task for supervisor ``me`` before anything runs (status ``running``): exactly one
    caller gets it, whoever started it. None if it is not queued, or another supervisor has it."""
    claimed: list[TaskRecord] = []

    def fn(r: TaskRecord) -> TaskRecord | None:
        if r.status != TaskStatus.QUEUED or (r.supervisor is not None and not r.supervisor.same_process(me)):
            return None
        claimed.append(r.model_copy(update={"status": TaskStatus.RUNNING, "started_at": utcnow(), "supervisor": me}))
        return claimed[0]

    store.update(task_id, fn)
    return claimed[0] if claimed else None


def dependency_preamble(store: TaskStore, depends_on: list[str]) -> str:
    """The dependencies' results, bounded, as text to put in front of a prompt."""
    parts = []
    per = max(500, min(DEP_RESULT_CHARS, DEP_RESULTS_TOTAL // max(1, len(depends_on))))
    for dep in depends_on:
        r = store.read(dep)
        try:
            text = store.path(dep, "result.txt").read_text(errors="replace")
        except FileNotFoundError:
            text = r.result or ""
        cut = text[:per]
        more = f"\n[... {len(text) - per} more characters: get_task_output(task_id={dep!r})]" if len(text) > per else ""
        parts.append(f'<dependency task_id="{dep}" name="{r.name or ""}">\n{cut}{more}\n</dependency>')
    return ("Results of the tasks this task depends on:\n\n" + "\n\n".join(parts) + "\n\n---\n\n") if parts else ""


class Supervisor:
    """``shared``: hosted by a process that supervises several tasks (the launcher), which owns the signal
    handlers, the subreaper role and the claim; else the process is this task's alone."""

    def __init__(self, store: TaskStore, task_id: str, *, shared: bool = False):
        self.store = store
        self.task_id = task_id
        self.shared = shared
        self.dir = store.task_dir(task_id)
        self.stop_reason: str | None = None
        self.proc: subprocess.Popen | None = None
        self.progress = Progress()
        self.result_event: dict | None = None
        self.session_id: str | None = None
        self._buf = b""
        self._out = None
        self._stopped = False
        self.claude_ref = None
        self._last_text_event = -1e9
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    # -- signals -------------------------------------------------------------
    def _on_stop(self, signum, frame) -> None:
        self.stop_reason = self.stop_reason or "cancel"

    def request_stop(self) -> None:
        """Cancel from another thread: the supervisor stops the task's tree and records it cancelled.
        (The host calls this and ``close`` under one lock, so the pipe is never written after closing.)"""
        self.stop_reason = self.stop_reason or "cancel"
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda *a: None)  # wakes select; reaping happens in the loop

    def cancelled(self) -> bool:
        return bool(self.stop_reason) or (self.dir / "cancel").exists()

    def _sleep(self, seconds: float, fds: tuple[int, ...] = ()) -> None:
        """Sleep, but wake at once on a signal or ``request_stop`` (or when one of ``fds`` is readable).
        poll, not select: a launcher supervising many tasks may hold fds beyond select's 1024."""
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
    def run(self, claimed: TaskRecord | None = None) -> int:
        if self.shared:  # the host claimed the task already (see launcher.Launcher.supervise)
            record = claimed or self.store.read(self.task_id)
            if record.status != TaskStatus.RUNNING:
                return 0
        else:
            self.install_signals()
            procs.become_subreaper()
            record = claim(self.store, self.task_id, procs.ref_of(os.getpid()))
            if record is None:
                return 0  # another supervisor has it, or it was cancelled or finished meanwhile
        if self.cancelled():
            self.store.transition(self.task_id, TaskStatus.CANCELLED, error="cancelled before it started")
            return 0
        launch = json.loads((self.dir / "request.json").read_bytes())
        opts = TaskOptions.model_validate(launch["options"])
        env = build_env(
            launch["env"], opts, depth=record.depth - 1, task_id=self.task_id, store_dir=str(self.store.root)
        )
        prompt = opts.prompt
        if opts.include_dependency_results and record.depends_on:
            prompt = dependency_preamble(self.store, record.depends_on) + prompt
        stdin_path = self.dir / "prompt.txt"  # claude's standard input; only this process reads it
        stdin_path.write_bytes(prompt.encode("utf-8", "surrogatepass"))
        deadline = time.monotonic() + record.timeout_seconds
        attempts: list[Attempt] = []
        while True:
            n = len(attempts) + 1
            attempt = Attempt(attempt=n, started_at=utcnow())
            try:
                kind = self.run_attempt(launch, env, stdin_path, deadline, attempts=attempts)
            except ClaudeStartError as e:
                attempt.finished_at, attempt.status, attempt.reason = utcnow(), TaskStatus.FAILED, str(e)
                self.store.transition(
                    self.task_id, TaskStatus.FAILED, error=f"could not start claude: {e}", attempts=attempts + [attempt]
                )
                return 0
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
                    self.store.append_event(self.task_id, "retry", attempt=n, delay=delay, reason=out.error)
                    self.store.update(self.task_id, lambda r: r.model_copy(update={"attempts": list(attempts)}))
                    until = time.monotonic() + delay
                    while time.monotonic() < until and not self.cancelled():  # a SIGCHLD must not cut it short
                        self._sleep(until - time.monotonic())
                    if self.cancelled():
                        self.finish(
                            Outcome(status=TaskStatus.CANCELLED, error="cancelled while waiting to retry"),
                            attempts,
                            None,
                        )
                        return 0
                    continue
            attempts.append(attempt)
            self.finish(out, attempts, rc)
            return 0

    def run_attempt(
        self, launch: dict, env: dict, stdin_path: Path, deadline: float, *, attempts: list[Attempt]
    ) -> str:
        self.progress = Progress()
        self.result_event, self._buf = None, b""
        out_path = self.dir / "stdout.jsonl"
        start_offset = out_path.stat().st_size if out_path.exists() else 0  # earlier attempts stay in front
        try:
            with (
                open(stdin_path, "rb") as stdin,
                open(out_path, "ab") as out,
                open(self.dir / "stderr.log", "ab") as err,
            ):
                self.proc = procs.spawn(
                    launch["argv"], stdin=stdin, stdout=out, stderr=err, cwd=launch["cwd"], env=env, close_fds=True
                )
        except OSError as e:
            raise ClaudeStartError(str(e)) from e
        self._stopped = False
        try:  # from here on, whatever fails, claude's tree is stopped and collected, and files are closed
            try:
                self.claude_ref = procs.ref_of(self.proc.pid)
            except psutil.NoSuchProcess:
                self.claude_ref = None
            # The record learns claude's pid with the first progress flush (FLUSH_EVERY), or the final record:
            # a short task costs one record write less. Until then a dead supervisor's claude is found by
            # the task id in its environment (scheduler.fail_if_supervisor_died).
            self.store.append_event(self.task_id, "started", pid=self.proc.pid, attempt=len(attempts) + 1)
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
                self._sleep(min(TICK, deadline - time.monotonic()), (pidfd,) if pidfd is not None else ())
                dirty |= self.read_output()
                if self.proc.poll() is not None:
                    return "exited"
                if self.cancelled():
                    return "cancel"
                if time.monotonic() >= deadline:
                    return "timeout"
                if not self.shared:  # a shared host reaps its orphans itself
                    procs.reap_children()
                now = time.monotonic()
                if dirty and now - last_flush >= FLUSH_EVERY:
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
                self.store.append_event(self.task_id, note.pop("kind"), **note)

    def flush_progress(self) -> None:
        self.progress.updated_at = utcnow()
        snapshot = self.progress.model_copy()
        sid, ref = self.session_id, self.claude_ref
        rec = self.store.update(
            self.task_id,
            lambda r: (
                None
                if r.status.terminal
                else r.model_copy(update={"progress": snapshot, "session_id": r.session_id or sid, "claude": ref})
            ),
        )
        if rec.status.terminal:  # ended by someone meanwhile (a cancel that found no supervisor)
            self.stop_reason = self.stop_reason or "cancel"

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()
        if not self.shared:  # a shared host reaps the orphans it adopts itself
            procs.reap_children()

    def stop_everything(self) -> None:
        """Stop claude's tree if it still runs, then whatever else is left below this supervisor."""
        self._stopped = True
        root = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                root = None
        procs.stop_tree(root, reap=self._reap)
        # what claude's tools left behind was re-parented to this (subreaper) process
        leftovers = procs.task_orphans(self.task_id) if self.shared else procs.children(psutil.Process())
        if leftovers:
            procs.stop_tree(None, others=leftovers, reap=self._reap)
        if self.proc is not None:
            self.proc.wait()
            procs.disown(self.proc.pid)
        self._reap()

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
        if text is not None:
            atomic_write(self.dir / "result.txt", text.encode("utf-8", "surrogatepass"))
        self.progress.updated_at = utcnow()
        self.store.transition(
            self.task_id,
            out.status,
            exit_code=rc,
            progress=self.progress,
            attempts=attempts,
            **({"claude": self.claude_ref} if self.claude_ref else {}),
            result=None if text is None else text[:RESULT_PREVIEW_CHARS],
            result_truncated=text is not None and len(text) > RESULT_PREVIEW_CHARS,
            result_chars=len(text or ""),
            **fields,
        )


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def supervise(sup: Supervisor, claimed: TaskRecord | None = None) -> int:
    """Run ``sup``; whatever goes wrong, never leave its task running without a final record."""
    try:
        return sup.run(claimed)
    except Exception as e:
        traceback.print_exc()
        try:
            sup.stop_everything()
            sup.store.transition(
                sup.task_id,
                TaskStatus.FAILED,
                error=f"supervisor error: {type(e).__name__}: {e}",
                exit_code=sup.proc.returncode if sup.proc else None,
            )
        except Exception:
            traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> int:
    """A supervisor process of the task's own (``CC_TASKS_LAUNCHER=0``, or no launcher could run)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m cc_tasks.supervisor STORE_DIR TASK_ID", file=sys.stderr)
        return 2
    store = TaskStore(Path(argv[0]))
    code = supervise(Supervisor(store, argv[1]))
    try:  # this task's slot is free: have the launcher start what the queue allows, or do it here
        if not (use_launcher() and launcher.kick(store)):
            pump(store, Settings.from_env().max_concurrent)
    except Exception:
        traceback.print_exc()
    return code


if __name__ == "__main__":
    sys.exit(main())
