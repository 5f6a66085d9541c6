"""The task manager: everything the tools do, callable directly from tests and the CLI."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import logging.handlers
import os
import random
import re
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, TypeVar

import anyio
from pydantic import ValidationError

from . import __version__, worktrees
from .backend import Backend, dependency_preamble
from .command import STRIP_ENV
from .config import Settings
from .connect import open_backend
from .errors import (
    CCTasksError,
    CorruptRecordError,
    DepthLimitError,
    GitError,
    InvalidOptionsError,
    MergeRefusedError,
    TaskNotFoundError,
    WorkerUnavailableError,
)
from .models import (
    AGENT_OPTIONS,
    OUTPUT_PAGE_BYTES,
    OUTPUT_PAGE_DEFAULT,
    RESULT_PREVIEW_CHARS,
    BatchItem,
    BatchResult,
    BatchStarted,
    Claimed,
    CleanupResult,
    DiffPage,
    EventPage,
    GroupCancelled,
    LeaseRenewed,
    Listing,
    MergeInfo,
    MergeResult,
    Note,
    NoteAdded,
    NotePage,
    OutputPage,
    PostOptions,
    ServerInfo,
    TaskOptions,
    TaskRecord,
    TaskRequest,
    TaskStatus,
    Waited,
    WorkerBrief,
    WorktreeInfo,
    clip,
)
from .replies import EVENT_PAGE_CHARS, OUTPUT_PAGE_CHARS, fit_page, json_len, squeeze, text_room, utf8_page
from .store import HOST, TASK_ID_RE, TaskStore, new_task_id, validate_task_id
from .transcript import Entry, parse_entries

log = logging.getLogger("cc_tasks")
ProgressFn = Callable[[float, str], Awaitable[None]]
T = TypeVar("T")
#: How long cancel waits for a supervisor to stop its task before stopping it itself.
CANCEL_WAIT = 15.0
#: Most tasks one wait follows (wait_for_tasks' task_ids, or a group's tasks).
WAIT_MAX = 200
PROGRESS_EVERY = 1.0
#: Waits (wait_for_tasks, execute_cc_task) look at the store's active/ folder this often (a stat; less
#: often the more records they would re-read), and re-read their unfinished records when it changed, or
#: every WAIT_FULL_EVERY seconds anyway (a changed record, a dead supervisor).
WAIT_POLL = 0.002
WAIT_FULL_EVERY = 0.25


def _topological(items: list[BatchItem]) -> list[int]:
    """Batch indexes ordered so that each item comes after the batch items it depends on, else by priority
    (highest first) then as given; rejects cycles."""
    key_index = {it.key: n for n, it in enumerate(items) if it.key is not None}
    deps = {n: [key_index[d] for d in (it.depends_on or []) if d in key_index] for n, it in enumerate(items)}
    order: list[int] = []
    state: dict[int, int] = {}  # 1 = visiting, 2 = done

    def visit(n: int, path: list[int]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n) :] + [n]
            names = " -> ".join(str(items[i].key) for i in cycle)
            raise InvalidOptionsError(f"dependency cycle in the batch: {names}")
        state[n] = 1
        for d in deps[n]:
            visit(d, path + [n])
        state[n] = 2
        order.append(n)

    for n in sorted(range(len(items)), key=lambda n: -items[n].priority):  # stable: given order within a priority
        visit(n, [])
    return order


#: An agent's lease: 10 s to 24 h.
LEASE_MIN, LEASE_MAX = 10.0, 86_400.0
CLAIM_WAIT_MAX = 3_600.0
CLAIM_LOOK_EVERY = 2.0
#: What a claim reply carries of the prompt and of the dependencies' results (the rest: get_task_output).
CLAIM_PROMPT_CHARS = 12_000
CLAIM_DEP_CHARS = 16_000
#: An agent's result: stored whole (paged by get_task_output), up to this many characters.
AGENT_RESULT_MAX = 1_000_000
NOTE_MAX = 10_000
NOTE_JSON_MAX = 15_000  # (so that any note fits a get_notes reply whole)
ERROR_MAX = 4_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_claimer(worker: str) -> str:
    name = (worker or "").strip()
    if not name:
        raise InvalidOptionsError("worker is empty: name the claimer (e.g. 'window-2' or 'alice@laptop')")
    if len(name) > 100 or _CONTROL.search(name):
        raise InvalidOptionsError("worker must be at most 100 printable characters")
    return name


def _check_lease_token(lease: str) -> str:
    if not isinstance(lease, str) or not 8 <= len(lease) <= 200:
        raise InvalidOptionsError("lease is not a lease token: pass the `lease` that claim_task returned")
    return lease


def _lacks_changes(r: TaskRecord) -> bool:
    """A finished worktree task whose record has no ``changes`` though its worktree is there (a stat)."""
    wt = r.worktree
    return (
        r.status.terminal
        and r.changes is None
        and wt is not None
        and wt.base_commit is not None
        and not _elsewhere(wt)
        and os.path.isdir(wt.path)
    )


def setup_logging(store: Backend) -> None:
    """The log file in the local store (a NATS server's log goes wherever its process's stderr goes)."""
    logger = logging.getLogger("cc_tasks")
    if not isinstance(store, TaskStore) or any(getattr(h, "_cc_tasks", False) for h in logger.handlers):
        return
    handler = logging.handlers.RotatingFileHandler(store.root / "cc_tasks.log", maxBytes=1_000_000, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    handler._cc_tasks = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _elsewhere(wt: WorktreeInfo) -> bool:
    """Whether a task's worktree is on another machine (a worker elsewhere ran it, on a remote backend)."""
    return bool(wt.host) and wt.host != HOST


class TaskManager:
    """What the tools do. It submits, reads, cancels and nudges; workers (worker.py) pull and run the tasks."""

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

    # -- start ---------------------------------------------------------------
    @property
    def remote(self) -> bool:
        """Tasks run on other machines (NATS): paths and claude are the workers', not this server's."""
        return self.store.kind != "local"

    def _check_start(self, opts: TaskOptions) -> tuple[str, str]:
        s = self.settings
        if s.depth >= s.max_depth:
            raise DepthLimitError(
                f"sub-agent nesting limit reached: this server runs at depth {s.depth} (CC_TASKS_DEPTH) and "
                f"CC_TASKS_MAX_DEPTH is {s.max_depth}; do this work yourself instead of starting another sub-agent"
            )
        if self.remote:  # the worker that claims it checks its cwd; claude is the worker's (CC_TASKS_CLAUDE_BIN)
            cwd = opts.cwd or os.getcwd()
            if not os.path.isabs(cwd):
                raise InvalidOptionsError(
                    f"cwd {opts.cwd!r} is not an absolute path: on the {self.store.kind} backend a task runs on a "
                    "worker, where its cwd must exist; give an absolute path"
                )
            return os.path.normpath(cwd), ""
        cwd = os.path.abspath(os.path.expanduser(opts.cwd)) if opts.cwd else os.getcwd()
        if not os.path.isdir(cwd):
            raise InvalidOptionsError(
                f"cwd {opts.cwd!r} does not exist or is not a directory; give an existing directory"
            )
        for d in opts.add_dirs or []:
            if not os.path.isdir(os.path.expanduser(d)):
                raise InvalidOptionsError(f"add_dirs entry {d!r} does not exist or is not a directory")
        if (
            isinstance(opts.mcp_config, str)
            and not opts.mcp_config.lstrip().startswith("{")
            and not os.path.isfile(os.path.expanduser(opts.mcp_config))
        ):
            raise InvalidOptionsError(f"mcp_config {opts.mcp_config!r} is neither a JSON object nor an existing file")
        return cwd, s.resolve_claude()

    def _check_agent_task(self, item: BatchItem) -> str:
        """An agent task takes only the options that mean something to an agent; returns its cwd."""
        given = item.model_dump(exclude_unset=True, exclude_defaults=True)
        extra = sorted(k for k in given if k not in AGENT_OPTIONS)
        if extra:
            raise InvalidOptionsError(
                f"option(s) {', '.join(extra)} do not apply to an agent task (runner 'agent'): it takes "
                + ", ".join(sorted(AGENT_OPTIONS - {"runner", "key", "cwd"}))
            )
        return os.path.abspath(os.path.expanduser(item.cwd)) if item.cwd else os.getcwd()

    def start(self, opts: TaskOptions, nudge: bool = True) -> TaskRecord:
        """Submit one task: queued (or waiting for its dependencies) until a worker claims it. With
        ``nudge=False`` the caller nudges the worker itself (the server does, without blocking its loop)."""
        return self.submit([BatchItem(**opts.model_dump())], nudge=nudge)[0]

    def start_batch(self, items: list[BatchItem], nudge: bool = True) -> BatchResult:
        records = self.submit(items, nudge=nudge, early_nudge=not nudge)
        return BatchResult(
            tasks=[
                BatchStarted(key=item.key, task_id=r.task_id, status=r.status, name=r.name)
                for item, r in zip(items, records)
            ]
        )

    def submit(
        self,
        items: list[BatchItem],
        parent_task_id: str | None = None,
        nudge: bool = True,
        early_nudge: bool = False,
        worktree: WorktreeInfo | None = None,
    ) -> list[TaskRecord]:
        """Validate every item (nothing is written if one is bad), submit them, then nudge the worker. With
        ``early_nudge``, the worker is nudged once the first ``max_concurrent`` of a long batch exist.
        ``worktree``: the worktree a continuation resumes in (else a worktree task gets one of its own)."""
        if not items:
            raise InvalidOptionsError("no tasks given: pass at least one")
        keys = [it.key for it in items if it.key is not None]
        if len(set(keys)) != len(keys):
            raise InvalidOptionsError("batch keys must be unique within a batch")
        order = _topological(items)
        ids: dict[int, str] = {}
        key_index = {it.key: n for n, it in enumerate(items) if it.key is not None}
        prepared: list[tuple[int, TaskRecord, TaskRequest]] = []
        # the local store's worker runs claude with the submitter's environment; a remote worker with its own
        # (plus the task's ``env``): the submitter's (secrets) never leaves this machine
        source = {} if self.remote else (os.environ if self._env is None else self._env)
        base_env = {k: v for k, v in source.items() if k not in STRIP_ENV}
        for n in order:
            item = items[n]
            opts = TaskOptions(**item.model_dump(exclude={"key", "runner"}))
            if item.runner == "agent":
                cwd, claude = self._check_agent_task(item), ""
            else:
                cwd, claude = self._check_start(opts)
            deps = []
            for d in opts.depends_on or []:
                if d in key_index:
                    deps.append(ids[key_index[d]])
                    continue
                try:
                    self.store.load(validate_task_id(d))
                except CCTasksError:
                    raise InvalidOptionsError(
                        f"depends_on: {d!r} is neither a task of this store nor a key of this batch"
                    ) from None
                deps.append(d)
            ids[n] = task_id = new_task_id()
            wt = (worktree or self._new_worktree(cwd, task_id)) if opts.worktree else None
            record = TaskRecord(
                task_id=task_id,
                name=opts.name,
                cwd=cwd,
                model=opts.model,
                prompt_preview=opts.prompt[:200],
                timeout_seconds=opts.timeout_seconds or self.settings.default_timeout,
                depth=self.settings.depth + 1,
                metadata=opts.metadata,
                priority=opts.priority,
                labels=opts.labels or [],
                runner=item.runner,
                group=opts.group,
                depends_on=list(dict.fromkeys(deps)),
                max_attempts=opts.max_attempts,
                parent_task_id=parent_task_id,
                status=TaskStatus.WAITING if deps else TaskStatus.QUEUED,
                worktree=wt,
            )
            stored_opts = opts.model_copy(update={"depends_on": record.depends_on or None, "cwd": cwd})
            request = TaskRequest(options=stored_opts, cwd=cwd, claude_bin=claude, env=base_env)
            prepared.append((n, record, request))
        # Submitted in dependency order, so a claim in between sees no task whose dependencies are missing;
        # the first ones may start while the rest are written (a nudge after as many as slots).
        first = self.settings.max_concurrent if early_nudge else len(prepared)
        for i, (_, record, request) in enumerate(prepared):
            if i == first:
                self.nudge()
            self.store.submit(record, request)
        for _, r, _ in prepared:
            log.info("submitted task %s (%s)", r.task_id, r.status.value)
        if nudge:
            self.nudge()
        return [r for _, r, _ in sorted(prepared, key=lambda p: p[0])]

    @staticmethod
    def _new_worktree(cwd: str, task_id: str) -> WorktreeInfo:
        try:
            return worktrees.for_task(cwd, task_id)
        except GitError as e:
            raise InvalidOptionsError(
                f"worktree: {e}; give a cwd inside a git repository with at least one commit, or leave worktree out"
            ) from None

    def continue_task(self, task_id: str, prompt: str, nudge: bool = True, **overrides) -> TaskRecord:
        """A new task that resumes a finished task's claude session, in the same cwd (and the same worktree),
        linked to it."""
        parent = self.get(task_id)
        if parent.runner != "claude":
            raise InvalidOptionsError(
                f"task {task_id} is an agent task: there is no claude session to continue; post_task a follow-up"
            )
        if not parent.status.terminal:
            raise InvalidOptionsError(
                f"task {task_id} is {parent.status.value}; wait for it to finish, then continue it"
            )
        if not parent.session_id:
            raise InvalidOptionsError(f"task {task_id} has no claude session to resume (it never started a session)")
        try:
            base = self.store.request(task_id).options.model_dump()
        except CCTasksError:
            base = {}
        for k in ("prompt", "name", "metadata", "depends_on", "include_dependency_results", "resume_session_id"):
            base.pop(k, None)
        given = {k: v for k, v in overrides.items() if v is not None}
        inherited = None
        if parent.worktree is not None:  # its session, and its work, are in its worktree: resume there
            if given.get("worktree") is False:
                raise InvalidOptionsError(
                    f"task {task_id} ran in the worktree {parent.worktree.path}, where its work is: a continuation "
                    "resumes there (leave worktree out)"
                )
            if not os.path.isdir(parent.worktree.path):
                raise InvalidOptionsError(
                    f"the worktree {parent.worktree.path} of task {task_id} is gone: there is nothing to resume in"
                )
            given["worktree"] = True
            inherited = parent.worktree.model_copy(update={"merged": None})
        opts = TaskOptions(
            **{**base, **given, "prompt": prompt, "cwd": parent.cwd, "resume_session_id": parent.session_id}
        )
        return self.submit([BatchItem(**opts.model_dump())], parent_task_id=task_id, nudge=nudge, worktree=inherited)[0]

    # -- the worker ------------------------------------------------------------
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
        if self.store.kind == "local":
            return fn(*args, **kwargs)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def anudge(self) -> None:
        """``nudge`` for the event loop: inline when a worker is known to listen (one datagram-sized write) on
        the local store, else in a thread (starting a worker takes a moment, a remote publish a round trip to
        the backend's loop, and neither may block other tool calls)."""
        if self.store.worker_known() and self.store.kind == "local":
            self.nudge()
        else:
            await anyio.to_thread.run_sync(self.nudge)

    def tend(self) -> None:
        """The server's periodic look: while tasks are unfinished, make sure a worker runs (one that was
        SIGKILLed is replaced; the tasks it held are handed to worker_lost when read or claimed)."""
        if self.store.has_active():
            self.nudge()
            self.store.sweep_agent_leases()

    # -- read ----------------------------------------------------------------
    def get(self, task_id: str) -> TaskRecord:
        """The task's record (a lost worker's task is requeued or failed first); a queued task learns its place."""
        record = self.store.read(validate_task_id(task_id))
        if record.status == TaskStatus.QUEUED:
            record = record.model_copy(
                update={"queue_position": self.store.queue_position(task_id), "queue_note": self._queue_note(record)}
            )
        if _lacks_changes(record):
            record = self._fill_changes(record)
        return record

    def _fill_changes(self, r: TaskRecord) -> TaskRecord:
        """A finished worktree task's ``changes`` when its supervisor could not write them (worker lost, git
        failed): computed now, and kept in the record."""
        try:
            changes = worktrees.changes(r.worktree)
        except GitError as e:
            log.warning("task %s: reading its worktree's changes: %s", r.task_id, e)
            return r
        if changes is None:
            return r
        try:
            return self.store.annotate(r.task_id, changes=changes)
        except CCTasksError:
            return r.model_copy(update={"changes": changes})

    def _queue_note(self, r: TaskRecord) -> str | None:
        """A queued task with labels that no live worker has says so (the store's own worker has none); on
        NATS, also what the workers that passed it over said (no such cwd, missing labels)."""
        if r.runner != "claude":
            return None
        workers = self.store.workers()
        if self.remote and not workers:
            return "no worker is running on this backend: start one with `cc-tasks worker --backend URL`"
        note = getattr(self.store, "queue_note", None)  # (NATS: what the workers that passed it over said)
        said = note(r.task_id) if note is not None else None
        if not r.labels or any(set(r.labels) <= set(w.labels) for w in workers):
            return f"passed over: {said}" if said else None
        flags = " ".join(f"--label {label}" for label in r.labels)
        seen = ", ".join(f"{w.worker_id} on {w.host} {w.labels}" for w in workers[:5]) or "none"
        return (
            f"no running worker has all of its labels {r.labels} (workers: {seen}): start one with "
            f"`cc-tasks worker {flags}`" + (f"; passed over: {said}" if said else "")
        )

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
            max_concurrent=s.max_concurrent,
            depth=s.depth,
            max_depth=s.max_depth,
            default_timeout=s.default_timeout,
            lease_seconds=self.store.lease_seconds,
            workers=workers,
        )

    def get_quick(self, task_id: str) -> TaskRecord | None:
        """``get`` when it needs no slow work (a finished task, or a running one whose worker lives); None when
        the caller should use ``get`` off the event loop (a lost worker's tree to stop, a queue position)."""
        r = self.store.load(validate_task_id(task_id))
        if r.status.terminal:
            return None if _lacks_changes(r) else r
        if r.status == TaskStatus.RUNNING and r.lease is not None and self.store.lease_alive(r.lease):
            return r
        return None

    def _peek(self, task_id: str, copy: bool = True) -> TaskRecord:
        """``get`` for pollers: from the cache of records (with ``copy=False`` not to be changed)."""
        r = self.store.read(validate_task_id(task_id), cached=True)
        return r.model_copy() if copy else r

    def list(
        self,
        include_finished: bool = False,
        limit: int = 50,
        status: TaskStatus | None = None,
        cursor: str | None = None,
        group: str | None = None,
    ) -> Listing:
        """Tasks newest first (ids sort by creation time); with ``cursor`` (a task id: the last one of the
        previous page), only those older than it."""
        limit = max(1, min(int(limit), 500))
        if cursor is not None and not TASK_ID_RE.fullmatch(cursor):
            raise InvalidOptionsError(
                f"cursor {cursor[:80]!r} is not one list_active_tasks returned: pass its next_cursor, or no cursor"
            )
        records: list[TaskRecord] = []
        unreadable: list[str] = []
        more = False
        ids = self.store.list_ids(include_finished=include_finished or bool(status and status.terminal))
        if cursor is not None:
            ids = itertools.dropwhile(lambda t: t >= cursor, ids)
        for task_id in ids:
            try:
                r = self.store.read(task_id)
            except TaskNotFoundError:
                continue
            except CorruptRecordError:
                unreadable.append(task_id)
                continue
            if not include_finished and r.status.terminal:
                continue
            if status is not None and r.status != status:
                continue
            if group is not None and r.group != group:
                continue
            if len(records) == limit:
                more = True
                break
            records.append(r)
        return Listing(tasks=records, more=more, unreadable=unreadable[:50])

    def events(self, task_id: str, since: int = 0, limit: int = 200) -> EventPage:
        """The task's event log from position ``since`` (a cursor: pass ``next`` of the previous page)."""
        record = self.get(task_id)
        if since < 0:
            raise InvalidOptionsError("since must be 0 or more (use next from the previous page)")
        limit = max(1, min(int(limit), 1000))
        events: list[dict] = []
        size = 0
        n = since
        more = False
        for i, ev in self.store.iter_events(task_id, since):
            if len(events) >= limit:
                more = True
                break
            ev["seq"] = i
            cost = json_len(ev) + 2  # (as the reply's JSON has it)
            if events and size + cost > EVENT_PAGE_CHARS:
                more = True
                break
            if cost > EVENT_PAGE_CHARS:  # one huge event: its strings cut, so that the page moves on
                ev = squeeze(ev, 500)
                cost = json_len(ev) + 2
            events.append(ev)
            size += cost
            n = i + 1
        return EventPage(task_id=task_id, events=events, next=n, more=more, status=record.status)

    def output(
        self,
        task_id: str,
        offset: int = 0,
        limit: int = OUTPUT_PAGE_DEFAULT,
        source: Literal["result", "transcript", "stderr", "prompt"] = "result",
    ) -> OutputPage:
        """At most ``limit`` bytes from byte ``offset``, never splitting a UTF-8 character, and fewer when the
        page's text would not fit in a reply twice (JSON-escaped and as plain text)."""
        record = self.get(task_id)
        if offset < 0:
            raise InvalidOptionsError(
                "offset must be 0 or more (a byte offset; use next_offset from the previous page)"
            )
        limit = max(1, min(int(limit), OUTPUT_PAGE_BYTES))
        data, total = self.store.read_output(task_id, source, offset, limit)
        start = min(offset, total)
        fit = fit_page(data, OUTPUT_PAGE_CHARS)
        # cut at a UTF-8 character boundary so that no page splits a character
        if start + fit < total:
            cut = fit
            while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
                cut -= 1
            if cut > 0 and data[cut - 1] >= 0xC0:
                cut -= 1
            data = data[:cut] or data[:fit]
        end = start + len(data)
        return OutputPage(
            task_id=task_id,
            source=source,
            offset=start,
            next_offset=end,
            total_bytes=total,
            eof=end >= total,
            text=data.decode("utf-8", "replace"),
            status=record.status,
        )

    def transcript(self, task_id: str, offset: int = 0, max_bytes: int = 1 << 20) -> tuple[list[Entry], int]:
        """Readable entries of the task's transcript from byte ``offset``, and the offset to follow on from."""
        data, _ = self.store.read_output(validate_task_id(task_id), "transcript", max(0, offset), max_bytes)
        return parse_entries(data, offset, max_bytes)

    # -- agents: a task board -------------------------------------------------------
    def post(self, opts: PostOptions) -> TaskRecord:
        """A task for an outside agent to claim; no worker ever starts claude for it."""
        return self.submit([opts.as_batch_item()], nudge=False)[0]

    def claim(self, worker: str, labels: list[str] | None = None, group: str | None = None,
              lease_seconds: float = 300) -> Claimed:  # fmt: skip
        """Lease the highest-priority, oldest ready agent task ``worker`` may take; ``claimed`` false if none."""
        worker = _check_claimer(worker)
        if not LEASE_MIN <= lease_seconds <= LEASE_MAX:
            raise InvalidOptionsError(
                f"lease_seconds {lease_seconds:g} is outside {LEASE_MIN:g} … {LEASE_MAX:g} (10 s to 24 h); renew_task "
                "extends a lease by as much again"
            )
        try:  # (validated as task labels and groups are)
            labels = TaskOptions(prompt="x", labels=labels, group=group).labels or []
        except ValidationError as e:
            raise InvalidOptionsError("; ".join(err["msg"] for err in e.errors())) from None
        got = self.store.claim_agent(worker, labels, group, lease_seconds)
        if got is None:
            return Claimed(claimed=False)
        r, token = got
        request = self.store.request(r.task_id)
        prompt = request.options.prompt
        deps = None
        if request.options.include_dependency_results and r.depends_on:
            deps = dependency_preamble(self.store, r.depends_on, total=CLAIM_DEP_CHARS)
        return Claimed(
            claimed=True, task_id=r.task_id, name=r.name, group=r.group, prompt=prompt[:CLAIM_PROMPT_CHARS],
            prompt_truncated=len(prompt) > CLAIM_PROMPT_CHARS, dependency_results=deps, lease=token,
            lease_expires_at=r.lease.expires_at, attempt=len(r.attempts) + 1, metadata=r.metadata,
        )  # fmt: skip

    async def aclaim(self, worker: str, labels: list[str] | None = None, group: str | None = None,
                     lease_seconds: float = 300, wait_seconds: float = 0) -> Claimed:  # fmt: skip
        """``claim``, waiting up to ``wait_seconds`` for a task to become ready."""
        if not 0 <= wait_seconds <= CLAIM_WAIT_MAX:
            raise InvalidOptionsError(f"wait_seconds must be 0 … {CLAIM_WAIT_MAX:g}")
        deadline = time.monotonic() + wait_seconds
        claim = functools.partial(self.claim, worker, labels, group, lease_seconds)
        got = await anyio.to_thread.run_sync(claim)
        while not got.claimed and time.monotonic() < deadline:
            # A new task, a release or a requeue changes the stamp (a stat every 50 ms); an expiry shows at the
            # latest look every 2 s (jittered: many claimers do not look at once). Only when a cheap look
            # without the queue lock finds something is a claim made.
            stamp = self._active_stamp()
            until = min(deadline, time.monotonic() + CLAIM_LOOK_EVERY * random.uniform(0.75, 1.25))
            while time.monotonic() < until and self._active_stamp() == stamp:
                await asyncio.sleep(0.05)
            if await anyio.to_thread.run_sync(self.store.has_ready_agent_task, labels or [], group):
                got = await anyio.to_thread.run_sync(claim)
        return got

    def renew(self, task_id: str, lease: str, note: str | None = None) -> LeaseRenewed:
        if note is not None and len(note) > NOTE_MAX:
            raise InvalidOptionsError(f"note is {len(note)} characters; at most {NOTE_MAX}")
        r = self.store.renew_agent(validate_task_id(task_id), _check_lease_token(lease), note)
        return LeaseRenewed(task_id=task_id, lease_expires_at=r.lease.expires_at)

    def complete(self, task_id: str, lease: str, result: str) -> TaskRecord:
        if len(result) > AGENT_RESULT_MAX:
            raise InvalidOptionsError(
                f"result is {len(result):,} characters; at most {AGENT_RESULT_MAX:,} (put more in a file and give its path)"
            )
        return self.store.complete_agent(
            validate_task_id(task_id), _check_lease_token(lease), result, RESULT_PREVIEW_CHARS
        )

    def fail(self, task_id: str, lease: str, error: str, retry: bool = False) -> TaskRecord:
        if not error.strip():
            raise InvalidOptionsError("error is empty: say what went wrong")
        return self.store.fail_agent(validate_task_id(task_id), _check_lease_token(lease), error[:ERROR_MAX], retry)

    def release(self, task_id: str, lease: str) -> TaskRecord:
        return self.store.release_agent(validate_task_id(task_id), _check_lease_token(lease))

    def add_note(self, group: str, text: str, key: str | None = None, by: str | None = None) -> NoteAdded:
        if not text.strip():
            raise InvalidOptionsError("text is empty: a note says something")
        if len(text) > NOTE_MAX or json_len(text) > NOTE_JSON_MAX:
            raise InvalidOptionsError(
                f"text is {len(text):,} characters ({json_len(text):,} as JSON); a note holds at most {NOTE_MAX:,} "
                f"({NOTE_JSON_MAX:,} as JSON: control and non-ASCII characters are escaped, up to six each)"
            )
        if key is not None and not 1 <= len(key) <= 100:
            raise InvalidOptionsError("key must be 1 to 100 characters")
        seq = self.store.add_note(group, text, key, by)
        return NoteAdded(group=group, seq=seq, key=key)

    def notes(self, group: str, since: int = 0, limit: int = 100) -> NotePage:
        if since < 0:
            raise InvalidOptionsError("since must be 0 or more (use next from the previous page)")
        limit = max(1, min(int(limit), 1000))
        out: list[Note] = []
        size, nxt, more = 0, since, False
        for n in self.store.iter_notes(group, since):
            note = Note(**{k: n.get(k) for k in ("seq", "ts", "key", "by", "text")})
            cost = json_len(note.model_dump(mode="json")) + 2
            if len(out) >= limit or (out and size + cost > EVENT_PAGE_CHARS):
                more = True
                break
            out.append(note)
            size += cost
            nxt = note.seq + 1
        return NotePage(group=group, notes=out, next=nxt, more=more)

    def group_ids(self, group: str, include_finished: bool = True) -> list[str]:
        """The group's tasks, newest first."""
        try:
            TaskOptions(prompt="x", group=group)
        except ValidationError as e:
            raise InvalidOptionsError(e.errors()[0]["msg"]) from None
        out = []
        for t in self.store.list_ids(include_finished=include_finished):
            try:
                if self.store.read(t, cached=True).group == group:
                    out.append(t)
            except CCTasksError:
                continue
        return out

    def cancel_group(self, group: str) -> GroupCancelled:
        members = self.group_ids(group)  # (one scan of the store: every task of the group, finished or not)
        if not members:
            raise InvalidOptionsError(f"group {group!r} has no tasks (list_active_tasks shows the groups in use)")
        cancelled = []
        for t in members:
            try:
                if (
                    not self.store.read(t, cached=True).status.terminal
                    and self.cancel(t).status == TaskStatus.CANCELLED
                ):
                    cancelled.append(t)
            except TaskNotFoundError:
                continue
        return GroupCancelled(group=group, cancelled=cancelled, count=len(cancelled))

    # -- stop ----------------------------------------------------------------
    def cancel(self, task_id: str) -> TaskRecord:
        """Stop the task's whole process tree; the record stays with status ``cancelled``. A task that has not
        started is cancelled at once; a running one by its worker's supervisor (nudged; it also looks every
        0.25 s), or, if that worker does not end it within CANCEL_WAIT, here."""
        record = self.store.request_cancel(validate_task_id(task_id))
        if record.status.terminal:
            return record
        self.nudge()
        deadline = time.monotonic() + CANCEL_WAIT
        while time.monotonic() < deadline:
            record = self.store.read(task_id)  # (a lost worker's task ends cancelled here)
            if record.status.terminal:
                return record
            time.sleep(0.005)
        return self.store.force_cancel(
            task_id, f"cancelled: its worker did not stop it within {CANCEL_WAIT:g}s; its process tree was stopped"
        )

    def cleanup(self, task_id: str, keep_branch: bool = False) -> CleanupResult:
        """Stop the task if it still runs, then delete it. A task whose record is unreadable is deleted too
        (its processes, found by the task id in their environment, are stopped first). A worktree task's
        worktree is removed, and its branch unless it was merged or ``keep_branch``."""
        try:
            record = self.get(task_id)
        except CorruptRecordError:
            self.store.purge(task_id)
            log.info("cleaned up task %s (its record was unreadable)", task_id)
            return CleanupResult(task_id=task_id, deleted=True, was_status=None)
        was: TaskStatus | None = record.status
        if not was.terminal:
            self.cancel(task_id)
        removal = self._remove_worktree(record, keep_branch) if record.worktree else {}
        self.store.delete(task_id)
        log.info("cleaned up task %s (was %s)", task_id, was.value if was else "unreadable")
        return CleanupResult(task_id=task_id, deleted=True, was_status=was, **removal)

    def _worktree_users(self, r: TaskRecord, include_finished: bool = False) -> list[TaskRecord]:
        """Tasks other than ``r`` that work in ``r``'s worktree (the task it continues, its continuations):
        the unfinished ones, or with ``include_finished`` all of them."""
        wt = r.worktree
        users = []
        for t in self.store.list_ids(include_finished=include_finished):
            if t == r.task_id:
                continue
            try:
                o = self.store.read(t, cached=True)
            except CCTasksError:
                continue
            if (
                (include_finished or not o.status.terminal)
                and o.worktree
                and (o.worktree.name, o.worktree.repo)
                == (
                    wt.name,
                    wt.repo,
                )
            ):
                users.append(o)
        return users

    def _remove_worktree(self, r: TaskRecord, keep_branch: bool) -> dict:
        wt = r.worktree
        if _elsewhere(wt):  # (never a same-named worktree of this machine's)
            return {
                "worktree_removed": False,
                "branch_deleted": False,
                "worktree_note": f"worktree {wt.path} and branch {wt.branch} kept: they are on {wt.host}, not here",
            }
        users = self._worktree_users(r, include_finished=True)  # (a chain of continuations shares one worktree:
        if users:  # it goes with the last of them, so that cleaning one never loses another's work)
            return {
                "worktree_removed": False,
                "branch_deleted": False,
                "worktree_note": f"worktree {wt.path} and branch {wt.branch} kept: task {users[0].task_id} "
                f"({users[0].status.value}) shares it; they go with the last task of the worktree",
            }
        try:
            merged = worktrees.is_merged(wt)
            why = "it was merged" if merged else "keep_branch" if keep_branch else None
            removed, deleted, note = worktrees.remove(wt, keep_branch_because=why)
        except GitError as e:
            return {"worktree_removed": False, "branch_deleted": False, "worktree_note": f"could not remove it: {e}"}
        log.info("task %s: worktree %s removed: %s, branch deleted: %s", r.task_id, wt.path, removed, deleted)
        return {"worktree_removed": removed, "branch_deleted": deleted, "worktree_note": note}

    # -- worktrees: diff and merge -------------------------------------------------
    def _worktree_of(self, record: TaskRecord, doing: str) -> WorktreeInfo:
        if record.worktree is None:
            raise InvalidOptionsError(
                f"task {record.task_id} did not run in a worktree of its own (option worktree): nothing to {doing}"
            )
        if record.worktree.base_commit is None:
            raise InvalidOptionsError(
                f"task {record.task_id} is {record.status.value} and has not started in its worktree: "
                f"nothing to {doing}"
            )
        if _elsewhere(record.worktree):
            raise InvalidOptionsError(
                f"task {record.task_id}'s worktree is on {record.worktree.host} (the worker that ran it), not on "
                f"this machine ({HOST}): {doing} it with cc-tasks on {record.worktree.host}"
            )
        return record.worktree

    def diff(self, task_id: str, offset: int = 0, limit: int = OUTPUT_PAGE_BYTES) -> DiffPage:
        """A page of the task's changes against its base commit (committed, uncommitted, new files) as a unified
        diff, the stat first: at most ``limit`` bytes from byte ``offset``, fewer when the page would not fit
        in a reply; pages never split a UTF-8 character."""
        record = self.get(task_id)
        wt = self._worktree_of(record, "show")
        if offset < 0:
            raise InvalidOptionsError(
                "offset must be 0 or more (a byte offset; use next_offset from the previous page)"
            )
        limit = max(1, min(int(limit), OUTPUT_PAGE_BYTES))
        tip, data, total = worktrees.diff(wt, offset, limit)
        start = min(offset, total)
        changes = record.changes.model_copy(update={"files": [], "files_truncated": False}) if record.changes else None
        page = DiffPage(
            task_id=task_id,
            status=record.status,
            branch=wt.branch,
            base_commit=wt.base_commit,
            head_commit=tip,
            offset=start,
            next_offset=start,
            total_bytes=total,
            eof=start >= total,
            text="",
            changes=changes,
        )
        data = utf8_page(data, fit_page(data, text_room(page)), start + len(data) >= total)
        end = start + len(data)
        return page.model_copy(
            update={"next_offset": end, "eof": end >= total, "text": data.decode("utf-8", "replace")}
        )

    def merge(self, task_id: str, strategy: str = "merge", message: str | None = None) -> MergeResult:
        """Bring a completed worktree task's changes into the branch checked out in its original cwd (see
        worktrees.merge: refused, and the repository left as it was, on uncommitted changes there or a
        conflict). Its record then says it was merged."""
        if strategy not in ("merge", "squash", "rebase"):
            raise InvalidOptionsError(f"strategy {strategy[:40]!r} is none of 'merge', 'squash', 'rebase'")
        if message is not None and ("\x00" in message or not message.strip()):
            raise InvalidOptionsError("message is empty or has a NUL character: give a commit message, or none")
        record = self.get(task_id)
        wt = self._worktree_of(record, "merge")
        if record.status != TaskStatus.COMPLETED:
            raise MergeRefusedError(
                f"task {task_id} is {record.status.value}: only a task that ended completed is merged (get_task_diff "
                "shows what it changed; continue_task can finish its work); nothing was done"
            )
        if wt.merged is not None:
            raise MergeRefusedError(
                f"task {task_id} was already merged into {wt.merged.target_branch} ({wt.merged.strategy}, "
                f"{wt.merged.commit[:12]}); nothing was done"
            )
        users = self._worktree_users(record)
        if users:
            raise MergeRefusedError(
                f"task {users[0].task_id} ({users[0].status.value}) works in the worktree of task {task_id}: wait for "
                "it to end, then merge; nothing was done"
            )
        title = clip(" ".join((record.name or record.prompt_preview).split()), 72) or task_id
        default = (
            f"Merge task {task_id} ({wt.branch}): {title}"
            if strategy == "merge"
            else f"{title}\n\ncc-tasks task {task_id}, from branch {wt.branch} ({strategy})"
        )
        result = worktrees.merge(
            wt,
            task_id=task_id,
            strategy=strategy,  # type: ignore[arg-type]
            message=message or default,
            leftovers_message=f"Changes task {task_id} left uncommitted in its worktree\n\n(committed by cc-tasks merge_task)",
        )
        merged = wt.model_copy(
            update={
                "merged": MergeInfo(strategy=strategy, target_branch=result.target_branch, commit=result.head),
                **({"base_commit": result.before} if strategy == "rebase" else {}),
            }
        )
        try:
            changes = worktrees.changes(merged) or record.changes
        except GitError:
            changes = record.changes
        self.store.annotate(task_id, worktree=merged, changes=changes)
        log.info("merged task %s into %s of %s (%s)", task_id, result.target_branch, result.repo, strategy)
        return result

    # -- wait ----------------------------------------------------------------
    async def wait(
        self,
        task_ids: list[str] | None,
        mode: Literal["all", "any"] = "all",
        timeout: float = 300.0,
        progress: ProgressFn | None = None,
        group: str | None = None,
    ) -> Waited:
        """Until all (or any) of the tasks end, or ``timeout``. With ``group``: the group's tasks (as they are
        when the wait starts), with or without ``task_ids``."""
        if group is not None:
            members = await anyio.to_thread.run_sync(self.group_ids, group)
            if len(members) > WAIT_MAX:
                raise InvalidOptionsError(
                    f"group {group!r} has {len(members)} tasks; a wait takes at most {WAIT_MAX}: wait on task ids"
                )
            if not members and not task_ids:
                raise InvalidOptionsError(f"group {group!r} has no tasks")
            task_ids = [*(task_ids or []), *members]
        if not task_ids:
            raise InvalidOptionsError("task_ids is empty: give at least one task id (or a group)")
        ids = list(dict.fromkeys(validate_task_id(t) for t in task_ids))
        for t in ids:
            await self.on_loop(self.store.read, t)  # unknown ids fail before any waiting
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        next_progress = t0
        latest: dict[str, TaskRecord] = {}

        swept = [time.monotonic()]

        def refresh() -> None:  # in a worker thread: finding a dead supervisor stops its tree, which takes time
            if time.monotonic() - swept[0] >= 1.0:  # (an agent task's expired lease frees what depends on it)
                swept[0] = time.monotonic()
                self.store.sweep_agent_leases()
            for t in ids:  # a finished record does not change: read only the others again
                if t not in latest or not latest[t].status.terminal:
                    latest[t] = self._peek(t, copy=False)  # (only read, and replied with)

        while True:
            stamp = self._active_stamp()  # (before the reads: an end after them is seen by the next wait)
            await anyio.to_thread.run_sync(refresh)
            records = [latest[t] for t in ids]
            finished = [r.task_id for r in records if r.status.terminal]
            done = len(finished) == len(ids) if mode == "all" else bool(finished)
            now = time.monotonic()
            if done or now >= deadline:
                return Waited(
                    done=done,
                    timed_out=not done,
                    finished=finished,
                    pending=[t for t in ids if t not in finished],
                    tasks=records,
                )
            if progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                running = sum(r.status == TaskStatus.RUNNING for r in records)
                await progress(now - t0, f"{len(finished)}/{len(ids)} finished, {running} running, {now - t0:.0f}s")
            await self._until_a_task_ends(
                stamp,
                len(ids) - len(finished),
                deadline if progress is None else min(deadline, next_progress),
                now - t0,
            )

    async def _until_a_task_ends(self, stamp: tuple[int, int], unfinished: int, by: float, waited: float) -> None:
        """Sleep until some task of the store may have ended since ``stamp`` was taken (its marker in active/
        goes, which changes the folder), at most WAIT_FULL_EVERY. Looks every 2 ms at first, less often the
        longer the wait has lasted (``waited`` seconds; a hundredth of it, up to 50 ms) and the more records
        a change makes it re-read (1 ms each)."""
        gap = max(WAIT_POLL, 0.001 * unfinished, min(0.05, waited / 100))
        until = min(by, time.monotonic() + WAIT_FULL_EVERY)
        while True:
            await asyncio.sleep(max(0.0, min(gap, until - time.monotonic())))
            if time.monotonic() >= until or self._active_stamp() != stamp:
                return

    def _active_stamp(self) -> object:
        return self.store.activity_stamp()

    async def execute(self, opts: TaskOptions, progress: ProgressFn | None = None) -> TaskRecord:
        """Run one task to its end. If the caller is cancelled, the task's process tree is stopped."""
        stamp = self._active_stamp()
        record = await anyio.to_thread.run_sync(functools.partial(self.start, opts, nudge=False))
        await self.anudge()
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
                await self._until_a_task_ends(
                    stamp, 1, next_progress if progress is not None else now + WAIT_FULL_EVERY, now - t0
                )
                stamp = self._active_stamp()  # (before the read: an end after it is seen next time)
                record = await anyio.to_thread.run_sync(self._peek, task_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self.cancel, task_id)
                except CCTasksError:  # deleted meanwhile
                    pass
            raise
        return record.bounded()
