"""The ``cc-tasks`` command: serve the MCP server, and look after tasks from a shell.

Every subcommand reads the same store as the servers (CC_TASKS_DIR, or --store). Exit codes: 0 success,
1 a task did not complete (run --wait) or a doctor check failed, 2 bad usage or an error."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .checks import NATS_FILES
from .errors import CCTasksError, ClaudeNotFoundError

# not a terminal (a pipe, a file): never squeeze tables to 80 columns
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
STATUS_STYLE = {
    "waiting": "yellow",
    "queued": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "cancelled": "dim",
    "skipped": "dim",
}
ENTRY_STYLE = {"assistant": "cyan", "tool": "yellow", "tool_result": "white", "result": "green", "session": "dim"}
DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_duration(text: str) -> timedelta:
    m = DURATION.match(text.strip().lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 12h, 7d or 2w")
    n, unit = float(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


def _manager(ctx: click.Context):
    from .manager import TaskManager

    return TaskManager(_settings(ctx))


def _settings(ctx: click.Context):
    from .config import Settings

    obj = ctx.find_root().obj or {}
    store = obj.get("store")
    return Settings.from_env(
        store_dir=Path(store) if store else None, backend=obj.get("backend"), nats_files=obj.get("nats_files")
    )


def _set_backend(ctx: click.Context, param, value: str | None) -> None:
    if value:
        root = ctx.find_root()
        root.obj = {**(root.obj or {}), "backend": value}


def _set_nats_file(ctx: click.Context, param, value: str | None) -> None:
    if value:
        root = ctx.find_root()
        obj = root.obj or {}
        root.obj = {**obj, "nats_files": {**obj.get("nats_files", {}), param.name.removeprefix("nats_"): value}}


def _nats_options() -> list[click.Option]:
    """``--nats-creds`` ... ``--nats-tls-key`` (files for a NATS backend; the environment's otherwise)."""
    return [
        click.Option(
            [f"--nats-{key.replace('_', '-')}", f"nats_{key}"],
            metavar="FILE",
            expose_value=False,
            is_eager=True,
            callback=_set_nats_file,
            help=f"NATS backend: {what} (default: {var}).",
        )
        for key, (var, what) in NATS_FILES.items()
    ]


BACKEND_HELP = (
    "Backend: a nats://HOST:4222[/NAMESPACE] URL (NATS JetStream), else the local store "
    "(default: CC_TASKS_BACKEND, else the store)."
)


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _status(s: str) -> str:
    return f"[{STATUS_STYLE.get(s, 'white')}]{s}[/]"


class Group(click.Group):
    """Turns this package's errors (and invalid options) into a one-line message and exit code 2; every
    subcommand takes ``--backend URL`` too (``cc-tasks worker --backend nats://...``)."""

    def add_command(self, cmd, name=None):
        if not any(p.name == "backend" for p in cmd.params):
            cmd.params.append(
                click.Option(["--backend"], expose_value=False, is_eager=True, callback=_set_backend, help=BACKEND_HELP)
            )
            cmd.params.extend(_nats_options())
        super().add_command(cmd, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CCTasksError as e:
            err_console.print(f"[red]error:[/] {escape(str(e))}")
            sys.exit(2)
        except ValidationError as e:
            where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors())
            err_console.print(f"[red]error:[/] invalid options: {escape(where)}")
            sys.exit(2)


@click.group(cls=Group, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cc-tasks", message="%(prog)s %(version)s")
@click.option(
    "--store", type=click.Path(file_okay=False), help="Task store (default: CC_TASKS_DIR, else <tmp>/cc_tasks-<uid>)."
)
@click.option("--backend", help=BACKEND_HELP)
@click.pass_context
def main_group(ctx: click.Context, store: str | None, backend: str | None) -> None:
    """Run Claude Code sub-agents in parallel. Without a command: serve MCP over stdio."""
    ctx.obj = {**(ctx.obj or {}), "store": store, "backend": backend}
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


main_group.params.extend(_nats_options())


@main_group.command()
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="HTTP bind address; anything but loopback needs a token."
)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--path", default="/mcp", show_default=True, help="MCP endpoint path.")
@click.option(
    "--token", envvar="CC_TASKS_TOKEN", help="Bearer token required by every HTTP request (or CC_TASKS_TOKEN)."
)
@click.pass_context
def serve(ctx, transport, host, port, path, token):
    """Serve the MCP tools over stdio (default) or Streamable HTTP with the live dashboard at /."""
    mgr = _manager(ctx)
    if transport == "stdio":
        from .server import run_stdio

        run_stdio(mgr)
    else:
        from .http import run_http

        run_http(mgr, host, port, path, token)


@main_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Finished tasks too, newest first.")
@click.option("--status", type=click.Choice(list(STATUS_STYLE)), help="Only tasks with this status.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--group", help="Only the tasks of this group.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx, show_all, status, limit, group, as_json):
    """List tasks: id, name, status, elapsed, turns, cost, cwd."""
    from .models import TaskStatus, TaskTable

    listing = TaskTable.of(
        _manager(ctx).list(
            include_finished=show_all or bool(status),
            limit=limit,
            status=TaskStatus(status) if status else None,
            group=group,
        )
    )
    if as_json:
        click.echo(listing.model_dump_json(indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for col in ("id", "name", "status", "elapsed", "turns", "cost", "cwd"):
        table.add_column(col, no_wrap=col in ("id", "status"))
    for t in listing.tasks:
        table.add_row(
            t.task_id,
            escape(t.name or t.prompt_preview[:40]),
            _status(t.status.value),
            _elapsed(t.elapsed_seconds),
            str(t.turns),
            "" if t.cost_usd is None else f"${t.cost_usd:.4f}",
            escape(t.cwd),
        )
    if listing.tasks:
        console.print(table)
    else:
        console.print("[dim]no tasks[/]" + ("" if show_all else " running or queued (--all shows finished ones)"))
    if listing.more:
        console.print(f"[dim]… more than {limit}; raise --limit[/]")


@main_group.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, task_id, as_json):
    """Show a task's record (a worktree task's too: where, and what it changed)."""
    from .models import change_line

    r = _manager(ctx).get(task_id)
    if as_json:
        click.echo(r.model_dump_json(indent=2))
        return
    rows = [
        ("id", r.task_id),
        ("name", r.name),
        ("status", _status(r.status.value)),
        ("cwd", r.cwd),
        ("model", r.model),
        ("created", r.created_at),
        ("started", r.started_at),
        ("finished", r.finished_at),
        ("elapsed", _elapsed(r.elapsed_seconds)),
        ("exit code", r.exit_code),
        ("turns", r.num_turns if r.num_turns is not None else r.progress.turns),
        ("cost", r.total_cost_usd),
        ("session", r.session_id),
        ("attempts", len(r.attempts) or None),
        (
            "worker",
            f"{r.lease.worker} (pid {r.lease.pid} on {r.lease.host}, claim {r.lease.epoch})" if r.lease else None,
        ),
        ("depends on", ", ".join(r.depends_on) or None),
        ("parent", r.parent_task_id),
        ("worktree", f"{r.worktree.path} (branch {r.worktree.branch})" if r.worktree else None),
        ("base commit", r.worktree.base_commit if r.worktree else None),
        ("changes", change_line(r.changes, r.worktree.merged if r.worktree else None) if r.changes else None),
        (
            "merged",
            f"into {r.worktree.merged.target_branch} ({r.worktree.merged.strategy}) at {r.worktree.merged.commit}"
            if r.worktree and r.worktree.merged
            else None,
        ),
        ("queue position", r.queue_position),
        ("error", r.error),
        ("prompt", r.prompt_preview),
    ]
    for k, v in rows:
        if v is not None and v != "":
            console.print(f"[bold]{k:>14}[/]  {v if k == 'status' else escape(str(v))}")
    for f in r.changes.files if r.changes else []:
        counts = "binary" if f.insertions is None else f"+{f.insertions} -{f.deletions}"
        console.print(f"{'':>14}  {escape(f.path)}  [dim]{counts}[/]")
    if r.changes and r.changes.files_truncated:
        console.print(f"{'':>14}  [dim]… {r.changes.files_changed - len(r.changes.files)} more (cc-tasks diff)[/]")
    if r.result is not None:
        console.print(f"[bold]{'result':>14}[/]")
        console.print(r.result, markup=False)
        if r.result_truncated:
            console.print(
                f"[dim]… {r.result_chars - len(r.result)} more characters (cc-tasks logs, or get_task_output)[/]"
            )


@main_group.command()
@click.argument("task_id")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Byte offset to start at.")
@click.option("--limit", type=click.IntRange(1), help="Print at most this many bytes (one or more pages); default all.")
@click.pass_context
def diff(ctx, task_id, offset, limit):
    """Print what a worktree task changed against its base commit: a unified diff, the stat first (paged from
    the server's pages; the offset of what is left goes to stderr when --limit stops it)."""
    mgr = _manager(ctx)
    printed = 0
    while True:
        page = mgr.diff(task_id, offset=offset, limit=min(20_000, limit - printed) if limit else 20_000)
        sys.stdout.write(page.text)
        printed += page.next_offset - page.offset
        offset = page.next_offset
        if page.eof or (limit and printed >= limit):
            break
    sys.stdout.flush()
    if not page.eof:
        err_console.print(f"[dim]… {page.total_bytes - offset} more bytes: --offset {offset}[/]")


@main_group.command()
@click.argument("task_id")
@click.option("--strategy", type=click.Choice(["merge", "squash", "rebase"]), default="merge", show_default=True)
@click.option("-m", "--message", help="Commit message (merge, squash); default names the task.")
@click.pass_context
def merge(ctx, task_id, strategy, message):
    """Bring a completed worktree task's changes into the branch checked out in its original cwd."""
    res = _manager(ctx).merge(task_id, strategy=strategy, message=message)
    console.print(
        f"merged {task_id} into {escape(res.target_branch)} ({strategy}): {res.files_changed} files changed, "
        f"+{res.insertions} -{res.deletions}; HEAD {res.before[:12]} → {res.head[:12]}"
    )


@main_group.command()
@click.argument("task_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the task runs, until it ends.")
@click.pass_context
def logs(ctx, task_id, follow):
    """Print a task's transcript readably: assistant text, tool calls and their results."""
    mgr = _manager(ctx)
    record = mgr.get(task_id)
    offset = 0
    while True:
        entries, offset = mgr.transcript(task_id, offset)
        for e in entries:
            style = ENTRY_STYLE.get(e.kind, "white")
            console.print(f"[{style}]{e.kind:>11}[/] ", end="")
            console.print(e.text, markup=False)
        if entries:
            continue
        if not follow or record.status.terminal:
            break
        time.sleep(0.25)
        record = mgr.get(task_id)
    if follow:
        console.print(f"[dim]task {task_id} is {record.status.value}[/]")


def _task_options(f):
    opts = [
        click.option("--cwd", type=click.Path(file_okay=False), help="Working directory (default: here)."),
        click.option("--model"),
        click.option("--fallback-model"),
        click.option("--allowed-tool", "allowed_tools", multiple=True, help="Repeatable, e.g. --allowed-tool Bash."),
        click.option("--disallowed-tool", "disallowed_tools", multiple=True),
        click.option(
            "--permission-mode",
            type=click.Choice(["acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"]),
        ),
        click.option("--max-turns", type=int),
        click.option("--max-budget-usd", type=float),
        click.option("--system-prompt"),
        click.option("--append-system-prompt"),
        click.option("--resume", "resume_session_id", help="Resume this claude session id."),
        click.option("--add-dir", "add_dirs", multiple=True),
        click.option("--mcp-config"),
        click.option("--env", "env", multiple=True, help="KEY=VALUE for the sub-agent; repeatable."),
        click.option("--timeout", "timeout_seconds", type=float, help="Seconds."),
        click.option("--name"),
        click.option("--priority", type=int, default=0, show_default=True),
        click.option(
            "--depends-on", "depends_on", multiple=True, help="A task id that must complete first; repeatable."
        ),
        click.option("--include-dependency-results", is_flag=True),
        click.option("--max-attempts", type=int, default=3, show_default=True),
        click.option(
            "--worktree", is_flag=True, help="Run in a git worktree of its own (cwd must be in a repository)."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main_group.command()
@click.argument("prompt")
@_task_options
@click.option("--wait", is_flag=True, help="Show live progress, print the result; exit 1 unless it completed.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def run(ctx, prompt, wait, as_json, env, **options):
    """Start a task from a shell (PROMPT '-' reads the prompt from standard input). Prints its id."""
    from .models import TaskOptions

    if prompt == "-":
        prompt = sys.stdin.read()
    env_vars = {}
    for item in env:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        k, v = item.split("=", 1)
        env_vars[k] = v
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    clean = {k: v for k, v in clean.items() if v not in (None, [], False)}
    from pydantic import ValidationError

    try:
        opts = TaskOptions(prompt=prompt, env=env_vars or None, **clean)
    except ValidationError as e:
        from .server import _validation_message

        raise click.UsageError(_validation_message(e)) from None
    mgr = _manager(ctx)
    record = mgr.start(opts)
    if not wait:
        click.echo(record.model_dump_json(indent=2) if as_json else record.task_id)
        return
    task_id = record.task_id
    err_console.print(f"[dim]task {task_id}[/]")
    try:
        with err_console.status("starting…") as status:
            while not record.status.terminal:
                p = record.progress
                tool = f" · last tool {p.last_tool}" if p.last_tool else ""
                pos = f" · queue position {record.queue_position}" if record.queue_position else ""
                status.update(
                    escape(
                        f"{record.status.value}{pos} · {p.turns} turns{tool} · "
                        f"{_elapsed(record.elapsed_seconds) or '0s'}"
                    )
                )
                time.sleep(0.2)
                record = mgr.get(task_id)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: cancelling the task[/]")
        record = mgr.cancel(task_id)
    if as_json:
        click.echo(record.model_dump_json(indent=2))
    else:
        page = mgr.output(task_id, limit=20_000)
        text, offset = page.text, page.next_offset
        while not page.eof:
            page = mgr.output(task_id, offset=offset, limit=20_000)
            text, offset = text + page.text, page.next_offset
        if text:
            click.echo(text)
        err_console.print(
            f"{_status(record.status.value)} · exit code {record.exit_code} · "
            f"{_elapsed(record.elapsed_seconds)}" + (f" · {escape(record.error)}" if record.error else "")
        )
    sys.exit(0 if record.status.value == "completed" else 1)


@main_group.command()
@click.argument("task_id", required=False)
@click.option("--group", help="Instead: cancel every unfinished task of this group.")
@click.pass_context
def cancel(ctx, task_id, group):
    """Stop a task's whole process tree (the record stays, status cancelled), or a group's unfinished tasks."""
    if bool(task_id) == bool(group):
        raise click.UsageError("give either a TASK_ID or --group GROUP")
    if group:
        done = _manager(ctx).cancel_group(group)
        console.print(f"{done.count} task(s) of {escape(group)} cancelled")
        return
    r = _manager(ctx).cancel(task_id)
    console.print(f"{task_id} {_status(r.status.value)}")


# -- a task board: a person or a shell script as a worker ---------------------------------------------


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}") from None


@main_group.command()
@click.argument("prompt")
@click.option("--name")
@click.option("--group", help="A group: list, wait for, cancel its tasks together; shared notes.")
@click.option("--label", "labels", multiple=True, help="Only a claimer with all these labels takes it; repeatable.")
@click.option("--depends-on", "depends_on", multiple=True, help="A task id that must complete first; repeatable.")
@click.option("--include-dependency-results", is_flag=True)
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def post(ctx, prompt, name, group, labels, depends_on, include_dependency_results, priority, max_attempts, as_json):
    """Post a task for an agent to claim (PROMPT, or - for standard input); prints its id."""
    from .models import PostOptions

    opts = PostOptions(
        prompt=sys.stdin.read() if prompt == "-" else prompt, name=name, group=group, labels=list(labels) or None,
        depends_on=list(depends_on) or None, include_dependency_results=include_dependency_results,
        priority=priority, max_attempts=max_attempts,
    )  # fmt: skip
    r = _manager(ctx).post(opts)
    click.echo(r.model_dump_json() if as_json else r.task_id)


@main_group.command()
@click.option("--worker", required=True, help="Who claims (a name for you or your script).")
@click.option("--label", "labels", multiple=True, help="Your labels; repeatable.")
@click.option("--group", help="Only a task of this group.")
@click.option(
    "--lease", "lease_seconds", type=float, default=300, show_default=True, help="Lease seconds (10 … 86400)."
)
@click.option("--wait", "wait_seconds", type=float, default=0, show_default=True, help="Wait this long for a task.")
@click.pass_context
def claim(ctx, worker, labels, group, lease_seconds, wait_seconds):
    """Claim the next agent task: prints it as JSON (task_id, prompt, lease, lease_expires_at, ...); exit 1 if none."""
    import asyncio

    got = asyncio.run(_manager(ctx).aclaim(worker, list(labels) or None, group, lease_seconds, wait_seconds))
    click.echo(got.model_dump_json(indent=2))
    sys.exit(0 if got.claimed else 1)


@main_group.command()
@click.argument("task_id")
@click.option("--lease", required=True, help="The lease claim gave you.")
@click.option("--note", help="Progress to record.")
@click.pass_context
def renew(ctx, task_id, lease, note):
    """Renew a claimed task's lease (the heartbeat); prints the new expiry."""
    click.echo(_manager(ctx).renew(task_id, lease, note).lease_expires_at.isoformat())


@main_group.command()
@click.argument("task_id")
@click.option("--lease", required=True, help="The lease claim gave you.")
@click.option("--result", help="The result text.")
@click.option("--result-file", help="Read the result from this file (- for standard input).")
@click.pass_context
def complete(ctx, task_id, lease, result, result_file):
    """Complete a claimed task with its result."""
    if (result is None) == (result_file is None):
        raise click.UsageError("give either --result TEXT or --result-file FILE (- for standard input)")
    r = _manager(ctx).complete(task_id, lease, result if result is not None else _read_text(result_file))
    console.print(f"{task_id} {_status(r.status.value)}")


@main_group.command()
@click.argument("task_id")
@click.option("--lease", required=True, help="The lease claim gave you.")
@click.option("--error", required=True, help="What went wrong.")
@click.option("--retry", is_flag=True, help="Requeue it as a new attempt, if attempts remain.")
@click.pass_context
def fail(ctx, task_id, lease, error, retry):
    """Fail a claimed task (or, with --retry, put it back in the queue)."""
    r = _manager(ctx).fail(task_id, lease, error, retry)
    console.print(f"{task_id} {_status(r.status.value)}")


@main_group.command()
@click.argument("task_id")
@click.option("--lease", required=True, help="The lease claim gave you.")
@click.pass_context
def release(ctx, task_id, lease):
    """Give a claimed task back to the queue (not counted as an attempt)."""
    r = _manager(ctx).release(task_id, lease)
    console.print(f"{task_id} {_status(r.status.value)}")


@main_group.command()
@click.argument("group")
@click.option("--add", "text", help="Add this note (instead of listing).")
@click.option("--key", help="With --add: replaces the group's last note of this key.")
@click.option("--by", help="With --add: who writes it.")
@click.option("--since", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def notes(ctx, group, text, key, by, since, as_json):
    """List a group's notes (all of them, from --since), or add one with --add."""
    mgr = _manager(ctx)
    if text is not None:
        added = mgr.add_note(group, text, key, by)
        click.echo(added.model_dump_json() if as_json else str(added.seq))
        return
    while True:
        page = mgr.notes(group, since=since, limit=1000)
        for n in page.notes:
            if as_json:
                click.echo(n.model_dump_json())
            else:
                who = f" [dim]{escape(n.by)}[/]" if n.by else ""
                tag = f" [bold]{escape(n.key)}[/]" if n.key else ""
                console.print(f"[dim]#{n.seq}[/]{tag}{who}: {escape(n.text)}")
        since = page.next
        if not page.more:
            break


# -- sub-agents that ask: their permission requests, answered from a shell ------------------------------------


def _cli_answerer() -> str:
    """Who answers from here (the record and the approval_answered event name them)."""
    import getpass

    from .ids import HOST

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # (no name for this uid)
        user = f"uid {os.getuid()}"
    return f"cli {user}@{HOST}"


def _until(when) -> str:
    from .models import utcnow

    left = (when - utcnow()).total_seconds()
    return f"{when:%H:%M:%S} UTC " + (f"(in {_elapsed(left)})" if left > 0 else "(expired)")


@main_group.command()
@click.option("--group", help="Only the requests of this group's tasks.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every pending request).")
@click.pass_context
def approvals(ctx, group, as_json):
    """List sub-agents' permission requests waiting for an answer, oldest first (answer: approve, deny)."""
    from .models import ApprovalList

    mgr = _manager(ctx)
    entries, seen, cursor = [], set(), None
    while True:  # every page (a request answered meanwhile may repeat one: each is listed once)
        page = mgr.list_approvals(group, cursor)
        new = [a for a in page.approvals if (a.task_id, a.request_id) not in seen]
        seen.update((a.task_id, a.request_id) for a in new)
        entries += new
        if not page.more or not page.next_cursor or not new:
            break
        cursor = page.next_cursor
    if as_json:
        click.echo(ApprovalList(approvals=entries).model_dump_json(indent=2))
        return
    if not entries:
        console.print("[dim]no pending approval requests[/]")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("task", "name", "request", "tool", "input", "expires"):
        table.add_column(col, no_wrap=col in ("task", "request", "tool"))
    for a in entries:
        preview = " ".join(a.input_preview.split())
        preview = preview[:100] + "…" if len(preview) > 100 or a.input_truncated else preview
        table.add_row(a.task_id, escape(a.name or ""), a.request_id, escape(a.tool_name), escape(preview),
                      _until(a.expires_at))  # fmt: skip
    console.print(table)
    console.print("[dim]answer: cc-tasks approve TASK_ID REQUEST_ID, or cc-tasks deny TASK_ID REQUEST_ID -m WHY[/]")


def _answer(ctx, task_id: str, request_id: str, decision: str, message: str | None, remember: bool) -> None:
    from .errors import ApprovalError

    try:
        a = _manager(ctx).answer_approval(task_id, request_id, decision, message, None, remember, _cli_answerer())
    except ApprovalError as e:  # unknown, already answered, expired: the answer was refused
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(1)
    shown = "[green]allowed[/]" if a.decision == "allow" else "[red]denied[/]"
    kept = f"; remembered for the rest of the task: {escape(a.remembered.tool)}" if a.remembered else ""
    console.print(f"{a.request_id} of {a.task_id} {shown} (by {escape(a.by)}){kept}")


_REMEMBER = click.option(
    "--remember", is_flag=True, help="Answer the same call (that command, file or tool) so for the rest of the task."
)


@main_group.command()
@click.argument("task_id")
@click.argument("request_id")
@_REMEMBER
@click.pass_context
def approve(ctx, task_id, request_id, remember):
    """Allow a sub-agent's pending tool call (cc-tasks approvals lists them); exit 1 if the answer is refused."""
    _answer(ctx, task_id, request_id, "allow", None, remember)


@main_group.command()
@click.argument("task_id")
@click.argument("request_id")
@click.option("-m", "--message", help="What the sub-agent is told: why, and what to do instead.")
@_REMEMBER
@click.pass_context
def deny(ctx, task_id, request_id, message, remember):
    """Refuse a sub-agent's pending tool call (it goes on without it); exit 1 if the answer is refused."""
    if message is not None and len(message) > 2000:
        raise click.BadParameter(f"{len(message)} characters; at most 2000", param_hint="--message")
    _answer(ctx, task_id, request_id, "deny", message, remember)


@main_group.command()
@click.argument("task_id", required=False)
@click.option(
    "--older-than", type=str, help="Delete finished tasks older than this (e.g. 7d, 12h); never running ones."
)
@click.option("--status", type=click.Choice(list(STATUS_STYLE)), help="With --older-than: only tasks with this status.")
@click.option("--keep-branch", is_flag=True, help="Worktree tasks: keep their branches (worktrees are removed).")
@click.pass_context
def cleanup(ctx, task_id, older_than, status, keep_branch):
    """Delete a task (stopping it first if it runs), or finished tasks older than a duration. A worktree task's
    worktree is removed, and its branch too unless it was merged or --keep-branch."""
    mgr = _manager(ctx)
    if bool(task_id) == bool(older_than):
        raise click.UsageError("give either a TASK_ID or --older-than DURATION")
    if task_id:
        if status:
            raise click.UsageError("--status goes with --older-than")
        res = mgr.cleanup(task_id, keep_branch=keep_branch)
        console.print(f"deleted {task_id} (was {res.was_status.value if res.was_status else 'unreadable'})")
        _worktree_cleanup_line(res)
        return
    from .models import TaskStatus, utcnow

    cutoff = utcnow() - parse_duration(older_than)
    wanted = TaskStatus(status) if status else None
    if wanted is not None and not wanted.terminal:
        raise click.UsageError(f"--status {status}: only finished tasks are cleaned up by age")
    deleted = 0
    for tid in list(mgr.store.list_ids(include_finished=True)):
        try:
            r = mgr.store.read(tid)
        except CCTasksError:
            continue
        if not r.status.terminal or (wanted and r.status != wanted):
            continue
        if (r.finished_at or r.created_at) < cutoff:
            try:
                _worktree_cleanup_line(mgr.cleanup(tid, keep_branch=keep_branch))
            except CCTasksError:
                continue
            deleted += 1
    console.print(
        f"deleted {deleted} finished task(s) older than {older_than}" + (f" with status {status}" if status else "")
    )


def _worktree_cleanup_line(res) -> None:
    if res.worktree_removed is None:
        return
    done = [
        "worktree removed" if res.worktree_removed else "worktree not removed",
        "branch deleted" if res.branch_deleted else "branch not deleted",
    ]
    note = f" ({res.worktree_note})" if res.worktree_note else ""
    console.print(f"  {res.task_id}: {', '.join(done)}{escape(note)}")


@main_group.command()
@click.option(
    "--slots", type=click.IntRange(1, 256), help="Tasks this worker runs at once (default: CC_TASKS_MAX_CONCURRENT)."
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="A label this worker advertises (repeat); it runs only tasks whose labels it has.",
)
@click.option(
    "--cancel-on-exit", is_flag=True, help="SIGTERM cancels running tasks (default: the first SIGTERM drains)."
)
@click.pass_context
def worker(ctx, slots, labels, cancel_on_exit):
    """Run a worker: claim queued tasks and supervise them, until SIGTERM (drain) or a second SIGTERM (cancel).

    Workers pull: every worker of a store shares its queue and its global cap. Servers start one on demand,
    so this is for running more (other labels, more slots) or for running one in the foreground."""
    import logging

    from .worker import Worker

    mgr = _manager(ctx)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    w = Worker(
        mgr.store,
        slots=slots or mgr.settings.max_concurrent,
        labels=list(labels),
        listen=True,
        cancel_on_term=cancel_on_exit,
    )
    err_console.print(f"worker {w.info.worker_id} on {mgr.store.address}: {w.slots} slots, labels {list(labels)}")
    sys.exit(w.run())


@main_group.command()
@click.option("--group", default=None, help="A group's budget (default: the whole store's).")
@click.argument("action", required=False, type=click.Choice(["set", "clear"]))
@click.argument("usd", required=False, type=float)
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON.")
@click.pass_context
def budget(ctx, group, action, usd, as_json):
    """Show the spending budget shared by every window and machine; `budget set USD` sets it, `budget clear`
    removes it (with --group: that group's)."""
    if action == "set" and usd is None:
        raise click.BadParameter("`budget set` takes the dollars, e.g. `cc-tasks budget set 20`", param_hint="USD")
    if action != "set" and usd is not None:
        raise click.BadParameter("only `budget set USD` takes dollars", param_hint="USD")
    from .replies import text_of

    mgr = _manager(ctx)
    try:
        info = mgr.set_budget(usd if action == "set" else None, group) if action else mgr.get_budget(group)
    except CCTasksError as e:
        err_console.print(f"[red]error:[/] {escape(str(e))}")
        sys.exit(2)
    console.print_json(info.model_dump_json()) if as_json else console.print(escape(text_of(info)))


CONFIG_KEYS = ("max_concurrent",)


@main_group.group("config", invoke_without_command=True)
@click.pass_context
def config_group(ctx):
    """Show the configuration stored with the backend (shared by every worker and server using it)."""
    if ctx.invoked_subcommand is None:
        _show_config(_backend(ctx))


def _backend(ctx: click.Context):
    from .connect import open_backend

    return open_backend(settings=_settings(ctx))


def _show_config(backend) -> None:
    cfg = backend.config()
    console.print(f"backend {escape(backend.address)}")
    for key in CONFIG_KEYS:
        stored = getattr(cfg, key)
        shown_value = (
            f"{stored} (stored)" if stored is not None else f"not stored (in force here: {backend.max_concurrent})"
        )
        console.print(f"  {key} = {shown_value}")


@config_group.command("set")
@click.argument("key", type=click.Choice(CONFIG_KEYS))
@click.argument("value")
@click.pass_context
def config_set(ctx, key, value):
    """Store KEY = VALUE with the backend, e.g. `config set max_concurrent 8` (every claimer uses it)."""
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a whole number", param_hint="VALUE") from None
    if number < 1:
        raise click.BadParameter(f"{number} is below 1: the cap is at least one task", param_hint="VALUE")
    backend = _backend(ctx)
    backend.set_config(**{key: number})
    _show_config(backend)


@config_group.command("unset")
@click.argument("key", type=click.Choice(CONFIG_KEYS))
@click.pass_context
def config_unset(ctx, key):
    """Remove KEY from the backend's configuration (each process's own default applies again)."""
    backend = _backend(ctx)
    backend.set_config(**{key: None})
    _show_config(backend)


@main_group.command()
@click.pass_context
def doctor(ctx):
    """Check the setup: claude binary and version, store path and permissions, API credentials, free disk."""
    from .checks import ensure_private_dir
    from .connect import shown
    from .replies import limiter_line

    ok = True

    def line(good: bool, what: str, detail: str, essential: bool = True):
        nonlocal ok
        ok = ok and (good or not essential)
        mark = "[green]✓[/]" if good else ("[red]✗[/]" if essential else "[yellow]![/]")
        console.print(f"{mark} [bold]{what}[/]: {escape(detail)}")

    try:
        settings = _settings(ctx)
    except CCTasksError as e:
        line(False, "configuration", str(e))
        sys.exit(1)
    from .connect import is_remote, open_backend

    if is_remote(settings.backend):  # claude and the store are the workers' business
        try:
            backend = open_backend(settings=settings)
            n = sum(1 for _ in backend.list_ids(include_finished=False))
            line(True, "backend", f"{backend.address} (NATS JetStream, {n} unfinished tasks)")
            workers = backend.workers()
            line(
                bool(workers),
                "workers",
                ", ".join(f"{w.worker_id} on {w.host} ({w.slots} slots, labels {w.labels})" for w in workers)
                or "none running: start one with `cc-tasks worker --backend URL` on a worker machine",
                essential=False,
            )
            line(True, "limits", f"cap {backend.max_concurrent} tasks at once ({backend.cap_source()})"
                 + limiter_line(backend.limiter()))  # fmt: skip
        except Exception as e:  # (any failure to reach the server is the finding)
            line(False, "backend", f"{shown(settings.backend)}: {type(e).__name__}: {e}")
        sys.exit(0 if ok else 1)
    try:
        claude = settings.resolve_claude()
        try:
            v = subprocess.run([claude, "--version"], capture_output=True, text=True, timeout=30)
            line(v.returncode == 0, "claude", f"{claude} ({(v.stdout or v.stderr).strip()[:80]})")
        except (OSError, subprocess.TimeoutExpired) as e:
            line(False, "claude", f"{claude} does not run: {e}")
    except CCTasksError as e:
        line(False, "claude", str(e))
    try:
        root = ensure_private_dir(settings.store_dir)
        n = sum(1 for _ in (root / "tasks").iterdir()) if (root / "tasks").exists() else 0
        line(
            True,
            "store",
            f"{root} (mode {oct(root.stat().st_mode & 0o777)}, owner uid {root.stat().st_uid}, {n} tasks)",
        )
        free = shutil.disk_usage(root).free
        line(free > 1 << 30, "disk", f"{free / (1 << 30):.1f} GiB free at the store", essential=False)
    except CCTasksError as e:
        line(False, "store", str(e))
    creds = [k for k in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN") if os.environ.get(k)]
    cred_file = Path.home() / ".claude" / ".credentials.json"
    if cred_file.exists():
        creds.append(str(cred_file))
    for k in ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX"):
        if os.environ.get(k):
            creds.append(k)
    line(
        bool(creds),
        "credentials",
        ("present: " + ", ".join(creds) + " (values not shown)")
        if creds
        else "none found: set ANTHROPIC_API_KEY, or log in with `claude` once",
        essential=False,
    )
    if os.environ.get("ANTHROPIC_BASE_URL"):
        line(True, "API endpoint", os.environ["ANTHROPIC_BASE_URL"], essential=False)
    cap = f"CC_TASKS_MAX_CONCURRENT={settings.max_concurrent}"
    try:
        backend = open_backend(settings=settings)
        workers = backend.workers()
        cap = f"cap {backend.max_concurrent} tasks at once ({backend.cap_source()}){limiter_line(backend.limiter())}"
        line(
            True,
            "workers",
            ", ".join(f"{w.worker_id} (pid {w.proc.pid}, {w.slots} slots)" for w in workers)
            or "none running (a server starts one when a task is submitted)",
            essential=False,
        )
    except CCTasksError as e:
        line(False, "workers", str(e), essential=False)
    line(
        True,
        "limits",
        f"{cap}, depth {settings.depth} of "
        f"CC_TASKS_MAX_DEPTH={settings.max_depth}, default timeout {settings.default_timeout:g}s",
    )
    sys.exit(0 if ok else 1)


def server_command() -> list[str]:
    """The argv that serves this very installation over stdio, with absolute paths: this interpreter and
    the checkout's main.py, else ``-m cc_tasks`` (with ``-P`` where Python has it, so that a ``cc_tasks``
    folder in the client's working directory is never imported instead)."""
    checkout_main = Path(__file__).resolve().parent.parent / "main.py"
    if checkout_main.is_file():
        return [sys.executable, str(checkout_main), "serve"]
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "cc_tasks", "serve"]


def _find_claude(name: str) -> str:
    if os.sep in name:
        path = Path(name).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.absolute())
        raise ClaudeNotFoundError(f"claude CLI not found: {name!r} is not an executable file")
    found = shutil.which(name)
    if not found:
        raise ClaudeNotFoundError(
            f"claude CLI not found: {name!r} is not on PATH; install Claude Code "
            "(npm install -g @anthropic-ai/claude-code), or give --claude PATH or CC_TASKS_CLAUDE_BIN"
        )
    return found


@main_group.command("install-claude")
@click.option(
    "--scope",
    type=click.Choice(["user", "project", "local"]),
    default="user",
    show_default=True,
    help="user: every project of yours; project: .mcp.json in this directory (shared); local: this project, you only.",
)
@click.option(
    "--claude",
    "claude_bin",
    envvar="CC_TASKS_CLAUDE_BIN",
    default="claude",
    show_default=True,
    help="The claude binary (or CC_TASKS_CLAUDE_BIN).",
)
@click.option("--name", default="cc-tasks", show_default=True, help="The MCP server's name in Claude Code.")
def install_claude(scope, claude_bin, name):
    """Register this installation with Claude Code without the plugin: runs `claude mcp add` with this
    interpreter and package (absolute paths), and prints the command it ran."""
    claude = _find_claude(claude_bin)
    argv = [claude, "mcp", "add", "--scope", scope, name, "--", *server_command()]
    console.print(f"running: {escape(shlex.join(argv))}")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClaudeNotFoundError(f"{claude} did not run: {e}") from None
    out = (res.stdout + res.stderr).strip()
    if out:
        console.print(out, markup=False)
    if res.returncode != 0:
        err_console.print(
            f"[red]error:[/] claude mcp add exited {res.returncode}"
            + (
                f"; to replace it: {escape(shlex.join([claude, 'mcp', 'remove', '--scope', scope, name]))}"
                if "exist" in out
                else ""
            )
        )
        sys.exit(2)
    where = {
        "user": "for every project of yours",
        "project": f"in {Path.cwd() / '.mcp.json'}",
        "local": "for this project",
    }
    console.print(
        f"[green]✓[/] {escape(name)} added {escape(where[scope])}; check with: {escape(shlex.join([claude, 'mcp', 'list']))}"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        main_group.main(args=sys.argv[1:] if argv is None else argv, prog_name="cc-tasks", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0
