"""TaskManager's base: its settings and backend, the store's worker (nudged, reaped, tended), get_server_info.

Every tool mixin (records, outputs, submitting, board_tools, stopping, worktree_tools, waiting) builds on it."""

from __future__ import annotations

import functools
import logging
import logging.handlers
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

import anyio

from . import __version__
from .config import Settings
from .connect import open_backend
from .engine import TaskEngine as Backend
from .errors import WorkerUnavailableError
from .models import ServerInfo, WorkerBrief

log = logging.getLogger("cc_tasks")
T = TypeVar("T")


def setup_logging(store: Backend) -> None:
    """The log file in the local store (a NATS server's log goes wherever its process's stderr goes)."""
    logger = logging.getLogger("cc_tasks")
    log_dir = store.caps.log_dir
    if log_dir is None or any(getattr(h, "_cc_tasks", False) for h in logger.handlers):
        return
    handler = logging.handlers.RotatingFileHandler(log_dir / "cc_tasks.log", maxBytes=1_000_000, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler._cc_tasks = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class ManagerBase:
    """The settings, the backend (``store``) and the store's worker; what every tool's code stands on."""

    def __init__(self, settings: Settings | None = None, env: Mapping[str, str] | None = None):
        self.settings = settings or Settings.from_env()
        self.store: Backend = open_backend(settings=self.settings)
        self._env = env
        setup_logging(self.store)

    # -- child processes -----------------------------------------------------
    def install_sigchld_handler(self) -> bool:
        """Reap the workers this process started as they exit (only those: never waitpid(-1))."""
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGCHLD, lambda signum, frame: self.reap())
        return True

    def reap(self, wait: float = 0.0) -> None:
        """Collect exited workers this process started; with ``wait``, give running ones that long to exit."""
        self.store.reap(wait)

    # -- the backend and its worker ---------------------------------------------
    @property
    def remote(self) -> bool:
        """Tasks run on other machines (NATS): paths and claude are the workers', not this server's."""
        return self.store.caps.remote

    def nudge(self) -> None:
        """Tell the store's worker to look at the queue now (starting one if none runs). If none can be
        started, the tasks stay queued and the error is logged; the server's next look tries again."""
        try:
            self.store.nudge()
        except WorkerUnavailableError as e:
            log.error("%s", e)

    async def on_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` from the event loop: inline on the local store (a few small file operations),
        in a thread on a remote backend (each call is a round trip to the server, seconds or more in an
        outage, which must not stall other tool calls)."""
        if not self.store.caps.remote:
            return fn(*args, **kwargs)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def anudge(self) -> None:
        """``nudge`` for the event loop: inline when a worker is known to listen (one datagram-sized write) on
        the local store, else in a thread (starting a worker takes a moment, a remote publish a round trip to
        the backend's loop, and neither may block other tool calls)."""
        launcher = self.store.launcher
        if launcher is not None and launcher.worker_known():
            self.nudge()
        else:
            await anyio.to_thread.run_sync(self.nudge)

    def tend(self) -> None:
        """The server's periodic look: while tasks are unfinished, make sure a worker runs (one that was
        SIGKILLed is replaced; the tasks it held are handed to worker_lost when read or claimed)."""
        if self.store.has_active():
            self.nudge()
            self.store.sweep_agent_leases()

    # -- get_server_info -------------------------------------------------------------
    def server_info(self) -> ServerInfo:
        s = self.settings
        workers = [
            WorkerBrief(worker_id=w.worker_id, host=w.host, pid=w.proc.pid, slots=w.slots, labels=w.labels)
            for w in self.store.workers()[:20]
        ]
        return ServerInfo(
            version=__version__,
            pid=os.getpid(),
            backend=self.store.kind,
            store_dir=self.store.address,
            max_concurrent=self.store.max_concurrent,
            cap_source=self.store.cap_source(),
            limiter=self.store.limiter(),
            depth=s.depth,
            max_depth=s.max_depth,
            default_timeout=s.default_timeout,
            lease_seconds=self.store.lease_seconds,
            workers=workers,
        )

    def _active_stamp(self) -> object:
        """What changes when a task of the store ends or one is added (waits and claims watch it)."""
        return self.store.activity_stamp()
