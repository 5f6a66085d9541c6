"""The storage interface the task engine runs on: records with revisions and compare-and-set, outputs keyed by
claim epoch, append-only logs, worker liveness, a claim lock, signals and a little shared configuration.

No task policy lives here or in an implementation (which task is claimed, when a lease is alive, what a lost
worker does, how dependencies release...): that is ``engine.TaskEngine``'s, written once. An implementation
holds only I/O: ``files_repo.FileRepo`` (one machine, a private folder), ``nats_repo.NatsRepo`` (JetStream,
many machines), ``memory_repo.MemoryRepo`` (one process: the engine's policy tests). Each passes
tests/test_repo_contract.py; a new one (Redis, Postgres) adds itself there.

Revisions are opaque: whatever ``get`` returned, handed back to ``cas``. The repo keeps an index of the unfinished
tasks and of the waiting ones from the status of each record it writes (as a database keeps an index): that is
bookkeeping, not policy. What differs between implementations that the engine or the layers above must know is
declared in ``Capabilities``, never probed.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from .models import TaskRecord, TaskRequest, WorkerInfo

#: What an output's ``source`` may be.
SOURCES = ("result", "transcript", "stderr", "prompt")
#: The files a supervisor writes in a task's workspace, by source.
WORKSPACE_FILES = {"transcript": "stdout.jsonl", "stderr": "stderr.log", "prompt": "prompt.txt"}
#: The index names ``ids`` lists.
INDEXES = ("all", "active", "waiting")

#: Set around a worker's writes for its own tasks: a remote implementation retries them until the server
#: answers (a worker cut off keeps its tasks running and writes when it reconnects; the epoch decides whether
#: the writes still count). Others ignore it.
PATIENT: contextvars.ContextVar[bool] = contextvars.ContextVar("patient", default=False)


@contextlib.contextmanager
def patiently() -> Iterator[None]:
    token = PATIENT.set(True)
    try:
        yield
    finally:
        PATIENT.reset(token)


class Liveness(enum.Enum):
    """What a repo can say of a registered worker: its heartbeat is fresh, it is gone, or it cannot tell yet
    (just after an outage, live workers have not had the time to beat again)."""

    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"


class Capabilities(BaseModel):
    """What an implementation is, declared (the layers above read these; they never test a type or a kind)."""

    model_config = ConfigDict(frozen=True)

    #: A name for people (doctor, get_server_info): "local", "nats", "memory". Never branched on.
    kind: str
    #: Tasks may run on other machines: cwd and claude are the workers', calls are network round trips (a server
    #: runs them off its event loop), and a worker cut off from the storage abandons its tasks before others
    #: may judge it gone.
    remote: bool
    #: A claim's answer can be lost after its lease landed: a worker releases leases it does not supervise.
    lost_claims: bool
    #: The folder where the store's own worker is started on demand and listens (launcher.py); None: workers
    #: are started by people (``cc-tasks worker``).
    worker_home: Path | None = None
    #: Where a server process keeps its log file (None: its standard error).
    log_dir: Path | None = None
    #: The lease of a worker that stops beating, in seconds (the implementation's own when it keeps one: a
    #: NATS bucket's TTL).
    lease_seconds: float


Versioned = tuple[object, TaskRecord]


@runtime_checkable
class Repo(Protocol):
    caps: Capabilities

    @property
    def address(self) -> str:
        """Where it is, for people (a folder, a URL without credentials)."""
        ...

    # -- records ---------------------------------------------------------------------
    def create(self, record: TaskRecord, request: TaskRequest) -> None:
        """Store a new task (its request and first record) and index it; it appears whole or not at all."""
        ...

    def get(self, task_id: str) -> Versioned:
        """(revision, record); raises TaskNotFoundError, or CorruptRecordError for a record that does not parse."""
        ...

    def get_many(self, ids: list[str]) -> dict[str, Versioned]:
        """Those of ``ids`` that exist and parse."""
        ...

    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]:
        """The ids of the unfinished tasks (newest first), and the records of those not in ``skip`` (a caller's
        view it trusts), as fresh as reading each."""
        ...

    def ids(self, index: str = "all") -> list[str]:
        """Task ids of an index (INDEXES), newest first."""
        ...

    def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None:
        """Write ``record`` if the stored one is still at ``revision``; the new revision, or None if it changed
        (or was deleted). Keeps the index true to the record's status."""
        ...

    def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]:
        """``cas`` of several records at once (each on its own: some may land, others not). A write that failed
        (an error, not a conflict) reads as None: it may have landed all the same, so a caller re-reads."""
        ...

    def request(self, task_id: str) -> TaskRequest: ...

    def delete(self, task_id: str) -> None:
        """Everything of the task: record, request, outputs, events, index entries, remarks."""
        ...

    # -- outputs: result, transcript, stderr, prompt of each claim ----------------------
    def workspace(self, task_id: str) -> Path:
        """A folder on this machine where a supervisor writes the task's prompt, transcript and stderr."""
        ...

    def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None:
        """Store an output of the claim ``epoch``: bytes, a file's content (a workspace file: a repo whose
        workspace is its storage has it already), or None to remove it."""
        ...

    def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of the claim's output from ``offset``, and the output's size (0: none)."""
        ...

    def forget_workspace(self, task_id: str) -> None:
        """The task's run on this machine ended and its outputs are stored: a workspace apart from the storage
        can go."""
        ...

    # -- logs: a task's events, a group's notes ------------------------------------------
    def append(self, log: str, entry: dict) -> None:
        """Add ``entry`` to the end of a log (``ev.<task_id>``, ``notes.<group>``)."""
        ...

    def append_numbered(self, log: str, make: Callable[[int], dict]) -> int:
        """Add ``make(position)`` at the end of a log, its position exact even with concurrent writers."""
        ...

    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]:
        """(position, entry) from ``since`` on; a line that does not parse reads as ``{"kind": "unreadable"}``."""
        ...

    # -- workers -------------------------------------------------------------------------
    def put_worker(self, info: WorkerInfo) -> None:
        """Register a worker (and count it as beating now)."""
        ...

    def beat(self, worker_id: str) -> bool:
        """A registered worker's heartbeat; False if it is not registered (any more)."""
        ...

    def remove_worker(self, worker_id: str) -> None: ...

    def workers(self) -> list[WorkerInfo]:
        """Registered workers whose heartbeat is fresh."""
        ...

    def liveness(self, worker_id: str) -> Liveness: ...

    # -- coordination ----------------------------------------------------------------------
    def claim_lock(self) -> AbstractContextManager[Callable[[], bool]]:
        """Serialise claimers; yields ``still_ours()`` (False once a holder that outlived the lock lost it).
        Raises filelock.Timeout when it cannot be had for long."""
        ...

    def signal(self, kind: str, task_id: str | None = None) -> None:
        """``nudge`` (workers look at the queue now), ``cancel`` (a task's worker stops it), ``uncancel`` (forget
        a task's cancel: it was claimed again)."""
        ...

    def subscribe(self, handler: Callable[[], None]) -> None:
        """Call ``handler`` (it must only set flags) when a nudge or a cancel is signalled."""
        ...

    def cancel_signalled(self, task_id: str) -> bool:
        """Whether a cancel of the task was signalled (cheap: a worker asks every second for each task)."""
        ...

    def activity(self) -> object:
        """Changes whenever a task is added, removed or changes status, or the queue is signalled (cheap)."""
        ...

    # -- shared configuration and small keyed values ----------------------------------------
    def get_meta(self, key: str) -> tuple[object, bytes] | None:
        """(revision, value) of a small keyed value (``config``, ``remarks.<task_id>``...), or None."""
        ...

    def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool:
        """Write (None: remove) a keyed value if it is still at ``revision`` (None: absent)."""
        ...

    def usable(self) -> bool:
        """False once the storage is gone for good (a deleted store folder)."""
        ...

    def close(self) -> None: ...
