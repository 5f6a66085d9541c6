"""Submitting tasks: start_cc_task_async (``start``), start_cc_tasks_batch (``start_batch``), continue_task; ``submit``
under them (and under post_task) validates, orders by dependency and writes the records."""

from __future__ import annotations

import logging
import os

from . import worktrees
from .command import STRIP_ENV
from .errors import CCTasksError, DepthLimitError, GitError, InvalidOptionsError
from .ids import new_task_id, validate_task_id
from .models import (
    AGENT_OPTIONS,
    BatchItem,
    BatchResult,
    BatchStarted,
    TaskOptions,
    TaskRecord,
    TaskRequest,
    TaskStatus,
    WorktreeInfo,
)
from .records import RecordsMixin

log = logging.getLogger("cc_tasks")


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


class SubmitMixin(RecordsMixin):
    """New tasks: checked (nothing is written if one is bad), given their records and requests, then the worker
    nudged."""

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
