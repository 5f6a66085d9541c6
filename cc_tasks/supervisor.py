"""The per-task supervisor: a small process that runs one claude and outlives the MCP server.

Started by the manager as ``python -m cc_tasks.supervisor STORE_DIR TASK_ID`` in a session of its own.
It starts claude with stdout/stderr going to files, follows the stream-json transcript to keep the
record's live progress, enforces the timeout, stops the whole tree on cancel (SIGTERM to the
supervisor, or a ``cancel`` marker in the task folder), and writes the final record. It is a child
subreaper, so tool processes that claude orphans stay in its tree and are stopped with the task.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil

from . import procs
from .models import RESULT_PREVIEW_CHARS, Progress, TaskRecord, TaskStatus, utcnow
from .store import TaskStore, atomic_write
from .stream import apply_event, outcome, split_lines

log = logging.getLogger("cc_tasks.supervisor")
TICK = 0.25
FLUSH_EVERY = 0.5


class Supervisor:
    def __init__(self, store: TaskStore, task_id: str):
        self.store = store
        self.task_id = task_id
        self.dir = store.task_dir(task_id)
        self.stop_reason: str | None = None
        self.proc: subprocess.Popen | None = None
        self.progress = Progress()
        self.result_event: dict | None = None
        self.session_id: str | None = None
        self._buf = b""
        self._out = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)

    # -- signals -------------------------------------------------------------
    def _on_stop(self, signum, frame) -> None:
        self.stop_reason = self.stop_reason or "cancel"

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda *a: None)  # wakes select; reaping happens in the loop

    def cancel_marked(self) -> bool:
        return (self.dir / "cancel").exists()

    # -- main ----------------------------------------------------------------
    def run(self) -> int:
        self.install_signals()
        procs.become_subreaper()
        record = self.store.read(self.task_id)
        if record.status.terminal:
            return 0
        if self.cancel_marked() or self.stop_reason:
            self.store.transition(self.task_id, TaskStatus.CANCELLED, error="cancelled before it started")
            return 0
        launch = json.loads((self.dir / "launch.json").read_text())
        try:
            with open(self.dir / "prompt.txt", "rb") as stdin, open(self.dir / "stdout.jsonl", "wb") as out, \
                    open(self.dir / "stderr.log", "wb") as err:
                self.proc = subprocess.Popen(launch["argv"], stdin=stdin, stdout=out, stderr=err,
                                             cwd=launch["cwd"], env=os.environ.copy(), close_fds=True)
        except OSError as e:
            self.store.transition(self.task_id, TaskStatus.FAILED, error=f"could not start claude: {e}")
            return 0
        started = utcnow()
        me = procs.ref_of(os.getpid())
        try:
            claude_ref = procs.ref_of(self.proc.pid)
        except psutil.NoSuchProcess:
            claude_ref = None
        rec = self.store.transition(self.task_id, TaskStatus.RUNNING, started_at=started, supervisor=me, claude=claude_ref)
        if rec.status != TaskStatus.RUNNING:  # cancelled by someone meanwhile
            self.stop_reason = "cancel"
        self.store.append_event(self.task_id, "started", pid=self.proc.pid)
        deadline = time.monotonic() + record.timeout_seconds
        self._out = open(self.dir / "stdout.jsonl", "rb")
        try:
            kind = self.loop(deadline)
        finally:
            self.stop_everything()
        self.finish(kind, record)
        return 0

    def loop(self, deadline: float) -> str:
        assert self.proc is not None
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        last_flush = 0.0
        dirty = False
        while True:
            wait = max(0.0, min(TICK, deadline - time.monotonic()))
            fds = [self._wake_r] + ([pidfd] if pidfd is not None else [])
            try:
                select.select(fds, [], [], wait)
            except InterruptedError:
                pass
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            dirty |= self.read_output()
            if self.proc.poll() is not None:
                kind = "exited"
                break
            if self.stop_reason or self.cancel_marked():
                kind = "cancel"
                break
            if time.monotonic() >= deadline:
                kind = "timeout"
                break
            procs.reap_children(exclude=[self.proc.pid])
            now = time.monotonic()
            if dirty and now - last_flush >= FLUSH_EVERY:
                self.flush_progress()
                last_flush, dirty = now, False
        if pidfd is not None:
            os.close(pidfd)
        return kind

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
                self.store.append_event(self.task_id, note.pop("kind"), **note)

    def flush_progress(self) -> None:
        self.progress.updated_at = utcnow()
        snapshot = self.progress.model_copy()
        sid = self.session_id

        def fn(r: TaskRecord) -> TaskRecord | None:
            if r.status.terminal:
                return None
            return r.model_copy(update={"progress": snapshot, "session_id": r.session_id or sid})
        self.store.update(self.task_id, fn)

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()
        procs.reap_children(exclude=[self.proc.pid] if self.proc else [])

    def stop_everything(self) -> None:
        """Stop claude's tree if it still runs, then whatever else is left below this supervisor."""
        root = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
            except psutil.NoSuchProcess:
                root = None
        procs.stop_tree(root, reap=self._reap)
        leftovers = [p for p in psutil.Process().children(recursive=True)]
        if leftovers:
            procs.stop_tree(None, others=leftovers, reap=self._reap)
        self._reap()

    def finish(self, kind: str, record: TaskRecord) -> None:
        rc = self.proc.wait() if self.proc is not None else None
        self.read_output()
        if self._buf.strip():
            self._buf += b"\n"
            self._parse_buffer()
        stderr_tail = _tail(self.dir / "stderr.log", 2000)
        out = outcome(self.result_event, rc, stderr_tail, self.session_id)
        fields = out.model_dump(exclude={"status", "api_error_status"})
        status = out.status
        if kind == "cancel":
            status, fields["error"] = TaskStatus.CANCELLED, "cancelled: the task's process tree was stopped"
        elif kind == "timeout":
            status = TaskStatus.TIMEOUT
            fields["error"] = f"timed out after {record.timeout_seconds:g}s: the task's process tree was stopped"
        text = fields.pop("result")
        if text is not None:
            atomic_write(self.dir / "result.txt", text.encode("utf-8", "surrogatepass"))
        self.progress.updated_at = utcnow()
        self.store.transition(
            self.task_id, status, exit_code=rc, progress=self.progress,
            result=None if text is None else text[:RESULT_PREVIEW_CHARS],
            result_truncated=text is not None and len(text) > RESULT_PREVIEW_CHARS,
            result_chars=len(text or ""), **fields)


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m cc_tasks.supervisor STORE_DIR TASK_ID", file=sys.stderr)
        return 2
    store = TaskStore(Path(argv[0]))
    task_id = argv[1]
    sup = Supervisor(store, task_id)
    try:
        return sup.run()
    except Exception as e:  # never leave a task running without a final record
        traceback.print_exc()
        try:
            sup.stop_everything()
            sup.store.transition(task_id, TaskStatus.FAILED, error=f"supervisor error: {type(e).__name__}: {e}",
                                 exit_code=sup.proc.returncode if sup.proc else None)
        except Exception:
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
