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

from .errors import CorruptRecordError, TaskNotFoundError
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


def each(get: Callable[[str], Versioned], ids: list[str]) -> dict[str, Versioned]:
    """``get_many`` for a repo whose reads are local: those of ``ids`` that exist and parse."""
    out = {}
    for t in ids:
        with contextlib.suppress(TaskNotFoundError, CorruptRecordError):
            out[t] = get(t)
    return out


def parse_request(task_id: str, data: bytes, where: str) -> TaskRequest:
    try:
        return TaskRequest.model_validate_json(data)
    except ValueError as e:
        raise CorruptRecordError(f"task {task_id}: its request ({where}) is unreadable ({e})") from None


@runtime_checkable
class Repo(Protocol):
    """Records: ``create`` stores a new task (request and first record, indexed) whole or not at all; ``get`` is
    (revision, record), raising TaskNotFoundError or CorruptRecordError; ``get_many`` those of the ids that exist
    and parse; ``unfinished`` the unfinished ids (newest first) and their records, as fresh as reading each
    (``skip``: ids the caller holds as queued; a record of one of them may be left out only if it is unchanged); ``ids`` lists an index (INDEXES), newest first; ``cas`` writes a
    record if the stored one is still at ``revision`` (the new revision, or None if it changed or is gone) and
    keeps the index true to its status; ``cas_many`` does several, each on its own (a write that failed reads as
    None: it may have landed, so the caller re-reads); ``delete`` removes everything of a task (record, request,
    outputs, events, index entries, ``remarks.<id>``).

    Outputs of each claim (``epoch``) by source (SOURCES): ``workspace`` is a folder on this machine where a
    supervisor writes prompt, transcript and stderr; ``put_output`` stores bytes, a file's content (a repo whose
    workspace is its storage has it already) or None to remove; ``read_output`` is (up to ``limit`` bytes from
    ``offset``, the output's size); ``forget_workspace``: the run here ended and its outputs are stored.

    Logs (``ev.<task_id>``, ``notes.<group>``): ``append`` at the end; ``append_numbered`` adds ``make(position)``
    with an exact position under concurrent writers; ``read_log`` is (position, entry) from ``since`` (a line
    that does not parse reads as ``{"kind": "unreadable"}``).

    Workers: ``put_worker`` registers (beating now), ``beat`` is False for one not registered (any more),
    ``workers`` those whose heartbeat is fresh, ``liveness`` a Liveness. Coordination: ``claim_lock`` serialises
    claimers and yields ``still_ours()`` (False once a holder that outlived the lock lost it; filelock.Timeout
    when it cannot be had); ``signal`` ``nudge`` (workers look now), ``cancel`` (a task's worker stops it) or
    ``uncancel`` (forget it: claimed again); ``subscribe`` calls a handler (flags only) on a nudge or cancel;
    ``cancel_signalled`` is cheap (asked every second per task); ``activity`` changes whenever a task is added,
    removed or changes status, or the queue is signalled. ``get_meta``/``cas_meta``: small keyed values
    (``config``, ``remarks.<task_id>``) by compare-and-set (revision None: absent; value None: remove).
    ``usable`` is False once the storage is gone for good (a deleted store folder)."""

    caps: Capabilities

    @property
    def address(self) -> str: ...  # where it is, for people (a folder, a URL without credentials)

    def create(self, record: TaskRecord, request: TaskRequest) -> None: ...
    def get(self, task_id: str) -> Versioned: ...
    def get_many(self, ids: list[str]) -> dict[str, Versioned]: ...
    def unfinished(self, skip: frozenset[str] = frozenset()) -> tuple[list[str], dict[str, Versioned]]: ...
    def ids(self, index: str = "all") -> list[str]: ...
    def cas(self, task_id: str, record: TaskRecord, revision: object) -> object | None: ...
    def cas_many(self, writes: list[tuple[TaskRecord, object]]) -> list[object | None]: ...
    def request(self, task_id: str) -> TaskRequest: ...
    def delete(self, task_id: str) -> None: ...
    def workspace(self, task_id: str) -> Path: ...
    def put_output(self, task_id: str, epoch: int, source: str, data: bytes | Path | None) -> None: ...
    def read_output(self, task_id: str, epoch: int, source: str, offset: int, limit: int) -> tuple[bytes, int]: ...
    def forget_workspace(self, task_id: str) -> None: ...
    def append(self, log: str, entry: dict) -> None: ...
    def append_numbered(self, log: str, make: Callable[[int], dict]) -> int: ...
    def read_log(self, log: str, since: int = 0) -> list[tuple[int, dict]]: ...
    def put_worker(self, info: WorkerInfo) -> None: ...
    def beat(self, worker_id: str) -> bool: ...
    def remove_worker(self, worker_id: str) -> None: ...
    def workers(self) -> list[WorkerInfo]: ...
    def liveness(self, worker_id: str) -> Liveness: ...
    def claim_lock(self) -> AbstractContextManager[Callable[[], bool]]: ...
    def signal(self, kind: str, task_id: str | None = None) -> None: ...
    def subscribe(self, handler: Callable[[], None]) -> None: ...
    def cancel_signalled(self, task_id: str) -> bool: ...
    def activity(self) -> object: ...
    def get_meta(self, key: str) -> tuple[object, bytes] | None: ...
    def cas_meta(self, key: str, value: bytes | None, revision: object | None) -> bool: ...
    def usable(self) -> bool: ...
    def close(self) -> None: ...
