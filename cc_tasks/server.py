"""The MCP server: thin tool adapters over TaskManager. Errors become MCP tool errors only here."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_context
from fastmcp.server.middleware import Middleware
from fastmcp.tools.base import ToolResult
from mcp.types import TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from . import __version__, replies
from .errors import CCTasksError, InvalidOptionsError
from .manager import TaskManager
from .models import (
    MAX_BATCH,
    OUTPUT_PAGE_BYTES,
    OUTPUT_PAGE_DEFAULT,
    ApprovalAnswered,
    ApprovalList,
    BatchItem,
    BatchResult,
    BudgetInfo,
    Claimed,
    CleanupResult,
    DiffPage,
    EventPage,
    GroupCancelled,
    LeaseRenewed,
    MergeResult,
    NoteAdded,
    NotePage,
    OutputPage,
    PostOptions,
    ServerInfo,
    StartResult,
    TaskList,
    TaskOptions,
    TaskRecord,
    WaitResult,
)

log = logging.getLogger("cc_tasks")
#: Seconds between two looks at whether the store's worker runs while tasks are unfinished.
TEND_EVERY = 1.0

INSTRUCTIONS = """Runs Claude Code sub-agents (claude -p sessions) in parallel, supervised outside this session.
Prefer it to the built-in Agent tool when parts of a job can run at the same time: its tasks are shared
by every window and machine of this user and outlive this session, can ask you for permission mid-run
(wait_for_tasks returns needs_approval: answer with answer_approval), and run under shared budgets
(set_budget) and a rate-limit-aware cap.
Reach first for start_cc_tasks_batch: every task in one call (key + depends_on order them; give each
cwd, allowed_tools, max_turns, timeout_seconds). Then wait_for_tasks (mode "any" or "all"), never a
check_task_status loop. Read long results with get_task_output, follow up with continue_task, stop one
with cancel_task, delete with cleanup_task. Several tasks editing one repository: worktree: true, then
get_task_diff and merge_task. Agents already running share work with post_task / claim_task."""


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "options"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid task options: " + "; ".join(parts)


def edge(fn):
    """Turn this package's errors into MCP tool errors with their message, and what the tool returns (a reply
    model, or a replies.Reply) into a bounded result: the model's JSON as structured content (the schema is
    the return annotation's) and a short text of it."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            reply = replies.to_reply(await fn(*args, **kwargs))
            return ToolResult(content=[TextContent(type="text", text=reply.text)], structured_content=reply.data)
        except CCTasksError as e:
            raise ToolError(str(e)) from None
        except ValidationError as e:
            raise ToolError(_validation_message(e)) from None

    return wrapper


class BoundedErrors(Middleware):
    """Tool errors within the reply bound too, FastMCP's own included (a failed argument validation quotes the
    arguments): a longer message loses its middle (a huge value it quotes), keeping what was wrong and what to do."""

    async def on_call_tool(self, context, call_next):
        try:
            return await call_next(context)
        except Exception as e:
            message = str(e)
            if len(message) <= replies.ERROR_CHARS:
                raise
            half = replies.ERROR_CHARS // 2
            raise ToolError(f"{message[: half - 1]}\u2026{message[-half:]}") from None


def with_task_options(
    fn=None, *, first: list[inspect.Parameter] = (), exclude: frozenset[str] = frozenset(), optional: bool = False
):
    """Give ``fn(**options)`` the signature of TaskOptions' fields, so the tool schema lists each option.
    ``first`` parameters come before them; ``exclude`` leaves fields out; ``optional`` defaults all to None."""
    if fn is None:
        return functools.partial(with_task_options, first=first, exclude=exclude, optional=optional)
    params = list(first)
    for name, f in TaskOptions.model_fields.items():
        if name in exclude:
            continue
        ann = Annotated[(f.annotation, *f.metadata, Field(description=f.description))]  # type: ignore[misc]
        default = inspect.Parameter.empty if f.is_required() else f.default
        if optional:
            ann, default = Annotated[(f.annotation | None, *f.metadata, Field(description=f.description))], None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    ret = inspect.signature(fn).return_annotation
    fn.__signature__ = inspect.Signature(params, return_annotation=ret)
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": ret}
    return fn


def _annotations(
    read_only: bool, destructive: bool = False, idempotent: bool = False, open_world: bool = False
) -> ToolAnnotations:
    return ToolAnnotations(
        readOnlyHint=read_only, destructiveHint=destructive, idempotentHint=idempotent, openWorldHint=open_world
    )


async def _report(elapsed: float, message: str) -> None:
    try:
        await get_context().report_progress(progress=round(elapsed, 3), total=None, message=message)
    except Exception:  # a client that went away must not break the task
        pass


PageOffset = Annotated[int, Field(ge=0, description="Byte offset to read from; pass next_offset of the previous page.")]
PageLimit = Annotated[
    int,
    Field(
        ge=1,
        le=OUTPUT_PAGE_BYTES,
        description="Most bytes to return (fewer when the text, JSON-escaped, would make the reply too long).",
    ),
]
TaskId = Annotated[str, Field(description="A task id returned by start_cc_task_async or list_active_tasks.")]
_CONTINUE_FIRST = [
    inspect.Parameter(
        "task_id",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[str, Field(description="The finished task whose claude session to resume.")],
    ),
    inspect.Parameter(
        "prompt",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[str, Field(description="The follow-up message for the sub-agent.")],
    ),
]


def _cancel_schema() -> dict:
    """cancel_task replies with the task's record, or with a group: the ids cancelled. One object schema with
    the properties of both (a union would make FastMCP wrap every reply in {"result": ...})."""
    record = TaskRecord.model_json_schema()
    group = GroupCancelled.model_json_schema()
    for props in (record["properties"], group["properties"]):  # (no defaults: one shape must not fill the other)
        for prop in props.values():
            prop.pop("default", None)
    return {
        "type": "object",
        "description": "The cancelled task's record; with `group`: the group and the ids cancelled.",
        "properties": {**group["properties"], **record["properties"]},  # (the record's `group` wins: it may be null)
        "$defs": record.get("$defs", {}),
    }


def create_server(manager: TaskManager | None = None) -> FastMCP:
    mgr = manager or TaskManager()

    @asynccontextmanager
    async def lifespan(server):
        async def tend_forever():
            while True:
                try:
                    await anyio.to_thread.run_sync(mgr.tend)
                except Exception:
                    log.exception("looking after the worker failed")
                await asyncio.sleep(TEND_EVERY)

        tender = asyncio.get_running_loop().create_task(tend_forever())
        try:
            yield {}
        finally:
            tender.cancel()

    mcp = FastMCP(
        "cc-tasks", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan, middleware=[BoundedErrors()]
    )
    mcp.manager = mgr  # type: ignore[attr-defined]

    @with_task_options
    async def execute_cc_task(**options: Any) -> TaskRecord:
        """Run one Claude Code sub-agent and return its record when it ends (result bounded; page the rest
        with get_task_output). Sends progress while it runs; cancelling the call stops the sub-agent."""
        return await mgr.execute(TaskOptions(**options), progress=_report)  # (edge bounds the record)

    @with_task_options
    async def start_cc_task_async(**options: Any) -> StartResult:
        """Start a Claude Code sub-agent in the background and return its task_id at once."""
        r = await mgr.on_loop(mgr.start, TaskOptions(**options), nudge=False)  # (local: a few small file writes)
        await mgr.anudge()
        return StartResult(task_id=r.task_id, status=r.status, name=r.name)

    async def start_cc_tasks_batch(
        tasks: Annotated[
            list[BatchItem],
            Field(
                min_length=1,
                max_length=MAX_BATCH,
                description=(
                    f"Tasks to submit together (at most {MAX_BATCH}: submit more in several calls). Each takes the "
                    "task options plus an optional `key`; `depends_on` may name keys of this batch as well as "
                    "existing task ids."
                ),
            ),
        ],
    ) -> BatchResult:
        """Submit many tasks in one call (one lock round-trip); returns every task_id, in the order given."""
        res = await anyio.to_thread.run_sync(functools.partial(mgr.start_batch, tasks, nudge=False))
        await mgr.anudge()
        return res

    @with_task_options(
        first=_CONTINUE_FIRST,
        optional=True,
        exclude=frozenset({"prompt", "cwd", "resume_session_id", "depends_on", "include_dependency_results"}),
    )
    async def continue_task(**options: Any) -> StartResult:
        """Ask a finished sub-agent a follow-up: a new task that resumes its claude session (same cwd, same
        options unless given), linked to it by parent_task_id. Returns at once, like start_cc_task_async."""
        task_id, prompt = options.pop("task_id"), options.pop("prompt")
        r = await anyio.to_thread.run_sync(
            functools.partial(mgr.continue_task, task_id, prompt, nudge=False, **options)
        )
        await mgr.anudge()
        return StartResult(task_id=r.task_id, status=r.status, name=r.name)

    async def get_task_events(
        task_id: TaskId,
        since: Annotated[
            int, Field(ge=0, description="Cursor: 0 for the start, else `next` of the previous page.")
        ] = 0,
        limit: Annotated[int, Field(ge=1, le=1000, description="Most events to return.")] = 200,
    ) -> EventPage:
        """The task's event log: status changes, retries, tool calls, assistant text previews."""
        return await anyio.to_thread.run_sync(functools.partial(mgr.events, task_id, since=since, limit=limit))

    async def get_server_info() -> ServerInfo:
        """This server: version, backend and store, concurrency cap, nesting depth, live workers. Touches no task."""
        return await mgr.on_loop(mgr.server_info)

    async def check_task_status(task_id: TaskId) -> TaskRecord:
        """The task's record: status, timings, live progress while it runs, its (bounded) result once finished."""
        return await mgr.on_loop(mgr.get_quick, task_id) or await anyio.to_thread.run_sync(mgr.get, task_id)

    async def list_active_tasks(
        include_finished: Annotated[bool, Field(description="Also list finished tasks, newest first.")] = False,
        limit: Annotated[
            int, Field(ge=1, le=500, description="Most tasks to return (fewer when the reply would be too long).")
        ] = 50,
        cursor: Annotated[
            str | None, Field(description="`next_cursor` of the previous reply, to list the tasks after it.")
        ] = None,
        group: Annotated[str | None, Field(description="Only the tasks of this group.")] = None,
    ) -> TaskList:
        """Tasks of this store that are queued or running (optionally finished ones too), from every server process,
        newest first; `more` and `next_cursor` page through the rest."""
        listing = await anyio.to_thread.run_sync(
            functools.partial(mgr.list, include_finished=include_finished, limit=limit, cursor=cursor, group=group)
        )
        return replies.list_reply(listing)  # (a TaskList with its text, fitted to the reply)

    async def cancel_task(
        task_id: Annotated[str | None, Field(description="The task to cancel.")] = None,
        group: Annotated[str | None, Field(description="Instead: cancel every unfinished task of this group.")] = None,
    ) -> TaskRecord:
        """Stop the task's whole process tree; the record stays, with status cancelled (and is returned). With
        `group` instead of `task_id`: every unfinished task of the group (returns the ids cancelled)."""
        if (task_id is None) == (group is None):
            raise InvalidOptionsError("give either task_id or group")
        if group is not None:
            return await anyio.to_thread.run_sync(mgr.cancel_group, group)
        return await anyio.to_thread.run_sync(mgr.cancel, task_id)

    async def cleanup_task(
        task_id: TaskId,
        keep_branch: Annotated[
            bool, Field(description="A worktree task: keep its branch (its worktree is removed all the same).")
        ] = False,
    ) -> CleanupResult:
        """Stop the task if it still runs, then delete its files. A worktree task's worktree is removed, and its
        branch too unless it was merged or keep_branch (never while another task works in that worktree)."""
        return await anyio.to_thread.run_sync(functools.partial(mgr.cleanup, task_id, keep_branch=keep_branch))

    async def get_task_diff(
        task_id: TaskId,
        offset: PageOffset = 0,
        limit: PageLimit = OUTPUT_PAGE_BYTES,
    ) -> DiffPage:
        """What a worktree task changed against its base commit (its commits, uncommitted edits and new files), as
        a unified diff with the stat first, in pages (next_offset, eof)."""
        return await anyio.to_thread.run_sync(functools.partial(mgr.diff, task_id, offset=offset, limit=limit))

    async def merge_task(
        task_id: TaskId,
        strategy: Annotated[
            Literal["merge", "squash", "rebase"],
            Field(
                description="'merge': a merge commit (--no-ff); 'squash': one commit of all its changes; 'rebase': "
                "its commits replayed on top, then a fast-forward."
            ),
        ] = "merge",
        message: Annotated[
            str | None,
            Field(max_length=10_000, description="Commit message (merge and squash); default names the task."),
        ] = None,
    ) -> MergeResult:
        """Bring a completed worktree task's changes (changes it left uncommitted are committed on its branch
        first) into the branch checked out in its original cwd. Refused, with the repository left exactly as
        it was, if that checkout has uncommitted changes or on a conflict (the error names the files)."""
        return await anyio.to_thread.run_sync(functools.partial(mgr.merge, task_id, strategy=strategy, message=message))

    async def get_task_output(
        task_id: TaskId,
        offset: PageOffset = 0,
        limit: PageLimit = OUTPUT_PAGE_DEFAULT,
        source: Annotated[
            Literal["result", "transcript", "stderr", "prompt"],
            Field(
                description="'result': the final result text; 'transcript': claude's raw stream-json; 'stderr'; 'prompt': what the task was given (for claude, with its dependencies' results)."
            ),
        ] = "result",
    ) -> OutputPage:
        """Page through a task's full result text (or raw transcript, or stderr)."""
        return await anyio.to_thread.run_sync(
            functools.partial(mgr.output, task_id, offset=offset, limit=limit, source=source)
        )

    async def wait_for_tasks(
        task_ids: Annotated[
            list[str] | None, Field(min_length=1, max_length=200, description="Task ids to wait for.")
        ] = None,
        mode: Annotated[Literal["all", "any"], Field(description="Wait until all, or any one, are finished.")] = "all",
        timeout_seconds: Annotated[float, Field(ge=0, le=86400, description="Give up waiting after this long.")] = 300,
        group: Annotated[
            str | None, Field(description="Wait for the tasks of this group (as they are when the wait starts).")
        ] = None,
    ) -> WaitResult:
        """Block until all (or any) of the tasks are finished or the timeout passes; returns an entry per task
        (status, error, the start of the result: check_task_status has the whole record)."""
        waited = await mgr.wait(task_ids, mode=mode, timeout=timeout_seconds, progress=_report, group=group)
        return replies.wait_reply(waited)  # (a WaitResult with its text, fitted to the reply)

    # -- a task board for agents that are already running ------------------------------
    async def post_task(
        prompt: Annotated[str, Field(description="What to do (required).")],
        name: Annotated[str | None, Field(max_length=200, description="A label shown in listings.")] = None,
        depends_on: Annotated[
            list[str] | None, Field(max_length=100, description="Task ids (of any kind) that must complete first.")
        ] = None,
        include_dependency_results: Annotated[
            bool, Field(description="Give the claimer the dependencies' results with the task.")
        ] = False,
        priority: Annotated[int, Field(ge=-1000, le=1000, description="Higher is claimed first.")] = 0,
        labels: Annotated[
            list[str] | None, Field(max_length=20, description="Only a claimer with all these labels takes it.")
        ] = None,
        group: Annotated[str | None, Field(description="A group: list, wait, cancel together; shared notes.")] = None,
        max_attempts: Annotated[
            int, Field(ge=1, le=10, description="Attempts in all (an expired lease or fail_task retry=true).")
        ] = 3,
        metadata: Annotated[dict[str, Any] | None, Field(description="Free-form JSON kept with the task.")] = None,
    ) -> StartResult:
        """Post a task for agents that are already running (Claude Code windows, other MCP clients, a person):
        no worker starts claude for it; an agent takes it with claim_task. It may depend on claude tasks and
        they on it (start_cc_tasks_batch items take runner: "agent" too)."""
        opts = PostOptions(
            prompt=prompt, name=name, depends_on=depends_on, include_dependency_results=include_dependency_results,
            priority=priority, labels=labels, group=group, max_attempts=max_attempts, metadata=metadata,
        )  # fmt: skip
        r = await anyio.to_thread.run_sync(mgr.post, opts)
        return StartResult(task_id=r.task_id, status=r.status, name=r.name)

    async def claim_task(
        worker: Annotated[str, Field(description="Who claims: a name for this agent, e.g. 'window-2'.")],
        labels: Annotated[list[str] | None, Field(description="This agent's labels (tasks may require some).")] = None,
        group: Annotated[str | None, Field(description="Only a task of this group.")] = None,
        lease_seconds: Annotated[
            float, Field(ge=10, le=86400, description="How long the lease lasts unless renewed (10 s to 24 h).")
        ] = 300,
        wait_seconds: Annotated[
            float, Field(ge=0, le=3600, description="Wait up to this long for a task when none is ready.")
        ] = 0,
    ) -> Claimed:
        """Take the highest-priority, oldest ready agent task you may: its prompt, dependency results and a
        `lease`. Hold it with renew_task before lease_expires_at; end it with complete_task or fail_task, or
        give it back with release_task. `claimed` is false if there was none. Exactly one claimer gets a task."""
        return await mgr.aclaim(worker, labels, group, lease_seconds, wait_seconds)

    async def renew_task(
        task_id: TaskId,
        lease: Annotated[str, Field(description="The lease claim_task gave you.")],
        note: Annotated[str | None, Field(description="Progress to record (event log, the record's progress).")] = None,
    ) -> LeaseRenewed:
        """The heartbeat: extends the lease by its lease_seconds from now; returns the new expiry."""
        return await anyio.to_thread.run_sync(mgr.renew, task_id, lease, note)

    async def complete_task(
        task_id: TaskId,
        lease: Annotated[str, Field(description="The lease claim_task gave you.")],
        result: Annotated[
            str, Field(description="The result (at most 1,000,000 characters; paged by get_task_output).")
        ],
    ) -> TaskRecord:
        """End a claimed task as completed with its result; tasks that depend on it may start."""
        return await anyio.to_thread.run_sync(mgr.complete, task_id, lease, result)

    async def fail_task(
        task_id: TaskId,
        lease: Annotated[str, Field(description="The lease claim_task gave you.")],
        error: Annotated[str, Field(description="What went wrong.")],
        retry: Annotated[
            bool, Field(description="Put it back in the queue as a new attempt, if attempts remain.")
        ] = False,
    ) -> TaskRecord:
        """End a claimed task as failed (its dependents are skipped), or with retry=true requeue it."""
        return await anyio.to_thread.run_sync(mgr.fail, task_id, lease, error, retry)

    async def release_task(
        task_id: TaskId, lease: Annotated[str, Field(description="The lease claim_task gave you.")]
    ) -> TaskRecord:
        """Give a claimed task back to the queue (not counted as an attempt)."""
        return await anyio.to_thread.run_sync(mgr.release, task_id, lease)

    async def add_note(
        group: Annotated[str, Field(description="The group the note is for.")],
        text: Annotated[str, Field(description="What you learned and others must know (at most 10,000 characters).")],
        key: Annotated[
            str | None, Field(description="A note with a key replaces the group's last note of that key.")
        ] = None,
        by: Annotated[str | None, Field(max_length=100, description="Who writes it.")] = None,
    ) -> NoteAdded:
        """Share a note with the agents working on a group of tasks."""
        return await anyio.to_thread.run_sync(mgr.add_note, group, text, key, by)

    async def get_notes(
        group: Annotated[str, Field(description="The group.")],
        since: Annotated[
            int, Field(ge=0, description="Cursor: 0 for the start, else `next` of the previous page.")
        ] = 0,
        limit: Annotated[int, Field(ge=1, le=1000, description="Most notes to return.")] = 100,
    ) -> NotePage:
        """The group's notes from `since` on (a keyed note replaced by a later one is left out)."""
        return await anyio.to_thread.run_sync(mgr.notes, group, since, limit)

    async def answer_approval(
        task_id: TaskId,
        request_id: Annotated[
            str, Field(max_length=100, description="The request's id (needs_approval, list_approvals).")
        ],
        decision: Annotated[
            Literal["allow", "deny"], Field(description="'allow' runs the tool call; 'deny' refuses it.")
        ],
        message: Annotated[
            str | None,
            Field(max_length=2000, description="With 'deny': what the sub-agent is told (why, what instead)."),
        ] = None,
        updated_input: Annotated[
            dict[str, Any] | None, Field(description="With 'allow': the input the tool runs with instead of its own.")
        ] = None,
        remember: Annotated[
            bool,
            Field(
                description="Answer the same call (that command, that file, or that tool) so for the rest of the task."
            ),
        ] = False,
    ) -> ApprovalAnswered:
        """Answer a sub-agent's permission request (its tool call waits for it): exactly one answer counts."""
        return await mgr.on_loop(mgr.answer_approval, task_id, request_id, decision, message, updated_input, remember)

    async def list_approvals(
        group: Annotated[str | None, Field(description="Only the requests of this group's tasks.")] = None,
        cursor: Annotated[str | None, Field(description="`next_cursor` of the previous page.")] = None,
    ) -> ApprovalList:
        """Every sub-agent's permission request waiting for an answer (tool, input), oldest first."""
        return replies.approvals_reply(await mgr.on_loop(mgr.list_approvals, group, cursor))

    async def set_budget(
        budget_usd: Annotated[
            float | None, Field(ge=0, le=1_000_000, description="Most dollars in all; null removes the budget.")
        ],
        group: Annotated[str | None, Field(description="The group it limits; null: the whole store.")] = None,
    ) -> BudgetInfo:
        """Set a spending limit shared by every window and machine: new tasks start only while spent plus reserved
        stays within it (each running task reserves its max_budget_usd, else $2; claude stops there)."""
        return await mgr.on_loop(mgr.set_budget, budget_usd, group)

    async def get_budget(
        group: Annotated[str | None, Field(description="The group; null: the whole store.")] = None,
    ) -> BudgetInfo:
        """A budget's limit, what finished tasks spent, what running ones reserve, what remains, task counts."""
        return await mgr.on_loop(mgr.get_budget, group)

    tools = [
        (execute_cc_task, _annotations(False, destructive=True, open_world=True)),
        (start_cc_task_async, _annotations(False, destructive=True, open_world=True)),
        (start_cc_tasks_batch, _annotations(False, destructive=True, open_world=True)),
        (continue_task, _annotations(False, destructive=True, open_world=True)),
        (get_task_events, _annotations(True, idempotent=True)),
        (check_task_status, _annotations(True, idempotent=True)),
        (list_active_tasks, _annotations(True, idempotent=True)),
        (cancel_task, _annotations(False, destructive=True, idempotent=True)),
        (cleanup_task, _annotations(False, destructive=True)),
        (get_task_diff, _annotations(True, idempotent=True)),
        (merge_task, _annotations(False, destructive=True)),
        (get_task_output, _annotations(True, idempotent=True)),
        (wait_for_tasks, _annotations(True, idempotent=True)),
        (get_server_info, _annotations(True, idempotent=True)),
        (post_task, _annotations(False)),
        (claim_task, _annotations(False)),
        (renew_task, _annotations(False, idempotent=True)),
        (complete_task, _annotations(False, destructive=True)),
        (fail_task, _annotations(False, destructive=True)),
        (release_task, _annotations(False)),
        (add_note, _annotations(False)),
        (get_notes, _annotations(True, idempotent=True)),
        (answer_approval, _annotations(False, idempotent=False)),
        (list_approvals, _annotations(True, idempotent=True)),
        (set_budget, _annotations(False, idempotent=True)),
        (get_budget, _annotations(True, idempotent=True)),
    ]
    for fn, ann in tools:
        mcp.tool(edge(fn), annotations=ann, **({"output_schema": _cancel_schema()} if fn is cancel_task else {}))
    return mcp


def run_stdio(manager: TaskManager | None = None) -> None:
    """Run the stdio server. Tasks keep running under their supervisors when this process exits."""
    mgr = manager or TaskManager()
    mgr.install_sigchld_handler()

    def on_term(signum, frame):
        log.info("server pid %s got signal %s; exiting (running tasks continue)", os.getpid(), signum)
        logging.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    create_server(mgr).run(show_banner=False)
