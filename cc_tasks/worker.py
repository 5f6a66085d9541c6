"""The worker: pulls tasks from the backend and supervises each in a thread of its own.

This is the only place tasks get started. A worker registers with the backend, then loops: it claims up to
its free slots (``backend.claim``: leases on the highest-priority, oldest ready tasks within the global
cap), runs a ``Supervisor`` thread for each, renews its leases with one heartbeat a second, and looks at the
queue again whenever one of its tasks ends, when it is nudged, and once a second. Nothing pushes work into
it: servers and the CLI only submit, read, cancel and nudge.

It is a child subreaper: what claude's tools leave behind is re-parented to it and stopped with its task
(found by the task id in its environment); it reaps only children no Popen of its own owns. The local
store starts one on demand (``python -m cc_tasks.worker --store DIR --on-demand``): it listens on the
store's control socket, exits after ``CC_TASKS_WORKER_IDLE`` seconds with nothing to do, and SIGTERM makes
it cancel its tasks. ``cc-tasks worker`` runs one by hand: SIGTERM drains (no new claims, running tasks
finish), a second SIGTERM (or ``--cancel-on-exit``) cancels them. A ``quit`` request always drains.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import secrets
import select
import signal
import sys
import threading
import time
import traceback
from datetime import datetime, timedelta

from filelock import Timeout

from . import __version__, control, procs
from .checks import NATS_FILES
from .config import default_worker_idle
from .connect import open_backend
from .engine import TaskEngine as Backend
from .errors import CCTasksError
from .ids import HOST
from .models import TaskRecord, WorkerInfo, utcnow
from .states import TaskStatus
from .supervisor import Supervisor

log = logging.getLogger("cc_tasks")
#: Seconds between heartbeats, and between two full looks at the queue.
HEARTBEAT = 1.0
#: Seconds between SIGINT and SIGTERM when the lease watch stops an abandoned task's tree.
ABANDON_GRACE = 1.0


class Worker:
    def __init__(
        self,
        backend: Backend,
        *,
        slots: int,
        labels: tuple[str, ...] | list[str] = (),
        idle_exit: float | None = None,
        listen: bool = False,
        cancel_on_term: bool = True,
    ):
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        self.backend = backend
        self.slots = slots
        self.info = WorkerInfo(
            worker_id=f"w-{os.getpid()}-{secrets.token_hex(3)}",
            host=HOST,
            proc=procs.ref_of(os.getpid()),
            labels=sorted(set(labels)),
            slots=slots,
            version=__version__,
        )
        self.idle_exit = idle_exit
        self.listen = listen
        self.cancel_on_term = cancel_on_term
        self.supervising: dict[tuple[str, int], Supervisor] = {}  # (task id, epoch): a lost lease's thread may
        # still be ending when the same task is claimed again
        self._lock = threading.Lock()
        #: (task id, epoch) -> (claude started, tool calls) of each task whose supervisor the lease watch abandoned
        #: and that ended, until release_unsupervised deals with it (see there)
        self.abandoned: dict[tuple[str, int], tuple[bool, int]] = {}
        self._claim_since: datetime | None = None  # when the claim in flight started (see _supervised)
        self.draining = False  # take no more work; exit once the running tasks have ended
        self.cancel_all = False  # ... and cancel them first
        self._cancelled = False
        self.nudged = True
        self.last_claim = self.last_beat = 0.0
        self.beat_ok = time.monotonic()  # the last successful heartbeat (see _watch_leases)
        self.last_activity = time.monotonic()
        self.inbox: control.Inbox | None = None
        self._wake_r = self._wake_w = -1
        self._stopped = threading.Event()

    def _beat(self) -> None:
        """The heartbeat, in a thread of its own: nothing the loop waits for (a claim behind another worker's,
        a slow client) may let the worker's leases lapse."""
        while not self._stopped.wait(HEARTBEAT):
            try:
                if not self.backend.heartbeat(self.info.worker_id):
                    self.backend.register(self.info)
                self.beat_ok = time.monotonic()
            except Exception:
                traceback.print_exc()

    def _watch_leases(self) -> None:
        """On a remote backend, in a thread of its own (the heartbeat may be stuck waiting for the server): once
        no heartbeat has succeeded for two thirds of the lease, others may soon judge this worker gone and run
        its tasks elsewhere, so every task it supervises is abandoned: claude stopped, nothing more written. The
        worker's lock is held only to mark them (never across a call to the server), and their trees are stopped
        all at once with a short SIGINT grace: the last third of the lease is for stopping, not for waiting."""
        limit = self._silence_limit()
        if limit == float("inf"):
            return
        lease = float(self.backend.lease_seconds)
        while not self._stopped.wait(0.25):
            silent = time.monotonic() - self.beat_ok
            if silent < limit:
                continue
            why = f"worker {self.info.worker_id} had no heartbeat for {silent:.0f} s (lease {lease:g} s)"
            with self._lock:  # (request_stop under the lock: close() is called under it)
                doomed = [sup for sup in self.supervising.values() if not sup.lost]
                for sup in doomed:
                    sup.abandon(why)
            stoppers = []
            for sup in doomed:
                log.warning("task %s: %s; stopping its claude", sup.task_id, why)
                t = threading.Thread(target=self._stop_abandoned, args=(sup,), name=f"stop-{sup.task_id}", daemon=True)
                t.start()
                stoppers.append(t)
            for t in stoppers:
                t.join(30)

    def _silence_limit(self) -> float:
        """Seconds without a successful heartbeat after which this worker's tasks are no longer surely its own:
        two thirds of the lease (inf on the local store, whose leases do not expire)."""
        lease = float(self.backend.lease_seconds)
        if not self.backend.caps.remote or lease <= 0:
            return float("inf")
        return lease - lease / 3

    @staticmethod
    def _stop_abandoned(sup: Supervisor) -> None:
        try:
            sup.stop_everything(grace_int=ABANDON_GRACE)
        except Exception:
            traceback.print_exc()

    def _release_unsupervised(self) -> None:
        """Once a heartbeat period, on a remote backend (where a claim's answer can be lost after its lease
        landed, and an abandoned task keeps its record): put back the tasks leased to this worker that it does
        not supervise. Here, not in the heartbeat's thread: a slow pass must not delay a heartbeat."""
        if not self.backend.caps.lost_claims:
            return
        try:
            self.backend.release_unsupervised(self.info.worker_id, self._supervised, abandoned=self.abandoned)
        except CCTasksError as e:
            log.warning("releasing tasks this worker does not run: %s", e)

    def _supervised(self) -> tuple[set[tuple[str, int]], datetime]:
        """The (task id, epoch) this worker supervises, and the time before which every lease it got is among
        them (the start of a claim in flight, whose leases are not supervised yet)."""
        with self._lock:
            return set(self.supervising), self._claim_since or utcnow()

    # -- lifecycle -----------------------------------------------------------
    def stop(self, cancel: bool = False) -> None:
        """Drain (no new claims; exit once running tasks end); with ``cancel``, cancel them first."""
        self.cancel_all = self.cancel_all or cancel
        self.draining = True
        self.wake()

    def _on_signal(self, signum, frame) -> None:
        self.stop(cancel=self.cancel_on_term or self.draining)  # a second SIGTERM cancels

    def _nudged(self) -> None:
        """A nudge or a cancel came from the backend (in its thread: only flags and the wake pipe)."""
        self.nudged = True
        self.last_beat = 0.0  # look for cancels now
        self.wake()

    def wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"w")
            except OSError:
                pass

    def run(self) -> int:
        procs.become_subreaper()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._wake_w)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.backend.register(self.info)
        self.backend.subscribe(self._nudged)  # (nudges and cancels signalled through the backend)
        self._warn_above_cap()
        self.beat_ok = time.monotonic()
        beating = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        beating.start()
        threading.Thread(target=self._watch_leases, name="lease-watch", daemon=True).start()
        if self.listen:
            self._bind()
        log.info("worker %s started: %d slots, labels %s", self.info.worker_id, self.slots, self.info.labels)
        try:
            while True:
                try:
                    if self.serve_once():
                        break
                except Exception:  # one bad pass (EMFILE, a store hiccup) must not end every task's supervision
                    traceback.print_exc()
                    if not self.backend.usable():
                        self.stop(cancel=True)  # the store was deleted: nothing is left to serve
                    time.sleep(0.1)
        finally:
            self._stopped.set()
            if self.inbox is not None:
                self.inbox.close()
            beating.join(5)
            self.backend.unregister(self.info.worker_id)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        log.info("worker %s exits", self.info.worker_id)
        return 0

    def _warn_above_cap(self) -> None:
        """One line at start when this worker has more slots than the cap lets run (it would wait for them)."""
        cap = self.backend.max_concurrent
        if self.slots > cap:
            log.warning(
                "worker %s has %d slots, but the cap in force is %d (%s): at most %d tasks run at once across "
                "every worker; raise it with `cc-tasks --backend %s config set max_concurrent %d`",
                self.info.worker_id, self.slots, cap, self.backend.cap_source(), cap, self.backend.address, self.slots,
            )  # fmt: skip

    def _bind(self) -> None:
        if self.backend.launcher is None:  # (no worker of the backend's own: nothing to listen for)
            return
        path = self.backend.launcher.socket_path
        hello = None
        try:
            hello = control.request(path, {"op": "hello"})
        except (OSError, ValueError):
            pass
        if hello and hello.get("pid") != os.getpid():
            return  # another worker answers nudges here; this one looks at the queue every second
        self.inbox = control.Inbox(path)

    # -- the loop --------------------------------------------------------------
    def serve_once(self) -> bool:
        """Wait for a request, a task's end or the next tick, and do what is due. True when it is time to exit."""
        poller = select.poll()  # (not select: fds may go beyond 1024 with many tasks)
        poller.register(self._wake_r, select.POLLIN)
        if self.inbox is not None:
            poller.register(self.inbox.fileno(), select.POLLIN)
        ready = {fd for fd, _ in poller.poll((0.005 if self.nudged else HEARTBEAT) * 1000)}
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        now = time.monotonic()
        if now - self.last_beat >= HEARTBEAT:
            self.last_beat = now
            procs.reap_children()  # orphans adopted from tasks' trees
            self._look_for_cancels()
            self._release_unsupervised()
        if self.inbox is not None and self.inbox.fileno() in ready:
            self.inbox.serve(self.handle)
        if self.draining:
            if self.inbox is not None:  # a successor may bind the socket now
                self.inbox.close()
                self.inbox = None
            if self.cancel_all and not self._cancelled:
                self._cancelled = True
                with self._lock:
                    for sup in self.supervising.values():
                        sup.request_stop()
            return not self.supervising
        free = self.slots - len(self.supervising)
        due = now - self.last_claim >= HEARTBEAT
        if free > 0 and (self.nudged or due):
            self.nudged = False  # (a task ending meanwhile sets it again)
            self.claim(free, fresh=due)
        elif free <= 0:
            self.nudged = False  # a task's end sets it again
        if self.supervising:
            self.last_activity = now
        if self.idle_exit is None or self.supervising or now - self.last_activity <= self.idle_exit:
            return False
        return self._leave()

    def _leave(self) -> bool:
        """Idle for long enough: stop listening, then look at the queue once more (a nudge that came as the
        socket closed is not lost); exit unless that found work."""
        if self.inbox is not None:
            self.inbox.close()
            self.inbox = None
        self.claim(self.slots, fresh=True)
        if not self.supervising:
            return True
        self.last_activity = time.monotonic()
        if self.listen:
            self._bind()
        return False

    def handle(self, msg: dict) -> dict:
        op = msg.get("op")
        if op == "hello":
            return {
                "identity": control.IDENTITY,
                "pid": os.getpid(),
                "worker": self.info.worker_id,
                "tasks": len(self.supervising),
                "draining": self.draining,
            }
        if op == "nudge":
            self.nudged = True
            self.last_activity = time.monotonic()
            self._look_for_cancels()
            return {"ok": True}
        if op == "quit":
            self.stop()
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    def _look_for_cancels(self) -> None:
        """Ask the backend about each supervised task's cancel, outside the worker's lock (a remote backend may
        take seconds to answer, and the lease watch needs the lock); the lock is taken again only to stop."""
        with self._lock:
            snapshot = list(self.supervising.items())
        for key, sup in snapshot:
            if self.backend.cancel_requested(key[0]):
                with self._lock:  # (only while it is still supervised: close() is called under the lock)
                    if self.supervising.get(key) is sup:
                        sup.request_stop()

    # -- claiming and supervising ------------------------------------------------
    def claim(self, free: int, fresh: bool) -> None:
        if fresh:
            self.last_claim = time.monotonic()
        if time.monotonic() - self.beat_ok >= self._silence_limit():
            return  # (the lease watch would abandon whatever it got at once: claim again once a heartbeat lands)
        with self._lock:
            self._claim_since = utcnow() - timedelta(seconds=1)  # (leases' clocks: this host's, a margin)
        try:
            try:
                records = self.backend.claim(self.info, free, fresh=fresh)
            except Timeout:  # another claimer holds the queue for long: try again soon
                self.nudged = True
                return
            for rec in records:
                self.supervise(rec)
        finally:
            with self._lock:
                self._claim_since = None

    def supervise(self, rec: TaskRecord) -> None:
        sup = None
        key = (rec.task_id, rec.epoch)
        try:
            sup = Supervisor(self.backend, rec)
            with self._lock:
                self.supervising[key] = sup
            threading.Thread(target=self._run, args=(sup, key), name=f"task-{rec.task_id}", daemon=True).start()
        except Exception as e:
            with self._lock:
                self.supervising.pop(key, None)
            if sup is not None:
                sup.close()
            if rec.lease is not None:
                try:
                    self.backend.finish(rec.lease, TaskStatus.FAILED, error=f"could not supervise the task: {e}")
                except CCTasksError:
                    pass

    def _run(self, sup: Supervisor, key: tuple[str, int]) -> None:
        try:
            sup.run()
        finally:
            try:  # a supervisor always ends its task; if it could not, do it here
                if not sup.lost and self.backend.holds(sup.lease):
                    self.backend.finish(
                        sup.lease,
                        TaskStatus.FAILED,
                        error=f"its supervisor ended without a final record; see the worker's log ({self.info.worker_id})",
                    )
            except CCTasksError:
                pass
            with self._lock:  # (after the final record: a draining worker exits once this is empty)
                if sup.lost:  # (before it leaves supervising: release_unsupervised reads this after that)
                    self.abandoned[key] = (sup.spawned, sup.progress.tool_calls)
                self.supervising.pop(key, None)
                sup.close()
            self.last_activity = time.monotonic()
            self.nudged = True  # its slot is free
            self.wake()


def main(argv: list[str] | None = None) -> int:
    """``python -m cc_tasks.worker --store DIR`` (a worker on the local store) or ``--backend URL`` (see
    ``cc-tasks worker``)."""
    parser = argparse.ArgumentParser(prog="python -m cc_tasks.worker", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--store", help="the task store directory")
    where.add_argument("--backend", help="a nats:// URL, or a store directory (default: CC_TASKS_BACKEND)")
    parser.add_argument("--slots", type=int, default=None, help="tasks at once (default: the global cap)")
    parser.add_argument("--label", action="append", default=[], help="a label this worker advertises")
    parser.add_argument("--on-demand", action="store_true", help="started by a server: idle exit, SIGTERM cancels")
    parser.add_argument("--cancel-on-exit", action="store_true", help="SIGTERM cancels running tasks")
    for key, (var, what) in NATS_FILES.items():
        parser.add_argument(
            f"--nats-{key.replace('_', '-')}", dest=key, metavar="FILE", help=f"{what} (default: {var})"
        )
    args = parser.parse_args(argv)
    files = {key: getattr(args, key) for key in NATS_FILES if getattr(args, key)}
    try:
        backend = open_backend(args.store or args.backend, nats_files=files)
    except CCTasksError as e:  # (a bad URL or file, an unreachable server: one line, not a traceback)
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    gc.freeze()  # the imported modules live as long as the process: keep the collector off them
    worker = Worker(
        backend,
        slots=args.slots or backend.max_concurrent,
        labels=args.label,
        idle_exit=default_worker_idle() if args.on_demand else None,
        listen=True,
        cancel_on_term=args.on_demand or args.cancel_on_exit,
    )
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
