"""Tool replies, bounded: the reply model's JSON as structured content plus a short text rendering of it for
the model, together at most REPLY_CHARS characters whatever a tool's arguments (Claude Code refuses or cuts
replies over ~25,000 tokens). Sizes are counted as ``json.dumps`` writes the structured content (non-ASCII
escaped: the longest form a client may count) plus the text's characters. Pure: server.py makes MCP
results of these."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import singledispatch
from typing import Any

from pydantic import BaseModel

from .errors import ReplyTooLargeError
from .models import (
    REPLY_CHARS,
    ApprovalAnswered,
    ApprovalList,
    BatchResult,
    BatchStarted,
    BudgetInfo,
    Claimed,
    CleanupResult,
    DiffPage,
    EventPage,
    GroupCancelled,
    LeaseRenewed,
    Listing,
    MergeResult,
    NoteAdded,
    NotePage,
    OutputPage,
    ServerInfo,
    StartResult,
    TaskBrief,
    TaskList,
    TaskRecord,
    Waited,
    WaitResult,
    change_line,
    clip,
)

log = logging.getLogger("cc_tasks")

#: A get_task_output page: its text JSON-escaped plus as plain text (the rest of its reply is < 1,000).
OUTPUT_PAGE_CHARS = REPLY_CHARS - 2_000
#: The JSON of a get_task_events page; each event's text line is no longer, so the reply fits.
EVENT_PAGE_CHARS = (REPLY_CHARS - 2_000) // 2
#: Characters of a claim's text (its structured content carries the prompt).
TEXT_CLAIM_CHARS = 1_000
#: Characters of the result in a task record's text (its structured content carries up to 16,000).
TEXT_RESULT_CHARS = 2_000
#: Characters (as JSON) a record's result keeps at least, other long strings of the record cut if need be.
RESULT_ROOM = 1_000
#: Result preview of each list_active_tasks entry.
LIST_PREVIEW = 100
#: wait_for_tasks shares WAIT_PREVIEWS characters of previews among its tasks (each between the min and the
#: max), halving them while the reply would not fit; at the min it lists the tasks that fit.
WAIT_PREVIEWS = 24_000
WAIT_PREVIEW_MAX = 4_000
WAIT_PREVIEW_MIN = 100
#: Most characters of a tool error's message.
ERROR_CHARS = 2_000
#: Most characters of a result or error on a task's line of text.
LINE_PREVIEW_MAX = 200
_SOME_ID = "20000101-000000-000-00000000"


@dataclass(frozen=True)
class Reply:
    """One tool reply: ``data`` is the structured content (a reply model's JSON), ``text`` its rendering."""

    data: dict[str, Any]
    text: str

    @classmethod
    def of(cls, model: BaseModel, text: str) -> Reply:
        return cls(model.model_dump(mode="json"), text)

    @property
    def size(self) -> int:
        return json_len(self.data) + len(self.text)


def json_len(value: Any) -> int:
    """Characters of ``value`` as ``json.dumps`` writes it."""
    return len(json.dumps(value, default=str))


def cut_json(text: str, chars: int) -> str:
    """The longest start of ``text`` whose JSON string (quotes included) takes at most ``chars`` characters."""
    if json_len(text) <= chars:
        return text
    lo, hi = 0, min(len(text), chars)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if json_len(text[:mid]) <= chars:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_page(data: bytes, chars: int) -> int:
    """How many bytes of ``data`` decode to text that takes at most ``chars`` characters as a JSON string plus
    as plain text (a page of output is in both). May end inside a character: cut it at a boundary after."""

    def cost(n: int) -> int:
        text = data[:n].decode("utf-8", "replace")
        return json_len(text) + len(text)

    if cost(len(data)) <= chars:
        return len(data)
    lo, hi = 0, len(data)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= chars:
            lo = mid
        else:
            hi = mid - 1
    return max(1, lo)


def utf8_page(data: bytes, fit: int, at_end: bool) -> bytes:
    """The first ``fit`` bytes of ``data`` (all of it when it fits and ends the text: ``at_end``), cut back to a
    UTF-8 character boundary so that no page splits a character."""
    if fit >= len(data) and at_end:
        return data
    cut = min(fit, len(data))
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:
        cut -= 1
    return data[:cut] or data[:fit]


def text_room(page: BaseModel) -> int:
    """Characters left in a reply for the text of ``page`` (a page model whose ``text`` is still empty), counted
    as fit_page counts them: JSON-escaped in the structured content plus as plain text."""
    return max(1, REPLY_CHARS - shape(page).size)


def squeeze(value: Any, chars: int) -> Any:
    """``value`` (JSON-able) with every string (and key) longer than ``chars`` cut to ``chars``."""
    if isinstance(value, str):
        return clip(value, chars)
    if isinstance(value, dict):
        return {clip(str(k), chars): squeeze(v, chars) for k, v in value.items()}
    if isinstance(value, list):
        return [squeeze(v, chars) for v in value]
    return value


def one_line(text: str, chars: int) -> str:
    return clip(" ".join(text.split()), chars) or ""


def bounded(reply: Reply) -> Reply:
    """The safety net under the shapes below (which fit by construction): cut long strings until it fits."""
    for chars in (2_000, 500, 100):
        if reply.size <= REPLY_CHARS:
            return reply
        log.warning("a reply of %d characters had its strings cut to %d", reply.size, chars)
        reply = Reply(squeeze(reply.data, chars), clip(reply.text, 10 * chars) or "")
    if reply.size <= REPLY_CHARS:
        return reply
    raise ReplyTooLargeError(
        f"the reply would be longer than {REPLY_CHARS} characters; ask for less (a smaller limit or fewer tasks)"
    )


def to_reply(value: Reply | BaseModel) -> Reply:
    """The bounded reply for what a tool returned (a reply model, or a Reply already shaped)."""
    return bounded(value if isinstance(value, Reply) else shape(value))


# -- shapes --------------------------------------------------------------------------------------------


@singledispatch
def shape(model: BaseModel) -> Reply:
    return Reply.of(model, text_of(model))


@shape.register
def claimed_reply(c: Claimed) -> Reply:
    """A claim: the prompt and the dependencies' results cut, by their JSON size, to what the reply has room
    for (``prompt_truncated``; the whole prompt: get_task_output source=prompt)."""
    if not c.claimed:
        return Reply.of(c, text_of(c))
    prompt, deps = c.prompt or "", c.dependency_results
    bare = c.model_copy(update={"prompt": "", "dependency_results": "" if deps is not None else None})
    room = REPLY_CHARS - json_len(bare.model_dump(mode="json")) - TEXT_CLAIM_CHARS - 200
    p_need, d_need = json_len(prompt), json_len(deps) if deps else 0
    if p_need + d_need > room:
        d_room = min(d_need, max(room // 2, room - p_need))
        if deps and d_need > d_room:
            deps = cut_json(deps, d_room - 120) + "\n[… cut to fit the reply: get_task_output of each dependency]"
        new_prompt = cut_json(prompt, room - json_len(deps or ""))
        c = c.model_copy(update={"prompt": new_prompt, "dependency_results": deps,
                                 "prompt_truncated": c.prompt_truncated or len(new_prompt) < len(prompt)})  # fmt: skip
    return Reply.of(c, text_of(c))


@shape.register
def record_reply(r: TaskRecord) -> Reply:
    """The whole record, its result preview cut further to the room the rest leaves it. Should the rest leave
    less than RESULT_ROOM (only fields far beyond their usual sizes do: a huge model name, cwd or usage), its
    long strings are cut first."""
    r = r.bounded()
    text = text_of(r)
    data = r.model_dump(mode="json")
    result = data["result"]
    for chars in (None, 2_000, 500, 100):
        rest = data if chars is None else squeeze(data, chars)
        room = REPLY_CHARS - len(text) - json_len(rest | {"result": ""}) + 2  # (what "" took)
        if room >= RESULT_ROOM:
            break
    if result is not None and json_len(result) > room:
        rest = rest | {"result": cut_json(result, max(2, room)), "result_truncated": True}
    else:
        rest = rest | {"result": result}
    return Reply(rest, text)


@shape.register
def batch_reply(b: BatchResult) -> Reply:
    """Every task id in the order given; the names, then the keys too, are left out when they do not fit."""
    reply = _batch(b, "")
    for drop, note in ((("name",), "names left out"), (("name", "key"), "names and keys left out")):
        if reply.size <= REPLY_CHARS:
            break
        reply = _batch(BatchResult(tasks=[t.model_copy(update=dict.fromkeys(drop)) for t in b.tasks]), note)
    return reply


def _batch(b: BatchResult, note: str) -> Reply:
    head = f"{len(b.tasks)} tasks submitted, in the order given{' (' + note + ')' if note else ''}:"
    return Reply.of(b, "\n".join([head] + [_started_line(t) for t in b.tasks]))


def list_reply(listing: Listing) -> Reply:
    """A TaskList of the listing's first tasks that fit; ``next_cursor`` goes on after the last one listed."""
    briefs = [TaskBrief.of(r, LIST_PREVIEW) for r in listing.tasks]
    shown = max(1, _fitting(briefs, _list(briefs[:0], True).size, LIST_PREVIEW)) if briefs else 0
    return _list(briefs[:shown], listing.more or shown < len(briefs), listing.unreadable)


def _list(briefs: list[TaskBrief], more: bool, unreadable: list[str] = []) -> Reply:  # noqa: B006 (never changed)
    cursor = (briefs[-1].task_id if briefs else _SOME_ID) if more else None
    model = TaskList(tasks=briefs, count=len(briefs), more=more, next_cursor=cursor, unreadable=unreadable)
    lines = [f"{len(briefs)} tasks, newest first{':' if briefs else ''}"]
    lines += [brief_line(b, LIST_PREVIEW) for b in briefs]
    if unreadable:
        lines.append(f"unreadable records (cleanup_task deletes them): {', '.join(unreadable)}")
    if more:
        lines.append(f'more: pass cursor="{cursor}" for the next tasks')
    return Reply.of(model, "\n".join(lines))


def wait_reply(w: Waited) -> Reply:
    """A WaitResult: an entry per task with previews sharing the reply; when even the shortest previews do not
    fit, the first tasks that fit (``more``); ``finished`` and ``pending`` always list every id."""
    n = len(w.tasks)
    preview = min(WAIT_PREVIEW_MAX, max(WAIT_PREVIEW_MIN, WAIT_PREVIEWS // max(1, n)))
    while True:
        briefs = [TaskBrief.of(r, preview) for r in w.tasks]
        shown = max(1, _fitting(briefs, _wait(w, briefs[:0], preview, n).size, preview))
        if shown == n or preview == WAIT_PREVIEW_MIN:
            return _wait(w, briefs[:shown], preview, n - shown)
        preview = max(WAIT_PREVIEW_MIN, preview // 2)


#: Most needs_approval entries in one wait_for_tasks reply (list_approvals pages them all).
WAIT_APPROVALS = 20


def _wait(w: Waited, briefs: list[TaskBrief], preview: int, left_out: int) -> Reply:
    asking = w.needs_approval[:WAIT_APPROVALS]
    blocked = w.blocked[:WAIT_APPROVALS]
    model = WaitResult(
        done=w.done, timed_out=w.timed_out, finished=w.finished, pending=w.pending, tasks=briefs, more=left_out > 0,
        needs_approval=asking, blocked=blocked,
    )  # fmt: skip
    counts = Counter(r.status.value for r in w.tasks if r.status.terminal)
    ended = f" ({', '.join(f'{n} {s}' for s, n in counts.most_common())})" if counts else ""
    state = (
        "done" if w.done else ("a sub-agent asks" if asking else ("blocked by a budget" if blocked else "timed out"))
    )
    lines = [f"{state}: {len(w.finished)} of {len(w.tasks)} finished{ended}, {len(w.pending)} pending"]
    for a in asking:
        lines.append(f"needs approval: task {a.task_id} request {a.request_id}: {a.tool_name} {one_line(a.input_preview, 120)}"
                     " -> answer_approval(task_id, request_id, 'allow' | 'deny')")  # fmt: skip
    for b in blocked:
        lines.append(f"blocked: task {b.task_id}: {one_line(b.reason, 300)}")
    if len(w.needs_approval) > len(asking):
        lines.append(f"{len(w.needs_approval) - len(asking)} more requests: list_approvals shows them all")
    lines += [brief_line(b, preview) for b in briefs]
    if left_out:
        after = briefs[-1].task_id if briefs else _SOME_ID
        lines.append(
            f"{left_out} more tasks not listed (reply bounded): those given after {after}; "
            "wait_for_tasks on fewer ids or check_task_status lists them"
        )
    return Reply.of(model, "\n".join(lines))


def _fitting(briefs: list[TaskBrief], base: int, preview: int) -> int:
    """How many of ``briefs`` fit in a reply after ``base`` characters: each costs its JSON and its line."""
    size = base
    for n, b in enumerate(briefs):
        size += json_len(b.model_dump(mode="json")) + 2 + len(brief_line(b, preview)) + 1
        if size > REPLY_CHARS:
            return n
    return len(briefs)


# -- text ----------------------------------------------------------------------------------------------


def brief_line(b: TaskBrief, preview: int) -> str:
    """One line for a task: id, status, name, turns, cost, and its error or the start of its result."""
    parts = [b.task_id, b.status.value]
    if b.name:
        parts.append(json.dumps(clip(b.name, 40), ensure_ascii=False))
    parts.append(f"{b.turns} turns")
    if b.cost_usd is not None:
        parts.append(f"${b.cost_usd:.4f}")
    if b.changes:
        parts.append(f"[{b.changes}]")
    if b.error:
        parts.append("error: " + one_line(b.error, min(preview, LINE_PREVIEW_MAX)))
    elif b.result is not None:
        parts.append("result: " + one_line(b.result, min(preview, LINE_PREVIEW_MAX)))
    return " ".join(parts)


def _started_line(t: BatchStarted) -> str:
    parts = [t.task_id, t.status.value]
    if t.key is not None:
        parts.append("key=" + json.dumps(clip(t.key, 40), ensure_ascii=False))
    if t.name:
        parts.append(json.dumps(clip(t.name, 40), ensure_ascii=False))
    return " ".join(parts)


@singledispatch
def text_of(model: BaseModel) -> str:
    return one_line(model.model_dump_json(), 2_000)


@text_of.register
def _(r: TaskRecord) -> str:
    facts = [r.status.value]
    if r.exit_code is not None:
        facts.append(f"exit code {r.exit_code}")
    facts.append(f"{r.turns} turns")
    if r.cost_usd is not None:
        facts.append(f"${r.cost_usd:.4f}")
    if r.elapsed_seconds is not None:
        facts.append(f"{r.elapsed_seconds:.1f}s")
    if r.queue_position:
        facts.append(f"queue position {r.queue_position}")
    name = f" {json.dumps(clip(r.name, 80), ensure_ascii=False)}" if r.name else ""
    lines = [f"task {r.task_id}{name}: {', '.join(facts)}"]
    if r.error:
        lines.append("error: " + (clip(r.error, 500) or ""))
    if not r.status.terminal and r.progress.last_tool:
        lines.append("last tool: " + one_line(r.progress.last_tool, 100))
    if not r.status.terminal and r.progress.last_text:
        lines.append("last text: " + one_line(r.progress.last_text, 300))
    if r.worktree is not None:
        wt = r.worktree
        base = f", from {wt.base_commit[:12]}" if wt.base_commit else ""
        lines.append(f"worktree: {clip(wt.path, 300)} (branch {clip(wt.branch, 100)}{base})")
    if r.changes is not None:
        lines.append("changes: " + change_line(r.changes, r.worktree.merged if r.worktree else None))
    if r.result is not None:
        whole = max(r.result_chars, len(r.result))
        shown = r.result[:TEXT_RESULT_CHARS]
        rest = f", the first {len(shown)} here; get_task_output pages through it" if len(shown) < whole else ""
        lines += [f"result ({whole} characters{rest}):", shown]
    return "\n".join(lines)


@text_of.register
def _(s: StartResult) -> str:
    name = f" {json.dumps(clip(s.name, 80), ensure_ascii=False)}" if s.name else ""
    return f"task {s.task_id}{name}: {s.status.value}"


@text_of.register
def _(c: CleanupResult) -> str:
    text = f"task {c.task_id} deleted (it was {c.was_status.value if c.was_status else 'unreadable'})"
    if c.worktree_removed is not None:
        text += f"; worktree {'removed' if c.worktree_removed else 'not removed'}"
        text += f", branch {'deleted' if c.branch_deleted else 'not deleted'}"
    if c.worktree_note:
        text += f" ({clip(c.worktree_note, 1_000)})"
    return text


@text_of.register
def _(p: DiffPage) -> str:
    where = "the end" if p.eof else f"more from next_offset={p.next_offset}"
    stat = f"; {change_line(p.changes)}" if p.changes else ""
    head = (
        f"[diff of task {p.task_id} ({p.status.value}) against {p.base_commit[:12]}, branch {clip(p.branch, 100)}{stat}: "
        f"bytes {p.offset}-{p.next_offset} of {p.total_bytes}; {where}]"
    )
    return f"{head}\n{p.text}"


@text_of.register
def _(m: MergeResult) -> str:
    leftovers = "; its uncommitted changes were committed on its branch first" if m.leftovers_committed else ""
    return (
        f"task {m.task_id} merged into {clip(m.target_branch, 100)} of {clip(m.repo, 300)} ({m.strategy}): "
        f"{m.files_changed} files changed, +{m.insertions} -{m.deletions}; HEAD {m.before[:12]} -> {m.head[:12]}"
        f"{leftovers}"
    )


@text_of.register
def _(i: ServerInfo) -> str:
    return (
        f"cc-tasks {i.version}, pid {i.pid}, {i.backend} store {i.store_dir}: at most {i.max_concurrent} tasks "
        f"at once, depth {i.depth} of at most {i.max_depth}, default timeout {i.default_timeout:g}s"
        f"{'' if i.lease_seconds is None else f', leases {i.lease_seconds:g}s'}; {len(i.workers)} worker(s) running"
        f"{limiter_line(i.limiter)}"
    )


def limiter_line(lim) -> str:
    """The rate-limit-aware cap in a few words (empty while it holds nothing back)."""
    if lim is None or lim.effective_cap is None and lim.last_status is None:
        return ""
    cap = "the cap" if lim.effective_cap is None else str(lim.effective_cap)
    last = f"; last API {lim.last_status} at {lim.last_at:%H:%M:%S} UTC" if lim.last_at else ""
    paused = f"; starts paused until {lim.paused_until:%H:%M:%S} UTC" if lim.paused_until else ""
    return f"; rate limits: effective cap {cap}{last}{paused}"


@text_of.register
def _(p: OutputPage) -> str:
    where = "the end" if p.eof else f"more from next_offset={p.next_offset}"
    head = f"[{p.source} of task {p.task_id} ({p.status.value}): bytes {p.offset}-{p.next_offset} of {p.total_bytes}"
    return f"{head}; {where}]\n{p.text}"


@text_of.register
def _(p: EventPage) -> str:
    more = f"; more from since={p.next}" if p.more else ""
    lines = [f"{len(p.events)} events of task {p.task_id} ({p.status.value}; times UTC){more}"]
    return "\n".join(lines + [event_line(ev) for ev in p.events])


def event_line(ev: dict[str, Any]) -> str:
    """One line for an event, never longer than its JSON: #seq, UTC time, kind, details."""
    ts = ev.get("ts")
    when = time.strftime("%H:%M:%S", time.gmtime(ts)) if isinstance(ts, (int, float)) else "?"
    parts = [f"#{ev.get('seq')}", when, str(ev.get("kind"))]
    for k, v in ev.items():
        if k not in ("seq", "ts", "kind"):
            parts.append(f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)}")
    return one_line(" ".join(parts), 200)


@text_of.register
def _(c: Claimed) -> str:
    if not c.claimed:
        return "no task ready for you: claim_task again later (or with wait_seconds)"
    name = f" {json.dumps(clip(c.name, 80), ensure_ascii=False)}" if c.name else ""
    return (
        f"claimed {c.task_id}{name} (attempt {c.attempt}); lease {c.lease} until {c.lease_expires_at:%H:%M:%S} UTC "
        f"(renew_task before then). Prompt: {one_line(c.prompt or '', 500)}"
    )


@text_of.register
def _(a: ApprovalAnswered) -> str:
    kept = f"; remembered as the rule {a.remembered.tool} -> {a.remembered.decision}" if a.remembered else ""
    return f"request {a.request_id} of task {a.task_id}: {a.decision} (by {a.by}); the sub-agent goes on{kept}"


@text_of.register
def _(p: ApprovalList) -> str:
    more = f"; more with cursor={p.next_cursor}" if p.more else ""
    lines = [f"{len(p.approvals)} pending approval request(s){more}"]
    lines += [
        f"task {a.task_id} request {a.request_id}: {a.tool_name} {one_line(a.input_preview, 200)} (until "
        f"{a.expires_at:%H:%M:%S} UTC)"
        for a in p.approvals
    ]
    return "\n".join(lines)


def approvals_reply(p: ApprovalList) -> Reply:
    """list_approvals: as many entries as fit (each input already bounded), ``more`` and a cursor for the rest."""
    entries = list(p.approvals)
    while True:
        cut = p.more or len(entries) < len(p.approvals)
        cursor = (entries[-1].cursor if entries else p.next_cursor) if cut else None
        page = p.model_copy(update={"approvals": entries, "more": cut, "next_cursor": cursor})
        reply = Reply.of(page, text_of(page))
        if reply.size <= REPLY_CHARS:
            return reply
        if len(entries) > 1:
            entries = entries[: max(1, len(entries) * 3 // 4)]
        else:  # (one entry alone too big: characters that escape long; its preview is cut until it fits)
            e = entries[0]
            entries = [e.model_copy(update={"input_preview": e.input_preview[: len(e.input_preview) // 2],
                                            "input_truncated": True})]  # fmt: skip


@text_of.register
def _(b: BudgetInfo) -> str:
    where = f"group {b.group}" if b.group else "the whole store"
    if b.budget_usd is None:
        return f"no budget for {where}" + (f"; {b.blocked} tasks blocked" if b.blocked else "")
    return (f"budget of {where}: ${b.budget_usd:.2f}; spent ${b.spent_usd:.2f}, reserved ${b.reserved_usd:.2f} by "
            f"{b.running} running, remaining ${b.remaining_usd:.2f}; {b.finished} finished, {b.blocked} blocked")  # fmt: skip


@text_of.register
def _(r: LeaseRenewed) -> str:
    return f"lease on {r.task_id} renewed until {r.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC"


@text_of.register
def _(n: NoteAdded) -> str:
    return f"note {n.seq} added to group {n.group}" + (f" (key {n.key})" if n.key else "")


@text_of.register
def _(p: NotePage) -> str:
    lines = [f"{len(p.notes)} notes of group {p.group}" + (f"; more from since={p.next}" if p.more else "")]
    lines += [f"[{n.seq}]{' ' + n.key if n.key else ''}{' by ' + n.by if n.by else ''}: {one_line(n.text, 200)}"
              for n in p.notes]  # fmt: skip
    return one_line("\n".join(lines), 4_000) if len(lines) > 40 else "\n".join(lines)


@text_of.register
def _(g: GroupCancelled) -> str:
    return f"{g.count} unfinished task(s) of group {g.group} cancelled" + (
        f": {', '.join(g.cancelled)}" if g.cancelled else ""
    )
