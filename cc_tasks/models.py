"""Records and schemas: task status and its transitions, task options, the task record, replies."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, field_validator, model_validator

from .states import ACTIVE_STATUSES, DEP_FAILED, TRANSITIONS, TaskStatus, check_transition

__all__ = ["ACTIVE_STATUSES", "DEP_FAILED", "TRANSITIONS", "TaskStatus", "check_transition"]

#: Most characters of one tool reply: the JSON of its structured content plus its text blocks (replies.py).
REPLY_CHARS = 40_000
#: Most bytes one get_task_output page reads (its default is OUTPUT_PAGE_DEFAULT); a page is cut shorter when
#: its text, JSON-escaped and as plain text, would not fit in the reply.
OUTPUT_PAGE_BYTES = 20_000
OUTPUT_PAGE_DEFAULT = 16_000
#: Most tasks one start_cc_tasks_batch call submits: their ids (and those of a wait_for_tasks) fit one reply.
MAX_BATCH = 200
#: Characters of the result kept inside the record itself (the whole result is in result.txt).
RESULT_PREVIEW_CHARS = 16_000
#: Characters of the last assistant text kept in the live progress.
PROGRESS_TEXT_CHARS = 500


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


PermissionMode = Literal["acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
#: What a task's ``runner`` may be: a worker runs ``claude -p`` for it, or an outside agent claims it.
Runner = Literal["claude", "agent"]
Decision = Literal["allow", "deny"]
#: Characters of a tool call's input kept in an approval request (its JSON; cut with ``input_truncated``).
APPROVAL_INPUT_CHARS = 4_000
_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]*(\(.{1,2000}\))?$", re.S)
#: The options an agent task takes (post_task); the others are claude's.
AGENT_OPTIONS = frozenset(
    {"prompt", "name", "depends_on", "include_dependency_results", "priority", "labels", "group", "max_attempts",
     "metadata", "cwd", "runner", "key"}
)  # fmt: skip


def check_group(v: str) -> str:
    if not isinstance(v, str) or not _LABEL.fullmatch(v):
        raise ValueError(f"group {str(v)[:80]!r} is not 1-64 letters, digits, '.', '_', ':' or '-'")
    return v


_SESSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Variables a task may not set through ``env``: they are how nesting is bounded.
RESERVED_ENV = frozenset({"CC_TASKS_DEPTH", "CC_TASKS_MAX_DEPTH", "CC_TASKS_TASK_ID"})


def _no_nul(value: Any, what: str) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")


class BaseModel(PydanticModel):
    """Every model here: validators and schemas are built on first use (``defer_build``), so a process pays
    only for the models it uses (the worker at rest uses few of them)."""

    model_config = ConfigDict(defer_build=True)


class ApprovalRule(BaseModel):
    """Answers a sub-agent's permission request without asking: ``tool`` is a pattern as in allowed_tools."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(
        description="A tool name ('Write', 'mcp__srv__tool') or a tool with a pattern as in allowed_tools: "
        "'Bash(npm test:*)' (commands starting with 'npm test'), 'Bash(git status)' (that command), "
        "'Edit(src/*.py)' (files matching the glob)."
    )
    decision: Decision = Field(description="'allow' or 'deny'.")

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        if not _RULE.fullmatch(v.strip()):
            raise ValueError(
                f"approval rule tool {v[:80]!r} is not a tool name, or a name with a pattern in parentheses "
                "like 'Bash(npm test:*)'"
            )
        return v.strip()


class ApprovalAnswer(BaseModel):
    decision: Decision
    message: str | None = None
    updated_input: dict[str, Any] | None = None
    by: str = Field(description="Who answered: a server (host and pid), a person's CLI, a rule, or the timeout.")
    at: datetime = Field(default_factory=lambda: utcnow())
    remember: bool = False


class PendingApproval(BaseModel):
    """A sub-agent's request to run a tool call its permissions do not cover, waiting for an answer."""

    request_id: str
    tool_name: str
    input: Any = Field(description=f"The call's input; its JSON cut to {APPROVAL_INPUT_CHARS} characters if longer.")
    input_truncated: bool = False
    asked_at: datetime
    expires_at: datetime = Field(description="When it is denied for want of an answer.")
    answer: ApprovalAnswer | None = Field(None, description="Set once answered (the sub-agent then goes on).")


class TaskOptions(BaseModel):
    """What to run: the prompt and how claude runs it. Every field maps to a claude CLI flag."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        description="The task for the sub-agent (required, non-empty). Sent on claude's standard input."
    )
    cwd: str | None = Field(
        None, description="Working directory of the sub-agent; must exist. Default: the server's cwd."
    )
    model: str | None = Field(None, description="Model for the session (--model), e.g. 'sonnet' or a full model name.")
    fallback_model: str | None = Field(
        None, description="Fallback model(s) when the main one is busy (--fallback-model)."
    )
    allowed_tools: list[str] | None = Field(
        None, description="Tools allowed without asking, e.g. ['Bash', 'Edit'] (--allowedTools)."
    )
    disallowed_tools: list[str] | None = Field(None, description="Tools denied (--disallowedTools).")
    permission_mode: PermissionMode | None = Field(None, description="Permission mode (--permission-mode).")
    max_turns: int | None = Field(None, ge=1, le=10_000, description="Most agentic turns (--max-turns).")
    max_budget_usd: float | None = Field(
        None, gt=0, description="Most dollars to spend on API calls (--max-budget-usd)."
    )
    system_prompt: str | None = Field(None, description="Replace the system prompt (--system-prompt).")
    append_system_prompt: str | None = Field(None, description="Append to the system prompt (--append-system-prompt).")
    resume_session_id: str | None = Field(None, description="Resume this claude session id (--resume).")
    add_dirs: list[str] | None = Field(
        None, description="More directories the sub-agent may access; each must exist (--add-dir)."
    )
    mcp_config: str | dict[str, Any] | None = Field(
        None, description="MCP servers for the sub-agent: a JSON object, a JSON string or a file path (--mcp-config)."
    )
    env: dict[str, str] | None = Field(None, description="Extra environment variables for the sub-agent.")
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="Stop the task after this many seconds (default CC_TASKS_DEFAULT_TIMEOUT).",
    )
    name: str | None = Field(None, max_length=200, description="A label for the task, shown in listings.")
    metadata: dict[str, Any] | None = Field(None, description="Free-form JSON kept with the task (at most 16 KB).")
    depends_on: list[str] | None = Field(
        None, max_length=100, description="Task ids that must complete first; if one does not, this task is skipped."
    )
    include_dependency_results: bool = Field(
        False, description="Put the dependencies' results (bounded) in front of the prompt."
    )
    priority: int = Field(0, ge=-1000, le=1000, description="Higher starts first among queued tasks.")
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Attempts in all; only transient failures (API overload, rate limit, "
        "server errors, a crash before the first turn) are retried.",
    )
    retry_backoff_seconds: float = Field(
        2.0, ge=0, le=600, description="Wait before the 2nd attempt; doubles for each later one (at most 10 min)."
    )
    labels: list[str] | None = Field(
        None,
        max_length=20,
        description="Only a worker advertising all of these labels may run the task (e.g. ['repo-a']).",
    )
    group: str | None = Field(
        None,
        description="A group the task belongs to (1-64 letters, digits, '.', '_', ':', '-'): list, wait for, "
        "cancel its tasks together, and share notes (add_note, get_notes).",
    )
    approvals: Literal["ask", "deny"] = Field(
        "ask",
        description="A tool call its permissions do not cover: 'ask' (the sub-agent waits for an answer from the "
        "lead, a person or a rule: answer_approval, list_approvals; wait_for_tasks returns when one asks) or "
        "'deny' (refused at once, as plain claude -p does).",
    )
    approval_timeout_seconds: float = Field(
        600, ge=1, le=86_400, description="A request no one answers in this time is denied, and the task goes on."
    )
    approval_rules: list[ApprovalRule] | None = Field(
        None,
        max_length=100,
        description="Answer requests without asking, first match wins: e.g. "
        "[{'tool': 'Bash(npm test:*)', 'decision': 'allow'}, {'tool': 'Write', 'decision': 'deny'}].",
    )
    worktree: bool = Field(
        False,
        description="Run the sub-agent in a git worktree of its own (claude --worktree), on branch "
        "worktree-<task_id> from HEAD, so that parallel sub-agents never overwrite each other's files; cwd must "
        "be inside a git repository. Its changes stay there (get_task_diff) until merge_task.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty: give the sub-agent something to do")
        _no_nul(v, "prompt")
        return v

    @field_validator("cwd", "model", "fallback_model", "system_prompt", "append_system_prompt", "name")
    @classmethod
    def _strings(cls, v: str | None, info) -> str | None:
        _no_nul(v, info.field_name)
        if v is not None and info.field_name in ("model", "fallback_model", "cwd") and not v.strip():
            raise ValueError(f"{info.field_name} is empty: leave it out to use the default")
        return v

    @field_validator("allowed_tools", "disallowed_tools", "add_dirs")
    @classmethod
    def _lists(cls, v: list[str] | None, info) -> list[str] | None:
        for item in v or []:
            _no_nul(item, info.field_name)
            if not item.strip():
                raise ValueError(f"{info.field_name} has an empty entry")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        for label in v or []:
            if not _LABEL.fullmatch(label):
                raise ValueError(f"label {label[:80]!r} is not 1-64 letters, digits, '.', '_', ':' or '-'")
        return sorted(set(v)) if v else v

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        return check_group(v) if v is not None else v

    @field_validator("resume_session_id")
    @classmethod
    def _session(cls, v: str | None) -> str | None:
        if v is not None and not _SESSION.fullmatch(v):
            raise ValueError(
                "resume_session_id must be a claude session id (a letter or digit, then letters, digits, '.', '_', '-')"
            )
        return v

    @field_validator("mcp_config")
    @classmethod
    def _mcp(cls, v: str | dict | None) -> str | dict | None:
        if isinstance(v, str):
            _no_nul(v, "mcp_config")
            if v.lstrip().startswith("{"):
                try:
                    json.loads(v)
                except json.JSONDecodeError as e:
                    raise ValueError(f"mcp_config is not valid JSON: {e}") from None
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for k, val in (v or {}).items():
            if not _ENV_NAME.fullmatch(k):
                raise ValueError(f"env name {k!r} is not a valid variable name")
            if k in RESERVED_ENV:
                raise ValueError(f"env may not set {k}: it bounds sub-agent nesting")
            _no_nul(val, f"env {k}")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict | None) -> dict | None:
        if v is not None and len(json.dumps(v, default=str)) > 16_384:
            raise ValueError("metadata is larger than 16 KB")
        return v


class Attempt(BaseModel):
    """One run of claude for a task."""

    attempt: int
    started_at: datetime
    finished_at: datetime | None = None
    exit_code: int | None = None
    status: TaskStatus | None = None
    reason: str | None = None
    retried: bool = False


class ProcRef(BaseModel):
    """A process, identified by pid and create time so that a recycled pid is never mistaken for it."""

    pid: int
    create_time: float
    start_ticks: int | None = Field(None, description="Start time in clock ticks since boot; compared exactly.")


class Lease(BaseModel):
    """A worker's claim on a task. Every write the worker makes is fenced by it: once the task's record holds
    another lease (a higher epoch) or none, the worker's writes are refused (LeaseLostError)."""

    task_id: str
    worker: str = Field(description="The worker's id.")
    epoch: int = Field(description="The task's claim count when this lease was granted.")
    host: str = ""
    pid: int | None = None
    acquired_at: datetime = Field(default_factory=lambda: utcnow())
    transcript_offset: int = Field(0, description="Size of the task's transcript when the lease was granted.")
    expires_at: datetime | None = Field(None, description="An agent's lease: when it lapses unless renewed.")
    lease_seconds: float | None = Field(None, description="An agent's lease: what each renewal extends it by.")
    token_sha256: str | None = Field(None, description="An agent's lease: the SHA-256 of its token (not the token).")

    def same(self, other: Lease | None) -> bool:
        return other is not None and (self.task_id, self.worker, self.epoch) == (
            other.task_id,
            other.worker,
            other.epoch,
        )


class WorkerInfo(BaseModel):
    """A worker as it registers itself with the backend; its heartbeat keeps its leases alive."""

    worker_id: str
    host: str
    proc: ProcRef
    labels: list[str] = Field(default_factory=list)
    slots: int
    version: str
    started_at: datetime = Field(default_factory=lambda: utcnow())


class TaskRequest(BaseModel):
    """What a worker needs to run a task (request.json): its options, where, which claude, which environment."""

    options: TaskOptions
    cwd: str
    claude_bin: str
    env: dict[str, str] = Field(default_factory=dict, description="The submitter's environment (local store).")

    @model_validator(mode="before")
    @classmethod
    def _from_0_2(cls, data: Any) -> Any:
        """request.json of cc-tasks 0.2 had the claude argv instead of the binary."""
        if isinstance(data, dict) and "claude_bin" not in data and data.get("argv"):
            data = {**data, "claude_bin": data["argv"][0]}
        return data


class RateLimited(BaseModel):
    """claude waits to retry an API error (its ``api_retry`` event)."""

    status: int | None = Field(None, description="The API's HTTP status (429 rate limit, 529 overloaded).")
    retry_in_seconds: float = 0.0
    attempt: int = 0
    at: datetime = Field(default_factory=lambda: utcnow())


class Progress(BaseModel):
    """Live progress drawn from claude's stream-json output."""

    turns: int = 0
    tool_calls: int = 0
    last_tool: str | None = None
    last_text: str | None = None
    cost_usd: float | None = Field(
        None, description="Spent so far: the result's figure once it ends, an estimate from per-turn usage before."
    )
    output_bytes: int = 0
    updated_at: datetime | None = None
    rate_limited: RateLimited | None = Field(None, description="Set while claude waits to retry an API error.")


class MergeInfo(BaseModel):
    """How merge_task brought a task's changes into the branch of its original checkout."""

    strategy: Literal["merge", "squash", "rebase"]
    target_branch: str
    commit: str = Field(description="HEAD of the target branch after the merge.")
    merged_at: datetime = Field(default_factory=utcnow)


class WorktreeInfo(BaseModel):
    """The git worktree a task runs in (option ``worktree``): made by ``claude --worktree=<name>``."""

    name: str = Field(description="The worktree's name: the id of the task that made it (continuations share it).")
    path: str = Field(description="Where it is: .claude/worktrees/<name> in the repository's main checkout.")
    branch: str = Field(description="Its branch, worktree-<name>.")
    base_commit: str | None = Field(None, description="The commit the branch started from (HEAD when it was made).")
    repo: str = Field(
        description="The checkout the task was started in (its cwd's top level); merge_task merges there."
    )
    merged: MergeInfo | None = Field(None, description="Set once merge_task merged it.")
    host: str | None = Field(
        None, description="The machine it is on (its worker's); diff, merge and removal run there."
    )


#: Files listed in a task's ``changes`` (the counts cover them all; get_task_diff has every one).
CHANGES_FILES = 20
CHANGES_PATH_CHARS = 200


class FileChange(BaseModel):
    path: str
    insertions: int | None = Field(description="Lines added; null for a binary file.")
    deletions: int | None = Field(description="Lines removed; null for a binary file.")


class Changes(BaseModel):
    """What a worktree task changed against its base commit: committed and uncommitted, new files included."""

    files_changed: int
    insertions: int
    deletions: int
    committed: bool = Field(description="True when the sub-agent made commits on its branch.")
    commits: int = Field(0, description="Commits on the branch since the base commit.")
    uncommitted_files: int = Field(
        0, description="Paths with changes left uncommitted in the worktree (new files included)."
    )
    head_commit: str | None = None
    files: list[FileChange] = Field(
        default_factory=list,
        description=f"The first {CHANGES_FILES} files (paths cut to {CHANGES_PATH_CHARS} characters).",
    )
    files_truncated: bool = False
    computed_at: datetime = Field(default_factory=utcnow)


def change_line(changes: Changes, merged: MergeInfo | None = None) -> str:
    """A task's changes in one short line: ``2 files changed, +10 -3, 1 commit, 1 uncommitted, merged into main``."""
    c = changes
    parts = [f"{c.files_changed} file{'' if c.files_changed == 1 else 's'} changed, +{c.insertions} -{c.deletions}"]
    if c.commits:
        parts.append(f"{c.commits} commit{'' if c.commits == 1 else 's'}")
    if c.uncommitted_files:
        parts.append(f"{c.uncommitted_files} uncommitted")
    if merged is not None:
        parts.append(f"merged into {clip(merged.target_branch, 40)} ({merged.strategy})")
    return ", ".join(parts)


class TaskRecord(BaseModel):
    """Everything known about one task; stored as record.json in the task's folder."""

    task_id: str
    name: str | None = None
    status: TaskStatus = TaskStatus.QUEUED
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cwd: str
    model: str | None = None
    prompt_preview: str = ""
    timeout_seconds: float
    depth: int = 0
    exit_code: int | None = None
    result: str | None = None
    result_truncated: bool = False
    result_chars: int = 0
    is_error: bool | None = None
    error: str | None = None
    session_id: str | None = None
    total_cost_usd: float | None = None
    num_turns: int | None = None
    duration_ms: int | None = None
    usage: dict[str, Any] | None = None
    progress: Progress = Field(default_factory=Progress)
    cancel_requested: bool = False
    priority: int = 0
    depends_on: list[str] = Field(default_factory=list)
    parent_task_id: str | None = Field(None, description="The task this one continues (continue_task).")
    max_attempts: int = 1
    attempts: list[Attempt] = Field(default_factory=list)
    queue_position: int | None = Field(None, description="1 = next to start; only for queued tasks, at read time.")
    queue_note: str | None = Field(None, description="Why a queued task may not start soon; at read time.")
    labels: list[str] = Field(default_factory=list, description="Only a worker with all these labels may claim it.")
    runner: Runner = Field(
        "claude", description="'claude': a worker runs claude -p; 'agent': an outside agent claims it."
    )
    group: str | None = None
    epoch: int = Field(0, description="How many times a worker claimed the task; the fence of its lease.")
    lease: Lease | None = Field(None, description="The worker running the task, while it runs.")
    supervisor: ProcRef | None = Field(None, description="Records of cc-tasks 0.2 only: the process supervising it.")
    claude: ProcRef | None = None
    metadata: dict[str, Any] | None = None
    worktree: WorktreeInfo | None = Field(None, description="The git worktree it runs in (option worktree).")
    changes: Changes | None = Field(
        None, description="What it changed in its worktree against the base commit; set when it ends."
    )
    pending_approvals: list[PendingApproval] = Field(
        default_factory=list, description="Permission requests of the running sub-agent waiting for an answer."
    )
    budget_reserved_usd: float | None = Field(
        None, description="What its claim reserved of the budgets that apply (claude's --max-budget-usd)."
    )
    blocked_by: Literal["budget"] | None = Field(
        None, description="Why a queued task cannot start: 'budget' (blocked_reason says which, and how to raise it)."
    )
    blocked_reason: str | None = None
    approval_rules: list[ApprovalRule] = Field(
        default_factory=list, description="Answers remembered for the rest of the task (answer_approval remember)."
    )

    @property
    def awaiting(self) -> list[PendingApproval]:
        """The requests still without an answer."""
        return [a for a in self.pending_approvals if a.answer is None] if self.status == TaskStatus.RUNNING else []

    @property
    def elapsed_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return max(0.0, (end - self.started_at).total_seconds())

    @property
    def turns(self) -> int:
        return self.num_turns if self.num_turns is not None else self.progress.turns

    @property
    def cost_usd(self) -> float | None:
        return self.total_cost_usd if self.total_cost_usd is not None else self.progress.cost_usd

    def bounded(self, result_chars: int = RESULT_PREVIEW_CHARS) -> TaskRecord:
        """A copy whose result carries at most ``result_chars`` characters."""
        if self.result is None or len(self.result) <= result_chars:
            return self
        return self.model_copy(update={"result": self.result[:result_chars], "result_truncated": True})


class TaskSummary(BaseModel):
    """One row of a listing for people (the CLI, the dashboard); tools reply with TaskBrief entries."""

    task_id: str
    name: str | None
    status: TaskStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_seconds: float | None
    cwd: str
    model: str | None
    turns: int
    last_tool: str | None
    cost_usd: float | None
    exit_code: int | None
    error: str | None
    prompt_preview: str
    runner: Runner = "claude"
    group: str | None = None
    holder: str | None = Field(None, description="Who holds it while it runs: an agent's name, or a worker's id.")
    lease_expires_at: datetime | None = Field(None, description="An agent's lease: when it lapses unless renewed.")

    @classmethod
    def of(cls, r: TaskRecord) -> TaskSummary:
        return cls(
            task_id=r.task_id,
            name=r.name,
            status=r.status,
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            elapsed_seconds=r.elapsed_seconds,
            cwd=r.cwd,
            model=r.model,
            turns=r.turns,
            last_tool=r.progress.last_tool,
            cost_usd=r.cost_usd,
            exit_code=r.exit_code,
            error=(r.error or "")[:300] or None,
            prompt_preview=r.prompt_preview[:200],
            runner=r.runner,
            group=r.group,
            holder=r.lease.worker if r.lease and r.status == TaskStatus.RUNNING else None,
            lease_expires_at=r.lease.expires_at if r.lease and r.status == TaskStatus.RUNNING else None,
        )


def clip(text: str | None, chars: int) -> str | None:
    """``text`` cut to ``chars`` characters, the last one an ellipsis when it was cut."""
    if text is None or len(text) <= chars:
        return text
    return text[: chars - 1] + "\u2026"


#: Characters of a task's name and error in a TaskBrief.
BRIEF_NAME_CHARS = 80
BRIEF_ERROR_CHARS = 300


class TaskBrief(BaseModel):
    """A task in a few fields: an entry of wait_for_tasks and list_active_tasks (check_task_status has it all)."""

    task_id: str
    name: str | None = Field(None, description=f"Its label, cut to {BRIEF_NAME_CHARS} characters.")
    status: TaskStatus
    turns: int
    cost_usd: float | None = None
    error: str | None = Field(None, description=f"Why it did not complete, cut to {BRIEF_ERROR_CHARS} characters.")
    result: str | None = Field(
        None, description="The start of the result (the whole result when result_truncated is false)."
    )
    result_truncated: bool = Field(False, description="True when `result` is only the start of it.")
    result_chars: int = Field(0, description="Length of the whole result; get_task_output pages through it.")
    changes: str | None = Field(None, description="A worktree task's changes in one line (get_task_diff shows them).")
    awaiting_approval: bool = Field(False, description="True while the sub-agent waits for an answer_approval.")
    blocked_by: str | None = Field(None, description="'budget': it cannot start until a budget is raised.")
    approvals_pending: int = Field(0, description="How many of its requests wait for an answer.")

    @classmethod
    def of(cls, r: TaskRecord, preview: int) -> TaskBrief:
        """``r`` with at most ``preview`` characters of its result."""
        cut = r.result is not None and len(r.result) > preview
        return cls(
            task_id=r.task_id,
            name=clip(r.name, BRIEF_NAME_CHARS),
            status=r.status,
            turns=r.turns,
            cost_usd=r.cost_usd,
            error=clip(r.error, BRIEF_ERROR_CHARS),
            result=None if r.result is None else r.result[:preview],
            result_truncated=r.result_truncated or cut,
            result_chars=r.result_chars,
            changes=change_line(r.changes, r.worktree.merged if r.worktree else None) if r.changes else None,
            awaiting_approval=bool(r.awaiting),
            blocked_by=r.blocked_by if r.status == TaskStatus.QUEUED else None,
            approvals_pending=len(r.awaiting),
        )


class Listing(BaseModel):
    """Tasks as ``TaskManager.list`` found them, newest first; each surface makes its own entries of them."""

    tasks: list[TaskRecord]
    more: bool = Field(description="True when more tasks matched than `limit` allowed.")
    unreadable: list[str] = Field(default_factory=list, description="Tasks whose record could not be read.")


#: Characters of a request's input in a needs_approval entry (list_approvals shows up to APPROVAL_INPUT_CHARS).
APPROVAL_PREVIEW_CHARS = 300


class ApprovalBrief(BaseModel):
    """A sub-agent's pending permission request, in a few fields."""

    task_id: str
    request_id: str
    tool_name: str
    input_preview: str = Field(
        description=f"The start of the call's input (JSON), at most {APPROVAL_PREVIEW_CHARS} characters."
    )
    asked_at: datetime
    expires_at: datetime

    @classmethod
    def of(cls, r: TaskRecord, a: PendingApproval, chars: int = APPROVAL_PREVIEW_CHARS) -> ApprovalBrief:
        text = a.input if isinstance(a.input, str) else json.dumps(a.input, ensure_ascii=False, default=str)
        return cls(task_id=r.task_id, request_id=a.request_id, tool_name=a.tool_name, input_preview=text[:chars],
                   asked_at=a.asked_at, expires_at=a.expires_at)  # fmt: skip


class ApprovalEntry(ApprovalBrief):
    """list_approvals' entry: the request with more of its input, and which task asks."""

    name: str | None = None
    group: str | None = None
    input_truncated: bool = Field(False, description="True when input_preview is not the whole input.")

    @property
    def cursor(self) -> str:
        """Where a page that ends here goes on (requests sort by when they were asked, then id)."""
        return f"{self.asked_at.timestamp():.6f}_{self.request_id}"  # (safe in a URL as it is)


class ApprovalList(BaseModel):
    approvals: list[ApprovalEntry] = Field(description="Pending requests, oldest first.")
    more: bool = Field(False, description="True when more are pending: pass next_cursor as cursor.")
    next_cursor: str | None = None


class ApprovalAnswered(BaseModel):
    task_id: str
    request_id: str
    decision: Decision
    by: str
    remembered: ApprovalRule | None = Field(None, description="The rule added for the rest of the task (remember).")


class BlockedBrief(BaseModel):
    task_id: str
    reason: str


class Waited(BaseModel):
    """What ``TaskManager.wait`` saw: the whole records; wait_for_tasks replies with a WaitResult of them."""

    done: bool
    timed_out: bool
    finished: list[str]
    pending: list[str]
    tasks: list[TaskRecord]
    needs_approval: list[ApprovalBrief] = Field(default_factory=list)
    blocked: list[BlockedBrief] = Field(default_factory=list)


class TaskTable(BaseModel):
    """A listing for people (the CLI's ``list --json``, the dashboard): a TaskSummary per task."""

    tasks: list[TaskSummary]
    count: int
    more: bool

    @classmethod
    def of(cls, listing: Listing) -> TaskTable:
        return cls(tasks=[TaskSummary.of(r) for r in listing.tasks], count=len(listing.tasks), more=listing.more)


class BatchItem(TaskOptions):
    """One task of a batch: task options plus an optional key that other tasks of the batch may depend on."""

    key: str | None = Field(
        None,
        max_length=100,
        description=("A name for this task within the batch; other tasks of the batch may list it in depends_on."),
    )
    runner: Runner = Field(
        "claude",
        description="'claude' (default): a worker runs claude -p for it. 'agent': no worker runs it; an agent "
        "claims it with claim_task (agent tasks take prompt, name, depends_on, include_dependency_results, "
        "priority, labels, group, max_attempts, metadata).",
    )


class BatchStarted(BaseModel):
    key: str | None
    task_id: str
    status: TaskStatus
    name: str | None = None


class BatchResult(BaseModel):
    tasks: list[BatchStarted]


class EventPage(BaseModel):
    task_id: str
    events: list[dict[str, Any]] = Field(description="Events with seq (position), ts (unix time), kind, and details.")
    next: int = Field(description="Pass as `since` to read the events after these.")
    more: bool = Field(description="True when more events are already there.")
    status: TaskStatus


class StartResult(BaseModel):
    task_id: str
    status: TaskStatus
    name: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskBrief] = Field(description="Newest first.")
    count: int = Field(description="Entries in `tasks`.")
    more: bool = Field(
        description="True when more tasks match than this reply lists (cut by `limit` or to keep the reply bounded)."
    )
    next_cursor: str | None = Field(None, description="With `more`: pass as `cursor` to list the next tasks.")
    unreadable: list[str] = Field(
        default_factory=list,
        description="Tasks whose record is unreadable (check_task_status says why; cleanup_task deletes them).",
    )


class OutputPage(BaseModel):
    task_id: str
    source: Literal["result", "transcript", "stderr", "prompt"]
    offset: int = Field(description="Byte offset this page starts at.")
    next_offset: int = Field(description="Pass as `offset` to read the next page.")
    total_bytes: int
    eof: bool = Field(description="True when this page reaches the current end of the output.")
    text: str
    status: TaskStatus


class WaitResult(BaseModel):
    done: bool = Field(description="True when the wait condition (all/any finished) was met.")
    timed_out: bool
    finished: list[str] = Field(description="Every finished task of the wait.")
    pending: list[str] = Field(description="Every task of the wait not finished yet.")
    tasks: list[TaskBrief] = Field(description="An entry per task, in the order given (all of them unless `more`).")
    more: bool = Field(
        False,
        description="True when `tasks` lists only the first tasks, to keep the reply bounded: the others are in "
        "finished/pending; check_task_status reads one, wait_for_tasks on fewer ids lists them.",
    )
    blocked: list[BlockedBrief] = Field(
        default_factory=list,
        description="Pending tasks that cannot start until a budget is raised (the wait returns at once when every "
        "pending task is so): set_budget raises it.",
    )
    needs_approval: list[ApprovalBrief] = Field(
        default_factory=list,
        description="Sub-agents waiting for an answer (the wait returns as soon as one asks): answer each with "
        "answer_approval(task_id, request_id, 'allow' or 'deny').",
    )


class WorkerBrief(BaseModel):
    worker_id: str
    host: str
    pid: int
    slots: int
    labels: list[str]


class ServerInfo(BaseModel):
    version: str
    pid: int
    backend: str = Field(description="Where the tasks live: 'local' (a file store on this machine).")
    store_dir: str
    max_concurrent: int = Field(description="The global cap: most tasks running at once, across every worker.")
    cap_source: str | None = Field(None, description="Where the cap in force comes from.")
    limiter: Limiter | None = Field(None, description="The rate-limit-aware cap: effective cap, pauses, last 429/529.")
    depth: int
    max_depth: int
    default_timeout: float
    lease_seconds: float | None = Field(
        None, description="How long a worker that stops its heartbeat keeps its tasks (10 s local, 30 s on NATS)."
    )
    workers: list[WorkerBrief] = Field(
        default_factory=list, description="Live workers (at most 20 listed): they claim and run the tasks."
    )


class CleanupResult(BaseModel):
    task_id: str
    deleted: bool
    was_status: TaskStatus | None = Field(description="The status it had; null if its record was unreadable.")
    worktree_removed: bool | None = Field(None, description="Whether its worktree was removed; null: it had none.")
    branch_deleted: bool | None = Field(None, description="Whether its branch was deleted; null: it had no worktree.")
    worktree_note: str | None = Field(None, description="What was left in place, and why.")


class PostOptions(BaseModel):
    """A task for an outside agent (post_task): no worker ever starts claude for it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to do (required, non-empty).")
    name: str | None = Field(None, max_length=200)
    depends_on: list[str] | None = Field(None, max_length=100, description="Task ids that must complete first.")
    include_dependency_results: bool = Field(False, description="Give the claimer the dependencies' results.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher is claimed first, then oldest first.")
    labels: list[str] | None = Field(None, max_length=20, description="Only a claimer with all these labels takes it.")
    group: str | None = Field(None, description="Group of tasks (list, wait, cancel together; shared notes).")
    max_attempts: int = Field(
        3, ge=1, le=10, description="Attempts in all (an expired lease or fail_task(retry=true))."
    )
    metadata: dict[str, Any] | None = Field(None, description="Free-form JSON kept with the task (at most 16 KB).")

    def as_batch_item(self) -> BatchItem:
        return BatchItem(runner="agent", **self.model_dump())


class Claimed(BaseModel):
    """What claim_task gives the claimer: the task, its dependencies' results, and the lease to hold it by."""

    claimed: bool = Field(description="False when no task was ready for this claimer (then nothing else is set).")
    task_id: str | None = None
    name: str | None = None
    group: str | None = None
    prompt: str | None = None
    prompt_truncated: bool = Field(False, description="True if the prompt was cut: get_task_output source=prompt.")
    dependency_results: str | None = Field(None, description="The dependencies' results, bounded (if asked for).")
    lease: str | None = Field(None, description="Pass to renew_task, complete_task, fail_task, release_task.")
    lease_expires_at: datetime | None = None
    attempt: int | None = Field(None, description="1 for the first attempt.")
    metadata: dict[str, Any] | None = None


class Budget(BaseModel):
    """A spending limit shared by every window and machine of a backend: the whole store's, or a group's. Claims
    reserve from it (``reservations``, by task id); a task's end charges its real cost and returns the rest."""

    budget_usd: float = Field(ge=0, le=1_000_000)
    spent_usd: float = 0.0
    reservations: dict[str, float] = Field(default_factory=dict)
    finished: int = Field(0, description="Tasks charged to it.")


class BudgetInfo(BaseModel):
    group: str | None = Field(None, description="The group, or null: the whole store.")
    budget_usd: float | None = Field(None, description="The limit; null: none set.")
    spent_usd: float = Field(0.0, description="What finished tasks it reserved for cost (their total_cost_usd).")
    reserved_usd: float = Field(0.0, description="What running tasks hold of it.")
    remaining_usd: float | None = None
    running: int = Field(0, description="Tasks holding a reservation.")
    finished: int = Field(0, description="Tasks charged to it.")
    blocked: int = Field(0, description="Queued tasks waiting for it to be raised.")


class Limiter(BaseModel):
    """The rate-limit-aware cap, shared by every claimer of a backend: a 429/529 halves how many tasks may start
    and pauses starts for the reported delay; quiet periods raise it again by one."""

    effective_cap: int | None = Field(None, description="How many may run now (null: the cap).")
    paused_until: datetime | None = None
    last_status: int | None = None
    last_at: datetime | None = None
    changed_at: datetime | None = None


class FleetConfig(BaseModel):
    """What every claimer of a backend shares, stored with it (``cc-tasks config set``)."""

    max_concurrent: int | None = Field(
        None, ge=1, le=10_000, description="The cap: most claude tasks running at once, across every worker."
    )


class LeaseRenewed(BaseModel):
    task_id: str
    lease_expires_at: datetime


class Note(BaseModel):
    seq: int = Field(description="Position in the group's notes.")
    ts: float
    key: str | None = None
    by: str | None = None
    text: str


class NotePage(BaseModel):
    group: str
    notes: list[Note] = Field(description="Notes from `since` on; a keyed note replaced by a later one is left out.")
    next: int = Field(description="Pass as `since` to read the notes after these.")
    more: bool = Field(description="True when more notes are already there.")


class NoteAdded(BaseModel):
    group: str
    seq: int
    key: str | None = None


class GroupCancelled(BaseModel):
    group: str
    cancelled: list[str] = Field(description="The group's tasks that were unfinished and are now cancelled.")
    count: int


class DiffPage(BaseModel):
    """A page of a worktree task's changes against its base commit, as a unified diff."""

    task_id: str
    status: TaskStatus
    branch: str
    base_commit: str
    head_commit: str | None = Field(description="The branch's last commit (uncommitted changes come on top of it).")
    offset: int = Field(description="Byte offset this page starts at.")
    next_offset: int = Field(description="Pass as `offset` to read the next page.")
    total_bytes: int
    eof: bool = Field(description="True when this page reaches the end of the diff.")
    text: str = Field(description="git diff --patch-with-stat from the base commit: the stat first, then the patch.")
    changes: Changes | None = Field(None, description="The counts (the stat at the start of the diff lists the files).")


class MergeResult(BaseModel):
    """What merge_task did."""

    task_id: str
    strategy: Literal["merge", "squash", "rebase"]
    repo: str = Field(description="The checkout merged into.")
    target_branch: str
    branch: str = Field(description="The task's branch.")
    before: str = Field(description="HEAD of the target branch before.")
    head: str = Field(description="HEAD of the target branch after.")
    leftovers_committed: bool = Field(
        description="True when changes the sub-agent left uncommitted were first committed on its branch."
    )
    files_changed: int
    insertions: int
    deletions: int
